#!/usr/bin/env python3
"""Rebuild the vendored alloy data sets from the raw DFT files.

Usage: scripts/build_datasets.py [--raw-dir DIR] [--out-dir DIR] [NAME ...]

Writes python/dvmrl/datasets/data/<name>.csv.gz and <name>.json. The raw
folder defaults to ../shared/data next to the repository. The selection
rules live in dvmrl.datasets.build.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "python"))

from dvmrl.datasets.build import RECIPES, build_all  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"data sets to build; default: all of {', '.join(RECIPES)}",
    )
    parser.add_argument(
        "--raw-dir",
        type=Path,
        default=ROOT.parent / "shared" / "data",
        help="folder with the raw CSV files; default: %(default)s",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=ROOT / "python" / "dvmrl" / "datasets" / "data",
        help="folder for the .csv.gz and .json outputs; default: %(default)s",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    unknown = [name for name in args.names if name not in RECIPES]
    if unknown:
        parser.error(f"unknown data set(s) {unknown}: expected some of {list(RECIPES)}")
    try:
        written = build_all(args.raw_dir, args.out_dir, args.names or None)
    except FileNotFoundError as err:
        print(f"build_datasets: error: {err}", file=sys.stderr)
        return 2
    for name, metadata in written.items():
        dropped = ", ".join(f"{k}={v}" for k, v in metadata["rows_dropped"].items())
        print(
            f"{name}: {metadata['rows']} rows ({metadata['binaries']} binaries, "
            f"{metadata['ternaries']} ternaries) from {metadata['input_rows']} raw "
            f"rows; dropped {dropped}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
