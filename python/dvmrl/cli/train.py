"""``dvmrl train``, ``dvmrl evaluate`` and ``dvmrl predict``.

A training run lives in one output folder:

- ``run.json``: the configuration of the run (data, split, seed, model and
  training settings, and ``objective``, the loss the run minimises).
  ``--resume`` compares it with the command line.
- ``last.pt``: the resumable trainer state, rewritten after every epoch, so
  an interrupted run resumes from its last finished epoch.
- ``model.pt``: the best-validation model, written when training ends.
- ``metrics.json``: test metrics (eV/atom) and provenance.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from dvmrl._files import (
    FolderLock,
    folder_identity,
    json_ready,
    remove_stale_temporaries,
    write_bytes_atomic,
    write_text_atomic,
)
from dvmrl.cli._common import (
    ALLOY_NOTATION_RULES,
    UsageError,
    add_compute_options,
    add_csv_column_options,
    check_output_file,
    check_output_folder,
    column_name,
    csv_columns,
    data_reference,
    finite_float,
    fraction,
    non_negative_float,
    path_text,
    plural,
    positive_float,
    positive_int,
    reject_csv_options,
    seed_int,
    setup_compute,
    stated_or_given_kind,
)

logger = logging.getLogger("dvmrl")

EV_TO_KJ_PER_MOL = 96.485
# Largest number of warnings about compositions outside the training domain
# that predict prints, because a long input file would bury the table in them.
MAX_DOMAIN_WARNINGS = 10
DEFAULT_DATA = "mp-formation-energy"
SPLIT_KINDS = ("random", "chemsys", "element", "binary-to-ternary")

RUN_FILE = "run.json"
STATE_FILE = "last.pt"
MODEL_FILE = "model.pt"
METRICS_FILE = "metrics.json"

# Settings of ``run.json`` that a command-line option can set, with the
# option that sets each one. ``--resume`` fills options left out from the
# stored run and rejects options that differ from it.
_RUN_OPTIONS = {
    "data": "--data",
    "split": "--split",
    "holdout_element": "--holdout-element",
    "seed": "--seed",
    "stability_threshold": "--stability-threshold",
    "alloy_notation": "--alloy-notation",
    "formula_column": "--formula-column",
    "target_column": "--target-column",
    "target_kind": "--target-kind",
    "model.hidden": "--hidden",
    "model.layers": "--layers",
    "model.dropout": "--dropout",
    "model.heteroscedastic": "--heteroscedastic",
    "model.fraction_hidden": "--fraction-hidden",
    "train.epochs": "--epochs",
    "train.ema_decay": "--ema-decay",
    "train.monitor": "--monitor",
    "train.loss": "--loss",
    "train.huber_delta": "--huber-delta",
    "train.lr": "--lr",
    "train.batch_size": "--batch-size",
    "train.weight_decay": "--weight-decay",
    "members": "--members",
    "member_divisions": "--member-divisions",
}

# Metrics printed by ``dvmrl evaluate`` and their units.
_TABLE_METRICS = (
    ("rmse", "eV/atom"),
    ("mae", "eV/atom"),
    ("r2", ""),
    ("max_error", "eV/atom"),
    (
        "gcv_score",
        "(eV/atom)^-2; (n - 1) / (n^2 MSE), higher is better, shrinks like 1/n; "
        "not Wahba's GCV",
    ),
    ("accuracy", "fraction of predictions within {tolerance:g} eV/atom of target"),
    (
        "precision",
        "fraction of predicted stable that are stable; stable means target <= "
        "{threshold:g} eV/atom{kind_note}",
    ),
    ("recall", "fraction of the stable compositions predicted stable"),
    ("f1", "harmonic mean of precision and recall"),
)

# Ratios that are 0 by convention when their denominator is 0: the count that
# is the denominator, and the reason printed with such a 0.
_UNDEFINED_RATIOS = {
    "precision": ("n_predicted_stable", "no composition predicted stable"),
    "recall": ("n_stable", "no composition stable"),
}


# ----------------------------------------------------------------------------
# Parsers


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer >= 0, got {text!r}"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _add_data_options(parser: argparse.ArgumentParser, with_defaults: bool) -> None:
    note = "" if with_defaults else "; default: the checkpoint's"
    own_notation = ". The checkpoint's own data is read as in training"
    parser.add_argument(
        "--data",
        default=None,
        metavar="NAME|PATH.csv",
        help=(
            "a vendored data set (see 'dvmrl data list') or a CSV with formula and "
            f"target (eV/atom) columns; default: {DEFAULT_DATA}"
            if with_defaults
            else "a vendored data set or a CSV with formula and target (eV/atom) "
            f"columns{note}"
        ),
    )
    add_csv_column_options(
        parser,
        "" if with_defaults else "the checkpoint's for its own data, else ",
        "" if with_defaults else "the checkpoint's, else ",
    )
    parser.add_argument(
        "--split",
        choices=SPLIT_KINDS,
        default=None,
        help=(
            "how the held-out test part is cut; default: random"
            if with_defaults
            else "split whose test part is evaluated; default: the checkpoint's "
            "split for its own data, every row for other data"
        ),
    )
    parser.add_argument(
        "--holdout-element",
        default=None,
        metavar="X",
        help="element left out with --split element (symbol, such as Ni)",
    )
    data_sets = "(0 for formation energies, 0.025 for energy above hull)"
    parser.add_argument(
        "--stability-threshold",
        type=finite_float,
        default=None,
        metavar="X",
        help=(
            "a composition counts as stable when its target is at most X eV/atom; "
            f"default: the data set's {data_sets}"
            if with_defaults
            else "a composition counts as stable when its target is at most X "
            "eV/atom; default: the training run's for the checkpoint's own data, "
            f"else the data set's {data_sets}"
        ),
    )
    parser.add_argument(
        "--alloy-notation",
        action="store_true",
        default=None,
        help=(
            "read the formulas of a CSV in alloy notation, where a group's amount is "
            "its at.%% share: (CoCrFeNi)90Al10 is 90 at.%% CoCrFeNi and 10 at.%% Al; "
            + ALLOY_NOTATION_RULES
            + ("" if with_defaults else own_notation)
        ),
    )


def add_parser(subparsers) -> None:
    """Register ``dvmrl train``, ``dvmrl evaluate`` and ``dvmrl predict``."""
    _add_train_parser(subparsers)
    _add_evaluate_parser(subparsers)
    _add_predict_parser(subparsers)


def _add_train_parser(subparsers) -> None:
    from dvmrl import defaults

    parser = subparsers.add_parser(
        "train",
        help="train a composition MPNN and write model.pt and metrics.json",
        description=(
            "Train the composition MPNN on a data set with early stopping on a "
            "validation pool, then score the best-validation model on the held-out "
            "test part. Writes OUT/model.pt, OUT/metrics.json (test metrics in "
            "eV/atom and provenance), OUT/run.json and the resumable state "
            "OUT/last.pt (OUT/member<i>/last.pt for each member of an ensemble). "
            "Ctrl-C keeps the state of the last finished epoch; continue with "
            "--resume."
        ),
    )
    _add_data_options(parser, with_defaults=True)
    parser.add_argument(
        "--seed",
        type=seed_int,
        default=None,
        help="seed of the validation pool, the initialisation and the batches; "
        f"default: {defaults.TRAIN['seed']}",
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help=(
            "maximum passes over the training pool; "
            f"default: {defaults.TRAIN['epochs']}"
        ),
    )
    parser.add_argument(
        "--hidden",
        type=positive_int,
        default=None,
        help=(
            f"node state width; default: {defaults.MODEL['hidden']} (the gate and "
            f"message MLPs keep their widths, {defaults.MODEL['gate_hidden']} and "
            f"{defaults.MODEL['msg_hidden']})"
        ),
    )
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help=f"message-passing layers (>= 0); default: {defaults.MODEL['layers']}",
    )
    parser.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help=f"peak learning rate of AdamW; default: {defaults.TRAIN['lr']}",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help=f"compositions per batch; default: {defaults.TRAIN['batch_size']}",
    )
    parser.add_argument(
        "--weight-decay",
        type=non_negative_float,
        default=None,
        help=f"AdamW weight decay; default: {defaults.TRAIN['weight_decay']}",
    )
    parser.add_argument(
        "--dropout",
        type=fraction,
        default=None,
        help=f"dropout rate of the head; default: {defaults.MODEL['dropout']}",
    )
    parser.add_argument(
        "--heteroscedastic",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=(
            "predict a variance too and train with the Gaussian negative "
            "log-likelihood instead of --loss (--no-heteroscedastic: one output "
            "trained with --loss); default: "
            f"{'on' if defaults.MODEL['heteroscedastic'] else 'off'}"
        ),
    )
    parser.add_argument(
        "--fraction-hidden",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help=(
            "width of the fraction encoder, which adds a learned function of "
            "each element's fraction to its initial node state (0: off); "
            f"default: {defaults.MODEL['fraction_hidden']}"
        ),
    )
    parser.add_argument(
        "--ema-decay",
        type=fraction,
        default=None,
        metavar="X",
        help=(
            "decay of the moving average of the weights that validation, "
            "early stopping and the saved model use, in [0, 1) (0: off); step t "
            "uses min(X, (1 + t) / (10 + t)), so X matters only after about "
            "10 / (1 - X) steps; "
            f"default: {defaults.TRAIN['ema_decay']}"
        ),
    )
    parser.add_argument(
        "--monitor",
        choices=("val_rmse", "val_mae"),
        default=None,
        help=(
            "validation score for early stopping and best-weight selection; "
            "val_mae trains longer and suits ensembles, whose mean offsets the "
            f"later epochs' tail errors; default: {defaults.TRAIN['monitor']}"
        ),
    )
    parser.add_argument(
        "--loss",
        choices=("mse", "huber", "l1"),
        default=None,
        help=(
            "training loss of a single-output head: squared error, Huber "
            "(squared below --huber-delta, linear beyond, so that the few "
            "compositions with errors of 1-2 eV/atom weigh less) or absolute "
            f"error; default: {defaults.TRAIN['loss']}"
        ),
    )
    parser.add_argument(
        "--huber-delta",
        type=positive_float,
        default=None,
        metavar="X",
        help=(
            "residual in eV/atom where the Huber loss turns linear; default: "
            f"{defaults.TRAIN['huber_delta']}"
        ),
    )
    parser.add_argument(
        "--members",
        type=positive_int,
        default=None,
        metavar="N",
        help=(
            "train an ensemble of N models with the seeds SEED .. SEED + N - 1 "
            "(each in OUT/member<i>/; see --member-divisions); OUT/model.pt "
            "then predicts their mean, with their spread as the uncertainty, "
            "and metrics.json also scores each member alone (member_metrics); "
            f"--members 1 trains a single model; default: {defaults.MEMBERS}"
        ),
    )
    parser.add_argument(
        "--jobs",
        type=positive_int,
        default=None,
        metavar="N",
        help=(
            "ensemble members to train at once, each in its own process with "
            "THREADS / N threads (at least one); the results do not depend on "
            "it; default: "
            "as many as --threads on a CPU (members on one core each train "
            "faster together than one after another on all cores, except in "
            "runs of a few epochs, where starting the processes, several "
            "seconds, costs more), 1 on CUDA"
        ),
    )
    parser.add_argument(
        "--member-divisions",
        choices=("own", "shared"),
        default=None,
        help=(
            "how ensemble members divide the pool into training and validation "
            "parts: own (member i cuts it with the split seed SEED + i, so the "
            "members see different training parts) or shared (one division for "
            "all); the test part is the same either way; default: own"
        ),
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help=(
            "continue the interrupted run in OUT from OUT/last.pt "
            "(OUT/member<i>/last.pt for each member of an ensemble)"
        ),
    )
    parser.add_argument(
        "--out", type=path_text, required=True, metavar="DIR", help="output folder"
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help=(
            "hide the progress bar; without the bar (also when stderr is not a "
            f"terminal) an epoch line is logged at most every {PROGRESS_LOG_SECONDS} s"
        ),
    )
    add_compute_options(parser)
    parser.set_defaults(func=run_train)


def _add_evaluate_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="score a checkpoint: metrics table and parity plot",
        description=(
            "Score a trained model on the test part of a split, print the metrics "
            "table and write OUT/evaluation.json and the parity plot "
            "OUT/parity.png, coloured by binary and ternary. Rows whose composition "
            "the model trained or validated on make the metrics optimistic: "
            "stderr gets a warning with their count, and --exclude-training drops "
            "them."
        ),
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a model.pt file")
    _add_data_options(parser, with_defaults=False)
    parser.add_argument(
        "--out",
        type=path_text,
        default=None,
        metavar="DIR",
        help=(
            "folder for evaluation.json and parity.png; default: the checkpoint's "
            "folder"
        ),
    )
    parser.add_argument(
        "--exclude-training",
        action="store_true",
        help=(
            "score only rows whose composition is in neither the training nor the "
            "validation pool of the checkpoint. Without it such rows are scored, "
            "and stderr gets a warning with their count"
        ),
    )
    add_compute_options(parser)
    parser.set_defaults(func=run_evaluate)


def _add_predict_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        usage=(
            "%(prog)s [options] CHECKPOINT (FORMULA [FORMULA ...] | --input FILE.csv)"
        ),
        help="predict the target of compositions with a checkpoint",
        description=(
            "Predict the target of each composition in eV/atom and kJ/mol, "
            "per mole of atoms (1 eV/atom = 96.485 kJ/mol), with an "
            "uncertainty (standard "
            "deviation) when the model is heteroscedastic or an ensemble: for an "
            "ensemble, the population spread of the member predictions (plus the "
            "mean predicted variance of heteroscedastic members); it is not a "
            "calibrated error bar. The table shows "
            "each input formula beside "
            "the normalised composition it was read as. Compositions with elements "
            "absent from the training data, or with fewer or more elements than "
            "every training composition (such as a pure element), get a warning on "
            "stderr, because their predictions are extrapolations."
        ),
    )
    # Both positionals are optional to argparse, so that run_predict can name
    # the alternative --input when formulas are missing.
    parser.add_argument(
        "checkpoint", nargs="?", metavar="CHECKPOINT", help="a model.pt file"
    )
    parser.add_argument(
        "formulas",
        nargs="*",
        default=[],
        metavar="FORMULA",
        help="such as Al3Ni; or pass --input FILE.csv instead",
    )
    parser.add_argument(
        "--input", default=None, metavar="FILE.csv", help="CSV with a formula column"
    )
    parser.add_argument(
        "--formula-column",
        default=None,
        type=column_name,
        metavar="NAME",
        help="name of the formula column of --input; default: formula",
    )
    parser.add_argument(
        "--output",
        default=None,
        metavar="FILE.csv",
        help="write the predictions as CSV instead of a table on stdout, "
        "compressed when the name ends in .gz, .bz2, .xz or .zip; with "
        "--input, the formulas keep the name of their column and the CSV also "
        "keeps the input's other columns (a name that the predictions use, in "
        "any letter case, gets the suffix _input)",
    )
    parser.add_argument(
        "--alloy-notation",
        action="store_true",
        help="read the formulas in alloy notation ((CoCrFeNi)90Al10 is 10 at.%% Al); "
        + ALLOY_NOTATION_RULES,
    )
    add_compute_options(parser)
    parser.set_defaults(func=run_predict)


# ----------------------------------------------------------------------------
# Files


def _write_json_atomic(path: Path, payload: Any) -> None:
    text = json.dumps(json_ready(payload), indent=2, sort_keys=True, allow_nan=False)
    write_text_atomic(path, text + "\n")


# ----------------------------------------------------------------------------
# Data


def _load_data(
    source: str, alloy_notation: bool, columns: dict[str, str] | None = None
):
    """Return ``(df, info)`` for a vendored name or a CSV path.

    ``columns`` holds how to read a CSV file (``formula_column``,
    ``target_column`` and ``target_kind``, from ``csv_columns``); vendored
    data ignores them.
    """
    from dvmrl.datasets import resolve_data

    return resolve_data(source, alloy_notation=alloy_notation, **(columns or {}))


def _parse_formulas(
    formulas,
    alloy_notation: bool,
    where: str,
    item: str = "row",
    metals_only: bool = False,
    lines: list[int] | None = None,
) -> list[dict]:
    """Parse formulas, raising one error that lists every bad one.

    ``item`` names a formula's position in the messages: "row" for a file,
    "argument" for the command line. ``lines`` (for a file) gives each
    formula's line in it, which the messages then name instead.
    ``metals_only`` rejects non-metals, as the data loader does for the rows
    of a data set.
    """
    from dvmrl.compositions import CompositionError, parse

    parsed, errors = [], []
    for position, formula in enumerate(formulas):
        where_in = (
            f"{item} {position + 1}" if lines is None else f"line {lines[position]}"
        )
        try:
            parsed.append(
                parse(
                    str(formula),
                    alloy_notation=alloy_notation,
                    metals_only=metals_only,
                )
            )
        except CompositionError as err:
            errors.append(f"{where_in} ({formula!r}): {err}")
    if errors:
        shown = "; ".join(errors[:5])
        more = f"; and {len(errors) - 5} more" if len(errors) > 5 else ""
        noun = "formula" if len(errors) == 1 else "formulas"
        raise ValueError(f"{where}: {len(errors)} invalid {noun}: {shown}{more}")
    return parsed


def _featurize_rows(df, rows: np.ndarray):
    """Build the batch of some rows of a data frame.

    The formula column of a loaded frame is in standard notation even when
    the CSV used alloy notation, so the formulas parse without it.
    """
    from dvmrl.featurize import featurize

    formulas = df["formula"].to_numpy()[rows]
    return featurize(_parse_formulas(formulas, False, "data"))


def _composition_keys(formulas) -> list[str]:
    """Key each formula of loaded data with :func:`dvmrl.splits.formula_key`.

    The keys are those of the splits, so the rows that evaluate counts as
    training compositions are those that the split kept out of the test part,
    and the splits' cache spares parsing the formulas again.
    """
    from dvmrl.splits import formula_key

    return [formula_key(str(f)) for f in formulas]


def _pool_compositions(df, split, keys=None) -> dict[str, list[str]]:
    """Key the compositions of the training and validation pools of a split.

    ``keys`` (array of ``_composition_keys`` of every row of ``df``) spares
    parsing the formulas again when several splits of one frame are keyed.
    """
    if keys is None:
        formulas = df["formula"].to_numpy()
        training = _composition_keys(formulas[split.train])
        validation = _composition_keys(formulas[split.val])
    else:
        training, validation = keys[split.train], keys[split.val]
    return {
        "training_compositions": sorted(set(training)),
        "validation_compositions": sorted(set(validation)),
    }


def _split_rows(df, kind: str, seed: int, holdout_element: str | None):
    from dvmrl.splits import EmptyTrainingPartError, make_split

    if kind == "element" and not holdout_element:
        raise UsageError("--split element needs --holdout-element X (such as Ni)")
    if kind != "element" and holdout_element:
        raise UsageError("--holdout-element applies only to --split element")
    try:
        return make_split(df, kind, seed, holdout_element=holdout_element)
    except EmptyTrainingPartError as err:
        # dvmrl train splits with fixed shares, so only other data can help.
        if kind == "element":
            fix = (
                f"pass another --holdout-element, or add rows without {holdout_element}"
            )
        elif kind == "binary-to-ternary":
            fix = "add binary compositions"
        else:
            groups = "chemical systems" if kind == "chemsys" else "compositions"
            fix = (
                f"the test and validation parts keep each of the {groups} whole, so "
                f"add rows of other {groups}"
            )
        raise UsageError(
            f"the {kind} split of {len(df)} rows leaves no training rows; {fix}"
        ) from err


# Rows that each part of a training split needs: the trainer selects the
# best epoch on the validation pool (one composition at least), and
# regression_metrics scores the test part (two values at least, because
# gcv_score divides by n - 1).
MIN_VALIDATION_ROWS = 1
MIN_TEST_ROWS = 2


def _min_random_split_rows() -> int:
    """Return the fewest rows whose random split has enough validation and test rows."""
    from dvmrl.splits import TEST_FRACTION, VAL_FRACTION, fewest_rows

    return max(
        fewest_rows(TEST_FRACTION, MIN_TEST_ROWS),
        fewest_rows(VAL_FRACTION, MIN_VALIDATION_ROWS),
    )


def _check_row_count(source: str, df, kind: str) -> None:
    """Raise ValueError when ``df`` has fewer rows than make_split accepts."""
    if len(df) >= 3:
        return
    raise ValueError(
        f"{source}: {len(df)} rows are too few to split into training, validation "
        f"and test parts for --split {kind}; add rows (the random split needs at "
        f"least {_min_random_split_rows()})"
    )


def _check_split_sizes(source: str, df, splits: list) -> None:
    """Raise ValueError when a split has too few validation or test rows.

    ``splits`` contains the split of every train/validation division of the
    run, and they share the test part. The message names the data, the size of
    each part, the minimum and what to change.
    """
    for split in splits:
        val_short = len(split.val) < MIN_VALIDATION_ROWS
        test_short = len(split.test) < MIN_TEST_ROWS
        if not (val_short or test_short):
            continue
        needs = []
        if val_short:
            needs.append(
                f"training needs at least {MIN_VALIDATION_ROWS} validation row"
            )
        if test_short:
            needs.append(f"the test metrics need at least {MIN_TEST_ROWS} test rows")
        raise ValueError(
            f"{source}: the {split.kind} split of {len(df)} rows has "
            f"{len(split.train)} training, {len(split.val)} validation and "
            f"{len(split.test)} test rows, but {' and '.join(needs)}; "
            f"{_split_size_fix(split, val_short, test_short)}"
        )


def _split_size_fix(split, val_short: bool, test_short: bool) -> str:
    """Say how to get enough validation and test rows from a split kind."""
    if split.kind == "element":
        element = split.holdout_element
        fixes = []
        if test_short:
            fixes.append(
                f"pass a --holdout-element that at least {MIN_TEST_ROWS} rows "
                f"contain, or add rows that contain {element}"
            )
        if val_short:
            fixes.append(f"add rows without {element}")
        return "; ".join(fixes)
    if split.kind == "binary-to-ternary":
        fixes = []
        if test_short:
            fixes.append("add ternary rows, which form the test part")
        if val_short:
            fixes.append(
                "add binary rows, because 10% of them form the validation pool"
            )
        return ", and ".join(fixes)
    if split.kind == "chemsys":
        fix = (
            "add rows of more chemical systems (the chemsys split puts whole "
            "systems with about 10% of the rows in each of the validation and test "
            "parts)"
        )
    else:
        fix = (
            "add rows (the random split puts about 10% of the rows in each of the "
            "validation and test parts, so it needs at least "
            f"{_min_random_split_rows()} rows)"
        )
    return (
        f"{fix}, or pass --split element --holdout-element X with an element X "
        f"that at least {MIN_TEST_ROWS} rows contain"
    )


# ----------------------------------------------------------------------------
# dvmrl train


def _requested_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Map the explicitly given options to ``run.json`` keys."""
    given = {
        "data": args.data,
        "split": args.split,
        "holdout_element": args.holdout_element,
        "seed": args.seed,
        "stability_threshold": args.stability_threshold,
        "alloy_notation": args.alloy_notation,
        "formula_column": args.formula_column,
        "target_column": args.target_column,
        "target_kind": args.target_kind,
        "model.hidden": args.hidden,
        "model.layers": args.layers,
        "model.dropout": args.dropout,
        "model.heteroscedastic": args.heteroscedastic,
        "model.fraction_hidden": args.fraction_hidden,
        "train.epochs": args.epochs,
        "train.ema_decay": args.ema_decay,
        "train.monitor": args.monitor,
        "train.loss": args.loss,
        "train.huber_delta": args.huber_delta,
        "train.lr": args.lr,
        "train.batch_size": args.batch_size,
        "train.weight_decay": args.weight_decay,
        "members": args.members,
        "member_divisions": args.member_divisions,
    }
    return {key: value for key, value in given.items() if value is not None}


