"""``infermesh learn evaluate`` end to end: engine decisions in the audit tables, estimates out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import psycopg
import pytest

from decision.cli import main
from decision.domain import Outcome, OutcomeStatus, RequestContext
from learners.features import FEATURE_NAMES
from learners.linucb import LinUCB
from tests.test_learners_support import insert_decision, insert_outcome, migrate
from tests.test_learners_sync import _engine


def test_learn_evaluate_reads_the_audit_log_and_compares_policies(fresh_pg_url: str,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    migrate(fresh_pg_url)
    # The logged policy explores a lot (epsilon 0.5), so its propensities support other policies.
    eng, rng = _engine(LinUCB(len(FEATURE_NAMES), alpha=0.0, epsilon=0.5, seed=3), 3)
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        for i in range(300):
            ctx = RequestContext(f"r{i}", "t", model="llama-3.1-8b", client_region="eu-west",
                                 estimated_input_tokens=int(rng.integers(50, 900)), ttft_target_ms=400.0)
            d = eng.decide(ctx)
            slow = 3.0 if d.route.site_id.endswith("edge1") else 1.0
            res = eng.report_outcome(Outcome(d.decision_id, OutcomeStatus.OK, ttft_ms=d.expected_ttft_ms * slow))
            insert_decision(conn, decision_id=d.decision_id, decided_at=1000.0 + i, learner="linucb@1",
                            propensity=d.propensity, trace=dict(d.trace))
            if i % 10:  # every tenth outcome never arrived
                insert_outcome(conn, decision_id=d.decision_id, reward=res.reward, reported_at=1001.0 + i)
    # decided_at 1000 + i Unix seconds: 1970-01-01T00:16:40Z onwards
    rc = main(["learn", "evaluate", "--from", "1970-01-01T00:16:40Z", "--to", "1970-01-01T00:21:40Z",
               "--learner", "linucb:alpha=0.5,seed=1",
               "--database-url", fresh_pg_url, "--json"])
    out = capsys.readouterr().out
    assert rc == 0 and "snips" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["records"] == 270 and result["skipped"]["no_outcome"] == 30
    est = result["estimates"]
    for name in ("ips", "snips", "dr"):
        e = est[name]
        assert e["ci_low"] <= e["value"] <= e["ci_high"] and 0 < e["ess"] <= 270
    assert np.isfinite(result["improvement_dr"])
    # Missing outcomes can instead count as failures.
    rc = main(["learn", "evaluate", "--from", "1970-01-01T00:16:40Z", "--to", "1970-01-01T00:21:40Z",
               "--learner", "least-ttft",
               "--database-url", fresh_pg_url, "--missing-reward", "-2", "--json"])
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and again["records"] == 300


def test_learn_evaluate_needs_an_audit_log(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, fresh_pg_url: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("INFERMESH_DATABASE_URL", raising=False)
    monkeypatch.setenv("INFERMESH_DATA_DIR", str(tmp_path))
    assert main(["learn", "evaluate", "--from", "2026-11-29", "--to", "2026-11-30", "--learner", "linucb"]) == 2
    assert f"no audit log under {tmp_path / 'pgdata'}" in capsys.readouterr().err
    assert main(["learn", "evaluate", "--from", "2026-11-29", "--to", "2026-11-30", "--learner", "linucb",
                 "--database-url", fresh_pg_url]) == 2  # not migrated: no audit log there either
    assert "holds no audit log" in capsys.readouterr().err


def test_learn_evaluate_reads_from_and_to_as_the_audit_commands_do(capsys: pytest.CaptureFixture[str]) -> None:
    # One reading for auditors and evaluators (audit.time_range): numbers were Unix seconds here only.
    for flag, bad, why in (("--from", "garbage", "is not a date"), ("--from", "1000", "is a number"),
                           ("--to", "nan", "is not a date"), ("--to", "2026-02-30", "names no real date")):
        argv = {"--from": "2026-11-29", "--to": "2026-11-30", flag: bad}
        assert main(["learn", "evaluate", "--from", argv["--from"], "--to", argv["--to"], "--learner", "linucb"]) == 2
        err = capsys.readouterr().err
        assert f"infermesh learn evaluate: {flag}: {bad!r} {why}" in err and "Traceback" not in err, err
    assert main(["learn", "evaluate", "--from", "2026-11-30", "--to", "2026-11-29T12:00", "--learner", "linucb"]) == 2
    assert "--from: '2026-11-30' is not before --to '2026-11-29T12:00'" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--learner", "nosuch"], "argument --learner: unknown learner 'nosuch'"),
    (["--learner", "linucb:alpha=abc"], "argument --learner: learner linucb: alpha must be a number, got 'abc'"),
    (["--learner", "linucb:epsilon=2"], "argument --learner: alpha must be >= 0 and epsilon in [0, 1)"),
    (["--learner", "linucb", "--missing-reward", "nan"], "argument --missing-reward: must be a finite number"),
])
def test_learn_evaluate_names_a_bad_candidate_before_reading_anything(
        argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["learn", "evaluate", "--from", "2026-11-29", "--to", "2026-11-30", *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err and "Traceback" not in err


def test_learn_evaluate_reports_a_reward_the_candidate_refuses(fresh_pg_url: str,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    migrate(fresh_pg_url)
    eng, _ = _engine(LinUCB(len(FEATURE_NAMES), seed=3), 3)
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        d = eng.decide(RequestContext("r0", "t", model="llama-3.1-8b", client_region="eu-west"))
        insert_decision(conn, decision_id=d.decision_id, decided_at=1000.0, learner="linucb@1",
                        propensity=d.propensity, trace=dict(d.trace))
    # Finite, yet too large for the model to stay finite: refused by the candidate, reported as such.
    rc = main(["learn", "evaluate", "--from", "1970-01-01T00:16:40Z", "--to", "1970-01-01T00:16:41Z",
               "--learner", "linucb",
               "--missing-reward", "1e308", "--database-url", fresh_pg_url])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.startswith("infermesh learn evaluate: --learner linucb: update: the model would not be finite")


@pytest.mark.parametrize(("argv", "message"), [
    (["--arms", "0"], "argument --arms: 0 is outside 1-100000"),
    (["--iterations", "0"], "argument --iterations: 0 is outside"),
    (["--steps", "-5"], "argument --steps: -5 is outside"),
    (["--seed", "-1"], "argument --seed: -1 is outside"),  # a numpy traceback before
])
def test_learn_bench_checks_its_numbers(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["learn", "bench", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
