"""Meta-training of the DQN agent over a distribution of model-tuning tasks.

A task is a data set, an optional chemical family subset and a training-pool
size; each builds one :class:`dvmrl.env.ModelTuningEnv`. The task
distribution covers ``oqmd-formation-energy`` and ``mp-energy-above-hull``
only: ``mp-formation-energy`` is the data set the agent is judged on, so
:func:`parse_task` and :func:`meta_train` reject it.

:func:`meta_train` runs episodes on tasks drawn uniformly at random, with a
progress bar and periodic atomic checkpoints, and can resume from them.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dvmrl._files import json_ready, write_text_atomic
from dvmrl.agent import AgentConfig, AgentFileError, DQNAgent, run_episode

logger = logging.getLogger(__name__)

TASK_DATASETS = ("oqmd-formation-energy", "mp-energy-above-hull")
TASK_FAMILIES = ("transition-metal", "rare-earth", "alkali-alkaline-earth")
TASK_TRAIN_SIZES = (500, 1000, 1500)
EVALUATION_DATASET = "mp-formation-energy"

# Agent settings for meta-training: episodes last up to 24 steps, and the
# shipped agent saw 400 episodes (7,459 steps), so exploration decays over
# the first 40 % of its run (3,000 steps).
META_AGENT_CONFIG = {
    "hidden": (128, 128),
    "stream_hidden": 64,
    "gamma": 0.9,
    "lr": 5e-4,
    "batch_size": 64,
    "buffer_capacity": 50_000,
    "learning_starts": 128,
    "train_every": 1,
    "gradient_steps": 2,
    "target_update": "polyak",
    "tau": 0.01,
    "epsilon_start": 1.0,
    "epsilon_end": 0.1,
    "epsilon_decay_steps": 3000,
}


@dataclass(frozen=True)
class Task:
    """One meta-training task: data set, optional chemical family and training-pool size."""

    dataset: str
    family: str | None = None
    train_size: int = 1500

    @property
    def name(self) -> str:
        """Task name in the ``DATASET[/FAMILY]@SIZE`` form that :func:`parse_task` reads."""
        family = f"/{self.family}" if self.family else ""
        return f"{self.dataset}{family}@{self.train_size}"


def parse_task(text: str) -> Task:
    """Read a task name ``DATASET[/FAMILY][@SIZE]``, for instance ``oqmd-formation-energy/rare-earth@1000``.

    Raises:
        ValueError: for an unknown data set or family, a bad size, or the
            evaluation data set ``mp-formation-energy``.
    """
    body, _, size_text = text.partition("@")
    dataset, _, family = body.partition("/")
    if dataset == EVALUATION_DATASET:
        raise ValueError(
            f"{EVALUATION_DATASET} is the evaluation data set and is excluded from "
            f"meta-training; use one of {TASK_DATASETS}"
        )
    if dataset not in TASK_DATASETS:
        raise ValueError(f"unknown task data set {dataset!r} in {text!r}: expected one of {TASK_DATASETS}")
    if family and family not in TASK_FAMILIES:
        raise ValueError(f"unknown chemical family {family!r} in {text!r}: expected one of {TASK_FAMILIES}")
    size = 1500
    if size_text:
        try:
            size = int(size_text)
        except ValueError:
            raise ValueError(f"task size in {text!r} must be an integer, got {size_text!r}") from None
        if size < 50:
            raise ValueError(f"task size in {text!r} must be >= 50 compositions, got {size}")
    return Task(dataset, family or None, size)


def default_tasks() -> list[Task]:
    """Return every combination of the task data sets, families (and none) and sizes."""
    return [
        Task(dataset, family, size)
        for dataset in TASK_DATASETS
        for family in (None, *TASK_FAMILIES)
        for size in TASK_TRAIN_SIZES
    ]


def make_task_env(task: Task, seed: int = 0, **env_options):
    """Build the :class:`~dvmrl.env.ModelTuningEnv` of ``task`` on a random split.

    Args:
        task: the task.
        seed: seed of the split's train / validation division and of the
            environment's subsamples.
        **env_options: further ``ModelTuningEnv`` arguments.
    """
    from dvmrl import datasets
    from dvmrl.env import ModelTuningEnv
    from dvmrl.splits import make_split

    if task.dataset == EVALUATION_DATASET:
        raise ValueError(f"{EVALUATION_DATASET} is excluded from meta-training tasks")
    df = datasets.load(task.dataset)
    if task.family:
        df = datasets.family_subset(df, task.family)
    split = make_split(df, "random", seed)
    threshold = float(datasets.dataset_info(task.dataset)["stability_threshold"])
    # Small family subsets have small validation parts: the validation sets
    # then take three quarters of the pool, and the reward set all of it.
    pool = len(split.val)
    options = {
        "val_size": min(200, max(1, pool * 3 // 4)),
        "reward_size": min(400, pool),
        **env_options,
    }
    return ModelTuningEnv(
        df,
        split,
        train_size=task.train_size,
        stability_threshold=threshold,
        seed=seed,
        **options,
    )


@dataclass
class MetaTrainResult:
    """Outcome of :func:`meta_train`: the agent and one history row per episode."""

    agent: DQNAgent
    history: list[dict[str, Any]]
    wall_time_s: float
    metadata: dict[str, Any] = field(default_factory=dict)


def state_paths(out: str | os.PathLike) -> dict[str, Path]:
    """Return the files of a meta-training run: agent, replay buffer, progress JSON."""
    out = Path(out)
    return {
        "agent": out,
        "buffer": out.with_name(out.stem + ".buffer.npz"),
        "progress": out.with_name(out.stem + ".progress.json"),
        # Empty; its flock() keeps a second meta-training off these files.
        "lock": out.with_name(out.stem + ".lock"),
    }


def _staged_paths(paths: dict[str, Path], episodes: int) -> dict[str, Path]:
    """Return where a checkpoint after ``episodes`` episodes writes agent and buffer."""
    return {
        key: paths[key].with_name(f"{paths[key].name}.staged-{episodes}")
        for key in ("agent", "buffer")
    }


def _settle_checkpoint(paths: dict[str, Path]) -> None:
    """Finish or undo a checkpoint that an interruption left half written.

    Staged files of the episode count that the progress file records were
    committed, so they replace the agent and buffer files. Any other staged
    files belong to a checkpoint whose progress file was never written, so
    they are removed. The files beside them still contain the committed
    episode.
    """
    if not paths["agent"].parent.is_dir():
        return
    leftovers = {
        key: [
            entry
            for entry in paths[key].parent.iterdir()
            if entry.name.startswith(paths[key].name + ".staged-")
        ]
        for key in ("agent", "buffer")
    }
    if not any(leftovers.values()):
        return
    committed = None
    if paths["progress"].is_file():
        history = _read_progress(paths["progress"])["history"]
        committed = _staged_paths(paths, len(history))
    for key, staged_files in leftovers.items():
        for staged in staged_files:
            if committed is not None and staged == committed[key]:
                logger.info("completing the checkpoint in %s", staged)
                os.replace(staged, paths[key])
            else:
                logger.info("removing %s of an unfinished checkpoint", staged)
                staged.unlink()


def machine_description() -> str:
    """Describe this machine: CPU model, core count and platform."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    return f"{cpu}, {cores} cores, {platform.system()} {platform.release()}"


