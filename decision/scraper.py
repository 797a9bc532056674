"""Scrape Prometheus endpoints (dcgm-exporter, vLLM, Triton) into the telemetry store."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import httpx

from decision.config import ScrapeTarget
from decision.telemetry import TelemetryStore

log = logging.getLogger("infermesh.scraper")


class Scraper:
    """Polls each target every ``interval_s`` with a per-request timeout; failures are counted, not fatal.

    A target that stops answering simply stops refreshing its values, which then age past the
    staleness limit and count as unknown: the decision sees the outage as missing telemetry.
    A scrape whose text gives a kept series a negative or infinite value still succeeds: the store
    drops those samples, logs them and counts them in ``store.rejected`` (there is no caller to
    refuse, unlike ``PushTelemetry``). Every value is stamped with the scrape's own time, never
    one from the exporter, so a scraped value cannot be stamped in the future.
    """

    def __init__(self, store: TelemetryStore, targets: Sequence[ScrapeTarget], *, interval_s: float = 5.0,
                 timeout_s: float = 2.0) -> None:
        self.store = store
        self.targets = tuple(targets)
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.failures = 0
        self.scrapes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def scrape_once(self, client: httpx.Client) -> int:
        samples = 0
        for t in self.targets:
            try:
                resp = client.get(t.url)
                resp.raise_for_status()
                samples += self.store.ingest_exposition(resp.text, node_id=t.node_id, endpoint_id=t.endpoint_id)
                self.scrapes += 1
            except (httpx.HTTPError, ValueError) as exc:
                self.failures += 1
                log.warning("scrape of %s failed: %s", t.url, exc)
        return samples

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout_s) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                self.scrape_once(client)
                self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - started)))

    def start(self) -> None:
        if self.targets and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="telemetry-scraper", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 1)
