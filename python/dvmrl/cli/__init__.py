"""The ``dvmrl`` command: one entry point with a subcommand per task.

Exit codes: 0 on success, 2 on bad usage or bad input (the error names the
value and the fix), 1 on an internal failure. Errors go to stderr as one
line; ``--verbose`` adds the traceback.
"""

from __future__ import annotations

import os

# PyTorch's bundled OpenMP runtime spins idle threads after each parallel
# region by default. On a loaded 2-core machine (load average 5) that made a
# forward+backward step of the plain PyTorch model at B = 16 about 3x slower
# (34-44 ms against 11-14 ms). Passive waiting must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import importlib
import logging
import sys
import traceback

from dvmrl.cli._common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, UsageError

# Each module defines add_parser(subparsers), which registers one or more
# subcommands and sets ``func(args) -> int`` on them.
_SUBCOMMAND_MODULES = [
    "dvmrl.cli.info",
    "dvmrl.cli.train",
    "dvmrl.cli.data",
    "dvmrl.cli.agent",
    "dvmrl.cli.run",
    "dvmrl.cli.validate",
]

logger = logging.getLogger("dvmrl")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="dvmrl",
        description=(
            "Composition graph neural networks for alloy thermodynamics, with "
            "adversarial and dynamic validation and a meta-trained DQN agent."
        ),
    )
    parser.add_argument(
        "--verbose", action="store_true", help="log debug messages and tracebacks"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in _SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the ``dvmrl`` command and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or EXIT_OK)
    except (UsageError, ValueError, FileNotFoundError, FileExistsError) as err:
        # Bad input from the user: one line that names the value and the fix.
        if args.verbose:
            traceback.print_exc()
        print(f"dvmrl {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"dvmrl {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the CLI reports every failure
        if args.verbose:
            traceback.print_exc()
        print(
            f"dvmrl {args.command}: internal error: {type(err).__name__}: {err} "
            "(rerun with --verbose for the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
