"""decision._kernels (C) against a numpy transcription of the formulas in decision/scoring.py,
learners/features.py and learners/_linear.py, on random inputs with unknown (NaN), infinite and
zero values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decision import _kernels
from decision.domain import Estimates, RequestContext
from decision.scoring import BYTES_PER_TOKEN, COLUMN, ESTIMATE_ROWS
from decision.telemetry import (
    CANONICAL,
    FB_FREE_MIB,
    FB_USED_MIB,
    GPU_TEMP_C,
    GPU_UTIL,
    KV_CACHE_USAGE,
    POWER_W,
    QUEUE_RUNNING,
    QUEUE_WAITING,
)
from learners.features import BASE_NAMES, RouteFeatures

F = np.ndarray
K = len(CANONICAL)


def reference_estimates(static: F, tel: F, rtt: F, egress: F | None, ledger: F | None, in_tok: int, out_tok: int,
                        unknown_load: float, now: float, window: float, weight: float,
                        cost_weight: float) -> dict[str, F]:
    conc, prefill_tps, decode_tps, cold_ms, nominal, batch_half = static.T
    with np.errstate(all="ignore"):
        inflight = backlog = slowness = None
        rate: F | float = 0.0
        if ledger is not None:  # decision/ledger.py's state rows, as EndpointLedger.columns reads them
            inflight, due, log_slow, rate_raw, rate_at = ledger
            backlog = np.maximum(due - now, 0.0) * 1000.0
            slowness = np.exp(log_slow)
            rate = rate_raw * np.exp(np.minimum(rate_at - now, 0.0) / window)
        running = tel[:, COLUMN[QUEUE_RUNNING]]
        running = np.where(np.isnan(running), unknown_load * conc, running)
        waiting = tel[:, COLUMN[QUEUE_WAITING]]
        waiting = np.where(np.isnan(waiting), unknown_load * conc * 0.25, waiting)
        kv = tel[:, COLUMN[KV_CACHE_USAGE]]
        kv = np.where(np.isnan(kv), unknown_load, kv)
        if inflight is not None:
            running = np.maximum(running, np.minimum(inflight, conc))
            waiting = np.maximum(waiting, inflight - conc)
        slow = 1.0 if slowness is None else slowness
        prefill_s = slow * in_tok / prefill_tps
        full_rate = np.where(batch_half > 0.0, decode_tps / (1.0 + (conc - 1.0) / batch_half), decode_tps)
        service_s = prefill_s + slow * out_tok / full_rate
        ahead = waiting + np.maximum(running + 1.0 - conc, 0.0)
        queue_ms = 1000.0 * service_s * ahead / conc
        queue_ms = queue_ms + 1000.0 * service_s * np.maximum(kv - 0.9, 0.0) * 10.0
        if backlog is not None:
            queue_ms = queue_ms + backlog
        prefill_ms = 1000.0 * prefill_s * (1.0 + running / conc)
        ttft = queue_ms + prefill_ms + rtt + cold_ms
        added = weight * prefill_ms * rate * ((0.0 if backlog is None else backlog) + prefill_ms) / 1000.0
        cost = nominal
        if egress is not None:
            cost = nominal + egress * ((in_tok + out_tok) * BYTES_PER_TOKEN / 1e9 * 1000.0 / out_tok)
    return {"ttft_ms": ttft, "cost_per_1k": cost, "queue_ms": queue_ms, "prefill_ms": prefill_ms,
            "cold_start_ms": cold_ms, "running": running, "waiting": waiting, "kv_cache_usage": kv,
            "added_delay_ms": added + np.zeros_like(ttft), "cost_penalty_ms": cost_weight * cost * 1000.0,
            "rank_ms": ttft + added + cost_weight * cost * 1000.0}


def _clip(x: F, lo: float, hi: float) -> F:
    return np.asarray(np.minimum(np.maximum(x, lo), hi))


def reference_features(fb: RouteFeatures, ctx: RequestContext, S: F, regions: F, est: Estimates) -> F:
    """The module docstring's table of learners/features.py, column by column, in numpy."""
    n = len(S)
    col = {name: i for i, name in enumerate(CANONICAL)}
    tel = est.telemetry
    target = ctx.ttft_target_ms if ctx.ttft_target_ms > 0 else fb.default_target_ms
    budget = ctx.max_cost_per_1k_tokens if ctx.max_cost_per_1k_tokens > 0 else fb.cost_ref
    log_tokens = math.log1p(32768.0)
    size_in = min(max(math.log1p(max(0, ctx.estimated_input_tokens)) / log_tokens, 0.0), 1.5)
    size_out = min(max(math.log1p(max(0, ctx.expected_output_tokens)) / log_tokens, 0.0), 1.5)
    X = np.empty((n, len(fb.names)))
    with np.errstate(all="ignore"):
        T = np.empty((n, 6))
        T[:, 0] = _clip(tel[:, col[KV_CACHE_USAGE]], 0.0, 1.0)
        T[:, 1] = _clip(tel[:, col[GPU_UTIL]] / 100.0, 0.0, 1.0)
        used, free = tel[:, col[FB_USED_MIB]], tel[:, col[FB_FREE_MIB]]
        total = used + free
        T[:, 2] = np.where(total > 0, _clip(used / total, 0.0, 1.0), np.nan)
        T[:, 4] = np.where(S[:, 9] > 0, _clip(tel[:, col[POWER_W]] / S[:, 9], 0.0, 1.5), np.nan)
        T[:, 3] = _clip((tel[:, col[GPU_TEMP_C]] - 30.0) / 60.0, 0.0, 1.5)
        T[:, :5] = np.where(np.isnan(T[:, :5]), 0.5, T[:, :5])
        T[:, 5] = np.isnan(tel).all(axis=1)
        ttft_r = _clip(est.ttft_ms / target, 0.0, 5.0)
        queue_r = _clip(est.queue_ms / target, 0.0, 5.0)
        X[:, 0] = 1.0
        X[:, 1] = ttft_r
        X[:, 2] = queue_r
        X[:, 3] = _clip(est.rtt_ms / target, 0.0, 5.0)
        X[:, 4:9] = T[:, :5]
        X[:, 9] = _clip(est.max_age_s / fb.stale_after_s, 0.0, 1.0)
        X[:, 10] = T[:, 5]
        X[:, 11] = S[:, 0]
        from learners.features import stable_bucket

        session = stable_bucket(ctx.session_id, fb.affinity_buckets) if ctx.session_id else -1
        X[:, 12] = S[:, 10] == session
        X[:, 13] = (regions == ctx.client_region) if ctx.client_region else 0.0
        X[:, 14:22] = S[:, 1:9]
        X[:, 22] = _clip(est.cost_per_1k / budget, 0.0, 5.0)
        X[:, 23] = size_in
        X[:, 24] = size_out
        X[:, 25:29] = [1.0 if ctx.modality == m else 0.0 for m in ("text", "image", "multimodal", "embedding")]
        X[:, 29] = ttft_r * size_in
        X[:, 30] = queue_r * X[:, 4]
        X[:, 31] = S[:, 2] * size_in
        X[:, 32:] = S[:, 11:]
    return X


