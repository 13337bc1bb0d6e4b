"""Training settings (``TrainConfig``) and the learning-rate schedule."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any

from dvmrl import defaults
from dvmrl.layout import is_integral

SCHEDULES = ("cosine", "plateau", "constant")
MONITORS = ("val_rmse", "val_mae")
LOSSES = ("mse", "huber", "l1")


# Fields that must be real numbers (the others are names, None or pairs).
_NUMERIC_FIELDS = (
    "lr",
    "batch_size",
    "weight_decay",
    "epochs",
    "patience",
    "seed",
    "warmup_epochs",
    "min_lr_ratio",
    "plateau_factor",
    "plateau_patience",
    "eval_batch_size",
    "adam_eps",
    "ema_decay",
    "huber_delta",
)


def _scalar(value: Any) -> Any:
    """Return the Python number of a 0-d array or tensor, else ``value``."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    return value


@dataclass
class TrainConfig:
    """Optimiser, schedule and stopping settings of a ``Trainer``.

    Defaults come from ``dvmrl.defaults.TRAIN``; settings it does not name
    use the values below.

    Attributes:
        lr (float): base learning rate of AdamW.
        batch_size (int): compositions per optimisation step.
        weight_decay (float): decoupled (AdamW) weight decay, applied to the
            weight matrices, the gate vectors ``*gate_u``, ``emb_w``,
            ``emb_offset`` and the fraction encoder's ``frac_w1`` and
            ``frac_w2``, but not to biases.
        epochs (int): total epochs of a ``fit()`` without an explicit count;
            also the horizon of the cosine schedule.
        patience (int): epochs without a better validation score before
            early stopping.
        grad_clip (float or None): maximum global gradient norm; None or 0
            disables clipping.
        seed (int): seed of the initialisation, shuffling and dropout.
        schedule (str): ``"cosine"`` (linear warm-up, then cosine decay to
            ``min_lr_ratio * lr`` at epoch ``epochs``, constant after),
            ``"plateau"`` (warm-up, then multiply by ``plateau_factor`` after
            ``plateau_patience`` epochs without a better validation score,
            down to ``min_lr_ratio * lr``) or ``"constant"`` (warm-up only).
        warmup_epochs (float): length of the linear warm-up in epochs; 0
            disables it.
        min_lr_ratio (float): floor of the schedule, relative to ``lr``.
        plateau_factor (float): factor of each plateau reduction, in (0, 1).
        plateau_patience (int): epochs without improvement per reduction.
        monitor (str): validation score for early stopping, best-weight
            selection and the plateau schedule: ``"val_rmse"`` or
            ``"val_mae"`` (eV/atom).
        eval_batch_size (int): compositions per forward pass in evaluation.
        adam_betas (tuple): AdamW (beta1, beta2).
        adam_eps (float): AdamW epsilon.
        ema_decay (float): decay of the exponential moving average of the
            weights, in [0, 1); 0 turns the average off. With it on, the
            model contains the averaged weights between epochs, so validation,
            best-weight selection, predictions and checkpoints use them,
            and the optimiser steps a separate copy. Step t uses the decay
            min(ema_decay, (1 + t) / (10 + t)), so the average follows the
            weights closely at the start.
        loss (str): per-composition loss of a single-output head, on the
            standardised residual r: ``"mse"`` (r^2), ``"huber"`` (r^2 for
            |r| <= delta, 2 delta |r| - delta^2 beyond, i.e. twice the usual
            Huber loss, so it equals the squared error near zero) or ``"l1"``
            (|r|). The robust losses keep a few compositions with very large
            errors from steering the fit. A heteroscedastic head ignores this
            setting: it always trains with its Gaussian negative
            log-likelihood.
        huber_delta (float): Huber threshold delta in eV/atom (> 0); the
            trainer divides it by the standard deviation of the training
            targets.
    """

    lr: float = defaults.TRAIN["lr"]
    batch_size: int = defaults.TRAIN["batch_size"]
    weight_decay: float = defaults.TRAIN["weight_decay"]
    epochs: int = defaults.TRAIN["epochs"]
    patience: int = defaults.TRAIN["patience"]
    grad_clip: float | None = defaults.TRAIN["grad_clip"]
    seed: int = defaults.TRAIN["seed"]
    schedule: str = defaults.TRAIN.get("schedule", "cosine")
    warmup_epochs: float = defaults.TRAIN.get("warmup_epochs", 1.0)
    min_lr_ratio: float = defaults.TRAIN.get("min_lr_ratio", 0.01)
    plateau_factor: float = defaults.TRAIN.get("plateau_factor", 0.5)
    plateau_patience: int = defaults.TRAIN.get("plateau_patience", 5)
    monitor: str = defaults.TRAIN.get("monitor", "val_rmse")
    eval_batch_size: int = defaults.TRAIN.get("eval_batch_size", 4096)
    adam_betas: tuple[float, float] = tuple(
        defaults.TRAIN.get("adam_betas", (0.9, 0.999))
    )
    adam_eps: float = defaults.TRAIN.get("adam_eps", 1e-8)
    ema_decay: float = defaults.TRAIN.get("ema_decay", 0.0)
    loss: str = defaults.TRAIN["loss"]
    huber_delta: float = defaults.TRAIN["huber_delta"]

    def __post_init__(self) -> None:
        # Comparisons below would fail on a string ("1e-3") with a TypeError
        # that names no field, so the types are checked first. 0-d arrays
        # and tensors become Python numbers.
        for name in _NUMERIC_FIELDS:
            value = _scalar(getattr(self, name))
            if not isinstance(value, numbers.Real):
                raise ValueError(
                    f"TrainConfig.{name} must be a number, got {value!r}"
                )
            setattr(self, name, value)
        self.grad_clip = _scalar(self.grad_clip)
        clip = self.grad_clip
        if clip is not None and not isinstance(clip, numbers.Real):
            raise ValueError(
                f"TrainConfig.grad_clip must be None or a number, got {clip!r}"
            )
        betas = self.adam_betas
        if (
            isinstance(betas, str)
            or not hasattr(betas, "__len__")
            or len(betas) != 2
            or not all(isinstance(b, numbers.Real) for b in betas)
        ):
            raise ValueError(
                f"TrainConfig.adam_betas must be two numbers in [0, 1), got {betas!r}"
            )
        self.adam_betas = (float(betas[0]), float(betas[1]))
        checks = [
            ("lr", self.lr > 0 and math.isfinite(self.lr), "a positive finite number"),
            (
                "batch_size",
                is_integral(self.batch_size) and self.batch_size >= 1,
                "an integer >= 1",
            ),
            (
                "weight_decay",
                self.weight_decay >= 0 and math.isfinite(self.weight_decay),
                ">= 0",
            ),
            ("epochs", is_integral(self.epochs) and self.epochs >= 0, "an integer >= 0"),
            (
                "patience",
                is_integral(self.patience) and self.patience >= 1,
                "an integer >= 1",
            ),
            (
                "grad_clip",
                self.grad_clip is None
                or (self.grad_clip >= 0 and not math.isnan(self.grad_clip)),
                "None or >= 0",
            ),
            ("seed", is_integral(self.seed) and self.seed >= 0, "an integer >= 0"),
            ("schedule", self.schedule in SCHEDULES, f"one of {SCHEDULES}"),
            (
                "warmup_epochs",
                self.warmup_epochs >= 0 and math.isfinite(self.warmup_epochs),
                "a finite number >= 0",
            ),
            ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
            ("plateau_factor", 0 < self.plateau_factor < 1, "in (0, 1)"),
            (
                "plateau_patience",
                is_integral(self.plateau_patience) and self.plateau_patience >= 1,
                "an integer >= 1",
            ),
            ("monitor", self.monitor in MONITORS, f"one of {MONITORS}"),
            (
                "eval_batch_size",
                is_integral(self.eval_batch_size) and self.eval_batch_size >= 1,
                "an integer >= 1",
            ),
            (
                "adam_betas",
                all(0 <= b < 1 for b in self.adam_betas),
                "two values in [0, 1)",
            ),
            (
                "adam_eps",
                self.adam_eps > 0 and math.isfinite(self.adam_eps),
                "a positive finite number",
            ),
            ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1) (0 turns it off)"),
            ("loss", self.loss in LOSSES, f"one of {LOSSES}"),
            (
                "huber_delta",
                self.huber_delta > 0 and math.isfinite(self.huber_delta),
                "a positive finite number (eV/atom)",
            ),
        ]
        for name, valid, expected in checks:
            if not valid:
                raise ValueError(
                    f"TrainConfig.{name} must be {expected}, "
                    f"got {getattr(self, name)!r}"
                )
        # Plain ints, so that to_dict gives JSON values for NumPy scalars too.
        for name in ("batch_size", "epochs", "patience", "seed", "plateau_patience"):
            setattr(self, name, int(getattr(self, name)))
        self.eval_batch_size = int(self.eval_batch_size)

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-serialisable dict."""
        values = dataclasses.asdict(self)
        values["adam_betas"] = list(self.adam_betas)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build a config from ``to_dict`` output; missing keys take defaults.

        A dict without ``ema_decay`` comes from a run saved before weight
        averaging existed, so that field becomes 0 rather than the default;
        likewise a dict without ``loss`` trained with the squared error.

        Raises:
            ValueError: for an unknown key or an invalid value.
        """
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown TrainConfig keys {unknown}; expected a subset of "
                f"{sorted(known)}"
            )
        values = {"ema_decay": 0.0, "loss": "mse", **values}
        return cls(**values)