def _build_run_config(requested: dict[str, Any]) -> dict[str, Any]:
    """Fill the requested settings with the defaults into a run configuration."""
    from dvmrl import defaults
    from dvmrl.model import ModelConfig
    from dvmrl.training import TrainConfig

    if requested.get("model.layers", 0) < 0:
        raise UsageError(f"--layers must be >= 0, got {requested['model.layers']}")
    heteroscedastic = requested.get(
        "model.heteroscedastic", defaults.MODEL["heteroscedastic"]
    )
    loss = requested.get("train.loss", defaults.TRAIN["loss"])
    if "train.huber_delta" in requested and (loss != "huber" or heteroscedastic):
        raise UsageError(
            f"--huber-delta applies to --loss huber, but this run trains with "
            f"{'the Gaussian negative log-likelihood' if heteroscedastic else loss}; "
            + (
                "drop --huber-delta, or drop --heteroscedastic for a Huber loss"
                if heteroscedastic
                else "drop --huber-delta or pass --loss huber"
            )
        )
    if heteroscedastic and "train.loss" in requested:
        raise UsageError(
            f"--loss {requested['train.loss']} applies to a single-output head, "
            "but --heteroscedastic trains with the Gaussian negative "
            "log-likelihood; drop one of the two"
        )
    model_fields = {
        key.split(".", 1)[1]: value
        for key, value in requested.items()
        if key.startswith("model.")
    }
    train_fields = {
        key.split(".", 1)[1]: value
        for key, value in requested.items()
        if key.startswith("train.")
    }
    if "seed" in requested:
        train_fields["seed"] = requested["seed"]
    model_config = ModelConfig(**model_fields)
    train_config = TrainConfig(**train_fields)
    # run.json stores train.loss for every head, but a heteroscedastic head
    # ignores it, so "objective" records the loss the run minimises.
    if model_config.heteroscedastic:
        objective = "gaussian_nll"
    elif train_config.loss == "huber":
        objective = f"huber (delta {train_config.huber_delta:g} eV/atom)"
    else:
        objective = train_config.loss
    data = data_reference(requested.get("data", DEFAULT_DATA))
    columns = csv_columns(requested)
    # A vendored set or a fetched file states its own target kind, which
    # run.json records instead of the default for other CSV files.
    kind = stated_or_given_kind(data, requested.get("target_kind"))
    if kind is not None:
        columns["target_kind"] = kind
    return {
        "data": data,
        "split": requested.get("split", "random"),
        "holdout_element": requested.get("holdout_element"),
        "seed": int(train_config.seed),
        "stability_threshold": requested.get("stability_threshold"),
        "alloy_notation": bool(requested.get("alloy_notation", False)),
        **columns,
        "model": model_config.to_dict(),
        "train": train_config.to_dict(),
        "objective": objective,
        "members": int(requested.get("members", defaults.MEMBERS)),
        "member_divisions": requested.get("member_divisions", "own"),
    }


