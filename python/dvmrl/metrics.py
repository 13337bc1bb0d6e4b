"""Regression and stability metrics for energies in eV/atom.

Every function takes the true and predicted values as 1-D array-likes of
equal length (numpy arrays, lists, torch tensors, or [n, 1] columns) and
rejects NaN and infinite values.

The stability call marks a material stable when its value is at or below a
threshold: 0.0 eV/atom for formation energy (`FORMATION_ENERGY_THRESHOLD`)
and 0.025 eV/atom for energy above the convex hull
(`ENERGY_ABOVE_HULL_THRESHOLD`).
"""

from __future__ import annotations

import math

import numpy as np

FORMATION_ENERGY_THRESHOLD = 0.0
ENERGY_ABOVE_HULL_THRESHOLD = 0.025
DEFAULT_TOLERANCE = 0.05


def _as_vector(values, name: str) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must contain real numbers: {error}") from None
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise ValueError(
            f"{name} must be 1-D (or an [n, 1] column), got shape {array.shape}"
        )
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(
            f"{name} has {bad.size} NaN or infinite values (first at index "
            f"{bad[0]}: {array[bad[0]]}); drop or fix those rows"
        )
    return array


def _pair(y_true, y_pred, min_n: int = 1) -> tuple[np.ndarray, np.ndarray]:
    truth = _as_vector(y_true, "y_true")
    prediction = _as_vector(y_pred, "y_pred")
    if truth.shape != prediction.shape:
        raise ValueError(
            f"y_true and y_pred differ in length: {truth.size} and {prediction.size}"
        )
    if truth.size < min_n:
        raise ValueError(
            f"this metric needs at least {min_n} "
            f"{'value' if min_n == 1 else 'values'}, got {truth.size}"
        )
    return truth, prediction


def rmse(y_true, y_pred) -> float:
    """Compute the root-mean-square error (eV/atom)."""
    truth, prediction = _pair(y_true, y_pred)
    return float(np.sqrt(np.mean((truth - prediction) ** 2)))


def mae(y_true, y_pred) -> float:
    """Compute the mean absolute error (eV/atom)."""
    truth, prediction = _pair(y_true, y_pred)
    return float(np.mean(np.abs(truth - prediction)))


def max_error(y_true, y_pred) -> float:
    """Compute the largest absolute error (eV/atom)."""
    truth, prediction = _pair(y_true, y_pred)
    return float(np.max(np.abs(truth - prediction)))


def r2(y_true, y_pred) -> float:
    """Compute the coefficient of determination R^2 = 1 - SSE / SST.

    When y_true is constant (SST = 0, which includes a single value) R^2 is
    1.0 for a perfect prediction and 0.0 otherwise, as scikit-learn's
    `r2_score` returns with `force_finite=True`.
    """
    truth, prediction = _pair(y_true, y_pred)
    sse = float(np.sum((truth - prediction) ** 2))
    # The rounded mean of equal values can differ from them in the last bit,
    # which leaves SST at about 1e-33 instead of 0, so test the values.
    if np.all(truth == truth[0]):
        return 1.0 if sse == 0.0 else 0.0
    sst = float(np.sum((truth - truth.mean()) ** 2))
    return 1.0 - sse / sst


def accuracy_within(y_true, y_pred, tolerance: float = DEFAULT_TOLERANCE) -> float:
    """Compute the fraction of predictions within a tolerance of the truth.

    Args:
        y_true: true values (eV/atom).
        y_pred: predicted values (eV/atom).
        tolerance: largest accepted |y_true - y_pred| (eV/atom), inclusive.

    Returns:
        Fraction in [0, 1].
    """
    if not math.isfinite(tolerance) or tolerance < 0:
        raise ValueError(f"tolerance must be finite and >= 0 eV/atom, got {tolerance}")
    truth, prediction = _pair(y_true, y_pred)
    return float(np.mean(np.abs(truth - prediction) <= tolerance))


