"""``dvmrl data``: list, describe, split and download data sets."""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback

from dvmrl.cli._common import EXIT_FAILURE, UsageError, fraction


def add_parser(subparsers) -> None:
    """Register ``dvmrl data`` with its list, info, split and fetch subcommands."""
    parser = subparsers.add_parser(
        "data",
        help="list, describe, split and download data sets",
        description=(
            "Work with the vendored alloy data sets (binary and ternary all-metal "
            "compositions, targets in eV/atom) and with your own CSV files."
        ),
    )
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")
    actions.required = True

    listing = actions.add_parser(
        "list",
        help="list the vendored data sets",
        description="List the vendored data sets.",
    )
    listing.add_argument(
        "--json", action="store_true", help="print JSON instead of a table"
    )
    listing.set_defaults(func=run_list)

    info = actions.add_parser(
        "info",
        help="show counts, units, target statistics and attribution",
        description=(
            "Show the row counts, binaries and ternaries, units, target statistics, "
            "source and attribution of a data set or CSV file."
        ),
    )
    _add_data_arguments(info)
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=run_info)

    split = actions.add_parser(
        "split",
        help="write the train / validation / test indices of a split",
        description=(
            "Write the row indices (positions, 0-based) of the train, validation "
            "pool and test parts of a split to .npz or .json. The test part does "
            "not depend on --seed."
        ),
    )
    _add_data_arguments(split)
    from dvmrl.splits import KINDS

    split.add_argument("--split", required=True, choices=KINDS, help="split kind")
    split.add_argument(
        "--seed", type=int, default=0, help="seed of the train / validation division"
    )
    split.add_argument(
        "--holdout-element",
        metavar="X",
        help="element symbol whose compositions form the test part (--split element)",
    )
    split.add_argument(
        "--test-fraction",
        type=fraction,
        default=None,
        help="test share for the random and chemsys splits (default: 0.1); the "
        "element and binary-to-ternary splits fix their test part by chemistry",
    )
    split.add_argument(
        "--val-fraction",
        type=fraction,
        default=0.1,
        help="validation-pool share (default: 0.1)",
    )
    split.add_argument(
        "--out", required=True, metavar="PATH", help="output file, .npz or .json"
    )
    split.set_defaults(func=run_split)

    fetch = actions.add_parser(
        "fetch",
        # No prefix matching, so that "--api-key KEY" is never read as
        # "--api-key-file KEY" and echoed in a file-not-found message.
        allow_abbrev=False,
        help="download all-metal binaries and ternaries from the Materials Project",
        description=(
            "Download binary and ternary all-metal materials from the Materials "
            "Project with mp-api, keep the lowest-energy polymorph per formula and "
            "write a data set CSV plus a JSON file with the database version. The "
            "API key is read from MP_API_KEY, PMG_MAPI_KEY or --api-key-file, never "
            "from the command line."
        ),
    )
    from dvmrl.datasets.materials_project import PROPERTIES

    fetch.add_argument(
        "--property", required=True, choices=list(PROPERTIES), help="target property"
    )
    fetch.add_argument(
        "--out", required=True, metavar="PATH", help="output CSV (.csv or .csv.gz)"
    )
    fetch.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="file that contains only the API key; default: MP_API_KEY or PMG_MAPI_KEY",
    )
    # Rejected in run_fetch: a key given on the command line would show in the
    # process list and the shell history.
    fetch.add_argument("--api-key", dest="api_key_value", help=argparse.SUPPRESS)
    fetch.set_defaults(func=run_fetch)


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "data", metavar="NAME", help="vendored data set name or CSV path"
    )
    parser.add_argument(
        "--formula-column", default="formula", help="formula column of a CSV file"
    )
    parser.add_argument(
        "--target-column",
        default="target",
        help="target column of a CSV file (eV/atom)",
    )
    parser.add_argument(
        "--alloy-notation",
        action="store_true",
        help=(
            "read a CSV file's group amounts as at.%% shares, so that "
            "(CoCrFeNi)90Al10 has 10%% Al"
        ),
    )
    parser.add_argument(
        "--hume-rothery",
        action="store_true",
        help="keep only compositions that pass the Hume-Rothery screen",
    )
    parser.add_argument(
        "--max-size-mismatch",
        type=float,
        default=0.15,
        help="largest atomic-size mismatch delta (a fraction; default 0.15)",
    )
    parser.add_argument(
        "--max-electronegativity-spread",
        type=float,
        default=0.4,
        help="largest Pauling electronegativity spread of the screen (default 0.4)",
    )


