"""``dvmrl info``: how the core was built and what it can use now."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers) -> None:
    """Register ``dvmrl info``."""
    parser = subparsers.add_parser(
        "info",
        help="show version, compiler, threads and CUDA support",
        description=(
            "Show the dvmrl version, the compiler and thread backend of the "
            "compiled core, whether CUDA was compiled in and for which "
            "architectures, and whether a GPU is usable now."
        ),
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the build information."""
    from dvmrl import build_info

    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    width = max(len(key) for key in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0
