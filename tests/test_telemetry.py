"""Telemetry parsing of every supported metric, canonicalisation, staleness and ordering."""

from __future__ import annotations

from pathlib import Path

import pytest

from decision import telemetry as t

DATA = Path(__file__).parent / "data"


def test_parse_exposition_handles_labels_timestamps_escapes_and_nan() -> None:
    samples = t.parse_exposition((DATA / "mixed_node.prom").read_text())
    temps = [s for s in samples if s.name == "DCGM_FI_DEV_GPU_TEMP"]
    assert [s.timestamp_ms for s in temps][2] == 1700000000000
    assert temps[3].labels["Hostname"] == 'n"1"'


def test_canonicalize_every_dcgm_vllm_and_triton_metric() -> None:
    node, ep = t.canonicalize(t.parse_exposition((DATA / "mixed_node.prom").read_text()))
    assert node[t.GPU_UTIL] == pytest.approx(25.0)  # mean over GPUs
    assert node[t.GPU_TEMP_C] == 91.0  # hottest GPU; NaN ignored
    assert node[t.XID_ERRORS] == 48.0
    assert node[t.POWER_W] == pytest.approx(300.75)
    assert node[t.FB_USED_MIB] == 4000.0
    assert node[t.FB_FREE_MIB] == 1200.0
    assert ep[t.KV_CACHE_USAGE] == pytest.approx(0.42)
    assert ep[t.TTFT_MEAN_S] == pytest.approx(0.5)
    assert ep[t.QUEUE_WAITING] == 3.0
    assert ep[t.QUEUE_DURATION_US] == pytest.approx(500.0)


@pytest.mark.parametrize("name", ["dcgm_exporter_sample.prom", "vllm_v1_sample.prom", "triton_sample.prom"])
def test_shared_samples_parse(shared_dir: Path, name: str) -> None:
    samples = t.parse_exposition((shared_dir / "telemetry" / name).read_text())
    node, ep = t.canonicalize(samples)
    if name.startswith("dcgm"):
        assert {t.GPU_UTIL, t.GPU_TEMP_C, t.POWER_W, t.XID_ERRORS, t.FB_USED_MIB, t.FB_FREE_MIB} <= set(node)
    elif name.startswith("vllm"):
        # DP=2: running and waiting add up over engines; KV usage is the fuller engine's.
        assert ep[t.QUEUE_RUNNING] == 78.0
        assert ep[t.QUEUE_WAITING] == 6.0
        assert ep[t.KV_CACHE_USAGE] == pytest.approx(0.8734)
        assert 0 < ep[t.TTFT_MEAN_S] < 5
    else:
        assert ep[t.QUEUE_WAITING] > 0
        # Queue time over the successes of the model that queued (the ensemble counts each request
        # again and reports no queue time of its own).
        assert ep[t.QUEUE_DURATION_US] == pytest.approx(9113877421 / 48213)


def test_label_values_may_hold_characters_other_parsers_take_for_line_ends() -> None:
    text = ('vllm:num_requests_waiting{model_name="meta\u2028llama\x85\x0c\x1c"} 3\r\n'
            'vllm:num_requests_running{model_name="x"} 1\n')
    samples = t.parse_exposition(text)
    assert [(s.name, s.value) for s in samples] == [("vllm:num_requests_waiting", 3.0),
                                                    ("vllm:num_requests_running", 1.0)]
    assert samples[0].labels["model_name"] == "meta\u2028llama\x85\x0c\x1c"


def test_label_escapes_decode_left_to_right() -> None:
    [s] = t.parse_exposition('m{path="C:\\\\new",q="say \\"hi\\"",n="a\\nb"} 1')
    assert s.labels == {"path": "C:\\new", "q": 'say "hi"', "n": "a\nb"}


def test_a_line_timestamp_keeps_a_relayed_value_old_and_never_makes_one_fresher() -> None:
    store = t.TelemetryStore({"e1": "n1"}, stale_after_s=30.0, clock=lambda: 10_000.0)
    text = ("vllm:num_requests_waiting 42 6400000\n"        # an hour old (ms since the epoch)
            "vllm:num_requests_running 3\n"                 # no timestamp: the push's own time
            "DCGM_FI_DEV_GPU_TEMP 60 99999000\n")           # stamped in the future by its exporter
    store.ingest_exposition(text, endpoint_id="e1", ts=9_990.0)
    ages = dict(store.reading("e1").ages_s)
    assert ages == {t.QUEUE_WAITING: pytest.approx(3_600.0), t.QUEUE_RUNNING: pytest.approx(10.0),
                    t.GPU_TEMP_C: pytest.approx(10.0)}
    assert t.QUEUE_WAITING not in store.reading("e1").values  # past the staleness limit: unknown