def _values(rng: np.random.Generator, shape: tuple[int, ...], scale: float, p_nan: float) -> F:
    x = rng.uniform(0.0, scale, shape)
    special = rng.random(shape)
    x[special < p_nan] = np.nan
    x[(special >= p_nan) & (special < p_nan + 0.03)] = 0.0
    x[(special >= p_nan + 0.03) & (special < p_nan + 0.04)] = np.inf
    return x


def _world(seed: int, n: int) -> tuple[F, F, F, F, F]:
    rng = np.random.default_rng(seed)
    static = np.column_stack([rng.integers(0, 64, n).astype(float), rng.uniform(0, 20000, n),
                              rng.uniform(0, 200, n), rng.choice([0.0, 800.0], n), rng.uniform(0, 0.01, n),
                              rng.choice([0.0, 4.0, 72.0], n)])
    tel = _values(rng, (n, K), 120.0, 0.2)
    tel[rng.random(n) < 0.2] = np.nan  # endpoints with nothing known
    rtt = rng.uniform(0, 300, n)
    egress = rng.uniform(0, 0.12, n)
    # An own-traffic ledger's state at now=1000: in flight, prefill due (past, soon, never), log
    # slowness, arrival rate and when it was last counted.
    ledger = np.ascontiguousarray(np.vstack([
        rng.integers(0, 80, n).astype(float), rng.choice([-np.inf, 999.0, 1000.035, 1000.9], n),
        np.log(rng.choice([0.5, 1.0, 2.7], n)), rng.choice([0.0, 0.2, 13.0], n), rng.choice([0.0, 990.0, 1000.0], n)]))
    return static, tel, rtt, egress, ledger


