"""Request validation refuses text the audit log cannot store (NUL), naming the field."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import grpc
import pytest

from decision.domain import Outcome, OutcomeStatus, RequestContext
from decision.errors import InvalidArgument
from decision.grpc_server import DecisionServicer, build_server
from decision.metrics import ServiceMetrics
from decision.validation import validate_outcome, validate_request
from infermesh.decision.v1 import decision_pb2 as pb
from infermesh.decision.v1 import decision_pb2_grpc as pb_grpc
from tests.spine_support import demo_engine

GOOD = RequestContext(request_id="r1", tenant="acme", model="llama-3.1-8b", client_region="eu-west",
                      session_id="s1", labels={"team": "blue"}, allowed_jurisdictions=("eu",))
TEXT_FIELDS = ["request_id", "tenant", "user_tier", "model", "model_family", "modality", "prompt_class",
               "data_class", "client_region", "session_id"]


def test_a_good_request_and_outcome_pass() -> None:
    validate_request(GOOD)
    validate_outcome(Outcome("d1", OutcomeStatus.OK, ttft_ms=1, latency_ms=2, error="timeout upstream"))


@pytest.mark.parametrize("field", TEXT_FIELDS)
def test_nul_in_a_text_field_is_refused_naming_it(field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_request(replace(GOOD, **{field: "ab\x00c"}))  # type: ignore[arg-type]  # a str field
    assert err.value.field == field and "NUL" in err.value.message


@pytest.mark.parametrize("labels", [{"te\x00am": "blue"}, {"team": "bl\x00ue"}])
def test_nul_in_a_label_is_refused_naming_it(labels: dict[str, str]) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_request(replace(GOOD, labels=labels))
    assert err.value.field.startswith("labels[") and err.value.field.isascii() and "NUL" in err.value.message


def test_nul_in_a_jurisdiction_is_refused() -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_request(replace(GOOD, allowed_jurisdictions=("e\x00u",)))
    assert err.value.field == "allowed_jurisdictions"


@pytest.mark.parametrize(("changes", "field"), [
    ({"decision_id": ""}, "decision_id"),
    ({"decision_id": "d\x001"}, "decision_id"),
    ({"error": "boom\x00"}, "error"),
    ({"status": OutcomeStatus.TIMEOUT, "error": "expired: spoofed"}, "error"),  # the service's own timeouts' prefix
    ({"ttft_ms": -1.0}, "ttft_ms"),
    ({"latency_ms": -1.0}, "latency_ms"),
    ({"input_tokens": -1}, "input_tokens"),
    ({"output_tokens": -1}, "output_tokens"),
    # Past the requests' own bound: 2**62 tokens overflowed the shared Redis counter, and every
    # later Decide of the tenant failed UNAVAILABLE.
    ({"input_tokens": 10_000_001}, "input_tokens"),
    ({"output_tokens": 2**62}, "output_tokens"),
])
def test_outcome_validation_names_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_outcome(replace(Outcome("d1", OutcomeStatus.OK), **changes))
    assert err.value.field == field


@pytest.fixture()
def channel(demo_fleet: Any) -> Iterator[grpc.Channel]:
    srv, port, _ = build_server(DecisionServicer(demo_engine(demo_fleet), ServiceMetrics()),
                                address="127.0.0.1:0", threads=4)
    srv.start()
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield ch
    finally:
        ch.close()
        srv.stop(0).wait()


@pytest.mark.parametrize("field", ["request_id", "tenant", "user_tier", "session_id"])
def test_grpc_decide_with_a_nul_is_invalid_argument_naming_the_field(channel: grpc.Channel, field: str) -> None:
    fields: dict[str, Any] = {"request_id": "r1", "tenant": "globex", "model_family": "llama",
                              "client_region": "eu-west", field: "x\x00y"}
    with pytest.raises(grpc.RpcError) as err:
        pb_grpc.DecisionServiceStub(channel).Decide(pb.DecideRequest(**fields), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{field}: ")
    assert dict(err.value.trailing_metadata())["infermesh-field"] == field
