"""Scraping Prometheus endpoints over real HTTP into the telemetry store, with timeouts."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import httpx
import pytest

from decision.config import ScrapeTarget
from decision.scraper import Scraper
from decision.telemetry import GPU_TEMP_C, GPU_UTIL, KV_CACHE_USAGE, QUEUE_WAITING, TelemetryStore

DATA = Path(__file__).parent / "data"


class _Exporter(BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, bytes]] = {}

    def do_GET(self) -> None:
        if self.path == "/slow":
            time.sleep(1.0)
        if self.path == "/trickle":  # headers at once, then a byte of the body every 0.1 s
            trickled = self.routes["/trickle"]
            self.send_response(200)
            self.send_header("Content-Length", str(len(trickled)))
            self.end_headers()
            for i in range(len(trickled)):
                self.wfile.write(trickled[i:i + 1])
                self.wfile.flush()
                time.sleep(0.1)
            return
        body = self.routes.get(self.path)
        if body is None:
            self.send_response(404)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def exporter() -> Iterator[str]:
    _Exporter.routes = {"/node": (DATA / "mixed_node.prom").read_bytes(),
                        "/vllm": b"vllm:num_requests_waiting{engine=\"0\"} 4\nvllm:kv_cache_usage_perc 0.25\n",
                        "/slow": b"vllm:num_requests_waiting 1\n",
                        "/trickle": b"vllm:num_requests_waiting 1\n# " + b"." * 30 + b"\n"}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Exporter)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_scrape_once_fills_node_and_endpoint_values_and_counts_failures(exporter: str) -> None:
    store = TelemetryStore({"e1": "n1", "e2": "n1"})
    scraper = Scraper(store, [ScrapeTarget(url=f"{exporter}/node", node_id="n1"),
                              ScrapeTarget(url=f"{exporter}/vllm", endpoint_id="e1"),
                              ScrapeTarget(url=f"{exporter}/missing", endpoint_id="e2"),
                              ScrapeTarget(url=f"{exporter}/slow", endpoint_id="e2")], timeout_s=0.3)
    with httpx.Client(timeout=0.3) as client:
        scraper.scrape_once(client)
    assert store.reading("e2").values[GPU_UTIL] == pytest.approx(25.0)  # node values reach every endpoint
    # One GPU's temperature line carries its own timestamp, from 2023: the node's temperature (the
    # hottest GPU's) is as old as its oldest line, long past the staleness limit, so unknown.
    assert GPU_TEMP_C not in store.reading("e2").values
    assert store.reading("e1").values[QUEUE_WAITING] == 4.0
    assert store.reading("e1").values[KV_CACHE_USAGE] == 0.25
    assert QUEUE_WAITING not in store.reading("e2").values  # 404 and timeout stored nothing
    assert scraper.failures == 2 and scraper.scrapes == 2


def test_a_failing_target_warns_once_per_error_and_says_when_it_recovers(exporter: str,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    scraper = Scraper(TelemetryStore({"e1": "n1"}), [ScrapeTarget(url=f"{exporter}/flaky", endpoint_id="e1")])
    with caplog.at_level(logging.DEBUG, logger="infermesh.scraper"), httpx.Client(timeout=1.0) as client:
        for _ in range(3):
            scraper.scrape_once(client)  # 404 three times: one warning
        _Exporter.routes["/flaky"] = b"boom 1 2 3 4\n"
        scraper.scrape_once(client)  # a different failure (a parse error): warned
        _Exporter.routes["/flaky"] = b"vllm:num_requests_waiting 2\n"
        scraper.scrape_once(client)  # recovered: said once
        scraper.scrape_once(client)
    by_level = [(r.levelno, r.getMessage()) for r in caplog.records]
    warnings = [m for lvl, m in by_level if lvl == logging.WARNING]
    assert len(warnings) == 2 and "404" in warnings[0], by_level
    assert [m for lvl, m in by_level if lvl == logging.INFO] == [
        f"scrape of {exporter}/flaky succeeded again after 4 failure(s)"]
    assert scraper.failures == 4 and scraper.scrapes == 2


def _run_for_three_scrapes(scraper: Scraper) -> None:
    scraper.start()
    deadline = time.monotonic() + 5
    while scraper.scrapes < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    scraper.stop()


def test_background_scraper_refreshes_until_stopped(exporter: str) -> None:
    store = TelemetryStore({"e1": "n1"})
    scraper = Scraper(store, [ScrapeTarget(url=f"{exporter}/vllm", endpoint_id="e1")], interval_s=0.05,
                      timeout_s=1.0)
    _run_for_three_scrapes(scraper)
    assert scraper.scrapes >= 3
    assert store.reading("e1").ages_s[QUEUE_WAITING] < 1.0


def test_a_target_url_that_cannot_be_requested_is_refused_at_load() -> None:
    for bad in ("http://gpu-node-07:dcgm/metrics", "gpu-node-07:9400/metrics", "ftp://h/metrics", "http:///metrics"):
        with pytest.raises(ValueError, match="url"):
            ScrapeTarget(url=bad, node_id="n1")
    assert ScrapeTarget(url="https://[::1]:9400/metrics", node_id="n1").url == "https://[::1]:9400/metrics"


def test_one_target_failing_in_an_unforeseen_way_does_not_stop_the_others(exporter: str) -> None:
    # Built past the load-time check, as a target whose request raises something that is neither an
    # HTTP error nor a parse error: the scraper thread must keep scraping the others.
    broken = ScrapeTarget.model_construct(url="http://gpu-node-07:dcgm/metrics", endpoint_id="e1", node_id="")
    store = TelemetryStore({"e1": "n1", "e2": "n1"})
    scraper = Scraper(store, [broken, ScrapeTarget(url=f"{exporter}/vllm", endpoint_id="e2")], interval_s=0.05,
                      timeout_s=1.0)
    _run_for_three_scrapes(scraper)
    assert scraper.scrapes >= 3 and scraper.failures >= 3
    assert store.reading("e2").values[QUEUE_WAITING] == 4.0


def test_status_reports_each_failing_target_and_its_last_error(exporter: str) -> None:
    scraper = Scraper(TelemetryStore({"e1": "n1"}), [ScrapeTarget(url=f"{exporter}/vllm", endpoint_id="e1"),
                                                     ScrapeTarget(url=f"{exporter}/gone", endpoint_id="e1")])
    with httpx.Client(timeout=1.0) as client:
        scraper.scrape_once(client)
        scraper.scrape_once(client)
    status = scraper.status()
    assert (status["targets"], status["scrapes"], status["failures"], status["running"]) == (2, 2, 2, False)
    failing = status["failing"]
    assert isinstance(failing, dict) and list(failing) == [f"{exporter}/gone"]
    assert failing[f"{exporter}/gone"]["in_a_row"] == 2 and "404" in failing[f"{exporter}/gone"]["error"]


def test_a_body_trickled_past_the_timeout_fails_the_scrape_and_values_keep_the_scrapes_start(exporter: str) -> None:
    """httpx's timeout bounds each read: each byte came within it, so the scrape used to take 4 s and
    stamp the value when the body ended. It is bounded as a whole now, and stamped at its start."""
    store = TelemetryStore({"e1": "n1"})
    scraper = Scraper(store, [ScrapeTarget(url=f"{exporter}/trickle", endpoint_id="e1")], timeout_s=0.5)
    began = time.monotonic()
    with httpx.Client(timeout=0.5) as client:
        scraper.scrape_once(client)
    assert time.monotonic() - began < 1.5 and scraper.failures == 1
    assert "not read whole within 0.5 s" in scraper.status()["failing"][f"{exporter}/trickle"]["error"]  # type: ignore[index]
    assert QUEUE_WAITING not in store.reading("e1").values
    clock = [1000.0]
    store = TelemetryStore({"e1": "n1"}, clock=lambda: clock[0])
    scraper = Scraper(store, [ScrapeTarget(url=f"{exporter}/vllm", endpoint_id="e1")], timeout_s=2.0)

    class _Ticking(httpx.Client):  # the store's clock moves on while the body arrives
        def stream(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
            clock[0] += 30.0
            return super().stream(*args, **kwargs)  # type: ignore[arg-type]

    with _Ticking(timeout=2.0) as client:
        scraper.scrape_once(client)
    assert scraper.failures == 0
    assert store.reading("e1").ages_s[QUEUE_WAITING] >= 30.0  # stamped before the request, not after
