"""Gymnasium environment whose state is a composition model under training.

:class:`ModelTuningEnv` wraps a :class:`dvmrl.training.Trainer`. Each step
applies one tuning action (validation strategy, hyperparameter or
architecture move, continue, stop), trains for a fixed slice of epochs and
rewards the change in validation accuracy and adversarial vulnerability.
The environment only ever receives the training pool and the validation
pool of a split: the constructor drops the test part before featurising
anything, so test compositions cannot influence rewards or observations.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import pandas as pd
import torch
from gymnasium import spaces

from dvmrl import metrics
from dvmrl._runtime import resolve_device
from dvmrl.layout import is_integral

logger = logging.getLogger(__name__)

VALIDATION_STRATEGIES = ("random", "gp-uncertainty", "ensemble-variance", "adversarial")

ACTIONS = (
    "validate-random",
    "validate-gp-uncertainty",
    "validate-ensemble-variance",
    "validate-adversarial",
    "lr-half",
    "lr-double",
    "batch-half",
    "batch-double",
    "weight-decay-down",
    "weight-decay-up",
    "dropout-down",
    "dropout-up",
    "add-layer",
    "remove-layer",
    "widen",
    "narrow",
    "continue",
    "stop",
)
ACTION_INDEX = {name: i for i, name in enumerate(ACTIONS)}

# Allowed ranges of the tunable settings; an action that would leave its
# range is masked.
LR_RANGE = (1e-4, 3.2e-2)
BATCH_RANGE = (16, 512)
WEIGHT_DECAY_RANGE = (1e-8, 1e-2)
DROPOUT_RANGE = (0.0, 0.5)
LAYER_RANGE = (1, 6)
HIDDEN_RANGE = (16, 256)
DROPOUT_STEP = 0.1
WIDTH_FACTOR = 2

# Default task: a small model that trains one epoch over ~1,500 compositions
# per step, so a step stays cheap on a laptop-class CPU. The fraction encoder
# and the weight average stay off, and the loss and the monitor stay the
# squared error and the validation RMSE. The shipped agent was meta-trained on
# such episodes, and its observations (validation scores after each slice of
# training) would shift with other settings.
DEFAULT_MODEL = {
    "hidden": 32,
    "layers": 2,
    "gate_hidden": 32,
    "msg_hidden": 32,
    "head_hidden": 64,
    "head_layers": 1,
    "dropout": 0.0,
    "fraction_hidden": 0,
}
DEFAULT_TRAIN = {
    "lr": 2e-3,
    "batch_size": 64,
    "weight_decay": 1e-5,
    "grad_clip": 5.0,
    "schedule": "constant",
    "warmup_epochs": 0.0,
    "ema_decay": 0.0,
    "loss": "mse",
    "monitor": "val_rmse",
}

# Cost limits of the validation strategies: the GP fits at most this many
# training compositions, and the adversarial strategy perturbs at most this
# many training compositions with the probe's search settings.
GP_MAX_TRAIN = 300
ADVERSARIAL_ANCHORS = 64

# Composition features of the task statistics, the validation strategies and
# the shift detection: the fraction-weighted mean of every element descriptor.
TASK_FEATURE_OPTIONS = {"stats": ("mean",), "stoichiometry": False}

# Feature-target correlations in the observation, by default.
DEFAULT_K_CORRELATIONS = 5

# Observation entries are clipped to this range.
OBS_BOUND = 10.0


@dataclasses.dataclass(frozen=True)
class _Task:
    """Featurised pools of one task (no test part)."""

    x_all: Any
    n_train: int
    features_all: np.ndarray
    x_train: Any
    y_train: np.ndarray
    f_train: np.ndarray
    formulas_train: np.ndarray
    x_pool: Any
    y_pool: np.ndarray
    f_pool: np.ndarray
    formulas_pool: np.ndarray


class ModelTuningEnv(gym.Env):
    """Tune the training of a composition model, one slice of epochs per step.

    **Observation** (``Box`` of float32, entries clipped to [-10, 10]):

    - on at most ``obs_size`` compositions of the current validation set,
      evenly spread over its rows (so over the chemical systems of the
      pool, which is ordered by system): accuracy (fraction of predictions
      within ``tolerance``), precision, recall and F1 of the stability
      call (stable when the value <= the data set's threshold); and log10
      of the RMSE (eV/atom) on the whole validation set;
    - the accuracy on the fixed reward subsample of the validation pool;
    - adversarial vulnerability on the fixed probe set (mean largest change
      of the prediction, eV/atom, under fraction moves of at most
      ``epsilon``), divided by ``tolerance``;
    - means and standard deviations over the training pool of the
      fraction-weighted mean descriptors (standardised, so of order 1), and
      the ``k_correlations`` largest absolute Pearson correlations between
      those features and the target;
    - the shift-detection ROC AUC between the current validation set and
      the training pool (0.5: no detectable shift);
    - the hyperparameters and architecture, each scaled to [0, 1] over its
      allowed range (log scale for lr, batch size and weight decay);
    - the largest sample weight divided by its cap of 5, the fraction of the
      budget left, and the current strategy (one-hot).

    **Actions** (``Discrete(18)``, names in :data:`ACTIONS`). Every action
    except ``stop`` is followed by ``epochs_per_step`` training epochs:

    - ``validate-<strategy>`` (random, gp-uncertainty, ensemble-variance,
      adversarial): draws a new validation set of ``val_size`` from the
      validation pool with that strategy. The set becomes the trainer's
      validation set, so it decides which checkpoint is kept as the best
      (:meth:`best_state`). It also sets the sample weights of the next
      slices: training compositions among the nearest neighbours (in
      descriptor space) of the validation compositions with the largest
      errors are up-weighted, so training concentrates on those regions.
      Strategies (:func:`dvmrl.validation.select_validation_set`): random
      (uniform draw), gp-uncertainty (largest predictive standard deviation
      of a Gaussian process fitted on at most 300 training compositions),
      ensemble-variance (largest variance across the pool predictions of
      the last three measured states, uniform before there are two), and
      adversarial (pool compositions nearest to adversarial examples of the
      current model built from at most 64 training compositions, most
      vulnerable first).
    - ``lr-half`` / ``lr-double``: learning rate x0.5 / x2, optimiser state kept.
    - ``batch-half`` / ``batch-double``: batch size x0.5 / x2.
    - ``weight-decay-down`` / ``weight-decay-up``: weight decay x0.1 / x10.
    - ``dropout-down`` / ``dropout-up``: head dropout -0.1 / +0.1.
    - ``add-layer`` / ``remove-layer``: one message-passing layer more or
      less (adding preserves the function).
    - ``widen`` / ``narrow``: node-state width x2 / x0.5 (widening preserves
      the function).
    - ``continue``: train with the current settings.
    - ``stop``: end the episode (``terminated``) without training.

    Actions that would leave a setting's range, remove the last layer or
    exceed the budget are masked in ``info["action_mask"]`` (bool [18]). A
    masked action passed to :meth:`step` acts as ``continue``, or as ``stop``
    once the budget has no slice left, and sets ``info["invalid_action"]``.

    **Reward**: ``w_accuracy * (accuracy - previous accuracy) +
    w_vulnerability * (previous vulnerability - vulnerability)``, accuracy
    as a fraction on the fixed reward subsample of the validation pool and
    vulnerability in eV/atom on the fixed probe set from the validation
    pool. Defaults: ``w_accuracy = 1.0``, ``w_vulnerability = 1.0``.

    **Episode end**: ``terminated`` on ``stop``; ``truncated`` when the
    budget (``budget_epochs`` passes over the training pool) cannot pay for
    another slice.

    **Seeding**: the constructor's ``seed`` fixes the task (pool subsamples,
    reward and probe sets). ``reset(seed=...)`` fixes the episode (model
    initialisation, minibatch order, validation draws), so two episodes
    with the same seeds and actions are identical.
    """

    metadata = {"render_modes": []}
    action_names = ACTIONS

    def __init__(
        self,
        data: pd.DataFrame | str | None = None,
        split=None,
        *,
        train_size: int | None = 1500,
        val_pool_size: int | None = 800,
        val_size: int = 200,
        reward_size: int = 400,
        probe_size: int = 32,
        probe_steps: int = 5,
        obs_size: int = 256,
        budget_epochs: int = 24,
        epochs_per_step: int = 1,
        model_config: dict[str, Any] | None = None,
        train_config: dict[str, Any] | None = None,
        w_accuracy: float = 1.0,
        w_vulnerability: float = 1.0,
        tolerance: float = metrics.DEFAULT_TOLERANCE,
        epsilon: float = 0.05,
        stability_threshold: float | None = None,
        k_correlations: int = DEFAULT_K_CORRELATIONS,
        split_kind: str = "random",
        seed: int = 0,
        device: str | torch.device = "cpu",
    ):
        """Build the task: take the training and validation pools, drop the test part.

        Args:
            data: a data frame with the ``formula`` and ``target`` columns
                (and ``chemsys`` and ``n_elements`` when ``split`` is None, as
                :func:`dvmrl.datasets.load_csv` adds them), a vendored data set
                name, or None for :data:`dvmrl.datasets.DEFAULT_DATASET`.
            split: a :class:`dvmrl.splits.Split` of ``data``; None makes a
                ``split_kind`` split with ``seed``. Only its ``train`` and
                ``val`` rows are used, and they must not share a formula
                with its ``test`` rows.
            train_size: training compositions drawn from the training part
                (None: all).
            val_pool_size: compositions drawn from the validation part to
                form the validation pool (None: all).
            val_size: size of each validation set a strategy draws.
            reward_size: size of the fixed reward subsample of the pool.
            probe_size: size of the fixed adversarial probe set of the pool.
            probe_steps: gradient steps of the vulnerability search.
            obs_size: validation compositions scored for the observation.
            budget_epochs: training epochs an episode may spend.
            epochs_per_step: epochs trained per step.
            model_config: overrides of :data:`DEFAULT_MODEL`.
            train_config: overrides of :data:`DEFAULT_TRAIN`.
            w_accuracy: reward weight of the accuracy change (per unit fraction).
            w_vulnerability: reward weight of the vulnerability decrease
                (per eV/atom).
            tolerance: accuracy tolerance (eV/atom).
            epsilon: largest change of one atomic fraction in the
                vulnerability probe.
            stability_threshold: stability threshold (eV/atom); None takes
                the vendored data set's value, or 0.0 for a frame.
            k_correlations: number of feature-target correlations observed.
            split_kind: kind of the split made when ``split`` is None.
            seed: seed of the task's subsamples.
            device: torch device of the trainer.

        Raises:
            ValueError: for bad sizes, or a split whose training or
                validation rows share formulas with its test rows.
        """
        super().__init__()
        from dvmrl import datasets

        if data is None:
            data = datasets.DEFAULT_DATASET
        if isinstance(data, str):
            name = data
            df = datasets.load(name)
            if stability_threshold is None:
                stability_threshold = float(datasets.dataset_info(name)["stability_threshold"])
        else:
            name = "frame"
            df = data
        if stability_threshold is None:
            stability_threshold = 0.0
        for label, value in (
            ("val_size", val_size),
            ("reward_size", reward_size),
            ("probe_size", probe_size),
            ("probe_steps", probe_steps),
            ("obs_size", obs_size),
            ("budget_epochs", budget_epochs),
            ("epochs_per_step", epochs_per_step),
        ):
            if not is_integral(value) or value < 1:
                raise ValueError(f"{label} must be an integer >= 1, got {value!r}")
        if epochs_per_step > budget_epochs:
            raise ValueError(
                f"epochs_per_step ({epochs_per_step}) exceeds budget_epochs "
                f"({budget_epochs}); raise the budget or shorten the slice"
            )
        if k_correlations < 0:
            raise ValueError(f"k_correlations must be >= 0, got {k_correlations}")
        # The observation divides by the tolerance, and the probe needs a box
        # radius inside (0, 1); a NaN weight would make every reward NaN.
        for label, value, valid, expected in (
            ("tolerance", tolerance, tolerance > 0, "> 0 (eV/atom)"),
            ("epsilon", epsilon, 0 < epsilon < 1, "in (0, 1) (fraction)"),
            ("w_accuracy", w_accuracy, True, "a finite number"),
            ("w_vulnerability", w_vulnerability, True, "a finite number"),
            ("stability_threshold", stability_threshold, True, "a finite number"),
        ):
            if not (math.isfinite(float(value)) and valid):
                raise ValueError(f"{label} must be {expected}, got {value!r}")
        self.data_name = name
        self.val_size = int(val_size)
        self.obs_size = int(obs_size)
        self.probe_steps = int(probe_steps)
        self.budget_epochs = int(budget_epochs)
        self.epochs_per_step = int(epochs_per_step)
        self.model_defaults = {**DEFAULT_MODEL, **(model_config or {})}
        self.train_defaults = {**DEFAULT_TRAIN, **(train_config or {})}
        # Checked now, not at the first reset(): a misspelt key or a bad
        # value then names itself where the environment is built.
        from dvmrl.model import ModelConfig

        TrainConfig, _ = _trainer_classes()
        for label, overrides, build in (
            ("model_config", model_config, ModelConfig),
            ("train_config", train_config, TrainConfig),
        ):
            known = {f.name for f in dataclasses.fields(build)}
            unknown = sorted(set(overrides or {}) - known)
            if unknown:
                raise ValueError(
                    f"{label} has unknown keys {unknown}; known keys: {sorted(known)}"
                )
        # reset() sets these two itself, from budget_epochs and the episode.
        owned = sorted({"epochs", "seed"} & set(train_config or {}))
        if owned:
            raise ValueError(
                f"train_config must not set {owned}: the environment sets the epochs "
                "from budget_epochs and draws each episode's seed from seed="
            )
        ModelConfig(**self.model_defaults)
        TrainConfig(**self.train_defaults)
        self.w_accuracy = float(w_accuracy)
        self.w_vulnerability = float(w_vulnerability)
        self.tolerance = float(tolerance)
        self.epsilon = float(epsilon)
        self.stability_threshold = float(stability_threshold)
        self.k_correlations = int(k_correlations)
        # None keeps the CPU default, whereas resolve_device reads it as "auto".
        self.device = resolve_device("cpu" if device is None else device)

        rng = np.random.default_rng(seed)
        train_rows, pool_rows = _training_and_validation_rows(df, split, split_kind, seed)
        train_rows = _subsample(train_rows, train_size, rng)
        pool_rows = _subsample(pool_rows, val_pool_size, rng)
        if len(pool_rows) < val_size:
            raise ValueError(
                f"the validation pool has {len(pool_rows)} compositions, fewer than "
                f"val_size={val_size}; lower val_size or raise val_pool_size"
            )
        self.task = _featurize_task(df, train_rows, pool_rows)
        self.reward_index = np.sort(rng.choice(len(pool_rows), min(reward_size, len(pool_rows)), replace=False))
        self.probe_index = np.sort(rng.choice(len(pool_rows), min(probe_size, len(pool_rows)), replace=False))
        self.task_features = self._task_features()

        n_obs = observation_size(self.task.f_train.shape[1], self.k_correlations)
        self.observation_space = spaces.Box(
            -OBS_BOUND, OBS_BOUND, shape=(n_obs,), dtype=np.float32
        )
        self.action_space = spaces.Discrete(len(ACTIONS))
        self.trainer = None
        self._best: dict[str, Any] | None = None

    # ------------------------------------------------------------- task facts

    @property
    def train_formulas(self) -> np.ndarray:
        """Formulas of the training pool."""
        return self.task.formulas_train

    @property
    def pool_formulas(self) -> np.ndarray:
        """Formulas of the validation pool."""
        return self.task.formulas_pool

    def _task_features(self) -> np.ndarray:
        features = self.task.f_train
        means = features.mean(axis=0)
        stds = features.std(axis=0)
        y = self.task.y_train
        centred = features - means
        denominator = np.sqrt((centred**2).sum(axis=0) * ((y - y.mean()) ** 2).sum())
        correlation = np.divide(
            centred.T @ (y - y.mean()),
            denominator,
            out=np.zeros(features.shape[1]),
            where=denominator > 0,
        )
        top = np.sort(np.abs(correlation))[::-1][: self.k_correlations]
        top = np.pad(top, (0, self.k_correlations - len(top)))
        return np.concatenate([means, stds, top])

    # ---------------------------------------------------------------- episode

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Start an episode with a freshly initialised model; return (obs, info)."""
        super().reset(seed=seed)
        from dvmrl.model import ModelConfig

        TrainConfig, Trainer = _trainer_classes()
        episode_seed = int(self.np_random.integers(0, 2**31 - 1))
        # The trainer, the model and the searches draw from their own
        # generators seeded from episode_seed, so PyTorch's global random
        # state, which belongs to the caller, is left alone.
        self._rng = np.random.default_rng(episode_seed)
        self.model_config = ModelConfig(**self.model_defaults)
        self.train_config = TrainConfig(
            **self.train_defaults, epochs=self.budget_epochs, seed=episode_seed
        )
        self.strategy = "random"
        self.val_index = self._select_validation("random")
        self.trainer = Trainer(
            self.model_config,
            self.train_config,
            self.task.x_train,
            self.task.y_train,
            self.task.x_pool[self.val_index],
            self.task.y_pool[self.val_index],
            device=self.device,
        )
        self.epochs_used = 0
        self.steps = 0
        self._snapshots: list[np.ndarray] = []
        self._shift_auc = self._shift_detection_auc()
        self._sample_weights = np.ones(len(self.task.y_train))
        self._best = None
        self._measure()
        self._update_best()
        return self._observation(), self._info(invalid=False)

    def step(self, action):
        """Apply ``action``, train one slice and return (obs, reward, terminated, truncated, info)."""
        if self.trainer is None:
            raise RuntimeError("call reset() before step()")
        action = int(action)
        if not 0 <= action < len(ACTIONS):
            raise ValueError(f"action must be in 0 .. {len(ACTIONS) - 1}, got {action}")
        mask = self.action_mask()
        invalid = not bool(mask[action])
        name = ACTIONS[action]
        if invalid:
            # With the budget spent only ``stop`` is valid, and continuing would
            # train past the budget.
            name = "stop" if self.budget_left < self.epochs_per_step else "continue"
            logger.debug(
                "masked action %s at step %d treated as %s",
                ACTIONS[action],
                self.steps,
                name,
            )
        self.steps += 1
        previous_accuracy = self.reward_accuracy
        previous_vulnerability = self.vulnerability
        if name == "stop":
            return self._observation(), 0.0, True, False, self._info(invalid, name)

        self._apply(name)
        from dvmrl.training.trainer import TrainingDivergedError

        try:
            self.trainer.train_epochs(self.epochs_per_step)
        except TrainingDivergedError as err:
            # The weights are no longer finite, so the episode ends here; the
            # best model so far stays the episode's result. A model that
            # predicts NaN has accuracy 0, which sets the reward.
            self.epochs_used += self.epochs_per_step
            logger.warning("training diverged after action %s: %s", name, err)
            info = self._info(invalid, name)
            # The scores measured before this step describe a model that no
            # longer exists.
            nan = float("nan")
            info.update(
                diverged=True,
                val_rmse=nan,
                val_accuracy=0.0,
                reward_accuracy=0.0,
                vulnerability=nan,
            )
            reward = -self.w_accuracy * previous_accuracy
            return self._observation(), float(reward), True, False, info
        self.epochs_used += self.epochs_per_step
        self._measure()
        self._update_best()
        reward = self.w_accuracy * (self.reward_accuracy - previous_accuracy) + (
            self.w_vulnerability * (previous_vulnerability - self.vulnerability)
        )
        truncated = self.budget_left < self.epochs_per_step
        return self._observation(), float(reward), False, bool(truncated), self._info(invalid, name)

    @property
    def budget_left(self) -> int:
        """Training epochs left in the episode."""
        return self.budget_epochs - self.epochs_used

    def action_mask(self) -> np.ndarray:
        """Return the bool [n_actions] mask of actions valid in the current state."""
        mask = np.ones(len(ACTIONS), dtype=bool)
        if self.trainer is None:
            return mask
        h = self.hyperparameters()
        edges = {
            "lr-half": h["lr"] * 0.5 < LR_RANGE[0] * (1 - 1e-9),
            "lr-double": h["lr"] * 2 > LR_RANGE[1] * (1 + 1e-9),
            "batch-half": h["batch_size"] // 2 < BATCH_RANGE[0],
            "batch-double": h["batch_size"] * 2 > BATCH_RANGE[1],
            "weight-decay-down": h["weight_decay"] * 0.1 < WEIGHT_DECAY_RANGE[0] * (1 - 1e-9),
            "weight-decay-up": h["weight_decay"] * 10 > WEIGHT_DECAY_RANGE[1] * (1 + 1e-9),
            "dropout-down": h["dropout"] - DROPOUT_STEP < DROPOUT_RANGE[0] - 1e-9,
            "dropout-up": h["dropout"] + DROPOUT_STEP > DROPOUT_RANGE[1] + 1e-9,
            "add-layer": h["layers"] + 1 > LAYER_RANGE[1],
            "remove-layer": h["layers"] - 1 < LAYER_RANGE[0],
            "widen": h["hidden"] * WIDTH_FACTOR > HIDDEN_RANGE[1],
            "narrow": h["hidden"] // WIDTH_FACTOR < HIDDEN_RANGE[0],
        }
        for name, blocked in edges.items():
            mask[ACTION_INDEX[name]] = not blocked
        if self.budget_left < self.epochs_per_step:
            mask[:] = False
            mask[ACTION_INDEX["stop"]] = True
        return mask

    def hyperparameters(self) -> dict[str, Any]:
        """Return the current lr, batch size, weight decay, dropout, layers and hidden width."""
        return {
            "lr": float(self.train_config.lr),
            "batch_size": int(self.train_config.batch_size),
            "weight_decay": float(self.train_config.weight_decay),
            "dropout": float(self.model_config.dropout),
            "layers": int(self.model_config.layers),
            "hidden": int(self.model_config.hidden),
        }

    @property
    def best_val_rmse(self) -> float | None:
        """Validation RMSE (eV/atom) of the kept checkpoint on the current validation set."""
        return None if self._best is None else self._best["val_rmse"]

    def best_state(self) -> dict[str, Any] | None:
        """Return the kept checkpoint: ``state`` (trainer weights), ``model_config``, ``val_rmse``.

        The kept checkpoint is the state with the lowest RMSE on the
        validation set it was scored on. A new validation set (a
        ``validate-*`` action) re-scores the kept checkpoint alone, not the
        earlier states, so another earlier state may score lower on the new
        set; later states replace the kept one when they score lower than its
        new RMSE.
        """
        return self._best

    # ----------------------------------------------------------------- actions

    def _apply(self, name: str) -> None:
        trainer = self.trainer
        h = self.hyperparameters()
        if name.startswith("validate-"):
            self._change_validation(name.removeprefix("validate-"))
        elif name in ("lr-half", "lr-double"):
            self._set(lr=h["lr"] * (0.5 if name == "lr-half" else 2.0))
        elif name in ("batch-half", "batch-double"):
            size = h["batch_size"] // 2 if name == "batch-half" else h["batch_size"] * 2
            self._set(batch_size=size)
        elif name in ("weight-decay-down", "weight-decay-up"):
            self._set(weight_decay=h["weight_decay"] * (0.1 if name == "weight-decay-down" else 10.0))
        elif name in ("dropout-down", "dropout-up"):
            step = -DROPOUT_STEP if name == "dropout-down" else DROPOUT_STEP
            self._set(dropout=round(min(max(h["dropout"] + step, 0.0), DROPOUT_RANGE[1]), 6))
        elif name == "add-layer":
            trainer.add_layer()
        elif name == "remove-layer":
            trainer.remove_layer()
        elif name == "widen":
            trainer.widen(h["hidden"] * WIDTH_FACTOR)
        elif name == "narrow":
            trainer.narrow(h["hidden"] // WIDTH_FACTOR)
        self._sync_configs()

    def _set(self, **changes) -> None:
        self.trainer.set_hyperparameters(**changes)

    def _sync_configs(self) -> None:
        self.model_config = self.trainer.model_config
        self.train_config = self.trainer.train_config

    def _change_validation(self, strategy: str) -> None:
        self.strategy = strategy
        self.val_index = self._select_validation(strategy)
        x_val = self.task.x_pool[self.val_index]
        y_val = self.task.y_pool[self.val_index]
        self.trainer.set_validation(x_val, y_val)
        self._shift_auc = self._shift_detection_auc()
        self._rescore_best()
        self._sample_weights = self._region_weights()
        self.trainer.set_sample_weights(self._sample_weights)

    def _region_weights(self, neighbours: int = 5, boost: float = 1.0) -> np.ndarray:
        """Up-weight training compositions near the worst-predicted validation ones.

        Each validation composition spreads its absolute error (relative to
        the mean error) over its ``neighbours`` nearest training
        compositions in descriptor space; weights are 1 + boost * that sum,
        capped at 5 and rescaled to mean 1.
        """
        from sklearn.neighbors import NearestNeighbors

        errors = np.abs(self._pool_prediction[self.val_index] - self.task.y_pool[self.val_index])
        relative = errors / max(errors.mean(), 1e-12)
        finder = NearestNeighbors(n_neighbors=min(neighbours, len(self.task.f_train)))
        finder.fit(self.task.f_train)
        _, index = finder.kneighbors(self.task.f_pool[self.val_index])
        extra = np.zeros(len(self.task.f_train))
        np.add.at(extra, index.ravel(), np.repeat(relative, index.shape[1]) / index.shape[1])
        weights = np.minimum(1.0 + boost * extra, 5.0)
        return weights / weights.mean()

    # ------------------------------------------------------------- validation

    def _select_validation(self, strategy: str) -> np.ndarray:
        """Return sorted indices into the validation pool for ``strategy``."""
        if strategy not in VALIDATION_STRATEGIES:
            raise ValueError(
                f"unknown validation strategy {strategy!r}: expected one of "
                f"{VALIDATION_STRATEGIES}"
            )
        n_pool = len(self.task.y_pool)
        seed = int(self._rng.integers(0, 2**31 - 1))
        if strategy == "random" or self.trainer is None:
            return np.sort(np.random.default_rng(seed).choice(n_pool, self.val_size, replace=False))
        if strategy == "ensemble-variance" and len(self._snapshots) < 2:
            # No ensemble before the second slice: fall back to a uniform draw.
            return np.sort(np.random.default_rng(seed).choice(n_pool, self.val_size, replace=False))
        try:
            from dvmrl.validation import select_validation_set
        except ImportError:
            return self._select_validation_private(strategy, seed)
        n_train = self.task.n_train
        rows = select_validation_set(
            strategy,
            np.arange(n_train, n_train + n_pool),
            self.val_size,
            seed,
            test_indices=np.zeros(0, dtype=np.int64),
            train_indices=np.arange(n_train),
            batch=self.task.x_all,
            # The default composition features: the adversarial strategy
            # featurises its examples with those and compares them with these.
            features=self.task.features_all,
            samples=np.stack(self._snapshots[-3:]),
            predictor=self.trainer.model,
            epsilon=self.epsilon,
            gp_max_train=GP_MAX_TRAIN,
            adversarial_anchors=ADVERSARIAL_ANCHORS,
            search_options={"steps": self.probe_steps, "starts": 2},
        )
        return np.sort(np.asarray(rows, dtype=np.int64) - n_train)

    def _select_validation_private(self, strategy: str, seed: int) -> np.ndarray:
        """Select without dvmrl.validation, with simpler scores of the same ideas.

        NOTE: used only where dvmrl.validation is not installed. Its
        adversarial score is a classifier's probability that a pool
        composition is not training data, not a search for adversarial
        examples.
        """
        rng = np.random.default_rng(seed)
        if strategy == "gp-uncertainty":
            score = self._gp_uncertainty(rng)
        elif strategy == "ensemble-variance":
            score = np.var(np.stack(self._snapshots[-3:]), axis=0)
        else:
            score = _adversarial_validation_scores(self.task.f_train, self.task.f_pool, rng)
        # Ties are broken at random so that equal scores do not favour low indices.
        jitter = rng.random(len(score)) * 1e-12
        return np.sort(np.argsort(-(score + jitter))[: self.val_size])

    def _gp_uncertainty(self, rng: np.random.Generator, n_fit: int = 300) -> np.ndarray:
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import RBF, WhiteKernel

        fit = rng.choice(len(self.task.y_train), min(n_fit, len(self.task.y_train)), replace=False)
        residual = self.task.y_train[fit] - self._predict(self.task.x_train[fit])
        kernel = RBF(length_scale=3.0) + WhiteKernel(noise_level=0.1)
        gp = GaussianProcessRegressor(kernel=kernel, optimizer=None, normalize_y=True)
        gp.fit(self.task.f_train[fit], residual)
        _, std = gp.predict(self.task.f_pool, return_std=True)
        return std

    def _shift_detection_auc(self) -> float:
        """Return the ROC AUC of telling the current validation set from the training pool.

        NOTE: dvmrl.shift.shift_auc (gradient boosting) took about 8 s on
        inputs of this size on a loaded 2-core machine, too slow for a
        step, so this uses the closed-form classifier below.
        """
        pool = self.task.f_pool[self.val_index]
        scores = _adversarial_validation_auc(self.task.f_train, pool, self._rng)
        return scores

    # ----------------------------------------------------------- measurements

    def _predict(self, x) -> np.ndarray:
        return np.asarray(self.trainer.predict(x), dtype=np.float64)

    def _measure(self) -> None:
        """Score the current model on the pool, the validation set and the probe set."""
        self._pool_prediction = self._predict(self.task.x_pool)
        self._snapshots.append(self._pool_prediction)
        self._snapshots = self._snapshots[-3:]
        y = self.task.y_pool
        obs_index = _spread(self.val_index, self.obs_size)
        prediction = self._pool_prediction[obs_index]
        truth = y[obs_index]
        self.val_accuracy = metrics.accuracy_within(truth, prediction, self.tolerance)
        stability = metrics.stability_scores(truth, prediction, self.stability_threshold)
        self.val_stability = {k: float(stability[k]) for k in ("precision", "recall", "f1")}
        full = self._pool_prediction[self.val_index]
        self.val_rmse = metrics.rmse(y[self.val_index], full)
        reward_pred = self._pool_prediction[self.reward_index]
        self.reward_accuracy = metrics.accuracy_within(
            y[self.reward_index], reward_pred, self.tolerance
        )
        self.vulnerability = self._vulnerability()

    def _vulnerability(self) -> float:
        """Return the mean largest |change| (eV/atom) on the probe set at radius epsilon."""
        from dvmrl.adversarial import vulnerability

        batch = self.task.x_pool[self.probe_index]
        seed = int(self._rng.integers(0, 2**31 - 1))
        report = vulnerability(
            self.trainer.model,
            batch,
            epsilon=self.epsilon,
            steps=self.probe_steps,
            starts=2,
            seed=seed,
        )
        return float(report.score)

    def _update_best(self) -> None:
        if self._best is None or self.val_rmse < self._best["val_rmse"]:
            self._best = {
                "state": _copy_state(self.trainer),
                "model_config": self.trainer.model_config.to_dict(),
                "val_rmse": float(self.val_rmse),
                "epochs": int(self.epochs_used),
            }

    def _rescore_best(self) -> None:
        """Score the kept checkpoint on the new validation set."""
        if self._best is None:
            return
        current = _copy_state(self.trainer)
        current_config = self.trainer.model_config.to_dict()
        if self._best["model_config"] == current_config:
            self.trainer.load_state(self._best["state"])
            prediction = self._predict(self.task.x_pool[self.val_index])
            self.trainer.load_state(current)
        else:
            prediction = _predict_state(self._best, self.task.x_pool[self.val_index], self.device)
        self._best["val_rmse"] = metrics.rmse(self.task.y_pool[self.val_index], prediction)

    # ------------------------------------------------------------ observation

    def _observation(self) -> np.ndarray:
        h = self.hyperparameters()
        s = self.val_stability
        parts = [
            self.val_accuracy,
            s["precision"],
            s["recall"],
            s["f1"],
            math.log10(max(self.val_rmse, 1e-6)),
            self.reward_accuracy,
            self.vulnerability / self.tolerance,
            *self.task_features,
            self._shift_auc,
            _unit_log(h["lr"], LR_RANGE),
            _unit_log(h["batch_size"], BATCH_RANGE),
            _unit_log(h["weight_decay"], WEIGHT_DECAY_RANGE),
            _unit(h["dropout"], DROPOUT_RANGE),
            _unit(h["layers"], LAYER_RANGE),
            _unit_log(h["hidden"], HIDDEN_RANGE),
            float(self._sample_weights.max() / 5.0),
            self.budget_left / self.budget_epochs,
            *[float(self.strategy == name) for name in VALIDATION_STRATEGIES],
        ]
        obs = np.asarray(parts, dtype=np.float64)
        obs = np.nan_to_num(obs, nan=0.0, posinf=OBS_BOUND, neginf=-OBS_BOUND)
        return np.clip(obs, -OBS_BOUND, OBS_BOUND).astype(np.float32)

    def _info(self, invalid: bool, name: str | None = None) -> dict[str, Any]:
        return {
            "action_mask": self.action_mask(),
            "action_name": name,
            "invalid_action": bool(invalid),
            "val_rmse": float(self.val_rmse),
            "val_accuracy": float(self.val_accuracy),
            "reward_accuracy": float(self.reward_accuracy),
            "vulnerability": float(self.vulnerability),
            "shift_auc": float(self._shift_auc),
            "strategy": self.strategy,
            "epochs_used": int(self.epochs_used),
            "budget_left": int(self.budget_left),
            "best_val_rmse": self.best_val_rmse,
            **{f"hp_{k}": v for k, v in self.hyperparameters().items()},
        }


# --------------------------------------------------------------------------
# Task construction


def _training_and_validation_rows(
    df: pd.DataFrame, split, split_kind: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Return the training and validation rows of ``split``, checked against its test rows.

    The test rows are read only to check that no formula of the training or
    validation part occurs in the test part; they are not returned.
    """
    if split is None:
        from dvmrl.splits import make_split

        split = make_split(df, split_kind, seed)
    train = np.asarray(split.train, dtype=np.int64)
    val = np.asarray(split.val, dtype=np.int64)
    test = np.asarray(split.test, dtype=np.int64)
    n = len(df)
    for label, rows in (("train", train), ("val", val), ("test", test)):
        if len(rows) and (rows.min() < 0 or rows.max() >= n):
            raise ValueError(
                f"split.{label} has rows outside 0 .. {n - 1}; the split belongs to "
                "another data frame"
            )
    formulas = df["formula"].to_numpy()
    test_formulas = set(formulas[test].tolist())
    for label, rows in (("train", train), ("val", val)):
        leaked = sorted(set(formulas[rows].tolist()) & test_formulas)
        if leaked:
            raise ValueError(
                f"split.{label} shares {len(leaked)} formulas with split.test (first: "
                f"{leaked[0]}); the environment must never see test compositions, so "
                "pass a split whose parts are disjoint"
            )
    if len(train) == 0 or len(val) == 0:
        raise ValueError(
            f"the split has {len(train)} training and {len(val)} validation rows; "
            "both parts must be non-empty"
        )
    return train, val


def task_feature_count() -> int:
    """Return the number of composition features that describe a task."""
    from dvmrl.featurize import composition_features, featurize

    return composition_features(featurize(["AlNi"]), **TASK_FEATURE_OPTIONS).shape[1]


def observation_size(
    n_features: int, k_correlations: int = DEFAULT_K_CORRELATIONS
) -> int:
    """Return the observation length for ``n_features`` composition features.

    The task features are the mean and standard deviation of every feature
    plus ``k_correlations`` correlations; the other entries are fixed.
    """
    task = 2 * int(n_features) + int(k_correlations)
    return 6 + 1 + task + 1 + 7 + 1 + len(VALIDATION_STRATEGIES)


def _spread(rows: np.ndarray, size: int) -> np.ndarray:
    """Return ``size`` entries of ``rows`` at evenly spaced positions (all if fewer)."""
    if len(rows) <= size:
        return rows
    # The spacing (len - 1) / (size - 1) exceeds 1, so the rounded positions differ.
    return rows[np.linspace(0, len(rows) - 1, size).round().astype(np.int64)]


def _subsample(rows: np.ndarray, size: int | None, rng: np.random.Generator) -> np.ndarray:
    if size is None or len(rows) <= size:
        return np.sort(rows)
    if size < 1:
        raise ValueError(f"subsample sizes must be >= 1 or None, got {size}")
    return np.sort(rng.choice(rows, size, replace=False))


def _featurize_task(df: pd.DataFrame, train_rows: np.ndarray, pool_rows: np.ndarray) -> _Task:
    from dvmrl.featurize import composition_features, featurize

    formulas = df["formula"].to_numpy().astype(str)
    target = df["target"].to_numpy(np.float64)
    # One batch contains both pools (training rows first), so that the validation
    # strategies can index every composition by row.
    x_all = featurize(list(formulas[train_rows]) + list(formulas[pool_rows]))
    n_train = len(train_rows)
    x_train = x_all[:n_train]
    x_pool = x_all[n_train:]
    return _Task(
        x_all=x_all,
        n_train=n_train,
        features_all=composition_features(x_all),
        x_train=x_train,
        y_train=target[train_rows],
        f_train=composition_features(x_train, **TASK_FEATURE_OPTIONS),
        formulas_train=formulas[train_rows],
        x_pool=x_pool,
        y_pool=target[pool_rows],
        f_pool=composition_features(x_pool, **TASK_FEATURE_OPTIONS),
        formulas_pool=formulas[pool_rows],
    )


# --------------------------------------------------------------------------
# Shift detection (adversarial validation) and vulnerability


def _adversarial_validation_probabilities(
    f_train: np.ndarray, f_other: np.ndarray, rng: np.random.Generator, n_train: int = 600
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fit a classifier of training (0) against ``f_other`` (1) with 3-fold cross-fitting.

    Returns (labels, out-of-fold probabilities of class 1, indices of the
    training rows used).
    """
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    used = rng.choice(len(f_train), min(n_train, len(f_train)), replace=False)
    x = np.concatenate([f_train[used], f_other])
    labels = np.concatenate([np.zeros(len(used)), np.ones(len(f_other))])
    if min(len(used), len(f_other)) < 3:
        # Three folds need three rows of each class. With fewer, every
        # composition gets probability 0.5, which means no detectable shift.
        return labels, np.full(len(labels), 0.5), used
    folds = StratifiedKFold(n_splits=3, shuffle=True, random_state=int(rng.integers(2**31 - 1)))
    # A shrinkage LDA fits in closed form, far faster than an iterative
    # logistic regression, and is enough for a linear shift detector.
    classifier = LinearDiscriminantAnalysis(solver="lsqr", shrinkage="auto")
    probability = cross_val_predict(classifier, x, labels, cv=folds, method="predict_proba")[:, 1]
    return labels, probability, used


def _adversarial_validation_auc(
    f_train: np.ndarray, f_val: np.ndarray, rng: np.random.Generator
) -> float:
    """Return the cross-validated ROC AUC of telling ``f_val`` from the training pool."""
    from sklearn.metrics import roc_auc_score

    labels, probability, _ = _adversarial_validation_probabilities(f_train, f_val, rng)
    return float(roc_auc_score(labels, probability))


def _adversarial_validation_scores(
    f_train: np.ndarray, f_pool: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Return, per pool composition, the out-of-fold probability that it is not training data."""
    labels, probability, _ = _adversarial_validation_probabilities(f_train, f_pool, rng)
    return probability[labels == 1]


# --------------------------------------------------------------------------
# Checkpoints and scaling


def _trainer_classes():
    try:
        from dvmrl.training import TrainConfig, Trainer
    except ImportError:
        # NOTE: fallback for a checkout whose dvmrl.training lacks __init__.py.
        from dvmrl.training.config import TrainConfig
        from dvmrl.training.trainer import Trainer
    return TrainConfig, Trainer


def _copy_state(trainer) -> dict[str, Any]:
    """Return a copy of the trainer's current weights with their model config."""
    return trainer.current_state()


def _predict_state(best: dict[str, Any], x, device) -> np.ndarray:
    """Predict with a kept checkpoint whose architecture differs from the trainer's."""
    from dvmrl.model import CompositionMPNN, ModelConfig

    model = CompositionMPNN(ModelConfig.from_dict(best["model_config"]))
    weights = best["state"]["state"]
    model = model.to(device=device, dtype=weights["flat"].dtype)
    model.load_state_dict(weights)
    model.eval()
    dtype = next(model.parameters()).dtype
    batch = x.to(device, dtype)
    with torch.no_grad():
        prediction = model(batch.element_index, batch.frac, batch.mask)
    return prediction.to("cpu", torch.float64).numpy()


def _unit(value: float, bounds: Sequence[float]) -> float:
    low, high = bounds
    return (value - low) / (high - low)


def _unit_log(value: float, bounds: Sequence[float]) -> float:
    low, high = bounds
    return (math.log(value) - math.log(low)) / (math.log(high) - math.log(low))
