"""The report of ``dvmrl run``: report.json, report.md and figures.

Everything is computed from the files the run leaves in its output folder
(``run.json``, ``state.json`` and the per-unit prediction files), so the
report of a resumed run equals that of an uninterrupted one, timings aside.

Summaries are the mean and the sample standard deviation (ddof=1) over
seeds. A method wins a metric when its mean is the best. Any other method
ties with it in four cases. Its mean differs from the best by less than
the larger of the two standard deviations, or by less than the resolution
(:data:`RELATIVE_RESOLUTION`, 0.5 % of the best mean's magnitude). Or the
two means print the same (4 decimals, 3 significant digits below 0.01).
Or, with two or more seeds, the best method is not ahead of it in every
seed that both finished. Every method of a seed trains on the same
training and validation pools, so the seeds pair the methods. With a single seed
there is no spread, so only the resolution and the printed precision
decide ties, and the report calls the best method a leader, not a winner.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from dvmrl._files import json_ready, write_text_atomic
from dvmrl.experiment import (
    BASE_MODEL,
    ONLINE_LEARNING_STARTS,
    ROBUST_EPSILON,
    ROBUST_R_MAX,
    ROBUST_TAU,
    unit_files,
)
from dvmrl.metrics import DEFAULT_TOLERANCE

logger = logging.getLogger(__name__)

REPORT_FORMAT = "dvmrl-report"

# (key, label, unit, True when higher is better)
METRICS: tuple[tuple[str, str, str, bool], ...] = (
    ("test_rmse", "test RMSE", "eV/atom", False),
    ("test_mae", "test MAE", "eV/atom", False),
    ("test_r2", "test R^2", "", True),
    ("test_gcv_score", "test GCV score", "(eV/atom)^-2", True),
    ("robustness_radius", "robustness radius", "fraction", True),
    ("vulnerability", "vulnerability", "eV/atom", False),
    ("chemsys_rmse", "chemsys hold-out RMSE", "eV/atom", False),
    ("chemsys_mae", "chemsys hold-out MAE", "eV/atom", False),
    ("val_rmse", "best validation RMSE", "eV/atom", False),
)
# R^2 and the GCV score are monotone functions of the MSE on one test set,
# so their winner is taken from test RMSE rather than judged again on their
# own scales, where the tie resolution would draw other lines.
FOLLOWS_TEST_RMSE = ("test_r2", "test_gcv_score")
# The score that every method selects on, not a held-out result (the agent
# also reweights training by validation errors), so it counts in no tally.
SELECTION_METRICS = ("val_rmse",)
# Differences below this fraction of the best mean's magnitude are ties,
# with or without a spread over seeds.
RELATIVE_RESOLUTION = 0.005
METHOD_LABELS = {
    "random": "random search",
    "bayesian": "Bayesian optimisation",
    "agent": "DQN agent",
}


# ---------------------------------------------------------------------------
# Per-unit rows and summaries


def unit_row(unit: dict[str, Any]) -> dict[str, Any]:
    """Flatten one (method, seed) unit of the run state into a report row."""
    test = unit.get("test", {})
    chemsys = unit.get("chemsys", {})
    robust = unit.get("robustness", {})
    # chosen is null when every trial of the search diverged.
    chosen = unit.get("chosen") or {}
    seconds = dict(unit.get("seconds", {}))
    return {
        "method": unit["method"],
        "seed": unit["seed"],
        "complete": "chemsys" in unit,
        "no_model": "chosen" in unit and unit["chosen"] is None,
        "test_rmse": test.get("rmse"),
        "test_mae": test.get("mae"),
        "test_r2": test.get("r2"),
        "test_max_error": test.get("max_error"),
        "test_gcv_score": test.get("gcv_score"),
        "test_accuracy": test.get("accuracy"),
        "test_f1": test.get("f1"),
        "test_n": test.get("n"),
        "robustness_radius": robust.get("robustness_radius"),
        "robustness_radius_l2": robust.get("robustness_radius_l2"),
        "vulnerability": robust.get("vulnerability"),
        "robust_n": robust.get("n_compositions"),
        # Compositions that no change within r_max moved by tau. The mean
        # radius counts them at r_max.
        "robust_capped": robust.get("n_not_reached"),
        "chemsys_rmse": chemsys.get("rmse"),
        "chemsys_mae": chemsys.get("mae"),
        "chemsys_n": chemsys.get("n"),
        "val_rmse": chosen.get("val_rmse"),
        "epochs": unit.get("epochs_used"),
        "seconds": seconds,
        "seconds_total": float(sum(seconds.values())) if seconds else None,
        "config": chosen.get("config"),
        "kept_at_epoch": kept_at_epoch(unit),
        "trials": len(unit.get("trials", [])),
        "steps": len(unit.get("steps", [])),
    }


def kept_at_epoch(unit: dict[str, Any]) -> int | None:
    """Return the epoch, counted over the unit's budget, of the state it kept.

    For a baseline this is the best epoch of the chosen trial. For the agent
    it is the training epochs of its kept state, which include the untrained
    model's epoch 0 that no step records. None when the unit kept no model.
    """
    chosen = unit.get("chosen")
    if not chosen:
        return None
    if unit.get("steps"):
        trained = chosen.get("epochs_trained")
        return None if trained is None else int(trained)
    trials = {t.get("index"): t for t in unit.get("trials", [])}
    trial = trials.get(chosen.get("trial"))
    curve = (trial or {}).get("extra", {}).get("val_curve")
    if not curve:
        return None
    finite = [(v, i) for i, v in enumerate(curve) if v is not None and math.isfinite(v)]
    if not finite:
        return None
    return int(trial["epochs_before"]) + min(finite)[1] + 1


def summarise(values: list[float | None]) -> dict[str, Any]:
    """Return the mean, sample standard deviation and count of the finite values."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return {"mean": None, "std": None, "n": 0}
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else None
    return {"mean": float(np.mean(finite)), "std": std, "n": len(finite)}


