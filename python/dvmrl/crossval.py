"""k-fold and grouped (chemical-system) cross-validation of the composition MPNN.

Each fold trains a fresh model through :class:`dvmrl.training.Trainer` on the
other folds, with early stopping on a validation part carved out of those
folds, and scores it on the held-out fold with
:func:`dvmrl.metrics.regression_metrics`. The estimate is the mean over the
folds with the sample standard deviation and the standard error as spread.

Grouped folds keep every chemical system (the sorted element set, the
``chemsys`` column) inside one fold, and the validation part of each fold's
training data contains whole chemical systems too, so the estimate measures
extrapolation to unseen systems.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dvmrl._files import json_ready
from dvmrl.splits import repeated_compositions

logger = logging.getLogger(__name__)

KINDS = ("kfold", "chemsys")


def kfold_assignment(n_rows: int, n_folds: int, seed: int) -> np.ndarray:
    """Assign each of ``n_rows`` rows to one of ``n_folds`` folds at random.

    Fold sizes differ by at most one row.

    Returns:
        np.ndarray: int64 fold id of each row [n_rows].

    Raises:
        ValueError: if ``n_folds`` is below 2 or above ``n_rows``.
    """
    _check_folds(n_folds, n_rows, "rows")
    n_folds = int(n_folds)
    order = np.random.default_rng(seed).permutation(n_rows)
    folds = np.empty(n_rows, dtype=np.int64)
    folds[order] = np.arange(n_rows) % n_folds
    return folds


def group_kfold_assignment(
    groups: Sequence[str] | np.ndarray, n_folds: int, seed: int
) -> np.ndarray:
    """Assign whole groups (chemical systems) to ``n_folds`` folds.

    Groups are shuffled with ``seed`` and each goes, largest first, to the
    fold with the fewest rows so far, so fold sizes stay close even when the
    groups differ in size.

    Returns:
        np.ndarray: int64 fold id of each row [len(groups)].

    Raises:
        ValueError: if ``n_folds`` is below 2 or above the number of groups.
    """
    labels = np.asarray(groups)
    unique, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    _check_folds(n_folds, len(unique), "groups")
    n_folds = int(n_folds)
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(unique))
    # A stable sort by size keeps the random order among groups of equal size.
    by_size = shuffled[np.argsort(-counts[shuffled], kind="stable")]
    fold_of_group = np.empty(len(unique), dtype=np.int64)
    fold_rows = np.zeros(n_folds, dtype=np.int64)
    for group in by_size:
        fold = int(np.argmin(fold_rows))
        fold_of_group[group] = fold
        fold_rows[fold] += counts[group]
    return fold_of_group[inverse]


def _check_folds(n_folds: int, n_units: int, unit: str) -> None:
    if int(n_folds) != n_folds or n_folds < 2:
        raise ValueError(f"n_folds must be an integer >= 2, got {n_folds!r}")
    if n_folds > n_units:
        raise ValueError(
            f"n_folds={n_folds} exceeds the {n_units} {unit} available; "
            "pass fewer folds or more data"
        )


def _validation_rows(
    train_rows: np.ndarray,
    groups: np.ndarray | None,
    fraction: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Split a fold's training rows into (fit rows, validation rows).

    Both parts keep at least one row, or one group (a chemical system, or
    the rows of one repeated composition) when ``groups`` is given.
    """
    if groups is None:
        if len(train_rows) < 2:
            raise ValueError(
                f"a fold's training part has {len(train_rows)} row, too few for a "
                "fit and a validation part; pass fewer folds or more data"
            )
        shuffled = rng.permutation(train_rows)
        n_val = min(max(1, int(round(fraction * len(train_rows)))), len(train_rows) - 1)
        return np.sort(shuffled[n_val:]), np.sort(shuffled[:n_val])
    fold_groups = groups[train_rows]
    unique = np.unique(fold_groups)
    if len(unique) < 2:
        raise ValueError(
            f"a fold's training part has {len(unique)} group (chemical system or "
            "repeated composition), too few for a fit and a validation part of "
            "whole groups; pass fewer folds or data with more groups"
        )
    n_val_groups = min(max(1, int(round(fraction * len(unique)))), len(unique) - 1)
    val_groups = rng.choice(unique, size=n_val_groups, replace=False)
    is_val = np.isin(fold_groups, val_groups)
    return train_rows[~is_val], train_rows[is_val]