class LearningRateSchedule:
    """Multiplier of the base learning rate, by training progress in epochs.

    The state (plateau counters) is plain JSON, so checkpoints can store it
    and a resumed training continues with the same learning rates.
    """

    def __init__(self) -> None:
        self.reductions = 0
        self.best = math.inf
        self.epochs_without_improvement = 0

    def factor(self, config: TrainConfig, progress: float) -> float:
        """Return the multiplier of ``config.lr`` after ``progress`` epochs."""
        warmup = 1.0
        if config.warmup_epochs > 0:
            warmup = min(1.0, progress / config.warmup_epochs)
        if config.schedule == "cosine":
            horizon = max(config.epochs, 1)
            t = min(progress / horizon, 1.0)
            decay = config.min_lr_ratio + (1.0 - config.min_lr_ratio) * 0.5 * (
                1.0 + math.cos(math.pi * t)
            )
        elif config.schedule == "plateau":
            decay = max(config.plateau_factor**self.reductions, config.min_lr_ratio)
        else:
            decay = 1.0
        return warmup * decay

    def end_epoch(self, config: TrainConfig, score: float | None) -> None:
        """Record the epoch's validation score (plateau bookkeeping)."""
        if config.schedule != "plateau" or score is None or not math.isfinite(score):
            return
        if score < self.best:
            self.best = score
            self.epochs_without_improvement = 0
            return
        self.epochs_without_improvement += 1
        if self.epochs_without_improvement >= config.plateau_patience:
            self.reductions += 1
            self.epochs_without_improvement = 0

    def reset_plateau(self) -> None:
        """Forget the best score, as after a change of the validation set."""
        self.best = math.inf
        self.epochs_without_improvement = 0

    def state_dict(self) -> dict[str, Any]:
        """Return the state as JSON-ready values."""
        return {
            "reductions": self.reductions,
            "best": None if math.isinf(self.best) else self.best,
            "epochs_without_improvement": self.epochs_without_improvement,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state from ``state_dict`` output."""
        self.reductions = int(state["reductions"])
        self.best = math.inf if state["best"] is None else float(state["best"])
        self.epochs_without_improvement = int(state["epochs_without_improvement"])
