"""The spine's CLI: `infermesh decide`, `infermesh serve` (real process, SIGTERM), config errors."""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from infermesh.decision.v1 import decision_pb2 as pb
from infermesh.decision.v1 import decision_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "decision.cli"]


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_decide_answers_one_request_as_json(tmp_path: Path) -> None:
    req = tmp_path / "r.json"
    req.write_text(json.dumps({"request_id": "cli-1", "tenant": "globex", "model": "sdxl-1.0", "modality": "image",
                               "client_region": "us-west"}))
    proc = _run("decide", "--request", str(req), "--trace")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["route"]["model"] == "sdxl-1.0"
    assert out["trace"]["stages"]["choose"]["chosen"] == out["route"]["endpoint_id"]
    assert 0 < out["propensity"] <= 1
    # As a gRPC DecideResponse carries it: which inventory the route came from.
    assert out["inventory_revision"] == out["trace"]["inventory_revision"] != ""


def test_the_default_config_is_found_from_another_directory(tmp_path: Path) -> None:
    # Run away from the checkout's root, the commands still find the demo's configuration (the
    # checkout this code runs from); an explicit --config that is not there is named.
    req = tmp_path / "r.json"
    req.write_text(json.dumps({"request_id": "cli-elsewhere", "tenant": "globex", "model": "llama-3.1-8b"}))
    proc = subprocess.run([*CLI, "decide", "--request", str(req)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["route"]["model"] == "llama-3.1-8b"
    proc = subprocess.run([*CLI, "decide", "--config", "deploy/demo/infermesh.yaml", "--request", str(req)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "deploy/demo/infermesh.yaml: no such config file" in proc.stderr


def test_decide_reports_bad_input_with_position_or_field(tmp_path: Path) -> None:
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"tenant": "x",\n  "model": }')
    proc = _run("decide", "--request", str(bad_json))
    assert proc.returncode == 2
    assert f"{bad_json}:2:" in proc.stderr
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"request_id": "x", "tenant": "t", "model": "no-such-model"}))
    proc = _run("decide", "--request", str(unknown))
    assert proc.returncode == 1
    err = json.loads(proc.stdout)
    assert err["error"] == "NotFound" and err["field"] == "model" and err["location"] == f"{unknown}:1"
    # A value of the wrong type, or out of range: the field, and the line it is on.
    for value, what in (('"lots"', "Failed to parse"), ("-5", "must be between")):
        bad_value = tmp_path / "value.json"
        bad_value.write_text('{"request_id": "x", "tenant": "t",\n "model": "llama-3.1-8b",\n'
                             f' "estimated_input_tokens": {value}}}')
        proc = _run("decide", "--request", str(bad_value))
        assert proc.returncode == 1
        assert f"{bad_value}:3: estimated_input_tokens: {what}" in proc.stderr, proc.stderr
        err = json.loads(proc.stdout)
        assert err["field"] == "estimated_input_tokens" and err["location"] == f"{bad_value}:3"


def test_config_errors_name_file_line_and_field(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"fleet: {ROOT / 'deploy/demo/fleet.yaml'}\nserver:\n  grpc_port: 99999\n")
    proc = _run("decide", "--config", str(cfg), "--request", "-")
    assert proc.returncode == 2
    assert f"{cfg}:3: server.grpc_port:" in proc.stderr


@pytest.mark.parametrize("args", [["--grpc-port", "99999"], ["--http-port", "-5"], ["--workers", "0"]])
def test_serve_refuses_out_of_range_ports_and_workers(args: list[str]) -> None:
    proc = _run("serve", *args)  # the OS would have taken 99999 modulo 65536 and served on 34463
    assert proc.returncode == 2
    assert f"argument {args[0]}:" in proc.stderr and "is outside" in proc.stderr


