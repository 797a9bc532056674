"""Telemetry values and timestamps that would corrupt routing are refused on every path.

A negative or infinite value, or a timestamp far in the future, is refused by PushTelemetry
(INVALID_ARGUMENT naming the field, nothing of the batch stored), dropped and counted by a
scrape, and dropped by the store itself whoever calls it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest

from decision import telemetry as t
from decision.config import ScrapeTarget
from decision.scraper import Scraper
from infermesh.decision.v1 import decision_pb2 as pb
from tests.spine_support import edge_served

BAD_VALUES = [-math.inf, math.inf, -1e9, -0.5]
DECIDE: dict[str, Any] = {"request_id": "r1", "tenant": "globex", "model_family": "llama", "client_region": "eu-west"}


@pytest.fixture(params=["threads", "asyncio", "split"])
def server(demo_fleet, request) -> Iterator[tuple[Any, Any]]:  # type: ignore[no-untyped-def]
    """The servicer behind the production edge, on both server kinds: (engine, stub)."""
    with edge_served(demo_fleet, request.param) as (engine, _, stub):
        yield engine, stub


def _push(stub: Any, *batches: pb.TelemetryBatch) -> pb.TelemetryAck:
    ack: pb.TelemetryAck = stub.PushTelemetry(iter(batches), timeout=5)
    return ack


def _refused(stub: Any, batch: pb.TelemetryBatch) -> tuple[str, str]:
    """(details, infermesh-field trailer) of a push that must end in INVALID_ARGUMENT."""
    with pytest.raises(grpc.RpcError) as err:
        _push(stub, batch)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return err.value.details(), dict(err.value.trailing_metadata() or ())["infermesh-field"]


def _now_ms(offset_s: float = 0.0) -> int:
    return int((time.time() + offset_s) * 1000)


@pytest.mark.parametrize("value", BAD_VALUES)
def test_push_refuses_a_negative_or_infinite_value_and_stores_nothing_of_the_batch(server, value: float) -> None:  # type: ignore[no-untyped-def]
    engine, stub = server
    ep = engine.fleet.endpoints[0]
    _push(stub, pb.TelemetryBatch(samples=[pb.TelemetrySample(endpoint_id=ep.endpoint_id, metric="queue_waiting",
                                                              value=2)]))
    baseline = stub.Decide(pb.DecideRequest(**DECIDE), timeout=5).expected_ttft_ms
    for metric, target in [("queue_waiting", {"endpoint_id": ep.endpoint_id}),
                           ("vllm:num_requests_running", {"endpoint_id": ep.endpoint_id}),
                           ("gpu_temp_c", {"node_id": ep.node_id})]:
        batch = pb.TelemetryBatch(samples=[
            pb.TelemetrySample(endpoint_id=ep.endpoint_id, metric="queue_waiting", value=5),  # good, before the bad
            pb.TelemetrySample(metric=metric, value=value, **target)])
        details, field = _refused(stub, batch)
        name = metric.replace("vllm:num_requests_running", "queue_running")
        assert details == f"samples[1].value: {name} must be finite and >= 0, got {value!r}"
        assert field == "samples[1].value"
    values = engine.telemetry.reading(ep.endpoint_id).values
    assert values["queue_waiting"] == 2.0  # the whole batch was refused, its good sample too
    assert "queue_running" not in values and "gpu_temp_c" not in values
    d = stub.Decide(pb.DecideRequest(**DECIDE), timeout=5)
    assert d.expected_ttft_ms == baseline > 0


def test_push_nan_means_no_value(server) -> None:  # type: ignore[no-untyped-def]
    engine, stub = server
    ep = engine.fleet.endpoints[0]
    _push(stub, pb.TelemetryBatch(samples=[pb.TelemetrySample(endpoint_id=ep.endpoint_id, metric="queue_waiting",
                                                              value=2)]))
    ack = _push(stub, pb.TelemetryBatch(samples=[pb.TelemetrySample(endpoint_id=ep.endpoint_id,
                                                                    metric="queue_waiting", value=math.nan)]))
    assert ack.samples_accepted == 1
    assert engine.telemetry.reading(ep.endpoint_id).values["queue_waiting"] == 2.0
    assert engine.telemetry.rejected == 0


@pytest.mark.parametrize(("offset_s", "reason"), [(10 * 365 * 86400, "more than 5 s in the future"),
                                                  (60.0, "more than 5 s in the future")])
def test_push_refuses_a_timestamp_in_the_future(server, offset_s: float, reason: str) -> None:  # type: ignore[no-untyped-def]
    engine, stub = server
    ep = engine.fleet.endpoints[0]
    details, field = _refused(stub, pb.TelemetryBatch(samples=[pb.TelemetrySample(
        endpoint_id=ep.endpoint_id, metric="queue_waiting", value=1, timestamp_unix_ms=_now_ms(offset_s))]))
    assert details == f"samples[0].timestamp_unix_ms: {reason}" and field == "samples[0].timestamp_unix_ms"
    # The honest sample after it is stored: nothing was pinned.
    _push(stub, pb.TelemetryBatch(samples=[pb.TelemetrySample(endpoint_id=ep.endpoint_id, metric="queue_waiting",
                                                              value=3)]))
    assert engine.telemetry.reading(ep.endpoint_id).values["queue_waiting"] == 3.0


def test_push_refuses_a_negative_timestamp(server) -> None:  # type: ignore[no-untyped-def]
    engine, stub = server
    ep = engine.fleet.endpoints[0]
    details, field = _refused(stub, pb.TelemetryBatch(samples=[pb.TelemetrySample(
        endpoint_id=ep.endpoint_id, metric="queue_waiting", value=1, timestamp_unix_ms=-1)]))
    assert details == "samples[0].timestamp_unix_ms: must not be negative" and field == "samples[0].timestamp_unix_ms"
    assert engine.telemetry.reading(ep.endpoint_id).values == {}


def test_push_within_the_clock_skew_allowance_is_stored_but_pins_nothing(server) -> None:  # type: ignore[no-untyped-def]
    engine, stub = server
    ep = engine.fleet.endpoints[0]
    _push(stub, pb.TelemetryBatch(samples=[pb.TelemetrySample(
        endpoint_id=ep.endpoint_id, metric="queue_waiting", value=9, timestamp_unix_ms=_now_ms(3.0))]))
    reading = engine.telemetry.reading(ep.endpoint_id)
    assert reading.values["queue_waiting"] == 9.0 and reading.ages_s["queue_waiting"] >= 0.0
    _push(stub, pb.TelemetryBatch(samples=[pb.TelemetrySample(endpoint_id=ep.endpoint_id, metric="queue_waiting",
                                                              value=1)]))
    assert engine.telemetry.reading(ep.endpoint_id).values["queue_waiting"] == 1.0


@pytest.mark.parametrize("line", ['vllm:num_requests_waiting{engine="1"} -4',
                                  "vllm:num_requests_running +Inf",
                                  'DCGM_FI_DEV_GPU_TEMP{gpu="0"} -Inf',
                                  "vllm:time_to_first_token_seconds_sum -2"])
def test_pushed_exposition_with_an_unusable_value_is_refused(server, line: str) -> None:  # type: ignore[no-untyped-def]
    engine, stub = server
    ep = engine.fleet.endpoints[0]
    text = f'vllm:num_requests_waiting{{engine="0"}} 6\n{line}\n'
    details, field = _refused(stub, pb.TelemetryBatch(
        samples=[pb.TelemetrySample(endpoint_id=ep.endpoint_id, metric="queue_waiting", value=5)],
        expositions=[pb.Exposition(endpoint_id=ep.endpoint_id, text=text)]))
    assert field == "expositions[0].text"
    assert details.startswith(f"expositions[0].text: {line.split('{')[0].split()[0]} must be finite and >= 0")
    assert engine.telemetry.reading(ep.endpoint_id).values == {}


def test_pushed_exposition_with_a_line_timestamp_past_int64_is_refused_whole(server) -> None:  # type: ignore[no-untyped-def]
    """It used to pass every check, then overflow after the batch's samples were stored (UNAVAILABLE)."""
    engine, stub = server
    ep = engine.fleet.endpoints[0]
    details, field = _refused(stub, pb.TelemetryBatch(
        samples=[pb.TelemetrySample(endpoint_id=ep.endpoint_id, metric="queue_waiting", value=7)],
        expositions=[pb.Exposition(endpoint_id=ep.endpoint_id, text="vllm:num_requests_running 3 " + "9" * 400)]))
    assert field == "expositions[0].text" and "is not an int64 of milliseconds" in details
    assert engine.telemetry.reading(ep.endpoint_id).values == {}


