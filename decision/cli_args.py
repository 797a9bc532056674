"""What the CLI's commands parse the same way: bounded integers, a request given as a JSON file, and the
default configuration."""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from decision.yaml_lines import line_col

DEMO_CONFIG = "deploy/demo/infermesh.yaml"
_CHECKOUT = Path(__file__).resolve().parent.parent

N = TypeVar("N", int, float)


def default_config() -> str:
    """The demo configuration (see :func:`shipped`)."""
    return shipped(DEMO_CONFIG)


def shipped(relative: str) -> str:
    """A file or folder of the checkout (``deploy/demo/fleet.yaml``): from the working directory, else
    from the checkout this code runs from.

    The README's commands run at the checkout's root; run from elsewhere (an editable install) the
    commands still find the demo's files. A packaged install ships no ``deploy/``: the relative path
    is kept, so the error names what to pass instead.
    """
    if Path(relative).exists():
        return relative
    there = _CHECKOUT / relative
    return str(there) if there.exists() else relative


def _shown(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _bounded(kind: Callable[[str], N], what: str, low: N, high: N) -> Callable[[str], N]:
    def parse(text: str) -> N:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not low <= value <= high:  # NaN fails both comparisons
            raise argparse.ArgumentTypeError(f"{text.strip()} is outside {_shown(low)}-{_shown(high)}")
        return value
    return parse


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An argparse ``type``: an int in [low, high], else a usage error naming the range.

    >>> bounded_int(0, 65535)("8080")
    8080
    """
    return _bounded(int, "an integer", low, high)


def bounded_float(low: float, high: float) -> Callable[[str], float]:
    """An argparse ``type``: a finite number in [low, high], else a usage error naming the range.

    >>> bounded_float(0.5, 3600)("30")
    30.0
    """
    return _bounded(float, "a number", low, high)


class UsageError(Exception):
    """A message for stderr; the command exits 2."""


def read_json_request(path: str) -> tuple[str, Any]:
    """The text of a request file (``-``: stdin) and its JSON; :class:`UsageError` says file:line:col."""
    try:
        raw = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the request: {exc}") from None
    try:
        data = json.loads(raw, object_pairs_hook=_unique_keys)
    except _DuplicateKey as dup:  # json.loads would keep the last and drop the other without a word
        key, line, col = first_duplicate_key(raw) or (dup.key, 0, 0)
        raise UsageError(f"{path}{f':{line}:{col}' if line else ''}: duplicate key {key!r}") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:  # a 5,000-digit number; arrays nested thousands deep
        raise UsageError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}:1: a request is a JSON object, not {type(data).__name__}")
    return raw, data


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def first_duplicate_key(raw: str) -> tuple[str, int, int] | None:
    r"""The first key, in text order, that repeats one earlier in the same object of the JSON document
    ``raw``, with the line and column of the repeat; None if no object repeats a key.

    Keys are compared decoded, as ``json.loads`` compares them, so an escaped spelling is the same key.

    >>> first_duplicate_key('{"a": {"b": 1},\n "labels": {"a": 2, "\\u0061": 3}}')
    ('a', 2, 21)
    >>> first_duplicate_key('{"a": [{"a": 1}], "b": {"a": 2}}') is None
    True
    """
    objects: list[set[str] | None] = []  # per open bracket: the keys so far of an object; None for an array
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c == '"':
            end = _STRING.match(raw, i)
            if end is None:  # not valid JSON after all: leave the message to the parser
                return None
            after = end.end()
            while after < n and raw[after] in " \t\n\r":
                after += 1
            if objects and objects[-1] is not None and after < n and raw[after] == ":":
                key = json.loads(end.group())
                if key in objects[-1]:
                    return (key, *line_col(raw, i))
                objects[-1].add(key)
            i = end.end()
            continue
        if c in "{[":
            objects.append(set() if c == "{" else None)
        elif c in "}]" and objects:
            objects.pop()
        i += 1
    return None


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out
