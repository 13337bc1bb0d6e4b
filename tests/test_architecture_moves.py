"""Tests of architecture moves: function preservation, shapes, AdamW state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dvmrl import datasets
from dvmrl.featurize import featurize
from dvmrl.layout import parameter_count, unflatten
from dvmrl.model import CompositionMPNN, ModelConfig
from dvmrl.training import TrainConfig, Trainer, moves

SMALL = {
    "hidden": 16,
    "layers": 2,
    "gate_hidden": 12,
    "msg_hidden": 14,
    "head_hidden": 10,
    "head_layers": 2,
}


@pytest.fixture(scope="module")
def data():
    frame = datasets.load("mp-formation-energy")
    rows = np.random.default_rng(2).choice(len(frame), size=300, replace=False)
    subset = frame.iloc[rows]
    x = featurize(subset["formula"].tolist() + ["Fe", "NiTiZrHf"])
    y = np.concatenate([subset["target"].to_numpy(), [0.0, -0.2]])
    return x[:240], y[:240], x[240:], y[240:]


def _trainer(data, dtype=torch.float64, epochs=2, **config) -> Trainer:
    model_config = ModelConfig(**{**SMALL, **config})
    train_config = TrainConfig(epochs=epochs, batch_size=48, lr=3e-3, seed=4)
    trainer = Trainer(model_config, train_config, *data, dtype=dtype)
    # Train first so that every parameter, the AdamW moments included, is
    # away from its initial value.
    trainer.train_epochs(epochs)
    return trainer


def _moments(trainer: Trainer) -> dict[str, dict[str, torch.Tensor]]:
    named = trainer._named_state()
    return {"exp_avg": named.exp_avg, "exp_avg_sq": named.exp_avg_sq}


PRESERVING = [
    ("add_layer", lambda t: t.add_layer()),
    ("widen_hidden", lambda t: t.widen(24)),
    ("widen_all", lambda t: t.widen(20, gate_hidden=15, msg_hidden=17, head_hidden=13)),
    ("widen_gate", lambda t: t.widen(gate_hidden=30)),
]


@pytest.mark.parametrize("name, move", PRESERVING, ids=[name for name, _ in PRESERVING])
def test_preserving_float64(data, name, move):
    trainer = _trainer(data)
    before = trainer.predict(data[2])
    move(trainer)
    after = trainer.predict(data[2])
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name, move", PRESERVING, ids=[name for name, _ in PRESERVING])
def test_preserving_float32(data, name, move):
    trainer = _trainer(data, dtype=torch.float32)
    before = trainer.predict(data[2])
    move(trainer)
    after = trainer.predict(data[2])
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_widen_heteroscedastic_dropout(data):
    trainer = _trainer(data, heteroscedastic=True, dropout=0.3)
    config = trainer.model.config
    trainer.model.eval()
    batch = data[2]
    mean_before, var_before = trainer.model.forward_with_variance(
        batch.element_index, batch.frac, batch.mask
    )
    trainer.widen(22, head_hidden=14)
    trainer.add_layer()
    mean_after, var_after = trainer.model.forward_with_variance(
        batch.element_index, batch.frac, batch.mask
    )
    torch.testing.assert_close(mean_after, mean_before, atol=1e-12, rtol=0)
    torch.testing.assert_close(var_after, var_before, atol=1e-12, rtol=1e-12)
    assert trainer.model.config.dropout == config.dropout


def test_widen_without_head_layers(data):
    trainer = _trainer(data, head_layers=0, layers=1)
    before = trainer.predict(data[2])
    trainer.widen(21)
    np.testing.assert_allclose(trainer.predict(data[2]), before, rtol=0, atol=1e-12)


def test_add_layer_to_empty_stack(data):
    trainer = _trainer(data, layers=0)
    before = trainer.predict(data[2])
    trainer.add_layer()
    assert trainer.model.config.layers == 1
    np.testing.assert_allclose(trainer.predict(data[2]), before, rtol=0, atol=1e-12)
    trainer.train_epochs(1)
    assert trainer.model.config.layers == 1


def test_add_layer_shapes(data):
    trainer = _trainer(data)
    trainer.add_layer()
    dims = trainer.model.dims
    assert dims.layers == 3
    assert trainer.model.flat.numel() == parameter_count(dims)
    params = unflatten(trainer.model.flat.detach(), dims)
    assert torch.count_nonzero(params["layer2.msg_w2"]) == 0
    assert torch.count_nonzero(params["layer2.msg_b2"]) == 0
    assert torch.count_nonzero(params["layer2.msg_w1_i"]) > 0


def test_add_layer_trains_new_layer(data):
    trainer = _trainer(data)
    trainer.add_layer()
    trainer.train_epochs(1)
    params = unflatten(trainer.model.flat.detach(), trainer.model.dims)
    assert torch.count_nonzero(params["layer2.msg_w2"]) > 0


def test_add_layer_keeps_moments(data):
    trainer = _trainer(data)
    before = _moments(trainer)
    step = float(trainer._optimizer.state[trainer.model.flat]["step"])
    trainer.add_layer()
    after = _moments(trainer)
    for kind in ("exp_avg", "exp_avg_sq"):
        for name, value in before[kind].items():
            assert torch.equal(after[kind][name], value), (kind, name)
    assert torch.count_nonzero(after["exp_avg"]["layer2.msg_w1_i"]) == 0
    parent = before["exp_avg_sq"]["layer1.msg_w1_i"].mean()
    torch.testing.assert_close(after["exp_avg_sq"]["layer2.msg_w1_i"].mean(), parent)
    assert float(trainer._optimizer.state[trainer.model.flat]["step"]) == step


def test_remove_layer(data):
    trainer = _trainer(data)
    before = _moments(trainer)
    trainer.remove_layer()
    dims = trainer.model.dims
    assert dims.layers == 1
    assert trainer.model.flat.numel() == parameter_count(dims)
    after = _moments(trainer)
    assert "layer1.gate_w_i" not in after["exp_avg"]
    for name in ("layer0.gate_w_i", "pool_msg_w2", "head_out_w", "emb_offset"):
        assert torch.equal(after["exp_avg"][name], before["exp_avg"][name]), name
    history = trainer.train_epochs(1)
    assert math.isfinite(history[0]["train_loss"])


def test_remove_last_layer_fails(data):
    trainer = _trainer(data, layers=1)
    trainer.remove_layer()
    with pytest.raises(RuntimeError, match="no message-passing layer"):
        trainer.remove_layer()


def test_widen_shapes(data):
    trainer = _trainer(data)
    trainer.widen(24, head_hidden=16)
    dims = trainer.model.dims
    assert dims.hidden == 24
    assert dims.head_hidden == 16
    assert tuple(trainer.model.emb_w.shape)[0] == 24
    assert tuple(trainer.model.emb_offset.shape) == (103, 24)
    assert trainer.model.flat.numel() == parameter_count(dims)


def test_widen_moments_mapped(data):
    trainer = _trainer(data)
    before = _moments(trainer)
    trainer.widen(24)
    after = _moments(trainer)
    for kind in ("exp_avg", "exp_avg_sq"):
        # Old units keep their moments; the consumer columns of layer 0's gate
        # and the producer rows of its message both map unchanged.
        torch.testing.assert_close(
            after[kind]["layer0.gate_w_i"][:, :16], before[kind]["layer0.gate_w_i"]
        )
        torch.testing.assert_close(
            after[kind]["layer0.msg_w2"][:16], before[kind]["layer0.msg_w2"]
        )
    assert tuple(after["exp_avg_sq"]["layer0.msg_w2"].shape) == (24, 14)
    # Each new unit carries the moments of the unit it copies.
    new_rows = after["exp_avg_sq"]["emb_b"][16:]
    assert bool(torch.isin(new_rows, before["exp_avg_sq"]["emb_b"]).all())


def test_widen_breaks_symmetry(data):
    trainer = _trainer(data)
    trainer.widen(17)
    table = trainer.model.node_table().detach().T  # [H, E]
    copied = table[16]
    source = int(torch.argmin((table[:16] - copied).abs().amax(dim=1)))
    torch.testing.assert_close(table[source], copied, atol=1e-12, rtol=0)
    trainer.train_epochs(1)
    table = trainer.model.node_table().detach().T
    # Tied copies would differ only by rounding (about 1e-15).
    assert float((table[source] - table[16]).abs().max()) > 1e-6


def test_widen_invalid(data):
    trainer = _trainer(data)
    with pytest.raises(ValueError, match="must exceed the current 16"):
        trainer.widen(16)
    with pytest.raises(ValueError, match="no new width"):
        trainer.widen()


def test_narrow_shapes_and_training(data):
    trainer = _trainer(data)
    trainer.narrow(10, msg_hidden=8)
    dims = trainer.model.dims
    assert dims.hidden == 10
    assert dims.msg_hidden == 8
    assert trainer.model.flat.numel() == parameter_count(dims)
    exp_avg = _moments(trainer)["exp_avg"]
    assert tuple(exp_avg["layer0.msg_w2"].shape) == (10, 8)
    history = trainer.train_epochs(1)
    assert math.isfinite(history[0]["train_loss"])


def test_narrow_drops_unused_unit(data):
    trainer = _trainer(data)
    # Zero every weight that reads node-state unit 5: the unit then has no
    # effect on the output, scores 0, and narrowing by one removes exactly it.
    # The pooled vector has H units too, and narrowing H narrows it as well:
    # zero the weights reading its unit 9 the same way.
    with torch.no_grad():
        params = unflatten(trainer.model.flat, trainer.model.dims)
        for name, value in params.items():
            axes = moves.axis_groups(name, trainer.model.config)
            for axis, entry in enumerate(axes):
                if entry == ("h", "in"):
                    value.select(axis, 5).zero_()
                if entry == ("pooled", "in"):
                    value.select(axis, 9).zero_()
    before = trainer.predict(data[2])
    scores = moves.unit_importance(
        trainer.model.config, trainer.model.named_parameter_tensors()
    )
    assert float(scores["h"][5]) == 0.0
    assert float(scores["pooled"][9]) == 0.0
    trainer.narrow(15)
    np.testing.assert_allclose(trainer.predict(data[2]), before, rtol=0, atol=1e-12)


def test_narrow_invalid(data):
    trainer = _trainer(data)
    with pytest.raises(ValueError, match="must lie in 1 .. 15"):
        trainer.narrow(16)


def test_moves_reset_best(data):
    trainer = _trainer(data)
    trainer.fit(epochs=1)
    assert trainer.best_score is not None
    trainer.add_layer()
    assert trainer.best_score is None
    trainer.fit(epochs=1)
    assert trainer.model.config.layers == 3


def test_moves_before_training(data):
    config = ModelConfig(**SMALL)
    trainer = Trainer(config, TrainConfig(batch_size=48), *data, dtype=torch.float64)
    before = trainer.predict(data[2])
    trainer.widen(20)
    trainer.add_layer()
    np.testing.assert_allclose(trainer.predict(data[2]), before, rtol=0, atol=1e-12)
    assert len(trainer._optimizer.state) == 0


def test_hyperparameters_after_moves(data):
    trainer = _trainer(data)
    trainer.widen(20)
    optimizer = trainer._optimizer
    moments = _moments(trainer)
    trainer.set_hyperparameters(lr=1e-3, dropout=0.2)
    assert trainer._optimizer is optimizer
    assert torch.equal(
        _moments(trainer)["exp_avg"]["emb_w"], moments["exp_avg"]["emb_w"]
    )


def test_load_state_other_sizes(data):
    trainer = _trainer(data)
    saved = trainer.current_state()
    before = trainer.predict(data[2])
    trainer.widen(20)
    trainer.train_epochs(1)
    trainer.load_state(saved)
    assert trainer.model.config.hidden == 16
    np.testing.assert_allclose(trainer.predict(data[2]), before, rtol=0, atol=0)


@pytest.mark.parametrize("hidden, wider", [(16, 18), (16, 24), (24, 32)])
def test_rebuild_keeps_constructor_layout(data, hidden, wider):
    # The descriptor table has 19 features: the constructor's emb_w is
    # row-major below 19 and column-major from 19, and a matrix product over
    # the other layout may round differently in the last bit.
    trainer = _trainer(data, hidden=hidden, epochs=1)
    saved = trainer.current_state()
    trainer.widen(wider)
    built = CompositionMPNN(ModelConfig(**{**SMALL, "hidden": wider}))
    assert trainer.model.emb_w.stride() == built.emb_w.stride()
    trainer.load_state(saved)
    built = CompositionMPNN(ModelConfig(**{**SMALL, "hidden": hidden}))
    assert trainer.model.emb_w.stride() == built.emb_w.stride()


def test_load_state_other_dropout_keeps_optimizer(data):
    # Dropout is a setting, not a size: loading a state saved at another
    # dropout keeps the AdamW moments and the best-epoch record (a rebuild
    # would reset both), and takes the state's dropout.
    trainer = _trainer(data)
    saved = trainer.current_state()
    optimizer = trainer._optimizer
    trainer.set_hyperparameters(dropout=0.2)
    trainer.train_epochs(1)
    moments = _moments(trainer)
    best_epoch = trainer.best_epoch
    assert best_epoch is not None
    trainer.load_state(saved)
    assert trainer._optimizer is optimizer
    for name, moment in moments["exp_avg"].items():
        assert torch.equal(_moments(trainer)["exp_avg"][name], moment), name
    assert trainer.best_epoch == best_epoch
    assert trainer.model.config.dropout == 0.0


def test_widen_accepts_integral_float(data):
    trainer = _trainer(data)
    before = trainer.predict(data[2])
    trainer.widen(20.0)
    assert trainer.model.config.hidden == 20
    assert type(trainer.model.config.hidden) is int
    np.testing.assert_allclose(trainer.predict(data[2]), before, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="hidden must be an integer, got 22.5"):
        trainer.widen(22.5)


def test_move_deterministic(data):
    first = _trainer(data)
    second = _trainer(data)
    for trainer in (first, second):
        trainer.widen(20)
        trainer.add_layer()
        trainer.train_epochs(1)
    assert torch.equal(first.model.flat, second.model.flat)