def meta_train(
    tasks: Sequence[Task] | None,
    episodes: int,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    checkpoint_every: int = 1,
    seed: int = 0,
    agent_config: dict[str, Any] | None = None,
    env_options: dict[str, Any] | None = None,
    progress: bool = True,
    command: str | None = None,
    on_episode: Callable[[dict[str, Any]], None] | None = None,
) -> MetaTrainResult:
    """Train one agent over episodes of tasks drawn uniformly from ``tasks``.

    The agent, its replay buffer and the per-episode history are written
    atomically every ``checkpoint_every`` episodes and at the end, to
    ``out`` and the sibling files of :func:`state_paths`. With ``resume``
    the run continues from those files up to ``episodes`` episodes in total.

    Args:
        tasks: the task distribution; None means :func:`default_tasks`.
        episodes: total number of episodes (including resumed ones).
        out: agent file to write.
        resume: continue from the files at ``out``.
        checkpoint_every: episodes between checkpoints.
        seed: seed of the task draws, the splits and the agent.
        agent_config: overrides of :data:`META_AGENT_CONFIG`.
        env_options: extra ``ModelTuningEnv`` arguments for every task.
        progress: show a tqdm progress bar on stderr.
        command: the command line, stored in the agent's metadata.
        on_episode: called with each history row.

    Raises:
        ValueError: for an empty task list, a task on the evaluation data
            set, or ``episodes`` < 1; with ``resume``, when the saved run has
            other tasks, seed, environment options or agent settings, or
            more than ``episodes`` episodes. A resumed run that already has
            ``episodes`` episodes returns at once, without training.
        FileNotFoundError: with ``resume`` when there is nothing to resume.
        FileExistsError: without ``resume`` when ``out`` already exists.
        IsADirectoryError: when ``out`` is a folder.
        dvmrl.agent.AgentFileError: with ``resume``, when a saved file is
            invalid.
        dvmrl.agent.DivergenceError: when the Q-values diverge; the last
            checkpoint stays on disk.
    """
    from tqdm import tqdm

    tasks = list(default_tasks() if tasks is None else tasks)
    if not tasks:
        raise ValueError("the task list is empty: pass at least one task, or None for the defaults")
    for task in tasks:
        if task.dataset == EVALUATION_DATASET:
            raise ValueError(f"{EVALUATION_DATASET} is excluded from meta-training tasks")
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    paths = state_paths(out)
    if paths["agent"].is_dir():
        raise IsADirectoryError(
            f"--out {paths['agent']} is a folder, but --out must be a file path "
            f"such as {paths['agent'] / 'agent.pt'}"
        )
    options = dict(env_options or {})
    history: list[dict[str, Any]] = []
    elapsed_before = 0.0
    envs: dict[Task, Any] = {}
    _settle_checkpoint(paths)
    if resume:
        if not paths["agent"].is_file() or not paths["progress"].is_file():
            raise FileNotFoundError(
                f"nothing to resume at {paths['agent']}: the agent file or "
                f"{paths['progress'].name} is missing; run without --resume"
            )
        saved = _read_progress(paths["progress"])
        agent = DQNAgent.load(paths["agent"])
        if agent.episodes != len(saved["history"]):
            raise ValueError(
                f"cannot resume {paths['agent']}: it contains an agent trained for "
                f"{agent.episodes} episodes, but {paths['progress'].name} records "
                f"{len(saved['history'])}, so the two files come from different "
                "runs (agent files whose names differ only in the suffix share "
                "the progress and buffer files); restore the files of one run, "
                "or choose another --out to start a new run"
            )
        differences = _resume_differences(saved, tasks, seed, options)
        differences += _agent_config_differences(agent.config, agent_config or {})
        if differences:
            raise ValueError(
                f"cannot resume {paths['agent']}: it was trained with other settings "
                f"({'; '.join(differences)}); resume with the stored settings, or "
                "choose another --out to start a new run"
            )
        history = saved["history"]
        if len(history) > episodes:
            raise ValueError(
                f"the run at {paths['agent']} already has {len(history)} episodes, "
                f"more than --episodes {episodes}; pass --episodes {len(history)} "
                "or more"
            )
        if len(history) == episodes:
            # Complete (an interrupt can come after the last checkpoint, such
            # as while the curve is drawn): nothing is left to train.
            return MetaTrainResult(
                agent=agent,
                history=history,
                wall_time_s=float(saved.get("wall_time_s", 0.0)),
                metadata=dict(agent.metadata),
            )
        probe = make_task_env(tasks[0], seed=seed, **options)
        envs[tasks[0]] = probe
        n_obs, n_actions = probe.observation_space.shape[0], int(probe.action_space.n)
        if (agent.obs_dim, agent.n_actions) != (n_obs, n_actions):
            raise ValueError(
                f"cannot resume {paths['agent']}: its agent expects {agent.obs_dim} "
                f"observations and {agent.n_actions} actions, but the environment "
                f"of this dvmrl version has {n_obs} and {n_actions}; choose "
                "another --out to start a new run"
            )
        agent.load_buffer(paths["buffer"])
        elapsed_before = float(saved.get("wall_time_s", 0.0))
        commands = list(saved.get("commands") or [saved.get("command")])
        rng = np.random.default_rng(seed)
        rng.bit_generator.state = saved["rng_state"]
        logger.info(
            "resuming meta-training after episode %d, up to episode %d",
            len(history),
            episodes,
        )
    else:
        if paths["agent"].exists():
            raise FileExistsError(
                f"{paths['agent']} already exists; pass --resume to continue it or "
                "choose another --out"
            )
        for key in ("progress", "buffer"):
            if paths[key].exists():
                raise FileExistsError(
                    f"{paths[key]} already exists and belongs to another run whose "
                    f"agent file is named {paths['agent'].stem}.* (the progress and "
                    "buffer files are named after the agent file without its "
                    "suffix); resume that run with --resume, or choose an --out "
                    "with another name"
                )
        rng = np.random.default_rng(seed)
        agent = None
        commands = []
    commands.append(command)

    def env_of(task: Task):
        if task not in envs:
            envs[task] = make_task_env(task, seed=seed, **options)
        return envs[task]

    if agent is None:
        probe = env_of(tasks[0])
        config = AgentConfig(**{**META_AGENT_CONFIG, **(agent_config or {}), "seed": seed})
        agent = DQNAgent(probe.observation_space.shape[0], probe.action_space.n, config)

    start = time.perf_counter()

    def metadata() -> dict[str, Any]:
        return {
            "episodes": len(history),
            "env_steps": agent.env_steps,
            "wall_time_s": round(elapsed_before + time.perf_counter() - start, 1),
            "machine": machine_description(),
            # The command that started the run; resumed runs add theirs to "commands".
            "command": commands[0],
            "commands": commands,
            "tasks": [task.name for task in tasks],
            "seed": seed,
            "env_options": options,
        }

    # Episodes in the files on disk; None until a checkpoint of a new run.
    saved_episodes = len(history) if resume else None

    def checkpoint() -> None:
        # The progress file commits a checkpoint: the agent and buffer go to
        # staged files first and replace the old ones only after it, so an
        # interruption at any point leaves three files of one episode (see
        # _settle_checkpoint).
        nonlocal saved_episodes
        meta = metadata()
        staged = _staged_paths(paths, len(history))
        agent.save(staged["agent"], metadata=meta, buffer_path=staged["buffer"])
        document = {
            **meta,
            "history": history,
            "rng_state": rng.bit_generator.state,
        }
        text = json.dumps(document, indent=1)
        write_text_atomic(paths["progress"], text)
        saved_episodes = len(history)
        for key in ("agent", "buffer"):
            os.replace(staged[key], paths[key])

    bar = tqdm(
        total=episodes,
        initial=len(history),
        disable=not progress,
        desc="meta-training",
        unit="episode",
    )
    try:
        while len(history) < episodes:
            task = tasks[int(rng.integers(len(tasks)))]
            env = env_of(task)
            episode_seed = int(rng.integers(2**31 - 1))
            episode_start = time.perf_counter()
            result = run_episode(agent, env, learn=True, seed=episode_seed)
            last = result.trajectory[-1] if result.trajectory else {}
            row = {
                "episode": len(history) + 1,
                "task": task.name,
                "return": round(result.total_return, 6),
                "steps": len(result.trajectory),
                "terminated": result.terminated,
                "best_val_rmse": result.best_val_rmse,
                # None after diverged training, whose scores are NaN.
                "final_val_rmse": json_ready(last.get("val_rmse")),
                "final_vulnerability": json_ready(last.get("vulnerability")),
                "epsilon": round(agent.epsilon, 4),
                "td_loss": None if agent.last_update is None else agent.last_update.td_loss,
                "mean_q": None if agent.last_update is None else agent.last_update.mean_q,
                "seconds": round(time.perf_counter() - episode_start, 2),
            }
            history.append(row)
            logger.info(
                "meta/episode=%d meta/task=%s agent/episode_return=%.4f agent/epsilon=%.3f "
                "agent/td_loss=%s agent/mean_q=%s",
                row["episode"],
                task.name,
                row["return"],
                row["epsilon"],
                row["td_loss"],
                row["mean_q"],
            )
            if on_episode is not None:
                on_episode(row)
            bar.update(1)
            bar.set_postfix(ret=f"{row['return']:.3f}", eps=f"{row['epsilon']:.2f}")
            if len(history) % checkpoint_every == 0:
                checkpoint()
        checkpoint()
    except KeyboardInterrupt:
        # A checkpoint cut short leaves staged files: commit them when the
        # progress file already records them, else remove them, so the
        # agent and buffer files contain the episode the message names.
        _settle_checkpoint(paths)
        _log_interrupt(paths, saved_episodes, episodes)
        raise
    finally:
        bar.close()
    wall = elapsed_before + time.perf_counter() - start
    return MetaTrainResult(agent=agent, history=history, wall_time_s=wall, metadata=metadata())


