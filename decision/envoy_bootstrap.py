"""The Envoy bootstrap InferMesh ships (``deploy/envoy/envoy.yaml``), optionally with an identity fragment.

An identity fragment (``deploy/envoy/identity-jwt.yaml``) holds ``http_filters`` that go first in
the inference listener's chain (they set the decision context's identity headers from a verified
token, after dropping the client's copies) and the ``clusters`` those filters need. Splicing it in
here, rather than shipping a second whole bootstrap, keeps one filter chain to review.

Print a spliced bootstrap with ``python -m decision.envoy_bootstrap --identity FILE``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, cast

import yaml

TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "envoy" / "envoy.yaml"
IDENTITY_JWT = TEMPLATE.with_name("identity-jwt.yaml")


class BootstrapError(ValueError):
    """A template or fragment that cannot be used, naming the file and what is wrong."""


def _load(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise BootstrapError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise BootstrapError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(doc, dict):
        raise BootstrapError(f"{path}: expected a mapping at the top level")
    return doc


def _named(cfg: dict[str, Any], section: str, name: str) -> dict[str, Any]:
    for item in cfg["static_resources"][section]:
        if item["name"] == name:
            return cast(dict[str, Any], item)
    raise KeyError(f"no {section.rstrip('s')} {name!r} in the Envoy bootstrap")


def listener(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    return _named(cfg, "listeners", name)


def cluster(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    return _named(cfg, "clusters", name)


def http_filters(lst: dict[str, Any]) -> list[dict[str, Any]]:
    """The HTTP filter chain of a listener's (only) connection manager, in order."""
    return cast(list[dict[str, Any]], lst["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"])


def with_identity(cfg: dict[str, Any], fragment: dict[str, Any], *,
                  source: str = "identity fragment") -> dict[str, Any]:
    """``cfg`` with ``fragment``'s filters first in the inference listener and its clusters added (in place)."""
    filters, clusters = fragment.get("http_filters"), fragment.get("clusters", [])
    if not isinstance(filters, list) or not filters or not all(isinstance(f, dict) and "name" in f for f in filters):
        raise BootstrapError(f"{source}: 'http_filters' must be a non-empty list of filters, each with a name")
    if not isinstance(clusters, list) or not all(isinstance(c, dict) and "name" in c for c in clusters):
        raise BootstrapError(f"{source}: 'clusters' must be a list of clusters, each with a name")
    taken = {c["name"] for c in cfg["static_resources"]["clusters"]}
    clash = sorted(taken & {c["name"] for c in clusters})
    if clash:
        raise BootstrapError(f"{source}: cluster {clash[0]!r} is already in the bootstrap")
    chain = http_filters(listener(cfg, "inference"))
    chain[:0] = filters
    cfg["static_resources"]["clusters"].extend(clusters)
    return cfg


def load_bootstrap(template: Path = TEMPLATE, identity: Path | None = None) -> dict[str, Any]:
    """The bootstrap at ``template``, with the identity fragment at ``identity`` spliced in when given."""
    cfg = _load(template)
    if identity is not None:
        with_identity(cfg, _load(identity), source=str(identity))
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m decision.envoy_bootstrap",
                                 description="print InferMesh's Envoy bootstrap, optionally with an identity fragment")
    ap.add_argument("--template", type=Path, default=TEMPLATE, help=f"the bootstrap (default {TEMPLATE.name})")
    ap.add_argument("--identity", type=Path, help=f"an identity fragment, e.g. deploy/envoy/{IDENTITY_JWT.name}")
    args = ap.parse_args(argv)
    try:
        cfg = load_bootstrap(args.template, args.identity)
    except BootstrapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(yaml.safe_dump(cfg, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
