"""Time one training epoch of the default model, reference path against fused.

Trains two identical trainers on the training part of the random split of
the vendored mp-formation-energy data (about 14.7k compositions). One runs
the plain PyTorch reference path and one the fused kernels. They alternate
one epoch each, so both see the same machine load. Prints the median,
minimum and every epoch time (validation included), and the ratio of the
medians.

With --adamw both trainers run the fused kernels, and the optimisers
differ: PyTorch's fused AdamW (the trainer's choice where PyTorch has it)
against PyTorch's default AdamW, a loop over the parameters on the CPU.

Usage:
    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=python .venv/bin/python \
        bench/bench_train_epoch.py [--epochs 5] [--threads 2] [--device cpu] \
        [--adamw]
"""

from __future__ import annotations

import argparse
import statistics

import torch

import dvmrl
from dvmrl import datasets, splits
from dvmrl.cli._common import check_bench_compute, positive_int
from dvmrl.featurize import featurize
from dvmrl.model import ModelConfig
from dvmrl.training import TrainConfig, Trainer


class DefaultAdamWTrainer(Trainer):
    """Trainer with PyTorch's default AdamW implementation instead of the fused one."""

    def _build_optimizer(self) -> None:
        super()._build_optimizer()
        options = dict(self._optimizer.defaults)
        self._optimizer = torch.optim.AdamW(
            self._parameters(),
            lr=options["lr"],
            betas=options["betas"],
            eps=options["eps"],
            weight_decay=options["weight_decay"],
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=5,
        help="epochs timed per path",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=2,
        help="CPU threads of dvmrl and PyTorch",
    )
    parser.add_argument("--device", default="cpu", help="compute device: cpu or cuda")
    parser.add_argument(
        "--adamw",
        action="store_true",
        help="compare fused with default AdamW, both on the fused kernels",
    )
    args = parser.parse_args()
    check_bench_compute(parser, args)

    dvmrl.set_num_threads(args.threads)
    frame = datasets.load("mp-formation-energy")
    split = splits.make_split(frame, "random", seed=0)
    x = featurize(frame["formula"].tolist())
    y = frame["target"].to_numpy()
    print(
        f"train {len(split.train)}, val {len(split.val)} compositions; "
        f"{args.threads} threads; device {args.device}"
    )

    if args.adamw:
        variants = (
            ("default AdamW", DefaultAdamWTrainer, True),
            ("fused AdamW", Trainer, True),
        )
    else:
        variants = (("reference", Trainer, False), ("fused", Trainer, True))
    trainers = {}
    for name, trainer_class, fused in variants:
        trainers[name] = trainer_class(
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
            f"{name:18s} median {statistics.median(values):.3f} s/epoch, min "
            f"{min(values):.3f} (all: {listed}); val MAE after {args.epochs} "
            f"epochs {val_mae:.4f} eV/atom"
        )
    (slow_name, slow), (fast_name, fast) = times.items()
    ratio = statistics.median(slow) / statistics.median(fast)
    print(f"{slow_name} / {fast_name}: {ratio:.2f}")


if __name__ == "__main__":
    main()
