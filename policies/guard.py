"""``PolicyGuard``: a compiled bundle behind the pipeline's :class:`~decision.contracts.Guard` contract.

Rules run in three ways:

* request-scope rules (quota) once per request; a denial removes every candidate;
* candidate rules that read no state are memoised. Each rule sees only what it declares
  (request fields, endpoint fields, telemetry values, ages in whole seconds), so its verdict is
  a function of those values: the rule's memo is keyed by them, and endpoints that agree on
  them share one evaluation. A memo over all these rules, keyed by the endpoint's class (the
  endpoint facts the rules declared) and every declared value, makes a warm decision one
  lookup per candidate, and one per located set while nothing it depends on changes;
* candidate rules that read state, or that compare candidates (``memoise: false``), are
  evaluated every time, over all the request's candidates in one input.

The memos live in the guard, and a guard has one bundle revision, so the policy revision is
part of every key by construction; the inventory revision selects the memo. Rego rules are
evaluated once per request over the distinct inputs that missed the memo.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import compress
from operator import itemgetter
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from decision import _kernels
from decision.bounded import make_room, put_bounded
from decision.candidates import CandidateSet, endpoints_of
from decision.domain import (
    Candidate,
    Decision,
    Endpoint,
    GuardResult,
    JudgedGroup,
    Outcome,
    RequestContext,
    RuleInfo,
    RuleOutcome,
    Severity,
    VerdictTable,
)
from decision.errors import Unavailable
from policies.bundle import CompiledBundle, CompiledRule
from policies.cel_engine import CelProgram
from policies.inputs import (
    ages_view,
    compile_telemetry_key,
    dense_telemetry_block,
    endpoint_view,
    freeze,
    request_view,
    split_rows,
    telemetry_view,
)
from policies.quota import InMemoryQuotaCounters, QuotaCounters, window_of

log = logging.getLogger("infermesh.policies")
_Judged = tuple[bool, tuple[RuleOutcome, ...]]
_HELD_AT = "quota_held_at"  # when prefetch took the request's quota share (not shown to rules)
_HOLD = "quota_hold"  # the share's name, for an exact give-back (not shown to rules)
_NOT_STATE = ("inventory_revision", "now", _HELD_AT, _HOLD)
_NO_VIEW: tuple[dict[str, Any], Any] = ({}, ())


def _tokens(ctx: RequestContext) -> int:
    """The tokens a request counts against its tenant's quota (held by prefetch, given back by release)."""
    return max(0, ctx.estimated_input_tokens) + max(0, ctx.expected_output_tokens)


@dataclass
class _InventoryMemo:
    views: dict[str, dict[str, Any]] = field(default_factory=dict)  # endpoint id -> full view
    # rule id -> endpoint id -> (the endpoint facts the rule declared, their hashable key)
    rule_views: dict[str, dict[str, tuple[dict[str, Any], Any]]] = field(default_factory=dict)
    rules: dict[str, dict[tuple[Any, ...], RuleOutcome]] = field(default_factory=dict)
    # request values -> endpoint class id -> the static rules' verdicts
    static: dict[tuple[Any, ...], dict[int, _Judged]] = field(default_factory=dict)
    # an endpoint class (the endpoint facts a rule group declared) -> its small-int id, for cheap keys
    class_ids: dict[tuple[Any, ...], int] = field(default_factory=dict)
    # endpoint id -> its class id for the static / the telemetry rules (see PolicyGuard._classes)
    static_class: dict[str, int] = field(default_factory=dict)
    dynamic_class: dict[str, int] = field(default_factory=dict)
    # (which class table, placement) -> the class ids of the placement's endpoints, in order
    placement_classes: dict[tuple[int, Any], npt.NDArray[np.int64]] = field(default_factory=dict)
    # (placement, rows, request values) -> every candidate's static verdicts
    static_sets: dict[tuple[Any, ...], list[_Judged]] = field(default_factory=dict)
    # (placement, rows, request values, telemetry block) -> (surviving positions, their verdicts)
    sets: dict[tuple[Any, ...], tuple[tuple[int, ...], list[list[_Judged]]]] = field(default_factory=dict)
    # request values -> (class id + telemetry row as bytes, or (class id, telemetry key)) -> verdicts
    dynamic: dict[tuple[Any, ...], dict[Any, _Judged]] = field(default_factory=dict)


