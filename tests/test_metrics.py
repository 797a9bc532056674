"""The request path's histograms expose exactly what prometheus_client's own would."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from decision.metrics import FastHistogram, ServiceMetrics

BUCKETS = (1e-5, 1e-4, 1e-3, 1e-2, 1.0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["guard", "score", "choose"]),
                          st.floats(0.0, 5.0, allow_nan=False)), max_size=40))
def test_fast_histogram_matches_prometheus_client(values: list[tuple[str, float]]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = FastHistogram("stage_seconds", "Stage time.", BUCKETS, label="stage", registry=ours)
    ref = Histogram("stage_seconds", "Stage time.", ["stage"], buckets=BUCKETS, registry=theirs)
    for stage, v in values:
        fast.observe(v, stage)
        ref.labels(stage).observe(v)
    for stage in {s for s, _ in values}:
        for le in [*(str(b) for b in BUCKETS), "+Inf"]:
            labels = {"stage": stage, "le": le}
            assert ours.get_sample_value("stage_seconds_bucket", labels) == \
                theirs.get_sample_value("stage_seconds_bucket", labels), labels
        for suffix in ("_count", "_sum"):
            assert ours.get_sample_value("stage_seconds" + suffix, {"stage": stage}) == pytest.approx(
                theirs.get_sample_value("stage_seconds" + suffix, {"stage": stage}))


def test_unlabelled_histogram_is_exposed_before_any_value() -> None:
    r = CollectorRegistry()
    FastHistogram("decision_seconds", "Decision time.", BUCKETS, registry=r)
    text = generate_latest(r).decode()
    assert "# TYPE decision_seconds histogram" in text
    assert 'decision_seconds_bucket{le="+Inf"} 0.0' in text


def test_observe_many_counts_every_value_under_concurrency() -> None:
    r = CollectorRegistry()
    h = FastHistogram("stage_seconds", "Stage time.", BUCKETS, label="stage", registry=r)

    def work() -> None:
        for _ in range(2000):
            h.observe_many({"guard": 50.0, "score": 5.0}, 1e-6)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert r.get_sample_value("stage_seconds_count", {"stage": "guard"}) == 8000
    assert r.get_sample_value("stage_seconds_bucket", {"stage": "score", "le": "1e-05"}) == 8000
    assert r.get_sample_value("stage_seconds_bucket", {"stage": "guard", "le": "1e-05"}) == 0


def test_buckets_must_ascend() -> None:
    with pytest.raises(ValueError, match="ascending"):
        FastHistogram("x", "x", (1.0, 0.5))


def test_service_metrics_record_stages_in_the_exposition() -> None:
    m = ServiceMetrics()
    m.record_stages({"locate": 40.0, "guard": 80.0})
    text = m.exposition().decode()
    assert 'infermesh_stage_duration_seconds_bucket{le="5e-05",stage="locate"} 1.0' in text
    assert 'infermesh_stage_duration_seconds_bucket{le="5e-05",stage="guard"} 0.0' in text


def test_the_service_exports_telemetry_rejections_and_scrape_counts() -> None:
    from decision.config import Settings, load_config
    from decision.service import Service

    service = Service(load_config("deploy/demo/infermesh.yaml"), Settings(), audit_enabled=False)
    try:
        endpoint = service.fleet.endpoints[0].endpoint_id
        service.telemetry.ingest_exposition("vllm:num_requests_waiting -3\nvllm:num_requests_running +Inf\n",
                                            endpoint_id=endpoint)
        service.scraper.failures += 1  # as a failed scrape counts it (tests/test_scraper.py scrapes for real)
        text = service.metrics.exposition().decode()
    finally:
        service.stop(0)  # its threads (the policy watcher...) must not outlive the test
    assert "# TYPE infermesh_telemetry_rejected_total counter" in text
    assert "infermesh_telemetry_rejected_total 2.0" in text
    assert "infermesh_telemetry_scrapes_total 0.0" in text and "infermesh_telemetry_scrape_failures_total 1.0" in text
