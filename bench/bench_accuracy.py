"""Accuracy of the default model on the vendored MP formation-energy data.

Trains ``ModelConfig()`` with ``TrainConfig()`` (the values of
dvmrl/defaults.py) through the Trainer on the random and the chemsys split
of ``mp-formation-energy`` (test = 10 % of the compositions or of the
chemical systems, as dvmrl.splits cuts it), then prints the test RMSE and
MAE (eV/atom), the epochs and the training time for each split, and the
reference models of docs/benchmarks.md for comparison. The default model
is an ensemble of ``defaults.MEMBERS`` seeds, as ``dvmrl train`` trains it:
``--members N`` trains N seeds on each split and scores each of them and
the mean of their predictions;
``--references`` also fits a random forest and gradient boosting on the
same splits, so the comparison does not depend on another test cut.

``--score-on dev`` leaves the test part out altogether: it cuts a
development part of the same kind from the training pool (train and
validation rows) and scores there, with every training and validation row
drawn from the rest of the pool. Compare settings that way and score only
the chosen one on the test part, so the test numbers stay an unbiased
estimate.

Usage:
    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=python .venv/bin/python \
        bench/bench_accuracy.py [--splits random chemsys] [--threads 2] \
        [--seed 0] [--members 3] [--divisions own|shared] [--references] \
        [--score-on test|dev] [--json results.json] \
        [--set train.epochs=50 ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import numpy as np
import torch

from dvmrl import build_info, defaults, set_num_threads
from dvmrl.cli._common import check_bench_compute, output_file_problem
from dvmrl.datasets import dataset_info, load
from dvmrl.featurize import FEATURE_STATS, composition_features, featurize
from dvmrl.metrics import regression_metrics
from dvmrl.model import ModelConfig
from dvmrl.splits import make_split
from dvmrl.training import TrainConfig, Trainer

DATA = "mp-formation-energy"
# Split kinds that need no further argument (the element split needs an element).
SPLITS = ("random", "chemsys", "binary-to-ternary")

# Test RMSE / MAE (eV/atom) of reference models on the same data with splits
# of the same kinds, measured on a 2-core machine.
REFERENCES = {
    "mean of the training targets": {
        "random": (0.536, 0.358),
        "chemsys": (0.547, 0.361),
    },
    "random forest (300 trees), Magpie": {
        "random": (0.321, 0.144),
        "chemsys": (0.360, 0.162),
    },
    "gradient boosting, Magpie": {"random": (0.303, 0.143), "chemsys": (0.356, 0.159)},
    "Roost, 25 min, 140 epochs": {"random": (0.361, 0.115), "chemsys": (0.415, 0.129)},
    "CrabNet, 3 min, 2 epochs": {"random": (0.460, 0.207), "chemsys": (0.477, 0.223)},
}


def _parse_override(text: str) -> tuple[str, str, object]:
    """Parse ``model.hidden=96`` or ``train.lr=1e-3`` into (section, field, value)."""
    key, _, raw = text.partition("=")
    section, _, name = key.partition(".")
    if section not in ("model", "train") or not name or not raw:
        raise argparse.ArgumentTypeError(
            f"expected model.FIELD=VALUE or train.FIELD=VALUE, got {text!r}"
        )
    return section, name, json.loads(raw) if raw[0] in '[{"' else _number(raw)


def _number(raw: str):
    for convert in (int, float):
        try:
            return convert(raw)
        except ValueError:
            pass
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    return raw


def score(y_test: np.ndarray, predictions: np.ndarray) -> dict:
    """Return test RMSE, MAE, R^2 and the tail statistics (eV/atom)."""
    metrics = regression_metrics(y_test, predictions)
    # Compositions above 0.8 eV/atom form the high-energy tail of the data.
    errors = predictions - y_test
    tail = y_test > 0.8
    return {
        "rmse": metrics["rmse"],
        "mae": metrics["mae"],
        "r2": metrics["r2"],
        "tail_share_of_squared_error": float(
            (errors[tail] ** 2).sum() / (errors**2).sum()
        ),
        "tail_rmse": float(np.sqrt((errors[tail] ** 2).mean())),
        "bulk_mae": float(np.abs(errors[~tail]).mean()),
    }


def development_frame(df, kind: str):
    """Return the training pool of the ``kind`` split as its own data frame.

    ``make_split`` on the returned frame cuts its test part (the development
    part) from the pool alone with the fixed test seed. So the development
    part does not move with the split seed, and it contains no original test row.
    """
    split = make_split(df, kind, 0)
    pool = np.sort(np.concatenate([split.train, split.val]))
    return df.iloc[pool].reset_index(drop=True)


def run_split(
    df,
    kind: str,
    seed: int,
    model_config,
    train_config,
    members: int = 1,
    divisions: str = "own",
    part: str = "test",
) -> dict:
    """Train on one split kind and score the best-validation models on its test part.

    With ``members`` > 1, models with the training seeds ``train_config.seed``
    + 0 .. members - 1 train, and the ensemble predicts the mean of their
    predictions. With ``divisions="own"`` member i divides the pool into
    training and validation parts with the split seed ``seed + i``, as
    ``dvmrl train --members`` does; ``"shared"`` gives all members the
    division of ``seed``. The test part is the same for every member.
    """
    split = make_split(df, kind, seed)
    batch = featurize(list(df["formula"]))
    targets = df["target"].to_numpy(dtype=np.float64)
    y_test = targets[split.test]
    runs, member_predictions = [], []
    for member in range(members):
        if divisions == "own" and member > 0:
            split = make_split(df, kind, seed + member)
            if not np.array_equal(targets[split.test], y_test):
                raise RuntimeError(f"the {kind} test part moved with the split seed")
        config = dataclasses.replace(train_config, seed=train_config.seed + member)
        trainer = Trainer(
            model_config,
            config,
            batch[split.train],
            targets[split.train],
            batch[split.val],
            targets[split.val],
            device="cpu",
        )
        started = time.perf_counter()
        history = trainer.fit()
        seconds = time.perf_counter() - started
        predictions = trainer.predict(batch[split.test])
        member_predictions.append(predictions)
        best = next(r for r in history if r["epoch"] == trainer.best_epoch)
        runs.append(
            {
                "seed": config.seed,
                **score(y_test, predictions),
                "epochs": trainer.epochs_done,
                "best_epoch": best["epoch"],
                "best_val_rmse": best["val_rmse"],
                "best_val_mae": best["val_mae"],
                "seconds": seconds,
                "n_train": len(split.train),
                "n_val": len(split.val),
                "test_predictions": predictions.tolist(),
            }
        )
        if members > 1:
            print(
                f"{kind:>8} member {member}: {part} RMSE {runs[-1]['rmse']:.4f} MAE "
                f"{runs[-1]['mae']:.4f} ({seconds:.0f} s)",
                flush=True,
            )
    mean_prediction = np.mean(member_predictions, axis=0)
    result = {
        "split": kind,
        **score(y_test, mean_prediction),
        "test_predictions": mean_prediction.tolist(),
        # Targets and frame rows of the scored part, for paired bootstraps.
        "test_targets": y_test.tolist(),
        "test_rows": [int(row) for row in split.test],
        "members": runs,
        "seconds": sum(run["seconds"] for run in runs),
        "n_test": len(split.test),
    }
    # Member 0's training facts. Each member's are under "members".
    member_keys = ("epochs", "best_epoch", "best_val_rmse", "best_val_mae")
    for key in (*member_keys, "n_train", "n_val"):
        result[key] = runs[0][key]
    return result


def run_references(
    df, kind: str, seed: int, threads: int, part: str = "test"
) -> dict:
    """Fit scikit-learn baselines on the same split and score them on its test part.

    Features: ``dvmrl.featurize.composition_features`` with every statistic
    (fraction-weighted mean, average deviation, std, min, max, range of the
    standardised element descriptors, and the stoichiometric norms). The
    models train on the training and validation parts together; the
    gradient boosting holds out 10 % of them for its early stopping.
    """
    from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestRegressor

    split = make_split(df, kind, seed)
    features = composition_features(list(df["formula"]), stats=FEATURE_STATS)
    targets = df["target"].to_numpy(dtype=np.float64)
    fit_rows = np.concatenate([split.train, split.val])
    models = {
        "random forest (300 trees)": RandomForestRegressor(
            n_estimators=300, n_jobs=threads, random_state=seed
        ),
        "gradient boosting (early-stopped)": HistGradientBoostingRegressor(
            max_iter=3000,
            learning_rate=0.05,
            early_stopping=True,
            n_iter_no_change=50,
            random_state=seed,
        ),
    }
    results = {}
    for name, model in models.items():
        started = time.perf_counter()
        model.fit(features[fit_rows], targets[fit_rows])
        predictions = model.predict(features[split.test])
        results[name] = {
            **score(targets[split.test], predictions),
            "test_predictions": predictions.tolist(),
            "seconds": time.perf_counter() - started,
        }
        print(
            f"{kind:>8} {name}: {part} RMSE {results[name]['rmse']:.4f} MAE "
            f"{results[name]['mae']:.4f} ({results[name]['seconds']:.0f} s)",
            flush=True,
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--splits", nargs="+", default=["random", "chemsys"], choices=SPLITS,
        help="split kinds to train and score (default: random chemsys); the "
        "element split needs a held-out element, so dvmrl train --split element "
        "--holdout-element X scores it",
    )
    parser.add_argument(
        "--threads", type=int, default=2,
        help="CPU threads of dvmrl and PyTorch, at least 1 (default: 2)",
    )
    parser.add_argument(
        "--seed", type=int, default=0,
        help="training seed of member 0 and split seed of the train/validation "
        "division; the test part does not depend on it (default: 0)",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--members",
        type=int,
        default=defaults.MEMBERS,
        help="models per split, with training seeds SEED .. SEED + N - 1; more "
        "than 1 also scores the mean of their predictions (default: "
        f"{defaults.MEMBERS}, as dvmrl train)",
    )
    parser.add_argument(
        "--divisions",
        choices=("own", "shared"),
        default="own",
        help="train/validation divisions of the members: one per member (split "
        "seed SEED + i, as dvmrl train --members does) or one for all "
        "(default: own)",
    )
    parser.add_argument(
        "--references",
        action="store_true",
        help="also fit a random forest and gradient boosting on composition "
        "features on the same splits (scikit-learn, a few minutes)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        type=_parse_override,
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a default, such as model.hidden=96 or train.epochs=50",
    )
    parser.add_argument(
        "--score-on",
        choices=("test", "dev"),
        default="test",
        help="part to score on: the split's test part, or a development part "
        "cut the same way from the training pool, for choosing settings "
        "without looking at the test part (default: test)",
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads: expected an integer >= 1, got {args.threads}")
    check_bench_compute(parser, args)
    if args.seed < 0:
        parser.error(f"--seed: expected an integer >= 0, got {args.seed}")
    if args.members < 1:
        parser.error(f"--members: expected an integer >= 1, got {args.members}")

    set_num_threads(args.threads)
    model_fields = {
        name: value for section, name, value in args.overrides if section == "model"
    }
    train_fields = {
        name: value for section, name, value in args.overrides if section == "train"
    }
    for section, config_class, fields in (
        ("model", ModelConfig, model_fields),
        ("train", TrainConfig, train_fields),
    ):
        known = {field.name for field in dataclasses.fields(config_class)}
        for name in fields:
            if name not in known:
                parser.error(
                    f"--set {section}.{name}: unknown field; expected one of "
                    f"{', '.join(sorted(known))}"
                )
    try:
        model_config = ModelConfig(**model_fields)
        train_config = dataclasses.replace(TrainConfig(seed=args.seed), **train_fields)
    except (TypeError, ValueError) as err:
        parser.error(f"--set: {err}")
    if train_config.epochs < 1:
        parser.error(
            f"--set train.epochs: expected an integer >= 1, got {train_config.epochs}"
        )
    if args.score_on == "dev" and "binary-to-ternary" in args.splits:
        # Its training pool contains binaries only, so no ternary development
        # part can be cut from it.
        parser.error(
            "--score-on dev cannot cut a development part from the binary-to-ternary "
            "split, whose training pool has no ternaries; drop binary-to-ternary "
            "from --splits or score on the test parts"
        )
    if args.json:
        # Checked now, so that a bad path does not lose hours of training.
        problem = output_file_problem(args.json)
        if problem:
            parser.error(f"--json {problem}")
    df = load(DATA)
    info = build_info()
    print(
        f"{DATA}: {len(df)} compositions; {args.threads} threads, "
        f"{platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.2f}; "
        f"torch {torch.__version__}, cpu_isa {info.get('cpu_isa')}"
    )
    if args.score_on == "dev":
        print(
            "scoring on development parts cut from the training pools; the "
            "test parts are not used"
        )
    print(f"model {model_config.to_dict()}")
    print(f"train {dataclasses.asdict(train_config)}")
    sys.stdout.flush()

    part = args.score_on
    results = []
    measured_references = {}
    for kind in args.splits:
        frame = development_frame(df, kind) if args.score_on == "dev" else df
        result = run_split(
            frame, kind, args.seed, model_config, train_config, args.members,
            args.divisions, part,
        )
        result["load_after"] = os.getloadavg()[0]
        results.append(result)
        label = "" if args.members == 1 else f" ensemble of {args.members}"
        member = "" if args.members == 1 else "member 0: "
        # The seconds of an ensemble add up the training of every member.
        seconds_label = "" if args.members == 1 else "all members: "
        print(
            f"{kind:>8}{label}: {part} RMSE {result['rmse']:.4f}  MAE "
            f"{result['mae']:.4f} eV/atom  R2 {result['r2']:.4f}  "
            f"({member}{result['epochs']} epochs, best {result['best_epoch']}, "
            f"val RMSE "
            f"{result['best_val_rmse']:.4f} MAE {result['best_val_mae']:.4f}; "
            f"{seconds_label}{result['seconds']:.0f} s, tail share of squared error "
            f"{result['tail_share_of_squared_error']:.2f})",
            flush=True,
        )
        if args.references:
            measured_references[kind] = run_references(
                frame, kind, args.seed, args.threads, part
            )

    if args.score_on == "dev":
        # The reference table has test-part numbers, so it does not apply.
        results_for_table = []
    else:
        results_for_table = results
    if any(result["split"] in ("random", "chemsys") for result in results_for_table):
        print("\nreferences (test RMSE / MAE, eV/atom):")
    for name, by_split in REFERENCES.items():
        cells = []
        for result in results_for_table:
            if result["split"] not in by_split:
                continue  # the reference table has the random and chemsys splits only
            ref_rmse, ref_mae = by_split[result["split"]]
            verdict = (
                "beaten"
                if result["rmse"] < ref_rmse and result["mae"] < ref_mae
                else (
                    "RMSE not beaten"
                    if result["rmse"] >= ref_rmse and result["mae"] < ref_mae
                    else "MAE not beaten"
                    if result["mae"] >= ref_mae and result["rmse"] < ref_rmse
                    else "not beaten"
                )
            )
            cells.append(f"{result['split']} {ref_rmse:.3f}/{ref_mae:.3f} {verdict}")
        if cells:
            print(f"  {name:<36} " + "; ".join(cells))
    if measured_references:
        print("\nreferences measured in this run on the same splits:")
        for kind, by_model in measured_references.items():
            model_result = next(r for r in results if r["split"] == kind)
            for name, ref in by_model.items():
                beaten = (
                    model_result["rmse"] < ref["rmse"]
                    and model_result["mae"] < ref["mae"]
                )
                print(
                    f"  {kind:>8} {name:<34} {ref['rmse']:.3f}/{ref['mae']:.3f} "
                    f"{'beaten' if beaten else 'not beaten'}"
                )

    if args.json:
        payload = {
            "data": DATA,
            "data_info": dataset_info(DATA),
            "threads": args.threads,
            "scored_on": args.score_on,
            "model": model_config.to_dict(),
            "train": dataclasses.asdict(train_config),
            "results": results,
            "measured_references": measured_references,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "torch": torch.__version__,
        }
        with open(args.json, "w", encoding="utf-8") as stream:
            json.dump(payload, stream, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