# Environment options that change where episodes run, not what they are, so
# a resumed run may change them.
_PLACEMENT_ENV_OPTIONS = ("device",)
# Environment options that ``dvmrl agent train`` sets from its own options.
_CLI_ENV_OPTIONS = ("budget_epochs",)


def saved_settings(out: str | Path) -> dict[str, Any]:
    """Return the settings that decide the episodes of the run saved at ``out``.

    The keys are those the progress file records: ``tasks`` (task names),
    ``seed`` and ``budget_epochs``. A missing progress file gives an empty
    dict, so that :func:`meta_train` reports what is missing.

    Raises:
        AgentFileError: when the progress file is unreadable.
    """
    path = state_paths(out)["progress"]
    if not path.is_file():
        return {}
    saved = _read_progress(path)
    settings = {key: saved[key] for key in ("tasks", "seed") if key in saved}
    env_options = saved.get("env_options")
    if isinstance(env_options, dict) and "budget_epochs" in env_options:
        settings["budget_epochs"] = env_options["budget_epochs"]
    return settings


def saved_history(out: str | Path) -> list[dict[str, Any]]:
    """Return the episode history of the run saved at ``out`` ([] without one).

    Raises:
        AgentFileError: when the progress file is unreadable.
    """
    path = state_paths(out)["progress"]
    return _read_progress(path)["history"] if path.is_file() else []


