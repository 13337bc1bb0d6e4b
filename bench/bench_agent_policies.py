"""Compare the pretrained agent with fixed policies on mp-formation-energy.

Usage:
    OMP_WAIT_POLICY=PASSIVE PYTHONPATH=python python bench/bench_agent_policies.py \
        [--agent PATH] [--seeds 5] [--threads 2]

Policies, each run on the same episode seeds of ``ModelTuningEnv(
"mp-formation-energy")`` (never seen in meta-training):

- agent: the agent, greedy (the shipped one unless --agent is given);
- continue: always ``continue`` (train with the default settings);
- random: uniform over the unmasked actions.

Prints per policy the median episode return, best validation RMSE
(eV/atom), final reward-set accuracy (fraction) and final vulnerability
(eV/atom).
"""

import argparse
import statistics

import numpy as np

from dvmrl import set_num_threads
from dvmrl.agent import AgentFileError, DQNAgent, load_pretrained, run_episode
from dvmrl.cli._common import check_bench_compute, positive_int
from dvmrl.env import ACTION_INDEX, ModelTuningEnv


class FixedPolicy:
    """Duck-typed agent: always the same action, or uniform over the valid ones."""

    def __init__(self, action=None, seed=0):
        self.action = action
        self.rng = np.random.default_rng(seed)

    def act(self, obs, mask, explore=False):
        if self.action is not None:
            return self.action
        return int(self.rng.choice(np.flatnonzero(mask)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--agent", default=None, help="agent file to compare; default: the shipped one"
    )
    parser.add_argument(
        "--seeds",
        type=positive_int,
        default=5,
        help="episode seeds per policy; default: 5",
    )
    parser.add_argument(
        "--threads", type=positive_int, default=2, help="dvmrl CPU threads; default: 2"
    )
    args = parser.parse_args()
    check_bench_compute(parser, args)
    set_num_threads(args.threads)

    try:
        agent = load_pretrained() if args.agent is None else DQNAgent.load(args.agent)
    except (OSError, AgentFileError) as err:
        parser.error(f"--agent: {err}")
    env = ModelTuningEnv("mp-formation-energy")
    policies = {
        "agent": agent,
        "continue": FixedPolicy(ACTION_INDEX["continue"]),
        "random": FixedPolicy(None, seed=1),
    }
    rows = {name: [] for name in policies}
    for seed in range(args.seeds):
        # Interleave the policies per seed so that load changes hit all alike.
        for name, policy in policies.items():
            result = run_episode(policy, env, learn=False, seed=seed)
            last = result.trajectory[-1]
            rows[name].append(
                (result.total_return, result.best_val_rmse, last["reward_accuracy"],
                 last["vulnerability"], len(result.trajectory))
            )
            if name == "agent":
                actions = [row["action_name"] for row in result.trajectory]
                print(f"seed {seed} agent actions: {' '.join(actions)}")
    print(f"{'policy':<10} {'return':>8} {'best_rmse':>10} {'accuracy':>9} {'vuln':>8} {'steps':>6}")
    for name, values in rows.items():
        medians = [statistics.median(column) for column in zip(*values, strict=True)]
        print(
            f"{name:<10} {medians[0]:>8.4f} {medians[1]:>10.4f} {medians[2]:>9.3f} "
            f"{medians[3]:>8.4f} {medians[4]:>6.0f}"
        )


if __name__ == "__main__":
    main()