def summarise_folds(
    fold_metrics: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Compute the mean, sample standard deviation and standard error per metric.

    Only finite numbers enter a metric's summary, so a fold whose GCV score
    is infinite (a perfect fit, stored as ``None``) is left out of that
    metric only. An undefined precision, recall or F1 (no predicted or no
    true stable composition) is 0 in the fold's metrics and enters the mean
    as 0. A metric with a single finite value gets a spread of NaN.

    Returns:
        tuple: dicts ``mean``, ``std`` and ``sem`` keyed by metric name.
    """
    names: list[str] = []
    for metrics in fold_metrics:
        for name, value in metrics.items():
            if (
                name not in names
                and isinstance(value, (int, float))
                and not isinstance(value, bool)
            ):
                names.append(name)
    mean, std, sem = {}, {}, {}
    for name in names:
        values = np.array(
            [
                float(m[name])
                for m in fold_metrics
                if isinstance(m.get(name), (int, float))
                and not isinstance(m.get(name), bool)
                and math.isfinite(float(m[name]))
            ]
        )
        if len(values) == 0:
            continue
        mean[name] = float(values.mean())
        if len(values) > 1:
            std[name] = float(values.std(ddof=1))
            sem[name] = std[name] / math.sqrt(len(values))
        else:
            std[name] = math.nan
            sem[name] = math.nan
    return mean, std, sem


@dataclass
class CrossValResult:
    """Per-fold metrics of a cross-validation and their summary.

    Attributes:
        kind: ``"kfold"`` (random rows) or ``"chemsys"`` (whole chemical
            systems per fold).
        n_folds: number of folds.
        seed: seed of the fold assignment and of the training runs.
        fold_metrics: test metrics of each fold, in eV/atom where they
            carry a unit (the :func:`dvmrl.metrics.regression_metrics`
            keys plus ``n_train``, ``n_val``, ``n_test``, ``epochs`` and
            ``seconds``).
        mean, std, sem: mean, sample standard deviation (ddof=1) and
            standard error of each metric over the folds.
        assignment: int64 fold id of each row of the frame [N].
    """

    kind: str
    n_folds: int
    seed: int
    assignment: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    fold_metrics: list[dict[str, Any]] = field(default_factory=list)
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    sem: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict; NaN and infinite numbers become ``None``."""
        return json_ready(
            {
                "kind": self.kind,
                "n_folds": self.n_folds,
                "seed": self.seed,
                "folds": self.fold_metrics,
                "mean": self.mean,
                "std": self.std,
                "sem": self.sem,
            }
        )

    def format_table(self, names: Sequence[str] = ("rmse", "mae", "r2")) -> str:
        """Format ``metric  mean +- std`` lines for the named metrics."""
        lines = [f"{self.kind} cross-validation, {self.n_folds} folds"]
        for name in names:
            if name in self.mean:
                lines.append(
                    f"  {name:<10} {self.mean[name]:.4f} +- {self.std[name]:.4f}"
                )
        return "\n".join(lines)


def cross_validate(
    df,
    *,
    kind: str = "kfold",
    n_folds: int = 5,
    seed: int = 0,
    model_config=None,
    train_config=None,
    val_fraction: float = 0.1,
    device: str = "cpu",
    metric_options: Mapping[str, Any] | None = None,
    fold_callback: Callable[[int, dict[str, Any]], None] | None = None,
) -> CrossValResult:
    """Estimate the test error of a model configuration by cross-validation.

    Args:
        df (pandas.DataFrame): compositions with the columns ``formula``,
            ``chemsys``, ``n_elements`` and ``target`` (eV/atom), as
            :func:`dvmrl.datasets.load` returns them.
        kind (str): ``"kfold"`` for random folds, ``"chemsys"`` for folds of
            whole chemical systems.
        n_folds (int): number of folds, at least 2.
        seed (int): seed of the fold assignment, the validation parts and
            the training runs (fold f trains with ``seed + f``).
        model_config (ModelConfig, optional): default: ``ModelConfig()``.
        train_config (TrainConfig, optional): default: ``TrainConfig()``;
            its ``seed`` is replaced per fold.
        val_fraction (float): share of each fold's training rows (or
            chemical systems, for ``"chemsys"``) used for early stopping.
        device (str or torch.device): where to train.
        metric_options (dict, optional): keyword arguments for
            :func:`dvmrl.metrics.regression_metrics`, such as the stability
            threshold of the data set.
        fold_callback (callable, optional): called as ``(fold, metrics)``
            after each fold.

    Returns:
        CrossValResult: per-fold test metrics with their mean and spread.

    Raises:
        ValueError: for an unknown ``kind``, a bad fold count or fraction, a
            frame without the required columns, or ``metric_options`` keys
            that ``regression_metrics`` does not take.
    """
    if kind not in KINDS:
        raise ValueError(
            f"unknown cross-validation kind {kind!r}; expected one of {KINDS}"
        )
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction!r}")
    required = ["formula", "target"] + (["chemsys"] if kind == "chemsys" else [])
    missing = [column for column in required if column not in df.columns]
    if missing:
        raise ValueError(
            f"cross-validation needs the columns {required}; missing {missing}"
        )

    import dataclasses
    import inspect

    from dvmrl.metrics import regression_metrics
    from dvmrl.model import ModelConfig
    from dvmrl.training import TrainConfig, Trainer

    # Checked before the first fold trains, not when it is scored.
    accepted = set(inspect.signature(regression_metrics).parameters) - {
        "y_true",
        "y_pred",
    }
    unknown = sorted(set(metric_options or {}) - accepted)
    if unknown:
        raise ValueError(
            f"metric_options has unknown keys {unknown}; regression_metrics takes "
            f"{sorted(accepted)}"
        )

    model_config = model_config if model_config is not None else ModelConfig()
    train_config = train_config if train_config is not None else TrainConfig()
    targets = df["target"].to_numpy(dtype=np.float64)
    batch = _featurize_frame(df)
    groups = df["chemsys"].astype(str).to_numpy() if kind == "chemsys" else None
    if groups is None:
        # Data that repeat a composition keep its rows in one fold, as the
        # random split keeps them in one part.
        groups = repeated_compositions(df)
    if groups is None:
        folds = kfold_assignment(len(df), n_folds, seed)
    else:
        folds = group_kfold_assignment(groups, n_folds, seed)
    n_folds = int(n_folds)
    fold_sizes = np.bincount(folds, minlength=n_folds)
    if fold_sizes.min() < 2:
        # Checked before any training, so that no finished fold is lost.
        smallest = int(np.argmin(fold_sizes))
        raise ValueError(
            f"fold {smallest} of n_folds={n_folds} would test on only "
            f"{int(fold_sizes[smallest])} of the {len(df)} rows, but its metrics need at "
            "least 2 test rows; pass fewer folds or more data"
        )

    result = CrossValResult(kind=kind, n_folds=n_folds, seed=seed, assignment=folds)
    rows = np.arange(len(df))
    for fold in range(n_folds):
        started = time.perf_counter()
        test_rows = rows[folds == fold]
        rng = np.random.default_rng([seed, fold])
        fit_rows, val_rows = _validation_rows(
            rows[folds != fold], groups, val_fraction, rng
        )
        config = dataclasses.replace(train_config, seed=int(seed) + fold)
        trainer = Trainer(
            model_config,
            config,
            _take(batch, fit_rows),
            targets[fit_rows],
            _take(batch, val_rows),
            targets[val_rows],
            device=device,
        )
        trainer.fit()
        predictions = trainer.predict(_take(batch, test_rows))
        metrics = dict(
            regression_metrics(
                targets[test_rows], predictions, **dict(metric_options or {})
            )
        )
        metrics.update(
            n_train=int(len(fit_rows)),
            n_val=int(len(val_rows)),
            n_test=int(len(test_rows)),
            epochs=int(trainer.epochs_done),
            seconds=time.perf_counter() - started,
        )
        logger.info(
            "%s fold %d/%d: test RMSE %.4f, MAE %.4f eV/atom after %d epochs",
            kind,
            fold + 1,
            n_folds,
            metrics.get("rmse", math.nan),
            metrics.get("mae", math.nan),
            metrics["epochs"],
        )
        result.fold_metrics.append(metrics)
        if fold_callback is not None:
            fold_callback(fold, metrics)

    result.mean, result.std, result.sem = summarise_folds(result.fold_metrics)
    return result


def _featurize_frame(df):
    """Parse the ``formula`` column and build one padded batch of all rows."""
    from dvmrl.compositions import parse
    from dvmrl.featurize import featurize

    return featurize([parse(formula) for formula in df["formula"]])


def _take(batch, rows: np.ndarray):
    """Select rows of a CompositionBatch."""
    return batch[rows]
