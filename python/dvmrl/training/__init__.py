"""Training, checkpoints and architecture moves of the composition MPNN.

``Trainer`` fits a ``CompositionMPNN`` with AdamW, a learning-rate schedule,
early stopping, target standardisation and gradient clipping, and changes
its hyperparameters and architecture while keeping the optimiser state.
``load_checkpoint`` reads a saved model (or an ``EnsembleModel`` of several
members, written by ``combine_checkpoints``) for inference.
"""

from dvmrl.training.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    CheckpointNotFoundError,
    load_checkpoint,
    read_checkpoint,
)
from dvmrl.training.config import LearningRateSchedule, TrainConfig
from dvmrl.training.data import data_fingerprint
from dvmrl.training.ensemble import EnsembleModel, combine_checkpoints
from dvmrl.training.trainer import Trainer, TrainingDivergedError

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointNotFoundError",
    "EnsembleModel",
    "LearningRateSchedule",
    "TrainConfig",
    "Trainer",
    "TrainingDivergedError",
    "combine_checkpoints",
    "data_fingerprint",
    "load_checkpoint",
    "read_checkpoint",
]