def _assert_same(got: F, want: F) -> None:
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=0.0)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 70), in_tok=st.integers(1, 40000),
       out_tok=st.integers(1, 4000), with_egress=st.booleans(), with_ledger=st.booleans(),
       cost_weight=st.sampled_from([0.0, 750.0]))
def test_estimate_matches_the_numpy_formulas(seed: int, n: int, in_tok: int, out_tok: int, with_egress: bool,
                                             with_ledger: bool, cost_weight: float) -> None:
    static, tel, rtt, egress, ledger = _world(seed, n)
    out = np.empty((len(ESTIMATE_ROWS), n))
    eg = egress if with_egress else None
    led = ledger if with_ledger else None
    _kernels.estimate(static, tel, rtt, eg, led, K, COLUMN[QUEUE_RUNNING], COLUMN[QUEUE_WAITING],
                      COLUMN[KV_CACHE_USAGE], float(in_tok), float(out_tok), 0.5,
                      (in_tok + out_tok) * BYTES_PER_TOKEN / 1e9 * 1000.0 / out_tok, 1000.0, 5.0, 0.5, cost_weight, out)
    want = reference_estimates(static, tel, rtt, eg, led, in_tok, out_tok, 0.5, 1000.0, 5.0, 0.5, cost_weight)
    for name, row in zip(ESTIMATE_ROWS, out, strict=True):
        _assert_same(row, want[name])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 70), buckets=st.sampled_from([0, 3, 8]),
       target=st.sampled_from([0.0, 200.0, 1500.0]), budget=st.sampled_from([0.0, 0.0004]),
       in_tok=st.integers(-5, 60000), out_tok=st.integers(0, 4000),
       session=st.sampled_from(["", "s1", "s-42"]), region=st.sampled_from(["", "eu-west", "us-east"]),
       modality=st.sampled_from(["text", "image", "multimodal", "embedding", "audio"]))
