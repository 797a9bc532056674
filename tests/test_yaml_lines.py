"""The located YAML loader behind inventories, configs and policy manifests: what it refuses, and where."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from decision.yaml_lines import YamlSyntaxError, load_located, load_located_file


def _error(text: str) -> YamlSyntaxError:
    with pytest.raises(YamlSyntaxError) as err:
        load_located(text, "f.yaml")
    return err.value


def test_legitimate_aliases_still_load_with_their_lines() -> None:
    doc = load_located("base: &b {gpu: H100, count: 8}\nnodes:\n  - *b\n  - *b\n", "f.yaml")
    assert doc.data["nodes"] == [{"gpu": "H100", "count": 8}] * 2
    assert doc.line_of(("nodes", 1)) == 1  # an alias reports where its anchor is


def test_an_alias_bomb_is_refused_at_once() -> None:
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i, name in enumerate("bcdefghi"):
        prev = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")  # 9**9 leaves in the end
    t0 = time.perf_counter()
    err = _error("\n".join(lines) + "\n")
    assert "expands to more than" in str(err) and time.perf_counter() - t0 < 2.0


def test_a_cycle_is_refused() -> None:
    assert "contains it (a cycle)" in str(_error("a: &a [*a]\n"))


def test_duplicate_keys_are_refused_with_both_lines() -> None:
    err = _error("node:\n  gpu_count: 8\n  site: s\n  gpu_count: 64\n")
    assert (err.line, "duplicate key 'gpu_count' (the earlier one is on line 2)") == (4, str(err).split(": ", 1)[1])


@pytest.mark.parametrize("text", ["? {a: 1}\n: x\n", "? [a, b]\n: x\n"])
def test_a_mapping_or_list_as_a_key_is_refused(text: str) -> None:
    assert "a mapping key must be a plain value" in str(_error(text))


def test_unreadable_files_are_located_errors(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"a: 1\nb: caf\xe9\n")
    with pytest.raises(YamlSyntaxError, match=r"latin1\.yaml:2:1: not UTF-8 text \(byte 0xe9\)"):
        load_located_file(bad)
    with pytest.raises(YamlSyntaxError, match="cannot read: Is a directory"):
        load_located_file(tmp_path)
    with pytest.raises(YamlSyntaxError, match="cannot read: No such file"):
        load_located_file(tmp_path / "missing.yaml")


def test_merge_keys_take_a_mappings_keys_and_the_written_ones_win() -> None:
    text = ("defaults: &d {gpu_type: H100, gpu_count: 8}\nmore: &m {watts: 700, gpu_count: 4}\n"
            "nodes:\n  - <<: *d\n    id: n1\n  - <<: [*d, *m]\n    id: n2\n    gpu_count: 2\n")
    doc = load_located(text, "f.yaml")
    assert doc.data["nodes"] == [{"id": "n1", "gpu_type": "H100", "gpu_count": 8},
                                 {"id": "n2", "gpu_count": 2, "gpu_type": "H100", "watts": 700}]
    assert doc.line_of(("nodes", 1, "id")) == 7
    assert "a merge key (<<) takes a mapping" in str(_error("a:\n  <<: 5\n"))
    # A key written out keeps its own line (an error in it must not point at the anchor's).
    assert doc.line_of(("nodes", 1, "gpu_count")) == 8 and doc.line_of(("nodes", 1, "watts")) == 2


@pytest.mark.parametrize(("text", "message"), [
    ("id: n1\nday: 2024-02-30\n", "'2024-02-30' is not a valid timestamp: day is out of range"),
    ("id: n1\nreplica: 2024-13-01\n", "'2024-13-01' is not a valid timestamp: month must be in 1..12"),
    ("id: n1\ncount: " + "9" * 5000 + "\n", "'" + "9" * 37 + "...' is not a valid int: Exceeds the limit"),
])
def test_a_scalar_its_type_cannot_hold_is_a_located_error(text: str, message: str) -> None:
    err = _error(text)
    assert err.line == 2 and message in str(err)


@pytest.mark.parametrize(("text", "line", "message"), [
    ("a: 1\nb: !custom 2\n", 2, "could not determine a constructor for the tag '!custom'"),
    ("a: !!python/name:os.system\n", 1, "python/name:os.system"),
    ("a: 1\nb: !!python/object:os.x {k: 1}\n", 2, "unsupported tag"),
])
def test_tags_safe_yaml_does_not_take_are_located_errors(text: str, line: int, message: str) -> None:
    err = _error(text)
    assert err.line == line and message in str(err)


def test_deep_nesting_is_a_located_error_not_a_crash() -> None:
    assert "nested more than 64 levels deep" in str(_error("a: " + "[" * 100 + "]" * 100 + "\n"))
    assert "nested more than 64 levels deep" in str(_error("a: " + "[" * 5000 + "]" * 5000 + "\n"))
