"""The API contract: field names clients depend on, JSON round trips, generated code in sync."""

from __future__ import annotations

import filecmp
import importlib.util
import sys
from pathlib import Path

import pytest
from google.protobuf.json_format import MessageToDict, ParseDict

from decision.convert import request_from_json
from infermesh.decision.v1 import decision_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent

CONTRACT = {
    "DecideRequest": ["request_id", "tenant", "user_tier", "model", "model_family", "modality", "prompt_class",
                      "estimated_input_tokens", "expected_output_tokens", "allowed_jurisdictions", "data_class",
                      "client_region", "session_id", "ttft_target_ms", "max_cost_per_1k_tokens", "labels"],
    "DecideResponse": ["decision_id", "route", "fallbacks", "propensity", "policy_revision", "learner",
                       "expected_ttft_ms", "expected_cost_per_1k_tokens", "reason"],
    "Outcome": ["decision_id", "status", "ttft_ms", "latency_ms", "input_tokens", "output_tokens", "error"],
    "ExplainRequest": ["decision_id"],
}


@pytest.mark.parametrize("message", sorted(CONTRACT))
def test_contract_field_names_exist(message: str) -> None:
    fields = set(pb.DESCRIPTOR.message_types_by_name[message].fields_by_name)
    assert set(CONTRACT[message]) <= fields


def test_outcome_status_enum_names() -> None:
    names = set(pb.OutcomeStatus.keys())
    assert {"OUTCOME_STATUS_OK", "OUTCOME_STATUS_ERROR", "OUTCOME_STATUS_TIMEOUT", "OUTCOME_STATUS_CANCELLED"} <= names


def test_binary_and_json_round_trips() -> None:
    req = pb.DecideRequest(request_id="r", tenant="t", model_family="llama", allowed_jurisdictions=["EU"],
                           ttft_target_ms=250.5, labels={"team": "search"}, estimated_input_tokens=1 << 40)
    assert pb.DecideRequest.FromString(req.SerializeToString()) == req
    as_json = MessageToDict(req, preserving_proto_field_name=True)
    assert ParseDict(as_json, pb.DecideRequest()) == req
    ctx = request_from_json(as_json)
    assert ctx.allowed_jurisdictions == ("EU",) and ctx.labels == {"team": "search"}
    assert ctx.estimated_input_tokens == 1 << 40
    resp = pb.DecideResponse(decision_id="d", route=pb.Route(endpoint_id="e", address="10.0.0.1:8000"),
                             fallbacks=[pb.Route(endpoint_id="f")], propensity=0.25)
    assert pb.DecideResponse.FromString(resp.SerializeToString()) == resp
    ack = pb.OutcomeAck(decision_id="d", accepted=True)
    assert not pb.OutcomeAck.FromString(ack.SerializeToString()).HasField("reward")


def test_request_from_json_rejects_unknown_fields_naming_them() -> None:
    from decision.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="tenantt"):
        request_from_json({"tenantt": "x"})


@pytest.mark.skipif(importlib.util.find_spec("grpc_tools") is None, reason="grpcio-tools not installed")
def test_committed_generated_code_matches_the_proto(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "proto"))
    try:
        import generate  # type: ignore[import-not-found]
    finally:
        sys.path.pop(0)
    generate.generate(tmp_path)
    gen = tmp_path / "infermesh" / "decision" / "v1"
    committed = ROOT / "gen" / "python" / "infermesh" / "decision" / "v1"
    for name in ("decision_pb2.py", "decision_pb2_grpc.py", "decision_pb2.pyi", "decision_pb2_grpc.pyi"):
        assert filecmp.cmp(gen / name, committed / name, shallow=False), f"{name} drifted: run proto/generate.py"