def test_route_features_match_the_documented_table(seed: int, n: int, buckets: int, target: float, budget: float,
                                                   in_tok: int, out_tok: int, session: str, region: str,
                                                   modality: str) -> None:
    rng = np.random.default_rng(seed)
    fb = RouteFeatures(site_buckets=buckets, affinity_buckets=4)
    S = np.zeros((n, 11 + buckets))
    S[:, 0] = rng.integers(0, 2, n)
    if n:
        S[np.arange(n), 1 + rng.integers(0, 3, n)] = 1.0
        S[np.arange(n), 4 + rng.integers(0, 5, n)] = 1.0
        if buckets:
            S[np.arange(n), 11 + rng.integers(0, buckets, n)] = 1.0
    S[:, 9] = rng.choice([0.0, 350.0, 5600.0], n)
    S[:, 10] = rng.integers(0, 4, n)
    regions = rng.choice(np.array(["eu-west", "us-east", "ap-south"]), n)
    tel = _values(rng, (n, K), 120.0, 0.25)
    tel[rng.random(n) < 0.2] = np.nan
    est = Estimates(_values(rng, (n,), 4000.0, 0.05), _values(rng, (n,), 0.004, 0.0), _values(rng, (n,), 3000.0, 0.0),
                    rng.uniform(0, 400, n), tel, np.where(rng.random(n) < 0.2, np.inf, rng.uniform(0, 60, n)))
    ctx = RequestContext("r", "t", ttft_target_ms=target, max_cost_per_1k_tokens=budget,
                         estimated_input_tokens=in_tok, expected_output_tokens=out_tok, session_id=session,
                         client_region=region, modality=modality)
    got = np.empty((n, len(fb.names)))
    same = (regions == region).astype(float) if region else np.zeros(n)
    session_bucket = -1
    if session:
        from learners.features import stable_bucket

        session_bucket = stable_bucket(session, fb.affinity_buckets)
    cols = (K, COLUMN[KV_CACHE_USAGE], COLUMN[GPU_UTIL], COLUMN[FB_USED_MIB], COLUMN[FB_FREE_MIB], COLUMN[POWER_W],
            COLUMN[GPU_TEMP_C])
    modalities = ("text", "image", "multimodal", "embedding")
    log_tokens = math.log1p(32768.0)
    _kernels.route_features(S, tel, est.ttft_ms, est.queue_ms, est.cost_per_1k, est.rtt_ms, est.max_age_s, same, got,
                            *cols, session_bucket, modalities.index(modality) if modality in modalities else -1,
                            buckets, target if target > 0 else fb.default_target_ms,
                            budget if budget > 0 else fb.cost_ref,
                            min(max(math.log1p(max(0, in_tok)) / log_tokens, 0.0), 1.5),
                            min(max(math.log1p(max(0, out_tok)) / log_tokens, 0.0), 1.5), fb.stale_after_s)
    want = reference_features(fb, ctx, S, regions, est)
    assert got.shape == (n, len(BASE_NAMES) + buckets)
    _assert_same(got, want)


def test_kernels_refuse_wrong_shapes_and_strided_arrays() -> None:
    static, tel, rtt, egress, ledger = _world(1, 8)
    out = np.empty((len(ESTIMATE_ROWS), 8))
    args = (K, COLUMN[QUEUE_RUNNING], COLUMN[QUEUE_WAITING], COLUMN[KV_CACHE_USAGE], 100.0, 10.0, 0.5, 4.4e-5,
            1000.0, 5.0, 0.5, 0.0)
    with pytest.raises(ValueError, match="numbers"):
        _kernels.estimate(static[:7], tel, rtt, None, None, *args, out)
    with pytest.raises(ValueError, match="out"):
        _kernels.estimate(static, tel, rtt, None, None, *args, out[:, :7].copy())
    with pytest.raises(ValueError, match="egress"):
        _kernels.estimate(static, tel, rtt, egress[:3], None, *args, out)
    with pytest.raises(ValueError, match="ledger"):
        _kernels.estimate(static, tel, rtt, None, ledger[:, :5].copy(), *args, out)
    with pytest.raises(ValueError, match="column"):
        _kernels.estimate(static, tel, rtt, None, None, K, K, 0, 0, 100.0, 10.0, 0.5, 4.4e-5, 1000.0, 5.0, 0.5, 0.0,
                          out)
    with pytest.raises((ValueError, BufferError)):
        _kernels.estimate(static, tel, rtt, None, ledger[:, ::2], *args, out[:, :4].copy())  # a strided view
    with pytest.raises((ValueError, BufferError)):
        _kernels.estimate(np.asfortranarray(static), tel, rtt, None, None, *args, out)  # not C-contiguous
    with pytest.raises((ValueError, BufferError, TypeError)):
        out.setflags(write=False)
        _kernels.estimate(static, tel, rtt, None, None, *args, out)  # read-only output