def _table_for(tables: dict[tuple[Any, ...], dict[Any, _Judged]], request_values: tuple[Any, ...],
               limit: int) -> dict[Any, _Judged]:
    """The memo table of one set of request values (a bounded number of them is kept)."""
    table = tables.get(request_values)
    if table is None:
        table = put_bounded(tables, request_values, {}, limit)
    return table


_T = TypeVar("_T", bound=Hashable)


def _shared(table: dict[_T, _T], value: _T, limit: int) -> _T:
    """The one object equal to ``value`` that ``table`` keeps (``value`` itself the first time);
    past ``limit`` entries the oldest go (:func:`~decision.bounded.put_bounded`)."""
    hit = table.get(value)
    if hit is None:
        hit = put_bounded(table, value, value, limit)
    return hit


_first = itemgetter(0)


def _survivor_positions(groups: Sequence[Sequence[_Judged]], n: int) -> tuple[int, ...]:
    """Positions every group allows (a verdict's first item): the first group through C-level
    iterators, the others only over its survivors."""
    keep: Iterable[int] = compress(range(n), map(_first, groups[0])) if groups else range(n)
    for group in groups[1:]:
        keep = [i for i in keep if group[i][0]]
    return tuple(keep)


def _union(rules: Sequence[CompiledRule], attr: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(x for r in rules for x in getattr(r.spec, attr)))


