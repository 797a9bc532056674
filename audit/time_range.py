"""The one reading of ``from``/``to``, for ``infermesh audit`` and the auditors' HTTP API alike.

Auditors use both and must get the same decisions for the same arguments, so both call
:func:`parse_range` (``audit verify``, which takes whole days, :func:`parse_when`). The rules:

* a date alone, ``YYYY-MM-DD``, is a UTC day: ``from`` starts at its 00:00 UTC, ``to`` takes the
  whole day (up to the next day's 00:00 UTC, exclusive), so ``from=D&to=D`` is day D;
* an ISO 8601 date-time, ``YYYY-MM-DDTHH:MM[:SS[.ffffff]]`` (``T`` or a space between), with a zone
  (``Z``, ``+HH:MM``, ``+HHMM``, ``+HH``) or without one, which is UTC; ``from`` is inclusive, ``to``
  exclusive;
* numbers (all digits: Unix seconds) are refused: ``20261129`` is 2026-11-29 as an ISO basic-format
  date but 1970-08-23 as Unix seconds, and 13 digits may be milliseconds; evidence must not rest on a
  guess, and a date-time says which instant it means to whoever reads the request later;
* ``from`` must be before ``to``: a range that holds no instant is refused, not answered with nothing.

>>> [t.isoformat() for t in parse_range("2026-11-29", "2026-11-29") if t is not None]
['2026-11-29T00:00:00+00:00', '2026-11-30T00:00:00+00:00']
>>> [t.isoformat() for t in parse_range("2026-11-29T09:00+01:00", "2026-11-29 10:00") if t is not None]
['2026-11-29T08:00:00+00:00', '2026-11-29T10:00:00+00:00']
>>> parse_range("1764400000", None)
Traceback (most recent call last):
...
audit.time_range.BadBound: from: '1764400000' is a number, ...
"""

from __future__ import annotations

import datetime as dt
import re

from audit.verify import after_day, day_start

# What `infermesh audit query --help` and the API's OpenAPI say of each bound, after "Decisions "
# (argparse %-formats help text: no % in these).
FROM_HELP = ("at or after this: a date, YYYY-MM-DD, from its 00:00 UTC; or an ISO 8601 date-time, e.g. "
             "2026-11-29T08:00:00Z or 2026-11-29T09:00+01:00, UTC if it has no zone. Numbers (Unix seconds) are "
             "refused")
TO_HELP = ("before this (exclusive), in the same forms: a date-time, UTC if it has no zone; or a date, YYYY-MM-DD, "
           "through the end of that UTC day, so the same date as both bounds is that whole day. A range holding no "
           "instant (the start not before the end) is refused")

_DATE = r"\d{4}-\d{2}-\d{2}"
_TIME = r"\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?"
_ZONE = r"[Zz]|[+-]\d{2}(?::?\d{2})?"
# re.ASCII: \d would otherwise take any script's digits, which fromisoformat then reads or refuses.
_WHEN = re.compile(rf"(?P<date>{_DATE})(?:[Tt ](?P<time>{_TIME})(?P<zone>{_ZONE})?)?", re.ASCII)
_FRACTION = re.compile(r"\.(\d+)", re.ASCII)
_NUMBER = re.compile(r"[+-]?\d+(?:\.\d*)?", re.ASCII)
_SHOWN = 64  # characters of a refused value echoed back: enough to recognise it, not a wall of text
_EXPECTED = "a date (YYYY-MM-DD) or an ISO 8601 date-time (YYYY-MM-DDTHH:MM[:SS[.ffffff]][Z|+HH:MM]; no zone: UTC)"


class BadBound(ValueError):
    """A ``from``/``to`` value refused; ``str()`` is one line naming the option or parameter."""


def _refuse(name: str, text: str, why: str) -> BadBound:
    """``name: 'text' why``: the option or parameter first, as the API's other refusals put it."""
    return BadBound(f"{name}: {text[:_SHOWN]!r} {why}")


