"""Load YAML while remembering the line (and column) of every mapping key and list item.

Validation errors (pydantic's ``loc`` tuples) can then be reported as ``file:line: field``,
which is what a person editing an inventory or a policy manifest needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

Loc = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class LocatedYaml:
    """A parsed YAML document and the 1-based line (and column, when loaded from text) of every path in it."""

    data: Any
    lines: dict[Loc, int]
    path: str
    columns: dict[Loc, int] = field(default_factory=dict)

    def line_of(self, loc: Sequence[str | int]) -> int:
        """Line of the deepest known prefix of ``loc`` (1 when nothing matches)."""
        return self.position_of(loc)[0]

    def position_of(self, loc: Sequence[str | int]) -> tuple[int, int]:
        r"""1-based (line, column) of the deepest known prefix of ``loc``: a key's first character, or a list
        item's; column 1 when the column is not known.

        >>> doc = load_located("rules:\n  - id: a\n    file: x.cel\n")
        >>> doc.position_of(("rules", 0, "file")), doc.position_of(("rules", 0, "tests"))
        ((3, 5), (2, 5))
        """
        key: Loc = tuple(loc)
        while key and key not in self.lines:
            key = key[:-1]
        return self.lines.get(key, 1), self.columns.get(key, 1)


class YamlSyntaxError(ValueError):
    def __init__(self, path: str, line: int, column: int, message: str) -> None:
        super().__init__(f"{path}:{line}:{column}: {message}")
        self.path, self.line, self.column, self.message = path, line, column, message


class UnreadableFile(YamlSyntaxError):
    """The file could not be read at all (missing, a folder, no permission): not a syntax error."""


def field_path(loc: Sequence[str | int], data: Any) -> str:
    """Render a pydantic ``loc`` as ``deployments[3](id=x).address``: the item's id helps a person find it."""
    out = ""
    node = data
    for part in loc:
        if isinstance(part, int):
            ident = node[part].get("id") if isinstance(node, list) and part < len(node) and \
                isinstance(node[part], dict) else None
            shown = ident if not isinstance(ident, str) or ident.isprintable() else repr(ident)  # no raw NUL out
            out += f"[{part}]" + (f"(id={shown})" if ident else "")
            node = node[part] if isinstance(node, list) and part < len(node) else None
        else:
            out += ("." if out else "") + part
            node = node.get(part) if isinstance(node, dict) else None
    return out or "(document)"


# Deeper than any inventory or config goes, and far from Python's recursion limit.
MAX_DEPTH = 64
_MERGE_TAG = "tag:yaml.org,2002:merge"
_COLLECTION_TAGS = frozenset({"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:omap"})
# Aliases may repeat a node; this many nodes in all (aliases expanded) is far beyond any inventory or
# config, and small enough that a "billion laughs" document is refused in milliseconds, not gigabytes.
MAX_NODES = 1_000_000


