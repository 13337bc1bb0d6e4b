"""``Trainer``: fits a ``CompositionMPNN`` and changes it while it trains.

The trainer keeps the featurised training and validation tensors on the
compute device and draws batches by index, so an epoch costs one shuffle
and one optimiser step per batch. The loss on the standardised targets
is set by ``TrainConfig.loss``: the Huber loss by default, or the squared
or absolute error. With the heteroscedastic head it is the Gaussian
negative log-likelihood (up to the constant 0.5 log 2 pi). Per-sample
weights multiply the per-composition loss.

Determinism: the initialisation, shuffling, dropout masks and architecture
moves draw from their own ``torch.Generator`` objects, seeded from
``TrainConfig.seed``, and checkpoints store their states, so a resumed
training repeats the uninterrupted one bit for bit. The fused kernels give
the same bits for any CPU thread count.

NOTE: the reference path (``use_fused=False``) inherits PyTorch's matrix
products, whose results can depend on the thread count. With PyTorch 2.13
(MKL), the default model and batch size 512, the weights after one epoch on
1 and 2 threads differed by up to 2e-4; at batch size 128 they matched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dvmrl._runtime import resolve_device, torch_threads
from dvmrl.layout import parameter_layout, unflatten
from dvmrl.model import (
    LOG_VARIANCE_MAX,
    LOG_VARIANCE_MIN,
    CompositionMPNN,
    ModelConfig,
    check_dtype,
)
from dvmrl.training import checkpoint as ckpt
from dvmrl.training import moves
from dvmrl.training.config import LearningRateSchedule, TrainConfig
from dvmrl.training.data import (
    DeviceSet,
    batch_tensors,
    check_targets,
)

logger = logging.getLogger(__name__)

# Default number of MC-dropout samples for predict_with_uncertainty.
MC_SAMPLES = 30


MC_DROPOUT_NEEDED = (
    "MC-dropout sampling needs head dropout; set a dropout > 0 with "
    "set_hyperparameters(dropout=...) and head_layers >= 1"
)


class TrainingDivergedError(RuntimeError):
    """The training loss or the weights became NaN or infinite.

    Attributes:
        loss (float or None): the epoch's mean training loss: NaN or
            infinite, or finite when an update late in the epoch made the
            weights non-finite.
        epoch (int or None): the epoch, counted from 1.
        lr (float or None): the peak learning rate of the run.
        grad_clip (float or None): the gradient-norm clipping threshold;
            None or 0 when clipping is off.
    """

    def __init__(
        self,
        message: str,
        *,
        loss: float | None = None,
        epoch: int | None = None,
        lr: float | None = None,
        grad_clip: float | None = None,
    ) -> None:
        super().__init__(message)
        self.loss = loss
        self.epoch = epoch
        self.lr = lr
        self.grad_clip = grad_clip


def _seed_streams(seed: int) -> dict[str, int]:
    """Derive independent seeds for the generators from one seed."""
    words = np.random.SeedSequence(int(seed)).generate_state(4, dtype=np.uint64)
    names = ("init", "shuffle", "dropout", "moves")
    return {
        name: int(word >> np.uint64(1)) for name, word in zip(names, words, strict=True)
    }


class Trainer:
    """Train a ``CompositionMPNN`` with AdamW, a schedule and early stopping.

    Args:
        model_config (ModelConfig, optional): sizes; default ``ModelConfig()``.
        train_config (TrainConfig, optional): settings; default ``TrainConfig()``.
        x_train (CompositionBatch): training compositions.
        y_train (array): training targets [N] in eV/atom.
        x_val (CompositionBatch, optional): validation compositions for early
            stopping and best-weight selection; None trains without them.
        y_val (array, optional): validation targets in eV/atom.
        device (str or torch.device): compute device: ``"cpu"``, ``"cuda"``,
            ``"cuda:N"`` or ``"auto"`` (CUDA when usable). Default: ``"cpu"``.
        dtype (torch.dtype): float dtype of the model. Default: float32.
        use_fused (bool): run the fused kernels of ``dvmrl.ops`` (default) or
            the plain PyTorch reference path.
        descriptors (array, optional): element descriptors [103, F0]; default
            ``dvmrl.elements.descriptor_matrix()``.

    Attributes:
        model (CompositionMPNN): the model; architecture moves change it in
            place.
        train_config (TrainConfig): current settings.
        history (list[dict]): one record per epoch done.
        epochs_done (int): passes over the training set so far.
    """

    def __init__(
        self,
        model_config: ModelConfig | None,
        train_config: TrainConfig | None,
        x_train: Any,
        y_train: Any,
        x_val: Any = None,
        y_val: Any = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        use_fused: bool = True,
        descriptors: Any = None,
    ) -> None:
        self.train_config = TrainConfig() if train_config is None else train_config
        model_config = ModelConfig() if model_config is None else model_config
        check_dtype(dtype)
        # resolve_device names the fix when CUDA is asked for but unusable,
        # where moving a tensor would fail with a bare AssertionError. None
        # keeps the CPU default here, whereas resolve_device reads it as "auto".
        self.device = resolve_device("cpu" if device is None else device)
        self.dtype = dtype
        self._train = DeviceSet(x_train, y_train, "x_train", self.device, dtype)
        self._val: DeviceSet | None = None
        if (x_val is None) != (y_val is None):
            raise ValueError("pass both x_val and y_val, or neither")
        if x_val is not None:
            self._val = DeviceSet(x_val, y_val, "x_val", self.device, dtype)

        seeds = _seed_streams(self.train_config.seed)
        model = CompositionMPNN(
            model_config, descriptors=descriptors, seed=seeds["init"], dtype=dtype
        )
        mean = float(self._train.y_numpy.mean())
        std = float(self._train.y_numpy.std())
        model.set_target_scaling(mean, std if std > 0 else 1.0)
        self.model = model.to(device=self.device, dtype=dtype)
        self.model.use_fused = bool(use_fused)

        self._shuffle_generator = torch.Generator().manual_seed(seeds["shuffle"])
        self._dropout_generator = torch.Generator(device=self.device).manual_seed(
            seeds["dropout"]
        )
        self._move_generator = torch.Generator().manual_seed(seeds["moves"])
        self.model.dropout_generator = self._dropout_generator

        self._y_train_std = (
            self._train.y - self.model.target_mean
        ) / self.model.target_std
        self._weights: torch.Tensor | None = None
        self._schedule = LearningRateSchedule()
        self.history: list[dict[str, Any]] = []
        self.epochs_done = 0
        self._best_score = math.inf
        self._best_epoch: int | None = None
        self._best_state: dict[str, torch.Tensor] | None = None
        self._bad_epochs = 0
        self._fit_target: int | None = None
        # Whether the last fit ended (early stop or its target), stored in
        # checkpoints so that fit() on a trainer restored from such a
        # checkpoint trains no further, as the uninterrupted run did not.
        self._fit_finished = False
        self._restored_finished = False
        # Weight averaging (TrainConfig.ema_decay > 0): between epochs the
        # model contains the average and _raw_weights the optimiser's own
        # iterate. _given_average is a copy of the average the model was
        # given, which detects weights changed from outside (moves,
        # load_state, the end of fit).
        self._raw_weights: list[torch.Tensor] | None = None
        self._given_average: list[torch.Tensor] | None = None
        self._ema_updates = 0
        self._build_optimizer()

    # -- properties ------------------------------------------------------

    @property
    def model_config(self) -> ModelConfig:
        """Current sizes of the model."""
        return self.model.config

    @property
    def n_train(self) -> int:
        """Number of training compositions."""
        return len(self._train)

    @property
    def best_epoch(self) -> int | None:
        """Epoch count at the best validation score so far (None before one)."""
        return self._best_epoch

    @property
    def best_score(self) -> float | None:
        """Best validation score so far (``TrainConfig.monitor``, eV/atom)."""
        return None if math.isinf(self._best_score) else self._best_score

    def _parameter_names(self) -> tuple[str, ...]:
        """Return the optimised parameters' names: the embedding stage, then ``flat``.

        The optimiser takes the parameters in this order, and checkpoints
        store their moments by these names.
        """
        return (*self.model.config.embedding_names, "flat")

    def _parameters(self) -> list[torch.nn.Parameter]:
        return [getattr(self.model, name) for name in self._parameter_names()]

    # -- optimiser -------------------------------------------------------

    def _build_optimizer(self) -> None:
        config = self.train_config
        # Weight decay is applied by _apply_weight_decay with a mask that
        # spares the biases, so AdamW itself runs with weight_decay=0.
        options = {
            "lr": config.lr,
            "betas": config.adam_betas,
            "eps": config.adam_eps,
            "weight_decay": 0.0,
        }
        # PyTorch's fused AdamW updates every parameter in one kernel call.
        # A CPU epoch of the default model on one thread took 1.34 s against
        # 1.56 s with PyTorch's default AdamW (2-core Intel Xeon VM). Its
        # rounding differs, and some devices and PyTorch versions lack it,
        # so the default implementation is the fallback.
        try:
            self._optimizer = torch.optim.AdamW(
                self._parameters(), fused=True, **options
            )
        except (RuntimeError, TypeError, ValueError):
            self._optimizer = torch.optim.AdamW(self._parameters(), **options)
        mask = torch.zeros(
            self.model.flat.numel(), dtype=self.dtype, device=self.device
        )
        for spec in parameter_layout(self.model.dims):
            base = spec.name.split(".")[-1]
            if len(spec.shape) == 2 or base in ("gate_u", "pool_gate_u"):
                mask[spec.offset : spec.offset + spec.numel] = 1.0
        self._flat_decay_mask = mask

    @torch.no_grad()
    def _apply_weight_decay(self, lr: float) -> None:
        decay = lr * self.train_config.weight_decay
        if decay == 0.0:
            return
        self.model.flat.addcmul_(self.model.flat, self._flat_decay_mask, value=-decay)
        # As in the flat buffer, matrices decay and biases do not: emb_w,
        # emb_offset, frac_w1 and frac_w2 are the matrices of the embedding stage.
        for name in self.model.config.embedding_names:
            parameter = getattr(self.model, name)
            if parameter.dim() == 2:
                parameter.mul_(1.0 - decay)

    # -- weight averaging ------------------------------------------------

    @torch.no_grad()
    def _enter_raw_weights(self, parameters: list[torch.nn.Parameter]) -> list:
        """Put the optimiser's iterate into the model; return the average buffers.

        When the model no longer contains the average that the last epoch left
        (an architecture move, ``load_state``, the end of ``fit``), the
        average restarts from the current weights.
        """
        if self._holds_given_average(parameters):
            for parameter, raw in zip(parameters, self._raw_weights, strict=True):
                parameter.copy_(raw)
            return self._given_average
        self._ema_updates = 0
        return [p.detach().clone() for p in parameters]

    def _holds_given_average(self, parameters: list[torch.nn.Parameter]) -> bool:
        """Tell whether the model still contains the average the last epoch left."""
        given = self._given_average
        return (
            given is not None
            and self._raw_weights is not None
            and len(given) == len(parameters)
            and all(
                a.shape == p.shape and torch.equal(a, p)
                for a, p in zip(given, parameters, strict=True)
            )
        )

    @torch.no_grad()
    def _update_average(self, average: list, parameters: list) -> None:
        t = self._ema_updates
        decay = min(self.train_config.ema_decay, (1.0 + t) / (10.0 + t))
        torch._foreach_lerp_(average, [p.detach() for p in parameters], 1.0 - decay)
        self._ema_updates += 1

    @torch.no_grad()
    def _leave_raw_weights(self, average: list, parameters: list) -> None:
        """Keep the iterate aside and give the model the averaged weights."""
        self._raw_weights = [p.detach().clone() for p in parameters]
        for parameter, value in zip(parameters, average, strict=True):
            parameter.copy_(value)
        self._given_average = average

    def _set_lr(self, lr: float) -> None:
        for group in self._optimizer.param_groups:
            group["lr"] = lr

    def current_lr(self) -> float:
        """Return the learning rate the next step would use."""
        steps = math.ceil(self.n_train / self.train_config.batch_size)
        progress = self.epochs_done + 1.0 / steps
        return self.train_config.lr * self._schedule.factor(self.train_config, progress)

    # -- one epoch -------------------------------------------------------

    def _loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        residual = output[:, 0] - target
        if not self.model.config.heteroscedastic:
            loss = self.train_config.loss
            if loss == "mse":
                return residual.square()
            if loss == "l1":
                return residual.abs()
            # Huber, scaled by 2 so that it matches r^2 below delta.
            delta = self.train_config.huber_delta / float(self.model.target_std)
            magnitude = residual.abs()
            return torch.where(
                magnitude <= delta,
                residual.square(),
                2.0 * delta * magnitude - delta * delta,
            )
        log_variance = output[:, 1].clamp(LOG_VARIANCE_MIN, LOG_VARIANCE_MAX)
        return 0.5 * (log_variance + residual.square() * torch.exp(-log_variance))

    def _optimise_epoch(self) -> tuple[float, float]:
        """Run one pass over the shuffled training set; return (loss, last lr)."""
        config = self.train_config
        train = self._train
        self.model.train()
        count = len(train)
        batch_size = config.batch_size
        steps = math.ceil(count / batch_size)
        order = torch.randperm(count, generator=self._shuffle_generator).to(self.device)
        parameters = self._parameters()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        lr = config.lr
        average = None
        if config.ema_decay > 0:
            average = self._enter_raw_weights(parameters)

        for step in range(steps):
            index = order[step * batch_size : (step + 1) * batch_size]
            progress = self.epochs_done + (step + 1) / steps
            lr = config.lr * self._schedule.factor(config, progress)
            self._set_lr(lr)

            output = self.model.forward_standardised(
                train.element_index[index], train.frac[index], train.mask[index]
            )
            per_sample = self._loss(output, self._y_train_std[index])
            if self._weights is not None:
                per_sample = per_sample * self._weights[index]
            loss = per_sample.mean()

            self._optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(
                    parameters, config.grad_clip, foreach=True
                )
            self._apply_weight_decay(lr)
            self._optimizer.step()
            if average is not None:
                self._update_average(average, parameters)
            total += loss.detach().to(torch.float64) * index.numel()

        if average is not None:
            self._leave_raw_weights(average, parameters)
        # Outside the training steps the model predicts: without this, a
        # caller of trainer.model after fit() got dropout, and each call drew
        # from the trainer's dropout stream and changed the next epochs.
        self.model.eval()

        # One host synchronisation per epoch, not per step.
        return float(total) / count, lr

    def _run_epoch(self) -> dict[str, Any]:
        started = time.perf_counter()
        with self._small_op_threads():
            return self._run_epoch_steps(started)

    def _small_op_threads(self) -> contextlib.AbstractContextManager:
        """Run PyTorch's own CPU ops on one thread while the fused kernels train.

        Around the fused kernels, which use dvmrl's own thread pool, PyTorch
        runs only small ops (the embedding, the fraction encoder, AdamW, the
        weight average). With two PyTorch threads, each such op woke the
        second thread. An epoch of the default model at batch size 64 then
        took 1.9x as long as with one thread: 0.31 s against 0.17 s on 4,000
        compositions (2-core VM, dvmrl on two threads in both). The results
        are the same bits either way.
        """
        if self.device.type != "cpu" or not self.model.use_fused:
            return contextlib.nullcontext()
        return torch_threads(1)

    def _run_epoch_steps(self, started: float) -> dict[str, Any]:
        train_loss, lr = self._optimise_epoch()
        self.epochs_done += 1
        if not math.isfinite(train_loss):
            self._diverged(
                f"training loss is {train_loss} in epoch {self.epochs_done}", train_loss
            )
        # Each step's loss is taken before its update, so an update that
        # overflows in the epoch's last step leaves the mean loss finite.
        if not all(bool(torch.isfinite(p).all()) for p in self._parameters()):
            self._diverged(
                f"the weights are NaN or infinite after epoch {self.epochs_done}, "
                f"whose mean training loss {train_loss:.6g} was finite (an update "
                "late in the epoch overflowed)",
                train_loss,
            )

        val_rmse, val_mae = self._validation_errors()
        record = {
            "epoch": self.epochs_done,
            "train_loss": train_loss,
            "val_rmse": val_rmse,
            "val_mae": val_mae,
            "lr": lr,
            "time_s": time.perf_counter() - started,
        }

        score = record[self.train_config.monitor]
        self._schedule.end_epoch(self.train_config, score)
        if score is not None and score < self._best_score:
            self._best_score = score
            self._best_epoch = self.epochs_done
            self._best_state = self._copy_state()
            self._bad_epochs = 0
        else:
            self._bad_epochs += 1
        self.history.append(record)
        return record

    def _diverged(self, reason: str, loss: float) -> None:
        """Raise TrainingDivergedError with advice on the learning rate and clipping."""
        lr, clip = self.train_config.lr, self.train_config.grad_clip
        if clip:
            advice = (
                f"lower the learning rate (now {lr:g}); gradient clipping is "
                f"already on at norm {clip:g}"
            )
        else:
            advice = (
                f"lower the learning rate (now {lr:g}) or set grad_clip, such as 5.0"
            )
        raise TrainingDivergedError(
            f"{reason}; {advice}",
            loss=loss,
            epoch=self.epochs_done,
            lr=lr,
            grad_clip=clip,
        )

    def _validation_errors(self) -> tuple[float | None, float | None]:
        if self._val is None:
            return None, None
        prediction = self._predict_tensors(
            self._val.element_index, self._val.frac, self._val.mask
        )
        error = prediction.to(torch.float64) - self._val.y64
        return float(error.square().mean().sqrt()), float(error.abs().mean())

    def _run(
        self,
        target: int,
        early_stopping: bool,
        progress: Callable[[dict[str, Any]], Any] | None,
        checkpoint: str | os.PathLike | None,
        metadata: dict[str, Any] | None,
        before_checkpoint: Callable[[], Any] | None = None,
    ) -> list[dict[str, Any]]:
        records = []
        # A checkpoint written during a fit stores its target, so that a
        # resumed fit stops where the uninterrupted one would have.
        self._fit_target = target if early_stopping else None
        self._fit_finished = False
        self._restored_finished = False
        while self.epochs_done < target:
            record = self._run_epoch()
            records.append(record)
            stop = (
                early_stopping
                and self._val is not None
                and self._bad_epochs >= self.train_config.patience
            )
            if stop or self.epochs_done >= target:
                self._fit_target = None
                self._fit_finished = early_stopping
            if checkpoint is not None:
                if before_checkpoint is not None:
                    before_checkpoint()
                self.save(checkpoint, metadata=metadata)
            if progress is not None:
                progress(record)
            if stop:
                logger.info(
                    "early stop after epoch %d: no better %s for %d epochs (best %.4g "
                    "eV/atom at epoch %s)",
                    self.epochs_done,
                    self.train_config.monitor,
                    self._bad_epochs,
                    self._best_score,
                    self._best_epoch,
                )
                break
        self._fit_target = None
        return records

    # -- public training API --------------------------------------------

    def fit(
        self,
        epochs: int | None = None,
        progress: Callable[[dict[str, Any]], Any] | None = None,
        checkpoint: str | os.PathLike | None = None,
        metadata: dict[str, Any] | None = None,
        before_checkpoint: Callable[[], Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Train with early stopping and end on the best-validation weights.

        Continues from the current state. With a validation set, the model
        ends with the weights of the best validation score seen so far. The
        optimiser keeps its latest moments.

        Args:
            epochs (int, optional): epochs to run at most in this call.
                Default: up to ``train_config.epochs`` in total, or the target
                of a fit that a checkpoint interrupted. The first call of a
                trainer restored from a checkpoint continues the fit that
                wrote it, so after a finished fit it trains nothing and
                returns ``[]`` (as the uninterrupted run stopped there); pass
                ``epochs`` to train further.
            progress (callable, optional): called with each epoch's record.
            checkpoint (path, optional): file to rewrite with the full resume
                state after every epoch.
            metadata (dict, optional): metadata for those checkpoints.
            before_checkpoint (callable, optional): called before each
                checkpoint is written; an exception it raises stops the fit
                before the write (the CLI checks there that its output
                folder still exists).

        Returns:
            list[dict]: the records of the epochs run (``epoch``,
            ``train_loss`` in standardised units, ``val_rmse`` and
            ``val_mae`` in eV/atom or None without validation set, ``lr``,
            ``time_s``).
        """
        restored_finished, self._restored_finished = self._restored_finished, False
        if epochs is not None:
            if int(epochs) != epochs or epochs < 0:
                raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
            target = self.epochs_done + int(epochs)
            self._bad_epochs = 0
        elif restored_finished:
            # The checkpoint's fit had ended, so the uninterrupted run trained
            # no further.
            if self._best_state is not None:
                self.model.load_state_dict(self._best_state)
            return []
        elif self._fit_target is not None:
            target = self._fit_target  # continue a fit restored from a checkpoint
        else:
            target = self.train_config.epochs
            self._bad_epochs = 0
        records = self._run(
            target, True, progress, checkpoint, metadata, before_checkpoint
        )
        if self._best_state is not None:
            self.model.load_state_dict(self._best_state)
        return records

    def train_epochs(
        self,
        n: int,
        progress: Callable[[dict[str, Any]], Any] | None = None,
        checkpoint: str | os.PathLike | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Train exactly ``n`` more epochs, without early stopping.

        The best validation weights are still tracked (``best_state()``),
        but the model ends on the weights of the last epoch.

        Returns:
            list[dict]: the records of the epochs run, as in ``fit``.
        """
        if int(n) != n or n < 0:
            raise ValueError(f"n must be an integer >= 0, got {n!r}")
        return self._run(
            self.epochs_done + int(n), False, progress, checkpoint, metadata
        )

    # -- prediction ------------------------------------------------------

    @torch.no_grad()
    def _predict_tensors(
        self,
        element_index: torch.Tensor,
        frac: torch.Tensor,
        mask: torch.Tensor,
        with_variance: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        was_training = model.training
        model.eval()
        means, variances = [], []
        chunk = self.train_config.eval_batch_size
        try:
            for start in range(0, element_index.shape[0], chunk):
                part = slice(start, start + chunk)
                args = (
                    element_index[part].to(self.device).contiguous(),
                    frac[part].to(self.device, self.dtype).contiguous(),
                    mask[part].to(self.device).contiguous(),
                )
                if with_variance:
                    mean, variance = model.forward_with_variance(*args)
                    means.append(mean)
                    variances.append(variance)
                else:
                    means.append(model(*args))
        finally:
            model.train(was_training)
        if not means:
            empty = torch.zeros(0, dtype=self.dtype, device=self.device)
            return (empty, empty.clone()) if with_variance else empty
        if with_variance:
            return torch.cat(means), torch.cat(variances)
        return torch.cat(means)

    def predict(self, x: Any) -> np.ndarray:
        """Predict the target of every composition, in eV/atom (float64 [B]).

        MC dropout is off for this call, so the result is deterministic.
        """
        element_index, frac, mask = batch_tensors(x, "x")
        with _mc_dropout(self.model, False):
            prediction = self._predict_tensors(element_index, frac, mask)
        return prediction.cpu().to(torch.float64).numpy()

    def predict_samples(
        self, x: Any, n_samples: int = MC_SAMPLES, seed: int | None = None
    ) -> np.ndarray:
        """Draw MC-dropout predictions (eV/atom) [n_samples, B].

        The masks come from a generator seeded with ``seed`` (default: the
        training seed), not from the training stream, so sampling leaves the
        training reproducible and repeated calls return the same samples.

        Raises:
            RuntimeError: if the model has no head dropout.
        """
        if not self.model.has_mc_dropout:
            raise RuntimeError(MC_DROPOUT_NEEDED)
        samples, _ = self._mc_samples(x, n_samples, seed, with_variance=False)
        return samples.cpu().to(torch.float64).numpy()

    def _mc_samples(
        self, x: Any, n_samples: int, seed: int | None, with_variance: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if int(n_samples) != n_samples or n_samples < 1:
            raise ValueError(f"n_samples must be an integer >= 1, got {n_samples!r}")
        element_index, frac, mask = batch_tensors(x, "x")
        generator = torch.Generator(device=self.device).manual_seed(
            self.train_config.seed if seed is None else int(seed)
        )
        model = self.model
        saved_generator = model.dropout_generator
        means, variances = [], []
        try:
            model.dropout_generator = generator
            with _mc_dropout(model, True):
                for _ in range(int(n_samples)):
                    if with_variance:
                        mean, variance = self._predict_tensors(
                            element_index, frac, mask, with_variance=True
                        )
                        variances.append(variance)
                    else:
                        mean = self._predict_tensors(element_index, frac, mask)
                    means.append(mean)
        finally:
            model.dropout_generator = saved_generator
        return torch.stack(means), (torch.stack(variances) if with_variance else None)

    def predict_with_uncertainty(
        self, x: Any, n_samples: int | None = None, seed: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Predict mean and standard deviation, both in eV/atom (float64 [B]).

        With the heteroscedastic head the variance is the predicted one. With
        head dropout the mean and variance come from MC-dropout samples
        (``n_samples``, default 30). With both, the variance is the mean
        predicted variance plus the variance of the sampled means.

        Raises:
            RuntimeError: if the model has neither a heteroscedastic head nor
                head dropout.
        """
        config = self.model.config
        dropout = self.model.has_mc_dropout
        if not config.heteroscedastic and not dropout:
            raise RuntimeError(
                "the model has no uncertainty: build it with "
                "ModelConfig(heteroscedastic=True) or train with head dropout > 0"
            )
        if not dropout:
            element_index, frac, mask = batch_tensors(x, "x")
            with _mc_dropout(self.model, False):
                mean, variance = self._predict_tensors(
                    element_index, frac, mask, with_variance=True
                )
        else:
            samples, variances = self._mc_samples(
                x,
                MC_SAMPLES if n_samples is None else n_samples,
                seed,
                config.heteroscedastic,
            )
            mean = samples.mean(dim=0)
            variance = samples.var(dim=0, correction=0)
            if variances is not None:
                variance = variance + variances.mean(dim=0)
        return (
            mean.cpu().to(torch.float64).numpy(),
            variance.sqrt().cpu().to(torch.float64).numpy(),
        )

    def evaluate(
        self,
        x: Any,
        y: Any,
        tolerance: float | None = None,
        stability_threshold: float | None = None,
    ) -> dict[str, Any]:
        """Score predictions with ``dvmrl.metrics.regression_metrics``.

        Args:
            x (CompositionBatch): compositions, at least 2.
            y (array): true targets in eV/atom.
            tolerance (float, optional): accuracy tolerance in eV/atom;
                default: that of ``regression_metrics``.
            stability_threshold (float, optional): threshold of the stability
                call in eV/atom; default: that of ``regression_metrics``.
        """
        from dvmrl import metrics

        element_index, _, _ = batch_tensors(x, "x")
        truth = check_targets(y, element_index.shape[0], "y")
        options = {}
        if tolerance is not None:
            options["tolerance"] = tolerance
        if stability_threshold is not None:
            options["stability_threshold"] = stability_threshold
        return metrics.regression_metrics(truth, self.predict(x), **options)

    # -- settings --------------------------------------------------------

    def set_hyperparameters(
        self,
        lr: float | None = None,
        batch_size: int | None = None,
        weight_decay: float | None = None,
        dropout: float | None = None,
    ) -> None:
        """Change training settings and keep the optimiser state.

        ``lr`` replaces the base learning rate; the schedule's multiplier
        continues where it was. ``dropout`` sets the head's dropout
        probability. The AdamW moments and step counts stay as they are.

        Raises:
            ValueError: for an invalid value (the configs check them).
        """
        changes = {
            key: value
            for key, value in (
                ("lr", lr),
                ("batch_size", batch_size),
                ("weight_decay", weight_decay),
            )
            if value is not None
        }
        if changes:
            self.train_config = dataclasses.replace(self.train_config, **changes)
        if dropout is not None:
            self.model.set_dropout(dropout)
        self._fit_finished = False
        self._restored_finished = False
        logger.debug(
            "hyperparameters now %s, dropout %s", changes, self.model.config.dropout
        )

    def set_sample_weights(self, weights: Any) -> None:
        """Weight each training composition's loss; None restores equal weights.

        The weights are rescaled to mean 1, so they change the balance
        between compositions but not the overall step size.

        Raises:
            ValueError: for a wrong length, negative or non-finite values, or
                all zeros.
        """
        if weights is None:
            self._weights = None
            return
        values = np.asarray(weights, dtype=np.float64).reshape(-1)
        if values.shape[0] != self.n_train:
            raise ValueError(
                f"sample weights: expected {self.n_train} values (one per training "
                f"composition), got {values.shape[0]}"
            )
        if not np.all(np.isfinite(values)) or np.any(values < 0):
            raise ValueError("sample weights must be finite and >= 0")
        total = values.mean()
        if total <= 0:
            raise ValueError("sample weights are all 0; at least one must be positive")
        self._weights = torch.as_tensor(
            values / total, dtype=self.dtype, device=self.device
        )

    def set_validation(self, x_val: Any, y_val: Any) -> None:
        """Replace the validation set of early stopping and best-weight selection.

        Scores on the new set are not comparable with the old ones, so the
        best score, best weights and plateau counters start afresh.
        """
        self._val = DeviceSet(x_val, y_val, "x_val", self.device, self.dtype)
        self._reset_best()
        self._schedule.reset_plateau()

    def _reset_best(self) -> None:
        self._best_score = math.inf
        self._best_epoch = None
        self._best_state = None
        self._bad_epochs = 0
        # A changed model or validation set starts a new fit.
        self._fit_finished = False
        self._restored_finished = False

    # -- weights ---------------------------------------------------------

    def _copy_state(self) -> dict[str, torch.Tensor]:
        return {
            name: value.detach().clone()
            for name, value in self.model.state_dict().items()
        }

    def current_state(self) -> dict[str, Any]:
        """Return a copy of the current weights with their model config."""
        return {
            "model_config": self.model.config.to_dict(),
            "state": self._copy_state(),
        }

    def best_state(self) -> dict[str, Any]:
        """Return a copy of the best-validation weights (the current ones before any).

        Returns:
            dict: ``model_config`` (dict) and ``state`` (the model's
            ``state_dict`` tensors), accepted by ``load_state``.
        """
        if self._best_state is None:
            return self.current_state()
        state = {name: value.clone() for name, value in self._best_state.items()}
        return {"model_config": self.model.config.to_dict(), "state": state}

    def load_state(self, state: dict[str, Any]) -> None:
        """Load weights from ``best_state()`` or ``current_state()`` output.

        With the current sizes the optimiser state is kept, and the state's
        dropout probability replaces the current one. Weights of other
        sizes rebuild the model; the optimiser then starts with fresh
        moments because the old ones do not map onto a different history.
        """
        config = ModelConfig.from_dict(state["model_config"])
        tensors = state["state"]
        # Dropout is a setting, not a size: it needs no rebuild.
        current = self.model.config
        if dataclasses.replace(config, dropout=current.dropout) == current:
            self.model.load_state_dict(tensors)
            self.model.set_dropout(config.dropout)
            return
        named = dict(unflatten(tensors["flat"], config.dims))
        for name in config.embedding_names:
            named[name] = tensors[name]
        self.model.rebuild(config, named)
        self.model.load_state_dict(tensors)
        self._build_optimizer()
        self._reset_best()
        logger.info("loaded weights of other sizes (%s); AdamW moments reset", config)

    # -- architecture moves ----------------------------------------------

    def _named_state(self) -> moves.NamedState:
        named = self.model.named_parameter_tensors()
        state = self._optimizer.state
        names = self._parameter_names()
        parameters = dict(zip(names, self._parameters(), strict=True))
        if not all(parameters[name] in state for name in names):
            return moves.NamedState(named)
        dims = self.model.dims
        exp_avg = dict(unflatten(state[parameters["flat"]]["exp_avg"], dims))
        exp_avg_sq = dict(unflatten(state[parameters["flat"]]["exp_avg_sq"], dims))
        for name in self.model.config.embedding_names:
            exp_avg[name] = state[parameters[name]]["exp_avg"]
            exp_avg_sq[name] = state[parameters[name]]["exp_avg_sq"]
        return moves.NamedState(named, exp_avg, exp_avg_sq)

    def _apply_move(
        self, config: ModelConfig, state: moves.NamedState, what: str
    ) -> None:
        old_parameters = dict(
            zip(self._parameter_names(), self._parameters(), strict=True)
        )
        steps = {
            name: self._optimizer.state[p]["step"].clone()
            for name, p in old_parameters.items()
            if p in self._optimizer.state
        }
        self.model.rebuild(config, state.params)
        self._build_optimizer()
        if state.has_moments and len(steps) == len(self._parameter_names()):
            flat_order = [spec.name for spec in parameter_layout(config.dims)]
            for name, parameter in zip(
                self._parameter_names(), self._parameters(), strict=True
            ):
                if name == "flat":
                    exp_avg = torch.cat(
                        [state.exp_avg[n].reshape(-1) for n in flat_order]
                    )
                    exp_avg_sq = torch.cat(
                        [state.exp_avg_sq[n].reshape(-1) for n in flat_order]
                    )
                else:
                    exp_avg, exp_avg_sq = state.exp_avg[name], state.exp_avg_sq[name]
                self._optimizer.state[parameter] = {
                    "step": steps[name],
                    "exp_avg": _like(parameter, exp_avg),
                    "exp_avg_sq": _like(parameter, exp_avg_sq),
                }
        self._reset_best()
        logger.info("%s: model now %s", what, config.dims)

    def add_layer(self) -> None:
        """Append a message-passing layer with a zero residual branch.

        The function is unchanged; see :func:`dvmrl.training.moves.add_layer`.
        """
        config, state = moves.add_layer(
            self.model.config, self._named_state(), self._move_generator
        )
        self._apply_move(config, state, "add_layer")

    def remove_layer(self) -> None:
        """Remove the last message-passing layer (changes the function).

        Raises:
            RuntimeError: when no layer is left to remove.
        """
        config, state = moves.remove_layer(self.model.config, self._named_state())
        self._apply_move(config, state, "remove_layer")

    def widen(
        self,
        hidden: int | None = None,
        *,
        gate_hidden: int | None = None,
        msg_hidden: int | None = None,
        head_hidden: int | None = None,
    ) -> None:
        """Widen the model Net2Net-style; the function is unchanged.

        Args:
            hidden (int, optional): new node-state width H (> current).
            gate_hidden (int, optional): new gate MLP width (> current).
            msg_hidden (int, optional): new message MLP width (> current).
            head_hidden (int, optional): new head width (> current).
        """
        config, state = moves.widen(
            self.model.config,
            self._named_state(),
            self._move_generator,
            hidden=hidden,
            gate_hidden=gate_hidden,
            msg_hidden=msg_hidden,
            head_hidden=head_hidden,
        )
        self._apply_move(config, state, "widen")

    def narrow(
        self,
        hidden: int | None = None,
        *,
        gate_hidden: int | None = None,
        msg_hidden: int | None = None,
        head_hidden: int | None = None,
    ) -> None:
        """Drop the least important units (changes the function).

        See :func:`dvmrl.training.moves.narrow` for the ranking.
        """
        config, state = moves.narrow(
            self.model.config,
            self._named_state(),
            hidden=hidden,
            gate_hidden=gate_hidden,
            msg_hidden=msg_hidden,
            head_hidden=head_hidden,
        )
        self._apply_move(config, state, "narrow")

    # -- checkpoints -----------------------------------------------------

    def training_domain(self) -> dict[str, Any]:
        """Describe the training set: elements seen, max elements per composition.

        ``min_fraction`` is the smallest atomic fraction of an element in a
        training composition.
        """
        from dvmrl import elements

        mask = self._train.mask
        rows = torch.unique(self._train.element_index[mask]).cpu().tolist()
        return {
            "elements": [elements.ELEMENTS[row] for row in rows],
            "max_elements": int(mask.sum(dim=1).max()),
            "min_fraction": float(self._train.frac[mask].min()),
            "n_train": self.n_train,
        }

    def _fingerprints(self) -> dict[str, Any]:
        return {
            "train": self._train.fingerprint,
            "val": None if self._val is None else self._val.fingerprint,
            "n_train": self.n_train,
            "n_val": 0 if self._val is None else len(self._val),
        }

    def _resume_state(self) -> dict[str, Any]:
        optimizer = {}
        for name, parameter in zip(
            self._parameter_names(), self._parameters(), strict=True
        ):
            entry = self._optimizer.state.get(parameter)
            if entry:
                optimizer[name] = {
                    key: value.detach().cpu().clone()
                    for key, value in entry.items()
                    if isinstance(value, torch.Tensor)
                }
        trainer = {
            "epochs_done": self.epochs_done,
            "best_score": self.best_score,
            "best_epoch": self._best_epoch,
            "bad_epochs": self._bad_epochs,
            "fit_target": self._fit_target,
            "fit_finished": self._fit_finished,
            "schedule": self._schedule.state_dict(),
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "use_fused": self.model.use_fused,
            "ema_updates": self._ema_updates,
        }
        resume: dict[str, Any] = {
            "trainer": json.dumps(trainer),
            "optimizer": optimizer,
            "rng": {
                "shuffle": self._shuffle_generator.get_state(),
                "dropout": self._dropout_generator.get_state().cpu(),
                "moves": self._move_generator.get_state(),
            },
        }
        if self._best_state is not None:
            resume["best_state"] = {
                k: v.detach().cpu() for k, v in self._best_state.items()
            }
        if self._weights is not None:
            resume["sample_weights"] = self._weights.detach().cpu()
        if self._raw_weights is not None and self._holds_given_average(
            self._parameters()
        ):
            # The optimiser's iterate; the model state contains the average.
            # After a move, load_state or the end of fit the model contains
            # other weights, and the next epoch restarts the average, so the
            # iterate is not stored.
            resume["raw_weights"] = {
                name: value.detach().cpu().clone()
                for name, value in zip(
                    self._parameter_names(), self._raw_weights, strict=True
                )
            }
        return resume

    def save(
        self,
        path: str | os.PathLike,
        metadata: dict[str, Any] | None = None,
        resume: bool = True,
    ) -> Path:
        """Write a checkpoint of the current model (atomically).

        Args:
            path: destination file.
            metadata (dict, optional): JSON-serialisable values to store,
                returned by ``load_checkpoint``; keys must not be one of
                ``dvmrl.training.checkpoint.RESERVED_METADATA_KEYS``.
            resume (bool): also store the optimiser, schedule, generator
                states, best weights and counters that ``from_checkpoint``
                needs. Default: True.

        Returns:
            Path: the file written.
        """
        metadata = dict(metadata or {})
        ckpt.check_metadata_keys(metadata)
        payload: dict[str, Any] = {
            "model_config": self.model.config.to_dict(),
            "train_config": self.train_config.to_dict(),
            "target_scaling": {
                "mean": float(self.model.target_mean),
                "std": float(self.model.target_std),
                "unit": "eV/atom",
            },
            "element_table": ckpt.element_table_json(self.model.descriptors),
            "data_fingerprint": self._fingerprints(),
            "training_domain": self.training_domain(),
            "provenance": ckpt.provenance(),
            "metadata": metadata,
            "history": self.history,
            "model_state": {
                k: v.detach().cpu() for k, v in self.model.state_dict().items()
            },
        }
        if resume:
            payload["resume"] = self._resume_state()
        return ckpt.write_checkpoint(path, payload)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike,
        x_train: Any,
        y_train: Any,
        x_val: Any = None,
        y_val: Any = None,
        device: str | torch.device | None = None,
        check_data: bool = True,
    ) -> Trainer:
        """Restore a trainer from a checkpoint written by ``save``, to resume it.

        The data are not stored in checkpoints: pass the same training and
        validation sets. The next ``fit()`` without an epoch count continues
        an interrupted fit to its original target, so an interrupted and
        resumed training ends with the weights of an uninterrupted one.

        Args:
            path: checkpoint file.
            x_train (CompositionBatch): training compositions of the original run.
            y_train (array): their targets in eV/atom.
            x_val (CompositionBatch, optional): validation compositions.
            y_val (array, optional): their targets in eV/atom.
            device: compute device; default: the one stored.
            check_data (bool): compare the data with the stored fingerprints.

        Raises:
            CheckpointError: for an unreadable checkpoint, one without resume
                state, or data whose fingerprint differs from the stored one.
        """
        document = ckpt.read_checkpoint(path)
        resume = document.get("resume")
        if ckpt.MEMBER_STATES_KEY in document:
            members = 1 + len(document[ckpt.MEMBER_STATES_KEY])
            raise ckpt.CheckpointError(
                f"checkpoint {path} is an ensemble of {members} members, which "
                "resumes member by member: pass a member's own state, such as "
                "OUT/member0/last.pt of dvmrl train"
            )
        if not isinstance(resume, dict) or "trainer" not in resume:
            raise ckpt.CheckpointError(
                f"checkpoint {path} has no resume state (it was saved with "
                "resume=False); train afresh or pass a checkpoint written during "
                "training"
            )
        try:
            trainer_state = json.loads(resume["trainer"])
            model_config = ModelConfig.from_dict(document["model_config"])
            train_config = TrainConfig.from_dict(document["train_config"])
        except (KeyError, TypeError, ValueError) as err:
            raise ckpt.CheckpointError(f"checkpoint {path} is corrupt: {err}") from None
        dtype = getattr(torch, trainer_state.get("dtype", "float32"))
        device = trainer_state.get("device", "cpu") if device is None else device
        trainer = cls(
            model_config,
            train_config,
            x_train,
            y_train,
            x_val,
            y_val,
            device=device,
            dtype=dtype,
            use_fused=trainer_state.get("use_fused", True),
            descriptors=document["model_state"]["descriptors"].to(torch.float64),
        )
        if check_data:
            trainer._check_fingerprints(document.get("data_fingerprint") or {}, path)
        trainer._restore(document, trainer_state, path)
        return trainer

    def _check_fingerprints(self, stored: dict[str, Any], path: Any) -> None:
        current = self._fingerprints()
        for part in ("train", "val"):
            if stored.get(part) != current[part]:
                raise ckpt.CheckpointError(
                    f"the {part} data differ from those checkpoint {path} was "
                    f"trained on (fingerprint {str(current[part])[:12]} vs stored "
                    f"{str(stored.get(part))[:12]}); resume with the original data "
                    "and split (a float32 copy of float64 fractions counts as other "
                    "data, since the fingerprint hashes the fractions' bits), or "
                    "start a new training on these data (in Python, "
                    "Trainer.from_checkpoint(..., check_data=False) continues on them)"
                )

    def _restore(
        self, document: dict[str, Any], state: dict[str, Any], path: Any
    ) -> None:
        resume = document["resume"]
        try:
            self.model.load_state_dict(document["model_state"])
            # Rebuild the scaled targets from the stored scaling.
            self._y_train_std = (
                self._train.y - self.model.target_mean
            ) / self.model.target_std
            for name, parameter in zip(
                self._parameter_names(), self._parameters(), strict=True
            ):
                entry = resume.get("optimizer", {}).get(name)
                if entry is None:
                    continue
                self._optimizer.state[parameter] = {
                    "step": entry["step"].clone(),
                    "exp_avg": _like(parameter, entry["exp_avg"]),
                    "exp_avg_sq": _like(parameter, entry["exp_avg_sq"]),
                }
            rng = resume["rng"]
            self._shuffle_generator.set_state(rng["shuffle"])
            stored_device = torch.device(state.get("device", "cpu")).type
            if stored_device == self.device.type:
                self._dropout_generator.set_state(rng["dropout"])
            else:
                # CPU and CUDA generators have different state layouts.
                logger.warning(
                    "checkpoint %s was trained on %s and resumes on %s: the dropout "
                    "generator restarts from the seed, so the resumed run does not "
                    "repeat the original one bit for bit",
                    path,
                    stored_device,
                    self.device.type,
                )
            self._move_generator.set_state(rng["moves"])
            if "best_state" in resume:
                self._best_state = {
                    k: v.to(self.device) for k, v in resume["best_state"].items()
                }
            if "sample_weights" in resume:
                self._weights = resume["sample_weights"].to(self.device, self.dtype)
            if "raw_weights" in resume:
                raw = resume["raw_weights"]
                parameters = self._parameters()
                self._raw_weights = [
                    raw[name].to(parameter.device, parameter.dtype)
                    for name, parameter in zip(
                        self._parameter_names(), parameters, strict=True
                    )
                ]
                self._given_average = [p.detach().clone() for p in parameters]
                self._ema_updates = int(state.get("ema_updates", 0))
            self.epochs_done = int(state["epochs_done"])
            best = state.get("best_score")
            self._best_score = math.inf if best is None else float(best)
            self._best_epoch = state.get("best_epoch")
            self._bad_epochs = int(state.get("bad_epochs", 0))
            self._fit_target = state.get("fit_target")
            self._fit_finished = bool(state.get("fit_finished", False))
            self._restored_finished = self._fit_finished
            self._schedule.load_state_dict(state["schedule"])
        except (AttributeError, KeyError, RuntimeError, TypeError, ValueError) as err:
            raise ckpt.CheckpointError(
                f"checkpoint {path} has corrupt resume state: "
                f"{type(err).__name__}: {err}"
            ) from None
        self.history = list(document.get("history") or [])


def _like(parameter: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Return ``values`` in a new tensor with the memory layout of ``parameter``.

    With moments in another memory layout than the parameter (row-major
    moments of the column-major ``emb_w``), one step of PyTorch's fused CPU
    AdamW (torch 2.13) changed ``emb_w`` differently, and a run resumed
    after ``widen`` differed by 0.01 eV/atom after one epoch.
    """
    return torch.empty_like(parameter).copy_(values)


@contextlib.contextmanager
def _mc_dropout(model: CompositionMPNN, enabled: bool) -> Iterator[None]:
    """Set a model's MC-dropout flag for a block and restore it afterwards."""
    saved = model.mc_dropout_enabled
    model.mc_dropout(enabled)
    try:
        yield
    finally:
        model.mc_dropout(saved)