def find_winner(
    summaries: dict[str, dict[str, Any]],
    higher_is_better: bool,
    per_seed: dict[str, dict[int, float]] | None = None,
) -> dict[str, Any]:
    """Name the best method of one metric and the methods tied with it.

    With fewer than two methods that have a mean, there is no winner (None).
    A method ties with the best when the difference of their means is below
    ``RELATIVE_RESOLUTION`` times the best mean's magnitude or invisible at
    the report's printed precision. When every method has two or more
    seeds, a difference below the larger standard deviation is a tie too,
    and so is one where the best method is not ahead in every seed that
    both methods have in ``per_seed``.

    Args:
        summaries: per method, the output of ``summarise``.
        higher_is_better: direction of the metric.
        per_seed: per method, the value of each seed (optional).

    Returns:
        dict with ``winner`` (method name or None), ``tied_with`` (methods
        tied with the winner), ``tie`` (bool), ``spread_assessed`` (false
        when some method has one seed only, so only the resolution and the
        printed precision decided ties) and ``resolution`` (the relative
        resolution used).
    """
    ranked = [(m, s) for m, s in summaries.items() if s["mean"] is not None]
    # One method alone wins nothing: there is no comparison.
    if len(ranked) < 2:
        return {
            "winner": None,
            "tied_with": [],
            "tie": False,
            "spread_assessed": False,
            "resolution": RELATIVE_RESOLUTION,
        }
    sign = -1.0 if higher_is_better else 1.0
    ranked.sort(key=lambda item: sign * item[1]["mean"])
    best_method, best = ranked[0]
    spread_assessed = all(s["std"] is not None for _, s in ranked)
    tied = []
    for method, summary in ranked[1:]:
        threshold = RELATIVE_RESOLUTION * abs(best["mean"])
        if spread_assessed:
            threshold = max(threshold, best["std"], summary["std"])
        difference = abs(summary["mean"] - best["mean"])
        same_print = _format(summary["mean"]) == _format(best["mean"])
        behind_in_a_seed = spread_assessed and not _ahead_in_every_seed(
            per_seed, best_method, method, sign
        )
        close = difference < threshold or difference == 0.0 or same_print
        if close or behind_in_a_seed:
            tied.append(method)
    return {
        "winner": best_method,
        "tied_with": tied,
        "tie": bool(tied),
        "spread_assessed": spread_assessed,
        "resolution": RELATIVE_RESOLUTION,
    }


def _ahead_in_every_seed(
    per_seed: dict[str, dict[int, float]] | None, best: str, other: str, sign: float
) -> bool:
    """Return whether ``best`` beats ``other`` in each seed that both have.

    ``sign`` is -1 when higher values are better. Without values per seed,
    or without a seed in common, there is nothing to pair, so True.
    """
    if per_seed is None:
        return True
    mine, theirs = per_seed.get(best, {}), per_seed.get(other, {})
    return all(sign * mine[seed] < sign * theirs[seed] for seed in mine.keys() & theirs)


def ratios_against(
    rows: list[dict[str, Any]], methods: list[str], reference: str = "bayesian"
) -> dict[str, dict[str, Any]]:
    """Compare each method with ``reference`` in RMSE, GCV score and robustness radius.

    Ratios are of the means over seeds (method / reference); per-seed ratios
    are listed too. The radius change is method minus reference, in
    fraction units.
    """
    by_method = {
        m: [r for r in rows if r["method"] == m and r["complete"]] for m in methods
    }
    if reference not in by_method or not by_method[reference]:
        return {}
    ref_rows = {r["seed"]: r for r in by_method[reference]}
    ref = {
        k: summarise([r[k] for r in by_method[reference]])["mean"]
        for k in ("test_rmse", "test_gcv_score", "robustness_radius", "chemsys_rmse")
    }
    result: dict[str, dict[str, Any]] = {}
    for method in methods:
        if method == reference or not by_method[method]:
            continue
        mine = {k: summarise([r[k] for r in by_method[method]])["mean"] for k in ref}
        per_seed = []
        for row in by_method[method]:
            other = ref_rows.get(row["seed"])
            if other is None:
                continue
            per_seed.append(
                {
                    "seed": row["seed"],
                    "rmse_ratio": _ratio(row["test_rmse"], other["test_rmse"]),
                    "gcv_ratio": _ratio(row["test_gcv_score"], other["test_gcv_score"]),
                    "robustness_radius_change": _difference(
                        row["robustness_radius"], other["robustness_radius"]
                    ),
                }
            )
        result[method] = {
            "rmse_ratio": _ratio(mine["test_rmse"], ref["test_rmse"]),
            "gcv_ratio": _ratio(mine["test_gcv_score"], ref["test_gcv_score"]),
            "chemsys_rmse_ratio": _ratio(mine["chemsys_rmse"], ref["chemsys_rmse"]),
            "robustness_radius_change": _difference(
                mine["robustness_radius"], ref["robustness_radius"]
            ),
            "per_seed": per_seed,
        }
    return result


def _ratio(a, b) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return float(a) / float(b)


def _difference(a, b) -> float | None:
    if a is None or b is None:
        return None
    return float(a) - float(b)


# ---------------------------------------------------------------------------
# Curves


def search_curve(unit: dict[str, Any]) -> list[tuple[int, float]]:
    """Return the validation RMSE (eV/atom) of the model kept so far against epochs.

    Baseline trials contribute one point per epoch (from their per-epoch
    validation curve), and a baseline chooses the best of them, so its
    curve is the best so far. Agent steps contribute one point per step:
    the RMSE of the model that the agent keeps, which it picks on its own
    validation set, so its curve can rise. Runs recorded before steps
    stored that RMSE give the best so far of the current models.
    """
    points: list[tuple[int, float]] = []
    best = math.inf
    if unit.get("steps"):
        for step in unit["steps"]:
            kept_rmse = step.get("kept_val_rmse")
            value = step.get("val_rmse")
            if kept_rmse is not None:
                best = float(kept_rmse)
            elif value is not None:
                best = min(best, float(value))
            if math.isfinite(best):
                points.append((int(step["epochs_spent"]), best))
        return points
    for trial in unit.get("trials", []):
        start = int(trial["epochs_before"])
        curve = trial.get("extra", {}).get("val_curve") or [trial.get("val_rmse")]
        for offset, value in enumerate(curve, start=1):
            if value is not None:
                best = min(best, float(value))
            if math.isfinite(best):
                points.append((start + min(offset, int(trial["epochs"])), best))
    return points


# ---------------------------------------------------------------------------
# Provenance


