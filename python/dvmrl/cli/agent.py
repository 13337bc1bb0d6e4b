"""``dvmrl agent train`` and ``dvmrl agent evaluate``: meta-train and run the DQN agent."""

from __future__ import annotations

import argparse
import contextlib
import math
import shlex
import sys
from pathlib import Path

from dvmrl.cli._common import (
    UsageError,
    add_compute_options,
    check_output_file,
    path_text,
    plural,
    positive_int,
    seed_int,
    setup_compute,
)

# Smallest --train-size of ``agent evaluate``: one minibatch of the
# environment's default batch size (dvmrl.env.DEFAULT_TRAIN["batch_size"]).
MIN_TRAIN_SIZE = 64


def add_parser(subparsers) -> None:
    """Register ``dvmrl agent`` with its ``train`` and ``evaluate`` subcommands."""
    parser = subparsers.add_parser(
        "agent",
        help="meta-train the DQN agent or run it on the evaluation data set",
        description=(
            "Meta-train the dueling double DQN agent over model-tuning tasks "
            "(oqmd-formation-energy, mp-energy-above-hull, their chemical "
            "families, several training-pool sizes), or run a trained agent on "
            "mp-formation-energy, which meta-training never uses."
        ),
    )
    actions = parser.add_subparsers(dest="agent_command", metavar="ACTION")
    actions.required = True

    train = actions.add_parser(
        "train",
        help="meta-train an agent across tasks",
        description=(
            "Train one agent across tasks drawn at random. A task reads "
            "DATASET[/FAMILY][@SIZE], e.g. oqmd-formation-energy/rare-earth@1000; "
            "families: transition-metal, rare-earth, alkali-alkaline-earth. SIZE "
            "caps the training compositions of an episode; a task with fewer uses "
            "all it has. The "
            "agent, its replay buffer (.buffer.npz) and the history "
            "(.progress.json) are written atomically every --checkpoint-every "
            "episodes; an empty .lock file beside them keeps a second "
            "meta-training off the same --out."
        ),
    )
    train.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        metavar="TASK",
        help="tasks to train on; default: both data sets x (all, 3 families) x sizes 500, 1000, 1500",
    )
    train.add_argument("--episodes", type=positive_int, required=True, help="total episodes")
    train.add_argument(
        "--out",
        type=path_text,
        required=True,
        help="agent file to write, such as agent.pt (not a folder); the replay buffer "
        "and progress files are written next to it",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run saved at --out with its stored --tasks, --seed "
        "and --budget-epochs (given ones must match them); raise --episodes to "
        "train longer",
    )
    # A checkpoint took about 9 ms against 1.2 s per episode (6 episodes of
    # 3 default tasks, 2-core Intel Xeon VM), so the default saves after
    # every episode and Ctrl-C loses at most the one in progress.
    train.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=1,
        help="episodes between checkpoints; Ctrl-C loses the episodes since the "
        "last one; default: 1",
    )
    train.add_argument(
        "--seed",
        type=seed_int,
        default=None,
        help="seed of tasks, splits and agent (an integer >= 0); default: 0",
    )
    train.add_argument(
        "--budget-epochs",
        type=positive_int,
        default=None,
        help="training epochs per episode; default: the environment's (24)",
    )
    train.add_argument(
        "--curve",
        type=path_text,
        default=None,
        metavar="PATH",
        help="also write the learning curve to this image file, in the format "
        "its suffix names (.png, .pdf, .svg and the other matplotlib formats; "
        "PNG without a suffix)",
    )
    train.add_argument(
        "--no-progress",
        action="store_true",
        help="hide the progress bar (it is hidden anyway when stderr is not a "
        "terminal)",
    )
    add_compute_options(train)
    train.set_defaults(func=run_train)

    evaluate = actions.add_parser(
        "evaluate",
        help="run a trained agent on mp-formation-energy and print its trajectory",
        description=(
            "Run the agent greedily on mp-formation-energy (never used in "
            "meta-training) and print each step: action, validation strategy, "
            "reward, reward accuracy (fraction), vulnerability (eV/atom) and "
            "validation RMSE (eV/atom) on that step's validation set."
        ),
    )
    evaluate.add_argument(
        "--agent", default=None, help="agent file; default: the pretrained agent shipped with dvmrl"
    )
    evaluate.add_argument("--episodes", type=positive_int, default=1, help="episodes to run; default: 1")
    evaluate.add_argument(
        "--seed",
        type=seed_int,
        default=0,
        help="seed of the first episode (an integer >= 0); default: 0",
    )
    evaluate.add_argument(
        "--train-size",
        type=positive_int,
        default=1500,
        help=f"training compositions of the task, >= {MIN_TRAIN_SIZE}; default: 1500",
    )
    evaluate.add_argument(
        "--budget-epochs",
        type=positive_int,
        default=None,
        help="training epochs per episode; default: the environment's (24)",
    )
    add_compute_options(evaluate)
    evaluate.set_defaults(func=run_evaluate)