def _telemetry(seed: int, n: int) -> tuple[F, F, float]:
    rng = np.random.default_rng(seed)
    at = 1_000.0
    stamps = at - rng.choice([0.0, 0.4, 2.5, 29.9, 30.0, 30.1, 95.0], (n, K))
    stamps[rng.random((n, K)) < 0.3] = np.nan  # never reported
    stamps[rng.random(n) < 0.15] = np.nan  # an endpoint that never reported anything
    values = np.where(np.isnan(stamps), np.nan, rng.uniform(0, 100, (n, K)))
    return values, stamps, at


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 70), stale=st.sampled_from([0.0, 5.0, 30.0]))
def test_mask_stale_blanks_old_values_and_reports_the_oldest_age(seed: int, n: int, stale: float) -> None:
    values, stamps, at = _telemetry(seed, n)
    want_values = values.copy()
    with np.errstate(invalid="ignore"):
        want_values[(at - stamps) > stale] = np.nan
    oldest = np.fmin.reduce(stamps, axis=1) if n else np.empty(0)
    want_age = np.where(np.isnan(oldest), np.inf, at - oldest)
    age = np.empty(n)
    _kernels.mask_stale(values, stamps, at, stale, age)
    _assert_same(values, want_values)
    np.testing.assert_array_equal(age, want_age)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 70),
       vcols=st.lists(st.integers(0, K - 1), max_size=4), acols=st.lists(st.integers(0, K - 1), max_size=4))
def test_telemetry_block_is_the_values_then_ceiled_ages_with_one_nan(seed: int, n: int, vcols: list[int],
                                                                    acols: list[int]) -> None:
    values, stamps, at = _telemetry(seed, n)
    values[values > 90] = -np.nan  # a NaN of another bit pattern must still come out as the one NaN
    v, a = np.array(vcols, dtype=np.intp), np.array(acols, dtype=np.intp)
    rows = np.concatenate((values[:, v], np.ceil(at - stamps[:, a])), axis=1)
    rows[np.isnan(rows)] = np.nan
    got = _kernels.telemetry_block(values, stamps, K, at, v, a)
    assert got == np.ascontiguousarray(rows).tobytes()
    with pytest.raises(ValueError, match="column"):
        _kernels.telemetry_block(values, stamps, K, at, np.array([K], dtype=np.intp), a)


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=20), width=st.integers(0, 24), seed=st.integers(0, 99))
def test_row_keys_are_the_id_then_the_row(ids: list[int], width: int, seed: int) -> None:
    block = np.random.default_rng(seed).bytes(len(ids) * width)
    keys = _kernels.row_keys(np.array(ids, dtype=np.int64), block, width)
    assert keys == [np.int64(i).tobytes() + block[n * width:(n + 1) * width] for n, i in enumerate(ids)]
    if ids and width:
        with pytest.raises(ValueError, match="block"):
            _kernels.row_keys(np.array(ids, dtype=np.int64), block[:-1], width)


def reference_safe_scores(X: F, ttft: F, theta: F, a_inv: F | None, alpha: float, slack: float,
                          margin: float) -> tuple[F, F]:
    """The linear learners' safe set and scores as numpy would compute them (learners/_linear.py)."""
    n = len(ttft)
    mask = np.ones(n, dtype=bool)
    if slack >= 0 and n >= 2:
        mask = ttft <= ttft.min() * (1.0 + slack) + margin
    mean = X @ theta
    own = mean.copy()
    if a_inv is not None and alpha != 0.0:
        own = mean + alpha * np.sqrt(np.maximum(np.einsum("ij,ij->i", X @ a_inv, X), 0.0))
    if mask.all():
        return own, mask
    low = own[mask].min() - 1.0 - (mean.max() - mean.min())
    scores = mean - mean.max() + low
    scores[mask] = own[mask]
    return scores, mask


@settings(max_examples=120, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 70), d=st.integers(0, 12),
       slack=st.sampled_from([-1.0, 0.0, 0.5, 2.0]), margin=st.sampled_from([0.0, 25.0]),
       alpha=st.sampled_from([0.0, 0.5, 2.0]), ucb=st.booleans())
def test_safe_scores_are_the_linear_learners_safe_set_and_scores(seed: int, n: int, d: int, slack: float,
                                                                  margin: float, alpha: float, ucb: bool) -> None:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    ttft = rng.choice([50.0, 80.0, 120.0, 400.0], size=n) + rng.random(n)
    theta = rng.normal(size=d)
    a = rng.normal(size=(d, d))
    a_inv = np.asarray(np.linalg.inv(a @ a.T + np.eye(d)), dtype=np.float64) if (ucb and d) else None
    want, mask = reference_safe_scores(X, ttft, theta, a_inv, alpha, slack, margin)
    scores, idx = np.empty(n), np.empty(n, dtype=np.intp)
    best, m = _kernels.safe_scores(X, ttft, theta, a_inv, alpha, slack, margin, scores, idx)
    np.testing.assert_array_equal(idx[:m], np.flatnonzero(mask))
    np.testing.assert_allclose(scores, want, rtol=1e-9, atol=1e-9)
    eligible_scores = want[mask]
    assert eligible_scores[best] >= eligible_scores.max() - 1e-9  # numpy's argmax, up to summation order


