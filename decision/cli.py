"""The ``infermesh`` command line. Each package registers its own subcommands here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Register = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def _registrars() -> list[Register]:
    # Imported lazily so `infermesh fleet check` does not pay for numpy, grpc or the simulator.
    from decision import cli_spine

    regs: list[Register] = [cli_spine.register]
    # --- subcommand registrars of the other packages (one line each) ---
    from audit import cli as audit_cli
    from learners import cli as learners_cli

    regs.append(audit_cli.register)
    regs.append(learners_cli.register)
    from sim import cli as sim_cli; regs.append(sim_cli.register)  # noqa: E702, I001
    from policies import cli as policies_cli; regs.append(policies_cli.register)  # noqa: E702, I001
    return regs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="infermesh", description="InferMesh inference-routing decision service")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in _registrars():
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
