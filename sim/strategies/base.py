"""The contract every routing strategy implements, and the view of the world it routes on."""

from __future__ import annotations

import numpy as np

from sim.model import Request
from sim.rules import breaks_rules
from sim.telemetry_view import TelemetryView
from sim.world import I64, World


class RouterView:
    """What a router can know: static fleet data, stale telemetry, and its own outstanding counts.

    ``outstanding`` is exact because the router itself dispatches the requests and sees their
    responses end: a copy counts from its dispatch until the router learns it ended (the engine drops
    it when the response's end reaches the client, at whose edge the router sits, as an outcome
    report would reach it; not when the endpoint finished, half an RTT before). Everything in
    ``tele`` is sampled and late.
    """

    def __init__(self, world: World, tele: TelemetryView, seed: int, flat_limit: int = 4096) -> None:
        self.world = world
        self.tele = tele
        self.outstanding = np.zeros(world.n)
        self.now = 0.0
        self.rng = np.random.default_rng(seed)
        self.flat_limit = flat_limit
        self._cell_load: dict[str, np.ndarray] = {}

    def ranks_cells(self, family: str) -> bool:
        """Whether :meth:`candidates` searches ``family`` by cell, ranking cells by :attr:`outstanding`.

        Parameters
        ----------
        family
            A model family the fleet serves.

        Returns
        -------
        bool
            True when the family has more than ``flat_limit`` endpoints.
        """
        return len(self.world.by_family[family]) > self.flat_limit

    def candidates(self, req: Request, family: str) -> I64:
        """Endpoints serving ``family``; above ``flat_limit`` a hierarchical search narrows them.

        Hierarchical search: the family's endpoints are grouped into cells of nearby endpoints;
        sample up to four cells in the client's region (anywhere when it has none), keep the two
        whose outstanding load per slot is lowest, and offer their endpoints.
        """
        w = self.world
        full = w.by_family[family]
        if len(full) <= self.flat_limit:
            return full
        cells = w.cells[family]
        local = w.cells_by_region[family].get(req.region) or list(range(len(cells)))
        pick = self.rng.choice(len(local), size=min(4, len(local)), replace=False)
        chosen = [local[int(i)] for i in pick]
        load = [float(self.outstanding[cells[c]].sum() / w.conc[cells[c]].sum()) for c in chosen]
        best = [c for _, c in sorted(zip(load, chosen, strict=True))[:2]]
        return np.concatenate([cells[c] for c in best])

    def jitter(self, n: int) -> np.ndarray:
        """Tiny random tie-breakers, so equal scores do not all pile onto the first endpoint."""
        return self.rng.random(n) * 1e-9


class Strategy:
    """A routing strategy. Subclasses override :meth:`choose` and, if they learn, the hooks."""

    name = "strategy"
    hedge_fraction = 0.0  # hedge after this fraction of the TTFT target (0: never)
    needs_store = False  # wants telemetry in a TelemetryStore (the infermesh strategy)
    # Decides in worker processes (the pipeline: ``serve --workers N``): the engine queues each
    # request at its worker and sets ``Request.worker``; the others decide as one router of
    # unlimited throughput (their 1-60 µs decision time is added as delay, never queued).
    modelled_workers = False
    workers = 1
    sync_interval_s = 0.0  # > 0: the engine calls :meth:`sync` for each worker this often
    # Reads ``RouterView.outstanding`` when it decides: the engine then drops a copy's count when the
    # router learns the copy ended (an event), not when the endpoint finished.
    reads_outstanding = False

    def bind(self, view: RouterView) -> None:
        self.view = view

    def set_workers(self, n: int) -> None:
        """Decide in ``n`` workers (called before :meth:`bind`; only where ``modelled_workers``).

        Parameters
        ----------
        n
            Decision worker processes, at least 1.
        """
        self.workers = n

    def sync(self, worker: int) -> None:
        """Worker ``worker``'s periodic state exchange with the others (none by default).

        Parameters
        ----------
        worker
            The worker's index, ``0 <= worker < workers``.
        """

    @property
    def hears_outcomes(self) -> bool:
        """Whether :meth:`on_complete` does anything (without decision workers the engine schedules outcome
        reports only then)."""
        return type(self).on_complete is not Strategy.on_complete

    def narrow(self, req: Request, cands: I64) -> I64:
        """The candidates the strategy decides among, before it decides: the simulator's own work.

        The engine calls this outside the timed decision, so it is never charged as decision time;
        only :meth:`choose` (or :meth:`hedge_target`) over what it returns is. By default every candidate.

        Parameters
        ----------
        req
            The request about to be decided.
        cands
            Endpoint indices the router view offers.

        Returns
        -------
        numpy.ndarray
            The endpoint indices :meth:`choose` is then given.
        """
        return cands

    def choose(self, req: Request, cands: I64) -> int:
        """The endpoint index to send ``req`` to, or -1 to drop it (set ``req.drop_reason``)."""
        raise NotImplementedError

    def hedge_target(self, req: Request, cands: I64, exclude: int) -> int:
        """Where a hedge copy goes; by default the strategy's choice among the others."""
        rest = cands[cands != exclude]
        return self.choose(req, rest) if len(rest) else -1

    def on_dispatch(self, req: Request, node: int) -> None:
        """Called once per copy sent."""

    def on_complete(self, req: Request, node: int, ok: bool) -> None:
        """Called when a request's response ends (or it fails)."""


class Guarded(Strategy):
    """A strategy routing only where the hard rules allow (:mod:`sim.rules`): ``NAME+guard``.

    The peers route among every endpoint of the family, as they do in their own designs; this
    variant gives one the same hard constraints InferMesh keeps, so the two can be compared on
    equal terms. A request no allowed endpoint serves is dropped (``no allowed endpoint``).

    The rule filter is :meth:`narrow`, which the engine runs outside the timed decision: it is the
    simulator's own reading of the rules (a Python loop over every candidate), not the guard a
    deployment of the peer would run, so it is not charged; the peer's choice among the allowed
    endpoints is (measured, as unguarded). :meth:`choose` and :meth:`hedge_target` expect
    candidates :meth:`narrow` returned.
    """

    def __init__(self, inner: Strategy) -> None:
        self.inner = inner
        self.name = f"{inner.name}+guard"
        self.hedge_fraction = inner.hedge_fraction
        self.needs_store = inner.needs_store
        self.reads_outstanding = inner.reads_outstanding

    def bind(self, view: RouterView) -> None:
        self.view = view
        self.inner.bind(view)

    def _allowed(self, req: Request, cands: I64) -> I64:
        w = self.view.world
        return cands[[not breaks_rules(w, req, int(c)) for c in cands]] if len(cands) else cands

    @property
    def hears_outcomes(self) -> bool:
        return self.inner.hears_outcomes

    def narrow(self, req: Request, cands: I64) -> I64:
        """The candidates the hard rules allow for ``req`` (see the class: not charged as decision time)."""
        return self._allowed(req, self.inner.narrow(req, cands))

    def choose(self, req: Request, cands: I64) -> int:
        if not len(cands):
            req.drop_reason = "no allowed endpoint"
            return -1
        return self.inner.choose(req, cands)

    def hedge_target(self, req: Request, cands: I64, exclude: int) -> int:
        return self.inner.hedge_target(req, cands, exclude)

    def on_dispatch(self, req: Request, node: int) -> None:
        self.inner.on_dispatch(req, node)

    def on_complete(self, req: Request, node: int, ok: bool) -> None:
        self.inner.on_complete(req, node, ok)
