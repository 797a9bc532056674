"""The identity fragment through a real Envoy: the decision context's identity comes from a verified token.

Envoy runs ``deploy/envoy/envoy.yaml`` with ``deploy/envoy/identity-jwt.yaml`` spliced in; the only
change is that the identity provider's JWKS is served over plain HTTP by this test, which signs
ES256 tokens with its own key.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from decision.envoy_bootstrap import IDENTITY_JWT, BootstrapError, http_filters, listener, load_bootstrap, main
from decision.extproc import RunningExtProc, serve_extproc
from decision.extproc_envoyrun import Backend, EnvoyProcess, free_port, render_config
from tests.envoy_support import BACKENDS, MODEL, RecordingEngine, ResidencyGuard, build_fleet, make_engine, set_load

pytestmark = pytest.mark.envoy

ISSUER, AUDIENCE = "https://idp.example.com", "infermesh"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Idp:
    """An identity provider: one P-256 key, its JWKS over HTTP, and ES256 tokens signed with it."""

    def __init__(self, kid: str = "test-1") -> None:
        self.kid = kid
        self.key = ec.generate_private_key(ec.SECP256R1())
        nums = self.key.public_key().public_numbers()
        jwks = {"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
                          "x": _b64(nums.x.to_bytes(32, "big")), "y": _b64(nums.y.to_bytes(32, "big"))}]}
        body = json.dumps(jwks).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200 if self.path == "/jwks.json" else 404)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def token(self, claims: dict[str, Any], *, key: ec.EllipticCurvePrivateKey | None = None,
              ttl_s: float = 300.0) -> str:
        now = int(time.time())
        payload = {"iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": int(now + ttl_s), **claims}
        signing = (_b64(json.dumps({"alg": "ES256", "typ": "JWT", "kid": self.kid}).encode()) + "."
                   + _b64(json.dumps(payload).encode()))
        r, s = decode_dss_signature((key or self.key).sign(signing.encode(), ec.ECDSA(hashes.SHA256())))
        return signing + "." + _b64(r.to_bytes(32, "big") + s.to_bytes(32, "big"))

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Stack:
    idp: Idp
    backends: dict[str, Backend]
    engine: RecordingEngine
    extproc: RunningExtProc
    envoy: EnvoyProcess
    client: httpx.Client

    def requests_seen(self) -> int:
        return sum(int(b.stats()["requests"]) for b in self.backends.values())

    def chat(self, headers: dict[str, str]) -> httpx.Response:
        doc = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hello " * 20}]}
        return self.client.post("/v1/chat/completions", json=doc, headers=headers)


@contextmanager
def _stack(adjust: Callable[[dict[str, Any]], None] | None = None) -> Iterator[Stack]:
    """The stack on the shipped bootstrap and fragment; ``adjust`` may change the rendered config first."""
    idp = Idp()
    backends: dict[str, Backend] = {}
    try:
        for b in BACKENDS:
            backends[b.name] = Backend(b.name, ttft_ms=b.ttft_ms, token_ms=b.token_ms, streaming=False)
        engine = make_engine(build_fleet({n: b.address for n, b in backends.items()}), ResidencyGuard())
        set_load(engine, {"eu-fast": 300.0, "eu-stream": 300.0, "us-stream": 0.0})  # the US looks best
        extproc = serve_extproc(engine, address="127.0.0.1:0", max_streams=16)
        listen, admin = free_port(), free_port()
        cfg = render_config(listen_port=listen, admin_port=admin, extproc_port=extproc.port, identity=IDENTITY_JWT,
                            jwks_port=idp.port)
        if adjust is not None:
            adjust(cfg)
        envoy = EnvoyProcess(cfg, admin).start()
        with httpx.Client(base_url=f"http://127.0.0.1:{listen}", timeout=10.0) as client:
            stack = Stack(idp, backends, engine, extproc, envoy, client)
            _wait_for_jwks(stack)
            yield stack
        envoy.stop()
        extproc.stop(0)
    finally:
        for be in backends.values():
            be.stop()
        idp.stop()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with _stack() as s:
        yield s


def _wait_for_jwks(stack: Stack, timeout_s: float = 15.0) -> None:
    """Envoy fetches the JWKS in the background at start-up: until then every token is refused."""
    token = stack.idp.token({"tenant": "warmup"})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stack.chat({"authorization": f"Bearer {token}"}).status_code == 200:
            return
        time.sleep(0.1)
    raise AssertionError("Envoy never accepted a token signed with the JWKS it was given:\n"
                         + stack.envoy.log()[-3000:])


def test_without_a_valid_token_nothing_is_decided_or_dialled(stack: Stack) -> None:
    decided, dialled = len(stack.engine.decisions), stack.requests_seen()
    stranger = ec.generate_private_key(ec.SECP256R1())
    for headers in (
        {"x-infermesh-tenant": "acme"},  # no token at all: the headers alone are not an identity
        {"authorization": f"Bearer {stack.idp.token({'tenant': 'acme'}, key=stranger)}"},  # signed by another key
        {"authorization": f"Bearer {stack.idp.token({'tenant': 'acme'}, ttl_s=-120)}"},  # expired
        {"authorization": "Bearer not.a.token"},
    ):
        r = stack.chat(headers)
        assert r.status_code == 401, (headers, r.status_code, r.text)
    assert len(stack.engine.decisions) == decided
    assert stack.requests_seen() == dialled


def test_identity_comes_from_the_token_not_the_clients_headers(stack: Stack) -> None:
    token = stack.idp.token({"tenant": "acme", "tier": "premium", "jurisdictions": "EU", "data_class": "personal"})
    r = stack.chat({"authorization": f"Bearer {token}", "x-infermesh-tenant": "globex",
                    "x-infermesh-tier": "free", "x-infermesh-allowed-jurisdictions": "US",
                    "x-infermesh-data-class": "public"})
    assert r.status_code == 200, r.text
    ctx = stack.engine.decisions[r.headers["x-infermesh-decision-id"]].request
    assert (ctx.tenant, ctx.user_tier, ctx.allowed_jurisdictions, ctx.data_class) == \
        ("acme", "premium", ("EU",), "personal")
    # The token's residency held although the US endpoint looked best and the client asked for the US.
    assert r.headers["x-backend-name"] in ("eu-fast", "eu-stream")
    last = stack.backends[r.headers["x-backend-name"]].stats()["last_headers"]
    assert "authorization" not in last  # forward: false, the model server never sees the token


def test_a_list_claim_for_residency_fails_closed(stack: Stack) -> None:
    """Envoy passes a non-string claim base64-encoded: it names no jurisdiction, so nothing is allowed."""
    dialled = stack.requests_seen()
    token = stack.idp.token({"tenant": "acme", "jurisdictions": ["EU", "US"]})
    r = stack.chat({"authorization": f"Bearer {token}"})
    assert r.status_code == 503 and r.json()["error"]["rules"] == [ResidencyGuard.RESIDENCY], r.text
    assert stack.requests_seen() == dialled


def test_a_claim_the_token_lacks_leaves_the_header_absent_not_the_clients(stack: Stack) -> None:
    token = stack.idp.token({"tenant": "acme"})
    r = stack.chat({"authorization": f"Bearer {token}", "x-infermesh-allowed-jurisdictions": "EU",
                    "x-infermesh-tier": "premium"})
    assert r.status_code == 200, r.text
    ctx = stack.engine.decisions[r.headers["x-infermesh-decision-id"]].request
    assert ctx.tenant == "acme"
    assert ctx.allowed_jurisdictions == ()  # the client's own restriction was dropped with the rest
    assert ctx.user_tier != "premium"
    assert r.headers["x-backend-name"] == "us-stream"


def test_identity_headers_are_stripped_even_where_no_claim_is_mapped_to_them() -> None:
    """The strip, not jwt_authn, is what keeps a client's copy out: drop a claim mapping and see."""
    def unmap_data_class(cfg: dict[str, Any]) -> None:
        jwt = next(f for f in http_filters(listener(cfg, "inference")) if f["name"] == "envoy.filters.http.jwt_authn")
        provider = jwt["typed_config"]["providers"]["tenant_idp"]
        provider["claim_to_headers"] = [m for m in provider["claim_to_headers"] if m["claim_name"] != "data_class"]

    with _stack(unmap_data_class) as stack:
        token = stack.idp.token({"tenant": "acme", "data_class": "personal"})
        r = stack.chat({"authorization": f"Bearer {token}", "x-infermesh-data-class": "phi"})
        assert r.status_code == 200, r.text
        ctx = stack.engine.decisions[r.headers["x-infermesh-decision-id"]].request
        assert (ctx.tenant, ctx.data_class) == ("acme", "public")  # neither the client's nor the unmapped claim


