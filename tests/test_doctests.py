"""The docstring examples are part of the documentation: every one must run as shown."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

PACKAGES = ("decision", "policies", "learners", "audit", "sim")


def _modules_with_examples() -> list[str]:
    names: list[str] = []
    for pkg_name in PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{pkg_name}."):
            spec = importlib.util.find_spec(info.name)
            origin = spec.origin if spec is not None else None
            if origin and origin.endswith(".py"):
                with open(origin, encoding="utf-8") as fh:
                    if ">>>" in fh.read():
                        names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("module_name", _modules_with_examples())
def test_docstring_examples_run(module_name: str) -> None:
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {module_name}"
