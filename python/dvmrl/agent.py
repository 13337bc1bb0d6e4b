"""Dueling double DQN agent with action masks, replay and data-only state files.

The agent steers training of a composition model through
:class:`dvmrl.env.ModelTuningEnv`, but it works on any environment with a
flat ``Box`` observation and a ``Discrete`` action space. Its parts:

- :class:`DuelingQNetwork`: a shared MLP trunk, a value stream V(s) and an
  advantage stream A(s, a), combined as Q = V + A - mean_a A.
- :func:`double_dqn_target`: the online network picks the next action, the
  target network scores it, and bootstrapping stops on termination only.
- :class:`ReplayBuffer`: uniform replay stored in numpy arrays, saved as npz.
- :class:`DQNAgent`: epsilon-greedy action choice over unmasked actions, Huber
  loss, gradient clipping, hard or Polyak target updates and divergence checks.

State files are data only. The networks and optimiser are written with
``torch.save`` as tensors plus a JSON string and read back with
``torch.load(weights_only=True)``. The replay buffer is an npz file read
with ``allow_pickle=False``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dvmrl._files import builds_objects, file_kind, write_atomic
from dvmrl.layout import is_integral

logger = logging.getLogger(__name__)

AGENT_FORMAT = "dvmrl-dqn-agent"
AGENT_FORMAT_VERSION = 1
BUFFER_FORMAT = "dvmrl-replay-buffer"

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
PRETRAINED_AGENT = PRETRAINED_DIR / "agent.pt"
PRETRAINED_METADATA = PRETRAINED_DIR / "agent.json"


class AgentFileError(ValueError):
    """An agent or replay-buffer file that is corrupt, foreign or incompatible."""


class DivergenceError(RuntimeError):
    """Q-values or the TD loss became non-finite or exceeded the configured limit."""


# Fields of AgentConfig that count something.
_INT_FIELDS = (
    "stream_hidden",
    "batch_size",
    "buffer_capacity",
    "learning_starts",
    "train_every",
    "gradient_steps",
    "target_update_interval",
    "epsilon_decay_steps",
    "seed",
)
# The buffer is allocated in full at once: at 10 million transitions of a
# 200-value observation it takes about 16 GB, beyond any use here.
MAX_BUFFER_CAPACITY = 10_000_000


@dataclass
class AgentConfig:
    """Hyperparameters of :class:`DQNAgent`.

    Attributes:
        hidden: widths of the shared trunk layers.
        stream_hidden: width of the hidden layer in the value and advantage
            streams.
        gamma: discount factor in [0, 1].
        lr: Adam learning rate.
        batch_size: transitions per gradient step.
        buffer_capacity: maximum transitions kept in the replay buffer.
        learning_starts: transitions collected before the first update.
        train_every: environment steps between gradient steps.
        gradient_steps: gradient steps per update.
        target_update: "hard" (copy every ``target_update_interval`` gradient
            steps) or "polyak" (blend with ``tau`` after every gradient step).
        target_update_interval: gradient steps between hard target copies.
        tau: Polyak blending factor in (0, 1].
        epsilon_start: exploration rate at step 0.
        epsilon_end: exploration rate after the decay.
        epsilon_decay_steps: environment steps of the linear decay.
        huber_delta: point where the Huber loss turns from quadratic to linear.
        grad_clip: maximum global gradient norm; 0 disables clipping.
        q_limit: largest absolute Q-value accepted before training stops with
            :class:`DivergenceError`.
        seed: seed of the network initialisation, exploration and replay.
    """

    hidden: tuple[int, ...] = (128, 128)
    stream_hidden: int = 64
    gamma: float = 0.95
    lr: float = 1e-3
    batch_size: int = 64
    buffer_capacity: int = 50_000
    learning_starts: int = 200
    train_every: int = 1
    gradient_steps: int = 1
    target_update: str = "polyak"
    target_update_interval: int = 250
    tau: float = 0.01
    epsilon_start: float = 1.0
    epsilon_end: float = 0.05
    epsilon_decay_steps: int = 5_000
    huber_delta: float = 1.0
    grad_clip: float = 10.0
    q_limit: float = 1e4
    seed: int = 0

    def __post_init__(self) -> None:
        self.hidden = tuple(int(h) for h in self.hidden)
        self.validate()

    def validate(self) -> None:
        """Check every field and raise ValueError naming the bad one."""
        for name in _INT_FIELDS:
            value = getattr(self, name)
            # NumPy integers count, booleans and fractional values do not.
            if not is_integral(value):
                raise ValueError(f"{name} must be an integer, got {value!r}")
            setattr(self, name, int(value))
        if self.buffer_capacity > MAX_BUFFER_CAPACITY:
            raise ValueError(
                f"buffer_capacity must be at most {MAX_BUFFER_CAPACITY}, got "
                f"{self.buffer_capacity}"
            )
        if self.learning_starts > self.buffer_capacity:
            raise ValueError(
                f"learning_starts ({self.learning_starts}) exceeds buffer_capacity "
                f"({self.buffer_capacity}), so no gradient step would ever run; "
                "lower learning_starts"
            )
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden must be positive widths, got {self.hidden}")
        if self.stream_hidden < 1:
            raise ValueError(f"stream_hidden must be >= 1, got {self.stream_hidden}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {self.gamma}")
        for name in ("lr", "huber_delta", "q_limit"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in (
            "batch_size",
            "buffer_capacity",
            "train_every",
            "gradient_steps",
            "target_update_interval",
            "epsilon_decay_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_starts < 0:
            raise ValueError(f"learning_starts must be >= 0, got {self.learning_starts}")
        # torch.manual_seed takes 0 to 2**64 - 1 and NumPy generators any
        # integer >= 0.
        if not 0 <= self.seed < 2**64:
            raise ValueError(
                f"seed must be an integer from 0 to 2**64 - 1, got {self.seed}; pass a "
                "whole number such as 0"
            )
        if self.target_update not in ("hard", "polyak"):
            raise ValueError(
                f"target_update must be 'hard' or 'polyak', got {self.target_update!r}"
            )
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {self.tau}")
        for name in ("epsilon_start", "epsilon_end"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.grad_clip >= 0:
            raise ValueError(f"grad_clip must be >= 0, got {self.grad_clip}")

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as JSON-compatible values."""
        data = dataclasses.asdict(self)
        data["hidden"] = list(self.hidden)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AgentConfig:
        """Build a config from :meth:`to_dict` output, rejecting unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AgentConfig fields {unknown}; expected {sorted(known)}")
        return cls(**data)


class DuelingQNetwork(nn.Module):
    """Dueling Q-network: Q(s, a) = V(s) + A(s, a) - mean over a' of A(s, a').

    Subtracting the mean advantage makes V and A identifiable, so V(s) is the
    mean Q-value of the state.
    """

    def __init__(
        self, obs_dim: int, n_actions: int, hidden: Sequence[int], stream_hidden: int
    ):
        super().__init__()
        layers: list[nn.Module] = []
        width = obs_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.trunk = nn.Sequential(*layers)
        self.value = nn.Sequential(
            nn.Linear(width, stream_hidden), nn.ReLU(), nn.Linear(stream_hidden, 1)
        )
        self.advantage = nn.Sequential(
            nn.Linear(width, stream_hidden),
            nn.ReLU(),
            nn.Linear(stream_hidden, n_actions),
        )

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """Map observations [B, obs_dim] to Q-values [B, n_actions]."""
        z = self.trunk(obs)
        value = self.value(z)
        advantage = self.advantage(z)
        return value + advantage - advantage.mean(dim=1, keepdim=True)


def double_dqn_target(
    reward: torch.Tensor,
    next_q_online: torch.Tensor,
    next_q_target: torch.Tensor,
    gamma: float,
    terminated: torch.Tensor,
    next_action_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Compute double DQN targets r + gamma * (1 - terminated) * Q_target(s', a*).

    The online network picks a* = argmax over the valid actions of
    Q_online(s', a), and the target network scores it. A truncated (but not
    terminated) transition bootstraps like any other, because the state
    after a time limit still has a value.

    Args:
        reward: rewards [B].
        next_q_online: online-network Q-values of the next states [B, A].
        next_q_target: target-network Q-values of the next states [B, A].
        gamma: discount factor in [0, 1].
        terminated: true where the episode terminated at the next state [B]
            (bool or 0/1 floats).
        next_action_mask: optional bool [B, A], true for actions valid in the
            next state; masked actions are never the argmax.

    Returns:
        Targets [B], detached from the graph.

    Raises:
        ValueError: on mismatched shapes, gamma outside [0, 1], or a
            non-terminal next state with every action masked.
    """
    if next_q_online.ndim != 2 or next_q_online.shape != next_q_target.shape:
        raise ValueError(
            "next_q_online and next_q_target must both be [B, A], got "
            f"{tuple(next_q_online.shape)} and {tuple(next_q_target.shape)}"
        )
    batch = next_q_online.shape[0]
    if reward.shape != (batch,) or terminated.shape != (batch,):
        raise ValueError(
            f"reward and terminated must be [B] = [{batch}], got "
            f"{tuple(reward.shape)} and {tuple(terminated.shape)}"
        )
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    done = terminated.to(next_q_target.dtype)
    online = next_q_online.detach()
    if next_action_mask is not None:
        if next_action_mask.shape != next_q_online.shape:
            raise ValueError(
                f"next_action_mask must be [B, A] = {tuple(next_q_online.shape)}, "
                f"got {tuple(next_action_mask.shape)}"
            )
        mask = next_action_mask.to(torch.bool)
        empty = ~mask.any(dim=1)
        if bool((empty & (done == 0)).any()):
            raise ValueError(
                "a non-terminal next state has every action masked; the environment "
                "must leave at least one valid action until the episode ends"
            )
        # Terminal rows may have an empty mask, and their bootstrap term is zeroed.
        mask = mask | empty.unsqueeze(1)
        online = online.masked_fill(~mask, -math.inf)
    best = online.argmax(dim=1, keepdim=True)
    next_value = next_q_target.detach().gather(1, best).squeeze(1)
    return (reward.to(next_value.dtype) + gamma * (1.0 - done) * next_value).detach()


