"""Tree models on matminer's Magpie features, on dvmrl's splits and on other cuts.

Reference numbers for the accuracy benchmark that use the standard Magpie
feature set (matminer ``ElementProperty.from_preset("magpie")``, 132
features) rather than dvmrl's own composition features. Part one fits a
random forest (300 trees) and gradient boosting (scikit-learn, early-stopped)
on the training and validation parts of dvmrl's random and chemsys splits and
scores them on the test parts that every dvmrl run uses. Part two
(``--cuts N``) draws N other random 10 % test cuts and fits a histogram
gradient boosting model and a 100-tree forest on each, to show how much the
test RMSE moves between cuts.

matminer is not a dvmrl dependency; run this from an environment that has
it (``pip install matminer scikit-learn``) and dvmrl's source on the path:

    PYTHONPATH=python python bench/bench_magpie_references.py \\
        [--splits random chemsys] [--cuts 4] [--features magpie.npy]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from dvmrl.cli._common import non_negative_int
from dvmrl.datasets import load
from dvmrl.splits import make_split

DATA = "mp-formation-energy"


def magpie_features(formulas: list[str], cache: Path | None) -> np.ndarray:
    """Return matminer's Magpie features [B, 132], read from or written to ``cache``."""
    if cache is not None and cache.exists():
        return np.load(cache)
    from matminer.featurizers.composition import ElementProperty
    from pymatgen.core import Composition

    featurizer = ElementProperty.from_preset("magpie")
    features = np.array(
        [featurizer.featurize(Composition(formula)) for formula in formulas],
        dtype=np.float64,
    )
    if cache is not None:
        np.save(cache, features)
    return features


def errors(y: np.ndarray, prediction: np.ndarray) -> tuple[float, float]:
    """Return (RMSE, MAE) in eV/atom."""
    residual = prediction - y
    return float(np.sqrt(np.mean(residual**2))), float(np.mean(np.abs(residual)))


def main(argv: list[str] | None = None) -> int:
    from sklearn.ensemble import (
        GradientBoostingRegressor,
        HistGradientBoostingRegressor,
        RandomForestRegressor,
    )

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--splits",
        nargs="*",
        default=["random", "chemsys"],
        choices=["random", "chemsys", "binary-to-ternary"],
        help="dvmrl splits to score; default: random chemsys",
    )
    parser.add_argument(
        "--cuts",
        type=non_negative_int,
        default=0,
        help="other random test cuts to score; default: 0",
    )
    parser.add_argument(
        "--features",
        type=Path,
        default=None,
        help=".npy file that caches the Magpie features (written when missing)",
    )
    args = parser.parse_args(argv)
    if args.features is not None and args.features.suffix != ".npy":
        # numpy.save would append .npy, and the next run would miss the cache.
        parser.error(
            f"--features: expected a .npy file name, got {str(args.features)!r}"
        )

    df = load(DATA)
    x = np.nan_to_num(magpie_features(list(df["formula"]), args.features))
    y = df["target"].to_numpy(dtype=np.float64)
    print(f"{DATA}: {len(df)} compositions, {x.shape[1]} Magpie features", flush=True)

    for kind in args.splits:
        split = make_split(df, kind, 0)
        fit_rows = np.concatenate([split.train, split.val])
        models = {
            "random forest (300 trees)": RandomForestRegressor(
                n_estimators=300, n_jobs=1, random_state=0
            ),
            "gradient boosting (depth 5, early-stopped)": GradientBoostingRegressor(
                n_estimators=3000,
                learning_rate=0.05,
                max_depth=5,
                subsample=0.8,
                n_iter_no_change=50,
                validation_fraction=0.1,
                random_state=0,
            ),
            "histogram gradient boosting (early-stopped)": (
                HistGradientBoostingRegressor(
                    max_iter=3000,
                    learning_rate=0.05,
                    early_stopping=True,
                    n_iter_no_change=50,
                    random_state=0,
                )
            ),
        }
        for name, model in models.items():
            started = time.perf_counter()
            model.fit(x[fit_rows], y[fit_rows])
            rmse, mae = errors(y[split.test], model.predict(x[split.test]))
            print(
                f"{kind:>8} {name}: test RMSE {rmse:.3f} MAE {mae:.3f} "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )

    rng = np.random.default_rng(123)
    for cut in range(args.cuts):
        order = rng.permutation(len(y))
        test, fit_rows = order[: len(y) // 10], order[len(y) // 10 :]
        mean_rmse, _ = errors(y[test], np.full(len(test), y[fit_rows].mean()))
        boosting = HistGradientBoostingRegressor(
            max_iter=3000,
            learning_rate=0.05,
            early_stopping=True,
            n_iter_no_change=50,
            random_state=0,
        ).fit(x[fit_rows], y[fit_rows])
        forest = RandomForestRegressor(n_estimators=100, n_jobs=1, random_state=0).fit(
            x[fit_rows], y[fit_rows]
        )
        boost_rmse, boost_mae = errors(y[test], boosting.predict(x[test]))
        forest_rmse, forest_mae = errors(y[test], forest.predict(x[test]))
        print(
            f"cut {cut}: mean predictor RMSE {mean_rmse:.3f}; histogram gradient "
            f"boosting {boost_rmse:.3f} / {boost_mae:.3f}; random forest (100 "
            f"trees) {forest_rmse:.3f} / {forest_mae:.3f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