def test_relative_spool_dir_resolves_against_the_config_folder(tmp_path: Path) -> None:
    from decision.config import ConfigError, load_config

    (tmp_path / "conf").mkdir()
    cfg = tmp_path / "conf" / "c.yaml"
    cfg.write_text(f"fleet: {ROOT / 'deploy/demo/fleet.yaml'}\naudit:\n  spool_dir: spool\n")
    assert load_config(cfg).audit["spool_dir"] == tmp_path / "conf" / "spool"  # not ./spool of whoever started it
    cfg.write_text(f"fleet: {ROOT / 'deploy/demo/fleet.yaml'}\nlearner:\n  features: bogus\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:3: learner\.features:"):
        load_config(cfg)


@pytest.mark.parametrize(("section", "expected"), [
    # Strict types: neither is coerced into what the author may not have meant.
    ('decision:\n  count_inflight: "no"\n', r"c\.yaml:3: decision\.count_inflight: Input should be a valid boolean"),
    ('server:\n  grpc_port: "50051"\n', r"c\.yaml:3: server\.grpc_port: Input should be a valid integer"),
    ("tls:\n  cert_file: a.pem\n  key_file: b.key\n  require_client_cert: 1\n",
     r"c\.yaml:5: tls\.require_client_cert: Input should be a valid boolean"),
    # The audit section is checked at load time, with its line, not when the writer starts.
    ('audit:\n  enabled: "false"\n', r"c\.yaml:3: audit\.enabled: Input should be a valid boolean"),
    ("audit:\n  batch_size: lots\n", r"c\.yaml:3: audit\.batch_size: Input should be a valid integer"),
    ("audit:\n  on_spool_full: drop\n", r"c\.yaml:3: audit\.on_spool_full: Input should be 'fail_closed'"),
    # A scrape target no request could reach fails here, not at every scrape.
    ("telemetry:\n  scrape:\n    - {url: 'http://gpu-node-07:dcgm/metrics', node_id: n1}\n",
     r"c\.yaml:4: telemetry\.scrape\.0\.url: Value error, not a URL"),
    # Values a server or thread would take at start-up and fail on later (grpc's C int, wait()'s limit).
    ("server:\n  max_message_bytes: 4294967296\n", r"c\.yaml:3: server\.max_message_bytes: Input should be less"),
    ("telemetry:\n  scrape_interval_s: 1.0e+10\n", r"c\.yaml:3: telemetry\.scrape_interval_s: Input should be less"),
    ("learner:\n  sync_interval_s: 1.0e+10\n", r"c\.yaml:3: learner\.sync_interval_s: Input should be less"),
    ("learner:\n  replica: 2024-13-01\n", r"c\.yaml:3:12: '2024-13-01' is not a valid timestamp"),
    ("policies: " + "a" * 300 + "\n", r"c\.yaml:2: policies: cannot use the path: .*too long"),
    ("extproc:\n  settings: {tenant_header: 5}\n", r"c\.yaml:3: extproc\.settings: .*extproc\.tenant_header: must"),
])
def test_config_values_are_not_coerced_and_the_audit_section_is_checked(tmp_path: Path, section: str,
                                                                         expected: str) -> None:
    from decision.config import ConfigError, load_config
    from tests.test_prod_support import issue_cert, make_ca

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"fleet: {ROOT / 'deploy/demo/fleet.yaml'}\n{section}")
    with pytest.raises(ConfigError, match=expected):
        load_config(cfg)
    _, ca_cert, ca_key = make_ca(tmp_path)
    issue_cert(tmp_path, ca_cert, ca_key, "a", server=True)  # a.pem, a.key beside the config
    cfg.write_text(f"fleet: {ROOT / 'deploy/demo/fleet.yaml'}\nserver:\n  grace_s: 5\ntls:\n  cert_file: a.pem\n"
                   "  key_file: a.key\n")  # an int for a float, and paths as text, are fine
    loaded = load_config(cfg)
    assert loaded.server.grace_s == 5.0 and loaded.tls is not None and loaded.tls.key_file == tmp_path / "a.key"