class ReplayBuffer:
    """Uniform replay of transitions in preallocated numpy arrays.

    Each transition stores the observation, action, reward, next observation,
    the termination flag and the action mask of the next state (used by
    :func:`double_dqn_target`). Once full, the oldest transition is
    overwritten.
    """

    def __init__(self, capacity: int, obs_dim: int, n_actions: int, seed: int = 0):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.obs_dim = int(obs_dim)
        self.n_actions = int(n_actions)
        self.obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.action = np.zeros(capacity, dtype=np.int64)
        self.reward = np.zeros(capacity, dtype=np.float32)
        self.terminated = np.zeros(capacity, dtype=bool)
        self.next_mask = np.ones((capacity, n_actions), dtype=bool)
        self.position = 0
        self.size = 0
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.size

    def add(
        self,
        obs: np.ndarray,
        action: int,
        reward: float,
        next_obs: np.ndarray,
        terminated: bool,
        next_mask: np.ndarray | None = None,
    ) -> None:
        """Store one transition, overwriting the oldest one when full.

        Raises:
            ValueError: for an action outside [0, n_actions), a NaN or
                infinite reward or observation, observations or a mask of
                the wrong shape, or a non-terminal transition whose next
                state has every action masked. Stored, any of these would
                break a later update or the saved buffer's loading.
        """
        try:
            integral = not isinstance(action, bool) and int(action) == action
        except (TypeError, ValueError, OverflowError):
            integral = False  # None, NaN, infinity or a non-number
        if not integral:
            raise ValueError(f"action must be an integer, got {action!r}")
        if not 0 <= int(action) < self.n_actions:
            raise ValueError(
                f"action {action} is outside [0, {self.n_actions}) for "
                f"{self.n_actions} actions"
            )
        with np.errstate(over="ignore"):
            reward_32 = np.float32(reward)
        if not math.isfinite(float(reward)) or not math.isfinite(reward_32):
            raise ValueError(
                f"reward must be finite in float32, got {reward!r}; check the "
                "environment's reward"
            )
        rows = {}
        for name, value in (("obs", obs), ("next_obs", next_obs)):
            row = np.asarray(value, dtype=np.float64)
            if row.shape != (self.obs_dim,):
                raise ValueError(
                    f"{name} must have shape ({self.obs_dim},), got {row.shape}"
                )
            with np.errstate(over="ignore"):
                if not np.isfinite(row.astype(np.float32)).all():
                    raise ValueError(
                        f"{name} contains NaN or infinite values (in float32): "
                        f"{row.tolist()}"
                    )
            rows[name] = row
        mask = np.ones(self.n_actions, dtype=bool)
        if next_mask is not None:
            raw_mask = np.asarray(next_mask)
            # Gymnasium environments often give 0/1 integer masks.
            zero_one = raw_mask.dtype == bool or (
                raw_mask.dtype.kind in "iu" and np.isin(raw_mask, (0, 1)).all()
            )
            if raw_mask.shape != (self.n_actions,) or not zero_one:
                raise ValueError(
                    f"next_mask must be a bool or 0/1 array of shape "
                    f"({self.n_actions},), got {raw_mask.dtype} of shape "
                    f"{raw_mask.shape}"
                )
            mask = raw_mask.astype(bool)
            if not mask.any() and not terminated:
                raise ValueError(
                    "next_mask masks every action of a non-terminal next state; "
                    "leave at least one valid action until the episode ends"
                )
        i = self.position
        self.obs[i] = rows["obs"]
        self.next_obs[i] = rows["next_obs"]
        self.action[i] = int(action)
        self.reward[i] = float(reward)
        self.terminated[i] = bool(terminated)
        self.next_mask[i] = mask
        self.position = (i + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, batch_size: int) -> dict[str, np.ndarray]:
        """Draw ``batch_size`` transitions uniformly with replacement."""
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer; add transitions first")
        index = self.rng.integers(0, self.size, size=batch_size)
        return {
            "obs": self.obs[index],
            "action": self.action[index],
            "reward": self.reward[index],
            "next_obs": self.next_obs[index],
            "terminated": self.terminated[index],
            "next_mask": self.next_mask[index],
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the buffer and its random state to an npz file, atomically."""
        n = self.size
        state = json.dumps(self.rng.bit_generator.state)
        arrays = {
            "format": np.array(BUFFER_FORMAT),
            "meta": np.array(
                [self.capacity, self.obs_dim, self.n_actions, self.position, n],
                dtype=np.int64,
            ),
            "rng_state": np.array(state),
            "obs": self.obs[:n],
            "next_obs": self.next_obs[:n],
            "action": self.action[:n],
            "reward": self.reward[:n],
            "terminated": self.terminated[:n],
            "next_mask": self.next_mask[:n],
        }
        write_atomic(path, lambda f: np.savez(f, **arrays), binary=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReplayBuffer:
        """Read a buffer written by :meth:`save` and check every field.

        Raises:
            AgentFileError: when the file is not a readable dvmrl replay
                buffer, contains pickled objects, or contains values that
                :meth:`add` never stores (NaN or infinite observations or
                rewards, actions outside [0, n_actions), masks that are not
                bool).
        """
        path = Path(path)
        arrays = _read_buffer_arrays(path)
        capacity, obs_dim, n_actions, position, n = _check_buffer_meta(
            path, arrays["meta"]
        )
        _check_buffer_arrays(path, arrays, obs_dim, n_actions, n)
        try:
            buffer = cls(capacity, obs_dim, n_actions)
        except MemoryError as err:
            problem = f"has a capacity of {capacity} transitions, too large to allocate"
            raise _buffer_error(path, "meta", problem) from err
        for name in _BUFFER_TRANSITION_FIELDS:
            getattr(buffer, name)[:n] = arrays[name]
        buffer.position = position
        buffer.size = n
        try:
            buffer.rng.bit_generator.state = json.loads(str(arrays["rng_state"]))
        except (ValueError, TypeError, KeyError) as err:
            problem = "is not a numpy random state"
            raise _buffer_error(path, "rng_state", problem) from err
        return buffer


_BUFFER_TRANSITION_FIELDS = (
    "obs",
    "next_obs",
    "action",
    "reward",
    "terminated",
    "next_mask",
)
_BUFFER_FIELDS = ("format", "meta", "rng_state", *_BUFFER_TRANSITION_FIELDS)
_CORRUPT_BUFFER_FIX = (
    "restore it from a backup, or delete it to resume with an empty replay buffer"
)


def _buffer_error(path: Path, field_name: str, problem: str) -> AgentFileError:
    return AgentFileError(
        f"invalid replay buffer file {path}: field {field_name!r} {problem}, so "
        f"the file is corrupt; {_CORRUPT_BUFFER_FIX}"
    )


def _pickle_rejected(path: Path, file_type: str, detail: str = "") -> AgentFileError:
    detail = f" ({detail})" if detail else ""
    return AgentFileError(
        f"invalid {file_type} {path}: it contains pickled Python objects{detail}, and "
        "files with pickled objects are rejected because loading them can run "
        "arbitrary code; use a file written by dvmrl"
    )


def _unreadable(path: Path, kind: str, file_type: str, fix: str) -> AgentFileError:
    """Return the error for a file that is not a readable zip archive."""
    if kind == "empty":
        problem = "the file is empty"
    elif kind == "zip":
        problem = "the zip archive is truncated or corrupt"
    else:
        problem = (
            "it is not the zip archive that dvmrl writes, so it is corrupt or of "
            "another format"
        )
    return AgentFileError(f"invalid {file_type} {path}: {problem}; {fix}")


def _read_buffer_arrays(path: Path) -> dict[str, np.ndarray]:
    """Read every field of a replay-buffer npz file, without unpickling anything."""
    file_type = "replay buffer file"
    try:
        kind = file_kind(path)
    except OSError as err:
        raise AgentFileError(
            f"cannot read replay buffer file {path}: {err.strerror or err}"
        ) from err
    if kind == "pickle":
        raise _pickle_rejected(path, file_type, "a bare pickle stream")
    if kind != "zip":
        raise _unreadable(path, kind, file_type, _CORRUPT_BUFFER_FIX)

    field_name = None
    arrays = {}
    try:
        with np.load(path, allow_pickle=False) as data:
            for field_name in _BUFFER_FIELDS:
                if field_name in data.files:
                    arrays[field_name] = data[field_name]
    except ValueError as err:
        # numpy raises this for an object array when allow_pickle is false.
        if "allow_pickle" in str(err):
            # numpy's message advises allow_pickle=True, so it is not chained.
            detail = f"field {field_name!r} is an object array"
            raise _pickle_rejected(path, file_type, detail) from None
        raise _unreadable(path, "zip", file_type, _CORRUPT_BUFFER_FIX) from err
    except Exception as err:  # noqa: BLE001 - zip and zlib errors of a damaged archive
        raise _unreadable(path, "zip", file_type, _CORRUPT_BUFFER_FIX) from err

    missing = [name for name in _BUFFER_FIELDS if name not in arrays]
    if missing:
        raise AgentFileError(
            f"invalid replay buffer file {path}: fields {missing} are missing, so "
            "it is not a dvmrl replay buffer"
        )
    if str(arrays["format"]) != BUFFER_FORMAT:
        raise AgentFileError(
            f"invalid replay buffer file {path}: it is not a dvmrl replay buffer "
            f"(format {BUFFER_FORMAT!r})"
        )
    return arrays


def _check_buffer_meta(
    path: Path, meta: np.ndarray
) -> tuple[int, int, int, int, int]:
    """Return capacity, obs_dim, n_actions, position and size from ``meta``."""
    if meta.shape != (5,) or meta.dtype.kind not in "iu":
        problem = f"must be 5 integers, got {meta.dtype} {meta.shape}"
        raise _buffer_error(path, "meta", problem)
    capacity, obs_dim, n_actions, position, n = (int(v) for v in meta)
    if capacity < 1 or obs_dim < 1 or n_actions < 1:
        raise _buffer_error(
            path,
            "meta",
            f"has capacity {capacity}, obs_dim {obs_dim} and n_actions {n_actions}; "
            "each must be >= 1",
        )
    if not 0 <= n <= capacity:
        problem = f"has size {n} outside [0, capacity {capacity}]"
        raise _buffer_error(path, "meta", problem)
    # add() writes at position and then advances it, so until the buffer
    # wraps around the position equals the size.
    valid_position = 0 <= position < capacity if n == capacity else position == n
    if not valid_position:
        problem = (
            f"has position {position}, inconsistent with size {n} of capacity "
            f"{capacity}"
        )
        raise _buffer_error(path, "meta", problem)
    return capacity, obs_dim, n_actions, position, n


def _check_buffer_arrays(
    path: Path, arrays: dict[str, np.ndarray], obs_dim: int, n_actions: int, n: int
) -> None:
    """Check the shape, dtype and values of each transition field."""
    # Field: expected shape, numpy dtype kinds accepted and their description.
    layout = {
        "obs": ((n, obs_dim), "f", "a float type"),
        "next_obs": ((n, obs_dim), "f", "a float type"),
        "action": ((n,), "iu", "an integer type"),
        "reward": ((n,), "f", "a float type"),
        "terminated": ((n,), "b", "bool"),
        "next_mask": ((n, n_actions), "b", "bool"),
    }
    for name, (shape, kinds, dtype_name) in layout.items():
        array = arrays[name]
        if array.shape != shape:
            problem = f"has shape {array.shape}, expected {shape}"
            raise _buffer_error(path, name, problem)
        if array.dtype.kind not in kinds:
            problem = f"has dtype {array.dtype}, expected {dtype_name}"
            raise _buffer_error(path, name, problem)
    for name in ("obs", "next_obs", "reward"):
        # The buffer stores float32, so a float64 value beyond its range is
        # infinite once loaded.
        with np.errstate(over="ignore"):
            finite = np.isfinite(arrays[name].astype(np.float32))
        if finite.ndim == 2:
            finite = finite.all(axis=1)
        bad = np.flatnonzero(~finite)
        if bad.size:
            problem = f"contains NaN or infinite values (first in transition {bad[0]})"
            raise _buffer_error(path, name, problem)
    action = arrays["action"]
    bad = np.flatnonzero((action < 0) | (action >= n_actions))
    if bad.size:
        raise _buffer_error(
            path,
            "action",
            f"contains action {action[bad[0]]} in transition {bad[0]}, outside "
            f"[0, {n_actions}) for {n_actions} actions",
        )
    # double_dqn_target needs a valid next action wherever the episode goes on.
    bad = np.flatnonzero(~arrays["next_mask"].any(axis=1) & ~arrays["terminated"])
    if bad.size:
        raise _buffer_error(
            path,
            "next_mask",
            f"masks every action of the non-terminal transition {bad[0]}",
        )


@dataclass
class UpdateStats:
    """Metrics of one gradient step, logged under the ``agent/`` namespace."""

    td_loss: float
    mean_q: float
    max_abs_q: float
    grad_norm: float


@dataclass
class EpisodeResult:
    """Outcome of :func:`run_episode`.

    Attributes:
        trajectory: one dict per step with ``step``, ``action`` (index),
            ``action_name``, ``reward`` and the step's ``info`` entries.
        total_return: undiscounted sum of rewards.
        terminated: true when the episode ended on the ``stop`` action.
        truncated: true when the episode ran out of budget.
        best_state: the environment's best-validation state (for
            :class:`dvmrl.env.ModelTuningEnv`, the model weights with the
            lowest validation RMSE); None for environments without one.
        best_val_rmse: validation RMSE of ``best_state`` in eV/atom, or None.
    """

    trajectory: list[dict[str, Any]]
    total_return: float
    terminated: bool
    truncated: bool
    best_state: Any = None
    best_val_rmse: float | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class DQNAgent:
    """Dueling double DQN with epsilon-greedy exploration over unmasked actions.

    Use :meth:`act` to pick an action and :meth:`observe` to store the
    transition and train; :meth:`end_episode` logs the episode return. Every
    gradient step checks the Q-values and the loss: a non-finite value or a
    Q-value above ``config.q_limit`` in magnitude raises
    :class:`DivergenceError` before the optimiser applies the step.
    """

    def __init__(self, obs_dim: int, n_actions: int, config: AgentConfig | None = None):
        if obs_dim < 1 or n_actions < 1:
            raise ValueError(
                f"obs_dim and n_actions must be >= 1, got {obs_dim} and {n_actions}"
            )
        self.config = config or AgentConfig()
        self.obs_dim = int(obs_dim)
        self.n_actions = int(n_actions)
        # The networks draw their initial weights from a seeded stream. The
        # fork keeps the caller's global PyTorch random state as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self.online = self._build_network()
            self.target = self._build_network()
        self.target.load_state_dict(self.online.state_dict())
        self.target.requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.online.parameters(), lr=self.config.lr)
        self.buffer = ReplayBuffer(
            self.config.buffer_capacity, obs_dim, n_actions, seed=self.config.seed
        )
        self.rng = np.random.default_rng(self.config.seed + 1)
        self.env_steps = 0
        self.gradient_steps = 0
        self.episodes = 0
        self.episode_returns: list[float] = []
        self.last_update: UpdateStats | None = None
        self.metadata: dict[str, Any] = {}
        self._episode_return = 0.0

    def _build_network(self) -> DuelingQNetwork:
        c = self.config
        return DuelingQNetwork(self.obs_dim, self.n_actions, c.hidden, c.stream_hidden)

    @property
    def epsilon(self) -> float:
        """Exploration rate now: linear from epsilon_start to epsilon_end."""
        c = self.config
        progress = min(1.0, self.env_steps / c.epsilon_decay_steps)
        return c.epsilon_start + progress * (c.epsilon_end - c.epsilon_start)

    def q_values(self, obs: np.ndarray) -> np.ndarray:
        """Return online-network Q-values [A] for one observation or [B, A] for many."""
        x = torch.as_tensor(np.asarray(obs, dtype=np.float32))
        single = x.ndim == 1
        self._check_obs(x.shape)
        with torch.no_grad():
            q = self.online(x.unsqueeze(0) if single else x)
        q = q.numpy()
        return q[0] if single else q

    def _check_obs(self, shape) -> None:
        """Raise ValueError unless observations have shape [obs_dim] or [B, obs_dim]."""
        if len(shape) not in (1, 2) or shape[-1] != self.obs_dim:
            raise ValueError(
                f"observation of shape {list(shape)}, but this agent takes "
                f"{self.obs_dim} values per observation; an environment built with "
                "other settings (such as k_correlations) or of another dvmrl "
                "version has another observation size, so use an agent trained "
                "on that environment"
            )

    def act(
        self,
        obs: np.ndarray,
        action_mask: np.ndarray | None = None,
        explore: bool = True,
    ) -> int:
        """Pick an action: uniform over valid actions with probability epsilon, else greedy.

        Args:
            obs: one observation [obs_dim].
            action_mask: bool [n_actions], true for valid actions; None
                means all valid.
            explore: use epsilon-greedy (training) or pure greedy (evaluation).

        Raises:
            ValueError: when the mask has the wrong shape or no valid action.
        """
        self._check_obs(np.shape(obs))
        mask = self._check_mask(action_mask)
        valid = np.flatnonzero(mask)
        if explore and self.rng.random() < self.epsilon:
            return int(self.rng.choice(valid))
        q = self.q_values(obs)
        q = np.where(mask, q, -np.inf)
        return int(np.argmax(q))

    def _check_mask(self, action_mask: np.ndarray | None) -> np.ndarray:
        if action_mask is None:
            return np.ones(self.n_actions, dtype=bool)
        mask = np.asarray(action_mask).astype(bool)
        if mask.shape != (self.n_actions,):
            raise ValueError(
                f"action_mask must have shape ({self.n_actions},), got {mask.shape}"
            )
        if not mask.any():
            raise ValueError("action_mask has no valid action; at least one must be true")
        return mask

    def observe(
        self,
        obs: np.ndarray,
        action: int,
        reward: float,
        next_obs: np.ndarray,
        terminated: bool,
        truncated: bool,
        next_action_mask: np.ndarray | None = None,
        learn: bool = True,
    ) -> UpdateStats | None:
        """Store a transition, train when due, and close the episode when it ends.

        Only ``terminated`` stops bootstrapping; ``truncated`` only ends the
        episode.

        Returns:
            The stats of the last gradient step run now, or None.
        """
        self.buffer.add(obs, action, reward, next_obs, terminated, next_action_mask)
        self.env_steps += 1
        self._episode_return += float(reward)
        stats = None
        c = self.config
        if (
            learn
            and len(self.buffer) >= max(c.learning_starts, 1)
            and self.env_steps % c.train_every == 0
        ):
            for _ in range(c.gradient_steps):
                stats = self.update()
        if terminated or truncated:
            self.end_episode()
        return stats

    def end_episode(self) -> float:
        """Record and log the return of the episode that just ended."""
        episode_return = self._episode_return
        self.episode_returns.append(episode_return)
        self.episodes += 1
        self._episode_return = 0.0
        logger.info(
            "agent/episode=%d agent/episode_return=%.4f agent/epsilon=%.3f",
            self.episodes,
            episode_return,
            self.epsilon,
        )
        return episode_return

    def update(self) -> UpdateStats:
        """Run one gradient step on a replay batch.

        Raises:
            DivergenceError: when Q-values or the loss are non-finite or a
                Q-value exceeds ``config.q_limit``; the weights stay as they
                were before the step.
        """
        c = self.config
        batch = self.buffer.sample(c.batch_size)
        obs = torch.from_numpy(batch["obs"])
        next_obs = torch.from_numpy(batch["next_obs"])
        action = torch.from_numpy(batch["action"])
        reward = torch.from_numpy(batch["reward"])
        terminated = torch.from_numpy(batch["terminated"])
        next_mask = torch.from_numpy(batch["next_mask"])

        q_all = self.online(obs)
        q = q_all.gather(1, action.unsqueeze(1)).squeeze(1)
        with torch.no_grad():
            target = double_dqn_target(
                reward,
                self.online(next_obs),
                self.target(next_obs),
                c.gamma,
                terminated,
                next_mask,
            )
        loss = nn.functional.huber_loss(q, target, delta=c.huber_delta)
        self._check_divergence(q_all, target, loss)

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if c.grad_clip > 0:
            grad_norm = float(nn.utils.clip_grad_norm_(self.online.parameters(), c.grad_clip))
        else:
            grad_norm = float(
                torch.linalg.vector_norm(
                    torch.stack(
                        [p.grad.norm() for p in self.online.parameters() if p.grad is not None]
                    )
                )
            )
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise DivergenceError(
                f"non-finite gradient norm at gradient step {self.gradient_steps}; "
                "lower lr or grad_clip"
            )
        self.optimizer.step()
        self.gradient_steps += 1
        self._update_target()

        stats = UpdateStats(
            td_loss=float(loss.detach()),
            mean_q=float(q_all.detach().mean()),
            max_abs_q=float(q_all.detach().abs().max()),
            grad_norm=grad_norm,
        )
        self.last_update = stats
        if self.gradient_steps % 100 == 0:
            logger.debug(
                "agent/step=%d agent/td_loss=%.5f agent/mean_q=%.4f agent/epsilon=%.3f",
                self.gradient_steps,
                stats.td_loss,
                stats.mean_q,
                self.epsilon,
            )
        return stats

    def _check_divergence(
        self, q_all: torch.Tensor, target: torch.Tensor, loss: torch.Tensor
    ) -> None:
        limit = self.config.q_limit
        q = q_all.detach()
        finite = bool(torch.isfinite(q).all() and torch.isfinite(target).all())
        finite = finite and math.isfinite(float(loss.detach()))
        if not finite:
            logger.error("agent/divergence: non-finite Q-values at step %d", self.gradient_steps)
            raise DivergenceError(
                f"non-finite Q-values or TD loss at gradient step {self.gradient_steps}; "
                "check the rewards and observations for NaN/inf, or lower lr"
            )
        max_abs = float(torch.maximum(q.abs().max(), target.abs().max()))
        if max_abs > limit:
            logger.error(
                "agent/divergence: max |Q| %.3g > q_limit %.3g at step %d",
                max_abs,
                limit,
                self.gradient_steps,
            )
            raise DivergenceError(
                f"Q-values diverged: max |Q| = {max_abs:.3g} exceeds q_limit = {limit:.3g} "
                f"at gradient step {self.gradient_steps}; lower lr or gamma, or scale "
                "the rewards down"
            )

    def _update_target(self) -> None:
        c = self.config
        if c.target_update == "hard":
            if self.gradient_steps % c.target_update_interval == 0:
                self.target.load_state_dict(self.online.state_dict())
            return
        with torch.no_grad():
            for target, online in zip(
                self.target.parameters(), self.online.parameters(), strict=True
            ):
                target.lerp_(online, c.tau)

    # ----------------------------------------------------------------- files

    def state_dict(self) -> dict[str, Any]:
        """Return the agent as tensors, numbers and strings only (no objects)."""
        counters = torch.tensor(
            [self.env_steps, self.gradient_steps, self.episodes], dtype=torch.int64
        )
        header = {
            "obs_dim": self.obs_dim,
            "n_actions": self.n_actions,
            "config": self.config.to_dict(),
            "rng_state": self.rng.bit_generator.state,
            # Return of the episode in progress, so that an agent saved after
            # a step and loaded on resume closes that episode with its whole
            # return. Rewards are finite (the replay buffer checks them).
            "episode_return": self._episode_return,
        }
        return {
            "format": AGENT_FORMAT,
            "version": AGENT_FORMAT_VERSION,
            "header_json": json.dumps(header),
            "online": self.online.state_dict(),
            "target": self.target.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "counters": counters,
            "episode_returns": torch.tensor(self.episode_returns, dtype=torch.float64),
        }

    def save(
        self,
        path: str | os.PathLike,
        metadata: dict[str, Any] | None = None,
        buffer_path: str | os.PathLike | None = None,
    ) -> None:
        """Write the agent (and optionally its replay buffer) atomically.

        Args:
            path: agent file, written with ``torch.save`` of tensors and JSON.
            metadata: JSON-compatible facts stored with the agent (for
                instance the meta-training command and wall time).
            buffer_path: where to write the replay buffer as npz; None skips it.
        """
        from dvmrl.training.checkpoint import save_torch_atomic

        state = self.state_dict()
        state["metadata_json"] = json.dumps(metadata or {})
        save_torch_atomic(path, state)
        if buffer_path is not None:
            self.buffer.save(buffer_path)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        buffer_path: str | os.PathLike | None = None,
    ) -> DQNAgent:
        """Read an agent written by :meth:`save`.

        Raises:
            FileNotFoundError: when ``path`` does not exist.
            IsADirectoryError: when ``path`` is a folder.
            AgentFileError: for pickled, corrupt, foreign or incompatible files,
                and for network or optimiser tensors with NaN or infinite values.
        """
        path = Path(path)
        if path.is_dir():
            raise IsADirectoryError(
                f"agent file {path} is a folder; pass the agent file (.pt) itself"
            )
        if not path.is_file():
            raise FileNotFoundError(f"agent file {path} not found")
        state = _read_agent_state(path)
        if not isinstance(state, dict) or state.get("format") != AGENT_FORMAT:
            raise AgentFileError(f"{path} is not a dvmrl agent file (format {AGENT_FORMAT!r})")
        if state.get("version") != AGENT_FORMAT_VERSION:
            raise AgentFileError(
                f"{path} has agent format version {state.get('version')}, this dvmrl reads "
                f"version {AGENT_FORMAT_VERSION}; retrain the agent"
            )
        for part in ("online", "target", "optimizer"):
            name = _first_non_finite(state.get(part), part)
            if name is not None:
                raise AgentFileError(
                    f"invalid agent file {path}: tensor {name} contains NaN or "
                    f"infinite values, so the file is corrupt; {_AGENT_FIX}"
                )
        try:
            header = json.loads(state["header_json"])
            agent = cls(
                header["obs_dim"],
                header["n_actions"],
                AgentConfig.from_dict(header["config"]),
            )
            agent.online.load_state_dict(state["online"])
            agent.target.load_state_dict(state["target"])
            agent.optimizer.load_state_dict(state["optimizer"])
            agent.rng.bit_generator.state = header["rng_state"]
            agent.env_steps, agent.gradient_steps, agent.episodes = (
                int(v) for v in state["counters"]
            )
            if min(agent.env_steps, agent.gradient_steps, agent.episodes) < 0:
                raise ValueError(f"negative step counters {state['counters'].tolist()}")
            agent.episode_returns = [float(v) for v in state["episode_returns"]]
            # Files written before the running return was stored lack it.
            agent._episode_return = float(header.get("episode_return", 0.0))
            if not math.isfinite(agent._episode_return):
                raise ValueError(f"episode_return is {agent._episode_return}")
            agent.metadata = json.loads(state.get("metadata_json", "{}"))
            if not isinstance(agent.metadata, dict):
                raise TypeError(f"metadata_json contains {type(agent.metadata).__name__}")
        except (
            AttributeError,
            KeyError,
            MemoryError,
            RuntimeError,
            TypeError,
            ValueError,
        ) as err:
            # load_state_dict lists every missing key on its own line, so the
            # message keeps the lines joined into one.
            detail = " ".join(str(err).split())
            if len(detail) > 300:
                detail = detail[:300] + " ..."
            raise AgentFileError(
                f"incompatible agent file {path}: {type(err).__name__}: {detail}; "
                f"the file is corrupt or from another dvmrl version, so {_AGENT_FIX}"
            ) from err
        _check_q_range(agent, path)
        if buffer_path is not None:
            agent.load_buffer(buffer_path)
        return agent

    def load_buffer(self, path: str | os.PathLike) -> None:
        """Replace the replay buffer with the one saved at ``path``.

        A missing file leaves the buffer empty and logs a warning, because
        the agent can go on learning without its past transitions.

        Raises:
            AgentFileError: when the file is invalid (see
                :meth:`ReplayBuffer.load`) or belongs to an agent with other
                observation or action counts.
        """
        path = Path(path)
        if not path.exists():
            logger.warning(
                "replay buffer file %s not found, so learning restarts from an empty "
                "replay buffer: gradient steps pause until it contains %d transitions",
                path,
                max(self.config.learning_starts, 1),
            )
            return
        buffer = ReplayBuffer.load(path)
        if (buffer.obs_dim, buffer.n_actions) != (self.obs_dim, self.n_actions):
            raise AgentFileError(
                f"replay buffer file {path} has {buffer.obs_dim} observations and "
                f"{buffer.n_actions} actions, but the agent has {self.obs_dim} and "
                f"{self.n_actions}; it belongs to another agent, so restore the "
                "matching file or delete it to resume with an empty replay buffer"
            )
        # Every environment step stores one transition. A buffer may hold
        # fewer (after a lost buffer file it restarts empty), never more.
        if len(buffer) > self.env_steps:
            raise AgentFileError(
                f"replay buffer file {path} contains {len(buffer)} transitions, but the "
                f"agent has taken {self.env_steps} environment steps; it belongs to "
                "another run, so restore the matching file or delete it to resume "
                "with an empty replay buffer"
            )
        self.buffer = buffer


_AGENT_FIX = "retrain the agent with dvmrl agent train, or use another agent file"

# Probe observations for the Q-value check of a loaded agent: [N, obs_dim]
# draws from N(0, 1), well inside the [-10, 10] that ModelTuningEnv clips to.
_PROBE_COUNT = 64
_PROBE_SEED = 0


def _check_q_range(agent: DQNAgent, path: Path) -> None:
    """Raise AgentFileError when the networks give Q-values that training never keeps.

    Training stops with DivergenceError once any |Q| exceeds
    ``config.q_limit``, so finite but absurd weights (1e38, say) that give
    infinite or larger values on ordinary observations mean a corrupt file.
    """
    generator = torch.Generator().manual_seed(_PROBE_SEED)
    probes = torch.randn(_PROBE_COUNT, agent.obs_dim, generator=generator)
    for name, network in (("online", agent.online), ("target", agent.target)):
        with torch.no_grad():
            q = network(probes.to(next(network.parameters()).dtype))
        largest = float(q.abs().max())
        if not math.isfinite(largest) or largest > agent.config.q_limit:
            raise AgentFileError(
                f"invalid agent file {path}: the {name} network gives |Q| = "
                f"{largest:.3g} on standard-normal observations, beyond q_limit "
                f"{agent.config.q_limit:g} that training allows, so the file is "
                f"corrupt; {_AGENT_FIX}"
            )


def _read_agent_state(path: Path) -> Any:
    """Load an agent file with ``torch.load(weights_only=True)``, classifying failures.

    Raises:
        AgentFileError: for an empty, truncated or foreign file, or a file
            with pickled objects. The message does not suggest loading it
            with ``weights_only=False``.
    """
    file_type = "agent file"
    try:
        with warnings.catch_warnings():
            # torch.load (PyTorch 2.13) warns about a bare pickle whose protocol
            # is not 2 before it fails. The AgentFileError below explains the failure.
            warnings.filterwarnings(
                "ignore", message="Detected pickle protocol", category=UserWarning
            )
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failed load means a bad file
        load_error = err
    # PyTorch's message advises loading with weights_only=False, which would
    # run the code in the file, so the errors below do not chain to it.
    kind = file_kind(path)
    # The weights-only unpickler names the class or function it will not import.
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(load_error))
    if found:
        detail = f"it imports {found.group(1)}"
        raise _pickle_rejected(path, file_type, detail) from None
    if kind == "pickle":
        raise _pickle_rejected(path, file_type, "a bare pickle stream") from None
    # Another PyTorch version may word its message differently, so the
    # opcodes tell a pickled object apart from a corrupt archive as well.
    if builds_objects(path):
        raise _pickle_rejected(
            path, file_type, "an object that is not plain data"
        ) from None
    raise _unreadable(path, kind, file_type, _AGENT_FIX) from None


def _first_non_finite(value: Any, name: str) -> str | None:
    """Return the name of the first float tensor under ``value`` with a NaN or inf."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return name
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _first_non_finite(item, f"{name}.{key}")
        if found is not None:
            return found
    return None


