"""PushTelemetry is a stream of batches: a refused batch is named by its place in the stream.

Each batch is all or nothing; the stream is not. The batches before a bad one stay stored and
counted, and the error says so, naming the bad batch (``batch[1].samples[0].value``), so the
pusher knows to resend from there. An error in the first batch reads as it always did.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from decision.metrics import ServiceMetrics
from infermesh.decision.v1 import decision_pb2 as pb
from tests.spine_support import edge_served


@pytest.fixture(params=["threads", "asyncio", "split"])
def served(demo_fleet, request) -> Iterator[tuple[Any, ServiceMetrics, Any]]:  # type: ignore[no-untyped-def]
    """(engine, metrics, stub): the servicer behind the production edge, on both server kinds."""
    with edge_served(demo_fleet, request.param) as parts:
        yield parts


def _sample(endpoint_id: str, value: float, metric: str = "queue_waiting") -> pb.TelemetryBatch:
    return pb.TelemetryBatch(samples=[pb.TelemetrySample(endpoint_id=endpoint_id, metric=metric, value=value)])


def _refused(stub: Any, *batches: pb.TelemetryBatch) -> tuple[str, str]:
    """(details, infermesh-field trailer) of a push that must end in INVALID_ARGUMENT."""
    with pytest.raises(grpc.RpcError) as err:
        stub.PushTelemetry(iter(batches), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return err.value.details(), dict(err.value.trailing_metadata() or ())["infermesh-field"]


def _pushed(metrics: ServiceMetrics) -> float:
    return float(metrics.telemetry_samples.labels("push")._value.get())


def test_a_bad_later_batch_is_named_and_the_earlier_ones_stay_applied(served) -> None:  # type: ignore[no-untyped-def]
    engine, metrics, stub = served
    ep = engine.fleet.endpoints[0].endpoint_id
    other = engine.fleet.endpoints[1].endpoint_id
    details, field = _refused(stub, _sample(ep, 4), _sample(ep, -1), _sample(other, 9))
    # samples[0] of the second batch, not of the first (which was good and is stored).
    assert field == "batch[1].samples[0].value"
    assert details == ("batch[1].samples[0].value: queue_waiting must be finite and >= 0, got -1.0 "
                       "(batch[0] before it was applied; this batch and any after it were not)")
    assert engine.telemetry.reading(ep).values["queue_waiting"] == 4.0
    assert "queue_waiting" not in engine.telemetry.reading(other).values  # after the bad one: never read
    assert _pushed(metrics) == 1  # the stored sample is counted, though no ack reported it


def test_an_edge_refusal_in_a_later_batch_names_the_batch_too(served) -> None:  # type: ignore[no-untyped-def]
    engine, metrics, stub = served
    ep = engine.fleet.endpoints[0].endpoint_id
    details, field = _refused(stub, _sample(ep, 1), _sample(ep, 2), _sample("e" * 300, 3))
    assert field == "batch[2].samples[0].endpoint_id"
    assert details == ("batch[2].samples[0].endpoint_id: longer than 256 characters "
                       "(batches 0-1 before it were applied; this batch and any after it were not)")
    assert engine.telemetry.reading(ep).values["queue_waiting"] == 2.0
    assert _pushed(metrics) == 2


def test_an_error_in_the_first_batch_reads_as_before(served) -> None:  # type: ignore[no-untyped-def]
    engine, metrics, stub = served
    ep = engine.fleet.endpoints[0].endpoint_id
    details, field = _refused(stub, _sample(ep, -1), _sample(ep, 2))
    assert (details, field) == ("samples[0].value: queue_waiting must be finite and >= 0, got -1.0",
                                "samples[0].value")
    assert "queue_waiting" not in engine.telemetry.reading(ep).values and _pushed(metrics) == 0


def test_a_long_message_keeps_the_note_on_what_was_applied(served) -> None:  # type: ignore[no-untyped-def]
    engine, _, stub = served
    ep = engine.fleet.endpoints[0].endpoint_id
    # A series InferMesh does not read, its 5,000-character name quoted in the error.
    bad = pb.TelemetryBatch(expositions=[pb.Exposition(endpoint_id=ep, text="a" * 5000 + " 1\n")])
    details, field = _refused(stub, _sample(ep, 1), bad)
    assert field == "batch[1].expositions[0].text" and details.startswith(field + ": none of its 1 samples")
    assert details.endswith("(batch[0] before it was applied; this batch and any after it were not)")
    assert len(details) <= 1024