def stability_scores(
    y_true, y_pred, threshold: float = FORMATION_ENERGY_THRESHOLD
) -> dict[str, float | int]:
    """Score the stability call, stable meaning value <= threshold.

    Stable is the positive class. A ratio whose denominator is zero is 0.0:
    precision when nothing is predicted stable, recall when nothing is truly
    stable, and F1 when precision + recall is 0. This matches scikit-learn's
    `precision_recall_fscore_support(..., zero_division=0)`.

    Args:
        y_true: true values (eV/atom).
        y_pred: predicted values (eV/atom).
        threshold: stability threshold (eV/atom): 0.0 for formation energy,
            0.025 for energy above hull.

    Returns:
        {"precision", "recall", "f1"} as floats and the confusion counts
        {"tp", "fp", "fn", "tn"} as ints.
    """
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite (eV/atom), got {threshold}")
    truth, prediction = _pair(y_true, y_pred)
    stable_true = truth <= threshold
    stable_pred = prediction <= threshold
    tp = int(np.sum(stable_true & stable_pred))
    fp = int(np.sum(~stable_true & stable_pred))
    fn = int(np.sum(stable_true & ~stable_pred))
    tn = int(np.sum(~stable_true & ~stable_pred))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2.0 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


def gcv_score(y_true, y_pred) -> float:
    """Compute the "GCV score" 1 / (n * sum_i (y_i - yhat_i)^2 / (n - 1)).

    The DVMR-L method reports model quality under this name. It is the
    inverse of a scaled sum of squared errors, in (eV/atom)^-2, and equals
    (n - 1) / (n^2 * MSE). For a fixed error level it therefore shrinks like
    1/n, so it compares models only on sets of the same size. Higher is
    better. It is
    not Wahba's generalised cross-validation criterion, n * RSS / trace(I -
    H)^2 with H the hat matrix of a linear smoother. A
    perfect fit gives infinity (`math.inf`), which `regression_metrics`
    writes as None with the flag `gcv_score_infinite`.

    Args:
        y_true: true values (eV/atom), at least 2.
        y_pred: predicted values (eV/atom).

    Returns:
        The score in (eV/atom)^-2, or math.inf when every residual is zero.
    """
    truth, prediction = _pair(y_true, y_pred, min_n=2)
    n = truth.size
    sse = float(np.sum((truth - prediction) ** 2))
    if sse == 0.0:
        return math.inf
    return 1.0 / (n * sse / (n - 1))


def regression_metrics(
    y_true,
    y_pred,
    tolerance: float = DEFAULT_TOLERANCE,
    stability_threshold: float = FORMATION_ENERGY_THRESHOLD,
) -> dict[str, float | int | bool | None]:
    """Compute every reported metric as a JSON-safe dict.

    Args:
        y_true: true values (eV/atom), at least 2.
        y_pred: predicted values (eV/atom).
        tolerance: tolerance of `accuracy` (eV/atom).
        stability_threshold: threshold of the stability call (eV/atom).

    Returns:
        {"rmse", "mae", "r2", "max_error", "gcv_score", "accuracy",
        "precision", "recall", "f1", "n_predicted_stable", "n_stable", "n",
        "gcv_score_infinite"}. Errors are in eV/atom, gcv_score in
        (eV/atom)^-2 and None when infinite (perfect fit), in which case
        gcv_score_infinite is True. The two counts tell a precision or
        recall of 0 by convention (nothing predicted or truly stable) from a
        real 0.
    """
    truth, prediction = _pair(y_true, y_pred, min_n=2)
    gcv = gcv_score(truth, prediction)
    stability = stability_scores(truth, prediction, stability_threshold)
    return {
        "rmse": rmse(truth, prediction),
        "mae": mae(truth, prediction),
        "r2": r2(truth, prediction),
        "max_error": max_error(truth, prediction),
        "gcv_score": None if math.isinf(gcv) else gcv,
        "gcv_score_infinite": math.isinf(gcv),
        "accuracy": accuracy_within(truth, prediction, tolerance),
        "precision": stability["precision"],
        "recall": stability["recall"],
        "f1": stability["f1"],
        # Precision (recall) is 0 by convention when no composition is
        # predicted (truly) stable; the counts tell such a 0 from a real one.
        "n_predicted_stable": stability["tp"] + stability["fp"],
        "n_stable": stability["tp"] + stability["fn"],
        "n": int(truth.size),
    }


__all__ = [
    "DEFAULT_TOLERANCE",
    "ENERGY_ABOVE_HULL_THRESHOLD",
    "FORMATION_ENERGY_THRESHOLD",
    "accuracy_within",
    "gcv_score",
    "mae",
    "max_error",
    "r2",
    "regression_metrics",
    "rmse",
    "stability_scores",
]