def _flat_get(config: dict, key: str):
    value: Any = config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _resumed_run_config(out: Path, requested: dict[str, Any]) -> dict[str, Any]:
    """Load ``run.json`` and check that the requested options agree with it."""
    try:
        stored = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(
            f"--resume: {out / RUN_FILE} not found, so {out} contains no resumable "
            "run; start a new run without --resume"
        ) from None
    except json.JSONDecodeError as err:
        raise ValueError(
            f"--resume: {out / RUN_FILE} is not valid JSON ({err})"
        ) from err
    if isinstance(stored, dict) and stored.get("format") == "dvmrl-run":
        raise UsageError(
            f"--resume: {out} contains a dvmrl run (the main job), not a dvmrl train "
            f"run; continue it with dvmrl run --resume --out {shlex.quote(str(out))}"
        )
    if not isinstance(stored, dict) or not isinstance(stored.get("train", {}), dict):
        raise ValueError(
            f"--resume: {out / RUN_FILE} is not the run.json of dvmrl train; pass "
            "the --out folder of a dvmrl train run"
        )
    from dvmrl.training import TrainConfig

    # Fill the settings that runs from older versions did not store (ema_decay,
    # loss) with the values those runs used, so that options compare equal.
    stored["train"] = TrainConfig.from_dict(stored.get("train", {})).to_dict()
    # Ensembles from before the option shared one division.
    stored.setdefault("member_divisions", "shared")
    # Runs from before the column options read the default columns.
    stored.update(csv_columns(stored))
    conflicts = []
    for key, value in requested.items():
        if key == "data":
            value = data_reference(value)
        if key == "stability_threshold" and stored.get(key) is None:
            # The run used its data set's default, which is known once the
            # data are loaded; run_train compares the value there.
            continue
        if key == "data" and _moved_data(stored["data"], value):
            # The member state files and finished members compare the
            # fingerprints of their data, so other rows are still refused.
            logger.info(
                "%s no longer exists; the run continues on %s", stored["data"], value
            )
            stored["data"] = value
            continue
        if _flat_get(stored, key) != value:
            conflicts.append(
                f"{_RUN_OPTIONS[key]} {value!r} (the run in {out} used "
                f"{_flat_get(stored, key)!r})"
            )
    if conflicts:
        raise _resume_conflict(conflicts)
    return stored


def _resume_conflict(conflicts: list[str]) -> UsageError:
    """Return the error for options that differ from the resumed run."""
    options = "this option" if len(conflicts) == 1 else "these options"
    return UsageError(
        "--resume: the configuration differs from the stored run: "
        + "; ".join(conflicts)
        + f". Drop {options} to continue it, or pass a new --out"
    )


def _data_file_gone(data: str) -> bool:
    """Tell whether ``data`` names a CSV path that no longer exists."""
    from dvmrl.datasets import DATASETS

    return data not in DATASETS and not Path(data).exists()


def _moved_data(recorded: str, given: str) -> bool:
    """Tell whether a run's CSV file is gone and ``given`` is a CSV file instead."""
    from dvmrl.datasets import DATASETS

    return _data_file_gone(recorded) and given not in DATASETS and Path(given).is_file()


def _check_default_threshold(
    asked: float | None, used: float | None, out: Path
) -> None:
    """Reject a --stability-threshold that differs from a resumed run's default.

    run.json stores no threshold when the run took its data set's default,
    so the option is compared with that default once it is known.
    """
    if asked is None or used is None or asked == used:
        return
    raise _resume_conflict(
        [
            f"--stability-threshold {asked!r} (the run in {out} used {used!r}, the "
            "default of its data)"
        ]
    )


def _check_fresh_out(out: Path) -> None:
    existing = [
        name
        for name in (RUN_FILE, STATE_FILE, MODEL_FILE, METRICS_FILE)
        if (out / name).exists()
    ]
    # An ensemble member's folder left from another run would be taken as a
    # finished or resumable member of this one.
    if out.is_dir():
        existing += sorted(
            f"{folder.name}/{name}"
            for folder in out.glob("member*")
            if folder.is_dir() and folder.name[len("member") :].isdigit()
            for name in (STATE_FILE, MODEL_FILE)
            if (folder / name).exists()
        )
    if existing:
        raise FileExistsError(
            f"{out} already contains a run ({', '.join(existing)}); pass --resume to "
            "continue it, or choose another --out (nothing was overwritten)"
        )


def _format_optional(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


# Without a progress bar, an epoch line is logged at most this often (seconds),
# so that logs of batch jobs show the training advance without an epoch flood.
PROGRESS_LOG_SECONDS = 30


def _progress_bar(total: int, initial: int, enabled: bool = True):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="epoch",
        file=sys.stderr,
        disable=not (enabled and sys.stderr.isatty()),
        dynamic_ncols=True,
        leave=True,
    )


class _EpochReporter:
    """Show a model's epochs: a progress bar, or without one a log line every 30 s.

    ``label`` names the ensemble member on the bar, and is None for a single
    model. A log filter of the serial loop prefixes the log lines with it.
    """

    def __init__(
        self, total: int, done: int, label: str | None, show_bar: bool
    ) -> None:
        self.total = total
        self.bar = _progress_bar(total, done, show_bar)
        if label is not None:
            self.bar.set_description(label)
        self.last_logged = time.monotonic()

    def __call__(self, record: dict) -> None:
        # The record's epoch counts from the start of the training, so a
        # bar that began at 0 for a resumed member catches up at once.
        epoch = record.get("epoch")
        self.bar.update(epoch - self.bar.n if isinstance(epoch, int) else 1)
        self.bar.set_postfix(
            loss=f"{record['train_loss']:.4f}",
            val_rmse=_format_optional(record.get("val_rmse")),
            val_mae=_format_optional(record.get("val_mae")),
        )
        logger.debug("epoch %s: %s", record.get("epoch"), record)
        now = time.monotonic()
        if self.bar.disable and now - self.last_logged >= PROGRESS_LOG_SECONDS:
            self.last_logged = now
            _log_epoch_line("", record, self.total)

    def close(self) -> None:
        self.bar.close()


def _log_epoch_line(prefix: str, record: dict, total: int) -> None:
    """Log an epoch's training loss and validation errors, for runs without a bar."""
    logger.info(
        "%sepoch %s of at most %d: train loss %.4f, validation RMSE %s, MAE %s eV/atom",
        prefix,
        record.get("epoch"),
        total,
        record["train_loss"],
        _format_optional(record.get("val_rmse")),
        _format_optional(record.get("val_mae")),
    )


