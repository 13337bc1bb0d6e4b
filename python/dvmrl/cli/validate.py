"""``dvmrl validate``: adversarial robustness and shift report of a checkpoint.

For the test compositions of the checkpoint's split (or of ``--split``),
the command finds adversarial composition perturbations and reports:

- the vulnerability at radius ``--epsilon``: the mean largest change of
  the prediction, in eV/atom;
- the robustness radius: per composition the smallest box radius whose
  perturbations move the prediction by ``--tau`` eV/atom, and its mean;
- shift detection: the cross-validated ROC AUC of a classifier telling the
  training compositions from the validation pool and the test part of
  every split kind, and from the validation set each strategy chooses.
  The ``element`` split of that table holds out the element of the split
  being validated when that split is ``element`` (the checkpoint's element
  when ``--split`` is left out), else ``--holdout-element`` or the element
  whose compositions are closest to 10 % of the rows. Its label and
  report.json name it.

Outputs in ``--out DIR``: ``report.json``, ``robustness_radius.png`` (a
histogram of the radii) and ``most_vulnerable.png`` (the most vulnerable
compositions and their perturbations).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from dvmrl._files import json_ready, write_text_atomic
from dvmrl.cli._common import (
    ALLOY_NOTATION_RULES,
    UsageError,
    add_compute_options,
    add_csv_column_options,
    check_output_folder,
    data_reference,
    path_text,
    plural,
    positive_int,
    seed_int,
    setup_compute,
)

logger = logging.getLogger("dvmrl")

REPORT_FILE = "report.json"
HISTOGRAM_FILE = "robustness_radius.png"
VULNERABLE_FILE = "most_vulnerable.png"
# Head dropout used for MC-dropout samples of a model trained without dropout
# (the ensemble-variance strategy needs some disagreement to rank by).
FALLBACK_MC_DROPOUT = 0.1
MC_SAMPLES = 20
TOP_VULNERABLE = 10
# dvmrl.shift.MIN_SAMPLES, repeated so that building the parser does not
# import pandas; a test keeps the two equal.
MIN_SHIFT_SAMPLES = 10


def add_parser(subparsers) -> None:
    """Register ``dvmrl validate``."""
    from dvmrl.adversarial import (
        DEFAULT_EPSILON,
        DEFAULT_FLOOR,
        DEFAULT_R_MAX,
        DEFAULT_STARTS,
        DEFAULT_STEPS,
        DEFAULT_TAU,
    )

    parser = subparsers.add_parser(
        "validate",
        help="adversarial robustness and shift-detection report of a checkpoint",
        description=(
            "Find adversarial composition perturbations of a trained model's test "
            "compositions, report the vulnerability (eV/atom) and robustness radius "
            "(fraction), and measure train/validation/test shift with a classifier "
            "for every split kind and validation strategy."
        ),
    )
    from dvmrl.splits import KINDS

    parser.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="model file written by dvmrl train (model.pt)",
    )
    parser.add_argument(
        "--data",
        default=None,
        metavar="NAME|PATH.csv",
        help="data set name or CSV path; default: the checkpoint's training data",
    )
    add_csv_column_options(
        parser, "the checkpoint's for its own data, else ", "the checkpoint's, else "
    )
    parser.add_argument(
        "--alloy-notation",
        action="store_true",
        help=(
            "read the formulas of another CSV than the checkpoint's data in alloy "
            "notation, where a group's amount is its at.%% share: (CoCrFeNi)90Al10 "
            "is 90 at.%% CoCrFeNi and 10 at.%% Al; "
            + ALLOY_NOTATION_RULES
            + ". The checkpoint's own data is read as in training"
        ),
    )
    parser.add_argument(
        "--split",
        default=None,
        choices=KINDS,
        help="split whose test part is attacked; default: the checkpoint's split, "
        "else random",
    )
    parser.add_argument(
        "--holdout-element",
        default=None,
        metavar="X",
        help="element left out by --split element, and by the element row of "
        "the shift report with any --split (symbol, such as Ni); default for that "
        "row: the split's held-out element, else the element in closest to 10 %% "
        "of the rows",
    )
    parser.add_argument(
        "--strategy",
        default="all",
        help="validation strategy for the shift report: random, gp-uncertainty, "
        "ensemble-variance, adversarial, or all (default)",
    )
    parser.add_argument(
        "--epsilon",
        type=float,
        default=DEFAULT_EPSILON,
        help="box radius of the vulnerability, fraction in (0, 1); "
        f"default {DEFAULT_EPSILON}",
    )
    parser.add_argument(
        "--tau",
        type=float,
        default=DEFAULT_TAU,
        help="prediction change of the robustness radius, eV/atom > 0; "
        f"default {DEFAULT_TAU}",
    )
    parser.add_argument(
        "--floor",
        type=float,
        default=DEFAULT_FLOOR,
        help="minimum fraction an element keeps (elements below it keep their own); "
        f"default {DEFAULT_FLOOR}",
    )
    parser.add_argument(
        "--lambda",
        dest="lam",
        metavar="LAMBDA",
        type=float,
        default=0.0,
        help="weight of the L2 penalty on the perturbation: the search maximises "
        "|prediction change|^2 - LAMBDA ||delta||_2^2, with the change in eV/atom "
        "and delta in fraction units, so it keeps only perturbations whose "
        "change exceeds sqrt(LAMBDA) ||delta||; the larger LAMBDA, the more "
        "compositions keep delta = 0 and a change of 0 (how many depends on "
        "the model's gradients). It applies to the vulnerability and the "
        "adversarial validation set; the robustness radius, the smallest "
        "change that moves the prediction by --tau, searches without it; "
        "default 0",
    )
    parser.add_argument(
        "--r-max",
        type=float,
        default=DEFAULT_R_MAX,
        help="cap of the robustness radius, fraction in (0, 1); "
        f"default {DEFAULT_R_MAX}",
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=DEFAULT_STEPS,
        help=f"gradient steps per search run; default {DEFAULT_STEPS}",
    )
    parser.add_argument(
        "--starts",
        type=positive_int,
        default=DEFAULT_STARTS,
        help=(
            "search runs per composition, split between the two signs of the "
            "change (an odd count gives the + sign one run more; 1 is read as 2); "
            f"default {DEFAULT_STARTS}"
        ),
    )
    parser.add_argument(
        "--bisection-steps",
        type=positive_int,
        default=8,
        help="halvings of the radius interval (resolution r_max / 2^N); default 8",
    )
    parser.add_argument(
        "--max-compositions",
        type=positive_int,
        default=500,
        help="test compositions attacked, drawn by --seed when there are more; "
        "default 500",
    )
    parser.add_argument(
        "--validation-size",
        type=positive_int,
        default=200,
        help="size of each strategy's validation set (at most the pool); default 200",
    )
    parser.add_argument(
        "--shift-samples",
        # A plain int: _check_arguments names the real minimum.
        type=int,
        default=500,
        help=f"rows per set in shift detection, at most (>= {MIN_SHIFT_SAMPLES}); "
        "default 500",
    )
    parser.add_argument(
        "--shift-folds",
        type=int,
        default=5,
        help="cross-validation folds of shift detection (>= 2); default 5",
    )
    parser.add_argument(
        "--seed",
        type=seed_int,
        default=0,
        help="seed of every draw (an integer >= 0); default 0",
    )
    parser.add_argument(
        "--out",
        type=path_text,
        default="validation",
        metavar="DIR",
        help="output folder; default ./validation",
    )
    add_compute_options(parser)
    parser.set_defaults(func=run)


def _check_arguments(args: argparse.Namespace) -> list[str]:
    """Reject bad values before any work; return the strategies to report."""
    from dvmrl.validation import STRATEGIES

    if not (math.isfinite(args.epsilon) and 0.0 < args.epsilon < 1.0):
        raise UsageError(
            f"--epsilon must lie in (0, 1) (fraction units, 0.05 = 5 at.%), got "
            f"{args.epsilon}"
        )
    if not (math.isfinite(args.tau) and args.tau > 0.0):
        raise UsageError(f"--tau must be a positive number of eV/atom, got {args.tau}")
    if not (math.isfinite(args.floor) and 0.0 < args.floor < 1.0):
        from dvmrl.adversarial import DEFAULT_FLOOR

        raise UsageError(
            f"--floor must lie in (0, 1), got {args.floor}; a floor of 0 would let "
            f"the search remove an element (default {DEFAULT_FLOOR})"
        )
    if not (math.isfinite(args.lam) and args.lam >= 0.0):
        raise UsageError(f"--lambda must be a finite number >= 0, got {args.lam}")
    if not (math.isfinite(args.r_max) and 0.0 < args.r_max < 1.0):
        raise UsageError(f"--r-max must lie in (0, 1), got {args.r_max}")
    if args.r_max < args.epsilon:
        logger.warning(
            "--r-max %g is below --epsilon %g: a composition capped at r_max may "
            "still move by more than tau within epsilon; raise --r-max to compare "
            "the two",
            args.r_max,
            args.epsilon,
        )
    if args.shift_folds < 2:
        raise UsageError(f"--shift-folds must be >= 2, got {args.shift_folds}")
    if args.shift_samples < MIN_SHIFT_SAMPLES:
        raise UsageError(
            f"--shift-samples must be >= {MIN_SHIFT_SAMPLES}, got "
            f"{args.shift_samples}; pass a larger number of rows per set"
        )
    # Each validation set is one side of a shift test, cut to --shift-samples
    # rows and split into the folds.
    if args.shift_folds > args.shift_samples:
        raise UsageError(
            f"--shift-folds {args.shift_folds} exceeds --shift-samples "
            f"{args.shift_samples}: each set is cut to --shift-samples rows and "
            "split into the folds; lower --shift-folds or raise --shift-samples"
        )
    if args.shift_folds > args.validation_size:
        raise UsageError(
            f"--shift-folds {args.shift_folds} exceeds --validation-size "
            f"{args.validation_size}: each validation set is split into the folds; "
            "lower --shift-folds or raise --validation-size"
        )
    try:
        check_output_folder(Path(args.out), "--out")
    except ValueError as err:
        raise UsageError(str(err)) from None
    _reject_other_command_folder(Path(args.out))
    if args.strategy == "all":
        return list(STRATEGIES)
    if args.strategy not in STRATEGIES:
        raise UsageError(
            f"unknown --strategy {args.strategy!r}: expected one of "
            f"{', '.join(STRATEGIES)} or all"
        )
    return [args.strategy]


def _resolve_split(args, df, metadata, own_data: bool = False):
    """Return the split, its kind and its held-out element (None unless ``element``).

    ``own_data`` is True when ``df`` contains the rows the model trained on,
    even when --data names another path.
    """
    from dvmrl.splits import EmptyTrainingPartError, make_split

    trained_on = metadata.get("data")
    kind = args.split or metadata.get("split") or "random"
    holdout = args.holdout_element
    if holdout is None and kind == metadata.get("split"):
        holdout = metadata.get("holdout_element")
    seed = int(metadata.get("seed", 0))
    if kind == "element" and holdout is None:
        raise UsageError("--split element needs --holdout-element X (such as Ni)")
    # Other splits leave --holdout-element to the shift table's element split.
    try:
        split = make_split(
            df, kind, seed, holdout_element=holdout if kind == "element" else None
        )
    except EmptyTrainingPartError as err:
        # validate has no share options, so its advice names what it has.
        raise ValueError(
            f"{err.cause}; pass another --split or more data"
        ) from err
    same = (
        own_data
        or trained_on is None
        or args.data is None
        or data_reference(args.data) == trained_on
    )
    if not same:
        logger.warning(
            "the checkpoint was trained on %s; the %s split of %s may share rows "
            "with its training data",
            trained_on,
            kind,
            args.data,
        )
    else:
        _warn_other_split(df, split, kind, holdout, seed, metadata)
    return split, kind, holdout if kind == "element" else None


def _reject_other_command_folder(folder: Path) -> None:
    """Raise UsageError when ``folder`` contains the output of dvmrl train or run.

    Both write run.json, and dvmrl run also writes its own report.json,
    which validate would replace. An earlier validate report may be
    replaced.
    """
    owner = None
    if (folder / "run.json").is_file():
        owner = "dvmrl train or dvmrl run (run.json)"
    elif (folder / REPORT_FILE).is_file():
        try:
            report = json.loads((folder / REPORT_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            report = None
        if isinstance(report, dict) and report.get("format") == "dvmrl-report":
            owner = "dvmrl run (report.json)"
    if owner is not None:
        raise UsageError(
            f"--out {folder} contains the output of {owner}, and validate would "
            f"overwrite {REPORT_FILE} there; choose another --out, such as "
            f"{folder / 'robustness'}"
        )


def _warn_other_split(df, split, kind, holdout, seed, metadata) -> None:
    """Warn when the attacked test part contains rows the checkpoint trained on."""
    from dvmrl.splits import make_split

    trained_kind = metadata.get("split")
    trained_holdout = metadata.get("holdout_element")
    if trained_kind is None:
        return
    if kind == trained_kind and (kind != "element" or holdout == trained_holdout):
        return
    trained = make_split(
        df,
        trained_kind,
        seed,
        holdout_element=trained_holdout if trained_kind == "element" else None,
    )
    # Every row outside the checkpoint's test part was in its training pool.
    seen = np.setdiff1d(split.test, trained.test)
    if len(seen):
        logger.warning(
            "the checkpoint was trained on the %s split, so %d of the %d test "
            "compositions of the %s split were in its training pool; pass "
            "--split %s to score unseen compositions only",
            trained_kind,
            len(seen),
            len(split.test),
            kind,
            trained_kind,
        )


def _prediction_samples(model, batch, n_samples: int, seed: int) -> np.ndarray:
    """Return prediction samples [S, B] in eV/atom for the ensemble-variance strategy.

    An ensemble of two or more members gives one sample per member; a single
    model gives ``n_samples`` MC-dropout samples.
    """
    import torch

    from dvmrl.training import EnsembleModel

    if isinstance(model, EnsembleModel) and len(model) > 1:
        part = batch.to(model.flat.device, model.flat.dtype)
        with torch.no_grad():
            samples = model.member_predictions(part.element_index, part.frac, part.mask)
        return samples.cpu().double().numpy()
    if isinstance(model, EnsembleModel):
        model = model.members[0]
    return _mc_dropout_samples(model, batch, n_samples, seed)


def _mc_dropout_samples(model, batch, n_samples: int, seed: int) -> np.ndarray:
    """Draw MC-dropout predictions [S, B] in eV/atom, restoring the model after."""
    import torch

    config = model.config
    saved_dropout = config.dropout
    saved_generator = model.dropout_generator
    saved_mc = model.mc_dropout_enabled
    if config.head_layers == 0:
        raise ValueError("ensemble-variance needs a model with at least one head layer")
    if saved_dropout <= 0.0:
        logger.info(
            "the model has no head dropout; MC-dropout samples use p = %g",
            FALLBACK_MC_DROPOUT,
        )
        model.set_dropout(FALLBACK_MC_DROPOUT)
    device = model.flat.device
    part = batch.to(device, model.flat.dtype)
    samples = []
    try:
        model.dropout_generator = torch.Generator(device=device).manual_seed(seed)
        model.mc_dropout(True)
        with torch.no_grad():
            for _ in range(n_samples):
                out = model(part.element_index, part.frac, part.mask)
                samples.append(out.cpu().double().numpy())
    finally:
        model.set_dropout(saved_dropout)
        model.dropout_generator = saved_generator
        model.mc_dropout(saved_mc)
    return np.stack(samples)


def _select_sets(args, strategies, model, split, batch, features, targets):
    from dvmrl.validation import select_validation_set

    size = min(args.validation_size, len(split.val))
    if len(strategies) > 1 and len(split.val) <= args.validation_size:
        # Every strategy then takes the whole pool, so their shift scores
        # compare the same set.
        # Shift detection skips sets with fewer rows than its folds, so a
        # smaller size only helps while it keeps that many.
        if len(split.val) - 1 >= args.shift_folds:
            fix = (
                f"pass a --validation-size from {args.shift_folds} to "
                f"{len(split.val) - 1}"
            )
        else:
            fix = "use a larger data set"
        logger.warning(
            "the validation pool has %s, no more than --validation-size %d, so "
            "every strategy selects the whole pool and their results coincide; "
            "%s to compare the strategies",
            plural(len(split.val), "composition"),
            args.validation_size,
            fix,
        )
    selections, seconds = {}, {}
    for strategy in strategies:
        start = time.perf_counter()
        options: dict[str, Any] = {}
        if strategy == "ensemble-variance":
            options["samples"] = _prediction_samples(
                model, batch[split.val], MC_SAMPLES, args.seed
            )
        if strategy == "adversarial":
            options["predictor"] = model
            options["epsilon"] = args.epsilon
            options["floor"] = args.floor
            # The same search settings as the vulnerability and robustness scores.
            options["search_options"] = {
                "lam": args.lam,
                "steps": args.steps,
                "starts": args.starts,
            }
        selections[strategy] = select_validation_set(
            strategy,
            split.val,
            size,
            args.seed,
            test_indices=split.test,
            train_indices=split.train,
            batch=batch,
            features=features,
            targets=targets,
            **options,
        )
        seconds[strategy] = time.perf_counter() - start
    return selections, seconds


def _format_delta(symbols: list[str], delta: np.ndarray) -> str:
    return ", ".join(
        f"{symbol} {value:+.3f}"
        for symbol, value in zip(symbols, delta, strict=True)
        if abs(value) >= 5e-4
    )


def _histogram(
    radii: np.ndarray, reached: np.ndarray, r_max: float, tau: float, path: Path
) -> None:
    """Plot the radii, with the compositions capped at r_max in their own colour.

    A capped composition moved by less than tau within r_max, so its radius
    is a lower bound, not a measured radius.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from dvmrl.plotting import save_figure

    figure = Figure(figsize=(6, 4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    reached = np.asarray(reached, dtype=bool)
    bins = np.linspace(0.0, r_max, 26)
    axes.hist(
        [radii[reached], radii[~reached]],
        bins=bins,
        stacked=True,
        color=["#1f77b4", "#bbbbbb"],
        edgecolor="white",
        label=["reached tau", f"capped at r_max ({int((~reached).sum())})"],
    )
    axes.legend(loc="upper left", frameon=False)
    axes.set_xlabel("robustness radius (fraction)")
    axes.set_ylabel("compositions")
    axes.set_title(f"smallest box radius that moves the prediction by {tau:g} eV/atom")
    figure.tight_layout()
    save_figure(figure, path)


def _vulnerable_plot(rows: list[dict], epsilon: float, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from dvmrl.plotting import save_figure

    figure = Figure(figsize=(9, 0.55 * len(rows) + 1.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positions = np.arange(len(rows))[::-1]
    changes = [row["change"] for row in rows]
    colours = ["#d62728" if c > 0 else "#1f77b4" for c in changes]
    axes.barh(positions, changes, color=colours)
    axes.set_yticks(positions, [row["formula"] for row in rows], fontsize=8)
    axes.axvline(0.0, color="black", linewidth=0.8)
    for position, row in zip(positions, rows, strict=True):
        axes.annotate(
            row["perturbation"],
            (0.0, position),
            xytext=(4 if row["change"] < 0 else -4, 0),
            textcoords="offset points",
            ha="left" if row["change"] < 0 else "right",
            va="center",
            fontsize=7,
        )
    axes.set_xlabel(f"prediction change at epsilon = {epsilon:g} (eV/atom)")
    axes.set_title("most vulnerable compositions and their perturbations")
    figure.tight_layout()
    save_figure(figure, path)


def _write_json_atomic(path: Path, payload: dict) -> None:
    text = json.dumps(json_ready(payload), indent=2, sort_keys=True, allow_nan=False)
    write_text_atomic(path, text + "\n")


def _check_shift_holdout(df, element: str) -> None:
    """Raise UsageError unless ``element`` is a symbol that occurs in ``df``."""
    from dvmrl.shift import default_holdout_element
    from dvmrl.splits import _check_holdout_element, _element_mask

    try:
        element = _check_holdout_element(df, element)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if not _element_mask(df, element).any():
        raise UsageError(
            f"--holdout-element {element} occurs in no composition of the data, so "
            "the shift table's element split would hold out nothing; pass an "
            f"element of the data, such as {default_holdout_element(df)}"
        )


def _records(frame) -> list[dict]:
    return [
        {key: json_ready(value) for key, value in row.items()}
        for row in frame.to_dict(orient="records")
    ]


def run(args: argparse.Namespace) -> int:
    """Attack the checkpoint's test compositions and write the report.

    The output folder is locked from the start, so a second validate into
    it stops at once instead of replacing this one's files at the end.
    """
    from dvmrl._files import FolderLock

    strategies = _check_arguments(args)
    out = Path(args.out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with FolderLock(out, resumable=False):
            return _validate(args, strategies)
    except BaseException:
        # A folder made for a run that failed stays behind only if it has files.
        if created and not any(out.iterdir()):
            out.rmdir()
        raise


def _validate(args: argparse.Namespace, strategies: list[str]) -> int:
    """Run validate after its arguments are checked and its folder is locked."""
    from dvmrl.adversarial import robustness_radius, vulnerability
    from dvmrl.datasets import resolve_data
    from dvmrl.elements import ELEMENTS
    from dvmrl.featurize import composition_features, featurize
    from dvmrl.plotting import axis_labels
    from dvmrl.shift import (
        default_holdout_element,
        split_shift_table,
        strategy_shift_table,
    )
    from dvmrl.splits import distinct_alloy_rows

    device = setup_compute(args)
    started = time.perf_counter()
    from dvmrl.cli.train import (
        check_scored_data,
        contains_training_rows,
        load_model,
        other_target_kind,
        scored_alloy_notation,
        scored_csv_columns,
        trained_target_kind,
    )

    model, metadata = load_model(args.checkpoint, device)
    data = check_scored_data(
        args, args.data or metadata.get("data"), from_checkpoint=not args.data
    )
    own_data = data_reference(data) == metadata.get("data")
    df, info = resolve_data(
        data,
        alloy_notation=scored_alloy_notation(args, metadata, own_data, data),
        **scored_csv_columns(metadata, own_data, args),
    )
    if not own_data and contains_training_rows(df, metadata, data):
        own_data = True
    if other_target_kind(metadata, info):
        logger.warning(
            "the checkpoint predicts %s, but --data %s has %s targets, so the "
            "table sets predictions of one property beside targets of another",
            trained_target_kind(metadata),
            data,
            info.get("target_kind"),
        )
    if own_data and args.split is None:
        # The same check as dvmrl evaluate: after the rows changed, the test
        # part cut again may hold compositions that the model trained on.
        from dvmrl.cli.train import check_data_unchanged

        check_data_unchanged(df, data, metadata, command="validate")
    split, kind, split_holdout = _resolve_split(args, df, metadata, own_data)
    if args.holdout_element is not None and kind != "element":
        # Only the shift table's element split uses it then, so it is checked
        # here, before the search, rather than skipped with a warning later.
        _check_shift_holdout(df, args.holdout_element)
    # The shift table's element split holds out the same element as the
    # checkpoint's split, or else --holdout-element or the default choice.
    shift_holdout = split_holdout or args.holdout_element or default_holdout_element(df)
    if args.holdout_element:
        shift_holdout_source = "--holdout-element"
    elif split_holdout:
        shift_holdout_source = "checkpoint split"
    else:
        shift_holdout_source = "closest to 10 % of the rows"
    if len(split.test) == 0:
        raise ValueError(f"the test part of the {kind} split of {data} is empty")

    batch = featurize(df["formula"].tolist())
    features = composition_features(batch)
    targets = df["target"].to_numpy(dtype=np.float64)
    rng = np.random.default_rng(args.seed)
    # The same compositions as the robustness probes of dvmrl run.
    rows = split.test[distinct_alloy_rows(df, split.test)]
    if len(rows) == 0:
        raise ValueError(
            f"the test part of the {kind} split of {data} has no composition of "
            "two or more elements, and only those can be perturbed"
        )
    if len(rows) < len(split.test):
        logger.info(
            "attacking %s of the %d test rows: single elements cannot be "
            "perturbed, and a repeated composition counts once",
            plural(len(rows), "distinct composition"),
            len(split.test),
        )
    if len(rows) > args.max_compositions:
        rows = np.sort(rng.choice(rows, size=args.max_compositions, replace=False))
    attacked = batch[rows].trimmed()
    formulas = df["formula"].to_numpy()[rows].tolist()
    from dvmrl.adversarial import _check_floor

    _check_floor(args.floor, attacked.mask, formulas, option="--floor")
    if "adversarial" in strategies:
        # The adversarial strategy perturbs training compositions drawn at
        # random, so the floor must suit every one of them, checked now
        # rather than after the scores have been computed.
        train_rows = np.asarray(split.train)
        _check_floor(
            args.floor,
            batch[train_rows].mask,
            df["formula"].to_numpy()[train_rows].tolist(),
            option="--floor",
        )

    split_seed = int(metadata.get("seed", 0))
    pool_note = f"the validation part of the {kind} split with seed {split_seed}"
    if metadata.get("member_divisions") == "own":
        # Members i > 0 trained on the divisions of seed + i, which take most
        # of this pool into their training parts.
        pool_note += (
            ", member 0's; the other ensemble members trained on their own "
            "divisions, which put most of this pool in their training parts"
        )
        logger.warning(
            "the checkpoint is an ensemble whose members trained on their own "
            "divisions: the validation pool that the strategies draw from is "
            "member 0's, and the other members trained on most of it"
        )
    search = {
        "floor": args.floor,
        "lam": args.lam,
        "steps": args.steps,
        "starts": args.starts,
        "seed": args.seed,
    }
    on_device = attacked.to(device)
    timings = {}
    start = time.perf_counter()
    vuln = vulnerability(model, on_device, epsilon=args.epsilon, **search)
    timings["vulnerability"] = time.perf_counter() - start
    start = time.perf_counter()
    # A penalised search stops short of tau where an unpenalised one reaches
    # it, which would overstate the radius, so the radius searches without it.
    robust = robustness_radius(
        model,
        on_device,
        tau=args.tau,
        r_max=args.r_max,
        bisection_steps=args.bisection_steps,
        **{**search, "lam": 0.0},
    )
    timings["robustness_radius"] = time.perf_counter() - start

    start = time.perf_counter()
    shift_options = {
        "max_samples": args.shift_samples,
        "folds": args.shift_folds,
        "seed": args.seed,
    }
    # The split kinds use the checkpoint's division, as the strategies' pool
    # does, and --seed draws the classifier folds.
    split_table = split_shift_table(
        df,
        features,
        holdout_element=shift_holdout,
        split_seed=split_seed,
        **shift_options,
    )
    selections, selection_seconds = _select_sets(
        args, strategies, model, split, batch, features, targets
    )
    strategy_table = strategy_shift_table(
        features, split.train, selections, **shift_options
    )
    timings["shift_detection"] = time.perf_counter() - start

    per_composition = []
    vt, rt = vuln.table, robust.table
    delta = vuln.search.delta.numpy()
    for position in range(len(rows)):
        symbols = [
            ELEMENTS[int(e)]
            for e, m in zip(
                attacked.element_index[position], attacked.mask[position], strict=True
            )
            if m
        ]
        per_composition.append(
            {
                "formula": formulas[position],
                "target": float(targets[rows[position]]),
                "prediction": float(vt["prediction"][position]),
                "change": float(vt["change"][position]),
                "perturbed_formula": vt["perturbed_formula"][position],
                "perturbation": _format_delta(symbols, delta[position][: len(symbols)]),
                "delta_l2": float(vt["delta_l2"][position]),
                "robustness_radius": float(rt["radius"][position]),
                "robustness_radius_l2": float(rt["radius_l2"][position]),
                "reached_tau": bool(rt["reached"][position]),
            }
        )

    shift_splits = _records(split_table)
    for row in shift_splits:
        if row["split"] == "element":
            row["holdout_element"] = shift_holdout
    shift_auc = {
        f"{_split_label(row)}: {row['comparison']}": row["auc"] for row in shift_splits
    }
    shift_auc.update(
        {
            f"{row['strategy']}: {row['comparison']}": row["auc"]
            for row in _records(strategy_table)
        }
    )
    report = {
        "checkpoint": str(Path(args.checkpoint).resolve()),
        "data": data,
        "data_name": info.get("name", data),
        "split": kind,
        "holdout_element": split_holdout,
        "shift_holdout_element": shift_holdout,
        "shift_holdout_source": shift_holdout_source,
        # What the targets are: DFT values for the vendored data sets, other
        # reference values for a user's file.
        "target_label": axis_labels(info)["reference"],
        "target_kind": info.get("target_kind"),
        "model_target_kind": trained_target_kind(metadata),
        "robustness_radius": robust.score,
        "robustness_radius_l2": robust.score_l2,
        "vulnerability": vuln.score,
        "epsilon": args.epsilon,
        "tau": args.tau,
        "floor": args.floor,
        "lambda": args.lam,
        "r_max": args.r_max,
        "steps": args.steps,
        # The search reads 1 as 2 (one run on each sign of the change).
        "starts": max(args.starts, 2),
        "seed": args.seed,
        "bisection_steps": args.bisection_steps,
        "max_compositions": args.max_compositions,
        "validation_size": args.validation_size,
        "shift_samples": args.shift_samples,
        "shift_folds": args.shift_folds,
        "validation_pool": pool_note,
        "n_compositions": len(rows),
        "n_not_reached": robust.n_not_reached,
        "units": {
            "robustness_radius": "fraction",
            "vulnerability": "eV/atom",
            "tau": "eV/atom",
            "epsilon": "fraction",
        },
        "shift_auc": shift_auc,
        "shift_splits": shift_splits,
        "shift_strategies": _records(strategy_table),
        "validation_sets": {
            name: chosen.tolist() for name, chosen in selections.items()
        },
        "selection_seconds": selection_seconds,
        "seconds": {**timings, "total": time.perf_counter() - started},
        "compositions": per_composition,
    }

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json_atomic(out / REPORT_FILE, report)
    _histogram(
        rt["radius"].to_numpy(),
        rt["reached"].to_numpy(),
        args.r_max,
        args.tau,
        out / HISTOGRAM_FILE,
    )
    ranked = sorted(per_composition, key=lambda row: -abs(row["change"]))[
        :TOP_VULNERABLE
    ]
    _vulnerable_plot(ranked, args.epsilon, out / VULNERABLE_FILE)
    _print_report(report, ranked)
    print(
        f"wrote {out / REPORT_FILE}, {out / HISTOGRAM_FILE} and "
        f"{out / VULNERABLE_FILE}"
    )
    return 0


def _split_label(row: dict) -> str:
    """Name a shift-table split, with the held-out element for ``element``."""
    if row["split"] == "element":
        return f"element ({row['holdout_element']} held out)"
    return row["split"]


def _print_report(report: dict, ranked: list[dict]) -> None:
    print(
        f"compositions        {report['n_compositions']} "
        f"(test part, {report['split']} split)"
    )
    print(
        f"vulnerability       {report['vulnerability']:.4f} eV/atom "
        f"(epsilon {report['epsilon']:g})"
    )
    print(
        f"robustness radius   {report['robustness_radius']:.4f} (L2 "
        f"{report['robustness_radius_l2']:.4f}; tau {report['tau']:g} eV/atom, "
        f"{report['n_not_reached']} capped at r_max {report['r_max']:g})"
    )
    print()
    # Target and prediction in eV/atom, so a large change can be read against
    # the model's error on that composition.
    label = report.get("target_label", "target")
    print(
        f"{'formula':<24} {label:>9} {'predicted':>9} {'change eV/atom':>14} "
        f"{'radius':>8}  perturbation"
    )
    for row in ranked:
        print(
            f"{row['formula']:<24} {row['target']:>9.3f} {row['prediction']:>9.3f} "
            f"{row['change']:>+14.4f} {row['robustness_radius']:>8.4f}  "
            f"{row['perturbation']}"
        )
    print(
        f"change and perturbation: the largest move of the prediction within "
        f"epsilon {report['epsilon']:g}; radius: the smallest box radius that moves "
        f"it by tau {report['tau']:g} eV/atom (r_max when no change within r_max does)"
    )
    print()
    # 0.5 means the classifier cannot tell the two sets apart (no shift) and
    # 1 a complete shift. Without a shift, values a little below 0.5 arise by
    # chance.
    print(f"{'shift detection (0.5: no shift, 1: full shift)':<48} {'ROC AUC':>8}")
    for name, auc in report["shift_auc"].items():
        print(f"{name:<48} {auc:>8.3f}")
    print(
        "Values a little below 0.5 arise by chance on small or similar sets; they "
        "mean no shift."
    )
    by_design = list(
        dict.fromkeys(
            _split_label(row)
            for row in report["shift_splits"]
            if row["split"] in ("element", "binary-to-ternary")
        )
    )
    if by_design:
        # The features record which elements, and how many, a composition
        # has, so these splits separate the sets by construction.
        print(
            f"{' and '.join(by_design)}: the parts differ in which elements or "
            "how many elements their compositions have, which the features "
            "show, so an AUC near 1 is expected there and is no warning."
        )
    element_rows = [r for r in report["shift_splits"] if r["split"] == "element"]
    if report.get("shift_holdout_source") == "closest to 10 % of the rows" and (
        element_rows
    ):
        print(
            f"The element split holds out {report['shift_holdout_element']}, the "
            "element whose compositions make up closest to 10 % of the rows; "
            "--holdout-element X holds out another."
        )