def run_train(args: argparse.Namespace) -> int:
    """Meta-train an agent and print where it was written."""
    from dvmrl._files import FolderLock
    from dvmrl.meta import (
        meta_train,
        parse_task,
        plot_learning_curve,
        saved_history,
        saved_settings,
        state_paths,
    )
    from dvmrl.plotting import check_image_path

    if args.curve:
        # Meta-training can take hours, so a bad suffix fails before it starts.
        try:
            check_image_path(args.curve)
        except ValueError as err:
            raise UsageError(f"--curve: {err}") from err
    # The agent and its progress files are written after the first
    # episodes, so an unwritable path fails now and not after the training.
    check_output_file(Path(args.out), "--out", example="agent.pt")
    if args.curve:
        check_output_file(Path(args.curve), "--curve", example="curve.png")
        # The curve is drawn after the last save, so it would replace the
        # agent or one of its progress files.
        curve = Path(args.curve).resolve()
        for kind, path in state_paths(Path(args.out)).items():
            if path.resolve() == curve:
                target = "--out" if kind == "agent" else f"the {kind} file of --out"
                raise UsageError(
                    f"--curve {args.curve} is the same file as {target} ({path}), "
                    "which the image would replace; pass another --curve path"
                )
    device = setup_compute(args)
    if args.resume:
        # As with dvmrl run --resume, the saved run's settings fill the
        # options that are not given.
        saved = saved_settings(args.out)
        if args.tasks is None and isinstance(saved.get("tasks"), list):
            args.tasks = [str(name) for name in saved["tasks"]]
        if args.seed is None and isinstance(saved.get("seed"), int):
            args.seed = saved["seed"]
        if args.budget_epochs is None and isinstance(saved.get("budget_epochs"), int):
            args.budget_epochs = saved["budget_epochs"]
    if args.seed is None:
        args.seed = 0
    tasks = None if args.tasks is None else [parse_task(text) for text in args.tasks]
    env_options = {"device": str(device)}
    if args.budget_epochs is not None:
        env_options["budget_epochs"] = args.budget_epochs
    command = "dvmrl " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else None
    # A second meta-training on the same --out would overwrite these files.
    # A folder given as --out is left to meta_train's error.
    out = Path(args.out)
    lock = contextlib.nullcontext()
    if not out.is_dir():
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = FolderLock(state_paths(out)["lock"], reported_path=out, lock_file=True)
    with lock:
        before = len(saved_history(out)) if args.resume and out.is_file() else 0
        result = meta_train(
            tasks,
            args.episodes,
            args.out,
            resume=args.resume,
            checkpoint_every=args.checkpoint_every,
            seed=args.seed,
            env_options=env_options,
            progress=not args.no_progress and sys.stderr.isatty(),
            command=command,
        )
    if args.curve:
        plot_learning_curve(result.history, args.curve)
    if args.resume and len(result.history) == before:
        # Interrupted after its last checkpoint, such as while the curve was
        # drawn: nothing was left to train, and the curve is now written.
        episodes = plural(before, "episode")
        curve = f"; wrote the learning curve to {args.curve}" if args.curve else ""
        print(f"the run at {out} is complete with {episodes}{curve}")
        return 0
    returns = [row["return"] for row in result.history]
    tail = returns[-10:]
    last = "the episode" if len(tail) == 1 else f"the last {len(tail)} episodes"
    print(
        f"wrote {args.out}: {plural(len(returns), 'episode')}, "
        f"{result.agent.env_steps} steps, "
        f"{result.wall_time_s:.0f} s; mean return of {last} "
        f"{sum(tail) / len(tail):.4f}"
    )
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """Run the agent on mp-formation-energy and print the trajectories."""
    from dvmrl.agent import DQNAgent, load_pretrained, run_episode
    from dvmrl.env import ModelTuningEnv
    from dvmrl.meta import EVALUATION_DATASET

    if args.train_size < MIN_TRAIN_SIZE:
        raise ValueError(
            f"--train-size {args.train_size} is too small to train on: pass at least "
            f"{MIN_TRAIN_SIZE} compositions (one minibatch of the default batch size); "
            "meta-training uses 500 to 1500"
        )
    device = setup_compute(args)
    agent = load_pretrained() if args.agent is None else DQNAgent.load(args.agent)
    options = {"train_size": args.train_size, "device": str(device)}
    if args.budget_epochs is not None:
        options["budget_epochs"] = args.budget_epochs
    env = ModelTuningEnv(EVALUATION_DATASET, **options)
    if env.observation_space.shape[0] != agent.obs_dim or env.action_space.n != agent.n_actions:
        raise ValueError(
            f"the agent expects {agent.obs_dim} observations and {agent.n_actions} actions, "
            f"the environment has {env.observation_space.shape[0]} and {env.action_space.n}; "
            "retrain the agent with this dvmrl version"
        )
    available = len(env.train_formulas)
    if args.train_size > available:
        print(
            f"dvmrl agent evaluate: warning: --train-size {args.train_size} exceeds "
            f"the {available} compositions of the training part of "
            f"{EVALUATION_DATASET}, so the episodes train on all {available}",
            file=sys.stderr,
        )
    for episode in range(args.episodes):
        result = run_episode(agent, env, learn=False, seed=args.seed + episode)
        print(f"episode {episode + 1} on {EVALUATION_DATASET} (seed {args.seed + episode})")
        _print_legend(env)
        _print_trajectory(result.trajectory)
        _print_footer(result)
    return 0


