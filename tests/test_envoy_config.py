"""The shipped Envoy config: Envoy accepts it, and its safety properties hold structurally."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from decision.envoy_binary import ensure_envoy
from decision.envoy_bootstrap import IDENTITY_JWT, TEMPLATE, load_bootstrap
from decision.extproc_envoyrun import render_config

pytestmark = pytest.mark.envoy
DEST = "x-gateway-destination-endpoint"


def _clusters(cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in cfg["static_resources"]["clusters"]}


def _hcms(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    return [f["typed_config"] for lst in cfg["static_resources"]["listeners"] for fc in lst["filter_chains"]
            for f in fc["filters"] if f["name"] == "envoy.filters.network.http_connection_manager"]


def test_envoy_validates_the_template_and_a_rendered_copy(tmp_path: Path) -> None:
    envoy = ensure_envoy()
    rendered = tmp_path / "envoy.yaml"
    rendered.write_text(yaml.safe_dump(render_config(listen_port=10001, admin_port=10002, extproc_port=10003)))
    with_identity = tmp_path / "envoy-jwt.yaml"  # as `python -m decision.envoy_bootstrap --identity` prints it
    with_identity.write_text(yaml.safe_dump(load_bootstrap(identity=IDENTITY_JWT), sort_keys=False))
    for path in (TEMPLATE, rendered, with_identity):
        out = subprocess.run([str(envoy), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
                             capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]


def test_no_listener_routes_on_a_client_supplied_destination() -> None:
    cfg = yaml.safe_load(TEMPLATE.read_text())
    original_dst = {n for n, c in _clusters(cfg).items() if c.get("type") == "ORIGINAL_DST"}
    assert original_dst == {"infermesh_endpoints"}
    lb = _clusters(cfg)["infermesh_endpoints"]["original_dst_lb_config"]
    assert lb == {"use_http_header": True, "http_header_name": DEST}
    for hcm in _hcms(cfg):
        filters = [f["name"] for f in hcm["http_filters"]]
        routes = [r for vh in hcm["route_config"]["virtual_hosts"] for r in vh["routes"]]
        to_dst = [r for r in routes if r.get("route", {}).get("cluster") in original_dst]
        if not to_dst:
            continue
        # The header is stripped before the picker, and the picker sits before the router.
        strip = hcm["http_filters"][0]
        assert strip["name"] == "envoy.filters.http.header_mutation"
        assert {"remove": DEST} in strip["typed_config"]["mutations"]["request_mutations"]
        assert filters.index("envoy.filters.http.ext_proc") < filters.index("envoy.filters.http.router")
        # Routing needs the picker's metadata, which a client cannot send.
        for r in to_dst:
            meta = r["match"]["dynamic_metadata"]
            assert meta == [{"filter": "envoy.lb", "path": [{"key": DEST}], "value": {"present_match": True}}]
            assert "headers" not in r["match"]


def test_picker_is_fail_closed_and_observer_fail_open() -> None:
    cfg = yaml.safe_load(TEMPLATE.read_text())
    (hcm,) = _hcms(cfg)
    pick, observe = [f["typed_config"] for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc"]
    assert pick["failure_mode_allow"] is False and pick["status_on_error"] == {"code": 503}
    assert pick["metadata_options"]["receiving_namespaces"]["untyped"] == ["envoy.lb"]
    assert observe["observability_mode"] is True and observe["failure_mode_allow"] is True
    for f in (pick, observe):
        assert f["grpc_service"]["envoy_grpc"]["cluster_name"] == "infermesh_extproc"
    proc = _clusters(cfg)["infermesh_extproc"]
    opts = proc["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in opts["explicit_http_config"]
    assert proc["health_checks"][0]["grpc_health_check"]["service_name"] == \
        "envoy.service.ext_proc.v3.ExternalProcessor"


def test_binary_override_must_be_executable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "envoy"
    fake.write_text("not a binary")
    monkeypatch.setenv("INFERMESH_ENVOY_BIN", str(fake))
    with pytest.raises(RuntimeError, match="not an executable"):
        ensure_envoy()
    fake.chmod(0o755)
    assert ensure_envoy() == fake
    monkeypatch.delenv("INFERMESH_ENVOY_BIN")
    real = ensure_envoy()
    assert os.access(real, os.X_OK) and "1.40.0" in subprocess.run(
        [str(real), "--version"], capture_output=True, text=True, timeout=30, check=False).stdout


def test_serve_warns_when_an_endpoint_address_is_a_host_name_envoy_cannot_dial(
        caplog: pytest.LogCaptureFixture) -> None:
    from decision.service import _warn_unroutable_addresses
    from learners.testing import toy_endpoint

    ip = toy_endpoint(0)
    named = dataclasses.replace(toy_endpoint(1), address="gpu-node-7.internal:8000")
    with caplog.at_level(logging.WARNING, logger="infermesh.service"):
        _warn_unroutable_addresses([ip])
        assert not caplog.records
        _warn_unroutable_addresses([ip, named])
    assert "1 endpoint(s) have a host name" in caplog.text and named.endpoint_id in caplog.text


def test_an_envoy_started_before_its_with_block_is_one_envoy(monkeypatch: pytest.MonkeyPatch) -> None:
    # `with EnvoyProcess(...).start() as envoy` started a second Envoy on the same ports in __enter__;
    # stop() ended only that one, and two test modules left an Envoy running after every test run.
    from decision.extproc_envoyrun import EnvoyProcess

    envoy = EnvoyProcess({}, 0)
    envoy.proc = subprocess.Popen(["sleep", "30"])  # as start() leaves it
    starts: list[int] = []

    def counted_start(self: EnvoyProcess, *args: Any, **kwargs: Any) -> EnvoyProcess:
        starts.append(1)
        return self

    monkeypatch.setattr(EnvoyProcess, "start", counted_start)
    with envoy as entered:
        assert entered is envoy
    assert starts == [] and envoy.proc.poll() is not None  # not started again; stopped at the end
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="started already"):
        envoy.start()