def test_bad_exposition_names_the_line() -> None:
    with pytest.raises(t.ExpositionError, match="line 2"):
        t.parse_exposition("ok_metric 1\nbroken{ 2\n")
    with pytest.raises(t.ExpositionError, match="bad sample value"):
        t.parse_exposition("m 12abc")


def test_values_age_and_go_unknown_past_the_staleness_limit() -> None:
    now = [1000.0]
    store = t.TelemetryStore({"e1": "n1", "e2": "n1"}, stale_after_s=30.0, clock=lambda: now[0])
    store.update_node("n1", {t.GPU_TEMP_C: 70.0})
    store.update_endpoint("e1", {t.QUEUE_WAITING: 2.0})
    now[0] = 1020.0
    store.update_endpoint("e1", {t.QUEUE_WAITING: 5.0})
    r = store.reading("e1", now=1040.0)
    assert r.values == {t.QUEUE_WAITING: 5.0}  # the node temperature is 40 s old: unknown
    assert dict(r.ages_s) == {t.GPU_TEMP_C: 40.0, t.QUEUE_WAITING: 20.0}
    assert r.max_age_s == 40.0
    assert store.reading("e2", now=1010.0).values == {t.GPU_TEMP_C: 70.0}  # node values reach every endpoint
    assert store.reading("unknown").values == {}


def test_an_older_sample_never_overwrites_a_newer_one() -> None:
    store = t.TelemetryStore({"e1": "n1"}, clock=lambda: 100.0)
    store.update_endpoint("e1", {t.QUEUE_WAITING: 9.0}, ts=99.0)
    store.update_endpoint("e1", {t.QUEUE_WAITING: 1.0}, ts=90.0)
    assert store.reading("e1").values[t.QUEUE_WAITING] == 9.0


def test_ingest_exposition_attributes_gpu_metrics_to_the_node() -> None:
    store = t.TelemetryStore({"e1": "n1", "e2": "n1"}, clock=lambda: 0.0)
    store.ingest_exposition((DATA / "mixed_node.prom").read_text(), endpoint_id="e1")
    assert store.reading("e2").values[t.GPU_TEMP_C] == 91.0
    assert t.QUEUE_WAITING not in store.reading("e2").values
    assert store.reading("e1").values[t.QUEUE_WAITING] == 3.0


def test_canonical_name_knows_exporter_names() -> None:
    assert t.canonical_name("DCGM_FI_DEV_GPU_TEMP") == (t.GPU_TEMP_C, True)
    assert t.canonical_name("vllm:kv_cache_usage_perc") == (t.KV_CACHE_USAGE, False)
    assert t.canonical_name("queue_waiting") == (t.QUEUE_WAITING, False)
    assert t.canonical_name("nope") is None


def test_refreshed_readings_leave_nothing_for_the_collector_to_rescan() -> None:
    """A refresh of every endpoint replaces objects without adding any, so the collector's own
    trigger never fires; the store collects its young readings itself and they end untracked."""
    import gc

    n = 3 * t.YOUNG_BATCH
    store = t.TelemetryStore({f"ep{i}": f"n{i}" for i in range(n)})
    store.rows_of([f"ep{i}" for i in range(n)])
    for rnd in range(2):
        for i in range(n):
            store.update_node(f"n{i}", {"gpu_temp_c": 50.0 + rnd, "xid_errors": 0.0}, ts=100.0 + rnd)
            store.update_endpoint(f"ep{i}", {"queue_waiting": float(i % 7)}, ts=100.0 + rnd)
    tracked = sum(gc.is_tracked(m) for m in store._merged.values())
    assert tracked <= t.YOUNG_BATCH  # at most the readings since the store's last collection
    r = store.reading("ep5", now=101.5)
    assert dict(r.values) == {"gpu_temp_c": 51.0, "xid_errors": 0.0, "queue_waiting": 5.0}
    assert r.ages_s["queue_waiting"] == pytest.approx(0.5) and r.max_age_s == pytest.approx(0.5)