@pytest.mark.parametrize(("tls", "expected"), [
    ("  cert_file: /nonexistent.pem\n  key_file: a.key\n", r"c\.yaml:3: tls\.cert_file: not a file: /nonexistent\.pem"),
    ("  cert_file: a.pem\n  key_file: junk.key\n", r"c\.yaml:2: tls: cannot use the certificate files: "),
    ("  cert_file: a.pem\n  key_file: a.key\n  client_ca_file: nowhere.pem\n",
     r"c\.yaml:5: tls\.client_ca_file: not a file: .*nowhere\.pem"),
])
def test_certificates_that_cannot_be_used_are_located_config_errors(tmp_path: Path, tls: str, expected: str) -> None:
    # Reported after the database, the learner and the audit writer had started, with no line.
    from decision.config import ConfigError, load_config
    from tests.test_prod_support import issue_cert, make_ca

    _, ca_cert, ca_key = make_ca(tmp_path)
    issue_cert(tmp_path, ca_cert, ca_key, "a", server=True)
    (tmp_path / "junk.key").write_text("not a key\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"fleet: {ROOT / 'deploy/demo/fleet.yaml'}\ntls:\n{tls}")
    with pytest.raises(ConfigError, match=expected):
        load_config(cfg)


@pytest.mark.parametrize(("extra", "expected"), [
    ("fleet: nowhere.yaml\n", r"c\.yaml:1: fleet: not a file: .*nowhere\.yaml"),
    ("policies: nowhere\n", r"c\.yaml:2: policies: not a folder: .*nowhere"),
    ("learner:\n  name: linucbb\n", r"c\.yaml:3: learner\.name: unknown learner 'linucbb'"),
    ("learner:\n  shadow: [{params: {}}]\n", r"c\.yaml:3: learner\.shadow\.0: missing key 'name'"),
    ("learner:\n  name: linucb\n  params: {alfa: 1}\n", r"c\.yaml:4: learner\.params: learner linucb: unknown param"),
    ("learner:\n  reward: {w_cost: x}\n", r"c\.yaml:3: learner\.reward: could not convert"),
    # A scrape target whose values would go nowhere, every scrape "succeeding".
    ("telemetry:\n  scrape:\n    - {url: 'http://10.0.0.1:8000/metrics', endpoint_id: nope}\n",
     r"c\.yaml:4: telemetry\.scrape\.0\.endpoint_id: no endpoint 'nope' in the fleet"),
    ("telemetry:\n  scrape:\n    - {url: 'http://10.0.0.1:9400/metrics'}\n",
     r"c\.yaml:4: telemetry\.scrape\.0: Value error, name the endpoint_id or the node_id"),
    # NaN and infinity are YAML floats; each passes a range check written as a comparison.
    ("telemetry:\n  stale_after_s: .inf\n", r"c\.yaml:3: telemetry\.stale_after_s: Input should be a finite number"),
    ("learner:\n  reward: {w_cost: .inf}\n", r"c\.yaml:3: learner\.reward: reward\.w_cost: must be a finite number"),
    ("learner:\n  reward: {default_target_ms: .nan}\n", r"c\.yaml:3: learner\.reward: reward: default_target_ms"),
    ("learner:\n  name: linucb\n  params: {alpha: .nan}\n",
     r"c\.yaml:4: learner\.params: learner linucb: alpha must be a finite number"),
    # An integer past a float's range passed, then overflowed in every decision; a list where a
    # mapping goes, or a 400-digit weight, was a traceback.
    ("learner:\n  name: linucb\n  params: {alpha: " + "9" * 400 + "}\n",
     r"c\.yaml:4: learner\.params: learner linucb: alpha must be a finite number, got 9{21}\.\.\."),
    ("learner:\n  reward: {user_tiers: [1, 2]}\n", r"c\.yaml:3: learner\.reward: reward\.user_tiers: must map names"),
    ("learner:\n  reward: {tenants: {acme: [w_cost]}}\n",
     r"c\.yaml:3: learner\.reward: reward\.tenants\.acme: must be a mapping of weights, not list"),
    ("learner:\n  reward: {w_cost: " + "9" * 400 + "}\n", r"c\.yaml:3: learner\.reward: .*int too large"),
    # Audit settings a service cannot use: an infinite flush interval killed the writer thread.
    ("audit:\n  flush_interval_s: .inf\n", r"c\.yaml:3: audit\.flush_interval_s: .*finite number"),
])
def test_what_the_config_names_wrongly_is_a_message_not_a_traceback(tmp_path: Path, extra: str,
                                                                     expected: str) -> None:
    cfg = tmp_path / "c.yaml"
    fleet = "" if extra.startswith("fleet") else f"fleet: {ROOT / 'deploy/demo/fleet.yaml'}\n"
    cfg.write_text(extra if not fleet else fleet + extra)
    request = tmp_path / "r.json"
    request.write_text('{"request_id": "r", "tenant": "acme", "model_family": "llama"}')
    proc = _run("decide", "--config", str(cfg), "--request", str(request))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(expected, proc.stderr), proc.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["demo", "--duration", "-1"], "argument --duration: -1 is outside 0.5-86400"),  # the driver crashed, then a wait
    (["demo", "--concurrency", "0"], "argument --concurrency: 0 is outside"),
    (["bench", "grpc", "--clients", "0"], "argument --clients: 0 is outside"),
    (["bench", "grpc", "--duration", "nan"], "argument --duration: nan is outside"),
])
def test_load_and_bench_numbers_are_checked_before_anything_starts(args: list[str], message: str) -> None:
    proc = _run(*args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--candidates", "0"], "argument --candidates: 0 is outside"),
    (["--endpoints", "512", "--iterations", "10", "--learner", "bogus"], "unknown learner 'bogus'"),
    (["--endpoints", "512", "--iterations", "10", "--policies", "/nonexistent"], "no manifest.yaml"),
])
def test_bench_decide_arguments_are_checked(args: list[str], message: str) -> None:
    proc = _run("bench", "decide", *args)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_a_request_json_cannot_hold_is_a_message(tmp_path: Path) -> None:
    from decision.cli_args import UsageError, read_json_request

    for name, text, message in (("big.json", '{"estimated_input_tokens": ' + "9" * 5000 + "}", "Exceeds the limit"),
                                ("deep.json", "[" * 100_000 + "]" * 100_000, "maximum recursion depth")):
        (tmp_path / name).write_text(text)
        with pytest.raises(UsageError, match=f"{name}: invalid JSON: {message}"):
            read_json_request(str(tmp_path / name))
    for name, text, message in (("dup.json", '{"tenant": "a",\n "model": "m",\n "tenant": "b"}',
                                 ":3:2: duplicate key 'tenant'"),
                                # the repeat inside labels, not the outer key of the same name
                                ("nested.json", '{"tenant": "a",\n "labels": {"team": "x",\n  "tenant": "b",'
                                 ' "team": "y"}}', ":3:18: duplicate key 'team'"),
                                # an escaped spelling is the same key to the parser, so to the message too
                                ("escaped.json", '{"tenant": "a",\n "te\\u006eant": "b"}',
                                 ":2:2: duplicate key 'tenant'"),
                                ("list.json", '[{"tenant": "a"}]', ":1: a request is a JSON object, not list")):
        (tmp_path / name).write_text(text)
        with pytest.raises(UsageError, match=f"{name}{message}"):
            read_json_request(str(tmp_path / name))


