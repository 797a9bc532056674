"""Synthetic workloads: Poisson and MMPP arrivals, log-normal token counts, tenant skew, sessions.

A workload is an iterator of :class:`RequestSpec` in arrival order. Generators draw from their
own seeded ``random.Random``, so a scenario with a seed always produces the same requests
whatever strategy is being measured.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple


class RequestSpec(NamedTuple):
    t: float
    in_tokens: int
    out_tokens: int
    tenant: int
    region: str
    session: str
    hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Tenant:
    """Who sends requests, from where, and under which constraints."""

    name: str
    weight: float = 1.0
    regions: tuple[str, ...] = ()
    jurisdictions: tuple[str, ...] = ()
    data_class: str = "public"
    user_tier: str = "standard"
    ttft_target_ms: float = 1000.0
    session_fraction: float = 0.0
    sessions: int = 200

    def __post_init__(self) -> None:
        for key in ("regions", "jurisdictions"):
            v = getattr(self, key)
            # A plain string would iterate as its characters ("eu-west" -> "e", "u", ...).
            if isinstance(v, str) or not all(isinstance(x, str) for x in v):
                raise ValueError(f"{key}: a list of names, got {v!r}")
        if not (self.weight >= 0.0 and math.isfinite(self.weight)):
            raise ValueError(f"weight: a finite number >= 0, got {self.weight!r}")
        if not self.ttft_target_ms > 0.0:
            raise ValueError(f"ttft_target_ms: must be > 0, got {self.ttft_target_ms!r}")
        if not 0.0 <= self.session_fraction <= 1.0:
            raise ValueError(f"session_fraction: must be in [0, 1], got {self.session_fraction!r}")
        if not 1 <= self.sessions < MAX_SESSIONS:
            raise ValueError(f"sessions: must be in [1, {MAX_SESSIONS}), got {self.sessions!r}")

    @staticmethod
    def from_mapping(m: Mapping[str, Any]) -> Tenant:
        """A tenant from a scenario's mapping; unknown keys and ill-typed values fail, naming the key."""
        unknown = sorted(str(k) for k in m if k not in TENANT_KEYS)
        if unknown:
            raise ValueError(f"unknown key(s) {', '.join(unknown)}; known: {', '.join(TENANT_KEYS)}")
        lists: dict[str, tuple[str, ...]] = {}
        for key in ("regions", "jurisdictions"):
            v = m.get(key, [])
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise ValueError(f"{key}: a list of names (e.g. [eu-west]), got {v!r}")
            lists[key] = tuple(v)
        nums: dict[str, float] = {}
        for key, default in (("weight", 1.0), ("ttft_target_ms", 1000.0), ("session_fraction", 0.0)):
            v = m.get(key, default)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{key}: a number, got {v!r}")
            nums[key] = float(v)
        sessions = m.get("sessions", 200)
        if isinstance(sessions, bool) or not isinstance(sessions, int):
            raise ValueError(f"sessions: an integer, got {sessions!r}")
        return Tenant(name=str(m["name"]), weight=nums["weight"], regions=lists["regions"],
                      jurisdictions=lists["jurisdictions"], data_class=str(m.get("data_class", "public")),
                      user_tier=str(m.get("user_tier", "standard")), ttft_target_ms=nums["ttft_target_ms"],
                      session_fraction=nums["session_fraction"], sessions=sessions)


TENANT_KEYS = ("name", "weight", "regions", "jurisdictions", "data_class", "user_tier", "ttft_target_ms",
               "session_fraction", "sessions")
MAX_SESSIONS = 1 << 40  # session numbers must fit the prefix-block id layout of SyntheticWorkload


def token_sampler(spec: Mapping[str, Any], rng: random.Random) -> tuple[Any, float]:
    """A sampler of token counts and its mean, from ``{dist: lognormal, mu, sigma}`` or ``{dist: const}``."""
    dist = spec.get("dist", "lognormal")
    lo, hi = int(spec.get("min", 1)), int(spec.get("max", 128_000))
    if dist == "lognormal":
        mu, sigma = float(spec["mu"]), float(spec["sigma"])

        def draw() -> int:
            return min(hi, max(lo, int(rng.lognormvariate(mu, sigma))))
        return draw, math.exp(mu + sigma * sigma / 2.0)
    if dist == "const":
        v = int(spec["value"])
        return (lambda: v), float(v)
    raise ValueError(f"unknown token distribution {dist!r}")