def provenance(run: dict[str, Any]) -> dict[str, Any]:
    """Return versions, build facts, data checksums and the command line."""
    import importlib.metadata

    import dvmrl

    versions = {}
    for package in (
        "torch",
        "numpy",
        "scipy",
        "scikit-learn",
        "scikit-optimize",
        "pymatgen",
    ):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    info = run.get("data_info", {})
    return {
        "dvmrl_version": dvmrl.__version__,
        "versions": versions,
        "build_info": dvmrl.build_info(),
        "data": run.get("data"),
        "data_checksum": run.get("signature", {}).get("data_checksum"),
        "data_file_sha256": info.get("file_sha256") or info.get("sha256"),
        "data_csv_sha256": info.get("csv_sha256"),
        "data_rows": info.get("rows"),
        # The parity plot names its axes from these (dvmrl.plotting.axis_labels).
        "data_name": info.get("name"),
        "data_target_kind": info.get("target_kind"),
        # The stability call of precision, recall and F1 (eV/atom); None
        # scores at 0 eV/atom (dvmrl.experiment.score).
        "data_stability_threshold": info.get("stability_threshold"),
        "command_line": run.get("command_line"),
        "started": run.get("started"),
        "reported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ---------------------------------------------------------------------------
# The report


def build_report(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Compute report.json's data from a run folder."""
    out_dir = Path(out_dir)
    run = json.loads((out_dir / "run.json").read_text(encoding="utf-8"))
    state = json.loads((out_dir / "state.json").read_text(encoding="utf-8"))
    signature = run["signature"]
    methods = list(signature["methods"])
    seeds = list(signature["seeds"])

    rows = []
    for method in methods:
        for seed in seeds:
            unit = state["units"].get(f"{method}/seed{seed}")
            if unit is not None:
                rows.append(unit_row(unit))
    complete_rows = [r for r in rows if r["complete"]]

    summaries = {
        key: {
            m: summarise([r[key] for r in complete_rows if r["method"] == m])
            for m in methods
        }
        for key, *_ in METRICS
    }
    for key in ("epochs", "seconds_total"):
        summaries[key] = {
            m: summarise([r[key] for r in complete_rows if r["method"] == m])
            for m in methods
        }
    per_seed = {
        key: {
            m: {
                r["seed"]: float(r[key])
                for r in complete_rows
                if r["method"] == m and r[key] is not None and math.isfinite(r[key])
            }
            for m in methods
        }
        for key, *_ in METRICS
    }
    winners = {
        key: find_winner(summaries[key], higher, per_seed[key])
        for key, _label, _unit, higher in METRICS
    }
    for key in FOLLOWS_TEST_RMSE:
        winners[key] = {**winners["test_rmse"], "follows": "test_rmse"}
    for key in SELECTION_METRICS:
        winners[key]["selection_score"] = True
    preset = signature["preset"]
    test_targets = _test_targets(out_dir, state)

    return {
        "format": REPORT_FORMAT,
        "complete": len(complete_rows) == len(methods) * len(seeds),
        "methods": methods,
        "seeds": seeds,
        "budget": preset,
        "search_space": signature.get("space"),
        "agent": {
            "path": signature.get("agent_path"),
            "learn": signature.get("agent_learn"),
            "checksum": signature.get("agent_checksum"),
        },
        "results": rows,
        "summary": summaries,
        "ratios_vs_bayesian": ratios_against(rows, methods),
        "constant_test_rmse": _constant_test_rmse(test_targets),
        "all_stable_test_f1": _all_stable_test_f1(
            test_targets, run.get("data_info", {}).get("stability_threshold")
        ),
        "test_error_tail": {
            "fraction": TAIL_FRACTION,
            "share_of_squared_error": _tail_shares(out_dir, state),
        },
        "winners": winners,
        "curves": {
            f"{u['method']}/seed{u['seed']}": search_curve(u)
            for u in state["units"].values()
        },
        "provenance": provenance(run),
    }


def _constant_test_rmse(y_true: np.ndarray | None) -> float | None:
    """Return the test RMSE of the best constant prediction (eV/atom), or None.

    That is the standard deviation of the test targets ``y_true``, which
    every unit shares (the test part does not depend on the seed).
    """
    return None if y_true is None else float(np.std(y_true))


def _all_stable_test_f1(
    y_true: np.ndarray | None, threshold: float | None
) -> float | None:
    """Return the test F1 of calling every composition stable, or None.

    Its precision is the stable fraction p of the test part and its recall
    1, so F1 = 2p / (1 + p): the score a model must beat to show that its
    stability call carries information.
    """
    from dvmrl.metrics import FORMATION_ENERGY_THRESHOLD

    if y_true is None:
        return None
    cut = FORMATION_ENERGY_THRESHOLD if threshold is None else float(threshold)
    stable = float(np.mean(y_true <= cut))
    return 2.0 * stable / (1.0 + stable)


# Fraction of the test compositions, those with the largest absolute errors,
# whose share of the squared error the report gives.
TAIL_FRACTION = 0.05


def tail_share(y_true: np.ndarray, y_pred: np.ndarray, fraction: float) -> float | None:
    """Return the share of the squared error carried by the largest errors.

    The largest ceil(fraction * n) absolute errors of n predictions are
    counted. A share far above ``fraction`` means that the RMSE mostly
    measures those few compositions. None when there are no predictions or
    the squared error is 0 or not finite.
    """
    squared = np.square(np.asarray(y_pred, np.float64) - np.asarray(y_true, np.float64))
    total = float(squared.sum())
    if squared.size == 0 or not (math.isfinite(total) and total > 0):
        return None
    count = math.ceil(fraction * squared.size)
    return float(np.sort(squared)[-count:].sum() / total)


def _unit_predictions(out_dir: Path, state: dict[str, Any]):
    """Yield (unit, y_true, y_pred) of every unit whose test predictions are readable.

    Both arrays are float64, in eV/atom. Units without a predictions file
    (unfinished) or with a damaged one are skipped.
    """
    for unit in state["units"].values():
        path = unit_files(out_dir, unit["method"], unit["seed"]).predictions
        if not path.is_file():
            continue
        try:
            with np.load(path) as arrays:
                y_true = np.asarray(arrays["y_true"], dtype=np.float64)
                y_pred = np.asarray(arrays["y_pred"], dtype=np.float64)
        except (OSError, ValueError, KeyError):
            continue
        yield unit, y_true, y_pred


def _tail_shares(out_dir: Path, state: dict[str, Any]) -> dict[str, float]:
    """Return tail_share of each finished unit's test predictions, by "method/seedN"."""
    shares = {}
    for unit, y_true, y_pred in _unit_predictions(out_dir, state):
        share = tail_share(y_true, y_pred, TAIL_FRACTION)
        if share is not None:
            shares[f"{unit['method']}/seed{unit['seed']}"] = share
    return shares


def _test_targets(out_dir: Path, state: dict[str, Any]) -> np.ndarray | None:
    """Return the test targets (eV/atom) of the first unit that stored them."""
    for _, y_true, _ in _unit_predictions(out_dir, state):
        if y_true.size:
            return y_true
    return None


def write_report(out_dir: str | os.PathLike) -> dict[str, Any]:
    """Write report.json, report.md and the figures into ``out_dir``."""
    out_dir = Path(out_dir)
    report = build_report(out_dir)
    figures = write_figures(out_dir, report)
    report["figures"] = figures
    text = json.dumps(json_ready(report), indent=2, allow_nan=False) + "\n"
    write_text_atomic(out_dir / "report.json", text)
    write_text_atomic(out_dir / "report.md", render_markdown(report))
    logger.info("wrote %s and %s", out_dir / "report.json", out_dir / "report.md")
    return report


def _format(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if value != 0 and abs(value) < 0.01:
        return f"{value:.3e}"
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


def _signed(value, digits: int = 4) -> str:
    """Format a difference with its sign and fixed decimals, so a column lines up."""
    return "n/a" if value is None else f"{value:+.{digits}f}"


def _cell(summary: dict[str, Any], digits: int = 4) -> str:
    mean, std = summary["mean"], summary["std"]
    if mean is None:
        return "n/a"
    if std is None:
        return _format(mean, digits)
    if mean != 0 and abs(mean) < 0.01:
        # Scientific notation for small scores such as the GCV score.
        return f"{mean:.3e} ± {std:.1e}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def join_method_names(methods: list[str]) -> str:
    """Return the methods' labels joined as "a, b and c"."""
    names = [METHOD_LABELS.get(m, m) for m in methods]
    if len(names) < 2:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


def _title(methods: list[str]) -> str:
    """Return the report's title for the methods that ran."""
    baselines = [m for m in methods if m != "agent"]
    if "agent" in methods and baselines:
        return f"agent against {join_method_names(baselines)}"
    if len(methods) == 1:
        return METHOD_LABELS.get(methods[0], methods[0])
    return "comparison of " + join_method_names(methods)


def render_markdown(report: dict[str, Any]) -> str:
    """Render report.md from the report data."""
    lines = [f"# dvmrl run: {_title(report['methods'])}", ""]
    if not report["complete"]:
        lines += [
            "**Incomplete run:** some units have not finished; rerun with --resume.",
            "",
        ]
    lines += _budget_lines(report)
    lines += _results_lines(report)
    lines += _ratio_lines(report)
    lines += _verdict_lines(report)
    lines += _config_lines(report)
    lines += _notes_lines(report)
    return "\n".join(lines)


def _budget_lines(report: dict[str, Any]) -> list[str]:
    budget = report["budget"]
    seeds = report["seeds"]
    prov = report["provenance"]
    train_pool = (
        f"a random subsample of at most {budget['max_train']} compositions"
        if budget["max_train"]
        else "the whole training part"
    )
    val_pool = (
        f"a random subsample of at most {budget['max_val']} compositions"
        if budget["max_val"]
        else "the whole validation part"
    )
    agent = report.get("agent") or {}
    checksum = f", SHA-256 {agent['checksum'][:16]}..." if agent.get("checksum") else ""
    agent_text = (
        f"agent file `{agent['path']}`{checksum}"
        if agent.get("path")
        else f"the pretrained agent shipped with dvmrl{checksum}"
    ) + (
        ", exploring and learning online (its Q-network updates once an "
        f"episode has given it {_count(ONLINE_LEARNING_STARTS, 'transition')})"
        if agent.get("learn")
        else ", greedy and frozen"
    )
    methods = report["methods"]
    method_parts = []
    if any(m in methods for m in ("random", "bayesian")):
        method_parts.append(f"Baseline trials train {budget['trial_epochs']} epochs each.")
    if "bayesian" in methods:
        method_parts.append(
            "Bayesian optimisation starts with "
            f"{_count(budget['n_initial_points'], 'random trial')}."
        )
    if "agent" in methods:
        method_parts.append(
            f"The agent ({agent_text}) trains {budget['agent_slice']} epochs per step."
        )
    return [
        f"Data: `{prov['data']}` (checksum {prov['data_checksum']}). "
        f"dvmrl {prov['dvmrl_version']}, PyTorch {prov['versions'].get('torch')}, "
        f"scikit-optimize {prov['versions'].get('scikit-optimize')}.",
        "",
        f"Command: `{' '.join(prov['command_line'] or [])}`",
        "",
        *_machine_lines(prov),
        "## Budget",
        "",
        f"Preset `{budget['name']}`: {budget['epochs']} training epochs per method and "
        "seed (one epoch is one pass over the training pool, whatever the model "
        "size), "
        f"{len(seeds)} seed(s) ({', '.join(str(s) for s in seeds)}). "
        + " ".join(method_parts),
        "",
        f"Training pool: {train_pool}. Validation pool: {val_pool}. Every method sees "
        "the same pools. Chosen configurations are retrained for "
        f"{budget['retrain_epochs']} epochs on the chemsys split. Robustness is "
        f"measured on {_robust_count(report)} (box radius epsilon "
        f"{ROBUST_EPSILON:g} and cap r_max {ROBUST_R_MAX:g} in fraction units, "
        f"tau {ROBUST_TAU:g} eV/atom).{_capped_text(report)}",
        "",
        _base_model_text(
            shipped_agent="agent" in report["methods"] and not agent.get("path")
        )
        + " The budget and the base model are small, so the errors below compare "
        "the methods; they do not measure the accuracy that `dvmrl train` reaches "
        "with its default model and schedule.",
        "",
        *_seen_data_lines(report, prov["data"]),
        *_test_size_lines(report),
    ]


def _machine_lines(prov: dict[str, Any]) -> list[str]:
    """Describe the machine that wrote the report, and when the run ran."""
    info = prov.get("build_info") or {}
    if not info:
        return []
    threads = _count(int(info.get("num_threads", 0)), "thread")
    torch_threads = _count(int(info.get("torch_num_threads", 0)), "thread")
    return [
        f"Machine that wrote this report: {info.get('platform')}, dvmrl kernels "
        f"{info.get('cpu_isa')} on {threads}, PyTorch {info.get('torch_version')} "
        f"on {torch_threads}. Run started "
        f"{prov.get('started')}, report written {prov.get('reported')}. Bayesian "
        "optimisation and the agent choose from earlier scores, so on another "
        "kind of CPU, whose PyTorch kernels round differently, their columns can "
        "differ.",
        "",
    ]


def _capped_text(report: dict[str, Any]) -> str:
    """Return the sentence that counts the radii at the cap r_max, by method."""
    parts = []
    for method in report["methods"]:
        rows = [r for r in report["results"] if r["method"] == method]
        capped = [r.get("robust_capped") for r in rows]
        counted = [r.get("robust_n") for r in rows]
        if any(c is None for c in capped) or any(n is None for n in counted):
            continue
        label = METHOD_LABELS.get(method, method)
        parts.append(f"{label} {sum(capped)} of {sum(counted)}")
    if not parts:
        return ""
    return (
        " Each radius that the search found is an upper bound of the true one "
        "(a change of that size moved the prediction by tau). A composition "
        "that no change within r_max moved by tau counts as r_max, which cuts "
        "off larger radii, so a mean is no bound either way; such "
        f"compositions: {', '.join(parts)}."
    )


def _seen_data_lines(report: dict[str, Any], data: str | None) -> list[str]:
    """Return the caveat for data that the shipped agent was meta-trained on."""
    from dvmrl.experiment import shipped_agent_saw

    agent = report.get("agent") or {}
    seen = shipped_agent_saw(data, agent.get("path"))
    if "agent" not in report["methods"] or not seen:
        return []
    return [
        f"**Caveat:** the shipped agent was meta-trained on tasks drawn from "
        f"`{data}`, so this comparison is not on data unseen by the agent. "
        "`mp-formation-energy`, which meta-training never uses, or your own "
        "data gives a fair comparison.",
        "",
    ]


def _count(number: int, noun: str) -> str:
    """Return ``number`` and ``noun``, the noun in the plural unless number is 1."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _base_model_text(shipped_agent: bool) -> str:
    """Return the sentences that describe the model settings no method tunes.

    ``shipped_agent`` adds the model that the shipped agent was meta-trained on.
    """
    from dvmrl.env import DEFAULT_MODEL

    text = (
        "Every method tunes the same base model, which is not the default model "
        "of `dvmrl train`: gate and message MLPs "
        f"{BASE_MODEL['gate_hidden']} and {BASE_MODEL['msg_hidden']} wide, a "
        f"{BASE_MODEL['head_layers']} x {BASE_MODEL['head_hidden']} head and no "
        "fraction encoder. Every method trains it with a constant learning "
        "rate without warm-up, no weight average and the squared error, and "
        "keeps the state with the lowest validation RMSE. They score different "
        "states on different sets, though: random search and Bayesian "
        "optimisation score every epoch of a trial on the whole validation "
        "pool, while the agent scores the state at the end of each step on the "
        "validation set that its last validate action drew from that pool, and "
        "up-weights the training compositions near that set's largest errors."
    )
    if not shipped_agent:
        return text
    meta_model = DEFAULT_MODEL
    return text + (
        " The shipped agent was meta-trained with these training settings on a "
        f"smaller model (node state {meta_model['hidden']} wide, "
        f"{meta_model['layers']} layers, gate and message MLPs "
        f"{meta_model['gate_hidden']} and {meta_model['msg_hidden']} wide, a "
        f"{meta_model['head_layers']} x {meta_model['head_hidden']} head)."
    )


# Below this many test compositions (a rule of thumb), report.md and dvmrl run
# warn that a few compositions decide the ranking of the methods.
SMALL_TEST_PART = 100


def sizes_of_test_parts(report: dict[str, Any]) -> dict[str, list[int]]:
    """Return the distinct test part sizes of the units, by split ("random", "chemsys")."""
    sizes = {}
    for key, name in (("test_n", "random"), ("chemsys_n", "chemsys")):
        counts = sorted({r[key] for r in report["results"] if r.get(key)})
        if counts:
            sizes[name] = counts
    return sizes


def _test_size_lines(report: dict[str, Any]) -> list[str]:
    """State the sizes of the test parts, with a warning when they are small."""
    sizes = sizes_of_test_parts(report)
    if not sizes:
        return []
    text = "Test parts: " + ", ".join(
        f"{' or '.join(str(n) for n in counts)} compositions ({name} split)"
        for name, counts in sizes.items()
    ) + "."
    smallest = min(min(counts) for counts in sizes.values())
    if smallest < SMALL_TEST_PART:
        text += (
            f" With fewer than {SMALL_TEST_PART} test compositions, a few "
            "compositions decide the ranking below, so read it as a rough guide "
            "and use more data for a comparison that counts."
        )
    return [text, ""]


def _robust_count(report: dict[str, Any]) -> str:
    """State how many test compositions the robustness probes used.

    The count is the budget's robust_n capped at the size of the test part,
    as recorded by each unit, so a small test part shows its real size.
    """
    requested = report["budget"]["robust_n"]
    used = sorted({r["robust_n"] for r in report["results"] if r.get("robust_n")})
    if not used:
        complete = [r for r in report["results"] if r.get("complete")]
        if complete and all(r.get("robust_n") == 0 for r in complete):
            return (
                f"no test composition (the budget asks for {requested}; the test "
                "part has no composition of two or more elements)"
            )
        return f"at most {requested} fixed test compositions (none measured yet)"
    text = f"{' or '.join(str(n) for n in used)} fixed test compositions"
    if used != [requested]:
        text += (
            f" (the budget asks for {requested}; the test part has fewer distinct "
            "compositions of two or more elements)"
        )
    return text


def _stability_threshold(report: dict[str, Any]) -> float:
    """Return the threshold (eV/atom) of the run's stability call."""
    from dvmrl.metrics import FORMATION_ENERGY_THRESHOLD

    value = report["provenance"].get("data_stability_threshold")
    return FORMATION_ENERGY_THRESHOLD if value is None else float(value)


def _stability_reference(report: dict[str, Any]) -> str:
    """Say what a formation-energy stability call is measured against."""
    if report["provenance"].get("data_target_kind") == "formation_energy":
        return ", against the elements, not the convex hull"
    return ""


def _all_stable_text(report: dict[str, Any]) -> str:
    f1 = report.get("all_stable_test_f1")
    if f1 is None:
        return ""
    return f"; calling every test composition stable scores F1 = {f1:.3f}"


def _results_lines(report: dict[str, Any]) -> list[str]:
    methods = report["methods"]
    summary = report["summary"]
    lines = [
        "## Results",
        "",
        "Mean ± sample standard deviation over seeds"
        + (" (one seed: no spread)." if len(report["seeds"]) == 1 else ".")
        + " The results in report.json also give, for each method and seed, the "
        "largest test error (eV/atom), the test accuracy (fraction of "
        f"predictions within {DEFAULT_TOLERANCE:g} eV/atom of the target), the "
        "F1 score of the stability call (stable at or below "
        f"{_stability_threshold(report):g} eV/atom{_stability_reference(report)}"
        f"{_all_stable_text(report)}) and the robustness radius in the L2 norm.",
        "",
        *_reading_lines(report),
        "| metric | "
        + " | ".join(METHOD_LABELS.get(m, m) for m in methods)
        + " | winner |",
        "|" + " --- |" * (len(methods) + 2),
    ]
    retrain = report["budget"]["retrain_epochs"]
    for key, label, unit, higher in METRICS:
        name = f"{label} ({unit})" if unit else label
        if key.startswith("chemsys_"):
            # Fewer epochs than the search's models: the gap to the test
            # errors is not all due to the unseen chemical systems.
            name += f", retrained {retrain} epochs"
        direction = "higher is better" if higher else "lower is better"
        cells = " | ".join(_cell(summary[key][m]) for m in methods)
        winner = _winner_text(report["winners"][key])
        lines.append(f"| {name}, {direction} | {cells} | {winner} |")
    for key, label in (("epochs", "epochs used"), ("seconds_total", "wall seconds")):
        cells = " | ".join(_cell(summary[key][m], 1) for m in methods)
        lines.append(f"| {label} | {cells} | |")
    no_model = [
        f"{METHOD_LABELS.get(r['method'], r['method'])} seed {r['seed']}"
        for r in report["results"]
        if r.get("no_model")
    ]
    if no_model:
        lines += [
            "",
            f"No model, so no results (n/a) for {', '.join(no_model)}: every trial "
            "of the search diverged (non-finite validation RMSE). The means above "
            "leave these out.",
        ]
    extra_work = {"bayesian": "GP fits", "agent": "agent decisions"}
    uncounted = [extra_work[m] for m in methods if m in extra_work]
    uncounted += ["test scoring", "robustness searches", "the chemsys retraining"]
    lines += [
        "",
        "Wall seconds include the work that epochs do not count: "
        f"{', '.join(uncounted[:-1])} and {uncounted[-1]}.",
        "",
    ]
    return lines


def _notes_lines(report: dict[str, Any]) -> list[str]:
    lines = [
        "## Notes",
        "",
        "- The test part of the random split is the same for every method and seed and "
        "was never used for search, reward or selection.",
        "- GCV score: 1 / (n * sum_i (y_i - yhat_i)^2 / (n - 1)) in (eV/atom)^-2, the "
        "inverse of a scaled sum of squared errors (it equals (n - 1) / (n^2 MSE)), so "
        "higher is better. It is not Wahba's generalised cross-validation. On one test "
        "set the GCV ratio of two models is the inverse square of their RMSE ratio.",
        "- A difference is called a tie when it is smaller than the spread over "
        "seeds (the larger of the two standard deviations, only with two or more "
        f"seeds), smaller than {_percent(RELATIVE_RESOLUTION)} of the best mean's "
        "magnitude, or invisible at the printed precision, and, with two or more "
        "seeds, when the best method is not ahead in every seed (the methods of a "
        "seed share its training and validation pools).",
        "- Best validation RMSE is measured on the whole validation pool for every "
        "method."
        + (
            " The agent selects its checkpoint on its current validation set, "
            "which its strategy draws from that pool."
            if "agent" in report["methods"]
            else ""
        ),
        "",
        "## Figures",
        "",
    ]
    for name, path in report.get("figures", {}).items():
        lines.append(f"- {name}: `{path}`")
    lines.append("")
    return lines


def winner_label(winner: dict[str, Any]) -> str:
    """Return "n/a", "tie: " and the tied methods, or the winning method's label."""
    if winner["winner"] is None:
        return "n/a"
    if winner["tie"]:
        return "tie: " + join_method_names([winner["winner"], *winner["tied_with"]])
    return METHOD_LABELS.get(winner["winner"], winner["winner"])


def _winner_text(winner: dict[str, Any]) -> str:
    if winner.get("follows"):
        return "as test RMSE"
    if winner.get("selection_score"):
        return "not counted (selection score)"
    label = winner_label(winner)
    if winner["winner"] is None or winner["tie"] or winner["spread_assessed"]:
        return label
    resolution = _percent(_resolution(winner))
    return f"{label} (one seed: ties judged at {resolution} only)"


def _resolution(winner: dict[str, Any]) -> float:
    # Reports written before the resolution was recorded used no resolution.
    return float(winner.get("resolution", 0.0))


def _percent(fraction: float) -> str:
    return f"{100 * fraction:g} %"


def _ratio_lines(report: dict[str, Any]) -> list[str]:
    ratios = report["ratios_vs_bayesian"]
    if not ratios:
        return []
    lines = [
        "## Against Bayesian optimisation",
        "",
        "Ratios of the means over seeds (method / Bayesian optimisation); the radius "
        "change is the method's mean radius minus Bayesian optimisation's, in fraction "
        "units. An RMSE ratio below 1 and a GCV ratio above 1 favour the method.",
        "",
        "| method | test RMSE ratio | test GCV ratio | chemsys RMSE ratio "
        "| robustness radius change |",
        "| --- | --- | --- | --- | --- |",
    ]
    for method, values in ratios.items():
        lines.append(
            f"| {METHOD_LABELS.get(method, method)} "
            f"| {_format(values['rmse_ratio'], 3)} "
            f"| {_format(values['gcv_ratio'], 3)} "
            f"| {_format(values['chemsys_rmse_ratio'], 3)} | "
            f"{_signed(values['robustness_radius_change'])} |"
        )
    lines.append("")
    return lines


def _agent_outside_text(
    report: dict[str, Any], key: str, group: list[str], higher: bool
) -> str:
    """Say which methods of a tie the agent, outside it, loses to or ties with.

    Each method of the tie is compared with the agent alone, by the tie rule
    of :func:`find_winner`.
    """
    summary = report["summary"][key]
    if summary["agent"]["mean"] is None:
        return " The agent has no result for this metric."
    beaten_by, tied = [], []
    for method in group:
        pair = find_winner({method: summary[method], "agent": summary["agent"]}, higher)
        (tied if pair["tie"] or pair["winner"] == "agent" else beaten_by).append(method)
    if not tied:
        return f" The agent is outside the tie: {join_method_names(beaten_by)} beat it."
    return (
        f" The agent is outside the tie with the best mean: "
        f"{join_method_names(beaten_by)} beat"
        f"{'s' if len(beaten_by) == 1 else ''} it, and it ties with "
        f"{join_method_names(tied)}."
    )


def _reading_lines(report: dict[str, Any]) -> list[str]:
    """Say what the robustness metrics mean and what a useless model scores."""
    text = (
        "The robustness radius is the mean, over the probed test compositions, "
        "of the smallest box radius (fraction units) at which some allowed "
        f"composition change moves the prediction by tau = {ROBUST_TAU:g} eV/atom; "
        "the vulnerability is the mean largest prediction change (eV/atom) "
        f"within epsilon = {ROBUST_EPSILON:g}. A smoother model scores better on "
        "both whether or not it is more accurate (a constant prediction reaches "
        "the cap r_max), so read them together with the test RMSE."
    )
    constant = report.get("constant_test_rmse")
    if constant is not None:
        text += (
            " A constant prediction at the mean of the test targets would score "
            f"a test RMSE of {constant:.4f} eV/atom (their standard deviation)."
        )
    tail = report.get("test_error_tail") or {}
    shares = list((tail.get("share_of_squared_error") or {}).values())
    if shares:
        low, high = round(100 * min(shares)), round(100 * max(shares))
        span = f"{low} %" if low == high else f"{low} to {high} %"
        text += (
            f" The largest {100 * TAIL_FRACTION:g} % of the absolute test errors carry "
            f"{span} of the squared error of each chosen model"
        )
        # Normally distributed errors give about 28 %, so only a share above
        # one half shows that a few compositions set the RMSE.
        if min(shares) > 0.5:
            text += (
                ", so the test RMSE mostly measures those few compositions, while "
                "the MAE weighs every composition alike."
            )
        else:
            text += "."
    return [text, ""]


def counted_metrics(report: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """Return the METRICS entries that the verdict counts.

    Metrics whose winner follows test RMSE and the selection score are left
    out, as their winners decide nothing new.
    """
    return [
        metric
        for metric in METRICS
        if not report["winners"][metric[0]].get("follows")
        and not report["winners"][metric[0]].get("selection_score")
    ]


def _verdict_lines(report: dict[str, Any]) -> list[str]:
    lines = ["## Verdict", ""]
    methods = report["methods"]
    counts = {m: 0 for m in methods}
    ties = 0
    counted = counted_metrics(report)
    decided = 0
    for key, *_ in counted:
        winner = report["winners"][key]
        if winner["winner"] is None:
            continue
        decided += 1
        if winner["tie"]:
            ties += 1
        else:
            counts[winner["winner"]] += 1
    tally = ", ".join(f"{METHOD_LABELS.get(m, m)} {n}" for m, n in counts.items())
    undecided = len(counted) - decided
    missing = (
        f" {_count(undecided, 'metric')} of {len(counted)} had results from fewer "
        "than two methods, so nothing was compared there."
        if undecided
        else ""
    )
    # One seed shows no spread, so a lead there is not called a win.
    unassessed = any(
        not report["winners"][key]["spread_assessed"]
        for key, *_ in counted
        if report["winners"][key]["winner"] is not None
    )
    if len(report["seeds"]) == 1:
        headline = (
            "Metrics led, with one seed and so without a test against the spread "
            "over seeds"
        )
    elif unassessed:
        headline = (
            "Metrics won outright or, where a method finished one seed only, led"
        )
    else:
        headline = "Metrics won outright"
    lines += [
        f"{headline}: {tally}; ties: {ties} (of {decided}).{missing} "
        "Test R^2 and the GCV score rank the methods as test RMSE does on the "
        "same test set, and the best validation RMSE is the score the methods "
        "select on, so these three are not counted.",
        "",
    ]
    for key, label, _unit, _higher in counted:
        winner = report["winners"][key]
        if winner["winner"] is None:
            continue
        name = METHOD_LABELS.get(winner["winner"], winner["winner"])
        if winner["tie"]:
            group = [winner["winner"], *winner["tied_with"]]
            outside = ""
            if "agent" in methods and "agent" not in group:
                outside = _agent_outside_text(report, key, group, _higher)
            rule = f"{_percent(_resolution(winner))} of the best mean"
            paired = ""
            if winner["spread_assessed"]:
                rule = f"the spread over seeds or {rule}"
                paired = ", or the best one not ahead in every seed"
            lines.append(
                f"- {label}: a tie between {join_method_names(group)} (differences smaller "
                f"than {rule}, invisible at the printed precision{paired}). The best "
                f"mean is {name}'s."
                + outside
            )
            continue
        assessed = winner["spread_assessed"]
        baseline = winner["winner"] in ("random", "bayesian") and "agent" in methods
        suffix = ""
        if baseline and report["summary"][key]["agent"]["mean"] is None:
            suffix = " The agent has no result for this metric."
        elif baseline:
            verb = "beats" if assessed else "is ahead of"
            suffix = f" A baseline {verb} the agent here."
        if assessed:
            lines.append(f"- {label}: {name} wins.{suffix}")
            continue
        lines.append(
            f"- {label}: {name} leads (a method with one seed shows no spread, so "
            f"ties were judged only by the {_percent(_resolution(winner))} "
            f"resolution and the printed precision).{suffix}"
        )
    lines.append("")
    return lines


def _config_lines(report: dict[str, Any]) -> list[str]:
    lines = [
        "## Chosen configurations",
        "",
        "Each row is the configuration of the model that the method kept. "
        "\"Kept at epoch\" counts the epochs the method had used when that state "
        "was saved; no later epoch improved on it. The agent keeps its "
        "best-validation state, so its configuration is the one at that step, "
        "before any later moves in run.log.",
        "",
        "| method | seed | lr | batch size | weight decay | dropout | layers | hidden "
        "| kept at epoch | epochs used by the method | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in report["results"]:
        config = row["config"]
        if config is None:
            label = METHOD_LABELS.get(row["method"], row["method"])
            lines.append(
                f"| {label} | {row['seed']} |" + " n/a |" * 7
                + f" {row['epochs']} | {_format(row['seconds_total'], 1)} |"
            )
            continue
        kept_epoch = row.get("kept_at_epoch")
        lines.append(
            f"| {METHOD_LABELS.get(row['method'], row['method'])} | {row['seed']} | "
            f"{config.get('lr', float('nan')):.2e} | {config.get('batch_size', '')} | "
            f"{config.get('weight_decay', float('nan')):.1e} | "
            f"{config.get('dropout', float('nan')):.2f} | {config.get('layers', '')} | "
            f"{config.get('hidden', '')} | "
            f"{'n/a' if kept_epoch is None else kept_epoch} | "
            f"{row['epochs']} | {_format(row['seconds_total'], 1)} |"
        )
    lines.append("")
    return lines


# ---------------------------------------------------------------------------
# Figures


def write_figures(out_dir: Path, report: dict[str, Any]) -> dict[str, str]:
    """Draw the figures into ``out_dir/figures`` and return name -> relative path."""
    from dvmrl.plotting import axis_labels, new_figure, parity_plot, save_figure

    folder = out_dir / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    methods = report["methods"]
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    written: dict[str, str] = {}

    # Validation RMSE of the model that each method keeps so far, against
    # epochs: colour by method, line style by seed.
    figure, axes = new_figure((6, 4))
    styles = ("-", "--", ":", "-.")
    seed_style = {
        seed: styles[i % len(styles)] for i, seed in enumerate(report["seeds"])
    }
    for key, points in report["curves"].items():
        method, seed_text = key.split("/")
        seed = int(seed_text.removeprefix("seed"))
        if not points or method not in colours:
            continue
        x, y = zip(*points, strict=True)
        axes.step(
            x,
            y,
            where="post",
            color=colours[method],
            linestyle=seed_style.get(seed, "-"),
            alpha=0.8,
        )
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=colours[m], label=METHOD_LABELS.get(m, m))
        for m in report["methods"]
        if m in colours
    ]
    if len(seed_style) > 1:
        handles += [
            Line2D([], [], color="grey", linestyle=style, label=f"seed {seed}")
            for seed, style in seed_style.items()
        ]
    if handles:
        axes.legend(handles=handles, fontsize="small")
    axes.set_xlabel("training epochs spent")
    axes.set_ylabel("validation RMSE of the model kept so far (eV/atom)")
    axes.set_title("Search progress")
    figure.tight_layout()
    save_figure(figure, folder / "search_progress.png")
    written["validation RMSE of the model kept so far against epochs"] = (
        "figures/search_progress.png"
    )

    # Test metrics per method.
    retrain = report["budget"]["retrain_epochs"]
    panels = (
        ("test_rmse", "test RMSE"),
        ("test_mae", "test MAE"),
        ("chemsys_rmse", f"chemsys RMSE\n(retrained {retrain} epochs)"),
        ("chemsys_mae", f"chemsys MAE\n(retrained {retrain} epochs)"),
    )
    figure, axes = new_figure((3 * len(panels), 3.5), ncols=len(panels))
    for ax, (key, label) in zip(axes, panels, strict=True):
        summaries = [report["summary"][key][m] for m in methods]
        # A method without a value gets no bar and an "n/a" mark, never a
        # bar of height 0; one seed gives no error bar.
        with_mean = [
            i for i, summary in enumerate(summaries) if summary["mean"] is not None
        ]
        errors = [summaries[i]["std"] for i in with_mean]
        ax.bar(
            with_mean,
            [summaries[i]["mean"] for i in with_mean],
            yerr=errors if all(e is not None for e in errors) and errors else None,
            capsize=4,
            color=[colours[methods[i]] for i in with_mean],
        )
        if not with_mean:
            ax.set_ylim(0.0, 1.0)
            ax.set_yticks([])
        for i, summary in enumerate(summaries):
            if summary["mean"] is None:
                ax.text(i, 0.0, "n/a", ha="center", va="bottom")
        ax.set_xticks(
            range(len(methods)),
            [METHOD_LABELS.get(m, m) for m in methods],
            rotation=30,
            ha="right",
        )
        ax.set_xlim(-0.6, len(methods) - 0.4)
        ax.set_ylabel(f"{label.split(chr(10))[0]} (eV/atom)")
        ax.set_title(label)
    if len(report["seeds"]) > 1:
        figure.suptitle(
            f"Means over {len(report['seeds'])} seeds; error bars: sample "
            "standard deviation",
            fontsize="medium",
        )
    figure.tight_layout()
    save_figure(figure, folder / "test_metrics.png")
    written["test metrics per method"] = "figures/test_metrics.png"

    # Robustness radii per composition, pooled over seeds.
    state = json.loads((out_dir / "state.json").read_text(encoding="utf-8"))
    radii = {m: [] for m in methods}
    for unit in state["units"].values():
        table = unit.get("robustness", {}).get("per_composition", {})
        values = table.get("radius") or table.get("robustness_radius") or []
        if unit["method"] in radii:
            radii[unit["method"]].extend(v for v in values if v is not None)
    figure, axes = new_figure((7.5, 4))
    data = [radii[m] if radii[m] else [np.nan] for m in methods]
    boxes = axes.boxplot(data, showmeans=True)
    # Radii at the cap are compositions that no change within r_max moved.
    cap = axes.axhline(ROBUST_R_MAX, color="0.5", linestyle="--", linewidth=1)
    at_cap = [sum(v >= ROBUST_R_MAX for v in radii[m]) for m in methods]
    axes.set_xticks(
        range(1, len(methods) + 1),
        [
            f"{METHOD_LABELS.get(m, m)}\n{n} of {len(radii[m])} at the cap"
            for m, n in zip(methods, at_cap, strict=True)
        ],
    )
    axes.legend(
        [boxes["medians"][0], boxes["means"][0], cap],
        ["median", "mean", f"cap r_max = {ROBUST_R_MAX:g}"],
        # Outside the axes, so that it never covers a box.
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        frameon=False,
    )
    axes.set_ylabel("robustness radius (fraction)")
    seeds = len(report["seeds"])
    pooled = f", {seeds} seeds pooled" if seeds > 1 else ""
    axes.set_title(f"Robustness radii (tau {ROBUST_TAU:g} eV/atom{pooled})")
    figure.tight_layout()
    save_figure(figure, folder / "robustness_radii.png")
    written["robustness radii"] = "figures/robustness_radii.png"

    # Parity plot of the model with the lowest validation RMSE: choosing it
    # by its test RMSE would select on the test part.
    complete = [
        r
        for r in report["results"]
        if r["complete"]
        and r["test_rmse"] is not None
        and r.get("val_rmse") is not None
    ]
    if complete:
        best = min(complete, key=lambda r: r["val_rmse"])
        path = unit_files(out_dir, best["method"], best["seed"]).predictions
        if path.is_file():
            with np.load(path) as arrays:
                y_true, y_pred = arrays["y_true"], arrays["y_pred"]
                n_elements = arrays["n_elements"]
            parity_plot(
                folder / "parity_best.png",
                y_true,
                y_pred,
                n_elements,
                title=(
                    f"{METHOD_LABELS.get(best['method'], best['method'])}, seed "
                    f"{best['seed']}: lowest validation RMSE"
                ),
                metrics={
                    "rmse": best["test_rmse"],
                    "mae": best["test_mae"],
                    "r2": best["test_r2"],
                },
                **axis_labels(
                    {
                        "name": report["provenance"]["data_name"],
                        "target_kind": report["provenance"]["data_target_kind"],
                    }
                ),
            )
            written["parity plot of the model with the lowest validation RMSE"] = (
                "figures/parity_best.png"
            )
    return written