def _read_progress(path: Path) -> dict[str, Any]:
    """Read a progress JSON file of :func:`meta_train`.

    Raises:
        AgentFileError: when the file is not valid JSON or lacks the history
            or the random state.
    """
    try:
        saved = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise AgentFileError(
            f"invalid progress file {path}: {err}; restore it from a backup, or "
            "choose another --out to start a new run"
        ) from err
    if not isinstance(saved, dict) or not isinstance(saved.get("history"), list):
        raise AgentFileError(
            f"invalid progress file {path}: it has no episode history; restore it "
            "from a backup, or choose another --out to start a new run"
        )
    if "rng_state" not in saved:
        raise AgentFileError(
            f"invalid progress file {path}: the random state of the task draws is "
            "missing; restore it from a backup, or choose another --out"
        )
    problem = _progress_problem(saved)
    if problem is not None:
        raise AgentFileError(
            f"invalid progress file {path}: {problem}; restore it from a backup, or "
            "choose another --out to start a new run"
        )
    return saved


def _progress_problem(saved: dict[str, Any]) -> str | None:
    """Return what is wrong with the fields a resume reads, or None."""
    try:
        np.random.default_rng().bit_generator.state = saved["rng_state"]
    except (TypeError, ValueError, KeyError) as err:
        return f"its random state of the task draws cannot be restored ({err})"
    for number, row in enumerate(saved["history"], start=1):
        if not isinstance(row, dict) or "return" not in row:
            return f"history row {number} has no 'return'"
        value = row["return"]
        if value is not None and (
            not isinstance(value, int | float) or isinstance(value, bool)
        ):
            return f"history row {number} has the 'return' {value!r}, not a number"
    wall = saved.get("wall_time_s", 0.0)
    if not isinstance(wall, int | float) or isinstance(wall, bool):
        return f"'wall_time_s' is {wall!r}, not a number of seconds"
    commands = saved.get("commands")
    if commands is not None and not (
        isinstance(commands, list) and all(isinstance(c, str | None) for c in commands)
    ):
        return f"'commands' is {commands!r}, not a list of command lines"
    return None