def test_pushed_exposition_stamped_in_the_future_is_refused(server) -> None:  # type: ignore[no-untyped-def]
    engine, stub = server
    ep = engine.fleet.endpoints[0]
    details, field = _refused(stub, pb.TelemetryBatch(expositions=[pb.Exposition(
        endpoint_id=ep.endpoint_id, text="vllm:num_requests_waiting 6\n", scraped_at_unix_ms=_now_ms(3600))]))
    assert details == "expositions[0].scraped_at_unix_ms: more than 5 s in the future"
    assert field == "expositions[0].scraped_at_unix_ms"
    assert engine.telemetry.reading(ep.endpoint_id).values == {}


@pytest.mark.parametrize(("target", "text", "message"), [
    ({}, 'DCGM_FI_DEV_GPU_TEMP{gpu="0"} 60\n', "one of endpoint_id or node_id is required"),
    ({"node": True}, "vllm:num_requests_waiting 6\n", "endpoint metrics (vLLM, Triton), which need the endpoint_id"),
])
def test_pushed_exposition_that_names_no_place_for_its_values_is_refused(  # type: ignore[no-untyped-def]
        server, target: dict[str, bool], text: str, message: str) -> None:
    engine, stub = server
    ep = engine.fleet.endpoints[0]
    x = pb.Exposition(node_id=ep.node_id if target else "", text=text)  # acked but stored nowhere, until now
    details, field = _refused(stub, pb.TelemetryBatch(expositions=[x]))
    assert field == "expositions[0].endpoint_id" and message in details
    assert engine.telemetry.reading(ep.endpoint_id).values == {}


