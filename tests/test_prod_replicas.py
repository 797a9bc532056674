"""Several processes on this machine: workers on one port, replicas sharing Redis quota and one audit DB."""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import psycopg
import pytest

from decision.bench_load import bench_config, running_server
from infermesh.decision.v1 import decision_pb2 as pb
from infermesh.decision.v1 import decision_pb2_grpc as pb_grpc
from tests.test_prod_support import DEMO_CONFIG, ROOT, free_port, start_serve, write_config


def _decisions_counted(http_port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=5).text
    return sum(float(m.group(1)) for m in re.finditer(r'^infermesh_decisions_total\{[^}]*\} (\S+)$', text, re.M))


def test_workers_share_one_port_and_all_stop_on_sigterm(tmp_path: Path) -> None:
    config = bench_config(str(DEMO_CONFIG), tmp_path, audit=False)
    with running_server(config, workers=2) as (target, proc, banner):
        pids = [int(p) for p in re.findall(r"pid (\d+)", banner)]
        https = [int(p) for p in re.findall(r"pid \d+ :(\d+)", banner)]
        assert len(pids) == 2 and len(https) == 2, banner
        req = pb.DecideRequest(request_id="w", tenant="acme", model_family="llama", client_region="eu-west")
        for _ in range(40):  # a new connection each time: the kernel spreads connections over the workers
            with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                assert pb_grpc.DecisionServiceStub(ch).Decide(req, timeout=10).decision_id
        counts = [_decisions_counted(p) for p in https]
        assert sum(counts) == 40 and min(counts) > 0, counts
        proc.terminate()
        assert proc.wait(60) == 0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_workers_share_the_ext_proc_port_too(tmp_path: Path) -> None:
    import yaml
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc

    from tests.test_envoy_extproc_unit import BUFFERED, body_msg, headers_msg

    config = bench_config(str(DEMO_CONFIG), tmp_path, audit=False)
    doc = yaml.safe_load(config.read_text())
    doc["extproc"] = {"enabled": True, "port": 0}
    config.write_text(yaml.safe_dump(doc))
    chat = {"model": "llama-3.1-8b", "max_tokens": 8, "messages": [{"role": "user", "content": "hello"}]}
    with running_server(config, workers=2) as (_, proc, banner):
        found = re.search(r"ext_proc (\S+)", banner)
        https = [int(p) for p in re.findall(r"pid \d+ :(\d+)", banner)]
        assert found is not None and len(https) == 2, banner
        for i in range(30):  # a new connection each time, as new Envoy worker threads would open
            with grpc.insecure_channel(found.group(1), options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                stream = ext_grpc.ExternalProcessorStub(ch).Process(
                    iter([headers_msg({"x-infermesh-tenant": "acme", ":path": "/v1/chat/completions"},
                                      mode=BUFFERED, no_wait=False), body_msg(chat)]), timeout=10)
                replies = list(stream)
            picked = {h.header.key: h.header.raw_value.decode()
                      for h in replies[-1].request_body.response.header_mutation.set_headers}
            assert picked.get("x-gateway-destination-endpoint"), (i, replies)
        counts = [_decisions_counted(p) for p in https]
        assert sum(counts) == 30 and min(counts) > 0, counts  # both workers picked
        proc.terminate()
        assert proc.wait(60) == 0


def _wait_for_a_fresh_minute() -> None:
    # Quota windows are calendar minutes: do not straddle one.
    if time.time() % 60 > 45:
        time.sleep(61 - time.time() % 60)


@contextlib.contextmanager
def _two_replicas(tmp_path: Path, env: dict[str, str], policies: str | None) -> Iterator[list[Any]]:
    """Two ``infermesh serve`` processes on their own ports, one database; stubs to each; SIGTERM after."""
    config = write_config(tmp_path, audit=True, policies=policies)
    ports = [free_port() for _ in range(4)]
    procs, channels = [], []
    try:
        for i in range(2):
            procs.append(start_serve(config, grpc_port=ports[2 * i], http_port=ports[2 * i + 1],
                                     env={**env, "INFERMESH_DATA_DIR": str(tmp_path / f"replica-{i}"),
                                          "INFERMESH_REPLICA": f"replica-{i}"}, log=tmp_path / f"replica-{i}.log"))
            channels.append(grpc.insecure_channel(f"127.0.0.1:{ports[2 * i]}"))
        yield [pb_grpc.DecisionServiceStub(ch) for ch in channels]
    finally:
        for ch in channels:
            ch.close()
        for p in procs:
            p.terminate()  # graceful: each replica drains its audit queue
        for p in procs:
            assert p.wait(60) == 0


def _logged(url: str, tenant: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT decision_id FROM decision_events WHERE tenant = %s", (tenant,)).fetchall()
    return {r[0] for r in rows}


def test_two_replicas_write_one_audit_log(tmp_path: Path, fresh_pg_url: str) -> None:
    tenant = f"replicas-{uuid.uuid4().hex[:8]}"
    ids: list[str] = []
    with _two_replicas(tmp_path, {"INFERMESH_DATABASE_URL": fresh_pg_url}, None) as stubs:
        for i in range(20):
            ids.append(stubs[i % 2].Decide(pb.DecideRequest(request_id=f"a{i}", tenant=tenant, model_family="llama",
                                                            client_region="eu-west"), timeout=10).decision_id)
    assert _logged(fresh_pg_url, tenant) == set(ids)


def test_two_replicas_enforce_one_quota(tmp_path: Path, fresh_pg_url: str, redis_url: str) -> None:
    pytest.importorskip("policies.integration", reason="the guardrail package's service entry point")
    env = {"INFERMESH_DATABASE_URL": fresh_pg_url, "INFERMESH_REDIS_URL": redis_url}
    tenant = f"quota-{uuid.uuid4().hex[:8]}"
    routed: list[list[str]] = [[], []]
    denied = 0
    with _two_replicas(tmp_path, env, str(ROOT / "policies" / "bundles" / "default")) as stubs:
        _wait_for_a_fresh_minute()
        for i in range(340):  # the free tier allows 300 requests a minute, whichever replica answers
            try:
                d = stubs[i % 2].Decide(pb.DecideRequest(request_id=f"q{i}", tenant=tenant, user_tier="free",
                                                         model_family="llama", client_region="eu-west",
                                                         estimated_input_tokens=10, expected_output_tokens=10),
                                        timeout=10)
                routed[i % 2].append(d.decision_id)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                assert "quota" in exc.details()
                denied += 1
    assert len(routed[0]) + len(routed[1]) == 300 and denied == 40
    assert set(routed[0]) | set(routed[1]) <= _logged(fresh_pg_url, tenant)
