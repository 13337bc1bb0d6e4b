"""The agent method of ``dvmrl run``: one ModelTuningEnv episode per seed.

The environment gets the same training pool, validation pool and epoch
budget as the baselines. The agent (the pretrained one shipped with dvmrl
unless a file is given) acts greedily, or epsilon-greedily while learning
online, and the method returns the checkpoint with the lowest validation
RMSE along the episode (``env.best_state()``).

A finished step is a unit of work. After every step the episode state goes
to a fresh folder ``units/agent-seed<N>/episode-<step>``, and only then
does ``state.json`` point to it. The folder stores the trainer as a
resumable checkpoint, arrays as npz, generator states and scalars as JSON,
and weight copies with ``torch.save`` of tensors only. Resuming restores
that folder into a fresh environment, so the episode continues exactly
where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

EPISODE_FORMAT = "dvmrl-agent-episode"
# Scalars and small collections stored as JSON in the episode manifest.
_JSON_TYPES = (type(None), bool, int, float, str)


class EpisodeStateError(RuntimeError):
    """An environment attribute that the episode snapshot cannot store or restore."""


# ---------------------------------------------------------------------------
# Environment construction


def start_settings(space) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return the model and training overrides the agent's episode starts from.

    The episode starts from ``START_CONFIG``, with the sizes that no method
    tunes (``BASE_MODEL``) equal to the baselines' ones.
    """
    from dvmrl.experiment import BASE_MODEL, START_CONFIG

    space.check(START_CONFIG)
    model = {
        **BASE_MODEL,
        "hidden": START_CONFIG["hidden"],
        "layers": START_CONFIG["layers"],
        "dropout": START_CONFIG["dropout"],
    }
    train = {key: START_CONFIG[key] for key in ("lr", "batch_size", "weight_decay")}
    return model, train


