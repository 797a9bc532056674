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

    A failing target is warned about when it starts failing or its error changes, and noted when it
    answers again, not every interval. A target that stops answering simply stops refreshing its
    values, which then age past the staleness limit and count as unknown: the decision sees the
    outage as missing telemetry.
    A scrape must be read whole within ``timeout_s`` (body included) and ``max_bytes``.
    A scrape whose text gives a kept series a negative or infinite value still succeeds: the store
    drops those samples, logs them and counts them in ``store.rejected`` (there is no caller to
    refuse, unlike ``PushTelemetry``). Every value is stamped with the scrape's own time, or the
    older timestamp its lines carry (a federation endpoint), never a later one, so a scraped value
    cannot be stamped in the future. The scrape's time is when it began: a slow body cannot make
    what the exporter rendered look fresher than it is.
    """

    def __init__(self, store: TelemetryStore, targets: Sequence[ScrapeTarget], *, interval_s: float = 5.0,
                 timeout_s: float = 2.0, max_bytes: int = 8 << 20) -> None:
        self.store = store
        self.targets = tuple(targets)
        self.interval_s = interval_s
        self.timeout_s = timeout_s  # for a whole scrape, body included
        self.max_bytes = max_bytes
        self.failures = 0
        self.scrapes = 0
        self._failing: dict[str, tuple[str, int]] = {}  # url -> (last error, failures in a row)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def scrape_once(self, client: httpx.Client) -> int:
        samples = 0
        for t in self.targets:
            try:
                started = self.store.now()  # what the exporter rendered is at least this old
                text = self._fetch(client, t.url)
                samples += self.store.ingest_exposition(text, node_id=t.node_id, endpoint_id=t.endpoint_id,
                                                        ts=started)
                self.scrapes += 1
            except Exception as exc:  # one target's failure, whatever it is, must not stop the others
                self.failures += 1
                self._failed(t.url, str(exc) or type(exc).__name__)
            else:
                self._answered(t.url)
        return samples

    def _fetch(self, client: httpx.Client, url: str) -> str:
        """The exposition at ``url``, read whole within ``timeout_s`` and ``max_bytes``.

        httpx's timeout bounds each socket read, not the response: an exporter trickling its body
        would hold the scrape (and every target after it) as long as it liked.
        """
        deadline = time.monotonic() + self.timeout_s
        with client.stream("GET", url) as resp:
            resp.raise_for_status()
            body = bytearray()
            for chunk in resp.iter_bytes():
                body += chunk
                if len(body) > self.max_bytes:
                    raise ValueError(f"exposition larger than {self.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"body not read whole within {self.timeout_s:g} s")
            return body.decode(resp.encoding or "utf-8", errors="replace")

    def _failed(self, url: str, error: str) -> None:
        """Warn when a target starts failing or fails differently; the same failure again is debug only
        (a dead exporter would otherwise log a warning every interval until someone fixes it)."""
        last, count = self._failing.get(url, ("", 0))
        self._failing[url] = (error, count + 1)
        if error != last:
            log.warning("scrape of %s failed: %s (warned again only if the error changes)", url, error)
        else:
            log.debug("scrape of %s failed again (%d in a row): %s", url, count + 1, error)

    def _answered(self, url: str) -> None:
        failed = self._failing.pop(url, None)
        if failed is not None:
            log.info("scrape of %s succeeded again after %d failure(s)", url, failed[1])

    def status(self) -> dict[str, object]:
        """For ``/healthz``: targets, counts, and each failing target's last error and failures in a row."""
        failing = dict(self._failing)  # a copy: the scraper thread replaces entries while this reads
        return {"targets": len(self.targets), "scrapes": self.scrapes, "failures": self.failures,
                "running": self._thread is not None and self._thread.is_alive(),
                "failing": {url: {"error": error, "in_a_row": count} for url, (error, count) in failing.items()}}

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