def _resolve(args: argparse.Namespace):
    from dvmrl.datasets import resolve_data

    return resolve_data(
        args.data,
        formula_column=args.formula_column,
        target_column=args.target_column,
        alloy_notation=args.alloy_notation,
        hume_rothery=args.hume_rothery,
        max_size_mismatch=args.max_size_mismatch,
        max_electronegativity_spread=args.max_electronegativity_spread,
    )


def run_list(args: argparse.Namespace) -> int:
    """Print the vendored data sets."""
    from dvmrl.datasets import DEFAULT_DATASET, dataset_info, list_datasets

    infos = [dataset_info(name) for name in list_datasets()]
    if args.json:
        rows = [
            {key: info[key] for key in ("name", "rows", "target", "units", "source")}
            for info in infos
        ]
        print(json.dumps(rows, indent=2))
        return 0
    width = max(len(info["name"]) for info in infos)
    for info in infos:
        default = " (default)" if info["name"] == DEFAULT_DATASET else ""
        print(
            f"{info['name']:<{width}}  {info['rows']:>6} rows  {info['target']} "
            f"({info['units']}){default}"
        )
    return 0


def _statistics(df) -> dict:
    target = df["target"]
    return {
        "mean": float(target.mean()),
        "std": float(target.std()),
        "min": float(target.min()),
        "q25": float(target.quantile(0.25)),
        "median": float(target.median()),
        "q75": float(target.quantile(0.75)),
        "max": float(target.max()),
    }