def load_pretrained() -> DQNAgent:
    """Load the agent shipped in ``dvmrl/pretrained`` (meta-trained, see docs/meta_training.md).

    Raises:
        FileNotFoundError: when the package was installed without the file.
    """
    agent = DQNAgent.load(PRETRAINED_AGENT)
    if PRETRAINED_METADATA.is_file():
        agent.metadata = {**agent.metadata, **json.loads(PRETRAINED_METADATA.read_text())}
    return agent


def run_episode(
    agent: DQNAgent,
    env,
    learn: bool = False,
    seed: int | None = None,
    explore: bool | None = None,
) -> EpisodeResult:
    """Run one episode of ``agent`` on ``env`` and return its trajectory.

    The agent reads the action mask from ``info["action_mask"]`` when the
    environment provides one, so it never picks a masked action.

    Args:
        agent: the agent, for instance from :func:`load_pretrained`.
        env: a Gymnasium environment such as :class:`dvmrl.env.ModelTuningEnv`.
        learn: store transitions and train the agent during the episode.
        seed: passed to ``env.reset``; None continues the environment's stream.
        explore: epsilon-greedy when true, greedy when false; defaults to
            ``learn``.

    Returns:
        EpisodeResult, with ``best_state`` and ``best_val_rmse`` taken from
        ``env.best_state()`` and ``env.best_val_rmse`` when the environment
        has them (``ModelTuningEnv`` does).
    """
    explore = learn if explore is None else explore
    obs, info = env.reset(seed=seed)
    action_names = getattr(env, "action_names", None)
    trajectory: list[dict[str, Any]] = []
    total = 0.0
    terminated = truncated = False
    step = 0
    while not (terminated or truncated):
        mask = info.get("action_mask")
        action = agent.act(obs, mask, explore=explore)
        next_obs, reward, terminated, truncated, info = env.step(action)
        total += float(reward)
        step += 1
        row = {
            "step": step,
            "action": action,
            "action_name": action_names[action] if action_names else str(action),
            "reward": float(reward),
        }
        row.update({k: v for k, v in info.items() if k != "action_mask"})
        trajectory.append(row)
        if learn:
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
    best_state = env.best_state() if hasattr(env, "best_state") else None
    best_rmse = getattr(env, "best_val_rmse", None)
    return EpisodeResult(
        trajectory=trajectory,
        total_return=total,
        terminated=bool(terminated),
        truncated=bool(truncated),
        best_state=best_state,
        best_val_rmse=None if best_rmse is None else float(best_rmse),
    )
