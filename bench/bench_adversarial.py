"""Time the adversarial search and the box-simplex projection.

1. Projection at B x K (default 10,000 x 3, float64): the compiled kernel
   (dvmrl.projection.project_simplex_box) against the sort-based PyTorch
   version (project_simplex_box_torch), interleaved, median of repeats.
2. The full search (dvmrl.adversarial.adversarial_search) on N compositions
   of a data set (default 10,000 of mp-formation-energy) with the default
   model size fitted for a few epochs, S steps and R runs per composition,
   on the fused kernels and on the reference PyTorch path. Runs stop early
   once their ascent direction is 0, so the cost depends on the model.

Run with OMP_WAIT_POLICY=PASSIVE on a shared machine:

    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=python .venv/bin/python \
        bench/bench_adversarial.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
import torch

import dvmrl
from dvmrl.adversarial import adversarial_search
from dvmrl.cli._common import (
    check_bench_compute,
    non_negative_int,
    positive_int,
)
from dvmrl.datasets import load
from dvmrl.featurize import featurize
from dvmrl.model import CompositionMPNN, ModelConfig
from dvmrl.projection import project_simplex_box, project_simplex_box_torch


def projection_problem(b: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, k, generator=g, dtype=torch.float64) * 1.2 - 0.1
    lo = torch.full((b, k), 0.01, dtype=torch.float64)
    hi = torch.full((b, k), 0.9, dtype=torch.float64)
    mask = torch.ones(b, k, dtype=torch.bool)
    return x, lo, hi, mask


def time_projection(b: int, k: int, repeats: int, device: str) -> dict:
    x, lo, hi, mask = (t.to(device) for t in projection_problem(b, k, 0))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = {"kernel": [], "torch": []}
    functions = {"kernel": project_simplex_box, "torch": project_simplex_box_torch}
    for function in functions.values():  # warm-up
        function(x, lo, hi, mask)
    for _ in range(repeats):
        for name, function in functions.items():
            sync()
            start = time.perf_counter()
            function(x, lo, hi, mask)
            sync()
            times[name].append(time.perf_counter() - start)
    kernel = statistics.median(times["kernel"])
    plain = statistics.median(times["torch"])
    return {
        "B": b,
        "K": k,
        "device": device,
        "kernel_ms": 1e3 * kernel,
        "torch_ms": 1e3 * plain,
        "speedup": plain / kernel,
    }


def fit_model(df, epochs: int, seed: int) -> CompositionMPNN:
    """Fit the default model on the data set for a few epochs (Adam, MSE)."""
    model = CompositionMPNN(ModelConfig(), seed=seed)
    targets = torch.tensor(df["target"].to_numpy(), dtype=torch.float32)
    model.set_target_scaling(float(targets.mean()), float(targets.std()))
    if epochs == 0:
        return model
    batch = featurize(df["formula"].tolist())
    frac = batch.frac.float()
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for rows in torch.randperm(len(df), generator=generator).split(256):
            predicted = model(batch.element_index[rows], frac[rows], batch.mask[rows])
            loss = (predicted - targets[rows]).square().mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        error = model(batch.element_index, frac, batch.mask) - targets
    print(
        f"model fitted for {epochs} epochs on {len(df)} compositions: "
        f"training RMSE {float(error.square().mean().sqrt()):.3f} eV/atom"
    )
    return model


def time_search(
    model: CompositionMPNN, df, n: int, steps: int, starts: int, fused: bool, seed: int
) -> dict:
    rows = np.random.default_rng(seed).choice(
        len(df), size=min(n, len(df)), replace=False
    )
    batch = featurize(df["formula"].to_numpy()[rows].tolist())
    model.use_fused = fused
    model.eval()
    start = time.perf_counter()
    result = adversarial_search(
        model, batch, 0.05, steps=steps, starts=starts, seed=seed
    )
    seconds = time.perf_counter() - start
    return {
        "compositions": len(rows),
        "steps": steps,
        "starts": starts,
        "path": "fused" if fused else "reference",
        "seconds": seconds,
        "mean_abs_change": float(result.change.abs().mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=positive_int, default=2, help="dvmrl CPU threads; default: 2"
    )
    parser.add_argument(
        "--batch",
        type=positive_int,
        default=10_000,
        help="rows B of the projection problem; default: 10000",
    )
    parser.add_argument(
        "--k",
        type=positive_int,
        default=3,
        help="slots K of the projection problem, 2 to 100 (the bounds 0.01 and 0.9 "
        "per slot admit a sum of 1 only then); default: 3",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=21,
        help="projection repeats; default: 21",
    )
    parser.add_argument(
        "--compositions",
        type=positive_int,
        default=10_000,
        help="compositions N of the search; default: 10000",
    )
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=50,
        help="gradient steps S per run; default: 50",
    )
    parser.add_argument(
        "--starts",
        type=positive_int,
        default=4,
        help="runs R per composition; default: 4",
    )
    parser.add_argument(
        "--paths",
        default="fused,reference",
        help="comma-separated model paths of the search; default: fused,reference",
    )
    parser.add_argument(
        "--train-epochs",
        type=non_negative_int,
        default=5,
        help="epochs the model is fitted before the search (0: random weights)",
    )
    parser.add_argument(
        "--device", default="cpu", help="device of the projection timing"
    )
    parser.add_argument(
        "--skip-search", action="store_true", help="time the projection only"
    )
    args = parser.parse_args()
    paths = args.paths.split(",")
    unknown = [path for path in paths if path not in ("fused", "reference")]
    if unknown:
        parser.error(
            f"--paths: unknown path(s) {unknown}; use fused, reference or both"
        )
    if not 2 <= args.k <= 100:
        parser.error(
            f"--k: expected 2 to 100 slots, got {args.k}; with bounds 0.01 to 0.9 per "
            "slot no other count admits fractions summing to 1"
        )
    check_bench_compute(parser, args)

    dvmrl.set_num_threads(args.threads)
    info = dvmrl.build_info()
    print(
        f"machine: {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, "
        f"core ISA {info['cpu_isa']}, torch {info['torch_version']}"
    )
    projection = time_projection(args.batch, args.k, args.repeats, args.device)
    print(json.dumps({"projection": projection}))
    if args.skip_search:
        return
    df = load("mp-formation-energy")
    model = fit_model(df, args.train_epochs, 0)
    for path in args.paths.split(","):
        result = time_search(
            model, df, args.compositions, args.steps, args.starts, path == "fused", 0
        )
        print(json.dumps({"search": result}))


if __name__ == "__main__":
    main()
