"""Default model and training settings, in one place.

``ModelConfig`` and ``TrainConfig`` take their defaults from here; the
accuracy benchmark (bench/bench_accuracy.py) is the place to re-measure them
after a change.
"""

# Model sizes: widths of node states, gate and message MLPs, and the head.
MODEL = {
    "hidden": 64,
    "layers": 3,
    "gate_hidden": 64,
    "msg_hidden": 64,
    "head_hidden": 128,
    "head_layers": 2,
    "dropout": 0.0,
    "heteroscedastic": False,
}

# Optimisation: AdamW with a learning-rate schedule and early stopping.
TRAIN = {
    "lr": 2e-3,
    "batch_size": 128,
    "weight_decay": 1e-5,
    "epochs": 100,
    "patience": 20,
    "grad_clip": 5.0,
    "seed": 0,
}
