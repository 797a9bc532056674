"""Errors a policy author sees, always located as ``file:line:col: message``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from decision.yaml_lines import YamlSyntaxError, read_utf8


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


class BundleRejected(RuntimeError):
    """A bundle that compiles but is not loaded: its tests fail, or it changed while being loaded."""


def read_source(path: Path) -> str:
    """A rule or test file's text; one that is not UTF-8 or cannot be read is a located :class:`BundleError`."""
    try:
        return read_utf8(path)
    except YamlSyntaxError as exc:  # the reader's located error, whatever the file's format
        raise BundleError([PolicyIssue(exc.path, exc.line, exc.column, exc.message)]) from None


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
