"""Masking of sensitive fields before anything is written; prompts are never stored.

Paths are dotted and apply to the event's top level and to the request copy inside the trace
(``trace.request``): ``request_id``, ``session_id``, ``labels.user``, ``labels.*``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from decision.contracts import PSEUDONYM_PREFIX

# Keys that could carry prompt text: dropped wherever they appear in a request or its labels.
PROMPT_KEYS = frozenset({"prompt", "prompts", "messages", "input", "inputs", "prompt_text", "completion"})


class Masker:
    """Hashes (keyed) or removes configured fields.

    Examples
    --------
    >>> m = Masker(["labels.user", "session_id"], mode="remove")
    >>> m.mask_request({"session_id": "s", "labels": {"user": "u", "team": "a", "prompt": "hi"}})
    {'labels': {'team': 'a'}}
    """

    def __init__(self, paths: Sequence[str], *, mode: Literal["hash", "remove"] = "hash",
                 key: str = "infermesh-audit") -> None:
        self.paths = tuple(tuple(p.split(".")) for p in paths)
        self.mode = mode
        self._key = key.encode()

    def token(self, value: object) -> str:
        """The stable, keyed pseudonym of a value."""
        return PSEUDONYM_PREFIX + hmac.new(self._key, str(value).encode(), hashlib.sha256).hexdigest()[:24]

    def _apply(self, d: dict[str, Any], path: tuple[str, ...]) -> None:
        head, rest = path[0], path[1:]
        keys = list(d) if head == "*" else [head] if head in d else []
        for k in keys:
            if rest:
                child = d[k]
                if isinstance(child, Mapping):
                    d[k] = dict(child)
                    self._apply(d[k], rest)
            elif self.mode == "remove":
                del d[k]
            elif d[k] is not None and d[k] != "":
                d[k] = self.token(d[k])

    def mask_request(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """A masked copy of a request mapping (prompt-like keys always dropped)."""
        out = {k: v for k, v in request.items() if k not in PROMPT_KEYS}
        labels = out.get("labels")
        if isinstance(labels, Mapping):
            out["labels"] = {k: v for k, v in labels.items() if k not in PROMPT_KEYS}
        for p in self.paths:
            self._apply(out, p)
        return out

    def mask_event(self, event: Mapping[str, Any], *, trace: bool = True) -> dict[str, Any]:
        """A masked shallow copy of a decision event: top-level fields and ``trace.request``.

        With ``trace=False`` the trace is left alone (it may be built lazily; the writer thread
        masks it with :meth:`mask_trace` before anything is serialised).
        """
        out = dict(event)
        for p in self.paths:
            if p[0] in out and p[0] != "trace":
                self._apply(out, p)
        if self.mode == "remove":  # required columns stay present, as empty strings
            for k in ("request_id", "tenant"):
                out.setdefault(k, "")
        if trace and isinstance(out.get("trace"), Mapping):
            out["trace"] = self.mask_trace(out["trace"])
        return out

    def mask_trace(self, trace: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of a trace with its ``request`` masked (materialises a lazy trace)."""
        out = dict(trace)
        if isinstance(out.get("request"), Mapping):
            out["request"] = self.mask_request(out["request"])
        return out