def test_safe_scores_rejects_no_arms_nan_ttft_and_wrong_sizes() -> None:
    one = np.ones(1)
    with pytest.raises(ValueError, match="no arms"):
        _kernels.safe_scores(np.empty((0, 1)), np.empty(0), one, None, 0.0, 0.5, 0.0, np.empty(0),
                             np.empty(0, dtype=np.intp))
    with pytest.raises(ValueError, match="NaN"):
        _kernels.safe_scores(np.ones((2, 1)), np.array([np.nan, 1.0]), one, None, 0.0, 0.5, 0.0, np.empty(2),
                             np.empty(2, dtype=np.intp))
    with pytest.raises(ValueError, match="a_inv"):
        _kernels.safe_scores(np.ones((2, 1)), np.ones(2), one, np.eye(2), 1.0, 0.5, 0.0, np.empty(2),
                             np.empty(2, dtype=np.intp))


def _ordered_dot(a: np.ndarray, b: np.ndarray) -> float:
    """a . b summed left to right, as the C kernels do (they are built without FP contraction)."""
    acc = 0.0
    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        acc += x * y
    return acc


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40), d=st.integers(1, 10), s=st.integers(1, 64),
       repeat=st.booleans())
def test_thompson_draws_sample_the_eligible_scores_joint_normal_and_count_each_draws_argmax(
        seed: int, n: int, d: int, s: int, repeat: bool) -> None:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    if repeat and n > 2:  # arms with the same features (same site, GPU and load): a rank-deficient B
        X[1] = X[0]
        X[2] = 0.5 * X[0] - X[1] * 0.25
    eligible = np.flatnonzero(rng.random(n) < 0.7)
    if not len(eligible):
        eligible = np.array([n - 1])
    m = len(eligible)
    theta = rng.normal(size=d)
    M = rng.normal(size=(d, d))
    chol = np.linalg.cholesky(np.linalg.inv(M @ M.T + d * np.eye(d)))
    v, z = 0.3, rng.standard_normal((s, m))
    counts, factor = np.zeros(m, dtype=np.intp), np.full((m, m), np.nan)
    first = _kernels.thompson_draws(X, eligible.astype(np.intp), theta, chol, v, z, counts, factor)
    B = X[eligible] @ chol
    # The factor gives the scores' covariance exactly as theta's does: C C^T = B B^T = X_e A^-1 X_e^T.
    np.testing.assert_allclose(factor @ factor.T, B @ B.T, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(np.triu(factor, 1), 0.0)
    # Each draw's scores summed in the kernel's order, so that arms tied in exact arithmetic (the
    # repeated rows) tie here too and numpy's argmax breaks the tie as the kernel does (first wins).
    values = np.array([[_ordered_dot(X[e], theta) + v * _ordered_dot(factor[i, :i + 1], z[r, :i + 1])
                        for r in range(s)] for i, e in enumerate(eligible)])  # eligible x draws
    assert counts.sum() == s
    assert values[first, 0] == values[:, 0].max()
    np.testing.assert_array_equal(counts, np.bincount(np.argmax(values, axis=0), minlength=m))
    with pytest.raises(ValueError, match="eligible index"):
        _kernels.thompson_draws(X, np.array([n], dtype=np.intp), theta, chol, v, z[:, :1].copy(),
                                np.zeros(1, dtype=np.intp), np.empty((1, 1)))
    with pytest.raises(ValueError, match="factor"):
        _kernels.thompson_draws(X, eligible.astype(np.intp), theta, chol, v, z, counts, np.empty(m * m + 1))
