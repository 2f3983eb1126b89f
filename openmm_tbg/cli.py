"""The ``openmm-tbg`` command line.

Each subcommand lives in its own module, imported only when that subcommand runs. A module in the command
table defines ``configure_parser(parser: argparse.ArgumentParser) -> None`` and ``run_from_cli(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

#: Subcommand -> (module, one-line help).
COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("openmm_tbg.data", "generate MD training data (XY.pdb + XY.npz) with OpenMM"),
    "train": ("openmm_tbg.training", "train a transferable flow by flow matching"),
    "sample": ("openmm_tbg.sampler", "draw Boltzmann-generator samples for a peptide"),
    "evaluate": ("openmm_tbg.evaluation", "evaluate a model against MD (ESS, W2, Ramachandran)"),
}


class CommandUnavailableError(RuntimeError):
    """A subcommand's module is missing or does not define the CLI hooks."""


def _load_command(name: str):
    module_name = COMMANDS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise CommandUnavailableError(
                f"The '{name}' command needs the module {module_name}, which is not part of this installation; "
                "update openmm_tbg (pip install -e . from a complete checkout).") from exc
        raise CommandUnavailableError(
            f"The '{name}' command could not import {module_name}: missing dependency {exc.name!r}. "
            f"Install it (pip install {exc.name}).") from exc
    missing = [f for f in ("configure_parser", "run_from_cli") if not callable(getattr(module, f, None))]
    if missing:
        raise CommandUnavailableError(
            f"The '{name}' command is not available: {module_name} does not define {' and '.join(missing)}.")
    return module


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; only ``command``'s module is imported to configure its subparser."""
    parser = argparse.ArgumentParser(
        prog="openmm-tbg",
        description="Transferable Boltzmann generators for OpenMM peptides.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging (-v: INFO, -vv: DEBUG)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            _load_command(name).configure_parser(sp)
    return parser


def _find_command(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if arg in COMMANDS:
            return arg
        if not arg.startswith("-"):
            return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``openmm-tbg``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _find_command(argv)
    try:
        parser = build_parser(command)
    except CommandUnavailableError as exc:
        print(f"openmm-tbg: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger("openmm_tbg").setLevel(level)
    if args.command is None:
        parser.print_help()
        return 1
    module = _load_command(args.command)
    result = module.run_from_cli(args)
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