def _resume_differences(
    saved: dict[str, Any],
    tasks: Sequence[Task],
    seed: int,
    env_options: dict[str, Any],
) -> list[str]:
    """List the settings in which a saved run differs from the requested ones.

    Tasks, seed and environment options decide the episodes, so a resumed
    run must keep them. The device may change. A setting that the progress
    file lacks is not compared.

    Returns:
        One ``"OPTION: stored X, requested Y"`` entry per differing setting.
    """
    stored: dict[str, Any] = {}
    requested: dict[str, Any] = {}
    if "tasks" in saved:
        stored["--tasks"] = saved["tasks"]
        requested["--tasks"] = [task.name for task in tasks]
    if "seed" in saved:
        stored["--seed"] = saved["seed"]
        requested["--seed"] = seed
    if isinstance(saved.get("env_options"), dict):
        saved_env = _episode_env_options(saved["env_options"])
        # A JSON round trip makes tuples lists, as in the stored options.
        requested_env = json.loads(json.dumps(_episode_env_options(env_options)))
        for key in sorted(set(saved_env) | set(requested_env)):
            if key in _CLI_ENV_OPTIONS:
                label = "--" + key.replace("_", "-")
            else:
                label = f"environment option {key}"
            stored[label] = saved_env.get(key)
            requested[label] = requested_env.get(key)
    return [
        f"{label}: stored {_describe_setting(stored[label])}, requested "
        f"{_describe_setting(requested[label])}"
        for label in stored
        if stored[label] != requested[label]
    ]