def test_pushed_exposition_may_hold_infinities_outside_the_kept_series(server) -> None:  # type: ignore[no-untyped-def]
    engine, stub = server
    ep = engine.fleet.endpoints[0]
    text = ('vllm:num_requests_waiting{engine="0"} 6\n'
            'vllm:time_to_first_token_seconds_bucket{le="+Inf"} +Inf\n'
            "some_other_gauge -Inf\n")
    ack = _push(stub, pb.TelemetryBatch(expositions=[pb.Exposition(endpoint_id=ep.endpoint_id, text=text)]))
    assert ack.samples_accepted == 1  # what is stored: the series InferMesh reads, not every line
    assert engine.telemetry.reading(ep.endpoint_id).values["queue_waiting"] == 6.0


def test_a_pushed_exposition_of_series_infermesh_does_not_read_is_refused_not_acked(server) -> None:  # type: ignore[no-untyped-def]
    engine, stub = server
    ep = engine.fleet.endpoints[0]
    x = pb.Exposition(endpoint_id=ep.endpoint_id, text="vllm_num_requests_waiting 3\nvllm_kv_cache 0.5\n")  # misspelt
    details, field = _refused(stub, pb.TelemetryBatch(expositions=[x]))
    assert field == "expositions[0].text" and "none of its 2 samples" in details
    assert engine.telemetry.reading(ep.endpoint_id).values == {}


# The store, whoever calls it


def test_store_drops_negative_and_infinite_values_and_counts_them() -> None:
    store = t.TelemetryStore({"e1": "n1"}, clock=lambda: 100.0)
    store.update_endpoint("e1", {t.QUEUE_WAITING: 2.0, t.QUEUE_RUNNING: 1.0}, ts=99.0)
    store.update_endpoint("e1", {t.QUEUE_WAITING: -1.0, t.QUEUE_RUNNING: math.inf, t.KV_CACHE_USAGE: math.nan},
                          ts=100.0)
    store.update_node("n1", {t.GPU_TEMP_C: -math.inf, t.GPU_UTIL: 50.0}, ts=100.0)
    assert store.reading("e1").values == {t.QUEUE_WAITING: 2.0, t.QUEUE_RUNNING: 1.0, t.GPU_UTIL: 50.0}
    assert store.rejected == 3  # NaN is "no value", not a rejection


