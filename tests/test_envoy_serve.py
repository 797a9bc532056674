"""``infermesh serve`` with ``extproc.enabled``: the real Service picks for a real Envoy, and learns."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
import yaml

from decision.config import Settings, load_config
from decision.extproc_envoyrun import Backend, EnvoyProcess, free_port, render_config
from decision.service import Service
from tests.envoy_support import BACKENDS, MODEL, build_fleet

pytestmark = pytest.mark.envoy


@pytest.mark.parametrize("server", ["grpclib", "asyncio", "threads"])
def test_service_serves_ext_proc_to_envoy_and_records_outcomes(tmp_path: Path, server: str) -> None:
    backends = [Backend(b.name, ttft_ms=b.ttft_ms, token_ms=b.token_ms, streaming=b.streaming) for b in BACKENDS]
    service: Service | None = None
    try:
        fleet = build_fleet({b.name: b.address for b in backends})
        (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(fleet.spec.model_dump(mode="json")))
        (tmp_path / "infermesh.yaml").write_text(yaml.safe_dump({
            "fleet": "fleet.yaml", "audit": {"enabled": False},
            "learner": {"name": "least-ttft"},
            "extproc": {"enabled": True, "port": 0, "max_streams": 16, "server": server,
                        "settings": {"tenant_header": "X-Org", "default_tenant": ""}}}))
        cfg = load_config(tmp_path / "infermesh.yaml")
        service = Service(cfg, Settings(), audit_enabled=False)
        service.start_grpc(0)
        port = service.start_extproc()
        assert service.engine is not None
        listen, admin = free_port(), free_port()
        with EnvoyProcess(render_config(listen_port=listen, admin_port=admin, extproc_port=port), admin), \
                httpx.Client(base_url=f"http://127.0.0.1:{listen}", timeout=10.0) as c:
            body = {"model": MODEL, "max_tokens": 3, "messages": [{"role": "user", "content": "hi there"}]}
            ok = c.post("/v1/chat/completions", json=body, headers={"x-org": "acme"})
            assert ok.status_code == 200, ok.text
            assert ok.headers["x-backend-name"] in {b.name for b in BACKENDS}
            # The configured header name is the one read: without it, a 400 naming it.
            bad = c.post("/v1/chat/completions", json=body, headers={"x-infermesh-tenant": "acme"})
            assert bad.status_code == 400 and "x-org" in bad.json()["error"]["message"]
            deadline = time.monotonic() + 5
            while service.engine.stats["outcomes"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
        assert service.engine.stats["outcomes"] == 1 and service.engine.pending_outcomes() == 0
        # Decisions and outcomes through Envoy are counted in /metrics as those over gRPC are.
        text = service.metrics.exposition().decode()
        assert 'infermesh_decisions_total{result="routed"} 1.0' in text
        assert 'infermesh_outcomes_total{status="ok"} 1.0' in text
    finally:
        if service is not None:
            service.stop(0)
        for b in backends:
            b.stop()
