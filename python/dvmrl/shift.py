"""Shift detection: can a classifier tell the training pool from another set?

This is adversarial validation in its classic sense. A gradient-boosting
classifier (scikit-learn ``HistGradientBoostingClassifier``) learns to
separate training compositions (label 0) from a validation or test set
(label 1) in the composition features (``dvmrl.featurize.
composition_features``). Its cross-validated ROC AUC measures the shift:
0.5 means no detectable difference, 1.0 a perfect separation. The features
that drive it are ranked by permutation importance (drop in AUC on the
first held-out fold when a feature is shuffled).

Both sets are subsampled to at most ``max_samples`` rows each, so the cost
is bounded for any data size and the RL agent can call :func:`shift_auc`
every step on small subsamples (see ``ShiftResult.seconds``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

DEFAULT_MAX_SAMPLES = 1000
# Smallest max_samples (rows per set) that shift_auc accepts.
MIN_SAMPLES = 10
DEFAULT_FOLDS = 5


@dataclass
class ShiftResult:
    """Cross-validated separability of a reference and another set.

    Attributes:
        auc (float): mean ROC AUC over the folds (0.5: no detectable shift).
        auc_std (float): standard deviation of the fold AUCs.
        n_reference (int): reference rows used (after subsampling).
        n_other (int): other rows used (after subsampling).
        top_features (list): (feature name, AUC drop when shuffled),
            largest first; empty when importance was not computed.
        seconds (float): wall time of the call.
        constant_folds (int): folds in which the classifier gave every
            held-out row the same score. Such a fold scores an AUC of 0.5
            whatever the shift, so a nonzero count means the sets were too
            small or too alike in every feature to measure.
    """

    auc: float
    auc_std: float
    n_reference: int
    n_other: int
    top_features: list[tuple[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    constant_folds: int = 0

    def to_dict(self) -> dict:
        """Return the result as JSON-ready values."""
        values = asdict(self)
        values["top_features"] = [[name, float(v)] for name, v in self.top_features]
        return values


def _subsample(x: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    if len(x) <= limit:
        return x
    return x[np.sort(rng.choice(len(x), size=limit, replace=False))]


def shift_auc(
    reference: np.ndarray,
    other: np.ndarray,
    *,
    feature_names: list[str] | None = None,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    importance: bool = True,
    n_top: int = 5,
    n_threads: int = 1,
    max_iter: int = 100,
) -> ShiftResult:
    """Measure how well a classifier separates two sets of feature rows.

    Args:
        reference (ndarray): features [N, F] of the training pool.
        other (ndarray): features [M, F] of the set to compare.
        feature_names (list, optional): F names for ``top_features``;
            default "feature_<i>". The table functions below pass
            ``composition_feature_names()``, because their features are
            ``composition_features``.
        max_samples (int): rows drawn from each set at most (>= 10).
        folds (int): stratified cross-validation folds (>= 2).
        seed (int): seed of the subsamples, folds and classifier.
        importance (bool): rank the features by permutation importance on
            the first held-out fold (adds 2 F predictions of that fold).
        n_top (int): features reported.
        n_threads (int): OpenMP threads of the classifier; 1 avoids
            oversubscription when other work shares the cores.
        max_iter (int): boosting iterations of the classifier.

    Returns:
        ShiftResult: the AUC, its spread, the top features and the time.

    Raises:
        ValueError: for sets with fewer than ``folds`` rows, ``max_samples``
            below ``folds``, mismatched feature counts, or bad arguments.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.inspection import permutation_importance
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    start = time.perf_counter()
    reference = np.asarray(reference, dtype=np.float64)
    other = np.asarray(other, dtype=np.float64)
    if reference.ndim != 2 or other.ndim != 2 or reference.shape[1] != other.shape[1]:
        raise ValueError(
            f"reference and other must be 2-D with the same feature count, got "
            f"shapes {reference.shape} and {other.shape}"
        )
    if int(folds) != folds or folds < 2:
        raise ValueError(f"folds must be an integer >= 2, got {folds!r}")
    if int(n_top) != n_top or n_top < 1:
        # A negative count would slice off features from the end instead.
        raise ValueError(f"n_top must be an integer >= 1, got {n_top!r}")
    if int(max_samples) != max_samples or max_samples < MIN_SAMPLES:
        raise ValueError(
            f"max_samples must be an integer >= {MIN_SAMPLES}, got {max_samples!r}"
        )
    if max_samples < folds:
        raise ValueError(
            f"max_samples {max_samples} is below folds {folds}: each set is cut to "
            "max_samples rows and split into the folds; raise max_samples "
            "(--shift-samples of dvmrl validate) or lower folds"
        )
    for name, rows in (("reference", reference), ("other", other)):
        if len(rows) < folds:
            count = f"{len(rows)} row" + ("" if len(rows) == 1 else "s")
            raise ValueError(
                f"the {name} set has {count}, but the {folds}-fold cross-validation "
                f"of shift detection needs at least {folds}; lower folds "
                "(--shift-folds of dvmrl validate) or use a larger data set"
            )
    n_features = reference.shape[1]
    if feature_names is None:
        # Other statistics can give as many columns as the default ones, so
        # names are only taken from composition_feature_names on request.
        feature_names = [f"feature_{i}" for i in range(n_features)]
    elif len(feature_names) != n_features:
        raise ValueError(
            f"feature_names has {len(feature_names)} names for {n_features} features"
        )

    shared = _shared_rows(reference, other)
    if shared:
        # A row in both sets carries both labels, so the classifier learns
        # to call it the other set's and the AUC falls far below 0.5.
        logger.warning(
            "shift detection: %d of the %d rows of the other set also occur in "
            "the reference set, so the AUC can fall far below 0.5; compare "
            "disjoint sets",
            shared,
            len(other),
        )
    rng = np.random.default_rng(int(seed))
    reference = _subsample(reference, int(max_samples), rng)
    other = _subsample(other, int(max_samples), rng)
    x = np.concatenate([reference, other])
    y = np.concatenate([np.zeros(len(reference)), np.ones(len(other))])

    aucs: list[float] = []
    constant_folds = 0
    drops = np.zeros(n_features)
    splitter = StratifiedKFold(
        n_splits=int(folds), shuffle=True, random_state=int(seed)
    )
    with threadpool_limits(limits=int(n_threads), user_api="openmp"):
        for fold, (fit_rows, test_rows) in enumerate(splitter.split(x, y)):
            classifier = HistGradientBoostingClassifier(
                max_iter=int(max_iter),
                learning_rate=0.1,
                max_leaf_nodes=15,
                # scikit-learn's 20 rows per leaf leaves a fold of under 40
                # rows without a single split; small sets get smaller leaves.
                min_samples_leaf=min(20, max(2, len(fit_rows) // 10)),
                early_stopping=False,
                random_state=int(seed) + fold,
            )
            classifier.fit(x[fit_rows], y[fit_rows])
            score = classifier.predict_proba(x[test_rows])[:, 1]
            aucs.append(float(roc_auc_score(y[test_rows], score)))
            if np.ptp(score) == 0.0:
                constant_folds += 1
            if importance and fold == 0:
                result = permutation_importance(
                    classifier,
                    x[test_rows],
                    y[test_rows],
                    scoring="roc_auc",
                    n_repeats=2,
                    random_state=int(seed) + fold,
                )
                drops = result.importances_mean
    if constant_folds:
        logger.warning(
            "shift detection: the classifier gave one score to every held-out row "
            "in %d of %d folds (%d + %d rows), where the AUC of 0.5 means not "
            "measured rather than no shift; compare larger sets",
            constant_folds,
            int(folds),
            len(reference),
            len(other),
        )
    top: list[tuple[str, float]] = []
    if importance:
        order = np.argsort(-drops, kind="stable")[: int(n_top)]
        top = [(feature_names[i], float(drops[i])) for i in order]
    return ShiftResult(
        auc=float(np.mean(aucs)),
        auc_std=float(np.std(aucs)),
        n_reference=len(reference),
        n_other=len(other),
        top_features=top,
        seconds=time.perf_counter() - start,
        constant_folds=constant_folds,
    )


def _shared_rows(reference: np.ndarray, other: np.ndarray) -> int:
    """Return how many rows of ``other`` equal a row of ``reference``."""
    seen = {row.tobytes() for row in np.ascontiguousarray(reference)}
    return sum(row.tobytes() in seen for row in np.ascontiguousarray(other))


def _default_names(n_features: int) -> list[str]:
    from dvmrl.featurize import composition_feature_names

    names = composition_feature_names()
    if len(names) == n_features:
        return names
    return [f"feature_{i}" for i in range(n_features)]


def default_holdout_element(df: pd.DataFrame) -> str:
    """Return the element whose compositions make up closest to 10 % of the rows.

    The ``element`` split holds out every composition with that element, so
    this choice gives a test part of about the usual size.
    """
    counts: dict[str, int] = {}
    for system in df["chemsys"]:
        for symbol in str(system).split("-"):
            counts[symbol] = counts.get(symbol, 0) + 1
    if not counts:
        raise ValueError(
            "the data frame has no chemical systems to hold an element out"
        )
    target = 0.1 * len(df)
    return min(sorted(counts), key=lambda symbol: abs(counts[symbol] - target))


def split_shift_table(
    df: pd.DataFrame,
    features: np.ndarray,
    *,
    seed: int = 0,
    kinds: tuple[str, ...] | None = None,
    holdout_element: str | None = None,
    split_seed: int | None = None,
    **options,
) -> pd.DataFrame:
    """Measure the shift from training to validation pool and to test, per split kind.

    Args:
        df (DataFrame): a data set (columns formula, chemsys, n_elements,
            target).
        features (ndarray): ``composition_features`` of every row [N, F].
        seed (int): classifier seed, and split seed unless ``split_seed``
            is given.
        kinds (tuple, optional): split kinds; default every kind in
            ``dvmrl.splits.KINDS``.
        holdout_element (str, optional): element of the ``element`` split;
            default :func:`default_holdout_element`.
        split_seed (int, optional): seed of the train/validation divisions,
            such as a checkpoint's; default ``seed``.
        **options: keyword arguments of :func:`shift_auc`.

    Returns:
        DataFrame: one row per (split, comparison) with ``auc``, ``auc_std``,
        ``n_reference``, ``n_other``, ``top_features`` and ``seconds``.
        Kinds that cannot split these data are logged and left out.
    """
    from dvmrl.splits import KINDS, make_split

    options.setdefault("feature_names", _default_names(features.shape[1]))
    rows = []
    for kind in kinds or KINDS:
        holdout = None
        if kind == "element":
            holdout = holdout_element or default_holdout_element(df)
        try:
            split = make_split(
                df,
                kind,
                seed if split_seed is None else split_seed,
                holdout_element=holdout,
            )
        except ValueError as err:
            logger.warning("shift detection skips the %s split: %s", kind, err)
            continue
        for comparison, part in (("validation pool", split.val), ("test", split.test)):
            if min(len(split.train), len(part)) < options.get("folds", DEFAULT_FOLDS):
                logger.warning(
                    "shift detection skips train vs %s of the %s split: too few rows",
                    comparison,
                    kind,
                )
                continue
            result = shift_auc(
                features[split.train], features[part], seed=seed, **options
            )
            rows.append(
                {
                    "split": kind,
                    "comparison": f"train vs {comparison}",
                    **result.to_dict(),
                }
            )
    return pd.DataFrame(rows)


def strategy_shift_table(
    features: np.ndarray,
    train_indices: np.ndarray,
    selections: dict[str, np.ndarray],
    *,
    seed: int = 0,
    **options,
) -> pd.DataFrame:
    """Measure the shift from training to the validation set of each strategy.

    Args:
        features (ndarray): ``composition_features`` of every row [N, F].
        train_indices (ndarray): the training rows.
        selections (dict): strategy name to its chosen rows.
        seed (int): classifier seed.
        **options: keyword arguments of :func:`shift_auc`.

    Returns:
        DataFrame: one row per strategy with the columns of
        :func:`split_shift_table` (``strategy`` in place of ``split``).
    """
    options.setdefault("feature_names", _default_names(features.shape[1]))
    folds = options.get("folds", DEFAULT_FOLDS)
    rows = []
    for strategy, chosen in selections.items():
        if min(len(train_indices), len(chosen)) < folds:
            logger.warning(
                "shift detection skips train vs the validation set of %s: %d rows, "
                "fewer than the %d folds",
                strategy,
                len(chosen),
                folds,
            )
            continue
        result = shift_auc(
            features[train_indices], features[chosen], seed=seed, **options
        )
        rows.append(
            {
                "strategy": strategy,
                "comparison": "train vs validation set",
                **result.to_dict(),
            }
        )
    return pd.DataFrame(rows)


__all__ = [
    "DEFAULT_FOLDS",
    "DEFAULT_MAX_SAMPLES",
    "ShiftResult",
    "default_holdout_element",
    "shift_auc",
    "split_shift_table",
    "strategy_shift_table",
]
