"""Dynamic validation sets: strategies that pick validation compositions.

A run sets aside one fixed validation pool, disjoint from the training and
the test rows (``dvmrl.splits.Split.val``). Each strategy chooses ``size``
compositions from that pool, reproducibly for a given seed:

- ``random``: a uniform draw.
- ``gp-uncertainty``: a Gaussian process (scikit-learn) fitted on at most
  ``gp_max_train`` (default 2000) training compositions, in the composition
  features (``dvmrl.featurize.composition_features`` or a feature function
  passed in) or in an embedding passed in, picks the pool compositions with
  the highest predictive standard deviation.
- ``ensemble-variance``: the compositions on which MC-dropout samples or a
  small ensemble disagree most (largest variance of the predictions).
- ``adversarial``: the pool compositions nearest, in the same standardised
  composition features, to adversarial examples of the current model
  (perturbations of training compositions found by
  :func:`dvmrl.adversarial.adversarial_search`), most vulnerable first.

The test rows are never candidates: every call takes the test indices and
raises if the pool meets them. No strategy changes the training data.
All indices are positions in one data set (rows of ``batch``).
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch

from dvmrl.layout import is_integral

logger = logging.getLogger(__name__)

STRATEGIES = ("random", "gp-uncertainty", "ensemble-variance", "adversarial")
# Largest training subsample the Gaussian process is fitted on (O(n^3) cost).
GP_MAX_TRAIN = 2000
# Subsample on which the GP kernel's hyperparameters are optimised before the
# fit with fixed hyperparameters on the larger subsample.
GP_TUNE_SAMPLES = 300
# Training compositions perturbed by the adversarial strategy, at most.
ADVERSARIAL_ANCHORS = 512


def _index_array(name: str, values) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(
            f"{name} must be a 1-D array of row indices, got shape {array.shape}"
        )
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(
            f"{name} must hold integer row indices, got dtype {array.dtype}"
        )
    # NumPy reads -1 as the last row, which would slip a test row past the
    # checks below under another number.
    if array.size and array.min() < 0:
        raise ValueError(
            f"{name} contains negative row indices, such as "
            f"{array[array < 0][:5].tolist()}; pass 0-based positions of rows"
        )
    return array.astype(np.int64)


def check_pool(
    pool_indices, test_indices, train_indices=None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Check that the validation pool contains no test or training row.

    Returns:
        (pool, train): the pool as unique int64 indices in their given order,
        and the training indices (or None).

    Raises:
        ValueError: if the pool has duplicates or meets the test or training
            rows; the message names the first shared rows.
    """
    pool = _index_array("pool_indices", pool_indices)
    test = _index_array("test_indices", test_indices)
    if len(np.unique(pool)) != len(pool):
        raise ValueError("pool_indices contains duplicate rows; pass each row once")
    shared = np.intersect1d(pool, test)
    if shared.size:
        raise ValueError(
            f"the validation pool contains {shared.size} test row(s), such as "
            f"{shared[:5].tolist()}; the test split must never be a validation "
            "candidate, so pass Split.val as the pool"
        )
    train = None
    if train_indices is not None:
        train = _index_array("train_indices", train_indices)
        shared = np.intersect1d(pool, train)
        if shared.size:
            raise ValueError(
                f"the validation pool contains {shared.size} training row(s), such "
                f"as {shared[:5].tolist()}; pass a pool disjoint from training"
            )
    return pool, train


def _row_count(batch, features, targets) -> int | None:
    """Return the row count of the arrays given, or None if all are None.

    Raises:
        ValueError: when the given arrays differ in length.
    """
    lengths = {
        name: len(values)
        for name, values in zip(
            ("batch", "features", "targets"), (batch, features, targets), strict=True
        )
        if values is not None
    }
    if len(set(lengths.values())) > 1:
        listed = ", ".join(f"{name} {count}" for name, count in lengths.items())
        raise ValueError(
            f"batch, features and targets must have one row per composition, got "
            f"{listed} rows; pass arrays of the same data"
        )
    return next(iter(lengths.values()), None)


def _features(rows: np.ndarray, features, batch, feature_fn=None) -> np.ndarray:
    if features is not None:
        return np.asarray(features, dtype=np.float64)[rows]
    if batch is None:
        raise ValueError("this strategy needs batch (all compositions) or features")
    return _featurise(batch[rows], feature_fn)