def _episode_env_options(options: dict[str, Any]) -> dict[str, Any]:
    """Return the options that decide the episodes, with the CLI's defaults filled in.

    A run started without ``--budget-epochs`` stores no value, and one that
    passes the default stores it; both train the same episodes.
    """
    from dvmrl.env import ModelTuningEnv

    parameters = inspect.signature(ModelTuningEnv).parameters
    chosen = {key: parameters[key].default for key in _CLI_ENV_OPTIONS}
    chosen.update(options)
    return {
        key: value
        for key, value in chosen.items()
        if key not in _PLACEMENT_ENV_OPTIONS
    }


def _describe_setting(value: Any) -> str:
    if value is None:
        return "the default"
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        if value == [task.name for task in default_tasks()]:
            return f"the {len(value)} default tasks"
        return " ".join(value)
    return str(value)


def _agent_config_differences(
    config: AgentConfig, overrides: dict[str, Any]
) -> list[str]:
    """List the ``agent_config`` overrides that differ from a loaded agent's config."""
    stored = config.to_dict()
    requested = json.loads(json.dumps(overrides))
    return [
        f"agent_config {key}: stored {stored.get(key)}, requested {value}"
        for key, value in requested.items()
        if stored.get(key) != value
    ]


def _log_interrupt(
    paths: dict[str, Path], saved_episodes: int | None, episodes: int
) -> None:
    """Log what an interrupted :func:`meta_train` left on disk and how to go on."""
    if saved_episodes is None:
        logger.warning(
            "meta-training interrupted before its first checkpoint, so nothing was "
            "saved; rerun the command without --resume to start again"
        )
        return
    logger.warning(
        "meta-training interrupted; %s, %s and %s contain the checkpoint after "
        "episode %d of %d, and later episodes were not saved; rerun the command "
        "with --resume to continue from it (it keeps the run's --tasks, --seed "
        "and --budget-epochs)",
        paths["agent"],
        paths["buffer"].name,
        paths["progress"].name,
        saved_episodes,
        episodes,
    )


