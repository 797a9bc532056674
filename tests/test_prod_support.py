"""Helpers for the production-readiness tests: the gRPC edge in-process, services, configs, certificates."""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from decision.config import ServiceConfig, Settings, load_config
from decision.edge import EdgeInterceptor
from decision.grpc_server import DecisionServicer
from decision.metrics import ServiceMetrics
from infermesh.decision.v1 import decision_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "deploy" / "demo" / "infermesh.yaml"
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").exists() else sys.executable
SERVICE = "/infermesh.decision.v1.DecisionService/"


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


@dataclass
class FakeContext:
    """A servicer context for calling handlers in-process (what the edge and the servicer use of it)."""

    metadata: Sequence[tuple[str, str]] = ()
    remaining: float | None = None
    trailers: dict[str, str] = field(default_factory=dict)
    active: bool = True  # False: the caller cancelled

    def time_remaining(self) -> float | None:
        return self.remaining

    def is_active(self) -> bool:
        return self.active

    def invocation_metadata(self) -> Sequence[tuple[str, str]]:
        return self.metadata

    def set_trailing_metadata(self, md: Iterable[tuple[str, str]]) -> None:
        self.trailers.update(dict(md))

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


class _Collect:
    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.handlers.update(handlers)


class InProcessEdge:
    """DecisionService handlers behind the edge interceptor, called with serialized bytes."""

    def __init__(self, servicer: DecisionServicer, edge: EdgeInterceptor | None = None) -> None:
        collect = _Collect()
        pb_grpc.add_DecisionServiceServicer_to_server(servicer, collect)
        edge = edge or EdgeInterceptor()
        self.handlers: dict[str, Any] = {name: edge.intercept_service(_const(h), _Details(SERVICE + name))
                                         for name, h in collect.handlers.items()}

    def call(self, method: str, payload: bytes | Sequence[bytes], ctx: FakeContext | None = None) -> Any:
        """The response message, or raises :class:`Aborted` with the status the client would see."""
        h = self.handlers[method]
        ctx = ctx or FakeContext()
        if h.unary_unary is not None:
            assert isinstance(payload, bytes)
            return h.unary_unary(h.request_deserializer(payload), ctx)
        assert not isinstance(payload, bytes)
        return h.stream_unary(iter([h.request_deserializer(p) for p in payload]), ctx)


def _const(handler: Any) -> Any:
    return lambda _details: handler


@dataclass(frozen=True)
class _Details:
    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


def demo_config(**updates: Any) -> ServiceConfig:
    cfg = load_config(DEMO_CONFIG)
    return cfg.model_copy(update=updates) if updates else cfg


def servicer_for(cfg: ServiceConfig | None = None) -> tuple[Any, DecisionServicer]:
    from decision.service import Service

    service = Service(cfg or demo_config(), Settings(), audit_enabled=False)
    assert service.engine is not None
    return service, DecisionServicer(service.engine, ServiceMetrics(),
                                     reload_policies=lambda: (True, "test-revision", ""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp: Path, *, audit: bool, policies: str | None = None, extra: dict[str, Any] | None = None) -> Path:
    """A copy of the demo config under ``tmp`` (absolute fleet path), audit on or off."""
    doc = yaml.safe_load(DEMO_CONFIG.read_text())
    doc["fleet"] = str((DEMO_CONFIG.parent / doc["fleet"]).resolve())
    doc["audit"] = {"enabled": audit}
    if policies is not None:
        doc["policies"] = str(Path(policies).resolve())
    elif doc.get("policies"):
        doc["policies"] = str((DEMO_CONFIG.parent / doc["policies"]).resolve())
    doc.update(extra or {})
    path = tmp / "infermesh.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def start_serve(config: Path, *, grpc_port: int, http_port: int, env: dict[str, str], workers: int = 1,
                log: Path | None = None) -> subprocess.Popen[bytes]:
    """``infermesh serve`` as a child process; returns once its gRPC port answers."""
    out = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen([PYTHON, "-m", "decision.cli", "serve", "--config", str(config),
                             "--grpc-port", str(grpc_port), "--http-port", str(http_port),
                             "--workers", str(workers)],
                            cwd=ROOT, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
    wait_serving(f"127.0.0.1:{grpc_port}", proc, 90.0)
    return proc


def wait_serving(target: str, proc: subprocess.Popen[bytes] | None, timeout_s: float) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with grpc.insecure_channel(target) as ch:
            try:
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                return
            except grpc.RpcError:
                time.sleep(0.3)
    raise TimeoutError(f"{target} did not start serving in {timeout_s:.0f} s")


# -- a throwaway certificate authority ----------------------------------------------------------
def make_ca(folder: Path, name: str = "test-ca") -> tuple[Path, Any, Any]:
    """A self-signed CA; returns its certificate file, certificate and key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    path = folder / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, cert, key


def issue_cert(folder: Path, ca_cert: Any, ca_key: Any, name: str, *, server: bool) -> tuple[Path, Path]:
    """A leaf certificate signed by the CA (``localhost``/127.0.0.1 for servers); returns cert and key files."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path
