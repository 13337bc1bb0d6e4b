"""Tests of dvmrl.training.Trainer: fitting, schedule, determinism, settings."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import dvmrl
from dvmrl import datasets
from dvmrl.featurize import featurize
from dvmrl.model import ModelConfig
from dvmrl.training import LearningRateSchedule, TrainConfig, Trainer

SMALL = ModelConfig(
    hidden=16, layers=2, gate_hidden=16, msg_hidden=16, head_hidden=16, head_layers=2
)


@pytest.fixture(scope="module")
def data():
    frame = datasets.load("mp-formation-energy")
    rows = np.random.default_rng(0).choice(len(frame), size=600, replace=False)
    subset = frame.iloc[rows]
    x = featurize(subset["formula"].tolist())
    y = subset["target"].to_numpy()
    return x[:480], y[:480], x[480:], y[480:]


def _trainer(data, model_config=SMALL, **train_options) -> Trainer:
    options = {"epochs": 4, "batch_size": 64, "lr": 3e-3, "seed": 1, **train_options}
    x_train, y_train, x_val, y_val = data
    return Trainer(model_config, TrainConfig(**options), x_train, y_train, x_val, y_val)


def _weights(trainer: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])


def test_config_round_trip():
    config = TrainConfig(lr=1e-3, schedule="plateau", adam_betas=(0.8, 0.99))
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_config_invalid_lr():
    with pytest.raises(ValueError, match="TrainConfig.lr"):
        TrainConfig(lr=-1.0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", math.inf),
        ("seed", math.nan),
        ("batch_size", math.inf),
        ("warmup_epochs", math.inf),
        ("adam_eps", math.inf),
        ("grad_clip", math.nan),
    ],
)
def test_config_rejects_non_finite_values(field, value):
    message = rf"TrainConfig\.{field} must be .*got {value}"
    with pytest.raises(ValueError, match=message):
        TrainConfig(**{field: value})


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"lr": "1e-3"}, "TrainConfig.lr must be a number, got '1e-3'"),
        ({"batch_size": "64"}, "TrainConfig.batch_size must be a number"),
        ({"grad_clip": "5"}, "TrainConfig.grad_clip must be None or a number"),
        ({"adam_betas": 0.9}, r"TrainConfig.adam_betas must be two numbers"),
        ({"adam_betas": (0.9, "0.99")}, r"TrainConfig.adam_betas must be two numbers"),
    ],
)
def test_config_rejects_wrong_types(settings, message):
    # A string used to fail in a comparison that named no field.
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


def test_config_accepts_zero_dim_arrays():
    config = TrainConfig(lr=np.array(2e-3), batch_size=torch.tensor(32))
    assert config.lr == 2e-3
    assert type(config.lr) is float
    assert config.batch_size == 32
    assert json.loads(json.dumps(config.to_dict()))["batch_size"] == 32


def test_config_accepts_numpy_integers():
    config = TrainConfig(batch_size=np.int64(32), epochs=np.int32(3), seed=np.uint8(7))
    assert config.batch_size == 32
    assert type(config.batch_size) is int
    assert json.loads(json.dumps(config.to_dict()))["seed"] == 7
    with pytest.raises(ValueError, match="TrainConfig.batch_size must be an integer"):
        TrainConfig(batch_size=True)


def test_config_invalid_schedule():
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="step")


def test_schedule_warmup_cosine():
    config = TrainConfig(lr=1.0, epochs=10, warmup_epochs=2, min_lr_ratio=0.1)
    schedule = LearningRateSchedule()
    assert schedule.factor(config, 1.0) == pytest.approx(
        0.5 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.1)))
    )
    assert schedule.factor(config, 5.0) == pytest.approx(0.1 + 0.9 * 0.5)
    assert schedule.factor(config, 10.0) == pytest.approx(0.1)
    assert schedule.factor(config, 25.0) == pytest.approx(0.1)


def test_schedule_plateau():
    config = TrainConfig(schedule="plateau", warmup_epochs=0, plateau_patience=2)
    schedule = LearningRateSchedule()
    for score in (1.0, 0.9, 0.95, 0.97):
        schedule.end_epoch(config, score)
    assert schedule.factor(config, 4.0) == pytest.approx(0.5)
    restored = LearningRateSchedule()
    restored.load_state_dict(schedule.state_dict())
    assert restored.factor(config, 4.0) == pytest.approx(0.5)


def test_target_standardisation(data):
    trainer = _trainer(data)
    y_train = data[1]
    assert float(trainer.model.target_mean) == pytest.approx(y_train.mean(), rel=1e-6)
    assert float(trainer.model.target_std) == pytest.approx(y_train.std(), rel=1e-6)


def test_fit_learns(data):
    trainer = _trainer(data, epochs=12)
    history = trainer.fit()
    baseline_mae = float(np.mean(np.abs(data[3] - data[1].mean())))
    assert len(history) == 12
    assert history[-1]["train_loss"] < 0.7 * history[0]["train_loss"]
    assert min(record["val_mae"] for record in history) < 0.85 * baseline_mae
    assert set(history[0]) >= {"epoch", "train_loss", "val_rmse", "val_mae", "lr"}
    assert trainer.epochs_done == 12


@pytest.mark.parametrize("monitor", ["val_rmse", "val_mae"])
def test_fit_keeps_best_weights(data, monitor):
    trainer = _trainer(data, epochs=8, lr=2e-2, monitor=monitor)
    history = trainer.fit()
    best = min(record[monitor] for record in history)
    assert trainer.best_score == pytest.approx(best, rel=0, abs=0)
    metric = monitor.removeprefix("val_")
    assert trainer.evaluate(data[2], data[3])[metric] == pytest.approx(best, rel=1e-9)


def test_early_stopping(data):
    # A learning rate far below float32 resolution leaves the weights, and so
    # the validation score, exactly unchanged: no epoch improves on the first.
    trainer = _trainer(data, epochs=20, lr=1e-30, patience=3, warmup_epochs=0)
    history = trainer.fit()
    assert len(history) == 4
    assert trainer.best_epoch == 1


def test_fit_epochs_argument(data):
    trainer = _trainer(data, epochs=50)
    assert len(trainer.fit(epochs=2)) == 2
    assert trainer.epochs_done == 2


def test_train_epochs_ignores_patience(data):
    trainer = _trainer(data, lr=1e-30, patience=1, warmup_epochs=0)
    assert len(trainer.train_epochs(4)) == 4
    assert trainer.epochs_done == 4


def test_progress_callback(data):
    seen = []
    trainer = _trainer(data, epochs=2)
    trainer.fit(progress=seen.append)
    assert [record["epoch"] for record in seen] == [1, 2]


def test_without_validation(data):
    x_train, y_train, _, _ = data
    trainer = Trainer(SMALL, TrainConfig(epochs=2, batch_size=64), x_train, y_train)
    history = trainer.fit()
    assert len(history) == 2
    assert history[0]["val_rmse"] is None


def test_same_seed_bitwise(data):
    first = _trainer(data, epochs=2, seed=7)
    second = _trainer(data, epochs=2, seed=7)
    first.fit()
    second.fit()
    assert torch.equal(_weights(first), _weights(second))


def test_other_seed_differs(data):
    first = _trainer(data, epochs=1, seed=7)
    second = _trainer(data, epochs=1, seed=8)
    first.fit()
    second.fit()
    assert not torch.equal(_weights(first), _weights(second))


@pytest.mark.parametrize("use_fused", [False, True])
def test_thread_count_bitwise(data, use_fused):
    # The fused path must match bit for bit. The reference path inherits
    # PyTorch's CPU kernels, whose results can depend on the thread count.
    # On an AMD EPYC VM these weights matched, and on an Intel Xeon VM they
    # differed by up to 1.3e-5 after two epochs, and by up to 1.1e-4 with
    # the fused AdamW (whose own steps are the same on 1 and 2 threads).
    previous = dvmrl.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            dvmrl.set_num_threads(threads)
            trainer = _trainer(data, epochs=2)
            trainer.model.use_fused = use_fused
            trainer.set_hyperparameters(dropout=0.2)
            trainer.fit()
            results.append(_weights(trainer))
    finally:
        dvmrl.set_num_threads(previous)
    if use_fused:
        assert torch.equal(results[0], results[1])
    else:
        torch.testing.assert_close(results[0], results[1], rtol=0.0, atol=5e-4)


def test_set_hyperparameters_keeps_state(data):
    trainer = _trainer(data, epochs=10)
    trainer.train_epochs(1)
    optimizer = trainer._optimizer
    flat_state = optimizer.state[trainer.model.flat]
    exp_avg = flat_state["exp_avg"].clone()
    step = float(flat_state["step"])
    trainer.set_hyperparameters(lr=1e-4, batch_size=32, weight_decay=1e-3, dropout=0.1)
    assert trainer._optimizer is optimizer
    assert torch.equal(optimizer.state[trainer.model.flat]["exp_avg"], exp_avg)
    assert trainer.train_config.lr == 1e-4
    assert trainer.train_config.batch_size == 32
    assert trainer.model.config.dropout == 0.1
    record = trainer.train_epochs(1)[0]
    assert float(optimizer.state[trainer.model.flat]["step"]) == step + 15  # 480 / 32
    assert record["lr"] <= 1e-4


def test_set_hyperparameters_invalid(data):
    trainer = _trainer(data)
    with pytest.raises(ValueError, match="batch_size"):
        trainer.set_hyperparameters(batch_size=0)
    with pytest.raises(ValueError, match="dropout"):
        trainer.set_hyperparameters(dropout=1.5)


def test_weight_decay_spares_biases(data):
    trainer = _trainer(data, weight_decay=0.5)
    from dvmrl.layout import parameter_layout

    specs = {spec.name: spec for spec in parameter_layout(trainer.model.dims)}
    mask = trainer._flat_decay_mask
    bias = specs["layer0.gate_b"]
    weight = specs["layer0.gate_w_i"]
    assert float(mask[bias.offset : bias.offset + bias.numel].sum()) == 0.0
    assert float(mask[weight.offset : weight.offset + weight.numel].min()) == 1.0


def test_uniform_sample_weights_bitwise(data):
    plain = _trainer(data, epochs=2)
    weighted = _trainer(data, epochs=2)
    weighted.set_sample_weights(np.full(480, 3.0))
    plain.fit()
    weighted.fit()
    assert torch.equal(_weights(plain), _weights(weighted))


def test_sample_weights_focus(data):
    x_train, y_train, _, _ = data
    binary = (x_train.mask.sum(dim=1) == 2).numpy()
    errors = {}
    for name, weights in (("binary", binary), ("ternary", ~binary)):
        trainer = _trainer(data, epochs=6)
        trainer.set_sample_weights(weights.astype(float))
        trainer.train_epochs(6)
        prediction = trainer.predict(x_train)
        errors[name] = float(np.sqrt(np.mean((prediction - y_train)[binary] ** 2)))
    assert errors["binary"] < errors["ternary"]


def test_sample_weights_invalid(data):
    trainer = _trainer(data)
    with pytest.raises(ValueError, match="expected 480 values"):
        trainer.set_sample_weights(np.ones(3))
    with pytest.raises(ValueError, match="all 0"):
        trainer.set_sample_weights(np.zeros(480))
    with pytest.raises(ValueError, match="finite and >= 0"):
        trainer.set_sample_weights(-np.ones(480))


def test_set_validation_resets_best(data):
    trainer = _trainer(data, epochs=2)
    trainer.fit()
    assert trainer.best_score is not None
    trainer.set_validation(data[0][:50], data[1][:50])
    assert trainer.best_score is None


def test_nan_targets_rejected(data):
    x_train, y_train, _, _ = data
    bad = y_train.copy()
    bad[[3, 7]] = np.nan
    with pytest.raises(
        ValueError, match=r"2 NaN or infinite values \(first positions \[3, 7\]\)"
    ):
        Trainer(SMALL, TrainConfig(), x_train, bad)


def test_wrong_input_type(data):
    with pytest.raises(TypeError, match="CompositionBatch"):
        Trainer(SMALL, TrainConfig(), np.zeros((3, 2)), np.zeros(3))


def test_predict_empty(data):
    trainer = _trainer(data)
    assert trainer.predict(data[2][:0]).shape == (0,)


def test_predict_shape(data):
    trainer = _trainer(data)
    prediction = trainer.predict(data[2])
    assert prediction.shape == (120,)
    assert prediction.dtype == np.float64


def test_evaluate_keys(data):
    trainer = _trainer(data)
    trainer.fit(epochs=1)
    metrics = trainer.evaluate(data[2], data[3])
    for key in ("rmse", "mae", "r2", "max_error", "gcv_score", "accuracy", "f1"):
        assert key in metrics


def test_heteroscedastic_uncertainty(data):
    config = ModelConfig(**{**SMALL.to_dict(), "heteroscedastic": True})
    trainer = _trainer(data, model_config=config, epochs=4)
    history = trainer.fit()
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    mean, std = trainer.predict_with_uncertainty(data[2])
    np.testing.assert_allclose(mean, trainer.predict(data[2]), rtol=0, atol=1e-6)
    assert bool(np.all(std > 0))


def test_mc_dropout_uncertainty(data):
    config = ModelConfig(**{**SMALL.to_dict(), "dropout": 0.2})
    trainer = _trainer(data, model_config=config, epochs=1)
    trainer.fit()
    samples = trainer.predict_samples(data[2], n_samples=5)
    assert samples.shape == (5, 120)
    assert bool(np.all(samples.std(axis=0) > 0))
    again = trainer.predict_samples(data[2], n_samples=5)
    np.testing.assert_array_equal(samples, again)
    mean, std = trainer.predict_with_uncertainty(data[2], n_samples=5)
    np.testing.assert_allclose(mean, samples.mean(axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(std, samples.std(axis=0), rtol=1e-4, atol=1e-7)


def test_sampling_keeps_training_stream(data):
    config = ModelConfig(**{**SMALL.to_dict(), "dropout": 0.2})
    first = _trainer(data, model_config=config, epochs=2)
    second = _trainer(data, model_config=config, epochs=2)
    first.train_epochs(1)
    second.train_epochs(1)
    second.predict_samples(data[2], n_samples=3)
    first.train_epochs(1)
    second.train_epochs(1)
    assert torch.equal(_weights(first), _weights(second))


def test_no_uncertainty_raises(data):
    trainer = _trainer(data)
    with pytest.raises(RuntimeError, match="no uncertainty"):
        trainer.predict_with_uncertainty(data[2])


def test_train_on_device(data, device):
    x_train, y_train, x_val, y_val = data
    trainer = Trainer(
        SMALL,
        TrainConfig(epochs=1, batch_size=64),
        x_train,
        y_train,
        x_val,
        y_val,
        device=device,
    )
    history = trainer.fit()
    assert trainer.model.flat.device.type == device.type
    assert math.isfinite(history[0]["val_rmse"])


def test_ema_config_checks():
    with pytest.raises(ValueError, match="ema_decay must be in"):
        TrainConfig(ema_decay=1.0)
    values = TrainConfig().to_dict()
    del values["ema_decay"]
    assert TrainConfig.from_dict(values).ema_decay == 0.0


def test_ema_keeps_optimiser_path(data):
    # Averaging must not change the optimiser's own iterate: the raw weights
    # of a run with averaging equal the weights of a run without it.
    averaged = _trainer(data, ema_decay=0.9)
    plain = _trainer(data, ema_decay=0.0)
    averaged.train_epochs(2)
    plain.train_epochs(2)
    raw = torch.cat([w.reshape(-1) for w in averaged._raw_weights])
    plain_weights = torch.cat([p.detach().reshape(-1) for p in plain._parameters()])
    assert torch.equal(raw, plain_weights)
    model_weights = torch.cat([p.detach().reshape(-1) for p in averaged._parameters()])
    assert not torch.equal(model_weights, raw)


def test_ema_matches_manual_average(data):
    decay = 0.8
    trainer = _trainer(data, ema_decay=decay, batch_size=160)
    snapshots = []

    def record(optimizer, args, kwargs):
        snapshots.append([p.detach().clone() for p in trainer._parameters()])

    handle = trainer._optimizer.register_step_post_hook(record)
    try:
        trainer.train_epochs(2)
    finally:
        handle.remove()
    assert len(snapshots) == 6  # 480 compositions, batch 160, 2 epochs

    initial = _trainer(data, ema_decay=decay, batch_size=160)
    expected = [p.detach().clone() for p in initial._parameters()]
    for t, weights in enumerate(snapshots):
        d = min(decay, (1 + t) / (10 + t))
        expected = [
            d * e + (1 - d) * w for e, w in zip(expected, weights, strict=True)
        ]
    for average, parameter in zip(expected, trainer._parameters(), strict=True):
        torch.testing.assert_close(parameter.detach(), average, atol=1e-6, rtol=1e-5)


def test_ema_restarts_after_external_change(data):
    trainer = _trainer(data, ema_decay=0.99)
    trainer.train_epochs(1)
    trainer.add_layer()
    assert trainer._ema_updates > 0
    trainer.train_epochs(1)
    # The average restarted from the moved weights, so it counts one epoch.
    assert trainer._ema_updates == math.ceil(480 / 64)
    assert all(bool(torch.isfinite(p).all()) for p in trainer._parameters())


# -- robust losses ---------------------------------------------------------


def test_loss_values_per_kind(data):
    residual = torch.tensor([-3.0, -0.5, 0.0, 0.2, 2.0])
    output = residual[:, None]
    target = torch.zeros(5)
    expected = {
        "mse": residual.square(),
        "l1": residual.abs(),
    }
    for kind, values in expected.items():
        trainer = _trainer(data, loss=kind)
        torch.testing.assert_close(trainer._loss(output, target), values)

    trainer = _trainer(data, loss="huber", huber_delta=0.25)
    delta = 0.25 / float(trainer.model.target_std)
    huber = trainer._loss(output, target)
    small = residual.abs() <= delta
    torch.testing.assert_close(huber[small], residual[small].square())
    linear = 2 * delta * residual[~small].abs() - delta**2
    torch.testing.assert_close(huber[~small], linear)


def test_huber_continuous_at_delta(data):
    trainer = _trainer(data, loss="huber", huber_delta=0.25)
    delta = 0.25 / float(trainer.model.target_std)
    at = torch.tensor([[delta - 1e-6], [delta + 1e-6]], dtype=torch.float64)
    values = trainer._loss(at, torch.zeros(2, dtype=torch.float64))
    assert abs(float(values[1] - values[0])) < 1e-5


def test_huber_lowers_outlier_pull(data):
    # One training target moved 40 eV/atom away: the Huber fit moves its
    # prediction for that composition less than the squared-error fit does.
    x_train, y_train, x_val, y_val = data
    shifted = y_train.copy()
    shifted[0] += 40.0
    moved = {}
    for kind in ("mse", "huber"):
        options = {"epochs": 6, "batch_size": 64, "lr": 3e-3, "seed": 1, "loss": kind}
        trainer = Trainer(
            SMALL, TrainConfig(**options), x_train, shifted, x_val, y_val
        )
        trainer.train_epochs(6)
        clean = Trainer(
            SMALL, TrainConfig(**options), x_train, y_train, x_val, y_val
        )
        clean.train_epochs(6)
        first = x_train[:1]
        moved[kind] = float(trainer.predict(first)[0] - clean.predict(first)[0])
    assert moved["mse"] > 0.1
    assert abs(moved["huber"]) < 0.25 * moved["mse"]


def test_loss_options_validated():
    with pytest.raises(ValueError, match="TrainConfig.loss"):
        TrainConfig(loss="hinge")
    with pytest.raises(ValueError, match="TrainConfig.huber_delta"):
        TrainConfig(huber_delta=0.0)


def test_heteroscedastic_ignores_loss(data):
    config = ModelConfig(**{**SMALL.to_dict(), "heteroscedastic": True})
    output = torch.tensor([[0.5, -1.0], [-2.0, 0.3]])
    target = torch.zeros(2)
    nll = 0.5 * (output[:, 1] + output[:, 0].square() * torch.exp(-output[:, 1]))
    for kind in ("mse", "huber", "l1"):
        trainer = _trainer(data, model_config=config, loss=kind)
        torch.testing.assert_close(trainer._loss(output, target), nll)


def test_config_without_loss_is_mse():
    values = TrainConfig(loss="l1").to_dict()
    del values["loss"]
    assert TrainConfig.from_dict(values).loss == "mse"


# -- PyTorch threads during fused training ------------------------------------


def test_epoch_runs_torch_ops_on_one_thread(data, monkeypatch):
    trainer = _trainer(data)
    seen = []
    original = Trainer._optimise_epoch

    def record_threads(self):
        seen.append(torch.get_num_threads())
        return original(self)

    monkeypatch.setattr(Trainer, "_optimise_epoch", record_threads)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        trainer.train_epochs(2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 1]


def test_one_torch_thread_same_bits(data, monkeypatch):
    import contextlib

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        single = _trainer(data)
        single.train_epochs(2)
        monkeypatch.setattr(
            Trainer, "_small_op_threads", lambda self: contextlib.nullcontext()
        )
        both = _trainer(data)
        both.train_epochs(2)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(_weights(single), _weights(both))


@pytest.mark.parametrize("grad_clip", [5.0, 0.0])
def test_divergence_error_advice(data, grad_clip):
    from dvmrl.training import TrainingDivergedError

    trainer = _trainer(data, epochs=1, lr=1e6, grad_clip=grad_clip)
    with pytest.raises(TrainingDivergedError) as caught:
        trainer.fit()
    error = caught.value
    assert not math.isfinite(error.loss)
    assert error.epoch == 1
    assert error.lr == 1e6
    assert error.grad_clip == grad_clip
    assert "lower the learning rate (now 1e+06)" in str(error)
    if grad_clip:
        assert "gradient clipping is already on at norm 5" in str(error)
        assert "enable gradient clipping" not in str(error)
    else:
        assert "set grad_clip" in str(error)


def test_weights_diverged_with_finite_loss(data):
    # Each step's loss is taken before its update, so an update that makes
    # the weights NaN in the epoch's last step leaves the mean loss finite.
    from dvmrl.training import TrainingDivergedError

    trainer = _trainer(data, epochs=2)
    steps = math.ceil(len(data[1]) / trainer.train_config.batch_size)
    count = [0]

    def poison_last_step(opt, args, kwargs):
        count[0] += 1
        if count[0] == steps:
            with torch.no_grad():
                trainer.model.flat[0] = float("inf")

    trainer._optimizer.register_step_post_hook(poison_last_step)
    with pytest.raises(TrainingDivergedError, match="weights are NaN or inf") as caught:
        trainer.fit()
    assert math.isfinite(caught.value.loss)
    assert caught.value.epoch == 1


def test_text_targets_named():
    from dvmrl.featurize import featurize

    x = featurize(["NiAl", "FeNi", "CuZn", "AlCu"])
    with pytest.raises(ValueError, match="targets of x_train must be numbers"):
        Trainer(None, None, x, ["a", "b", "c", "d"])


def test_unusable_cuda_named():
    import torch

    from dvmrl.featurize import featurize

    if torch.cuda.is_available():
        pytest.skip("a GPU is usable here")
    x = featurize(["NiAl", "FeNi", "CuZn", "AlCu"])
    with pytest.raises(RuntimeError, match="PyTorch sees no CUDA GPU; use the CPU"):
        Trainer(None, None, x, [0.1, 0.2, 0.3, 0.4], device="cuda")


def test_model_eval_mode_after_fit():
    # With dropout on, a model left in training mode after fit() drew masks
    # from the trainer's dropout stream at every call.
    from dvmrl.datasets import load
    from dvmrl.featurize import featurize

    frame = load("mp-formation-energy").iloc[:120]
    x = featurize(frame["formula"].tolist())
    y = frame["target"].to_numpy()
    config = ModelConfig(hidden=8, layers=1, gate_hidden=8, msg_hidden=8, dropout=0.2)
    trainer = Trainer(config, TrainConfig(epochs=1, batch_size=32), x[:100], y[:100])
    trainer.fit()
    assert not trainer.model.training
    test = x[100:].to(dtype=torch.float32)
    first = trainer.model(test.element_index, test.frac, test.mask).detach()
    second = trainer.model(test.element_index, test.frac, test.mask).detach()
    assert torch.equal(first, second)
    assert np.allclose(first.double().numpy(), trainer.predict(x[100:]), atol=1e-6)


def test_before_checkpoint_stops_fit_before_write(data, tmp_path):
    trainer = _trainer(data, epochs=4)
    path = tmp_path / "last.pt"
    calls = []

    class Stop(Exception):
        pass

    def guard():
        calls.append(trainer.epochs_done)
        if trainer.epochs_done == 2:
            raise Stop

    with pytest.raises(Stop):
        trainer.fit(checkpoint=path, before_checkpoint=guard)
    assert calls == [1, 2]
    # The state of epoch 1 is on disk; epoch 2's write never happened.
    restored = Trainer.from_checkpoint(path, *data)
    assert restored.epochs_done == 1