class _MembersProgress:
    """Progress of members that train in their own processes, drawn here.

    One bar counts the epochs of all members against their maximum; a
    member that stops early adds its remaining epochs when it finishes.
    Without the bar, each member's epoch line is logged at most every
    ``PROGRESS_LOG_SECONDS``.
    """

    def __init__(self, members: int, epochs: int, show_bar: bool) -> None:
        self.epochs = epochs
        self.bar = _progress_bar(members * epochs, 0, show_bar)
        self.bar.set_description(f"{members} members")
        self.seen: dict[int, int] = {}
        self.logged: dict[int, float] = {}

    def start(self, member: int) -> None:
        self.seen[member] = 0
        self.logged[member] = time.monotonic()

    def epoch(self, member: int, record: dict) -> None:
        epoch = int(record["epoch"])
        self.bar.update(max(0, epoch - self.seen.get(member, 0)))
        self.seen[member] = epoch
        self.bar.set_postfix(
            member=member,
            epoch=epoch,
            val_mae=_format_optional(record.get("val_mae")),
        )
        logger.debug("member %d: epoch %s: %s", member, epoch, record)
        now = time.monotonic()
        if self.bar.disable and now - self.logged.get(member, 0.0) >= (
            PROGRESS_LOG_SECONDS
        ):
            self.logged[member] = now
            _log_epoch_line(f"member {member}: ", record, self.epochs)

    def finish(self, member: int, summary: dict) -> None:
        self.bar.update(max(0, self.epochs - self.seen.get(member, 0)))
        self.seen[member] = self.epochs
        # The monitors are val_rmse and val_mae, in eV/atom.
        score = summary["monitor"].removeprefix("val_").upper()
        logger.info(
            "member %d: trained %s; best epoch %s, validation %s %s eV/atom",
            member,
            plural(int(summary["epochs_done"]), "epoch"),
            summary["best_epoch"],
            score,
            _format_optional(summary["best_score"]),
        )

    def close(self) -> None:
        self.bar.close()


def run_train(args: argparse.Namespace) -> int:
    """Train a model (or an ensemble) and write the run folder; return the exit code."""
    resumable: list[Path] = []
    with contextlib.ExitStack() as locks:
        try:
            return _run_train(args, locks, resumable)
        except KeyboardInterrupt:
            # Interrupted while a member was set up or the members' results
            # were combined: the run folder resumes as after an epoch.
            if resumable and resumable[0].is_dir():
                print(_resume_hint(resumable[0]), file=sys.stderr)
            raise


def _interrupted(lock, out: Path) -> int:
    """Print how to continue an interrupted run in ``out`` and return 130.

    Raises:
        FolderReplacedError: when ``out`` was removed or replaced meanwhile,
            so that nothing is left to resume.
    """
    lock.check_in_place()
    print(_resume_hint(out), file=sys.stderr)
    return 130


def _resume_hint(out: Path) -> str:
    """Return the command that continues the train run in ``out``, ready to paste."""
    return f"continue with: dvmrl train --resume --out {shlex.quote(str(out))}"


def _run_train(
    args: argparse.Namespace, locks: contextlib.ExitStack, resumable: list[Path]
) -> int:
    """Run ``dvmrl train``; add the run folder to ``resumable`` once run.json exists."""
    import torch

    from dvmrl import __version__, build_info
    from dvmrl.metrics import regression_metrics
    from dvmrl.training import TrainingDivergedError

    out = Path(args.out)
    check_output_folder(out, "--out")
    requested = _requested_settings(args)
    if args.resume:
        run_config = _resumed_run_config(out, requested)
        if (out / METRICS_FILE).exists() and (out / MODEL_FILE).exists():
            if run_config.get("stability_threshold") is None:
                metrics = json.loads((out / METRICS_FILE).read_text(encoding="utf-8"))
                used = metrics.get("stability_threshold")
                _check_default_threshold(args.stability_threshold, used, out)
            print(f"the run in {out} is complete; see {out / METRICS_FILE}")
            return 0
        if _data_file_gone(run_config["data"]):
            raise FileNotFoundError(
                f"--resume: the run's data file {run_config['data']} not found: it "
                "was moved or deleted; pass --data with its new path to continue the "
                "run"
            )
    else:
        _check_fresh_out(out)
        run_config = _build_run_config(requested)
    reject_csv_options(args, run_config["data"])
    members = int(run_config.get("members", 1))
    own_divisions = members > 1 and run_config.get("member_divisions") == "own"
    if members == 1:
        ignored = [
            option
            for option, value in (
                ("--jobs", args.jobs),
                ("--member-divisions", args.member_divisions),
            )
            if value is not None
        ]
        if ignored:
            logger.warning(
                "ignored %s, which only an ensemble uses; one model trains here "
                "(--members 1)",
                " and ".join(ignored),
            )
    # A run interrupted before its first state was saved (while the model was
    # built) has run.json alone: resuming it starts the training, as for an
    # ensemble member without a state file. An ensemble keeps its state
    # files in the member folders.
    if args.resume and members == 1 and not (out / STATE_FILE).exists():
        logger.info("%s has no training state yet; starting the training", out)

    device = setup_compute(args)
    df, info = _load_data(
        run_config["data"], run_config["alloy_notation"], csv_columns(run_config)
    )
    _check_row_count(run_config["data"], df, run_config["split"])
    split = _split_rows(
        df, run_config["split"], run_config["seed"], run_config["holdout_element"]
    )
    seeds = [int(run_config["seed"]) + member for member in range(members)]
    if own_divisions:
        # Member i divides the pool with split seed SEED + i.
        member_splits = [
            _split_rows(df, run_config["split"], seed, run_config["holdout_element"])
            for seed in seeds
        ]
    # Checked before anything is trained or written, so that too small a
    # data set leaves no run folder behind.
    _check_split_sizes(
        run_config["data"], df, member_splits if own_divisions else [split]
    )
    x_test = _featurize_rows(df, split.test)
    targets = df["target"].to_numpy(dtype=np.float64)
    y_test = targets[split.test]
    if own_divisions:
        # The rows are featurised and keyed once, and each division takes its part.
        every_row = _featurize_rows(df, np.arange(len(df)))
        keys = np.asarray(_composition_keys(df["formula"].to_numpy()))
        member_pools = [_pool_compositions(df, s, keys) for s in member_splits]
    else:
        shared_data = (
            _featurize_rows(df, split.train),
            targets[split.train],
            _featurize_rows(df, split.val),
            targets[split.val],
        )
    # Rows that repeat a composition stay in one part, so parts count rows.
    logger.info(
        "data %s: %d train, %d validation, %d test rows (%s split)",
        info.get("name", run_config["data"]),
        len(split.train),
        len(split.val),
        len(split.test),
        run_config["split"],
    )
    from dvmrl.splits import repeated_compositions

    keys = repeated_compositions(df)
    if keys is not None and len(set(keys[split.test])) < MIN_TEST_ROWS:
        logger.warning(
            "the %d test rows all hold one composition, so the test metrics "
            "score the model on one composition; use more data or another split",
            len(split.test),
        )

    threshold = run_config["stability_threshold"]
    if threshold is None:
        threshold = float(info.get("stability_threshold", 0.0))
        if args.resume:
            _check_default_threshold(args.stability_threshold, threshold, out)
    # Trainer.save adds the software provenance and the training domain.
    metadata = json_ready(
        {
            "data": run_config["data"],
            "data_info": info,
            "split": run_config["split"],
            "holdout_element": run_config["holdout_element"],
            "split_fingerprint": split.fingerprint(),
            # dvmrl.splits.data_fingerprint: the formulas and targets in row
            # order, which dvmrl evaluate compares with the data it loads.
            "data_rows_fingerprint": split.data_fingerprint,
            "seed": run_config["seed"],
            "stability_threshold": threshold,
            "alloy_notation": run_config["alloy_notation"],
            **csv_columns(run_config),
            # The data's own kind: a vendored or fetched file states it, and
            # --target-kind sets it for other CSV files.
            "target_kind": info.get("target_kind"),
            "run": run_config,
        }
    )
    if own_divisions:
        metadata = _ensemble_pool_metadata(metadata, df, member_splits, member_pools)
    else:
        metadata["training_min_elements"] = int(
            df["n_elements"].to_numpy()[split.train].min()
        )
        metadata.update(_pool_compositions(df, split))
    # One process per run folder: a second train or resume in it would mix
    # the two runs' files. The lock lasts until run_train returns.
    out.mkdir(parents=True, exist_ok=True)
    lock = locks.enter_context(FolderLock(out))
    if args.resume:
        remove_stale_temporaries(out)
    else:
        # Another run may have started in the folder since the first check.
        _check_fresh_out(out)
        _write_json_atomic(out / RUN_FILE, run_config)
    resumable.append(out)

    started = time.perf_counter()
    jobs = []
    for member, seed in enumerate(seeds):
        folder = out if members == 1 else out / f"member{member}"
        member_config = {**run_config, "train": {**run_config["train"], "seed": seed}}
        if own_divisions:
            member_split = member_splits[member]
            data = _division_data(every_row, targets, member_split)
            member_metadata = _member_metadata(
                metadata, df, member_split, seed, member_pools[member]
            )
        else:
            data = shared_data
            member_metadata = metadata
        if members > 1 and (folder / MODEL_FILE).exists():
            _check_finished_member(folder / MODEL_FILE, data, member)
            logger.info("member %d is complete in %s", member, folder)
            continue
        jobs.append(
            {
                "member": member,
                "folder": str(folder),
                "run_config": member_config,
                "data": data,
                "metadata": member_metadata,
                "device": device,
                "label": None if members == 1 else f"member {member}",
                # A member process checks the folder by this (device, inode).
                "out": str(out),
                "out_identity": folder_identity(out),
            }
        )
    processes = _processes_at_once(args, len(jobs), device)
    if processes > 1:
        try:
            _train_in_processes(args, jobs, processes, run_config, out)
        except KeyboardInterrupt:
            return _interrupted(lock, out)
        lock.check_in_place()
    for job in jobs if processes == 1 else []:
        folder, label = Path(job["folder"]), job["label"]
        try:
            trainer = _fit_member(
                folder,
                job["run_config"],
                job["data"],
                job["metadata"],
                device,
                label,
                show_bar=not args.no_progress,
                guard=lock.check_in_place,
            )
        except TrainingDivergedError as err:
            # An --lr that is too large is a bad setting, not a failure of dvmrl.
            raise UsageError(_diverged_message(err, out, label)) from err
        if trainer is None:
            return _interrupted(lock, out)
        lock.check_in_place()
        trainer.save(folder / MODEL_FILE, metadata=job["metadata"])
        trainer.save(folder / STATE_FILE, metadata=job["metadata"])
    seconds = time.perf_counter() - started

    if members == 1:
        predictions = trainer.predict(x_test)
        summary = {
            "epochs_done": int(trainer.epochs_done),
            "best_epoch": trainer.best_epoch,
            "best_val_score": trainer.best_score,
            "monitor": trainer.train_config.monitor,
            "history": trainer.history,
        }
    else:
        from dvmrl.training import combine_checkpoints, load_checkpoint

        member_files = [out / f"member{m}" / MODEL_FILE for m in range(members)]
        combine_checkpoints(
            member_files,
            out / MODEL_FILE,
            metadata={**metadata, "members": members},
            same_division=not own_divisions,
        )
        ensemble, _ = load_checkpoint(out / MODEL_FILE, device=device)
        predictions, _ = _predict(ensemble, x_test, device, with_variance=False)
        summary = {
            "members": members,
            "member_seeds": seeds,
            "member_divisions": "own" if own_divisions else "shared",
            "member_folders": [f"member{m}" for m in range(members)],
            "monitor": run_config["train"]["monitor"],
            "member_metrics": _member_test_metrics(
                member_files, x_test, y_test, device, threshold
            ),
        }
    test_metrics = dict(
        regression_metrics(y_test, predictions, stability_threshold=threshold)
    )
    provenance = {
        "dvmrl_version": __version__,
        "build_info": build_info(),
        "torch_version": torch.__version__,
        "command": sys.argv,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": run_config["data"],
        "data_info": info,
        "split": run_config["split"],
        "holdout_element": run_config["holdout_element"],
        "split_fingerprint": split.fingerprint(),
        "seed": run_config["seed"],
    }
    report = {
        **test_metrics,
        "n_train": int(len(split.train)),
        "n_val": int(len(split.val)),
        "n_test": int(len(split.test)),
        **summary,
        "train_seconds_this_session": seconds,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "member_processes": processes,
        **_metric_settings(threshold),
        "target_kind": info.get("target_kind"),
        "model": run_config["model"],
        "train": run_config["train"],
        "provenance": provenance,
    }
    lock.check_in_place()
    _write_json_atomic(out / METRICS_FILE, report)
    recorded = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    if recorded.get("data") != run_config["data"]:
        # The data file moved and the run resumed on its new path, which the
        # training states accepted; run.json names it from now on.
        _write_json_atomic(out / RUN_FILE, {**recorded, "data": run_config["data"]})
    what = "" if members == 1 else f", ensemble of {members}"
    title = f"test metrics ({len(split.test)} compositions{what})"
    print(_format_metrics(test_metrics, title, threshold, info.get("target_kind")))
    print(f"wrote {out / MODEL_FILE} and {out / METRICS_FILE}")
    return 0


