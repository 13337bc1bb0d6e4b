"""``dvmrl run``: the agent against random search and Bayesian optimisation."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from pathlib import Path

from dvmrl.cli._common import (
    UsageError,
    add_compute_options,
    add_csv_column_options,
    data_reference,
    path_text,
    positive_int,
    reject_csv_options,
    setup_compute,
    stated_or_given_kind,
)
from dvmrl.experiment import ONLINE_LEARNING_STARTS

logger = logging.getLogger("dvmrl")

LOG_FILE = "run.log"


def _preset_help() -> str:
    from dvmrl.experiment import PRESETS

    parts = []
    for preset in PRESETS.values():
        pool = (
            f"training pool subsampled to {preset.max_train} and validation pool to "
            f"{preset.max_val} compositions"
            if preset.max_train
            else "whole training and validation pools"
        )
        parts.append(
            f"{preset.name}: {preset.epochs} epochs per method and seed "
            f"({preset.trial_epochs}-epoch trials, agent steps of {preset.agent_slice} "
            f"epochs), {preset.seeds} seed(s), {pool}, {preset.retrain_epochs}-epoch "
            f"chemsys retraining, robustness on {preset.robust_n} test compositions"
        )
    return "; ".join(parts)


def add_parser(subparsers) -> None:
    """Register ``dvmrl run``."""
    from dvmrl.experiment import DEFAULT_DATA, METHODS

    parser = subparsers.add_parser(
        "run",
        help="compare the agent with random search and Bayesian optimisation",
        description=(
            "Tune the composition GNN with each method on equal budgets (counted in "
            "training epochs), score every chosen model on the held-out test part "
            "of the random split, measure its robustness, retrain its configuration "
            "on the chemsys split, and write report.json, report.md and figures. "
            "Progress is saved after every trial or agent step, so an interrupted "
            "run continues with --resume. Budgets: " + _preset_help() + ". "
            "Measured on 2 CPU cores: quick took 17 s, and small about 2 minutes "
            "on a quiet machine and up to 7 on a shared one; full is meant for "
            "GPU nodes."
        ),
    )
    parser.add_argument(
        "--data",
        default=None,
        metavar="NAME|PATH",
        help=f"vendored data set name or a CSV file with formula and target columns; "
        f"default: {DEFAULT_DATA}",
    )
    add_csv_column_options(parser, "the resumed run's, else ")
    parser.add_argument(
        "--budget",
        default=None,
        metavar="quick|small|full|FILE.json",
        help="budget preset (epoch counts above) or a JSON file with the fields of "
        "dvmrl.experiment.Preset; default: small",
    )
    parser.add_argument(
        "--seeds",
        type=positive_int,
        default=None,
        metavar="N",
        help="run seeds 0 .. N-1; default: the preset's count "
        "(quick 1, small 3, full 5). Each seed runs every method once more: time "
        "and disk grow in proportion to N (with quick on 2 CPU cores, about 17 s "
        "and 4 to 8 MB per seed; wider chosen models take more disk)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="METHOD",
        help=f"methods to compare, from {', '.join(METHODS)}; default: all",
    )
    parser.add_argument(
        "--agent",
        default=None,
        metavar="PATH",
        help="agent file for the agent method; default: the pretrained agent shipped "
        "with dvmrl",
    )
    parser.add_argument(
        "--agent-learn",
        action="store_true",
        default=None,
        help="let the agent explore (epsilon-greedy) and update its Q-network "
        "during its episodes, once an episode has given it "
        f"{ONLINE_LEARNING_STARTS} transition"
        f"{'' if ONLINE_LEARNING_STARTS == 1 else 's'} (default: greedy, frozen)",
    )
    add_compute_options(parser)
    parser.add_argument(
        "--out",
        type=path_text,
        default="dvmrl-run",
        metavar="DIR",
        help="output folder for the report, checkpoints, resume state and run.log; "
        "default: ./dvmrl-run",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last completed trial or step; "
        "--data, --budget, --seeds, --methods, --agent and --agent-learn default "
        "to the values the run was started with",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="hide the progress bars (they are hidden anyway when stderr is not "
        "a terminal)",
    )
    parser.set_defaults(func=run)


def _progress_factory(enabled: bool):
    # Bars redrawn with carriage returns only clutter a redirected stderr.
    if not (enabled and sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    def make(method: str, seed: int, total: int):
        return tqdm(
            total=total,
            desc=f"{method} seed {seed}",
            unit="epoch",
            file=sys.stderr,
            leave=True,
            dynamic_ncols=True,
        )

    return make


def _attach_log_file(out_dir: Path) -> logging.Handler:
    out_dir.mkdir(parents=True, exist_ok=True)
    # A path that is not UTF-8 reaches the log as \udcXX escapes.
    handler = logging.FileHandler(
        out_dir / LOG_FILE, encoding="utf-8", errors="backslashreplace"
    )
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger("dvmrl")
    root.addHandler(handler)
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    return handler


def _recorded_run(out_dir: Path) -> dict | None:
    """Return the settings that the run in ``out_dir`` was started with, if readable.

    A missing or corrupt run.json gives None; Experiment.prepare then
    reports the problem with its fix.
    """
    from dvmrl.experiment import RUN_FILE

    try:
        recorded = json.loads((out_dir / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(recorded, dict) or not isinstance(
        recorded.get("signature"), dict
    ):
        return None
    return {
        "data": recorded.get("data"),
        "formula_column": recorded.get("formula_column"),
        "target_column": recorded.get("target_column"),
        **recorded["signature"],
    }


def _fill_defaults(args: argparse.Namespace) -> None:
    """Set the options not given: the recorded run's with --resume, else the defaults."""
    from dvmrl.experiment import DEFAULT_DATA, METHODS, Preset

    recorded = _recorded_run(Path(args.out)) if args.resume else None
    given_kind = args.target_kind
    data = args.data
    if data is None and recorded is not None:
        data = recorded.get("data")
    reject_csv_options(args, DEFAULT_DATA if data is None else data)
    if recorded is not None:
        if args.data is None:
            args.data = recorded.get("data")
        for key in ("formula_column", "target_column", "target_kind"):
            if getattr(args, key) is None:
                setattr(args, key, recorded.get(key))
        if args.budget is None and isinstance(recorded.get("preset"), dict):
            try:
                args.budget = Preset.from_dict(recorded["preset"])
            except (TypeError, ValueError):
                args.budget = None  # prepare() names the difference instead
        if args.seeds is None and isinstance(recorded.get("seeds"), list):
            args.seeds = recorded["seeds"]
        if args.methods is None and isinstance(recorded.get("methods"), list):
            args.methods = list(recorded["methods"])
        if args.agent is None:
            args.agent = recorded.get("agent_path")
        if args.agent_learn is None:
            args.agent_learn = bool(recorded.get("agent_learn"))
    # A CSV path is stored absolute, so that --resume finds it from any folder.
    args.data = data_reference(DEFAULT_DATA if args.data is None else args.data)
    args.formula_column = args.formula_column or "formula"
    args.target_column = args.target_column or "target"
    # A vendored set or a fetched file states its own target kind, which the
    # run records instead of the default for other CSV files. A resumed run
    # keeps the kind it recorded.
    kind = stated_or_given_kind(args.data, given_kind)
    if args.target_kind is None:
        args.target_kind = kind or "formation_energy"
    args.budget = "small" if args.budget is None else args.budget
    args.methods = list(METHODS) if args.methods is None else args.methods
    args.agent_learn = bool(args.agent_learn)