def run_info(args: argparse.Namespace) -> int:
    """Print counts, statistics and the attribution of a data set."""
    df, info = _resolve(args)
    threshold = info.get("stability_threshold")
    stable = None if threshold is None else int((df["target"] <= threshold).sum())
    summary = {
        "name": info.get("name"),
        "source": info.get("source"),
        "rows": len(df),
        "binaries": int((df["n_elements"] == 2).sum()),
        "ternaries": int((df["n_elements"] == 3).sum()),
        "chemical_systems": int(df["chemsys"].nunique()),
        "elements": len(set("-".join(df["chemsys"]).split("-"))),
        "units": info.get("units", "eV/atom"),
        "target_kind": info.get("target_kind"),
        "stability_threshold": threshold,
        "stable_rows": stable,
        "target_statistics": _statistics(df),
        "hume_rothery_screen": info.get("hume_rothery_screen"),
        "licence": info.get("licence"),
        "attribution": info.get("attribution"),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    units = summary["units"]
    print(f"{summary['name']}: {summary['source']}")
    print(
        f"rows {summary['rows']} ({summary['binaries']} binaries, "
        f"{summary['ternaries']} ternaries), {summary['chemical_systems']} chemical "
        f"systems, {summary['elements']} elements"
    )
    stats = summary["target_statistics"]
    print(
        f"target ({units}): mean {stats['mean']:.4f}, std {stats['std']:.4f}, "
        f"min {stats['min']:.4f}, median {stats['median']:.4f}, max {stats['max']:.4f}"
    )
    if stable is not None:
        print(
            f"stable (target <= {threshold:g} {units}): {stable} of {summary['rows']}"
        )
    screen = summary["hume_rothery_screen"]
    if screen:
        print(
            f"Hume-Rothery screen on: delta <= {screen['max_size_mismatch']:g}, "
            f"electronegativity spread <= {screen['max_electronegativity_spread']:g}, "
            f"kept {screen['rows_after']} of {screen['rows_before']} rows"
        )
    else:
        print("Hume-Rothery screen off")
    if summary["licence"]:
        print(f"licence: {summary['licence']}")
    print(f"attribution: {summary['attribution']}")
    return 0


def run_split(args: argparse.Namespace) -> int:
    """Write the index arrays of a split."""
    from dvmrl.splits import make_split

    if not args.out.lower().endswith((".npz", ".json")):
        raise UsageError(f"--out {args.out!r} must end in .npz or .json")
    if args.split == "element" and not args.holdout_element:
        raise UsageError("--split element needs --holdout-element X (such as Ni)")
    if args.split != "element" and args.holdout_element:
        raise UsageError("--holdout-element applies only to --split element")
    if args.test_fraction is not None and args.split not in ("random", "chemsys"):
        raise UsageError(
            f"--test-fraction applies only to --split random and chemsys; the "
            f"{args.split} split puts every composition of its held-out chemistry "
            "in the test part, so drop --test-fraction"
        )
    test_fraction = 0.1 if args.test_fraction is None else args.test_fraction
    shares = (("test-fraction", test_fraction), ("val-fraction", args.val_fraction))
    for name, value in shares:
        if not math.isfinite(value):
            raise UsageError(f"--{name} must be a finite number")
    df, info = _resolve(args)
    split = make_split(
        df,
        args.split,
        seed=args.seed,
        holdout_element=args.holdout_element,
        test_fraction=test_fraction,
        val_fraction=args.val_fraction,
    )
    sizes = split.sizes()
    if sizes["test"] == 0 and args.split in ("random", "chemsys"):
        raise UsageError(
            f"--test-fraction {test_fraction:g} leaves the test part of the "
            f"{len(df)} compositions empty; pass a larger share, such as 0.1 "
            "(nothing was written)"
        )
    if sizes["test"] == 0:
        raise UsageError(
            f"the {args.split} split of {info.get('name')} has an empty test part "
            "(nothing was written); choose another split or data set"
        )
    if sizes["val"] == 0 and args.val_fraction > 0:
        raise UsageError(
            f"--val-fraction {args.val_fraction:g} leaves the validation part "
            "empty; pass a larger share, such as 0.1, or 0 for no validation part "
            "(nothing was written)"
        )
    split.save(args.out)
    screen = " (Hume-Rothery screen on)" if info.get("hume_rothery_screen") else ""
    print(
        f"wrote {args.out}: {args.split} split of {info.get('name')}{screen}, "
        f"train {sizes['train']}, val {sizes['val']}, test {sizes['test']}, "
        f"fingerprint {split.fingerprint()[:12]}"
    )
    return 0


def run_fetch(args: argparse.Namespace) -> int:
    """Download a data set from the Materials Project."""
    from dvmrl.datasets.materials_project import (
        MissingDependencyError,
        QueryError,
        fetch_materials_project,
    )

    if args.api_key_value is not None:
        raise UsageError(
            "--api-key is not accepted because a key on the command line shows in "
            "the process list and the shell history: set MP_API_KEY or pass "
            "--api-key-file FILE"
        )
    try:
        metadata = fetch_materials_project(
            args.property, args.out, api_key_file=args.api_key_file
        )
    except MissingDependencyError as err:
        raise UsageError(str(err)) from None
    except QueryError as err:
        # The service or the network failed, not dvmrl, so no traceback hint.
        if getattr(args, "verbose", False):
            traceback.print_exc()
        print(
            f"dvmrl data fetch: error: {err}; check that api.materialsproject.org "
            "can be reached from this machine and that the API key is valid, then "
            "rerun (nothing was written)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    print(
        f"wrote {args.out}: {metadata['rows']} compositions "
        f"({metadata['binaries']} binaries, {metadata['ternaries']} ternaries) from "
        f"Materials Project database {metadata['database_version']}, thermo type "
        f"{metadata['thermo_type']}"
    )
    return 0