class PolicyGuard:
    """The guard stage for one compiled bundle revision.

    Parameters
    ----------
    bundle
        A :class:`~policies.bundle.CompiledBundle` (see :func:`~policies.bundle.compile_bundle`).
    counters
        Quota counters: :meth:`prefetch` holds the request's share, :meth:`release` gives it
        back if the request is not routed; in-process ones by default. Share one counters
        object across reloads so usage carries over.
    clock
        Time source for the quota windows.
    memo_limit
        Entries a memo table holds before it starts over.

    Examples
    --------
    >>> from decision.domain import Candidate, RequestContext, TelemetryReading
    >>> from learners.testing import toy_endpoint
    >>> from policies.bundle import compile_bundle, DEFAULT_BUNDLE
    >>> guard = PolicyGuard(compile_bundle(DEFAULT_BUNDLE))
    >>> hot = TelemetryReading("ep1", {"gpu_temp_c": 91.0}, {"gpu_temp_c": 1.0})
    >>> cands = [Candidate(toy_endpoint(0), TelemetryReading("ep0", {}, {}), 5.0),
    ...          Candidate(toy_endpoint(1), hot, 5.0)]
    >>> ctx = RequestContext("r1", "acme", estimated_input_tokens=10)
    >>> result = guard.evaluate(ctx, cands, guard.prefetch(ctx))
    >>> [c.endpoint.endpoint_id for c in result.allowed], result.removing_rules()
    (['ep0'], ('safety.gpu_temperature',))
    """

    def __init__(self, bundle: CompiledBundle, *, counters: QuotaCounters | None = None,
                 clock: Callable[[], float] = time.time, memo_limit: int = 200_000,
                 set_memo_limit: int = 4096) -> None:
        self.bundle = bundle
        self.counters: QuotaCounters = counters if counters is not None else InMemoryQuotaCounters()
        self.clock = clock
        self.memo_limit = memo_limit
        self.set_memo_limit = set_memo_limit
        self._revision = bundle.revision
        self._params = bundle.params
        # Each CEL rule sees only the params it reads (converting the rest costs as much as evaluating).
        self._rule_params = {r.spec.id: r.program.params_view(self._params) for r in bundle.rules
                             if isinstance(r.program, CelProgram)}
        rules = bundle.rules
        self._request_rules = tuple(r for r in rules if r.spec.scope == "request")
        self._static = tuple(r for r in rules if r.spec.memoisable)
        self._dynamic = tuple(r for r in rules if r.spec.scope == "candidate" and not r.spec.per_request
                              and not r.spec.memoisable)
        self._live = tuple(r for r in rules if r.spec.per_request)
        self._static_fields = _union(self._static, "request_fields")
        self._dynamic_fields = _union(self._dynamic, "request_fields")
        self._telemetry_key = compile_telemetry_key(_union(self._dynamic, "telemetry"), _union(self._dynamic, "ages"))
        self._dense_block = dense_telemetry_block(_union(self._dynamic, "telemetry"), _union(self._dynamic, "ages"))
        self._rule_keys = {r.spec.id: compile_telemetry_key(r.spec.telemetry, r.spec.ages) for r in rules}
        self._rule_blocks = {r.spec.id: b for r in rules
                             if (b := dense_telemetry_block(r.spec.telemetry, r.spec.ages)) is not None}
        self._severity = {r.spec.id: Severity(r.spec.severity) for r in rules}
        self._rule_infos = tuple(RuleInfo(r.spec.id, r.spec.engine, r.spec.kind, self._severity[r.spec.id])
                                 for r in rules)
        self._rule_index = {r.spec.id: i for i, r in enumerate(rules)}
        self._outcomes: dict[RuleOutcome, RuleOutcome] = {}
        # Equal verdict tuples are one object too: the memos then hold a few hundred distinct
        # verdicts, not one per (class, telemetry) entry, and reading them stays in cache.
        self._verdicts: dict[_Judged, _Judged] = {}
        self._needs_state = any(r.spec.state for r in rules)
        self._memos: dict[str, _InventoryMemo] = {}
        self.release_errors = 0
        self.prefetch_errors = 0
        self.settle_errors = 0

    @property
    def revision(self) -> str:
        return self._revision

    @property
    def reads_state(self) -> bool:
        """Whether some rule reads pre-fetched state (quota counters): decisions need the counters."""
        return self._needs_state

    # -- I/O happens here and in release, never in evaluate --
    def prefetch(self, ctx: RequestContext) -> Mapping[str, Any]:
        """The quota state the rules read, with this request's share already held (see :mod:`policies.quota`).

        ``state["quota"]`` is the usage before this request, as the rules expect; the share is
        kept by :meth:`commit` and given back by :meth:`release`.
        """
        if not self._needs_state:
            return {}
        now = self.clock()
        hold = os.urandom(8).hex()
        try:
            usage = self.counters.reserve(ctx.tenant, now, 1, _tokens(ctx), hold)
        except Exception as exc:
            # Not a verdict on the request: the service cannot decide (UNAVAILABLE, not RESOURCE_EXHAUSTED).
            self.prefetch_errors += 1
            log.warning("quota counters unavailable: %s", exc)
            if self.counters.uncertain_failures:  # the reply may be what was lost: undo the share if it was taken
                try:
                    self.counters.give_back(ctx.tenant, now, 1, _tokens(ctx), hold)
                except Exception as undo:  # the hold expires; until the window ends the tenant is under-served
                    self.release_errors += 1
                    log.warning("could not undo the quota share of %s: %s", ctx.tenant, undo)
            raise Unavailable(f"quota counters unavailable: {type(exc).__name__}") from None
        return {"quota": usage.as_state(), _HELD_AT: now, _HOLD: hold}

    def peek(self, ctx: RequestContext) -> Mapping[str, Any]:
        """The state :meth:`prefetch` would give, holding nothing (for dry runs such as ``policy explain``)."""
        if not self._needs_state:
            return {}
        try:
            return {"quota": self.counters.read(ctx.tenant, self.clock()).as_state()}
        except Exception as exc:
            return {"quota_error": str(exc)}

    def commit(self, ctx: RequestContext, decision: Decision) -> None:
        """The request was routed: the share :meth:`prefetch` held stays spent."""

    def settle(self, ctx: RequestContext, outcome: Outcome, decided_at: float) -> None:
        """True the tenant's token count up to what the routed request used (see :mod:`policies.quota`).

        Tokens beyond the estimate count now, in the window running when the request ended (a long
        generation cannot slip past the minute it finishes in); tokens estimated but not used are
        given back to the window they were held in, if it is still running. An outcome that does
        not say what it used (no tokens reported) leaves the estimate charged.
        """
        used = max(0, outcome.input_tokens) + max(0, outcome.output_tokens)
        if not self._needs_state or used <= 0:
            return
        delta = used - _tokens(ctx)
        now = self.clock()
        if delta > 0:
            at = now
        elif delta < 0 and window_of(decided_at) == window_of(now):
            at = decided_at
        else:
            return
        try:
            self.counters.add(ctx.tenant, at, 0, delta)
        except Exception as exc:  # the estimate stays charged
            self.settle_errors += 1
            log.warning("could not true up the quota usage of %s: %s", ctx.tenant, exc)

    def release(self, ctx: RequestContext, state: Mapping[str, Any]) -> None:
        """The request was not routed (denied, or the decision failed): give its share back."""
        held_at = state.get(_HELD_AT)
        if held_at is None:
            return
        try:  # in the window it was taken from, even if a new minute began meanwhile
            self.counters.give_back(ctx.tenant, held_at, 1, _tokens(ctx), str(state.get(_HOLD, "")))
        except Exception as exc:  # the share stays spent: the tenant is under-served, never over
            self.release_errors += 1
            log.warning("could not give back the quota share of %s: %s", ctx.tenant, exc)

    # -- the pure stage --
    def evaluate(self, ctx: RequestContext, candidates: Sequence[Candidate],
                 state: Mapping[str, Any]) -> GuardResult:
        req = ctx.as_dict()
        request_outcomes: list[RuleOutcome] = []
        quota_denied = denied = False
        for rule in self._request_rules:
            ok, reason = self._judge_request(rule, req, state)
            request_outcomes.append(self._outcome(rule, ok, reason))
            if not ok and rule.spec.severity == "deny":
                denied = True
                quota_denied = quota_denied or rule.spec.kind == "quota"
        if denied:
            return GuardResult((), self._table(request_outcomes, (), ()), self._revision, quota_denied)
        memo = self._memo(str(state.get("inventory_revision", "")))
        rs = (*[freeze(req.get(f)) for f in self._static_fields],)
        rd = (*[freeze(req.get(f)) for f in self._dynamic_fields],)
        cset = candidates if isinstance(candidates, CandidateSet) else None
        ids = cset.endpoint_ids if cset is not None else [c.endpoint.endpoint_id for c in candidates]
        block: tuple[bytes, int] | None = None
        if cset is not None and self._dense_block is not None:
            block = self._dense_block(cset.telemetry)
        set_key: tuple[Any, ...] | None = None
        if cset is not None and block is not None and not self._live:
            # Everything the memoised verdicts of this whole set depend on: which endpoints, the
            # request values the rules declared, and the telemetry block the telemetry rules see.
            set_key = (cset.placement, cset.rows.tobytes(), rs, rd, block[0])
            hit = memo.sets.get(set_key)
            if hit is not None:
                return GuardResult(self._survivors(cset, hit[0]), self._table(request_outcomes, ids, hit[1]),
                                   self._revision, quota_denied)
        groups = self._memoised(memo, req, candidates, rs, rd, block)
        if self._live:
            groups.append(self._judge_live(memo, req, candidates, state))
        keep = _survivor_positions(groups, len(candidates))
        if set_key is not None:
            put_bounded(memo.sets, set_key, (keep, groups), self.set_memo_limit)
        return GuardResult(self._survivors(candidates, keep), self._table(request_outcomes, ids, groups),
                           self._revision, quota_denied)

    def _table(self, request: Sequence[RuleOutcome], ids: Sequence[str],
               groups: Sequence[JudgedGroup]) -> VerdictTable:
        return VerdictTable(self._rule_infos, self._revision, request, ids, groups)

    @staticmethod
    def _survivors(candidates: Sequence[Candidate], keep: tuple[int, ...]) -> Sequence[Candidate]:
        if isinstance(candidates, CandidateSet):
            return candidates if len(keep) == len(candidates) else candidates.take(keep)
        return tuple(candidates[i] for i in keep)

    def _memo(self, inventory_revision: str) -> _InventoryMemo:
        memo = self._memos.get(inventory_revision)
        if memo is None:
            if len(self._memos) >= 2:  # after an inventory reload the oldest revision is gone for good
                self._memos.pop(next(iter(self._memos)))
            memo = self._memos[inventory_revision] = _InventoryMemo()
        return memo

    def _memoised(self, memo: _InventoryMemo, req: Mapping[str, Any], candidates: Sequence[Candidate],
                  rs: tuple[Any, ...], rd: tuple[Any, ...], block: tuple[bytes, int] | None) -> list[list[_Judged]]:
        """Candidate rules without state: two lookups per candidate once warm.

        Static rules (keyed by endpoint and request values) and telemetry rules (keyed by
        endpoint, request values and telemetry) have separate memos, so a telemetry update or
        an age ticking over a second never re-runs the static (Rego) rules.
        """
        cset = candidates if isinstance(candidates, CandidateSet) else None
        static: list[_Judged] | None = None
        set_key: tuple[Any, ...] | None = None
        if cset is not None:
            # Static verdicts never change with telemetry: keep them for the whole located set too,
            # which stays small where per-endpoint entries would not (endpoints x request values).
            set_key = (cset.placement, cset.rows.tobytes(), rs)
            static = memo.static_sets.get(set_key)
        endpoints = endpoints_of(candidates)
        if static is None:
            classes = self._classes(memo, memo.static_class, self._static, candidates, endpoints)
            static = self._lookup(_table_for(memo.static, rs, self.memo_limit), classes.tolist(), self._static, memo,
                                  req, candidates)
            if set_key is not None:
                put_bounded(memo.static_sets, set_key, static, self.set_memo_limit * 16)
        if not self._dynamic:
            return [static]
        classes = self._classes(memo, memo.dynamic_class, self._dynamic, candidates, endpoints)
        dyn_keys: list[Any]
        if block is not None:  # class id and telemetry row as one bytes key each, built in C
            dyn_keys = _kernels.row_keys(classes, *block)
        else:
            tkey = self._telemetry_key
            dyn_keys = [(k, tkey(c.telemetry)) for k, c in zip(classes.tolist(), candidates, strict=True)]
        return [static, self._lookup(_table_for(memo.dynamic, rd, self.memo_limit), dyn_keys, self._dynamic, memo,
                                     req, candidates)]

    def _classes(self, memo: _InventoryMemo, table: dict[str, int], rules: Sequence[CompiledRule],
                 candidates: Sequence[Candidate], endpoints: Sequence[Endpoint]) -> npt.NDArray[np.int64]:
        """Each endpoint's class id for ``rules``: the endpoint facts those rules declared, as one key.

        Endpoints of one class get the same answers from these rules for the same request and
        telemetry, so the group's memo is keyed by class, not by endpoint: a 65,536-endpoint fleet
        has a few hundred classes, and an endpoint first seen reuses its class's verdicts.
        Classes are numbered (``memo.class_ids``) so that keys hash cheaply. A located set's
        class ids are kept per placement (one read per decision).
        """
        if isinstance(candidates, CandidateSet):
            pkey = (id(table), candidates.placement)
            whole = memo.placement_classes.get(pkey)
            if whole is None:
                whole = put_bounded(memo.placement_classes, pkey, self._endpoint_classes(
                    memo, table, rules, candidates.placement.endpoints), self.set_memo_limit * 16)
                whole.setflags(write=False)
            return candidates.column(whole)
        return self._endpoint_classes(memo, table, rules, endpoints)

    def _endpoint_classes(self, memo: _InventoryMemo, table: dict[str, int], rules: Sequence[CompiledRule],
                          endpoints: Sequence[Endpoint]) -> npt.NDArray[np.int64]:
        get = table.get
        out = [get(e.endpoint_id) for e in endpoints]
        missing = [i for i, k in enumerate(out) if k is None]
        if missing:
            eps = [endpoints[i] for i in missing]
            per_rule = [self._rule_views(memo, rule, eps) for rule in rules]
            ids = memo.class_ids
            for n, i in enumerate(missing):
                key = tuple(views[n][1] for views in per_rule)
                cid = ids.get(key)
                if cid is None:
                    cid = ids[key] = len(ids)
                out[i] = table[endpoints[i].endpoint_id] = cid
        return np.array(out, dtype=np.int64)

    def _lookup(self, table: dict[Any, _Judged], keys: list[Any], rules: Sequence[CompiledRule],
                memo: _InventoryMemo, req: Mapping[str, Any], candidates: Sequence[Candidate]) -> list[_Judged]:
        if not rules:
            return [(True, ())] * len(candidates)
        out: list[_Judged | None] = list(map(table.get, keys))
        if None in out:
            missed = [i for i, j in enumerate(out) if j is None]
            subset = (candidates.take(missed) if isinstance(candidates, CandidateSet)
                      else [candidates[i] for i in missed])
            fresh = self._judge(rules, memo, req, subset, None)
            make_room(table, self.memo_limit)
            for i, j in zip(missed, fresh, strict=True):
                table[keys[i]] = out[i] = j
        return out  # type: ignore[return-value]

    def _judge_live(self, memo: _InventoryMemo, req: Mapping[str, Any], candidates: Sequence[Candidate],
                    state: Mapping[str, Any]) -> list[_Judged]:
        return self._judge(self._live, memo, req, candidates, state)

    # -- evaluation proper --
    def _outcome(self, rule: CompiledRule, ok: bool, reason: str) -> RuleOutcome:
        """One rule's answer as a shared tuple (equal answers are one object)."""
        return _shared(self._outcomes, (self._rule_index[rule.spec.id], ok, reason), self.memo_limit)

    def _judge_request(self, rule: CompiledRule, req: Mapping[str, Any],
                       state: Mapping[str, Any]) -> tuple[bool, str]:
        s = rule.spec
        rview = request_view(req, s.request_fields)
        sview = {k: v for k, v in state.items() if k not in _NOT_STATE} if s.state else {}
        if isinstance(rule.program, CelProgram):
            act: dict[str, Any] = {"request": rview, "params": self._rule_params[s.id]}
            if s.state:
                act["state"] = sview
            return rule.program.evaluate(act)
        return rule.program.evaluate_request(rview, sview)

    def _rule_views(self, memo: _InventoryMemo, rule: CompiledRule,
                    endpoints: Sequence[Endpoint]) -> list[tuple[dict[str, Any], Any]]:
        """The endpoint facts ``rule`` declared, with their hashable key (computed once per endpoint)."""
        fields = rule.spec.endpoint_fields
        if fields is not None and not fields:  # the rule reads no endpoint fact: one shared view
            return [_NO_VIEW] * len(endpoints)
        table = memo.rule_views.setdefault(rule.spec.id, {})
        get = table.get
        out = [get(e.endpoint_id) for e in endpoints]
        for i, hit in enumerate(out):
            if hit is None:
                ep = endpoints[i]
                full = memo.views.get(ep.endpoint_id)
                if full is None:
                    full = memo.views[ep.endpoint_id] = endpoint_view(ep)
                view = full if fields is None else {f: full[f] for f in fields}
                out[i] = table[ep.endpoint_id] = (view, freeze(view))
        return out  # type: ignore[return-value]

    def _item(self, ep: dict[str, Any], rule: CompiledRule, c: Candidate) -> dict[str, Any]:
        """What one candidate shows one rule: declared endpoint facts, telemetry and ages."""
        s = rule.spec
        item: dict[str, Any] = {"endpoint": ep}
        if s.telemetry:
            item["telemetry"] = telemetry_view(c.telemetry, s.telemetry)
        if s.ages:
            item["age_s"] = ages_view(c.telemetry, s.ages)
        return item

    def _judge(self, rules: Sequence[CompiledRule], memo: _InventoryMemo, req: Mapping[str, Any],
               candidates: Sequence[Candidate], state: Mapping[str, Any] | None) -> list[_Judged]:
        """Verdicts of ``rules`` on ``candidates``; with ``state`` None, through the rule memos.

        A rule's memo is keyed by exactly what it sees, so endpoints that agree on it share
        one evaluation; verdict objects are shared too (they are immutable).
        """
        if not rules:
            return [(True, ())] * len(candidates)
        cset = candidates if isinstance(candidates, CandidateSet) else None
        endpoints = endpoints_of(candidates)
        per_rule: list[list[RuleOutcome]] = []
        outcome = self._outcome
        for rule in rules:
            s = rule.spec
            rview = request_view(req, s.request_fields)
            views = self._rule_views(memo, rule, endpoints)
            if state is None:
                table = memo.rules.setdefault(s.id, {})
                make_room(table, self.memo_limit)
                rk = freeze(rview)
                block = self._rule_blocks.get(s.id) if cset is not None else None
                if cset is not None and block is not None:  # keys from the telemetry matrix
                    tkeys: list[Any] = split_rows(*block(cset.telemetry), len(cset))
                else:
                    tkey = self._rule_keys[s.id]
                    tkeys = [tkey(c.telemetry) for c in candidates]
                keys = [(rk, v[1], t) for v, t in zip(views, tkeys, strict=True)]
                todo: dict[tuple[Any, ...], dict[str, Any]] = {}
                for i, (k, v) in enumerate(zip(keys, views, strict=True)):
                    if k not in table and k not in todo:
                        todo[k] = self._item(v[0], rule, candidates[i])
                if todo:
                    results = self._run(rule, rview, list(todo.values()), {})
                    table.update(zip(todo, (outcome(rule, a, r) for a, r in results), strict=True))
                per_rule.append([table[k] for k in keys])
            else:
                sview = {k: v for k, v in state.items() if k not in _NOT_STATE} if s.state else {}
                items = [self._item(v[0], rule, c) for v, c in zip(views, candidates, strict=True)]
                per_rule.append([outcome(rule, a, r) for a, r in self._run(rule, rview, items, sview)])
        deny = [self._severity[r.spec.id] is Severity.DENY for r in rules]
        out: list[_Judged] = []
        for outs in zip(*per_rule, strict=True):
            ok = True
            for o, d in zip(outs, deny, strict=True):
                if d and not o[1]:
                    ok = False
                    break
            out.append(_shared(self._verdicts, (ok, outs), self.memo_limit))
        return out

    def _run(self, rule: CompiledRule, rview: Mapping[str, Any], items: Sequence[Mapping[str, Any]],
             sview: Mapping[str, Any]) -> list[tuple[bool, str]]:
        """Evaluate one rule on distinct inputs: CEL one by one, Rego in one query."""
        if isinstance(rule.program, CelProgram):
            base: dict[str, Any] = {"request": rview, "params": self._rule_params[rule.spec.id]}
            if rule.spec.state:
                base["state"] = sview
            return [rule.program.evaluate({**base, **item}) for item in items]
        # Candidate ids in Rego input are opaque keys: the endpoint's id is endpoint.id, if declared.
        docs = [{"id": f"c{n}", **item} for n, item in enumerate(items)]
        return rule.program.evaluate_candidates(rview, docs, sview)