def parse_when(text: str, *, name: str) -> dt.date | dt.datetime:
    """``text`` as a UTC day or an instant, by the rules of this module.

    Parameters
    ----------
    text : str
        What the auditor gave.
    name : str
        The option or parameter it came from (``--from``, ``to``), for the error message.

    Returns
    -------
    datetime.date or datetime.datetime
        A ``date`` for a date alone; otherwise an aware ``datetime`` in UTC (UTC assumed if no zone).

    Raises
    ------
    BadBound
        Not of the accepted forms, all digits, no such date or time, or outside years 1-9999 in UTC.
    """
    if _NUMBER.fullmatch(text):  # before the grammar, to say why: several readings of digits are plausible
        raise _refuse(name, text, "is a number, refused as Unix seconds and as a basic-format date alike (the "
                                  "two read 20261129 as different days): write a date as YYYY-MM-DD, a time as "
                                  "YYYY-MM-DDTHH:MM:SSZ (Unix seconds N: date -u -d @N +%FT%TZ)")
    match = _WHEN.fullmatch(text)
    if match is None:
        raise _refuse(name, text, f"is not {_EXPECTED}")
    fraction = _FRACTION.search(match["time"] or "")
    if fraction is not None and len(fraction[1]) > 6:  # fromisoformat would truncate: a bound is exact
        raise _refuse(name, text, "has more than 6 fractional digits (the audit log keeps microseconds)")
    try:
        if match["time"] is None:
            return dt.date.fromisoformat(text)
        when = dt.datetime.fromisoformat(text.upper())  # 3.11 reads "Z", not "z" or a "t" separator
    except ValueError as exc:  # the right shape, but 2026-02-30 or 25:00
        raise _refuse(name, text, f"names no real date or time ({exc})") from None
    try:
        return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when.astimezone(dt.UTC)
    except OverflowError:  # 0001-01-01T00:00+01:00 is in year 0 in UTC
        raise _refuse(name, text, "is outside the years 1-9999 in UTC") from None


def parse_bound(text: str | None, *, name: str, end: bool) -> dt.datetime | None:
    """``text`` as an instant bounding a range: ``from`` inclusive (``end`` false), ``to`` exclusive.

    A date alone stands for its UTC day: ``from`` its start, ``to`` the midnight after it. ``None``
    (nothing given, or ``to`` 9999-12-31, after which no day can be named) means no bound.

    Raises
    ------
    BadBound
        As :func:`parse_when`.
    """
    if text is None:
        return None
    when = parse_when(text, name=name)
    if isinstance(when, dt.datetime):  # before date: a datetime is a date too
        return when
    return after_day(when) if end else day_start(when)


def _iso(t: dt.datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


def parse_range(start: str | None, end: str | None, *, from_name: str = "from",
                to_name: str = "to") -> tuple[dt.datetime | None, dt.datetime | None]:
    """``from`` and ``to`` as the instants bounding ``from <= t < to`` (``None``: unbounded).

    Parameters
    ----------
    start, end : str or None
        What was given for ``from`` and ``to``; ``None`` if nothing was.
    from_name, to_name : str
        How the caller names them in messages (``--from`` on the command line).

    Returns
    -------
    tuple of (datetime or None, datetime or None)
        Aware UTC instants.

    Raises
    ------
    BadBound
        Either value refused (:func:`parse_when`), or ``from`` not before ``to``: the range would
        hold no decision, which looks like an answer ("none") when it is a mistake.
    """
    first = parse_bound(start, name=from_name, end=False)
    last = parse_bound(end, name=to_name, end=True)
    if first is not None and last is not None and first >= last:
        raise BadBound(f"{from_name}: {start!r} is not before {to_name} {end!r}: the range from {_iso(first)} up "
                       f"to {_iso(last)} (exclusive) holds no decision")
    return first, last