@pytest.mark.parametrize(("name", "value", "message"), [
    ("INFERMESH_LOG_LEVEL", "verbose", "unknown log level 'verbose'; known: CRITICAL, FATAL, ERROR, WARN"),
    ("INFERMESH_WORKER", "abc", "valid integer"),
    ("INFERMESH_WORKER", "-1", "greater than or equal to 0"),
    ("INFERMESH_OTEL_EXPORTER", "bogus", "Input should be 'none' or 'console'"),  # blamed the config file before
])
def test_a_bad_environment_setting_names_its_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str,
                                                      message: str) -> None:
    from decision.config import ConfigError, load_settings

    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"environment: {name}: .*{message}"):
        load_settings()
    monkeypatch.delenv(name)
    for level in ("debug", "warn", "FATAL"):  # whatever logging.setLevel takes
        monkeypatch.setenv("INFERMESH_LOG_LEVEL", level)
        assert load_settings().log_level == level.upper()


@pytest.mark.parametrize(("server", "args", "expected"), [
    # Two servers on one port: under SO_REUSEPORT the kernel would share it between them.
    ("  grpc_port: 50993\nextproc:\n  enabled: true\n  port: 50993\n", [],
     "grpc_port and extproc.port are both 50993"),
    ("  grpc_port: 8081\n  http_port: 8080\n  workers: 2\n", [], "worker 1's HTTP port 8081 is also grpc_port 8081"),
    ("  http_port: 65535\n", ["--workers", "2"], "http_port 65535 + 1 (one HTTP port per worker) is past 65535"),
    ("  grpc_port: 8080\n", [], "http_port is also grpc_port 8080"),
])
def test_serve_refuses_ports_that_clash_after_its_overrides(tmp_path: Path, server: str, args: list[str],
                                                             expected: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"fleet: {ROOT / 'deploy/demo/fleet.yaml'}\nserver:\n{server}")
    proc = _run("serve", "--config", str(cfg), *args)
    assert proc.returncode == 2 and f"infermesh: {cfg}: {expected}" in proc.stderr, proc.stderr
    if "grpc_port: 8080" in server:  # the override settles it; and a command that serves nothing never minded
        from decision.config import load_config

        assert load_config(cfg).server.grpc_port == 8080