def plot_learning_curve(history: Sequence[dict[str, Any]], path: str | os.PathLike, window: int = 10) -> None:
    """Plot episode return and its moving average against the episode.

    The image format follows the suffix of ``path`` (PNG without one), and
    the file is written atomically.
    """
    from matplotlib.ticker import MaxNLocator

    from dvmrl.plotting import new_figure, save_figure

    returns = np.array([row["return"] for row in history], dtype=float)
    episodes = np.arange(1, len(returns) + 1)
    figure, axes = new_figure((6.4, 3.6), dpi=120)
    axes.plot(episodes, returns, ".", alpha=0.4, label="episode return")
    if len(returns) >= window:
        average = np.convolve(returns, np.ones(window) / window, mode="valid")
        axes.plot(episodes[window - 1 :], average, "-", label=f"moving average ({window})")
    axes.axhline(0.0, color="grey", lw=0.8)
    # Episodes are whole numbers, also on the axis of a short run, whose
    # automatic limits would hold a single integer.
    axes.set_xlim(0.5, len(returns) + 0.5)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    axes.set_xlabel("episode")
    axes.set_ylabel("return (accuracy gain + vulnerability drop)")
    axes.set_title("Meta-training of the DQN agent")
    axes.legend(loc="lower right")
    figure.tight_layout()
    save_figure(figure, path)


def export_pretrained(out: str | os.PathLike, dest: str | os.PathLike | None = None) -> Path:
    """Copy a meta-trained agent into the package and write its metadata JSON.

    Writes ``agent.pt`` (the agent without its replay buffer) and
    ``agent.json`` (episodes, steps, wall time, machine, command, tasks and
    the per-episode returns) into ``dest``, by default ``dvmrl/pretrained``.

    Returns:
        The folder written to.
    """
    from dvmrl.agent import PRETRAINED_DIR

    dest = Path(PRETRAINED_DIR if dest is None else dest)
    paths = state_paths(out)
    agent = DQNAgent.load(paths["agent"])
    progress = json.loads(paths["progress"].read_text())
    returns = [row["return"] for row in progress["history"]]
    tail = returns[-10:]
    metadata = {
        **agent.metadata,
        "obs_dim": agent.obs_dim,
        "n_actions": agent.n_actions,
        "agent_config": agent.config.to_dict(),
        "mean_return_first_10": float(np.mean(returns[:10])),
        "mean_return_last_10": float(np.mean(tail)),
        "returns": returns,
        "tasks_seen": sorted({row["task"] for row in progress["history"]}),
    }
    # The replay buffer stays behind. The networks and the optimiser state ship,
    # so training can continue from the shipped file.
    agent.save(dest / "agent.pt", metadata=agent.metadata)
    text = json.dumps(metadata, indent=1)
    write_text_atomic(dest / "agent.json", text)
    return dest
