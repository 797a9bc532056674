"""Errors a policy author sees, always located as ``file:line:col: message``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class PolicyIssue:
    """One problem in a bundle, at a 1-based line and column of a file.

    >>> str(PolicyIssue("b/residency.rego", 6, 11, "Invalid boolean operator"))
    'b/residency.rego:6:11: Invalid boolean operator'
    """

    path: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}:{self.column}: {self.message}"


class BundleError(ValueError):
    """A bundle that does not compile; ``issues`` lists every problem found."""

    def __init__(self, issues: Sequence[PolicyIssue]) -> None:
        super().__init__("\n".join(str(i) for i in issues))
        self.issues = tuple(issues)


def read_source(path: Path) -> str:
    """A rule or test file's text; one that is not UTF-8 or cannot be read is a located :class:`BundleError`."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise BundleError([PolicyIssue(str(path), line, 1, f"not UTF-8 text (byte {exc.object[exc.start]:#04x})")]) \
            from None
    except OSError as exc:
        raise BundleError([PolicyIssue(str(path), 1, 1, f"cannot read: {exc.strerror or exc}")]) from None


def line_col_of_offset(source: bytes, offset: int) -> tuple[int, int]:
    """1-based (line, column) of a byte offset, counting columns in characters.

    regopy reports positions as byte offsets into the module; authors need lines and columns.

    >>> line_col_of_offset("a\\nbé c".encode(), 5)
    (2, 3)
    """
    offset = max(0, min(offset, len(source)))
    line_start = source.rfind(b"\n", 0, offset) + 1
    line = source.count(b"\n", 0, offset) + 1
    column = len(source[line_start:offset].decode("utf-8", errors="replace")) + 1
    return line, column
