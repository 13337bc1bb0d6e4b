"""``dvmrl data``: list, describe, split and download data sets."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import traceback
from pathlib import Path

from dvmrl._files import json_ready
from dvmrl.cli._common import (
    ALLOY_NOTATION_RULES,
    EXIT_FAILURE,
    UsageError,
    add_target_kind_option,
    check_output_file,
    column_name,
    fraction,
    non_negative_float,
    path_text,
    plural,
    reject_csv_options,
    seed_int,
    stated_or_given_kind,
)
from dvmrl.datasets.filters import (
    DEFAULT_MAX_ELECTRONEGATIVITY_SPREAD,
    DEFAULT_MAX_SIZE_MISMATCH,
)


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
    _add_data_arguments(
        info, kind_effect="it sets the stability threshold that the summary reports"
    )
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=run_info)

    split = actions.add_parser(
        "split",
        help="write the train / validation / test indices of a split",
        description=(
            "Write the row indices of the train, validation pool and test parts "
            "of a split to .npz or .json. An index is the 0-based position of a "
            "data row of the CSV file (the header line and blank lines not "
            "counted) or of the vendored data set. With --hume-rothery the "
            "indices still refer to those rows, the rows that fail the screen "
            "are in no part, and the file records the screen's settings under "
            "params. The test part does not depend on --seed."
        ),
    )
    _add_data_arguments(
        split,
        kind_effect="the split does not depend on it; the targets are only "
        "checked against it (negative hull energies are flagged)",
    )
    from dvmrl.splits import KINDS

    split.add_argument("--split", required=True, choices=KINDS, help="split kind")
    split.add_argument(
        "--seed",
        type=seed_int,
        default=0,
        help="seed of the train / validation division (an integer >= 0; default: 0)",
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
        "--out",
        type=path_text,
        required=True,
        metavar="PATH",
        help="output file, .npz or .json",
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
        "--out",
        type=path_text,
        required=True,
        metavar="PATH",
        help="output CSV (.csv or .csv.gz)",
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


def _add_data_arguments(parser: argparse.ArgumentParser, kind_effect: str) -> None:
    """Add the data argument and the options that read a CSV file.

    ``kind_effect`` is the part of --target-kind's help that names what the
    kind changes.
    """
    parser.add_argument(
        "data", metavar="NAME", help="vendored data set name or CSV path"
    )
    parser.add_argument(
        "--formula-column",
        default=None,
        type=column_name,
        metavar="NAME",
        help="formula column of a CSV file; default: formula",
    )
    parser.add_argument(
        "--target-column",
        default=None,
        type=column_name,
        metavar="NAME",
        help="target column of a CSV file (eV/atom); default: target",
    )
    parser.add_argument(
        "--alloy-notation",
        action="store_true",
        help=(
            "read a CSV file's group amounts as at.%% shares, so that "
            "(CoCrFeNi)90Al10 has 10%% Al; " + ALLOY_NOTATION_RULES
        ),
    )
    add_target_kind_option(parser, effect=kind_effect)
    parser.add_argument(
        "--hume-rothery",
        action="store_true",
        help="keep only compositions that pass the Hume-Rothery screen: the "
        "atomic-size mismatch delta = sqrt(sum_i c_i (1 - r_i / r_mean)^2) of "
        "pymatgen's atomic radii and the Pauling electronegativity spread both "
        "within the limits below",
    )
    # Both thresholds default to None, so that a threshold passed without
    # --hume-rothery is distinguished from the default and rejected.
    parser.add_argument(
        "--max-size-mismatch",
        type=non_negative_float,
        default=None,
        help=(
            "largest atomic-size mismatch delta of the --hume-rothery screen "
            f"(a fraction; default {DEFAULT_MAX_SIZE_MISMATCH:g})"
        ),
    )
    parser.add_argument(
        "--max-electronegativity-spread",
        type=non_negative_float,
        default=None,
        help=(
            "largest Pauling electronegativity spread of the --hume-rothery "
            f"screen (default {DEFAULT_MAX_ELECTRONEGATIVITY_SPREAD:g})"
        ),
    )


def _screen_thresholds(args: argparse.Namespace) -> tuple[float, float]:
    """Return the two thresholds of the screen, with the defaults filled in.

    Raises:
        UsageError: when a threshold is given without --hume-rothery.
    """
    thresholds = {
        "--max-size-mismatch": args.max_size_mismatch,
        "--max-electronegativity-spread": args.max_electronegativity_spread,
    }
    for option, value in thresholds.items():
        if value is not None and not args.hume_rothery:
            raise UsageError(
                f"{option} {value:g} applies only with --hume-rothery: add "
                f"--hume-rothery to apply the screen, or drop {option}"
            )
    size = args.max_size_mismatch
    spread = args.max_electronegativity_spread
    return (
        DEFAULT_MAX_SIZE_MISMATCH if size is None else size,
        DEFAULT_MAX_ELECTRONEGATIVITY_SPREAD if spread is None else spread,
    )


def _resolve(args: argparse.Namespace, hume_rothery: bool | None = None):
    """Load the data of ``args``; ``hume_rothery`` overrides --hume-rothery."""
    from dvmrl.datasets import resolve_data

    reject_csv_options(args, args.data)
    # Rejects a --target-kind that contradicts a fetched file's stated kind,
    # which resolve_data would otherwise replace without a word.
    target_kind = stated_or_given_kind(args.data, args.target_kind)
    max_size_mismatch, max_electronegativity_spread = _screen_thresholds(args)
    return resolve_data(
        args.data,
        formula_column=args.formula_column or "formula",
        target_column=args.target_column or "target",
        target_kind=target_kind or "formation_energy",
        alloy_notation=args.alloy_notation,
        hume_rothery=args.hume_rothery if hume_rothery is None else hume_rothery,
        max_size_mismatch=max_size_mismatch,
        max_electronegativity_spread=max_electronegativity_spread,
    )


def _json_text(payload) -> str:
    """Format ``payload`` as strict JSON, with NaN and infinities as null."""
    return json.dumps(json_ready(payload), indent=2, allow_nan=False)


def run_list(args: argparse.Namespace) -> int:
    """Print the vendored data sets."""
    from dvmrl.datasets import DEFAULT_DATASET, dataset_info, list_datasets

    infos = [dataset_info(name) for name in list_datasets()]
    if args.json:
        rows = [
            {key: info[key] for key in ("name", "rows", "target", "units", "source")}
            for info in infos
        ]
        print(_json_text(rows))
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
    """Return the target statistics, None for an undefined one.

    The standard deviation (ddof 1) of one row is undefined.
    """
    target = df["target"]
    values = {
        "mean": float(target.mean()),
        "std": float(target.std()),
        "min": float(target.min()),
        "q25": float(target.quantile(0.25)),
        "median": float(target.median()),
        "q75": float(target.quantile(0.75)),
        "max": float(target.max()),
    }
    return {
        key: value if math.isfinite(value) else None for key, value in values.items()
    }


def _format_statistic(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.4f}"


def run_info(args: argparse.Namespace) -> int:
    """Print counts, statistics and the attribution of a data set."""
    df, info = _resolve(args)
    threshold = info.get("stability_threshold")
    stable = None if threshold is None else int((df["target"] <= threshold).sum())
    counts = _element_counts(df)
    summary = {
        "name": info.get("name"),
        "source": info.get("source"),
        "rows": len(df),
        "binaries": int((df["n_elements"] == 2).sum()),
        "ternaries": int((df["n_elements"] == 3).sum()),
        # Unaries and compositions of four or more elements, in a user's file.
        "other_compositions": int((~df["n_elements"].isin([2, 3])).sum()),
        "chemical_systems": int(df["chemsys"].nunique()),
        "elements": len(counts),
        # Compositions that contain each element, in the order of the
        # periodic table: the sizes of the test parts of --split element.
        "element_counts": counts,
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
        print(_json_text(summary))
        return 0
    units = summary["units"]
    print(f"{summary['name']}: {summary['source']}")
    other = summary["other_compositions"]
    others = f", {other} of one or of four and more elements" if other else ""
    print(
        f"rows {summary['rows']} ({summary['binaries']} binaries, "
        f"{summary['ternaries']} ternaries{others}), {summary['chemical_systems']} "
        f"chemical systems, {summary['elements']} elements"
    )
    # Wrapped by hand, so that no line break falls between a symbol and its
    # count.
    line = "compositions per element:"
    for symbol, count in counts.items():
        item = f" {symbol} {count},"
        if len(line) + len(item) > 79:
            print(line)
            line = " "
        line += item
    print(line.rstrip(","))
    stats = {
        key: _format_statistic(value)
        for key, value in summary["target_statistics"].items()
    }
    print(
        f"target ({units}): mean {stats['mean']}, std {stats['std']}, "
        f"min {stats['min']}, median {stats['median']}, max {stats['max']}"
    )
    if stable is not None:
        # A negative formation energy means stable against the pure elements
        # only; stability proper is the distance to the convex hull.
        if summary["target_kind"] == "formation_energy":
            label = "stable against the elements"
        elif summary["target_kind"] == "energy_above_hull":
            label = f"within {1000 * threshold:g} meV/atom of the hull"
        else:
            label = "stable"
        print(
            f"{label} (target <= {threshold:g} {units}): {stable} of {summary['rows']}"
        )
    screen = summary["hume_rothery_screen"]
    if screen:
        print(
            f"Hume-Rothery screen on: delta <= {screen['max_size_mismatch']:g}, "
            f"electronegativity spread <= {screen['max_electronegativity_spread']:g}, "
            f"kept {screen['rows_after']} of {screen['rows_before']} rows"
            + _unknown_property_note(screen)
        )
    else:
        print("Hume-Rothery screen off")
    if summary["licence"]:
        print(f"licence: {summary['licence']}")
    print(f"attribution: {summary['attribution']}")
    return 0


def _unknown_property_note(screen: dict) -> str:
    """Say how many rows the screen dropped for an unknown property of an element."""
    unknown = int(screen.get("rows_unknown_property") or 0)
    if unknown == 0:
        return ""
    return (
        f" ({plural(unknown, 'row')} failed because an element has no known "
        "metallic radius or electronegativity)"
    )


def _element_counts(df) -> dict[str, int]:
    """Return the compositions that contain each element, in periodic-table order."""
    from dvmrl.elements import ELEMENT_INDEX

    counts: dict[str, int] = {}
    for system in df["chemsys"]:
        for symbol in system.split("-"):
            counts[symbol] = counts.get(symbol, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: ELEMENT_INDEX[item[0]]))


def _smallest_share(count: int) -> float:
    """Return the smallest share, in steps of 0.01, with round(share * count) >= 1.

    make_split takes round(share * count) rows, and Python rounds 0.5 to 0.
    """
    share = math.ceil(50 / count) / 100
    while round(share * count) < 1:
        share = round(share + 0.01, 2)
    return share


def _check_shares(kind: str, test_fraction: float, val_fraction: float) -> None:
    """Reject a test and validation share that leave no training rows."""
    from dvmrl.splits import FRACTION_KINDS

    if kind in FRACTION_KINDS and test_fraction + val_fraction >= 1.0:
        raise UsageError(
            f"--test-fraction {test_fraction:g} and --val-fraction {val_fraction:g} "
            f"add up to {test_fraction + val_fraction:g}, which leaves no training "
            "rows: choose shares that add up to less than 1, such as the defaults "
            "0.1 and 0.1"
        )


def _check_parts(args, split, df, rows, test_fraction: float) -> None:
    """Reject a split with an empty test part or an unwanted empty validation part.

    The validation part may be empty only with --val-fraction 0.
    """
    from dvmrl.splits import fewest_rows

    sizes = split.sizes()
    count = len(df) if rows is None else len(rows)
    of_rows = f"{count} compositions" + (
        "" if rows is None else " that pass the Hume-Rothery screen"
    )
    if sizes["test"] == 0 and args.split in ("random", "chemsys"):
        if test_fraction == 0:
            raise UsageError(
                "--test-fraction 0 gives an empty test part: pass a share above 0, "
                "such as 0.1 (nothing was written)"
            )
        raise UsageError(
            f"the {of_rows} are too few for a test part at --test-fraction "
            f"{test_fraction:g}, which takes round({test_fraction:g} x {count}) = 0 "
            f"rows: pass --test-fraction {_smallest_share(count):g} or more, or use "
            f"at least {fewest_rows(test_fraction)} compositions (nothing was "
            "written)"
        )
    if sizes["test"] == 0:
        raise UsageError(
            f"the {args.split} split of {args.data} has an empty test part "
            "(nothing was written); choose another split or data set"
        )
    if sizes["val"] > 0 or args.val_fraction == 0:
        return
    if args.split == "binary-to-ternary":
        screened = df if rows is None else df.iloc[rows]
        base = int((screened["n_elements"] == 2).sum())
        of_rows = f"{base} binaries" + (
            "" if rows is None else " that pass the Hume-Rothery screen"
        )
    else:
        base = count
    if base == 0 or args.split == "chemsys":
        raise UsageError(
            f"the {args.split} split of {args.data} has an empty validation part "
            "(nothing was written); pass --val-fraction 0 for no validation part, "
            "or choose another split or data set"
        )
    share = _smallest_share(base)
    if round(share * base) >= sizes["train"]:
        # The smallest share that gives a validation row would take every
        # training row, so suggesting it would only move the error.
        lower_test = ", lower --test-fraction" if args.split == "random" else ""
        raise UsageError(
            f"the {args.split} split of {args.data} leaves "
            f"{plural(sizes['train'], 'training row')} and no validation row, too "
            "few for both parts: pass "
            f"--val-fraction 0 for no validation part{lower_test}, or use more "
            "data (nothing was written)"
        )
    raise UsageError(
        f"the {of_rows} are too few for a validation part at --val-fraction "
        f"{args.val_fraction:g}, which takes round({args.val_fraction:g} x {base}) "
        f"= 0 rows: pass --val-fraction {share:g} or more, or 0 for "
        "no validation part (nothing was written)"
    )


def run_split(args: argparse.Namespace) -> int:
    """Write the index arrays of a split."""
    from dvmrl.datasets.filters import hume_rothery_passing_rows
    from dvmrl.splits import FRACTION_KINDS, TEST_FRACTION, make_split

    if not args.out.lower().endswith((".npz", ".json")):
        raise UsageError(f"--out {args.out!r} must end in .npz or .json")
    check_output_file(Path(args.out), "--out", example="split.json")
    if args.split == "element" and not args.holdout_element:
        raise UsageError("--split element needs --holdout-element X (such as Ni)")
    if args.split != "element" and args.holdout_element:
        raise UsageError("--holdout-element applies only to --split element")
    if args.test_fraction is not None and args.split not in FRACTION_KINDS:
        raise UsageError(
            f"--test-fraction applies only to --split random and chemsys; the "
            f"{args.split} split puts every composition of its held-out chemistry "
            "in the test part, so drop --test-fraction"
        )
    test_fraction = TEST_FRACTION if args.test_fraction is None else args.test_fraction
    _check_shares(args.split, test_fraction, args.val_fraction)
    # The split is made on the rows that pass the screen, but its indices
    # are positions among all rows of the user's file, which is what a
    # reader of the split file can look up.
    df, info = _resolve(args, hume_rothery=False)
    rows, screen = None, None
    if args.hume_rothery:
        rows, screen = hume_rothery_passing_rows(df, *_screen_thresholds(args))
        if len(rows) < 3:
            raise UsageError(
                f"the Hume-Rothery screen kept {screen['rows_after']} of "
                f"{screen['rows_before']} rows of {args.data}"
                f"{_unknown_property_note(screen)}, too few to split (3 or more "
                "needed); raise --max-size-mismatch or "
                "--max-electronegativity-spread, or drop --hume-rothery"
            )
    split = make_split(
        df,
        args.split,
        seed=args.seed,
        holdout_element=args.holdout_element,
        test_fraction=test_fraction,
        val_fraction=args.val_fraction,
        rows=rows,
    )
    _check_parts(args, split, df, rows, test_fraction)
    split = dataclasses.replace(
        split, params={**split.params, "hume_rothery_screen": screen}
    )
    split.save(args.out)
    sizes = split.sizes()
    screen_note = ""
    if screen is not None:
        screen_note = (
            f" (Hume-Rothery screen on: kept {screen['rows_after']} of "
            f"{screen['rows_before']} rows{_unknown_property_note(screen)}; the "
            "indices are positions among all "
            f"{screen['rows_before']} rows)"
        )
    print(
        f"wrote {args.out}: {args.split} split of {info.get('name')}{screen_note}, "
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
    check_output_file(Path(args.out), "--out", example="alloys.csv")
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