def test_serve_on_a_port_another_process_holds_is_a_message(tmp_path: Path) -> None:
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"fleet: {ROOT / 'deploy/demo/fleet.yaml'}\naudit:\n  enabled: false\nserver:\n"
                       f"  grpc_port: {held.getsockname()[1]}\n  http_port: 0\n")
        proc = _run("serve", "--config", str(cfg))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "infermesh: cannot start serving on 127.0.0.1: Failed to bind" in proc.stderr


def test_an_unreadable_request_file_is_a_message(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.json", tmp_path):  # missing, a directory
        proc = _run("decide", "--request", str(path))
        assert proc.returncode == 2 and f"{path}: cannot read the request" in proc.stderr, proc.stderr


def _serve(database_url: str, data_dir: Path) -> tuple[subprocess.Popen[str], str]:
    """``infermesh serve`` on free ports, and the line it prints once serving."""
    env = {**os.environ, "INFERMESH_DATABASE_URL": database_url, "INFERMESH_DATA_DIR": str(data_dir)}
    proc = subprocess.Popen([*CLI, "serve", "--grpc-port", "0", "--http-port", "0"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline()


def test_serve_answers_over_grpc_and_shuts_down_on_sigterm(fresh_pg_url: str, tmp_path: Path) -> None:
    proc, line = _serve(fresh_pg_url, tmp_path)
    try:
        m = re.search(r"grpc 127\.0\.0\.1:(\d+)", line)
        assert m, line + (proc.stderr.read() if proc.stderr else "")
        with grpc.insecure_channel(f"127.0.0.1:{m.group(1)}") as ch:
            d = pb_grpc.DecisionServiceStub(ch).Decide(
                pb.DecideRequest(request_id="serve-1", tenant="globex", model_family="qwen"), timeout=10)
        assert d.route.model.startswith("qwen")
    finally:
        proc.send_signal(signal.SIGTERM)
        # communicate, not wait: the server (and its audit writer child) keep logging to the pipes
        # while they stop, and an undrained pipe that fills blocks them from exiting.
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]


def test_a_sighup_while_serve_is_starting_does_not_end_it(fresh_pg_url: str, tmp_path: Path) -> None:
    """SIGHUP (a policy reload) ends a process by default: one that came before the handler was
    installed killed the server while it started."""
    env = {**os.environ, "INFERMESH_DATABASE_URL": fresh_pg_url, "INFERMESH_DATA_DIR": str(tmp_path)}
    proc = subprocess.Popen([*CLI, "serve", "--grpc-port", "0", "--http-port", "0"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, hup = time.monotonic() + 60, 1 << (signal.SIGHUP - 1)
        masks: dict[str, int] = {}
        while time.monotonic() < deadline:  # once it stops taking SIGHUP's default (the end of the process)
            status = Path(f"/proc/{proc.pid}/status").read_text()
            masks = {k: int(v, 16) for k, v in re.findall(r"^(SigIgn|SigCgt):\s*([0-9a-f]+)$", status, re.M)}
            if (masks.get("SigIgn", 0) | masks.get("SigCgt", 0)) & hup:
                break
            time.sleep(0.005)
        assert masks.get("SigIgn", 0) & hup  # still starting (ignoring it), not serving (reloading on it)
        proc.send_signal(signal.SIGHUP)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "infermesh serving" in line, line + (proc.stderr.read() if proc.stderr else "")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]


def _signal_thread(pid: int, tid: int, sig: int) -> None:
    """Deliver ``sig`` to one thread of another process (glibc's tgkill), as the kernel may."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "tgkill"):
        pytest.skip("this C library has no tgkill")
    if libc.tgkill(pid, tid, sig) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill({pid}, {tid}, {sig})")


def test_serve_stops_on_a_sigterm_that_lands_on_another_thread(fresh_pg_url: str, tmp_path: Path) -> None:
    # The kernel hands a process-wide signal to any thread that does not block it; Python runs the
    # handler in the main thread only, which an untimed wait never lets it do.
    proc, line = _serve(fresh_pg_url, tmp_path)
    try:
        assert "infermesh serving" in line
        others = sorted(int(t) for t in os.listdir(f"/proc/{proc.pid}/task") if int(t) != proc.pid)
        assert others, "serve runs threads beside the main one"
        _signal_thread(proc.pid, others[-1], signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-3000:]


def test_bench_decide_prints_a_table_and_its_json_last() -> None:
    proc = _run("bench", "decide", "--endpoints", "512", "--iterations", "300", "--json")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert any("in-process decision latency" in line for line in lines[:-1])  # the readable table first
    out = json.loads(lines[-1])
    assert out["endpoints"] == 512 and out["candidates"] == 64
    assert 0 < out["p50_us"] <= out["p99_us"] <= out["p999_us"] <= out["max_us"]
    assert {"locate", "guard", "score", "choose"} <= set(out["stage_p50_us"])


def test_a_bundle_failing_its_tests_is_a_message_not_a_traceback(tmp_path: Path) -> None:
    # It compiles, but its case table expects 85 C to be allowed: the service must not load it, and
    # saying so was a traceback ending in RuntimeError, exit 1.
    bundle = tmp_path / "bundle"
    shutil.copytree(ROOT / "policies/bundles/default", bundle)
    manifest = bundle / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace("max_gpu_temp_c: 85", "max_gpu_temp_c: 60"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"fleet: {ROOT / 'deploy/demo/fleet.yaml'}\npolicies: {bundle}\n")
    request = tmp_path / "r.json"
    request.write_text('{"request_id": "r", "tenant": "acme", "model_family": "llama"}')
    proc = _run("decide", "--config", str(cfg), "--request", str(request))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"infermesh: {bundle}: ") and "bundle test(s) failed: FAIL safety.gpu_temperature" in line


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_with_an_unreachable_database_is_one_line_without_its_password(tmp_path: Path, workers: str) -> None:
    env = {**os.environ, "INFERMESH_DATABASE_URL": "postgresql://audit:s3cret@127.0.0.1:1/infermesh",
           "INFERMESH_DATA_DIR": str(tmp_path)}
    proc = _run("serve", "--grpc-port", "0", "--http-port", "0", "--workers", workers, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("infermesh:")]
    assert line.startswith("infermesh: cannot start: the audit database postgresql://audit:***@127.0.0.1:1/infermesh "
                           "cannot be reached: ") and "s3cret" not in proc.stderr
