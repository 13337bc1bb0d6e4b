"""Accuracy of the default model on the vendored MP formation-energy data.

Trains ``ModelConfig()`` with ``TrainConfig()`` (the values of
dvmrl/defaults.py) through the Trainer on the random and the chemsys split
of ``mp-formation-energy`` (test = 10 % of the compositions or of the
chemical systems, as dvmrl.splits cuts it), then prints the test RMSE and
MAE (eV/atom), the epochs and the training time for each split, and the
reference models of docs/benchmarks.md for comparison.

Usage:
    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=python .venv/bin/python \
        bench/bench_accuracy.py [--splits random chemsys] [--threads 2] \
        [--seed 0] [--json results.json] [--set train.epochs=50 ...]
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

from dvmrl import build_info, set_num_threads
from dvmrl.datasets import dataset_info, load
from dvmrl.featurize import featurize
from dvmrl.metrics import regression_metrics
from dvmrl.model import ModelConfig
from dvmrl.splits import make_split
from dvmrl.training import TrainConfig, Trainer

DATA = "mp-formation-energy"

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


def run_split(df, kind: str, seed: int, model_config, train_config) -> dict:
    """Train on one split kind and score the best-validation model on its test part."""
    split = make_split(df, kind, seed)
    batch = featurize(list(df["formula"]))
    targets = df["target"].to_numpy(dtype=np.float64)
    trainer = Trainer(
        model_config,
        train_config,
        batch[split.train],
        targets[split.train],
        batch[split.val],
        targets[split.val],
        device="cpu",
    )

    started = time.perf_counter()
    history = trainer.fit()
    seconds = time.perf_counter() - started

    y_test = targets[split.test]
    predictions = trainer.predict(batch[split.test])
    metrics = regression_metrics(y_test, predictions)
    best = next(record for record in history if record["epoch"] == trainer.best_epoch)
    # Compositions above 0.8 eV/atom form the high-energy tail of the data.
    errors = predictions - y_test
    tail = y_test > 0.8
    tail_share = float((errors[tail] ** 2).sum() / (errors**2).sum())
    return {
        "split": kind,
        "rmse": metrics["rmse"],
        "mae": metrics["mae"],
        "r2": metrics["r2"],
        "tail_share_of_squared_error": tail_share,
        "tail_rmse": float(np.sqrt((errors[tail] ** 2).mean())),
        "bulk_mae": float(np.abs(errors[~tail]).mean()),
        "epochs": trainer.epochs_done,
        "best_epoch": best["epoch"],
        "best_val_rmse": best["val_rmse"],
        "best_val_mae": best["val_mae"],
        "seconds": seconds,
        "n_train": len(split.train),
        "n_val": len(split.val),
        "n_test": len(split.test),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--splits", nargs="+", default=["random", "chemsys"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--set",
        dest="overrides",
        type=_parse_override,
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a default, such as model.hidden=96 or train.epochs=50",
    )
    args = parser.parse_args(argv)

    set_num_threads(args.threads)
    model_fields = {
        name: value for section, name, value in args.overrides if section == "model"
    }
    train_fields = {
        name: value for section, name, value in args.overrides if section == "train"
    }
    model_config = ModelConfig(**model_fields)
    train_config = dataclasses.replace(TrainConfig(seed=args.seed), **train_fields)
    df = load(DATA)
    info = build_info()
    print(
        f"{DATA}: {len(df)} compositions; {args.threads} threads, "
        f"{platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.2f}; "
        f"torch {torch.__version__}, cpu_isa {info.get('cpu_isa')}"
    )
    print(f"model {model_config.to_dict()}")
    print(f"train {dataclasses.asdict(train_config)}")
    sys.stdout.flush()

    results = []
    for kind in args.splits:
        result = run_split(df, kind, args.seed, model_config, train_config)
        result["load_after"] = os.getloadavg()[0]
        results.append(result)
        print(
            f"{kind:>8}: test RMSE {result['rmse']:.4f}  MAE {result['mae']:.4f} "
            f"eV/atom  R2 {result['r2']:.4f}  ({result['epochs']} epochs, best "
            f"{result['best_epoch']}, val RMSE {result['best_val_rmse']:.4f} MAE "
            f"{result['best_val_mae']:.4f}, {result['seconds']:.0f} s, tail share of "
            f"squared error {result['tail_share_of_squared_error']:.2f})",
            flush=True,
        )

    print("\nreferences (test RMSE / MAE, eV/atom):")
    for name, by_split in REFERENCES.items():
        cells = []
        for result in results:
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
        print(f"  {name:<36} " + "; ".join(cells))

    if args.json:
        payload = {
            "data": DATA,
            "data_info": dataset_info(DATA).get("name"),
            "threads": args.threads,
            "model": model_config.to_dict(),
            "train": dataclasses.asdict(train_config),
            "results": results,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "torch": torch.__version__,
        }
        with open(args.json, "w", encoding="utf-8") as stream:
            json.dump(payload, stream, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