def _featurise(batch, feature_fn) -> np.ndarray:
    """Return ``feature_fn(batch)`` [B, F], by default ``composition_features``."""
    if feature_fn is None:
        from dvmrl.featurize import composition_features

        feature_fn = composition_features
    return np.asarray(feature_fn(batch), dtype=np.float64)


def _top(scores: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of the ``size`` largest scores; ties broken at random."""
    tie_break = rng.random(len(scores))
    order = np.lexsort((tie_break, -scores))
    return order[:size]


# -- strategies --------------------------------------------------------------


def _select_random(pool, size, rng, **_) -> np.ndarray:
    return rng.choice(len(pool), size=size, replace=False)


def gp_predictive_std(
    train_x: np.ndarray,
    pool_x: np.ndarray,
    train_y: np.ndarray | None = None,
    seed: int = 0,
    max_train: int = GP_MAX_TRAIN,
) -> np.ndarray:
    """Fit a Gaussian process on training features and return the pool's std.

    The features are standardised on the training subsample. The kernel is
    a constant times an RBF plus a white-noise term. Its hyperparameters are
    fitted by marginal likelihood (which needs ``train_y``) on at most
    GP_TUNE_SAMPLES training rows, then kept fixed for the fit on at most
    ``max_train`` rows. Without targets the RBF length scale is the
    median pairwise distance and the noise is 1 % of the signal variance.

    Args:
        train_x (ndarray): training features [N, F].
        pool_x (ndarray): pool features [P, F].
        train_y (ndarray, optional): training targets [N] in eV/atom.
        seed (int): seed of the subsamples.
        max_train (int): largest training subsample for the final fit.

    Returns:
        ndarray: predictive standard deviation [P], in eV/atom with
        ``train_y`` (the GP scales its standardised prediction back), and in
        units of the unit-variance signal for ``train_y=None``.
    """
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    # NOTE: with OpenBLAS's default threads a 2000 x 2000 Cholesky took 1.5 s
    # instead of 0.1 s on a loaded 2-core machine (its threads spin on the
    # shared cores), so the GP runs its linear algebra on one thread.
    with threadpool_limits(limits=1, user_api="blas"), warnings.catch_warnings():
        # A noise level at its lower bound only means the data are nearly
        # noise-free in these features; the std is still valid.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return _gp_std(train_x, pool_x, train_y, seed, max_train)


def _gp_std(train_x, pool_x, train_y, seed, max_train) -> np.ndarray:
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    n = len(train_x)
    if n == 0:
        raise ValueError("gp-uncertainty needs at least one training composition")
    chosen = rng.choice(n, size=min(n, int(max_train)), replace=False)
    scaler = StandardScaler().fit(train_x[chosen])
    x_fit = scaler.transform(train_x[chosen])
    x_pool = scaler.transform(pool_x)

    if train_y is not None:
        y = np.asarray(train_y, dtype=np.float64)
        tune = chosen[: min(len(chosen), GP_TUNE_SAMPLES)]
        kernel = ConstantKernel(1.0, (1e-3, 1e3)) * RBF(
            length_scale=math.sqrt(x_fit.shape[1]), length_scale_bounds=(1e-2, 1e3)
        ) + WhiteKernel(0.1, (1e-5, 1e1))
        tuner = GaussianProcessRegressor(kernel, normalize_y=True, random_state=seed)
        tuner.fit(scaler.transform(train_x[tune]), y[tune])
        kernel = tuner.kernel_
        fit_y = y[chosen]
    else:
        sample = x_fit[: min(len(x_fit), 500)]
        distances = np.sqrt(((sample[:, None, :] - sample[None, :, :]) ** 2).sum(-1))
        positive = distances[distances > 0]
        scale = float(np.median(positive)) if positive.size else 1.0
        kernel = ConstantKernel(1.0) * RBF(length_scale=scale) + WhiteKernel(0.01)
        # The predictive std does not depend on the targets when the
        # hyperparameters are fixed, so zeros stand in for them.
        fit_y = np.zeros(len(chosen))
    gp = GaussianProcessRegressor(
        kernel, optimizer=None, normalize_y=train_y is not None
    )
    gp.fit(x_fit, fit_y)
    _, std = gp.predict(x_pool, return_std=True)
    return std


def _select_gp(
    pool,
    size,
    rng,
    *,
    train,
    batch,
    features,
    feature_fn,
    targets,
    embed,
    gp_max_train,
    seed,
    **_,
) -> np.ndarray:
    if train is None or len(train) == 0:
        raise ValueError("gp-uncertainty needs train_indices (the training rows)")
    if embed is not None:
        if batch is None:
            raise ValueError("gp-uncertainty with embed needs batch (all compositions)")
        sub = np.random.default_rng(seed).choice(
            len(train), size=min(len(train), int(gp_max_train)), replace=False
        )
        train = train[np.sort(sub)]
        train_x = np.asarray(embed(batch[train]), dtype=np.float64)
        pool_x = np.asarray(embed(batch[pool]), dtype=np.float64)
    else:
        train_x = _features(train, features, batch, feature_fn)
        pool_x = _features(pool, features, batch, feature_fn)
    train_y = None if targets is None else np.asarray(targets, dtype=np.float64)[train]
    if train_y is not None and not np.isfinite(train_y).all():
        bad = train[~np.isfinite(train_y)]
        raise ValueError(
            f"targets of training rows {bad[:5].tolist()} are not finite (NaN or "
            "inf); the Gaussian process needs finite targets, so drop those rows "
            "from train_indices or fix their targets"
        )
    std = gp_predictive_std(train_x, pool_x, train_y, seed=seed, max_train=gp_max_train)
    return _top(std, size, rng)


def _select_ensemble(
    pool, size, rng, *, samples, trainer, predictors, batch, n_samples, seed, **_
) -> np.ndarray:
    if samples is None:
        if trainer is not None:
            if batch is None:
                raise ValueError("ensemble-variance with a trainer needs batch")
            if not trainer.model.has_mc_dropout:
                from dvmrl.training.trainer import MC_DROPOUT_NEEDED

                raise ValueError(
                    f"ensemble-variance with a trainer: {MC_DROPOUT_NEEDED}; or pass "
                    "samples or predictors"
                )
            samples = trainer.predict_samples(
                batch[pool], n_samples=n_samples, seed=seed
            )
        elif predictors:
            if batch is None:
                raise ValueError("ensemble-variance with predictors needs batch")
            if len(predictors) < 2:
                raise ValueError(
                    f"ensemble-variance needs two or more predictors to measure "
                    f"their spread, got {len(predictors)}; add ensemble members, or "
                    "pass a trainer with MC dropout"
                )
            samples = _ensemble_predictions(predictors, batch[pool])
        else:
            raise ValueError(
                "ensemble-variance needs samples [S, pool size], a trainer with MC "
                "dropout, or a list of predictors"
            )
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 2 or samples.shape[1] != len(pool) or samples.shape[0] < 2:
        raise ValueError(
            f"samples must have shape [S >= 2, {len(pool)}] (predictions per pool "
            f"composition), got {samples.shape}"
        )
    finite = np.isfinite(samples).all(axis=0)
    if not finite.all():
        # NaN sorts last, so such compositions would quietly never be drawn,
        # and an all-NaN pool would be drawn by the tie-break alone.
        bad = np.asarray(pool)[~finite]
        raise ValueError(
            f"the ensemble's predictions of pool rows {bad[:5].tolist()} are not "
            "finite (NaN or inf); a member or MC dropout sample has diverged, so "
            "retrain it or drop it from the ensemble"
        )
    return _top(samples.var(axis=0), size, rng)


def _module_device(predictor) -> torch.device | None:
    """Return the device of a module's parameters, or None for a plain callable."""
    if isinstance(predictor, torch.nn.Module):
        for parameter in predictor.parameters():
            return parameter.device
    return None


def _ensemble_predictions(predictors: Sequence[Callable], batch) -> np.ndarray:
    from dvmrl.adversarial import deterministic, predictor_dtype

    rows = []
    with torch.no_grad():
        for predictor in predictors:
            on_device = batch.to(_module_device(predictor), predictor_dtype(predictor))
            # The spread is that of the members: a module in training mode or
            # with MC dropout would add dropout noise, and the draw would not
            # repeat.
            with deterministic(predictor):
                out = predictor(
                    on_device.element_index, on_device.frac, on_device.mask
                )
            rows.append(out.detach().cpu().double().numpy())
    return np.stack(rows)


def _select_adversarial(
    pool,
    size,
    rng,
    *,
    train,
    batch,
    features,
    feature_fn,
    predictor,
    epsilon,
    floor,
    adversarial_anchors,
    search_options,
    seed,
    **_,
) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors
    from sklearn.preprocessing import StandardScaler

    from dvmrl.adversarial import adversarial_search
    from dvmrl.featurize import CompositionBatch

    if predictor is None:
        raise ValueError("the adversarial strategy needs predictor (the current model)")
    if batch is None:
        raise ValueError("the adversarial strategy needs batch (all compositions)")
    if train is None or len(train) == 0:
        raise ValueError("the adversarial strategy needs train_indices")
    anchors = np.sort(
        rng.choice(len(train), size=min(len(train), adversarial_anchors), replace=False)
    )
    anchor_rows = train[anchors]
    anchor_batch = batch[anchor_rows]
    options = {"steps": 20, "starts": 4, **(search_options or {})}
    # The search runs on the batch's device, which must be the model's; its
    # results come back on the CPU.
    result = adversarial_search(
        predictor,
        anchor_batch.to(_module_device(predictor)),
        epsilon,
        floor=floor,
        seed=seed,
        **options,
    )
    examples = CompositionBatch(
        anchor_batch.element_index,
        result.perturbed.to(anchor_batch.frac.dtype),
        anchor_batch.mask,
    )
    # The pool and the examples must share one feature space.
    example_x = _featurise(examples, feature_fn)
    pool_x = _features(pool, features, batch, feature_fn)
    if pool_x.shape[1] != example_x.shape[1]:
        if feature_fn is not None:
            raise ValueError(
                f"features has {pool_x.shape[1]} columns but feature_fn gives "
                f"{example_x.shape[1]}; pass the features that feature_fn computes"
            )
        # Features of another kind without their function: compare the pool
        # and the examples in the default composition features instead.
        logger.debug(
            "features has %d columns, not the %d of composition_features; the "
            "adversarial strategy featurises the pool itself",
            pool_x.shape[1],
            example_x.shape[1],
        )
        pool_x = _featurise(batch[pool], None)
    scaler = StandardScaler().fit(pool_x)
    neighbours = NearestNeighbors(n_neighbors=min(len(pool), size)).fit(
        scaler.transform(pool_x)
    )
    _, nearest = neighbours.kneighbors(scaler.transform(example_x))

    # Most vulnerable examples first. Each example takes its nearest pool
    # composition not yet chosen, and the next round takes second-nearest.
    order = np.argsort(-result.change.abs().numpy(), kind="stable")
    chosen: list[int] = []
    already_chosen = np.zeros(len(pool), dtype=bool)
    for rank in range(nearest.shape[1]):
        for example in order:
            candidate = int(nearest[example, rank])
            if not already_chosen[candidate]:
                already_chosen[candidate] = True
                chosen.append(candidate)
                if len(chosen) == size:
                    return np.asarray(chosen)
    rest = rng.permutation(np.flatnonzero(~already_chosen))[: size - len(chosen)]
    return np.concatenate([np.asarray(chosen, dtype=np.int64), rest])


_SELECTORS = {
    "random": _select_random,
    "gp-uncertainty": _select_gp,
    "ensemble-variance": _select_ensemble,
    "adversarial": _select_adversarial,
}


def select_validation_set(
    strategy: str,
    pool_indices,
    size: int,
    seed: int,
    *,
    test_indices,
    train_indices=None,
    batch=None,
    features: np.ndarray | None = None,
    feature_fn: Callable | None = None,
    targets: np.ndarray | None = None,
    embed: Callable | None = None,
    samples: np.ndarray | None = None,
    trainer=None,
    predictors: Sequence[Callable] | None = None,
    n_samples: int = 20,
    predictor: Callable | None = None,
    epsilon: float = 0.05,
    floor: float = 0.01,
    gp_max_train: int = GP_MAX_TRAIN,
    adversarial_anchors: int = ADVERSARIAL_ANCHORS,
    search_options: dict | None = None,
) -> np.ndarray:
    """Choose a validation set of ``size`` rows from the validation pool.

    Args:
        strategy (str): one of :data:`STRATEGIES`.
        pool_indices (array): rows of the validation pool (int).
        size (int): rows to choose, 1 <= size <= pool size.
        seed (int): seed; the same arguments and seed give the same rows.
        test_indices (array): the test rows; the call raises if the pool
            contains any of them.
        train_indices (array, optional): the training rows; needed by
            ``gp-uncertainty`` and ``adversarial``, and checked to be
            disjoint from the pool when given.
        batch (CompositionBatch, optional): every composition of the data
            set, indexed by row.
        features (ndarray, optional): ``feature_fn(batch)`` of every row
            [N, F], to skip recomputing them.
        feature_fn (callable, optional): ``feature_fn(batch) -> [B, F]``
            features of compositions for ``gp-uncertainty`` and
            ``adversarial``; default ``dvmrl.featurize.composition_features``.
            The adversarial strategy featurises its perturbed compositions
            with it. Given ``features`` of another width and no
            ``feature_fn``, that strategy uses the default features for the
            pool and the examples alike.
        targets (ndarray, optional): every row's target in eV/atom; lets the
            GP fit its hyperparameters.
        embed (callable, optional): ``embed(batch) -> [B, H]`` features for
            the GP instead of the composition features, such as the model's
            pooled embedding.
        samples (ndarray, optional): predictions [S, pool size] in eV/atom
            from MC dropout or an ensemble, for ``ensemble-variance``.
        trainer (Trainer, optional): draws ``n_samples`` MC-dropout samples
            when ``samples`` is not given.
        predictors (list, optional): ensemble members, callables
            ``f(element_index, frac, mask) -> [B]``.
        n_samples (int): MC-dropout samples drawn from ``trainer``.
        predictor (callable, optional): the current model, for ``adversarial``.
        epsilon (float): box radius of the adversarial search (fraction).
        floor (float): minimum fraction of the adversarial search.
        gp_max_train (int): largest training subsample of the GP.
        adversarial_anchors (int): training compositions perturbed, at most.
        search_options (dict, optional): more keyword arguments of
            ``adversarial_search`` (default: 20 steps, 4 starts).

    Returns:
        ndarray: the chosen rows, int64, sorted, a subset of the pool.

    Raises:
        ValueError: for an unknown strategy, a bad size or seed, counts
            below 1 (``n_samples``, ``gp_max_train``,
            ``adversarial_anchors``), an ``epsilon`` outside (0, 1), a pool
            that meets the test or training rows, missing inputs of the
            strategy (such as a trainer without head dropout for
            ``ensemble-variance``), or ``features`` whose width
            ``feature_fn`` does not give.
    """
    if strategy not in _SELECTORS:
        raise ValueError(
            f"unknown validation strategy {strategy!r}: expected one of "
            f"{', '.join(STRATEGIES)}"
        )
    if not is_integral(seed) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    pool, train = check_pool(pool_indices, test_indices, train_indices)
    rows = _row_count(batch, features, targets)
    if rows is not None:
        beyond = pool[pool >= rows]
        if train is not None:
            beyond = np.concatenate([beyond, train[train >= rows]])
        if beyond.size:
            raise ValueError(
                f"row indices {beyond[:5].tolist()} are out of range for the {rows} "
                "rows of the data (batch, features or targets); pass indices below "
                f"{rows}"
            )
    if len(pool) == 0:
        raise ValueError(
            "pool_indices is empty, so there is no candidate to select; pass the "
            "validation pool's rows (for instance Split.val)"
        )
    if int(size) != size or not 1 <= size <= len(pool):
        raise ValueError(
            f"size must be an integer in 1 .. {len(pool)} (the pool size), got {size!r}"
        )
    size = int(size)
    for name, value in (
        ("n_samples", n_samples),
        ("gp_max_train", gp_max_train),
        ("adversarial_anchors", adversarial_anchors),
    ):
        if not is_integral(value) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if strategy == "ensemble-variance" and samples is None and trainer is not None and (
        n_samples < 2
    ):
        raise ValueError(
            f"n_samples must be >= 2 for a variance over MC-dropout samples, got "
            f"{n_samples!r}"
        )
    if not (isinstance(epsilon, numbers.Real) and 0 < epsilon < 1):
        raise ValueError(
            f"epsilon must lie in (0, 1) (box radius of the adversarial search, "
            f"fraction units), got {epsilon!r}; the default is 0.05"
        )
    rng = np.random.default_rng(int(seed))
    positions = _SELECTORS[strategy](
        pool,
        size,
        rng,
        train=train,
        batch=batch,
        features=features,
        feature_fn=feature_fn,
        targets=targets,
        embed=embed,
        samples=samples,
        trainer=trainer,
        predictors=predictors,
        n_samples=int(n_samples),
        predictor=predictor,
        epsilon=float(epsilon),
        floor=float(floor),
        gp_max_train=int(gp_max_train),
        adversarial_anchors=int(adversarial_anchors),
        search_options=search_options,
        seed=int(seed),
    )
    chosen = np.sort(pool[np.asarray(positions, dtype=np.int64)])
    logger.debug(
        "%s strategy chose %d of %d pool rows", strategy, len(chosen), len(pool)
    )
    return chosen


__all__ = [
    "ADVERSARIAL_ANCHORS",
    "GP_MAX_TRAIN",
    "STRATEGIES",
    "check_pool",
    "gp_predictive_std",
    "select_validation_set",
]
