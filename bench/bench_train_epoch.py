"""Time one training epoch of the default model, reference path against fused.

Trains two identical trainers on the training part of the random split of
the vendored mp-formation-energy data (about 14.7k compositions). One runs
the plain PyTorch reference path and one the fused kernels. They alternate
one epoch each, so both see the same machine load. Prints the median,
minimum and every epoch time (validation included), and the ratio of the
medians.

Usage:
    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=python .venv/bin/python \
        bench/bench_train_epoch.py [--epochs 5] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics

import dvmrl
from dvmrl import datasets, splits
from dvmrl.featurize import featurize
from dvmrl.model import ModelConfig
from dvmrl.training import TrainConfig, Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5, help="epochs timed per path")
    parser.add_argument(
        "--threads", type=int, default=2, help="CPU threads of dvmrl and PyTorch"
    )
    parser.add_argument("--device", default="cpu", help="compute device: cpu or cuda")
    args = parser.parse_args()

    dvmrl.set_num_threads(args.threads)
    frame = datasets.load("mp-formation-energy")
    split = splits.make_split(frame, "random", seed=0)
    x = featurize(frame["formula"].tolist())
    y = frame["target"].to_numpy()
    print(
        f"train {len(split.train)}, val {len(split.val)} compositions; "
        f"{args.threads} threads; device {args.device}"
    )

    trainers = {}
    for name, fused in (("reference", False), ("fused", True)):
        trainers[name] = Trainer(
            ModelConfig(),
            TrainConfig(),
            x[split.train],
            y[split.train],
            x[split.val],
            y[split.val],
            device=args.device,
            use_fused=fused,
        )
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for _ in range(args.epochs):
        for name, trainer in trainers.items():
            record = trainer.train_epochs(1)[0]
            times[name].append(record["time_s"])
    for name, values in times.items():
        listed = ", ".join(f"{value:.2f}" for value in values)
        val_mae = trainers[name].history[-1]["val_mae"]
        print(
            f"{name:9s} median {statistics.median(values):.2f} s/epoch, min "
            f"{min(values):.2f} (all: {listed}); val MAE after {args.epochs} "
            f"epochs {val_mae:.4f} eV/atom"
        )
    ratio = statistics.median(times["reference"]) / statistics.median(times["fused"])
    print(f"reference / fused: {ratio:.2f}")


if __name__ == "__main__":
    main()
