"""``infermesh policy check | test | explain``."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from decision.cli import main
from policies.bundle import DEFAULT_BUNDLE
from tests.policy_support import MIXED_CRASHING_TESTS, add_crashing_test

ROOT = Path(__file__).resolve().parent.parent


def test_check_ok_and_broken(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "check", str(DEFAULT_BUNDLE)]) == 0
    assert "7 rules compiled" in capsys.readouterr().out
    bundle = tmp_path / "b"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    (bundle / "quota.cel").write_text("state.quota.requests +\n")
    (bundle / "prompt_class.rego").write_text("package p\n\nallow if {\n  input.x == \n}\n")
    assert main(["policy", "check", str(bundle)]) == 1
    lines = capsys.readouterr().err.splitlines()  # problems on stderr, as fleet check prints them
    assert f"{bundle / 'prompt_class.rego'}:4:" in "\n".join(lines)
    assert any(line.startswith(f"{bundle / 'quota.cel'}:2:1: ") for line in lines)


@pytest.mark.parametrize("command", ["check", "test"])
def test_a_bundle_that_is_not_a_directory_is_a_usage_error(command: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    # Exit 2 and one line, as `fleet check` treats a missing file: not a bundle that failed (exit 1).
    missing, plain = tmp_path / "missing", tmp_path / "plain.txt"
    plain.write_text("x")
    assert main(["policy", command, str(missing)]) == 2
    assert capsys.readouterr().err.strip() == f"{missing}: no such directory"
    assert main(["policy", command, str(plain)]) == 2
    assert capsys.readouterr().err.strip() == f"{plain}: not a directory"


def test_test_command_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "test", str(DEFAULT_BUNDLE)]) == 0
    out = capsys.readouterr().out.splitlines()
    n = sum(line.startswith("PASS ") for line in out)
    assert n > 20 and out[-1] == f"{n} passed, 0 failed"
    bundle = tmp_path / "b"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    cases = bundle / "xid_errors_cases.yaml"
    cases.write_text(cases.read_text().replace("reason: \"XID error 79 reported\"", "reason: \"XID error 80\""))
    assert main(["policy", "test", str(bundle)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == f"{n - 1} passed, 1 failed"
    assert any(line.startswith("FAIL safety.xid_errors: an XID error excludes the GPU") for line in out)


def test_explain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    req = tmp_path / "r.json"
    req.write_text(json.dumps({"request_id": "r1", "tenant": "globex", "model_family": "llama",
                               "prompt_class": "medical", "allowed_jurisdictions": ["EU"]}))
    assert main(["policy", "explain", "--request", str(req), "--fleet", str(ROOT / "deploy/demo/fleet.yaml"),
                 "--policies", str(DEFAULT_BUNDLE), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["endpoints"]
    allowed = [e for e, r in rows.items() if r["allowed"]]
    assert allowed and all("70b" in e and e.startswith("eu-") for e in allowed)
    us = next(e for e in rows if e.startswith("us-") and "70b" in e)
    assert [d["rule"] for d in rows[us]["denied_by"]] == ["residency.sites"]
    assert set(report["removing_rules"]) == {"residency.sites", "safety.prompt_class", "safety.device_owner"}


def test_explain_sees_the_modality_a_decide_sees_and_says_the_cost_cap_is_not_judged(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    req = tmp_path / "r.json"
    fleet = str(ROOT / "deploy/demo/fleet.yaml")
    req.write_text(json.dumps({"request_id": "r1", "tenant": "globex", "model": "sdxl-1.0", "modality": "text"}))
    assert main(["policy", "explain", "--request", str(req), "--fleet", fleet]) == 1
    assert "modality: model sdxl-1.0 takes image requests, not text" in capsys.readouterr().err
    req.write_text(json.dumps({"request_id": "r1", "tenant": "globex", "model": "sdxl-1.0",
                               "max_cost_per_1k_tokens": 0.001}))
    assert main(["policy", "explain", "--request", str(req), "--fleet", fleet]) == 0
    assert "max_cost_per_1k_tokens (rule request.max_cost_per_1k_tokens) is judged after scoring" in \
        capsys.readouterr().out


@pytest.mark.parametrize(("body", "code", "message"), [
    ('{"request_id": "r",\n "tenant": 5', 2, "r.json:2:13: invalid JSON"),
    ("[1]", 2, "r.json:1: a request is a JSON object, not list"),
    ('{"request_id": "r", "tenant": "acme", "model": "nope"}', 1, "NotFound: unknown model 'nope'"),
    # A Decide refuses it; explain used to skip the request checks and report on it.
    ('{"request_id": "r", "tenant": "acme", "model": "llama-3.1-8b", "ttft_target_ms": "NaN"}', 1,
     "ttft_target_ms: must be a finite number"),
])
def test_explain_errors_are_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str], body: str, code: int,
                                     message: str) -> None:
    req = tmp_path / "r.json"
    req.write_text(body)
    assert main(["policy", "explain", "--request", str(req), "--fleet", str(ROOT / "deploy/demo/fleet.yaml")]) == code
    assert message in capsys.readouterr().err


def test_test_command_survives_a_rego_engine_crash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # rego-cpp 1.5.2 segfaults on `with input as` over a rule that depends on another rule: the crash is
    # pinned to that test, which fails, and the tests after it still run.
    assert main(["policy", "test", str(DEFAULT_BUNDLE)]) == 0
    n = sum(line.startswith("PASS ") for line in capsys.readouterr().out.splitlines())
    bundle = tmp_path / "b"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    crashing = add_crashing_test(bundle)
    assert main(["policy", "test", str(bundle)]) == 1
    out = capsys.readouterr().out.splitlines()
    (crashed,) = [line for line in out if line.startswith("FAIL ")]
    assert crashed.startswith(f"FAIL crash_test.test_crash ({crashing}:4): the test process exit -11 ")
    assert out[-1] == f"{n} passed, 1 failed"


def test_a_crash_fails_only_the_test_that_crashes_and_the_others_of_its_module_get_their_result(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Any query of a module holding the crashing test crashes rego-cpp: each of the module's tests used to be
    # reported as the crash. Run again one at a time, each gets its own result.
    bundle = tmp_path / "b"
    shutil.copytree(DEFAULT_BUNDLE, bundle)
    crashing = add_crashing_test(bundle, MIXED_CRASHING_TESTS)
    started = time.monotonic()
    assert main(["policy", "test", str(bundle)]) == 1
    assert time.monotonic() - started < 60
    out = capsys.readouterr().out.splitlines()
    mine = {line.split(" ")[1]: line for line in out if "crash_test." in line}
    assert list(mine) == [f"crash_test.test_{t}" for t in ("before", "crash", "after", "wrong")]
    assert mine["crash_test.test_before"].startswith("PASS ") and mine["crash_test.test_after"].startswith("PASS ")
    assert mine["crash_test.test_wrong"] == f"FAIL crash_test.test_wrong ({crashing}:13): evaluated to undefined"
    assert mine["crash_test.test_crash"].startswith(f"FAIL crash_test.test_crash ({crashing}:7): the test process "
                                                    "exit -11 (SIGSEGV) while running this test")
    assert [line for line in out if line.startswith("FAIL ")] == [mine["crash_test.test_crash"],
                                                                 mine["crash_test.test_wrong"]]
    assert out[-1].endswith(" passed, 2 failed")


def test_explain_finds_the_demo_fleet_from_another_directory_and_names_an_unreadable_one(
        tmp_path: Path) -> None:
    import subprocess
    import sys

    req = tmp_path / "r.json"
    req.write_text(json.dumps({"request_id": "r1", "tenant": "globex", "model_family": "llama"}))
    cli = [sys.executable, "-m", "decision.cli", "policy", "explain", "--request", str(req)]
    ran = subprocess.run([*cli, "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr  # the default fleet was deploy/demo/fleet.yaml of the cwd
    assert json.loads(ran.stdout)["candidates"] > 0
    missing = tmp_path / "nowhere.yaml"
    ran = subprocess.run([*cli, "--fleet", str(missing)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    # A file that cannot be read is not a YAML syntax error at line 1.
    assert ran.returncode == 2 and ran.stderr.strip() == f"{missing}:1: (file): cannot read: No such file or directory"
