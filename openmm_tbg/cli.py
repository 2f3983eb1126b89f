"""The ``openmm-tbg`` command line.

Each subcommand lives in its own module, imported only when that subcommand runs. A module in the command
table defines ``configure_parser(parser: argparse.ArgumentParser) -> None`` and ``run_from_cli(args) -> int``.

Errors that a user can fix (an unsupported peptide, an unreadable checkpoint or data set, a bad value, a
missing file; see `is_user_error`) are printed as one line, ``openmm-tbg: error: <message>``, with exit status
2 and no traceback; ``-v`` prints the traceback as well. Any other exception is a bug and propagates with its
traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import sys
import traceback
from typing import Sequence

from . import __version__

#: Exit status of a known (user-fixable) error, as for argparse's bad arguments.
ERROR_EXIT_STATUS = 2

#: Names of openmm_tbg exception classes that report a user-fixable problem. Matched by class name along the
#: exception's MRO (and an ``openmm_tbg`` module), so that they need not be imported here and may move between
#: modules (``openmm_tbg.data`` may become a package).
USER_ERROR_NAMES = frozenset({"UnsupportedTopologyError", "CheckpointError", "DatasetError", "TestSplitError",
                              "CommandUnavailableError"})
#: Built-in exceptions raised by the input checks (bad values and types, missing or unreadable paths).
USER_ERROR_TYPES = (ValueError, TypeError, FileNotFoundError, FileExistsError, IsADirectoryError,
                    NotADirectoryError, PermissionError)

#: Subcommand -> (module, one-line help).
COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("openmm_tbg.data", "generate MD training data (XY.pdb + XY.npz) with OpenMM"),
    "train": ("openmm_tbg.training", "train a transferable flow (flow matching or maximum likelihood)"),
    "sample": ("openmm_tbg.sample_command", "draw Boltzmann-generator samples for a peptide"),
    "refine": ("openmm_tbg.refine_command", "refine a model on one peptide's System with its energies (no MD)"),
    "evaluate": ("openmm_tbg.evaluation", "evaluate a model against MD (ESS, W2, Ramachandran)"),
}


class CommandUnavailableError(RuntimeError):
    """A subcommand's module is missing or does not define the CLI hooks."""


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` reports a problem with the user's input (printed as one line) rather than a bug.

    Parameters
    ----------
    exc : BaseException
        The exception raised by a subcommand.

    Returns
    -------
    bool
        True for `USER_ERROR_TYPES` and for openmm_tbg exceptions named in `USER_ERROR_NAMES` (or subclasses).
    """
    if isinstance(exc, USER_ERROR_TYPES):
        return True
    return any(cls.__name__ in USER_ERROR_NAMES and cls.__module__.split(".")[0] == "openmm_tbg"
               for cls in type(exc).__mro__)


def format_error(exc: BaseException) -> str:
    """The one-line report of a user error: ``openmm-tbg: error: <message>``."""
    if isinstance(exc, OSError) and exc.errno is not None and exc.strerror:
        # raised by the OS ("[Errno 2] No such file or directory: 'x'"): drop the errno prefix
        message = exc.strerror if exc.filename is None else f"{exc.strerror}: {exc.filename!r}"
    else:
        message = str(exc).strip() or type(exc).__name__
    return f"openmm-tbg: error: {message}"


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
                        help="more logging (-v: INFO, -vv: DEBUG) and a traceback with any error")
    parser.add_argument("--version", action="version", version=f"openmm-tbg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        # Also accepted after the command name ("openmm-tbg sample ... -v"); SUPPRESS keeps a -v given before it.
        sp.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more logging (-v: INFO, -vv: DEBUG) and a traceback with any error")
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
    """Run ``openmm-tbg``; returns the exit status.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (default ``sys.argv[1:]``).

    Returns
    -------
    int
        0 on success, 1 without a command, `ERROR_EXIT_STATUS` (2) for a user error (see `is_user_error`),
        130 when interrupted. Bad arguments exit through argparse (``SystemExit(2)``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _find_command(argv)
    verbose = any(a == "--verbose" or re.fullmatch(r"-v+", a) for a in argv)
    try:
        parser = build_parser(command)
    except CommandUnavailableError as exc:
        return _report(exc, verbose)
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger("openmm_tbg").setLevel(level)
    if args.command is None:
        parser.print_help()
        return 1
    try:
        module = _load_command(args.command)
        result = module.run_from_cli(args)
    except KeyboardInterrupt:
        print("openmm-tbg: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - user errors become one line; anything else is re-raised
        if not is_user_error(exc):
            raise
        return _report(exc, args.verbose > 0)
    return int(result or 0)


def _report(exc: BaseException, verbose: bool) -> int:
    """Print a user error as one line (after its traceback with ``-v``) and return `ERROR_EXIT_STATUS`."""
    if verbose:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(format_error(exc), file=sys.stderr)
    return ERROR_EXIT_STATUS


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