def make_env(experiment, seed: int):
    """Build the environment on the seed's training and validation pools."""
    from dvmrl.env import ModelTuningEnv

    preset = experiment.spec.preset
    pools = experiment.pools("random", seed)
    split = dataclasses.replace(
        pools.split, train=pools.train_index, val=pools.val_index
    )
    model, train = start_settings(experiment.spec.space)
    n_pool = len(pools.val_index)
    return ModelTuningEnv(
        experiment.df,
        split,
        train_size=None,
        val_pool_size=None,
        val_size=max(1, n_pool // 2),
        reward_size=min(400, n_pool),
        probe_size=min(32, n_pool),
        budget_epochs=preset.epochs,
        epochs_per_step=preset.agent_slice,
        model_config=model,
        train_config=train,
        stability_threshold=experiment.stability_threshold,
        seed=seed,
        device=experiment.device,
    )


def learn_online(agent) -> None:
    """Let ``agent`` update during an episode, after ``ONLINE_LEARNING_STARTS`` steps."""
    from dvmrl.experiment import ONLINE_LEARNING_STARTS

    starts = min(agent.config.learning_starts, ONLINE_LEARNING_STARTS)
    agent.config = dataclasses.replace(agent.config, learning_starts=starts)


def check_agent_fits(agent, n_obs: int, n_actions: int) -> None:
    """Raise ValueError unless ``agent`` has ``n_obs`` inputs and ``n_actions`` outputs."""
    if agent.obs_dim != n_obs or agent.n_actions != n_actions:
        raise ValueError(
            f"the agent expects {agent.obs_dim} observation entries and "
            f"{agent.n_actions} actions, but ModelTuningEnv has {n_obs} and "
            f"{n_actions}; pass an agent trained on this dvmrl version"
        )


def load_agent(path: str | None):
    """Load the agent from ``path``, or the pretrained one shipped with dvmrl."""
    from dvmrl import agent as agent_module

    if path is None:
        return agent_module.load_pretrained()
    return agent_module.DQNAgent.load(path)


# ---------------------------------------------------------------------------
# Episode snapshots


def _is_json(value: Any) -> bool:
    if isinstance(value, _JSON_TYPES):
        return not (isinstance(value, float) and not math.isfinite(value))
    if isinstance(value, (list, tuple)):
        return all(_is_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_json(v) for k, v in value.items())
    return False


def _has_tensors(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_has_tensors(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_tensors(v) for v in value)
    return False


def constructor_snapshot(env) -> dict[str, Any]:
    """Return references to the attributes of a freshly built (not yet reset) env."""
    return dict(vars(env))


def _episode_keys(env, constructor: dict[str, Any]) -> list[str]:
    """Return the names of the environment attributes that an episode may have changed.

    An attribute counts when it is new since construction, was reassigned,
    or is a mutable container (which may have changed in place).
    """
    keys = []
    for name, value in vars(env).items():
        if (
            name not in constructor
            or value is not constructor[name]
            or isinstance(value, (list, dict, set, np.ndarray))
        ):
            keys.append(name)
    return sorted(keys)


def save_episode(env, constructor: dict[str, Any], folder: Path, extra: dict) -> None:
    """Write the episode state of ``env`` (and ``extra``, JSON) into a new ``folder``.

    NOTE: the snapshot walks the environment's attributes instead of calling
    a save method of ModelTuningEnv, which has none. An attribute of a type
    it does not know raises EpisodeStateError, and the run then restarts
    that episode from its first step on resume (same seed, same result).

    Raises:
        EpisodeStateError: for an attribute of a type the snapshot cannot store.
    """
    from dvmrl.training.checkpoint import save_torch_atomic

    folder.mkdir(parents=True)
    manifest: dict[str, Any] = {"format": EPISODE_FORMAT, "entries": {}, "extra": extra}
    arrays: dict[str, np.ndarray] = {}
    tensors: dict[str, Any] = {"torch_rng": torch.get_rng_state()}
    for name in _episode_keys(env, constructor):
        value = getattr(env, name)
        entry: dict[str, Any]
        if name == "trainer":
            if value is None:
                entry = {"kind": "json", "value": None}
            else:
                value.save(folder / "trainer.pt", resume=True)
                entry = {"kind": "trainer"}
        elif isinstance(value, np.random.Generator):
            entry = {"kind": "generator", "state": value.bit_generator.state}
        elif isinstance(value, np.ndarray):
            arrays[name] = value
            entry = {"kind": "array"}
        elif isinstance(value, (np.floating, np.integer, np.bool_)):
            entry = {"kind": "json", "value": value.item()}
        elif (
            isinstance(value, list)
            and value
            and all(isinstance(v, np.ndarray) for v in value)
        ):
            for i, item in enumerate(value):
                arrays[f"{name}__{i}"] = item
            entry = {"kind": "array_list", "length": len(value)}
        elif hasattr(value, "to_dict") and hasattr(type(value), "from_dict"):
            entry = {
                "kind": "config",
                "class": f"{type(value).__module__}:{type(value).__qualname__}",
                "value": value.to_dict(),
            }
        elif _has_tensors(value):
            tensors[name] = value
            entry = {"kind": "tensors"}
        elif _is_json(value):
            entry = {"kind": "json", "value": value}
        elif isinstance(value, float):
            entry = {"kind": "float", "value": repr(value)}
        else:
            raise EpisodeStateError(
                f"ModelTuningEnv.{name} is a {type(value).__name__}, which the episode "
                "snapshot cannot store"
            )
        manifest["entries"][name] = entry
    with open(folder / "arrays.npz", "wb") as handle:
        np.savez(handle, **arrays)
    # Through a Python stream, so a full disk raises an OSError that names
    # the file (torch.save to a path raises a RuntimeError without one).
    save_torch_atomic(folder / "tensors.pt", tensors)
    (folder / "episode.json").write_text(json.dumps(manifest), encoding="utf-8")


def restore_episode(env, folder: Path) -> dict:
    """Load an episode state written by ``save_episode`` into a freshly built ``env``.

    Returns:
        dict: the ``extra`` data stored with the snapshot.
    """
    import importlib

    from dvmrl.training import Trainer

    manifest = json.loads((folder / "episode.json").read_text(encoding="utf-8"))
    if manifest.get("format") != EPISODE_FORMAT:
        raise EpisodeStateError(f"{folder} is not an agent episode snapshot")
    tensors = torch.load(folder / "tensors.pt", map_location="cpu", weights_only=True)
    with np.load(folder / "arrays.npz") as stored:
        arrays = {k: stored[k] for k in stored.files}
    entries = manifest["entries"]
    for name, entry in entries.items():
        kind = entry["kind"]
        if kind == "trainer":
            continue
        if kind == "json":
            value = entry["value"]
        elif kind == "float":
            value = float(entry["value"])
        elif kind == "generator":
            bit_class = getattr(np.random, str(entry["state"]["bit_generator"]), None)
            valid = isinstance(bit_class, type) and issubclass(
                bit_class, np.random.BitGenerator
            )
            if not valid:
                raise EpisodeStateError(
                    f"{folder}: {name} names no NumPy bit generator"
                )
            bit_generator = bit_class()
            bit_generator.state = entry["state"]
            value = np.random.Generator(bit_generator)
        elif kind == "array":
            value = arrays[name]
        elif kind == "array_list":
            value = [arrays[f"{name}__{i}"] for i in range(entry["length"])]
        elif kind == "config":
            # A snapshot is data: only dvmrl's own config classes are built.
            module, qualname = str(entry["class"]).split(":")
            if not module.startswith("dvmrl.") or not qualname.endswith("Config"):
                raise EpisodeStateError(
                    f"{folder}: {name} names the class {entry['class']!r}, which "
                    "is not a dvmrl config class"
                )
            value = getattr(importlib.import_module(module), qualname).from_dict(
                entry["value"]
            )
        elif kind == "tensors":
            value = tensors[name]
        else:
            raise EpisodeStateError(f"{folder}: unknown entry kind {kind!r} for {name}")
        setattr(env, name, value)
    if entries.get("trainer", {}).get("kind") == "trainer":
        task = env.task
        val_index = env.val_index
        env.trainer = Trainer.from_checkpoint(
            folder / "trainer.pt",
            task.x_train,
            task.y_train,
            task.x_pool[val_index],
            task.y_pool[val_index],
            device=env.device,
        )
    torch.set_rng_state(tensors["torch_rng"])
    return manifest.get("extra", {})


# ---------------------------------------------------------------------------
# The unit


def _step_folder(root: Path, step: int) -> Path:
    return root / f"episode-{step:04d}"


def run_agent_unit(experiment, unit: dict[str, Any], seed: int) -> None:
    """Run (or continue) the agent's episode of one seed and record its choice."""
    from dvmrl.experiment import derive_seed, finite_or_none, score

    spec = experiment.spec
    paths = experiment.unit_paths("agent", seed)
    pools = experiment.pools("random", seed)
    started = time.perf_counter()
    agent = load_agent(spec.agent_path)
    env = make_env(experiment, seed)
    n_obs = int(env.observation_space.shape[0])
    check_agent_fits(agent, n_obs, int(env.action_space.n))
    constructor = constructor_snapshot(env)
    episode = unit.setdefault("episode", {})
    steps = unit.setdefault("steps", [])
    folder_name = episode.get("snapshot")
    restored = False
    if folder_name is not None:
        folder = paths.root / folder_name
        try:
            extra = restore_episode(env, folder)
            obs = np.asarray(extra["obs"], dtype=np.float32)
            info = {"action_mask": np.asarray(extra["action_mask"], dtype=bool)}
            done = bool(extra["done"])
            if spec.agent_learn:
                agent = agent.load(folder / "agent.pt", folder / "buffer.npz")
        except Exception as err:  # noqa: BLE001 - any failure means a damaged snapshot
            # A snapshot only saves time. env.reset below starts the episode
            # afresh, which gives the same result with the same seed.
            logger.warning(
                "agent seed %d: the episode snapshot %s is corrupt (%s: %s); "
                "restarting the episode from its first step (same seed, same result)",
                seed,
                folder,
                type(err).__name__,
                err,
            )
            steps.clear()
            episode.clear()
        else:
            restored = True
            logger.info(
                "agent seed %d: resuming the episode after step %d", seed, len(steps)
            )
    if spec.agent_learn:
        learn_online(agent)
    if not restored:
        # Steps recorded without a snapshot are replayed from the start.
        steps.clear()
        obs, info = env.reset(seed=derive_seed(seed, 17))
        done = False
        episode["best_config"] = _config_of(env)
        episode["best_epochs"] = 0
        episode["seconds"] = 0.0
        # The environment keeps the untrained model until a step beats it.
        episode["kept_val_rmse"] = _rmse(env.trainer.predict(pools.x_val), pools.y_val)
    snapshots = True
    epochs_shown = int(env.epochs_used)
    bar = experiment._bar("agent", seed, epochs_shown)
    episode_seconds = float(episode.get("seconds", 0.0)) + time.perf_counter() - started

    while not done:
        step_started = time.perf_counter()
        action = agent.act(obs, info.get("action_mask"), explore=spec.agent_learn)
        next_obs, reward, terminated, truncated, info = env.step(action)
        if spec.agent_learn:
            agent.observe(
                obs,
                action,
                reward,
                next_obs,
                terminated,
                truncated,
                info.get("action_mask"),
            )
        obs = next_obs
        done = bool(terminated or truncated)
        pool_rmse = _rmse(env.trainer.predict(pools.x_val), pools.y_val)
        best = env.best_state()
        if (
            best is not None
            and int(best.get("epochs", -1)) == int(env.epochs_used)
            and (info.get("action_name") != "stop")
        ):
            episode["best_config"] = _config_of(env)
            episode["best_epochs"] = int(env.epochs_used)
            episode["kept_val_rmse"] = pool_rmse
        step_seconds = time.perf_counter() - step_started
        episode_seconds += step_seconds
        steps.append(
            finite_or_none(
                {
                    "step": len(steps) + 1,
                    "action": int(action),
                    "action_name": info.get("action_name"),
                    "reward": float(reward),
                    "val_rmse": pool_rmse,
                    "kept_val_rmse": episode.get("kept_val_rmse"),
                    "env_val_rmse": info.get("val_rmse"),
                    "best_val_rmse": info.get("best_val_rmse"),
                    "vulnerability": info.get("vulnerability"),
                    "strategy": info.get("strategy"),
                    "epochs_spent": int(env.epochs_used),
                    "hyperparameters": env.hyperparameters(),
                    "agent_gradient_steps": int(agent.gradient_steps),
                    "terminated": bool(terminated),
                    "truncated": bool(truncated),
                    "seconds": step_seconds,
                }
            )
        )
        episode["seconds"] = episode_seconds
        if snapshots:
            try:
                _persist_step(
                    experiment,
                    env,
                    constructor,
                    paths.root,
                    len(steps),
                    {"obs": obs, "info": info, "done": done},
                    agent if spec.agent_learn else None,
                )
            except EpisodeStateError as err:
                # Without snapshots a resumed run replays this episode from
                # its start, which gives the same result at the cost of time.
                logger.warning(
                    "agent seed %d: episode snapshots disabled (%s); a resumed run "
                    "restarts this episode",
                    seed,
                    err,
                )
                snapshots = False
                tmp = _step_folder(paths.root, len(steps)).with_suffix(".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                episode.pop("snapshot", None)
        if snapshots:
            episode["snapshot"] = _step_folder(paths.root, len(steps)).name
            experiment._write_state()
            _remove_snapshots(paths.root, keep=episode["snapshot"])
        if bar is not None:
            bar.update(int(env.epochs_used) - epochs_shown)
            epochs_shown = int(env.epochs_used)
    if bar is not None:
        bar.close()

    best = env.best_state()
    epochs_trained = int(best.get("epochs", episode["best_epochs"]))
    trainer = _chosen_trainer(env, best, epochs_trained)
    config = dict(episode["best_config"])
    model_config = best["model_config"]
    for key in ("hidden", "layers", "dropout"):
        config[key] = type(config[key])(model_config[key])
    experiment._save_checkpoint(
        trainer, paths.checkpoint, "agent", seed, "agent", config
    )
    val_metrics, _ = score(
        trainer, pools.x_val, pools.y_val, experiment.stability_threshold
    )
    unit["chosen"] = {
        "config": config,
        "trial": "agent",
        "val_rmse": val_metrics["rmse"],
        "env_val_rmse": finite_or_none(best.get("val_rmse")),
        "epochs_trained": epochs_trained,
    }
    unit["epochs_used"] = int(env.epochs_used)
    unit["seconds"]["search"] = episode_seconds
    experiment._write_state()
    _remove_snapshots(paths.root, keep=None)
    logger.info(
        "agent seed %d: %d steps, best validation RMSE %.4f eV/atom, %d epochs used",
        seed,
        len(steps),
        val_metrics["rmse"],
        env.epochs_used,
    )


def _persist_step(experiment, env, constructor, root, step, loop, agent) -> None:
    """Write the episode after ``step`` into its folder, through a temporary name."""
    if experiment is not None:
        experiment.check_folder()
    folder = _step_folder(root, step)
    tmp = folder.with_name(folder.name + ".tmp")
    for path in (folder, tmp):
        if path.exists():
            shutil.rmtree(path)
    extra = {
        "obs": [float(v) for v in loop["obs"]],
        "action_mask": [bool(v) for v in loop["info"].get("action_mask", [])],
        "done": bool(loop["done"]),
    }
    try:
        save_episode(env, constructor, tmp, extra)
        if agent is not None:
            agent.save(tmp / "agent.pt", buffer_path=tmp / "buffer.npz")
    except BaseException:
        # A write cut short (Ctrl-C, SIGTERM, a full disk) leaves no
        # half-written folder behind.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.rename(folder)


def _remove_snapshots(root: Path, keep: str | None) -> None:
    for path in root.glob("episode-*"):
        if path.name != keep and path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _config_of(env) -> dict[str, Any]:
    h = env.hyperparameters()
    return {
        "lr": float(h["lr"]),
        "batch_size": int(h["batch_size"]),
        "weight_decay": float(h["weight_decay"]),
        "dropout": float(h["dropout"]),
        "layers": int(h["layers"]),
        "hidden": int(h["hidden"]),
    }


def _rmse(prediction, target) -> float:
    prediction = np.asarray(prediction, dtype=np.float64)
    return float(np.sqrt(np.mean((prediction - target) ** 2)))


def _chosen_trainer(env, best: dict[str, Any], epochs_trained: int):
    """Return a trainer with the episode's best weights, for saving and scoring.

    ``epochs_trained`` is the number of epochs behind those weights, which
    may be fewer than the episode trained.
    """
    from dvmrl.model import ModelConfig
    from dvmrl.training import Trainer

    task = env.task
    trainer = Trainer(
        ModelConfig.from_dict(best["model_config"]),
        env.trainer.train_config,
        task.x_train,
        task.y_train,
        task.x_pool[env.val_index],
        task.y_pool[env.val_index],
        device=env.device,
    )
    trainer.load_state(best["state"])
    # The weights come from the episode's trainer after epochs_trained of its
    # epochs, so that count and the history up to it describe them. A fresh
    # trainer would record 0 epochs.
    trainer.epochs_done = epochs_trained
    trainer.history = list(env.trainer.history[:epochs_trained])
    return trainer