def _print_legend(env) -> None:
    """Print the sets each column is measured on and the reward formula."""
    print(
        f"training pool: {len(env.train_formulas)} compositions; validation pool: "
        f"{len(env.pool_formulas)} compositions"
    )
    print(
        f"reward = {env.w_accuracy:g} * (change in accuracy) + "
        f"{env.w_vulnerability:g} * (decrease in vulnerability)"
    )
    print(
        f"accuracy: fraction within {env.tolerance:g} eV/atom on a fixed "
        f"{len(env.reward_index)}-composition subsample of the validation pool"
    )
    print(
        "vulnerability: mean largest prediction change (eV/atom) on a fixed "
        f"{len(env.probe_index)}-composition probe set of the validation pool"
    )
    print(
        f"val_rmse: eV/atom on the validation set in use at that step ({env.val_size} "
        "compositions the strategy draws from the pool), not part of the reward"
    )
    print(
        "each validate-* action draws a new validation set, so val_rmse values on "
        "either side of one measure different sets"
    )


def _print_trajectory(trajectory: list[dict]) -> None:
    print(
        f"{'step':>4}  {'action':<26} {'strategy':<18} {'reward':>9} {'accuracy':>9} "
        f"{'vulnerability':>13} {'val_rmse':>9}"
    )
    for row in trajectory:
        print(
            f"{row['step']:>4}  {row['action_name']:<26} {row['strategy']:<18} "
            f"{row['reward']:>9.4f} {row['reward_accuracy']:>9.4f} "
            f"{row['vulnerability']:>13.4f} {row['val_rmse']:>9.4f}"
        )


def _print_footer(result) -> None:
    """Print the return, the lowest val_rmse in the table and the kept checkpoint's."""
    if result.trajectory and result.trajectory[-1].get("diverged"):
        end = "diverged training (the last row's model predicts NaN)"
    else:
        end = "stop" if result.terminated else "budget spent"
    print(f"return {result.total_return:.4f}, ended by {end}")
    scored = [row for row in result.trajectory if math.isfinite(row["val_rmse"])]
    lowest = min(scored, key=lambda row: row["val_rmse"], default=None)
    if lowest is not None:
        print(
            f"lowest val_rmse in the table: {lowest['val_rmse']:.4f} eV/atom at step "
            f"{lowest['step']}, on that step's {lowest['strategy']} validation set"
        )
    if result.best_val_rmse is not None:
        strategy = result.trajectory[-1]["strategy"] if result.trajectory else "random"
        print(
            f"kept checkpoint: val_rmse {result.best_val_rmse:.4f} eV/atom "
            f"on the final {strategy} validation set"
        )
        print(
            "(the environment keeps the state with the lowest val_rmse and re-scores "
            "it whenever the strategy draws a new validation set)"
        )
