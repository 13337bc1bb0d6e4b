"""Time ModelTuningEnv steps on the default task, per action kind.

Usage:
    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=python python bench/bench_env_step.py \
        [--threads 2] [--repeats 3] [--json OUT]

Each repeat resets the default environment (``ModelTuningEnv()``: about
1,500 training compositions of mp-formation-energy, one epoch per step) and
times one step of every action kind, interleaved so that load changes on
a shared machine hit all actions alike. One untimed warm-up repeat first
pays the one-time costs (imports of scikit-learn's estimators, first
kernel calls), which it reports separately. Prints the median seconds per
action and over all steps, and the median reset time.
"""

import argparse
import json
import platform
import statistics
import time

import torch

from dvmrl import set_num_threads
from dvmrl.cli._common import (
    check_bench_compute,
    output_file_problem,
    positive_int,
)
from dvmrl.env import ACTION_INDEX, ModelTuningEnv

# One representative per kind; "stop" trains nothing and is not timed.
TIMED = [
    "continue",
    "validate-random",
    "validate-gp-uncertainty",
    "validate-ensemble-variance",
    "validate-adversarial",
    "lr-half",
    "batch-half",
    "dropout-up",
    "add-layer",
    "widen",
    "remove-layer",
    "narrow",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=positive_int, default=2, help="dvmrl CPU threads; default: 2"
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=3,
        help="episodes timed (one reset and one step of each action); default: 3",
    )
    parser.add_argument(
        "--json", default=None, help="write the timings to this JSON file"
    )
    args = parser.parse_args()
    check_bench_compute(parser, args)
    if args.json:
        problem = output_file_problem(args.json)
        if problem:
            parser.error(f"--json {problem}")
    set_num_threads(args.threads)

    start = time.perf_counter()
    env = ModelTuningEnv(budget_epochs=len(TIMED) + 1)
    construct = time.perf_counter() - start
    start = time.perf_counter()
    env.reset(seed=1000)
    for name in TIMED:
        env.step(ACTION_INDEX[name])
    warmup = time.perf_counter() - start
    resets = []
    per_action = {name: [] for name in TIMED}
    for repeat in range(args.repeats):
        start = time.perf_counter()
        env.reset(seed=repeat)
        resets.append(time.perf_counter() - start)
        for name in TIMED:
            start = time.perf_counter()
            env.step(ACTION_INDEX[name])
            per_action[name].append(time.perf_counter() - start)

    every = [t for times in per_action.values() for t in times]
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
        "torch": torch.__version__,
        "construct_s": round(construct, 3),
        "warmup_episode_s": round(warmup, 3),
        "reset_median_s": round(statistics.median(resets), 3),
        "step_median_s": round(statistics.median(every), 3),
        "step_max_s": round(max(every), 3),
        "per_action_median_s": {
            name: round(statistics.median(times), 3) for name, times in per_action.items()
        },
        "repeats": args.repeats,
    }
    print(
        f"construct {result['construct_s']:.2f} s, warm-up reset + {len(TIMED)} steps "
        f"{warmup:.2f} s, reset median {result['reset_median_s']:.2f} s"
    )
    for name, value in result["per_action_median_s"].items():
        print(f"  {name:<28} {value:.3f} s")
    print(f"step median {result['step_median_s']:.3f} s, max {result['step_max_s']:.3f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