def _diverged_message(err, out: Path, label: str | None) -> str:
    """Describe a diverged training with the options that can prevent it."""
    from dvmrl import defaults

    prefix = "" if label is None else f"{label}: "
    clipping = (
        f"; gradient clipping is already on at norm {err.grad_clip:g}"
        if err.grad_clip
        else ""
    )
    return (
        f"{prefix}training diverged: the training loss is {err.loss} in epoch "
        f"{err.epoch} with --lr {err.lr:g}{clipping}. Start a new run with a "
        f"lower --lr (default {defaults.TRAIN['lr']:g}) in another --out, or "
        f"delete {out} first, because --resume keeps the learning rate of that run"
    )


def _processes_at_once(args: argparse.Namespace, pending: int, device) -> int:
    """Return how many members train at once, each in its own process.

    ``--jobs`` sets it. By default a CPU run trains as many members at once
    as it has threads, at most the members left to train, and a CUDA run
    trains one at a time. One means that the members train one after
    another in this process.
    """
    import torch

    if pending < 2:
        return 1
    if args.jobs is not None:
        return min(args.jobs, pending)
    if device.type != "cpu":
        return 1
    return max(1, min(pending, torch.get_num_threads()))


def _train_in_processes(
    args: argparse.Namespace, jobs: list[dict], processes: int, run_config: dict, out
) -> None:
    """Train ``jobs`` in ``processes`` member processes.

    The threads of this process are shared out: each member process gets
    threads // processes of them, at least one.

    Raises:
        KeyboardInterrupt: after Ctrl-C or SIGTERM, once every member saved
            its state.
    """
    import torch
    from tqdm.contrib.logging import logging_redirect_tqdm

    from dvmrl.cli import _member_processes
    from dvmrl.training import TrainingDivergedError

    total_threads = torch.get_num_threads()
    threads = max(1, total_threads // processes)
    if processes > total_threads:
        logger.warning(
            "--jobs %d with --threads %d: each member process still runs one "
            "thread, so %d threads share the cores; pass --jobs %d or fewer, "
            "or --threads %d",
            processes,
            total_threads,
            processes,
            total_threads,
            processes,
        )
    logger.info(
        "training %d members, %d at a time in their own processes with %d "
        "thread%s each",
        len(jobs),
        processes,
        threads,
        "" if threads == 1 else "s",
    )
    progress = _MembersProgress(
        len(jobs), int(run_config["train"]["epochs"]), show_bar=not args.no_progress
    )
    try:
        # Log lines (this process's and the members') go above the bar.
        with logging_redirect_tqdm(loggers=[logging.getLogger()]):
            _member_processes.train_members(
                [{**job, "threads": threads} for job in jobs], processes, progress
            )
    except _member_processes.MemberFailed as err:
        raise _member_processes.MemberFailed(
            f"{err}; the other members stopped after their last finished epoch; "
            f"{_resume_hint(out)}"
        ) from err
    except TrainingDivergedError as err:
        member = getattr(err, "member", None)
        label = None if member is None else f"member {member}"
        raise UsageError(_diverged_message(err, out, label)) from err
    finally:
        progress.close()


def _member_test_metrics(member_files, x_test, y_test, device, threshold) -> list:
    """Score every ensemble member alone on the test part.

    Returns:
        list[dict]: per member, ``member``, ``epochs_done`` and the test
        metrics of ``dvmrl.metrics.regression_metrics`` (eV/atom).
    """
    from dvmrl.metrics import regression_metrics
    from dvmrl.training import load_checkpoint

    rows = []
    for member, path in enumerate(member_files):
        model, metadata = load_checkpoint(path, device=device)
        predictions, _ = _predict(model, x_test, device, with_variance=False)
        metrics = regression_metrics(y_test, predictions, stability_threshold=threshold)
        rows.append(
            {"member": member, "epochs_done": metadata.get("epochs_done"), **metrics}
        )
    return rows


def _division_data(every_row, targets: np.ndarray, split) -> tuple:
    """Return (x_train, y_train, x_val, y_val) of one train/validation division.

    ``every_row`` is the batch of all rows of the data frame.
    """
    return (
        every_row[split.train],
        targets[split.train],
        every_row[split.val],
        targets[split.val],
    )


def _member_metadata(metadata: dict, df, split, seed: int, pools: dict) -> dict:
    """Return a member's checkpoint metadata for its own train/validation division.

    ``pools`` is ``_pool_compositions`` of that division.
    """
    return json_ready(
        {
            **metadata,
            "split_fingerprint": split.fingerprint(),
            "seed": seed,
            "training_min_elements": int(
                df["n_elements"].to_numpy()[split.train].min()
            ),
            **pools,
        }
    )


def _ensemble_pool_metadata(metadata: dict, df, splits, pools: list) -> dict:
    """Return the ensemble's metadata when each member has its own division.

    The training compositions are those that any member trained on, and the
    validation compositions the rest of the pool, so that ``dvmrl evaluate``
    flags every row that some member has seen. The divisions share the test
    part, whose rows the split fingerprint of the run's own seed identifies.
    ``pools`` contains ``_pool_compositions`` of each split in ``splits``.
    """
    training = set().union(*(pool["training_compositions"] for pool in pools))
    validation = set().union(*(pool["validation_compositions"] for pool in pools))
    n_elements = df["n_elements"].to_numpy()
    return json_ready(
        {
            **metadata,
            "member_divisions": "own",
            "training_min_elements": int(
                min(n_elements[split.train].min() for split in splits)
            ),
            "training_compositions": sorted(training),
            "validation_compositions": sorted(validation - training),
        }
    )


@contextlib.contextmanager
def _member_log_prefix(label: str | None):
    """Prefix ``label`` to the log lines of a member's training.

    Those are the trainer's own lines (such as its early stop) and the
    per-epoch lines of this command. A logger's filter does not see the
    records of its child loggers, so both loggers get one.
    """
    if label is None:
        yield
        return
    from dvmrl.training import trainer as trainer_module

    def prefix(record: logging.LogRecord) -> bool:
        record.msg = f"{label}: {record.msg}"
        return True

    targets = (trainer_module.logger, logger)
    for target in targets:
        target.addFilter(prefix)
    try:
        yield
    finally:
        for target in targets:
            target.removeFilter(prefix)


def _check_finished_member(path: Path, data, member: int) -> None:
    """Raise UsageError when a finished member was trained on other data.

    The trainer checks a resumed member's state file when it loads it. A
    finished member is not trained again, so without this check an ensemble
    would combine members trained on the old and on the edited data.
    """
    from dvmrl.training.checkpoint import read_checkpoint
    from dvmrl.training.data import data_fingerprint

    x_train, y_train, x_val, y_val = data
    stored = read_checkpoint(path).get("data_fingerprint") or {}
    current = {
        "train": data_fingerprint(x_train, np.asarray(y_train, dtype=np.float64)),
        "val": (
            None
            if x_val is None
            else data_fingerprint(x_val, np.asarray(y_val, dtype=np.float64))
        ),
    }
    differ = [part for part in ("train", "val") if stored.get(part) != current[part]]
    if differ:
        raise UsageError(
            f"--resume: member {member} in {path.parent} is finished, but it was "
            f"trained on other {' and '.join(differ)} data than the run's data and "
            "split give now (the data file changed since); restore the original "
            "data to continue, or start a new run in another --out"
        )


def _fit_member(
    folder: Path,
    run_config: dict,
    data,
    metadata,
    device,
    label: str | None,
    show_bar: bool = True,
    report=None,
    guard=None,
):
    """Train one model in ``folder`` (resuming from its state file when present).

    ``label`` names the ensemble member on the progress bar (None for a
    single model). ``report``, when given, receives every epoch's record
    instead of the progress bar (a member process sends them to the main
    process). ``guard``, when given, runs before ``folder`` is created and
    before every state file is written, and raises to stop (it checks that
    the run's output folder is still in place).

    Returns:
        Trainer or None: the trainer on its best-validation weights, or None
        when Ctrl-C interrupted it (its state file then has the last
        finished epoch).
    """
    from dvmrl.model import ModelConfig
    from dvmrl.training import TrainConfig, Trainer
    from dvmrl.training.checkpoint import (
        MODEL_ADVICE,
        CheckpointError,
        metadata_from_document,
        read_checkpoint,
    )

    x_train, y_train, x_val, y_val = data
    if (folder / STATE_FILE).exists():
        try:
            read_checkpoint(folder / STATE_FILE)
        except CheckpointError as err:
            # The advice to pass a model.pt does not help a resume; a damaged
            # state file can only be given up.
            message = str(err).removesuffix(f"; {MODEL_ADVICE}")
            raise CheckpointError(
                f"{message}; the training state of this run is damaged, so delete "
                f"{folder / STATE_FILE} to restart this model from its first "
                "epoch, or start a new run in another --out"
            ) from None
        trainer = Trainer.from_checkpoint(
            folder / STATE_FILE, x_train, y_train, x_val, y_val, device=device
        )
        logger.info("resuming %s after %s", folder, plural(trainer.epochs_done, "epoch"))
    else:
        if guard is not None:
            guard()
        folder.mkdir(parents=True, exist_ok=True)
        trainer = Trainer(
            ModelConfig.from_dict(run_config["model"]),
            TrainConfig.from_dict(run_config["train"]),
            x_train,
            y_train,
            x_val,
            y_val,
            device=device,
        )
        # A state before the first epoch lets a run interrupted at once resume.
        trainer.save(folder / STATE_FILE, metadata=metadata)

    if report is None:
        total = int(run_config["train"]["epochs"])
        reporter = _EpochReporter(total, int(trainer.epochs_done), label, show_bar)
        report, close = reporter, reporter.close
    else:
        close = _no_op
    # Trainer.fit reports an epoch after it has written the epoch's state, so
    # a resumed run continues from the last epoch reported. trainer.epochs_done
    # would also count an epoch whose state Ctrl-C stopped.
    saved = [int(trainer.epochs_done)]

    def report_saved(record: dict) -> None:
        saved[0] = int(record["epoch"])
        report(record)

    try:
        # Trainer.fit rewrites last.pt after every epoch, so after Ctrl-C it
        # contains the state of the last finished epoch and a resumed run
        # repeats no partial epoch. Without an epoch count, a fit restored
        # from a checkpoint continues to its original target.
        with _member_log_prefix(label):
            trainer.fit(
                progress=report_saved,
                checkpoint=folder / STATE_FILE,
                metadata=metadata,
                before_checkpoint=guard,
            )
    except KeyboardInterrupt:
        close()
        done = saved[0]
        # Ctrl-C between an epoch's state write and its report leaves one
        # epoch more in the state file than reported, so the file counts.
        state_path = folder / STATE_FILE
        with contextlib.suppress(Exception):
            document = read_checkpoint(state_path)
            done = int(metadata_from_document(document, state_path)["epochs_done"])
        prefix = "" if label is None else f"{label}: "
        where = f"the state is in {state_path}"
        if guard is not None:
            # Another member may have stopped the run because the output
            # folder is gone, and then no state file is left to point to.
            try:
                guard()
            except OSError:
                where = (
                    "the output folder was removed or moved away, so its state is "
                    f"not at {state_path}"
                )
        epochs = plural(done, "epoch")
        print(f"{prefix}interrupted after {epochs}; {where}", file=sys.stderr)
        return None
    finally:
        close()
    return trainer


def _no_op() -> None:
    return None


# ----------------------------------------------------------------------------
# dvmrl evaluate


# The reference of the stability threshold, by the data's target kind.
_STABILITY_NOTES = {
    "formation_energy": " (for formation energies: against the elements, not the "
    "convex hull)",
    "energy_above_hull": " above the convex hull",
}


def _format_metrics(
    metrics: dict, title: str, threshold: float, target_kind: str | None = None
) -> str:
    from dvmrl.datasets import STABILITY_THRESHOLDS
    from dvmrl.metrics import DEFAULT_TOLERANCE
    from dvmrl.report import SMALL_TEST_PART

    # A threshold other than the kind's own (a user's CSV read with the default
    # kind and --stability-threshold) leaves the reference unknown.
    note = ""
    if STABILITY_THRESHOLDS.get(target_kind) == threshold:
        note = _STABILITY_NOTES.get(target_kind, "")
    lines = [title]
    for name, unit_template in _TABLE_METRICS:
        unit = unit_template.format(
            tolerance=DEFAULT_TOLERANCE, threshold=threshold, kind_note=note
        )
        if name not in metrics:
            continue
        value = metrics[name]
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            text = "inf" if name == "gcv_score" and value is None else "n/a"
        elif name == "gcv_score":
            text = f"{value:.4g}"
        else:
            text = f"{value:.4f}"
        if name in _UNDEFINED_RATIOS:
            count, reason = _UNDEFINED_RATIOS[name]
            if metrics.get(count) == 0:
                unit += f" (undefined: {reason}, shown as 0)"
        lines.append(f"  {name:<10} {text:>10}  {unit}")
    scored = metrics.get("n")
    if isinstance(scored, int) and scored < SMALL_TEST_PART:
        lines.append(
            f"  only {plural(scored, 'composition')} scored, so a few of them decide "
            "these numbers; use more data for metrics that count"
        )
    return "\n".join(lines)


def _metric_settings(threshold: float) -> dict[str, float]:
    """Name the tolerance of ``accuracy`` and the stability threshold (eV/atom)."""
    from dvmrl.metrics import DEFAULT_TOLERANCE

    return {
        "accuracy_tolerance_ev_per_atom": DEFAULT_TOLERANCE,
        "stability_threshold": threshold,
        "stability_threshold_ev_per_atom": threshold,
    }


def check_recorded_data(data: str) -> None:
    """Raise FileNotFoundError when the checkpoint's own data file is gone.

    ``data`` is the path or name that the checkpoint recorded, used when no
    --data is given.
    """
    if _data_file_gone(data):
        raise FileNotFoundError(
            f"the checkpoint's data file {data} not found: it was moved or deleted "
            "after training; pass --data with its new path"
        )


def contains_training_rows(df, metadata: dict, data: str) -> bool:
    """Tell whether ``df``, read from ``data``, has exactly the training rows.

    The formulas and targets in row order are compared through the
    fingerprint that dvmrl train stores, so a data file that was moved or
    copied after training still counts as the model's own data (logged).
    """
    from dvmrl.splits import data_fingerprint

    stored = metadata.get("data_rows_fingerprint")
    if stored is None or stored != data_fingerprint(df):
        return False
    logger.info(
        "%s contains the same rows as %s, on which the model trained; it is "
        "scored as the model's own data",
        data,
        metadata.get("data"),
    )
    return True


def scored_csv_columns(metadata: dict, own_data: bool, args) -> dict[str, str]:
    """Return how evaluate and validate read a data file (``csv_columns``).

    The checkpoint's column names belong to its own data file. Its target
    kind applies to other files too, because a model of hull energies scores
    hull energies.
    """
    columns = csv_columns(metadata if own_data else {}, args)
    trained_kind = trained_target_kind(metadata)
    if args.target_kind is None and trained_kind:
        columns["target_kind"] = trained_kind
    return columns


def scored_alloy_notation(args, metadata: dict, own_data: bool, data: str) -> bool:
    """Return whether evaluate and validate read ``data`` in alloy notation.

    The checkpoint's notation belongs to its own data file, as its column
    names do; another file is read in alloy notation only with
    --alloy-notation.

    Raises:
        UsageError: for --alloy-notation on the checkpoint's own data, read
            in standard notation when the model trained on it.
    """
    trained_alloy = bool(metadata.get("alloy_notation", False))
    if own_data and args.alloy_notation and not trained_alloy:
        raise UsageError(
            f"--alloy-notation: the model trained on {data} read in standard "
            "notation, and alloy notation would read its formulas as other "
            "compositions; leave --alloy-notation out"
        )
    return bool(args.alloy_notation or (own_data and trained_alloy))


def check_scored_data(
    args: argparse.Namespace, data: str | None, from_checkpoint: bool
) -> str:
    """Check the data set that evaluate or validate scores, and return it.

    ``data`` is --data, or the checkpoint's data when ``from_checkpoint``.

    Raises:
        UsageError: when neither names a data set, or when --target-kind
            contradicts the kind that a fetched file states.
        FileNotFoundError: when the checkpoint's data file is gone.
        ValueError: for CSV-only options given with a vendored data set.
    """
    if data is None:
        raise UsageError(
            "the checkpoint records no data set; pass --data NAME|PATH.csv"
        )
    if from_checkpoint:
        check_recorded_data(data)
    reject_csv_options(args, data)
    # Rejects a --target-kind that contradicts a fetched file's stated kind,
    # which the loader would otherwise replace without a word.
    stated_or_given_kind(data, args.target_kind)
    return data


def load_model(path: str, device):
    """Load a checkpoint onto ``device`` in evaluation mode; return (model, metadata).

    Raises:
        FileNotFoundError: for a missing path or a folder, with the fix.
    """
    from dvmrl.training import load_checkpoint

    checkpoint = Path(path)
    if checkpoint.is_dir():
        raise FileNotFoundError(
            f"checkpoint {checkpoint} is a folder; pass the checkpoint file in "
            f"it, such as {checkpoint / MODEL_FILE}"
        )
    if not checkpoint.is_file():
        raise FileNotFoundError(
            f"checkpoint {checkpoint} not found; pass a model.pt file written by "
            "dvmrl train"
        )
    model, metadata = load_checkpoint(checkpoint, device=device)
    model.eval()
    return model, metadata


def _predict(model, batch, device, with_variance: bool):
    """Return (mean, std or None) in eV/atom for a CompositionBatch."""
    import torch

    means, stds = [], []
    size = 4096
    with torch.no_grad():
        for start in range(0, len(batch), size):
            part = batch[start : start + size].to(device, model.flat.dtype)
            args = (part.element_index, part.frac, part.mask)
            if with_variance:
                mean, variance = model.forward_with_variance(*args)
                stds.append(variance.clamp_min(0).sqrt().cpu().double().numpy())
            else:
                mean = model(*args)
            means.append(mean.cpu().double().numpy())
    mean = np.concatenate(means) if means else np.zeros(0)
    if not with_variance:
        return mean, None
    std = np.concatenate(stds) if stds else np.zeros(0)
    return mean, std


def _has_variance(model) -> bool:
    """Return whether predictions have a variance (heteroscedastic head or members)."""
    from dvmrl.training import EnsembleModel

    if isinstance(model, EnsembleModel):
        return model.has_uncertainty
    return _is_heteroscedastic(model)


def _is_heteroscedastic(model) -> bool:
    config = getattr(model, "config", None)
    return bool(getattr(config, "heteroscedastic", False))


def _recorded_pools(metadata: dict, df, same_data: bool) -> dict | None:
    """Return the composition keys of the checkpoint's training and validation pools.

    Checkpoints store the keys. For older ones the split is cut again from
    the checkpoint's data and accepted only when its fingerprint matches the
    stored one. Returns None when neither works.
    """
    if "training_compositions" in metadata:
        return {
            "training": set(metadata["training_compositions"]),
            "validation": set(metadata.get("validation_compositions") or []),
        }
    kind, fingerprint = metadata.get("split"), metadata.get("split_fingerprint")
    trained_on = metadata.get("data")
    if kind is None or fingerprint is None or trained_on is None:
        return None
    try:
        if not same_data:
            df, _ = _load_data(
                trained_on,
                bool(metadata.get("alloy_notation")),
                csv_columns(metadata),
            )
        split = _split_rows(
            df, kind, int(metadata.get("seed", 0)), metadata.get("holdout_element")
        )
    except (ValueError, FileNotFoundError) as err:
        logger.debug("cannot cut the training split again: %s", err)
        return None
    if split.fingerprint() != fingerprint:
        return None
    pools = _pool_compositions(df, split)
    return {
        "training": set(pools["training_compositions"]),
        "validation": set(pools["validation_compositions"]),
    }


def _check_pool_overlap(
    df, rows: np.ndarray, metadata: dict, same_data: bool, exclude: bool
) -> tuple[np.ndarray, dict[str, Any]]:
    """Find the rows whose composition the model trained or validated on.

    Warns on stderr with their count, or drops them when ``exclude`` is set.

    Returns:
        The rows to score, and the counts for ``evaluation.json``.
    """
    pools = _recorded_pools(metadata, df, same_data)
    if pools is None:
        print(
            "dvmrl evaluate: warning: the checkpoint records neither its training "
            "compositions nor a split that can be cut again, so rows that the "
            "model trained on cannot be found and the metrics may be optimistic",
            file=sys.stderr,
        )
        return rows, {"overlap_checked": False}
    keys = _composition_keys(df["formula"].to_numpy()[rows])
    in_training = np.array([key in pools["training"] for key in keys], dtype=bool)
    in_validation = (
        np.array([key in pools["validation"] for key in keys], dtype=bool)
        & ~in_training
    )
    counts = {
        "overlap_checked": True,
        "n_training_overlap": int(in_training.sum()),
        "n_validation_overlap": int(in_validation.sum()),
        "overlap_excluded": bool(exclude),
    }
    seen = in_training | in_validation
    if not seen.any():
        return rows, counts
    found = (
        f"{int(in_training.sum())} of {len(rows)} rows have a composition of the "
        f"training pool and {int(in_validation.sum())} a composition of the "
        "validation pool"
    )
    if exclude:
        print(
            f"dvmrl evaluate: {found}; scoring the other {int((~seen).sum())}",
            file=sys.stderr,
        )
        return rows[~seen], counts
    print(
        f"dvmrl evaluate: warning: {found}, so these metrics are optimistic; "
        "pass --exclude-training to score only the other rows",
        file=sys.stderr,
    )
    return rows, counts


def _target_kind_text(kind: str | None) -> str:
    return "unknown target kind" if kind is None else kind.replace("_", " ")


def trained_target_kind(metadata: dict) -> str | None:
    """Return the target kind of the data a checkpoint trained on, if it records one."""
    return metadata.get("target_kind") or (metadata.get("data_info") or {}).get(
        "target_kind"
    )


def other_target_kind(metadata: dict, info: dict) -> bool:
    """Tell whether ``info``'s data has another target kind than the training data."""
    trained_kind, kind = trained_target_kind(metadata), info.get("target_kind")
    return trained_kind is not None and kind is not None and trained_kind != kind


def _warn_other_data(metadata: dict, trained_on: str, data: str, info: dict) -> None:
    """Warn on stderr that ``data`` is not the data the checkpoint trained on."""
    trained_kind = trained_target_kind(metadata)
    kind = info.get("target_kind")
    trained = f"{trained_on} ({_target_kind_text(trained_kind)})"
    if other_target_kind(metadata, info):
        message = (
            f"the checkpoint was trained on {trained}, but --data {data} has "
            f"{_target_kind_text(kind)} targets, so the metrics compare "
            "predictions of one property with targets of another"
        )
    else:
        message = (
            f"the checkpoint was trained on {trained}, and --data {data} "
            f"({_target_kind_text(kind)}) is other data, so the metrics measure "
            "how the model transfers to it"
        )
    print(f"dvmrl evaluate: warning: {message}", file=sys.stderr)


def check_data_unchanged(
    df, data: str, metadata: dict, command: str = "evaluate"
) -> None:
    """Raise ValueError when the checkpoint's own data changed since training.

    The test part is cut again from the loaded rows. After rows were added,
    removed, edited or reordered it is no longer the part that training held
    out, and the model may have trained on some of its rows. The split
    fingerprint covers the formulas and targets in row order and the
    indices of every part. Checkpoints without it are not checked.
    ``command`` ("evaluate" or "validate") chooses the advice of the message.
    """
    from dvmrl.splits import data_fingerprint

    kind, stored = metadata.get("split"), metadata.get("split_fingerprint")
    if kind is None or stored is None:
        return
    try:
        split = _split_rows(
            df, kind, int(metadata.get("seed", 0)), metadata.get("holdout_element")
        )
    except ValueError:
        split = None
    if split is not None and split.fingerprint() == stored:
        return
    rows_fingerprint = metadata.get("data_rows_fingerprint")
    if rows_fingerprint is not None and rows_fingerprint == data_fingerprint(df):
        # Same rows, other parts: the split itself is cut differently now.
        reason = (
            f"the {kind} split of these rows differs from the one of training, so "
            "its test part is not the one that training held out"
        )
        fix = "retrain the model"
    else:
        reason = (
            "the data changed since training (their formulas, targets or row order "
            f"differ), so the test part of the {kind} split is not the one that "
            "training held out"
        )
        fix = "restore the data as they were for training"
    if command == "validate":
        instead = (
            f"pass --split {kind} to attack the test part of the current rows "
            "(some of them may be compositions the model trained on)"
        )
    else:
        instead = (
            f"pass --split {kind} to score the test part of the current rows "
            "(rows that the model trained on then get a warning, and "
            "--exclude-training drops them)"
        )
    raise ValueError(f"{data}: {reason}; {fix}, or {instead}")


def run_evaluate(args: argparse.Namespace) -> int:
    """Score a checkpoint, print the table and write the parity plot."""
    from dvmrl.metrics import regression_metrics
    from dvmrl.plotting import axis_labels, parity_plot, quantity_name

    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent
    check_output_folder(out, "--out")
    device = setup_compute(args)
    model, metadata = load_model(args.checkpoint, device)
    run = metadata.get("run", {})
    trained_on = metadata.get("data", run.get("data"))
    data = check_scored_data(
        args,
        args.data if args.data is not None else trained_on,
        from_checkpoint=args.data is None,
    )
    same_data = trained_on is not None and data_reference(data) == trained_on
    alloy = scored_alloy_notation(args, metadata, same_data, data)
    df, info = _load_data(data, alloy, scored_csv_columns(metadata, same_data, args))
    other_path = trained_on is not None and not same_data
    if other_path and contains_training_rows(df, metadata, data):
        same_data = True

    if trained_on is not None and not same_data:
        _warn_other_data(metadata, trained_on, data, info)
    if same_data and args.split is None:
        check_data_unchanged(df, data, metadata)
    kind = args.split or (metadata.get("split") if same_data else None)
    if kind is None:
        rows = np.arange(len(df))
        part = "whole data set"
    else:
        holdout = args.holdout_element
        if holdout is None and kind == metadata.get("split"):
            holdout = metadata.get("holdout_element")
        seed = int(metadata.get("seed", 0))
        rows = _split_rows(df, kind, seed, holdout).test
        part = f"test part of the {kind} split"
    if len(rows) == 0:
        raise ValueError(f"{data}: the {part} is empty; pass another --split")
    if len(rows) < 2:
        raise ValueError(
            f"{data}: the {part} has 1 composition, and the metrics need at least "
            "2; pass a larger --data file or another --split"
        )
    rows, overlap = _check_pool_overlap(
        df, rows, metadata, same_data, args.exclude_training
    )
    if overlap.get("overlap_excluded") and len(rows) < 2:
        remain = "remains" if len(rows) == 1 else "remain"
        raise ValueError(
            f"{data}: {plural(len(rows), 'row')} of the {part} {remain} after "
            "dropping the training and validation compositions, and the metrics "
            "need at least 2; pass other --data or drop --exclude-training"
        )
    if overlap.get("overlap_excluded"):
        part += " without training and validation compositions"

    batch = _featurize_rows(df, rows)
    predictions, _ = _predict(model, batch, device, with_variance=False)
    y_true = df["target"].to_numpy(dtype=np.float64)[rows]
    threshold = args.stability_threshold
    # The training run's threshold applies to its own data unless
    # --target-kind names another kind, whose threshold then applies with
    # its labels.
    requested_kind = getattr(args, "target_kind", None)
    if (
        threshold is None
        and same_data
        and requested_kind in (None, trained_target_kind(metadata))
    ):
        threshold = metadata.get("stability_threshold")
    if threshold is None:
        threshold = float(info.get("stability_threshold", 0.0))
    metrics = dict(
        regression_metrics(y_true, predictions, stability_threshold=threshold)
    )

    name = info.get("name", data)
    title = f"{name}, {part} ({len(rows)} compositions)"
    print(_format_metrics(metrics, title, threshold, info.get("target_kind")))
    # The vertical axis names what the model predicts, which is another
    # property than the data's when the target kinds differ.
    predicted = None
    if other_target_kind(metadata, info):
        predicted = quantity_name(trained_target_kind(metadata))
    plot = parity_plot(
        out / "parity.png",
        y_true,
        predictions,
        df["n_elements"].to_numpy()[rows],
        title=f"{name}: {part}",
        metrics=metrics,
        predicted_quantity=predicted,
        **axis_labels(info),
    )
    _write_json_atomic(
        out / "evaluation.json",
        {
            **metrics,
            "n": int(len(rows)),
            "data": data,
            "part": part,
            "split": kind,
            **_metric_settings(threshold),
            # The data's property, and the one the model predicts, which
            # differ when a model is scored on data of another kind.
            "target_kind": info.get("target_kind"),
            "model_target_kind": trained_target_kind(metadata),
            **overlap,
            "checkpoint": str(Path(args.checkpoint).resolve()),
        },
    )
    print(f"wrote {plot} and {out / 'evaluation.json'}")
    return 0


# ----------------------------------------------------------------------------
# dvmrl predict


def _read_formula_csv(
    path: str, column: str, keep_columns: bool = False
) -> tuple[list[str], list[int], Any]:
    """Read the formula column of a CSV file, with the line of each row.

    The lines are those of the file (line 1 is the header), counting blank
    lines, so that messages point at the right place. With ``keep_columns``
    (the other columns go to the output) every column name must be unique,
    otherwise only the formula column's.

    Returns:
        (formulas, lines, frame): the stripped formulas, their lines, and
        the whole table as text, whose other columns the --output CSV keeps.
    """
    from dvmrl.datasets._csv import guess_column, read_text_table, separator_hint

    source = Path(path)
    if source.is_dir():
        raise ValueError(
            f"--input {source}: the path is a folder; pass a CSV file with a "
            f"{column!r} column"
        )
    if not source.is_file():
        raise FileNotFoundError(f"input file {source} not found")
    frame, lines = read_text_table(source, columns=f"a {column!r} column")
    if column not in frame.columns:
        columns = list(frame.columns)
        hint = separator_hint(columns)
        if hint is not None:
            raise ValueError(
                f"{source} has one column, {columns[0]!r}, and no column "
                f"{column!r}: {hint}"
            )
        guess = guess_column(column, columns)
        if guess is not None:
            raise ValueError(
                f"{source}: missing column {column!r} (columns: {columns}): did you "
                f"mean {guess!r}? Column names are case-sensitive; pass "
                f"--formula-column {shlex.quote(guess)}"
            )
        raise ValueError(
            f"{source}: missing column {column!r} (columns: {columns}); "
            "pass --formula-column NAME"
        )
    names = list(frame.columns)
    # The formula column must be one column, and --output copies the others,
    # so a repeated name among them would make two output columns collide.
    checked = names if keep_columns else [column]
    for name in dict.fromkeys(checked):
        if names.count(name) > 1:
            raise ValueError(
                f"{source} has {names.count(name)} columns named {name!r}: rename "
                "or remove all but one of them"
            )
    if len(frame) == 0:
        raise ValueError(f"{source} has a header but no rows")
    formulas = frame[column].astype(str).str.strip()
    blank = np.flatnonzero((formulas == "").to_numpy())
    if len(blank):
        where = ", ".join(str(lines[r]) for r in blank[:10])
        raise ValueError(f"{source}: empty {column!r} on lines {where}")
    return formulas.tolist(), lines, frame


def _free_name(name: str, used_names) -> str:
    """Return ``name`` with "_input" appended until it is not in ``used_names``.

    Names are compared without letter case, because spreadsheets and
    case-blind tools read Composition and composition as one column.
    """
    used = {str(used_name).casefold() for used_name in used_names}
    while name.casefold() in used:
        name = f"{name}_input"
    return name


def _with_input_columns(table, input_frame, formula_column: str):
    """Append the input CSV's other columns to the predictions, row for row.

    A column whose name the predictions already use gets the suffix
    "_input", so that no value is overwritten.
    """
    table = table.copy()
    for name in input_frame.columns:
        if name == formula_column:
            continue
        table[_free_name(name, table.columns)] = input_frame[name].to_numpy()
    return table


def _domain_warnings(
    compositions: list[dict], formulas: list[str], metadata: dict
) -> list[str]:
    """List a warning for each composition outside the training domain.

    A composition is outside when it has an element absent from the training
    pool, fewer or more elements than every training composition, or an
    atomic fraction below half the smallest one in training.
    """
    domain = metadata.get("training_domain") or {}
    elements = domain.get("elements")
    max_elements = domain.get("max_elements")
    if elements is None or max_elements is None:
        return [
            "the checkpoint records no training domain; compositions are not checked"
        ]
    # Checkpoints that store no minimum element count skip the lower-bound check.
    min_elements = domain.get("min_elements", metadata.get("training_min_elements"))
    min_fraction = domain.get("min_fraction")
    formation = trained_target_kind(metadata) == "formation_energy"
    known = set(elements)
    extrapolation = "the prediction is an extrapolation outside the training domain"
    warnings = []
    for formula, composition in zip(formulas, compositions, strict=True):
        unseen = [symbol for symbol in composition if symbol not in known]
        if unseen:
            warnings.append(
                f"{formula}: {plural(len(unseen), 'element')} never seen in "
                f"training ({', '.join(unseen)}); {extrapolation}, and the model "
                "has learned nothing about these elements"
            )
        count = len(composition)
        if count > int(max_elements):
            warnings.append(
                f"{formula}: {plural(count, 'element')}, but training compositions "
                f"have at most {int(max_elements)}; {extrapolation}"
            )
        if min_elements is not None and count < int(min_elements):
            reason = (
                "; the formation energy of a pure element is 0 eV/atom by definition"
                if formation and count == 1
                else ""
            )
            warnings.append(
                f"{formula}: {plural(count, 'element')}, but training compositions "
                f"have at least {int(min_elements)}; {extrapolation}{reason}"
            )
        if min_fraction is not None and count > 1:
            symbol, lowest = min(composition.items(), key=lambda item: item[1])
            # Half the training minimum leaves room for compositions just
            # beside the training ones.
            if lowest < 0.5 * float(min_fraction):
                warnings.append(
                    f"{formula}: {symbol} has an atomic fraction of {lowest:.3g}, "
                    f"below the smallest in training ({float(min_fraction):.3g}); "
                    f"{extrapolation}"
                )
    return warnings


def _check_predict_arguments(args: argparse.Namespace) -> None:
    """Raise UsageError unless a checkpoint and exactly one formula source are given.

    argparse cannot express "FORMULA... or --input", so the parser makes
    every positional optional and this check names both alternatives.
    """
    sources = "FORMULA... or --input FILE.csv"
    if args.checkpoint is None:
        missing = "CHECKPOINT" if args.input else f"CHECKPOINT and {sources}"
        raise UsageError(
            f"missing {missing}; pass a model.pt file first, as in 'dvmrl predict "
            "runs/x/model.pt Al3Ni' or 'dvmrl predict runs/x/model.pt --input "
            "FILE.csv'"
        )
    if args.input is not None and not args.input.strip():
        raise UsageError("--input is empty; pass the path of a CSV file")
    if args.output is not None and not args.output.strip():
        raise UsageError(
            "--output is empty; pass a file path, such as predictions.csv, or drop "
            "--output to print the table"
        )
    if args.formulas and args.input:
        raise UsageError(f"pass {sources}, not both (exactly one)")
    if not args.formulas and not args.input:
        raise UsageError(
            f"missing {sources}; pass formulas such as Al3Ni after the checkpoint, "
            "or --input FILE.csv (exactly one)"
        )
    if args.formula_column is not None and not args.input:
        raise UsageError(
            f"--formula-column {args.formula_column} names a column of an --input "
            "CSV file; leave it out when the formulas follow the checkpoint"
        )
    args.formula_column = args.formula_column or "formula"


def _alloy_notation_hints(formulas: list[str]) -> list[str]:
    """Return a warning for each grouped formula that also reads as alloy notation."""
    from dvmrl.compositions import reads_as_alloy_notation

    hints = []
    for formula in formulas:
        if not reads_as_alloy_notation(formula):
            continue
        hints.append(
            f"{formula} was read in standard notation, where a group's number "
            "multiplies each of its elements; if its numbers are at.% shares, "
            "pass --alloy-notation"
        )
    return hints


# Compression of a predict --output file by its suffix, as --data reads them.
_OUTPUT_COMPRESSION = {
    ".gz": {"method": "gzip", "mtime": 0},
    ".bz2": {"method": "bz2"},
    ".xz": {"method": "xz"},
}


def _check_output_not_input(args: argparse.Namespace) -> None:
    """Raise ValueError when --output names the --input file itself."""
    if not args.input:
        return
    output, source = Path(args.output), Path(args.input)
    try:
        same = output.exists() and source.exists() and output.samefile(source)
    except OSError:
        same = False
    if same:
        raise ValueError(
            f"--output {args.output} is the --input file, which the predictions "
            "would replace; choose another --output"
        )


def _write_table(path: Path, table) -> None:
    """Write the predictions as CSV, compressed as the file's suffix names.

    .gz, .bz2 and .xz files are compressed whole. A .zip file contains one
    CSV file named like the archive (preds.zip contains preds.csv), which
    is what --input and --data read back.
    """
    suffix = path.suffix.lower()
    if suffix == ".zip":
        inner = path.stem if path.stem.lower().endswith(".csv") else f"{path.stem}.csv"
        compression = {"method": "zip", "archive_name": inner}
    else:
        compression = _OUTPUT_COMPRESSION.get(suffix)
    if compression is None:
        write_text_atomic(path, table.to_csv(index=False, float_format="%.6f"))
        return
    buffer = io.BytesIO()
    table.to_csv(buffer, index=False, float_format="%.6f", compression=compression)
    write_bytes_atomic(path, buffer.getvalue())


def run_predict(args: argparse.Namespace) -> int:
    """Predict compositions given on the command line or in a CSV."""
    import pandas as pd

    from dvmrl.compositions import format_formula
    from dvmrl.featurize import featurize

    _check_predict_arguments(args)
    if args.output:
        check_output_file(Path(args.output), "--output")
        _check_output_not_input(args)
    # The model learned from data sets of metals only, which the data loader
    # enforces, so a composition with a non-metal is rejected here too.
    if args.input:
        formulas, lines, input_frame = _read_formula_csv(
            args.input, args.formula_column, keep_columns=bool(args.output)
        )
        compositions = _parse_formulas(
            formulas, args.alloy_notation, args.input, metals_only=True, lines=lines
        )
    else:
        formulas = [str(f) for f in args.formulas]
        compositions = _parse_formulas(
            formulas,
            args.alloy_notation,
            "command line",
            item="argument",
            metals_only=True,
        )

    device = setup_compute(args)
    model, metadata = load_model(args.checkpoint, device)
    # Printed, not logged, so that the warnings reach stderr whatever the
    # logging configuration.
    warnings = _domain_warnings(compositions, formulas, metadata)
    if not args.alloy_notation:
        warnings = _alloy_notation_hints(formulas) + warnings
    for warning in warnings[:MAX_DOMAIN_WARNINGS]:
        print(f"dvmrl predict: warning: {warning}", file=sys.stderr)
    if len(warnings) > MAX_DOMAIN_WARNINGS:
        print(
            f"dvmrl predict: warning: {len(warnings) - MAX_DOMAIN_WARNINGS} more "
            "warnings of this kind are not shown",
            file=sys.stderr,
        )
    mean, std = _predict(model, featurize(compositions), device, _has_variance(model))
    from dvmrl.datasets._csv import PLAUSIBLE_ABS_TARGET

    large = int((np.abs(np.asarray(mean)) > PLAUSIBLE_ABS_TARGET).sum())
    if large:
        # The loaders warn about such targets; a model trained on them
        # predicts in their units, so its output is flagged too.
        print(
            f"dvmrl predict: warning: {plural(large, 'prediction')} beyond "
            f"{PLAUSIBLE_ABS_TARGET:g} eV/atom in magnitude, which no alloy's "
            "formation or hull energy reaches; the model's training targets were "
            "likely in kJ/mol or meV/atom, so check them and retrain",
            file=sys.stderr,
        )
    if trained_target_kind(metadata) == "energy_above_hull":
        negative = int((np.asarray(mean) < 0).sum())
        if negative:
            # Printed as they are: clipping would hide how far off the model is.
            verb = "lies" if negative == 1 else "lie"
            print(
                f"dvmrl predict: warning: {plural(negative, 'prediction')} of the "
                f"energy above the hull {verb} below 0 eV/atom, which no "
                "composition can have; read such a value as about 0 (on the hull)",
                file=sys.stderr,
            )

    # The CSV keeps the exact fractions, and the printed table rounds them.
    digits = None if args.output else 4
    table = pd.DataFrame(
        {
            "formula": formulas,
            "composition": [format_formula(c, digits=digits) for c in compositions],
            "prediction_ev_per_atom": mean,
            "prediction_kj_per_mol": mean * EV_TO_KJ_PER_MOL,
        }
    )
    if std is not None:
        table["uncertainty_ev_per_atom"] = std
    if args.input:
        table = table.rename(
            columns={"formula": _free_name(args.formula_column, table.columns[1:])}
        )
    if args.output and args.input:
        table = _with_input_columns(table, input_frame, args.formula_column)
    if args.output:
        _write_table(Path(args.output), table)
        print(f"wrote {plural(len(table), 'prediction')} to {args.output}")
    else:
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    if std is not None:
        logger.info("%s", _uncertainty_note(model))
    return 0


def _uncertainty_note(model) -> str:
    """Explain what predict's uncertainty_ev_per_atom column measures for ``model``."""
    members = len(getattr(model, "members", [model]))
    heteroscedastic = _is_heteroscedastic(model)
    if members == 1:
        measure = (
            "the standard deviation that the model's heteroscedastic head "
            "predicts for the targets, learned from the training data's scatter"
        )
        caveat = (
            "it estimates the scatter of the targets, not how far a composition "
            "lies from the training data"
        )
    else:
        measure = (
            "the spread (a standard deviation) of the ensemble members' predictions"
        )
        if heteroscedastic:
            measure += ", with the mean variance their heteroscedastic heads predict"
        caveat = (
            "the members draw their training rows from one data set and share one "
            "architecture, so they can all be wrong the same way"
        )
    return f"uncertainty_ev_per_atom is {measure}, not a calibrated error bar: {caveat}"