def run(args: argparse.Namespace) -> int:
    """Run the comparison and print where the report went."""
    from dvmrl.experiment import (
        PRESETS,
        BudgetError,
        Experiment,
        RunSpec,
        resolve_preset,
    )

    _fill_defaults(args)
    if "agent" not in args.methods:
        # As elsewhere in the CLI, an option without effect is rejected.
        for option, value in (
            ("--agent", args.agent),
            ("--agent-learn", args.agent_learn),
        ):
            if value:
                raise UsageError(
                    f"{option} applies only to the agent method; add agent to "
                    f"--methods or drop {option}"
                )
    preset = resolve_preset(args.budget)
    if isinstance(args.seeds, list):
        seeds = args.seeds  # the recorded seeds of a resumed run
    else:
        seeds = list(range(args.seeds if args.seeds is not None else preset.seeds))
    spec = RunSpec(
        data=args.data,
        formula_column=args.formula_column,
        target_column=args.target_column,
        target_kind=args.target_kind,
        preset=preset,
        seeds=seeds,
        methods=list(args.methods),
        agent_path=args.agent,
        agent_learn=bool(args.agent_learn),
    )
    try:
        spec.check()
    except ValueError as err:
        from_file = isinstance(args.budget, str) and args.budget not in PRESETS
        if from_file and isinstance(err, BudgetError):
            # A check of the budget's own fields: as for the file's other
            # checks, the message names the file. Errors in --methods or
            # --seeds are not the file's.
            raise ValueError(f"budget file {args.budget}: {err}") from err
        raise
    device = setup_compute(args)
    out_dir = Path(args.out)
    experiment = Experiment(
        spec,
        out_dir,
        resume=args.resume,
        device=device,
        command_line=["dvmrl", *sys.argv[1:]] if sys.argv else None,
        progress=_progress_factory(not args.no_progress),
    )
    # The folder check comes before the log file, so that a refused run
    # leaves another run's folder untouched.
    try:
        experiment.prepare()
    except FileExistsError as err:
        raise UsageError(str(err)) from err
    handler = _attach_log_file(out_dir)
    started = time.perf_counter()
    try:
        logger.info(
            "dvmrl run: data %s, budget %s (%d epochs per method and seed), seeds %s, "
            "methods %s, output %s",
            spec.data,
            preset.name,
            preset.epochs,
            seeds,
            spec.methods,
            out_dir,
        )
        # dvmrl.cli.main turns SIGTERM into KeyboardInterrupt, as for Ctrl-C.
        report = experiment.run()
        logger.info("finished in %.1f s", time.perf_counter() - started)
    except KeyboardInterrupt:
        logger.warning(
            "interrupted; every completed trial and step is saved in %s; continue "
            "with: dvmrl run --resume --out %s",
            out_dir,
            shlex.quote(str(out_dir)),
        )
        raise
    finally:
        logging.getLogger("dvmrl").removeHandler(handler)
        handler.close()
        experiment.close()
    print(f"report: {out_dir / 'report.md'} and {out_dir / 'report.json'}")
    from dvmrl.report import RELATIVE_RESOLUTION, counted_metrics

    compared = False
    for key, label, unit, _higher in counted_metrics(report):
        winner = report["winners"][key]
        compared = compared or winner["winner"] is not None
        if len(report["methods"]) == 1:
            # Nothing to compare: show the method's own numbers instead.
            print(f"{label} ({unit}): {_own_value(report, key)}")
            continue
        print(f"{label} ({unit}): {_describe(winner)}")
    if len(report["seeds"]) == 1 and compared:
        print(
            f"one seed: ties were judged by the {100 * RELATIVE_RESOLUTION:g} % "
            "resolution and the printed precision, not by the spread over seeds"
        )
    if compared:
        _warn_small_test_parts(report)
    return 0


