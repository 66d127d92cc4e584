"""The ``pdeds`` command: a thin dispatcher over subcommand modules.

    pdeds data --out held_out.h5 --dim 3 --samples 16 --res 33 --reference
    pdeds data --inspect held_out.h5
    pdeds solve --coeffs held_out.h5 --res 65 --out ref65.h5

Each name in :data:`SUBCOMMANDS` is a module ``pdeds.cli.<name>`` exposing
``add_parser(subparsers)`` (adds its parser with ``subparsers.add_parser(name, ...)``) and
``run(args) -> int``; a name whose module does not exist yet is skipped, so adding a
subcommand is adding its module. Keep those modules' top-level imports light (argparse and
pdeds.errors): ``pdeds --help`` imports all of them, while torch and h5py are imported inside
``run``.

Every :class:`~pdeds.errors.PdedsError` (including argparse's own usage errors) is printed as
one line ``pdeds: error: <message>`` on stderr with exit status 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

import pdeds
from pdeds.errors import PdedsError

SUBCOMMANDS = ["data", "solve", "train", "eval", "predict", "study", "report", "plan"]
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors become one-line PdedsErrors instead of exits."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise PdedsError(f"{message}; see `{self.prog} --help`")


def _subcommand_modules() -> dict[str, ModuleType]:
    modules = {}
    for name in SUBCOMMANDS:
        qualified = f"{__name__}.{name}"
        try:
            modules[name] = importlib.import_module(qualified)
        except ModuleNotFoundError as err:
            if err.name != qualified:
                raise
    return modules


def build_parser(modules: dict[str, ModuleType]) -> Parser:
    """The top-level parser with one subparser per available subcommand module."""
    parser = Parser(
        prog="pdeds",
        description="Data-free neural solvers for -div(nu grad u) = f, trained with DeepSpeed.",
    )
    parser.add_argument("--version", action="version", version=f"pdeds {pdeds.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for module in modules.values():
        module.add_parser(sub)
    return parser


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pdeds`` with ``argv`` (default sys.argv[1:]) and return the exit status."""
    try:
        modules = _subcommand_modules()
        parser = build_parser(modules)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_ERROR
        return int(modules[args.command].run(args) or 0)
    except PdedsError as err:
        print(f"pdeds: error: {_one_line(str(err))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("pdeds: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as done:  # --help and --version exit through argparse
        if done.code is None:
            return 0
        return done.code if isinstance(done.code, int) else EXIT_ERROR
