"""Run a real Envoy (and fake model servers) for the end-to-end tests and ``infermesh bench envoy``.

The config is always rendered from the one template, ``deploy/envoy/envoy.yaml`` (with, when asked,
an identity fragment spliced in by :mod:`decision.envoy_bootstrap`): only addresses and ports (and,
when asked, the failure mode) are replaced, so the tests exercise exactly the shipped filter chain.
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import httpx
import yaml

from decision.envoy_binary import ensure_envoy
from decision.envoy_bootstrap import TEMPLATE, cluster, http_filters, listener, load_bootstrap


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ext_proc_filters(listener: dict[str, Any]) -> list[dict[str, Any]]:
    """The ext_proc filter configs of a listener, in chain order (pick, then observe)."""
    found = [cast(dict[str, Any], f["typed_config"]) for f in http_filters(listener)
             if f["name"] == "envoy.filters.http.ext_proc"]
    if not found:
        raise KeyError("no ext_proc filter in the inference listener")
    return found


def render_config(*, listen_port: int, admin_port: int, extproc_port: int, extproc_host: str = "127.0.0.1",
                  failure_mode_allow: bool | None = None, template: Path = TEMPLATE,
                  identity: Path | None = None, jwks_port: int = 0) -> dict[str, Any]:
    """The template with test addresses: everything binds to loopback.

    With ``identity``, the fragment's filters and clusters are spliced in and every remote JWKS is
    fetched over plain HTTP from ``127.0.0.1:jwks_port/jwks.json`` (the test's identity provider).
    """
    cfg = load_bootstrap(template, identity)
    cfg["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": admin_port}
    inference = listener(cfg, "inference")
    inference["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": listen_port}
    ep = cluster(cfg, "infermesh_extproc")
    ep["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] = {
        "address": extproc_host, "port_value": extproc_port}
    if failure_mode_allow is not None:
        ext_proc_filters(inference)[0]["failure_mode_allow"] = failure_mode_allow
    if identity is not None:
        _local_jwks(cfg, inference, jwks_port)
    return cfg


def _local_jwks(cfg: dict[str, Any], inference: dict[str, Any], port: int) -> None:
    for f in http_filters(inference):
        if f["name"] != "envoy.filters.http.jwt_authn":
            continue
        for provider in f["typed_config"]["providers"].values():
            uri = provider.get("remote_jwks", {}).get("http_uri")
            if uri is None:
                continue
            uri["uri"] = f"http://127.0.0.1:{port}/jwks.json"
            idp = cluster(cfg, uri["cluster"])
            idp["type"] = "STATIC"
            idp.pop("transport_socket", None)  # the test's provider speaks plain HTTP
            idp["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] = {
                "address": "127.0.0.1", "port_value": port}


def add_direct_listener(cfg: dict[str, Any], *, port: int, backend_port: int) -> dict[str, Any]:
    """A copy of ``cfg`` with one more listener that proxies straight to one backend, no picker.

    The benchmark's baseline: same Envoy, same filters minus ext_proc, a static upstream (it never
    routes on a destination header).
    """
    out = copy.deepcopy(cfg)
    lst = copy.deepcopy(listener(out, "inference"))
    lst["name"] = "direct"
    lst["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": port}
    hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["stat_prefix"] = "direct"
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] != "envoy.filters.http.ext_proc"]
    hcm["route_config"] = {"name": "direct", "virtual_hosts": [{"name": "direct", "domains": ["*"], "routes": [
        {"match": {"prefix": "/"}, "route": {"cluster": "direct_backend", "timeout": "60s"}}]}]}
    out["static_resources"]["listeners"].append(lst)
    out["static_resources"]["clusters"].append({
        "name": "direct_backend", "type": "STATIC", "connect_timeout": "1s",
        "load_assignment": {"cluster_name": "direct_backend", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": backend_port}}}}]}]}})
    return out


def add_pick_only_listener(cfg: dict[str, Any], *, port: int) -> dict[str, Any]:
    """A copy of ``cfg`` with one more listener like ``inference`` minus the observer filter.

    For measuring what the request phase alone costs (the observer never delays a request, but
    it does use CPU on the processor's machine).
    """
    out = copy.deepcopy(cfg)
    lst = copy.deepcopy(listener(out, "inference"))
    lst["name"] = "pick_only"
    lst["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": port}
    hcm = lst["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["stat_prefix"] = "pick_only"
    hcm["http_filters"] = [f for f in hcm["http_filters"]
                           if not f.get("typed_config", {}).get("observability_mode")]
    out["static_resources"]["listeners"].append(lst)
    return out


class EnvoyProcess:
    """A running Envoy with a given config; a context manager that stops it on exit.

    Parameters
    ----------
    config
        The rendered bootstrap (as a mapping).
    admin_port
        The admin port in ``config`` (polled for readiness).
    concurrency
        Envoy worker threads.
    """

    def __init__(self, config: dict[str, Any], admin_port: int, *, concurrency: int = 1) -> None:
        self.config = config
        self.admin_port = admin_port
        self.concurrency = concurrency
        self._dir = tempfile.TemporaryDirectory(prefix="infermesh-envoy-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = Path(self._dir.name) / "envoy.log"

    def start(self, timeout_s: float = 30.0) -> EnvoyProcess:
        if self.proc is not None:  # a second Envoy on the same ports (SO_REUSEPORT) would share the traffic
            raise RuntimeError("this Envoy was started already")
        binary = ensure_envoy()
        path = Path(self._dir.name) / "envoy.yaml"
        path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        # --disable-hot-restart: several Envoys (tests, other helpers) may run on one machine.
        cmd = [str(binary), "-c", str(path), "--disable-hot-restart", "--concurrency", str(self.concurrency),
               "-l", os.environ.get("INFERMESH_ENVOY_LOG_LEVEL", "warning"), "--log-path", str(self.log_path)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.admin_port}/ready", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"envoy not ready after {timeout_s}s:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stats(self, prefix: str = "") -> dict[str, int]:
        """Counters and gauges from the admin ``/stats`` endpoint (optionally filtered)."""
        text = httpx.get(f"http://127.0.0.1:{self.admin_port}/stats", params={"filter": prefix} if prefix
                         else None, timeout=5.0).text
        out: dict[str, int] = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[name] = int(value)
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._dir.cleanup()

    def __enter__(self) -> EnvoyProcess:
        return self if self.proc is not None else self.start()  # with EnvoyProcess(...).start() as envoy: one Envoy

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Backend:
    """A fake model server (:mod:`decision.extproc_fakebackend`) in its own process."""

    def __init__(self, name: str, *, ttft_ms: float = 5.0, token_ms: float = 1.0, streaming: bool = True) -> None:
        self.name = name
        args = [sys.executable, "-m", "decision.extproc_fakebackend", "--name", name, "--port", "0",
                "--ttft-ms", str(ttft_ms), "--token-ms", str(token_ms)]
        if not streaming:
            args.append("--no-stream")
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("listening "):
            self.stop()
            raise RuntimeError(f"backend {name} did not start: {line!r}")
        self.address = line.split()[1]
        self.port = int(self.address.rsplit(":", 1)[1])

    def stats(self) -> dict[str, Any]:
        doc: dict[str, Any] = httpx.get(f"http://{self.address}/stats", timeout=5.0).json()
        return doc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
