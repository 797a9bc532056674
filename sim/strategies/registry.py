"""One registry of simulator strategies: name -> factory(seed)."""

from __future__ import annotations

from collections.abc import Callable

from sim.strategies.base import Guarded, Strategy
from sim.strategies.classic import (
    AdaptiveMesh,
    BaselineRoundRobin,
    Heuristic,
    HybridMesh,
    Mesh,
    MeshHedge,
    PredictiveMesh,
)
from sim.strategies.infermesh import DEFAULT_SHORTLIST, InferMesh
from sim.strategies.peers import GieLike, LeastLoad, PowerOfTwo

Factory = Callable[[int], Strategy]

STRATEGIES: dict[str, Factory] = {
    "baseline_rr": lambda seed: BaselineRoundRobin(),
    "heuristic": lambda seed: Heuristic(),
    "mesh": lambda seed: Mesh(),
    "mesh_hedge": lambda seed: MeshHedge(),
    "adaptive_mesh": lambda seed: AdaptiveMesh(),
    "predictive_mesh": lambda seed: PredictiveMesh(),
    "hybrid_mesh": lambda seed: HybridMesh(),
    "least_load": lambda seed: LeastLoad(),
    "power_of_two": lambda seed: PowerOfTwo(),
    "gie_like": lambda seed: GieLike(),
    "infermesh": lambda seed: InferMesh("linucb", seed=seed),
}


def _vw_available() -> bool:
    try:
        import vowpalwabbit  # noqa: F401

        import bench.vw_peer  # type: ignore[import-not-found,unused-ignore]  # noqa: F401
    except ImportError:
        return False
    return True


def available() -> tuple[str, ...]:
    names = list(STRATEGIES)
    if _vw_available():
        names.append("vw_peer")
    return tuple(names)


def runs_the_pipeline(name: str) -> bool:
    """Whether strategy ``name`` is the real decision pipeline (``infermesh``, ``infermesh:...``,
    ``vw_peer``): it keeps the guardrails itself and takes several times a peer's wall time."""
    return name.startswith("infermesh") or name == "vw_peer"


def make(name: str, seed: int) -> Strategy:
    """Build a strategy; ``infermesh:LEARNER`` runs the pipeline with another registered learner, and
    ``NAME+guard`` routes a peer only where the hard rules allow (:class:`~sim.strategies.base.Guarded`).

    Hyperparameters follow the learner's name, ``/``-separated (``--strategies`` splits on commas):
    ``infermesh:linucb/alpha=0.5/safe_slack=0.25``; values are parsed as JSON. ``shortlist=N``,
    ``added_delay=W``, ``cost_ms=W`` and ``routers=N`` are the strategy's own, not the learner's
    (endpoints offered to the engine per decision, default ``DEFAULT_SHORTLIST``; the engine's
    ``added_delay_weight``, ``cost_weight_ms`` and ``routers``, by default the scenario's
    ``decision`` section's, else the engine's; ``routers`` defaults to the workers, as in ``serve``).
    """
    if name.startswith("infermesh:"):
        from learners.registry import parse_spec

        learner, *items = name.split(":", 1)[1].split("/")
        _, params = parse_spec(f"{learner}:{','.join(items)}")
        # shortlist (endpoints offered per decision), added_delay and cost_ms (the engine's
        # added_delay_weight and cost_weight_ms) are the strategy's own, not the learner's.
        shortlist = int(params.pop("shortlist", DEFAULT_SHORTLIST))
        # Unset: the scenario's decision section, else the engine's defaults (sim.runner applies them).
        added_delay = float(params.pop("added_delay")) if "added_delay" in params else None
        cost_ms = float(params.pop("cost_ms")) if "cost_ms" in params else None
        routers = int(params.pop("routers")) if "routers" in params else None
        return InferMesh(learner, seed=seed, label=name, params=params, shortlist=shortlist, added_delay=added_delay,
                         cost_weight_ms=cost_ms, routers=routers)
    if name == "vw_peer":
        if not _vw_available():
            raise ValueError("strategy 'vw_peer' needs Vowpal Wabbit: pip install -e '.[dev]' (the vowpalwabbit wheel)")
        return _vw_strategy(seed)
    if name.endswith("+guard"):
        inner = name.removesuffix("+guard")
        if runs_the_pipeline(inner):
            raise ValueError(f"{name!r}: {inner} keeps the guardrails itself")
        return Guarded(make(inner, seed))
    f = STRATEGIES.get(name)
    if f is None:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(available())}, NAME+guard, "
                         "infermesh:LEARNER[/key=value...]")
    return f(seed)


def check(names: list[str]) -> None:
    """Refuse an empty list, empty or duplicate names and any name :func:`make` cannot build, before a run.

    ``infermesh:LEARNER/key=value`` builds its learner here too: the learner's name and parameters
    are otherwise only checked when the run binds the strategy, after the other strategies ran.

    Raises
    ------
    ValueError
        Naming the offending strategy.
    """
    if not names:
        raise ValueError("no strategies to run")
    seen: set[str] = set()
    for name in names:
        if not name:
            raise ValueError("empty strategy name (two commas, or a trailing comma?)")
        if name in seen:
            raise ValueError(f"strategy {name!r} given twice")
        seen.add(name)
        try:
            strat = make(name, 0)
            inner = strat.inner if isinstance(strat, Guarded) else strat
            if isinstance(inner, InferMesh) and inner._make is None:
                from sim.strategies.infermesh import default_learner

                default_learner(inner.learner_name, 0, inner.params, inner.cost_weight_ms)
        except (ValueError, TypeError, KeyError) as exc:
            msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            raise ValueError(msg if name in msg else f"strategy {name!r}: {msg}") from None


def _vw_strategy(seed: int) -> Strategy:
    """The pipeline with the Vowpal Wabbit learner (bench/vw_peer.py registers it) instead of ours."""
    import bench.vw_peer  # noqa: F401  # type: ignore[import-not-found,unused-ignore]

    return InferMesh("vw-cb-explore-adf", seed=seed, label="vw_peer")