def test_store_refuses_a_value_stamped_beyond_the_clock_skew_allowance() -> None:
    now = [1000.0]
    store = t.TelemetryStore({"e1": "n1"}, stale_after_s=30.0, clock=lambda: now[0])
    store.update_endpoint("e1", {t.QUEUE_WAITING: 2.0})
    store.update_endpoint("e1", {t.QUEUE_WAITING: 1e9}, ts=now[0] + 10 * 365 * 86400)
    store.update_node("n1", {t.GPU_TEMP_C: 70.0}, ts=now[0] + t.MAX_CLOCK_SKEW_S + 1)
    assert store.reading("e1").values == {t.QUEUE_WAITING: 2.0}
    assert store.rejected == 2
    now[0] += 1.0
    store.update_endpoint("e1", {t.QUEUE_WAITING: 3.0})  # an honest later sample still lands
    assert store.reading("e1").values == {t.QUEUE_WAITING: 3.0}


def test_store_clamps_a_stamp_within_the_allowance_to_now() -> None:
    now = [1000.0]
    store = t.TelemetryStore({"e1": "n1"}, stale_after_s=30.0, clock=lambda: now[0])
    store.update_endpoint("e1", {t.QUEUE_WAITING: 9.0}, ts=now[0] + 4.0)
    assert store.reading("e1").ages_s[t.QUEUE_WAITING] == 0.0  # never a negative age
    now[0] += 1.0
    store.update_endpoint("e1", {t.QUEUE_WAITING: 1.0})  # 1 s later: newer than the clamped stamp
    assert store.reading("e1").values == {t.QUEUE_WAITING: 1.0}
    now[0] += 40.0
    assert store.reading("e1").values == {}  # and it goes stale like any other value
    assert store.rejected == 0


def test_store_max_clock_skew_is_configurable() -> None:
    store = t.TelemetryStore({"e1": "n1"}, clock=lambda: 1000.0, max_clock_skew_s=0.5)
    store.update_endpoint("e1", {t.QUEUE_WAITING: 9.0}, ts=1001.0)
    assert store.reading("e1").values == {} and store.rejected == 1


def test_ingest_exposition_drops_unusable_series_before_combining(caplog: pytest.LogCaptureFixture) -> None:
    store = t.TelemetryStore({"e1": "n1"}, clock=lambda: 100.0)
    text = ('vllm:num_requests_waiting{engine="0"} 4\n'
            'vllm:num_requests_waiting{engine="1"} -1000\n'  # would make the sum over engines negative
            "vllm:num_requests_running +Inf\n"
            "vllm:gpu_cache_usage_perc NaN\n"
            'vllm:time_to_first_token_seconds_bucket{le="+Inf"} 4\n')
    with caplog.at_level(logging.WARNING, logger="infermesh.telemetry"):
        assert store.ingest_exposition(text, endpoint_id="e1") == 1  # the one value stored
    assert store.reading("e1").values == {t.QUEUE_WAITING: 4.0}
    assert store.rejected == 2
    assert "dropped 2 unusable sample(s)" in caplog.text and "e1" in caplog.text


def test_canonicalize_ignores_unusable_values() -> None:
    node, ep = t.canonicalize(t.parse_exposition('DCGM_FI_DEV_GPU_TEMP{gpu="0"} 60\n'
                                                 'DCGM_FI_DEV_GPU_TEMP{gpu="1"} +Inf\n'
                                                 "vllm:num_requests_waiting -3\n"))
    assert node == {t.GPU_TEMP_C: 60.0} and ep == {}


def test_scrape_drops_and_counts_unusable_values(caplog: pytest.LogCaptureFixture) -> None:
    bodies = {"/vllm": b'vllm:num_requests_waiting{engine="0"} 4\nvllm:num_requests_waiting{engine="1"} -7\n'
                       b"vllm:kv_cache_usage_perc +Inf\n",
              "/dcgm": b'DCGM_FI_DEV_GPU_TEMP{gpu="0"} -Inf\nDCGM_FI_DEV_GPU_UTIL{gpu="0"} 30\n'}

    def exporter(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=bodies[request.url.path])

    store = t.TelemetryStore({"e1": "n1"})
    scraper = Scraper(store, [ScrapeTarget(url="http://exporter/vllm", endpoint_id="e1"),
                              ScrapeTarget(url="http://exporter/dcgm", node_id="n1")])
    with caplog.at_level(logging.WARNING, logger="infermesh.telemetry"), \
            httpx.Client(transport=httpx.MockTransport(exporter)) as client:
        scraper.scrape_once(client)
    assert store.reading("e1").values == {t.QUEUE_WAITING: 4.0, t.GPU_UTIL: 30.0}
    assert store.rejected == 3
    assert scraper.scrapes == 2 and scraper.failures == 0  # a bad series is not a failed scrape
    assert "telemetry from e1" in caplog.text and "telemetry from n1" in caplog.text