def _warn_small_test_parts(report: dict) -> None:
    """Print a warning when few test compositions decide the winners above."""
    from dvmrl.report import SMALL_TEST_PART, sizes_of_test_parts

    sizes = [n for counts in sizes_of_test_parts(report).values() for n in counts]
    if sizes and min(sizes) < SMALL_TEST_PART:
        print(
            f"dvmrl run: warning: a test part has only {min(sizes)} compositions, so "
            "a few compositions decide these winners; use more data for a "
            "comparison that counts",
            file=sys.stderr,
        )


def _own_value(report: dict, key: str) -> str:
    """Return the one method's mean (and spread over seeds) of a metric."""
    from dvmrl.report import METHOD_LABELS

    (method,) = report["methods"]
    entry = report["summary"].get(key, {}).get(method) or {}
    mean, std, n = entry.get("mean"), entry.get("std"), entry.get("n", 0)
    name = METHOD_LABELS.get(method, method)
    if mean is None:
        return f"n/a ({name})"
    if n > 1 and std is not None:
        return f"{mean:.4g} ± {std:.2g} over {n} seeds ({name})"
    return f"{mean:.4g} ({name})"


def _describe(winner: dict) -> str:
    """Return one line on a comparison's winner, with the method names of report.md."""
    from dvmrl.report import winner_label

    label = winner_label(winner)
    if winner["winner"] is None or winner["tie"]:
        return label
    # One seed shows no spread, so its best method leads but does not win.
    return f"{label} {'wins' if winner.get('spread_assessed', True) else 'leads'}"