def poisson_times(rate: float, duration: float, rng: random.Random) -> Iterator[float]:
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return
        yield t


def mmpp_times(rates: Sequence[float], dwell_s: Sequence[float], duration: float,
               rng: random.Random) -> Iterator[float]:
    """Markov-modulated Poisson: state i lasts Exp(dwell_i) seconds with rate_i, then a random other state."""
    t, state = 0.0, 0
    end = rng.expovariate(1.0 / dwell_s[0])
    while t < duration:
        t += rng.expovariate(rates[state])
        while t >= end:  # crossed into another state: restart the clock there (memoryless)
            t = end
            others = [i for i in range(len(rates)) if i != state] or [state]
            state = rng.choice(others)
            end = t + rng.expovariate(1.0 / dwell_s[state])
            t += rng.expovariate(rates[state])
        if t < duration:
            yield t


def mmpp_mean_factor(rates: Sequence[float], dwell_s: Sequence[float]) -> float:
    """Long-run mean of an MMPP whose next state is uniform among the others (time-weighted)."""
    w = [d for d in dwell_s]
    return sum(r * d for r, d in zip(rates, w, strict=True)) / sum(w)


MAX_PREFIX_BLOCKS = 999  # shared-prefix blocks per session (below the 2**10 of the id layout)


def prefix_block_ids(tenant: int, session: int, blocks: int) -> tuple[int, ...]:
    """Prefix-cache block ids of a session's first ``blocks`` blocks (at most ``MAX_PREFIX_BLOCKS``).

    Unique per (tenant, session, block): the block in the low 10 bits, the session (below
    ``MAX_SESSIONS`` = 2**40) above it, the tenant above that. The earlier decimal layout
    (tenant x 10**7 + session x 1000) let session 10,000 of one tenant reuse the next tenant's ids,
    a cross-tenant cache hit. Only the ids' equality matters, so results are otherwise unchanged.
    """
    base = ((tenant + 1) << 50) | (session << 10)
    return tuple(base + i for i in range(min(blocks, MAX_PREFIX_BLOCKS)))


class SyntheticWorkload:
    """Requests from a scenario's ``workload`` section at a given mean rate."""

    def __init__(self, spec: Mapping[str, Any], tenants: Sequence[Tenant], regions: Sequence[str],
                 rate: float, duration: float, seed: int) -> None:
        kind = spec.get("arrival", {}).get("type", "poisson")
        if kind not in ("poisson", "mmpp"):  # not silently Poisson
            raise ValueError(f"unknown arrival type {kind!r}; known: poisson, mmpp")
        if not (rate > 0.0 and math.isfinite(rate)):
            raise ValueError(f"arrival rate must be a positive number of requests/s, got {rate}")
        self.spec = spec
        self.tenants = tuple(tenants)
        self.regions = tuple(regions)
        self.rate = rate
        self.duration = duration
        self.seed = seed

    def __iter__(self) -> Iterator[RequestSpec]:
        rng = random.Random(self.seed)
        arr = self.spec.get("arrival", {"type": "poisson"})
        if arr.get("type", "poisson") == "mmpp":
            mult = [float(x) for x in arr["rate_multipliers"]]
            dwell = [float(x) for x in arr["dwell_s"]]
            scale = self.rate / mmpp_mean_factor(mult, dwell)
            times = mmpp_times([m * scale for m in mult], dwell, self.duration, rng)
        else:
            times = poisson_times(self.rate, self.duration, rng)
        draw_in, _ = token_sampler(self.spec["input_tokens"], rng)
        draw_out, _ = token_sampler(self.spec["output_tokens"], rng)
        weights = [t.weight for t in self.tenants]
        idx = list(range(len(self.tenants)))
        for t in times:
            ti = rng.choices(idx, weights)[0] if len(idx) > 1 else 0
            ten = self.tenants[ti]
            region = rng.choice(ten.regions or self.regions)
            n_in, n_out = draw_in(), draw_out()
            session, hashes = "", tuple[int, ...]()
            if ten.session_fraction and rng.random() < ten.session_fraction:
                s = rng.randrange(ten.sessions)
                session = f"{ten.name}/s{s}"
                # A conversation's earlier turns form a shared prefix of the prompt.
                shared = int(n_in * rng.uniform(0.5, 0.9)) // 512
                hashes = prefix_block_ids(ti, s, shared)
            yield RequestSpec(t, n_in, n_out, ti, region, session, hashes)