def test_timestamp_problem_and_usable_value() -> None:
    assert t.timestamp_problem(-0.001, 100.0) == "must not be negative"
    assert t.timestamp_problem(math.nan, 100.0) == "must not be negative"
    assert t.timestamp_problem(math.inf, 100.0) == "more than 5 s in the future"
    assert t.timestamp_problem(105.0, 100.0) is None
    assert t.timestamp_problem(105.5, 100.0, max_skew_s=5.0) == "more than 5 s in the future"
    assert t.usable_value(0.0) and not t.usable_value(-0.0001) and not t.usable_value(math.nan)


def test_a_bad_exporter_is_counted_every_scrape_but_logged_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    body = b'vllm:num_requests_waiting{engine="0"} 4\nvllm:num_requests_waiting{engine="1"} -7\n'
    store = t.TelemetryStore({"e1": "n1"})
    scraper = Scraper(store, [ScrapeTarget(url="http://exporter/vllm", endpoint_id="e1")])
    with caplog.at_level(logging.WARNING, logger="infermesh.telemetry"), \
            httpx.Client(transport=httpx.MockTransport(lambda _: httpx.Response(200, content=body))) as client:
        for _ in range(20):
            scraper.scrape_once(client)
        store.update_endpoint("e1", {t.QUEUE_WAITING: -1.0})  # another problem of the same target: its own line
    warned = [r.getMessage() for r in caplog.records]
    assert store.rejected == 21  # the count is exact (infermesh_telemetry_rejected_total)
    assert len([m for m in warned if m.startswith("telemetry from e1: dropped 1 unusable sample(s)")]) == 1, warned
    assert len([m for m in warned if m.startswith("telemetry for e1: dropped")]) == 1, warned


def test_throttled_warnings_report_what_they_held_back(caplog: pytest.LogCaptureFixture) -> None:
    from decision.log_throttle import ThrottledWarnings

    now = [0.0]
    w = ThrottledWarnings(logging.getLogger("infermesh.test"), interval_s=60, clock=lambda: now[0], max_keys=2)
    with caplog.at_level(logging.WARNING, logger="infermesh.test"):
        assert [w.warning("a", "bad %s", 1) for _ in range(4)] == [True, False, False, False]
        now[0] = 30.0
        assert w.warning("b", "bad %s", 2)  # another key is not held back by the first
        now[0] = 60.0
        assert w.warning("a", "bad %s", 1)
        assert w.warning("c", "bad %s", 3)  # a third key: the memory (2 keys) starts afresh
        assert w.warning("a", "bad %s", 1)
    assert [r.getMessage() for r in caplog.records] == [
        "bad 1", "bad 2", "bad 1 (3 more like it in the last 60 s, not logged)", "bad 3", "bad 1"]


def test_a_fraction_or_percentage_over_its_ceiling_is_refused(server) -> None:  # type: ignore[no-untyped-def]
    # A KV cache "500% full" or a GPU "250% busy" would steer routing away from an endpoint for good.
    engine, stub = server
    ep = engine.fleet.endpoints[0]
    for metric, value, rule in (("kv_cache_usage", 5.0, "between 0 and 1"), ("gpu_util", 250.0, "between 0 and 100")):
        details, field = _refused(stub, pb.TelemetryBatch(samples=[
            pb.TelemetrySample(endpoint_id=ep.endpoint_id, metric=metric, value=value)]))
        assert field == "samples[0].value" and f"{metric} must be {rule}, got {value}" in details
    x = pb.Exposition(endpoint_id=ep.endpoint_id, text="vllm:kv_cache_usage_perc 1.7\n")
    details, field = _refused(stub, pb.TelemetryBatch(expositions=[x]))
    assert field == "expositions[0].text" and "vllm:kv_cache_usage_perc must be between 0 and 1" in details
    ok = _push(stub, pb.TelemetryBatch(samples=[pb.TelemetrySample(endpoint_id=ep.endpoint_id, metric="kv_cache_usage",
                                                                   value=1.0)]))
    assert ok.samples_accepted == 1 and engine.telemetry.reading(ep.endpoint_id).values["kv_cache_usage"] == 1.0