def test_the_spliced_bootstrap_puts_identity_first_and_is_printed_whole(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--identity", str(IDENTITY_JWT)]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    names = [f["name"] for f in http_filters(listener(cfg, "inference"))]
    assert names[:3] == ["envoy.filters.http.header_mutation", "envoy.filters.http.jwt_authn",
                         "envoy.filters.http.header_mutation"]
    assert names.index("envoy.filters.http.jwt_authn") < names.index("envoy.filters.http.ext_proc")
    assert "tenant_idp" in {c["name"] for c in cfg["static_resources"]["clusters"]}
    assert load_bootstrap() == load_bootstrap(identity=None)  # no fragment: the template as shipped


def test_a_broken_fragment_is_refused_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "identity.yaml"
    bad.write_text("http_filters:\n  - name: a\n  clusters: [\n")
    assert main(["--identity", str(bad)]) == 2
    assert f"{bad}:" in capsys.readouterr().err
    bad.write_text("clusters: []\n")
    with pytest.raises(BootstrapError, match="http_filters"):
        load_bootstrap(identity=bad)
    bad.write_text("http_filters: [{name: x}]\nclusters: [{name: infermesh_extproc}]\n")
    with pytest.raises(BootstrapError, match="'infermesh_extproc' is already in the bootstrap"):
        load_bootstrap(identity=bad)
    with pytest.raises(BootstrapError, match="cannot read"):
        load_bootstrap(identity=tmp_path / "missing.yaml")