class _Walk:
    """Builds the Python value of a composed document, line by line, refusing what safe_load would
    take silently (duplicate keys: the last one would win) or choke on (alias bombs, cycles)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lines: dict[Loc, int] = {}
        self.columns: dict[Loc, int] = {}
        self.open: set[int] = set()  # ids of the collections being sized: an alias back to one is a cycle

    def error(self, node: yaml.Node, message: str) -> YamlSyntaxError:
        return YamlSyntaxError(self.path, node.start_mark.line + 1, node.start_mark.column + 1, message)

    def size(self, node: yaml.Node, memo: dict[int, int], depth: int = 0) -> int:
        """Nodes in ``node`` with aliases expanded, counted once per distinct node (so a bomb is cheap to size)."""
        if id(node) in memo:
            return memo[id(node)]
        if id(node) in self.open:
            raise self.error(node, "an alias refers to a node that contains it (a cycle)")
        if depth > MAX_DEPTH:
            raise self.error(node, f"nested more than {MAX_DEPTH} levels deep")
        total = 1
        if isinstance(node, yaml.MappingNode | yaml.SequenceNode):
            if node.tag not in _COLLECTION_TAGS:
                raise self.error(node, f"unsupported tag {node.tag!r} (plain YAML values only)")
            self.open.add(id(node))
            items = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value
            for child in items:
                total += self.size(child, memo, depth + 1)
                if total > MAX_NODES:
                    raise self.error(node, f"the document expands to more than {MAX_NODES:,} nodes "
                                           "(aliases repeated within aliases?)")
            self.open.discard(id(node))
        memo[id(node)] = total
        return total

    def walk(self, node: yaml.Node, loc: Loc) -> Any:
        if loc not in self.lines:
            self.lines[loc] = node.start_mark.line + 1
            self.columns[loc] = node.start_mark.column + 1
        if isinstance(node, yaml.SequenceNode):
            return [self.walk(item, (*loc, i)) for i, item in enumerate(node.value)]
        if not isinstance(node, yaml.MappingNode):
            return self.scalar(node)
        out: dict[Any, Any] = {}
        merged: list[yaml.Node] = []
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.error(key_node, "a mapping key must be a plain value, not a mapping or a list")
            if key_node.tag == _MERGE_TAG:  # "<<: *defaults": taken after the keys written out here
                merged.extend(value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node])
                continue
            key = self.scalar(key_node)
            if key in out:
                raise self.error(key_node, f"duplicate key {key!r} (the earlier one is on line "
                                           f"{self.lines[(*loc, key)]})")
            child: Loc = (*loc, key)
            self.lines[child] = key_node.start_mark.line + 1
            self.columns[child] = key_node.start_mark.column + 1
            # pydantic names a date, float or null key by its repr
            if not isinstance(key, str | int) and (*loc, repr(key)) not in self.lines:
                self.lines[(*loc, repr(key))] = key_node.start_mark.line + 1
                self.columns[(*loc, repr(key))] = key_node.start_mark.column + 1
            out[key] = self.walk(value_node, child)
        for source in merged:  # as YAML's merge key: keys written out win, then earlier sources
            if not isinstance(source, yaml.MappingNode):
                raise self.error(source, "a merge key (<<) takes a mapping or a list of mappings")
            written = {k: (self.lines[(*loc, k)], self.columns[(*loc, k)]) for k in out if (*loc, k) in self.lines}
            for key, value in self.walk(source, loc).items():
                out.setdefault(key, value)
            for k, (line, column) in written.items():  # a key written out keeps its place
                self.lines[(*loc, k)], self.columns[(*loc, k)] = line, column
        return out

    def scalar(self, node: yaml.Node) -> Any:
        # Resolved with the safe constructor so types match yaml.safe_load; what it refuses (a
        # custom or Python tag) is a located error, not a traceback.
        loader = yaml.SafeLoader("")
        try:
            return loader.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as exc:
            raise self.error(node, str(exc.problem or exc)) from None
        except (ValueError, OverflowError) as exc:  # 2024-02-30 resolves as a date; 5,000 digits as an int
            text = str(node.value)
            shown = text if len(text) <= 40 else f"{text[:37]}..."
            raise self.error(node, f"{shown!r} is not a valid {node.tag.rsplit(':', 1)[-1]}: {exc}") from None
        finally:
            loader.dispose()


def load_located(text: str, path: str = "<string>") -> LocatedYaml:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except RecursionError:  # the composer recurses per level, before MAX_DEPTH could be checked
        raise YamlSyntaxError(path, 1, 1, f"nested more than {MAX_DEPTH} levels deep") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        col = mark.column + 1 if mark else 1
        raise YamlSyntaxError(path, line, col, str(exc.problem or exc)) from None
    if root is None:
        return LocatedYaml(None, {(): 1}, path)
    walk = _Walk(path)
    walk.size(root, {})  # first: a cycle or an alias bomb is refused before anything is built
    data = walk.walk(root, ())
    return LocatedYaml(data, walk.lines, path, walk.columns)


def line_col(text: str, index: int) -> tuple[int, int]:
    r"""The 1-based (line, column) of ``text[index]``, for located messages.

    >>> line_col("ab\ncd", 4)
    (2, 2)
    """
    return text.count("\n", 0, index) + 1, index - (text.rfind("\n", 0, index) + 1) + 1


def read_utf8(path: Path) -> str:
    """A file's text; one that cannot be read (missing, a folder, not UTF-8) raises
    :class:`YamlSyntaxError` naming the line of the first bad byte (any text file, not only YAML)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise YamlSyntaxError(str(path), line, 1, f"not UTF-8 text (byte {exc.object[exc.start]:#04x})") from None
    except OSError as exc:
        raise UnreadableFile(str(path), 1, 1, f"cannot read: {exc.strerror or exc}") from None


def load_located_file(path: str | Path) -> LocatedYaml:
    """As :func:`load_located`; a file that cannot be read (missing, a folder, not UTF-8) is a located error too."""
    p = Path(path)
    return load_located(read_utf8(p), str(p))
