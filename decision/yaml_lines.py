"""Load YAML while remembering the line of every mapping key and list item.

Validation errors (pydantic's ``loc`` tuples) can then be reported as ``file:line: field``,
which is what a person editing an inventory or a policy manifest needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

Loc = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class LocatedYaml:
    """A parsed YAML document and the 1-based line of every path in it."""

    data: Any
    lines: dict[Loc, int]
    path: str

    def line_of(self, loc: Sequence[str | int]) -> int:
        """Line of the deepest known prefix of ``loc`` (1 when nothing matches)."""
        key: Loc = tuple(loc)
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key[:-1]
        return self.lines.get((), 1)


class YamlSyntaxError(ValueError):
    def __init__(self, path: str, line: int, column: int, message: str) -> None:
        super().__init__(f"{path}:{line}:{column}: {message}")
        self.path, self.line, self.column = path, line, column


def field_path(loc: Sequence[str | int], data: Any) -> str:
    """Render a pydantic ``loc`` as ``deployments[3](id=x).address``: the item's id helps a person find it."""
    out = ""
    node = data
    for part in loc:
        if isinstance(part, int):
            ident = node[part].get("id") if isinstance(node, list) and part < len(node) and \
                isinstance(node[part], dict) else None
            out += f"[{part}]" + (f"(id={ident})" if ident else "")
            node = node[part] if isinstance(node, list) and part < len(node) else None
        else:
            out += ("." if out else "") + part
            node = node.get(part) if isinstance(node, dict) else None
    return out or "(document)"


def _walk(node: yaml.Node, loc: Loc, lines: dict[Loc, int]) -> Any:
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = yaml.safe_load(yaml.serialize(key_node)) if not isinstance(key_node, yaml.ScalarNode) \
                else _scalar(key_node)
            child: Loc = (*loc, key)
            lines[child] = key_node.start_mark.line + 1
            out[key] = _walk(value_node, child, lines)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_walk(item, (*loc, i), lines) for i, item in enumerate(node.value)]
    return _scalar(node)


def _scalar(node: yaml.Node) -> Any:
    # Resolve the scalar with the safe constructor so types match yaml.safe_load.
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_object(node, deep=True)
    finally:
        loader.dispose()


def load_located(text: str, path: str = "<string>") -> LocatedYaml:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        col = mark.column + 1 if mark else 1
        raise YamlSyntaxError(path, line, col, str(exc.problem or exc)) from None
    lines: dict[Loc, int] = {}
    if root is None:
        return LocatedYaml(None, {(): 1}, path)
    return LocatedYaml(_walk(root, (), lines), lines, path)


def load_located_file(path: str | Path) -> LocatedYaml:
    p = Path(path)
    return load_located(p.read_text(encoding="utf-8"), str(p))