def test_ttft_and_queue_means_cover_the_interval_since_the_last_scrape_not_the_servers_life() -> None:
    # vLLM's TTFT histogram and Triton's queue counters count from the server's start: after a day of
    # fast requests, their ratio would hide a queue that built up in the last minute.
    now = [1000.0]
    store = t.TelemetryStore({"e1": "n1"}, stale_after_s=300.0, clock=lambda: now[0])

    def scrape(ttft_sum: float, ttft_count: float, queue_us: float, successes: float) -> None:
        store.ingest_exposition(f"vllm:time_to_first_token_seconds_sum {ttft_sum}\n"
                                f"vllm:time_to_first_token_seconds_count {ttft_count}\n"
                                f'nv_inference_queue_duration_us{{model="m",version="1"}} {queue_us}\n'
                                f'nv_inference_request_success{{model="m",version="1"}} {successes}\n',
                                endpoint_id="e1")

    scrape(100.0, 1000.0, 50_000.0, 1000.0)  # first sight: the mean since the counters began
    r = store.reading("e1")
    assert [r.values[t.TTFT_MEAN_S], r.values[t.QUEUE_DURATION_US]] == pytest.approx([0.1, 50.0])
    now[0] += 15
    scrape(130.0, 1010.0, 70_000.0, 1010.0)  # 10 requests at 3 s TTFT, 2 ms queued, in the last 15 s
    r = store.reading("e1")
    assert [r.values[t.TTFT_MEAN_S], r.values[t.QUEUE_DURATION_US]] == pytest.approx([3.0, 2000.0])
    now[0] += 15
    scrape(130.0, 1010.0, 70_000.0, 1010.0)  # no request since: no new mean, the last one ages
    r = store.reading("e1")
    assert r.values[t.TTFT_MEAN_S] == pytest.approx(3.0) and r.ages_s[t.TTFT_MEAN_S] == pytest.approx(15.0)
    now[0] += 15
    scrape(2.0, 4.0, 400.0, 4.0)  # the server restarted: counters from zero again
    r = store.reading("e1")
    assert [r.values[t.TTFT_MEAN_S], r.values[t.QUEUE_DURATION_US]] == pytest.approx([0.5, 100.0])


def test_blanks_between_a_metric_name_and_its_labels_are_allowed_as_prometheus_allows_them() -> None:
    (s,) = t.parse_exposition('vllm:num_requests_waiting \t{engine="0"} 6')
    assert (s.name, s.labels, s.value) == ("vllm:num_requests_waiting", {"engine": "0"}, 6.0)
    with pytest.raises(t.ExpositionError):
        t.parse_exposition('vllm:num_requests_waiting {engine="0" 6')


def test_one_engine_restarting_among_several_starts_its_own_interval_only() -> None:
    """vLLM data-parallel engines count apart: totals hid one engine's restart (8 s read for 0.05 s)."""
    now = [1000.0]
    store = t.TelemetryStore({"e1": "n1"}, stale_after_s=300.0, clock=lambda: now[0])

    def scrape(e0: tuple[float, float], e1: tuple[float, float]) -> float:
        store.ingest_exposition("".join(
            f'vllm:time_to_first_token_seconds_sum{{engine="{i}"}} {s}\n'
            f'vllm:time_to_first_token_seconds_count{{engine="{i}"}} {c}\n' for i, (s, c) in enumerate((e0, e1))),
            endpoint_id="e1")
        return store.reading("e1").values[t.TTFT_MEAN_S]

    assert scrape((400.0, 100.0), (800.0, 100.0)) == pytest.approx(6.0)  # first sight: since the start
    now[0] += 15
    # Engine 0 served 10 requests at 0.05 s; engine 1 restarted and served one at 0.1 s.
    assert scrape((400.5, 110.0), (0.1, 1.0)) == pytest.approx(0.6 / 11)


def test_a_gpu_shared_by_several_pods_counts_once() -> None:
    """dcgm-exporter repeats a GPU's series per pod sharing it: summed, 80 GiB of memory read as 240."""
    labels = 'gpu="0",UUID="GPU-3f1c",device="nvidia0",Hostname="n7"'
    text = "".join(f'DCGM_FI_DEV_FB_USED{{{labels},pod="p{i}"}} 60000\n'
                   f'DCGM_FI_DEV_POWER_USAGE{{{labels},pod="p{i}"}} 500\n'
                   f'DCGM_FI_DEV_FB_USED{{gpu="1",UUID="GPU-77aa",pod="p{i}"}} 1000\n' for i in range(3))
    node, _ = t.canonicalize(t.parse_exposition(text))
    assert node[t.FB_USED_MIB] == 61000.0 and node[t.POWER_W] == 500.0  # two GPUs, each once
