"""Tests of dvmrl.model: config, initialisation, forward paths, dropout."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dvmrl import elements, ops, reference
from dvmrl.featurize import featurize
from dvmrl.layout import parameter_count, unflatten
from dvmrl.model import (
    RESIDUAL_INIT_SCALE,
    CompositionMPNN,
    ModelConfig,
    orthogonal_embedding,
)

SMALL = {
    "hidden": 24,
    "layers": 2,
    "gate_hidden": 12,
    "msg_hidden": 16,
    "head_hidden": 20,
    "head_layers": 2,
}
FORMULAS = ["FeNi", "Al2Cu", "NiTiZr", "Mg", "Fe3Al", "CuZn", "AuAgPd", "LiMg"]


def _model(dtype=torch.float64, **overrides) -> CompositionMPNN:
    config = ModelConfig(**{**SMALL, **overrides})
    model = CompositionMPNN(config, seed=3).to(dtype=dtype)
    # Move the initial state away from zero biases and offsets, so the tests
    # exercise every parameter.
    with torch.no_grad():
        generator = torch.Generator().manual_seed(11)
        model.flat.add_(
            0.05 * torch.randn(model.flat.shape, generator=generator, dtype=dtype)
        )
        model.emb_offset.add_(
            0.1 * torch.randn(model.emb_offset.shape, generator=generator, dtype=dtype)
        )
    return model.eval()


def _batch(dtype=torch.float64, formulas=FORMULAS):
    return featurize(formulas).to(dtype=dtype)


def test_config_json_round_trip():
    config = ModelConfig(hidden=32, layers=1, dropout=0.2, heteroscedastic=True)
    text = json.dumps(config.to_dict())
    assert ModelConfig.from_dict(json.loads(text)) == config


def test_config_unknown_key():
    with pytest.raises(ValueError, match="unknown ModelConfig keys"):
        ModelConfig.from_dict({"hidden": 8, "width": 3})


def test_config_bad_dropout():
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(dropout=1.0)


def test_config_bad_size():
    with pytest.raises(ValueError, match="hidden"):
        ModelConfig(hidden=0)


def test_config_head_depth_limit():
    # The compiled core takes at most 16 head layers, and the config rejects
    # more when it is built, not at the first forward.
    assert ModelConfig(head_layers=16).head_layers == 16
    with pytest.raises(ValueError, match="head_layers must be at most 16"):
        ModelConfig(head_layers=17)


def test_config_n_out():
    assert ModelConfig(heteroscedastic=False).dims.n_out == 1
    assert ModelConfig(heteroscedastic=True).dims.n_out == 2


def test_parameter_shapes():
    model = CompositionMPNN(ModelConfig(**SMALL))
    n_features = elements.descriptor_matrix().shape[1]
    assert tuple(model.emb_w.shape) == (24, n_features)
    assert tuple(model.emb_b.shape) == (24,)
    assert tuple(model.emb_offset.shape) == (103, 24)
    assert model.flat.numel() == parameter_count(model.dims)
    assert model.flat.dtype == torch.float32


def test_embedding_isometry():
    descriptors = elements.descriptor_matrix()
    w = orthogonal_embedding(descriptors, 32, torch.Generator().manual_seed(0))
    identity = torch.eye(descriptors.shape[1], dtype=torch.float64)
    torch.testing.assert_close(w.T @ w, identity, atol=1e-12, rtol=0)


def test_embedding_projection():
    descriptors = elements.descriptor_matrix()
    w = orthogonal_embedding(descriptors, 8, torch.Generator().manual_seed(0))
    assert tuple(w.shape) == (8, descriptors.shape[1])
    torch.testing.assert_close(
        w @ w.T, torch.eye(8, dtype=torch.float64), atol=1e-12, rtol=0
    )


def test_initial_node_table():
    model = CompositionMPNN(ModelConfig(**SMALL), dtype=torch.float64)
    expected = model.descriptors @ model.emb_w.T
    torch.testing.assert_close(model.node_table(), expected, atol=0, rtol=0)
    # An isometry keeps the distances between element descriptor vectors.
    table = model.node_table().detach()
    distance = torch.linalg.norm(table[25] - table[27])  # Fe - Ni
    descriptor_distance = torch.linalg.norm(
        model.descriptors[25] - model.descriptors[27]
    )
    assert float(distance) == pytest.approx(float(descriptor_distance), rel=1e-12)


def test_initial_biases_zero():
    model = CompositionMPNN(ModelConfig(**SMALL))
    params = unflatten(model.flat.detach(), model.dims)
    for name in (
        "layer0.gate_b",
        "layer0.msg_b1",
        "layer1.msg_b2",
        "pool_msg_b2",
        "head_b0",
    ):
        assert torch.count_nonzero(params[name]) == 0, name


def test_residual_init_small():
    model = CompositionMPNN(ModelConfig(hidden=64, msg_hidden=64, layers=1))
    params = unflatten(model.flat.detach(), model.dims)
    expected = RESIDUAL_INIT_SCALE / 64**0.5
    assert float(params["layer0.msg_w2"].std()) == pytest.approx(expected, rel=0.1)
    assert float(params["layer0.msg_w2"].std()) < 0.5 * float(
        params["layer0.msg_w1_i"].std()
    )


def test_fraction_encoder_off():
    model = _model(fraction_hidden=0)
    batch = _batch()
    table, rows = model.node_inputs(batch.element_index, batch.frac)
    assert model.config.embedding_names == ("emb_w", "emb_b", "emb_offset")
    assert not hasattr(model, "frac_w1")
    torch.testing.assert_close(table, model.node_table(), atol=0, rtol=0)
    assert rows is batch.element_index


def test_fraction_encoder_node_rows():
    model = _model(fraction_hidden=8)
    assert tuple(model.frac_w1.shape) == (8, 2)
    assert tuple(model.frac_w2.shape) == (SMALL["hidden"], 8)
    batch = _batch()
    table, rows = model.node_inputs(batch.element_index, batch.frac)
    n_slots = batch.element_index.shape[1]
    assert tuple(table.shape) == (len(FORMULAS) * n_slots, SMALL["hidden"])
    assert torch.equal(rows.reshape(-1), torch.arange(len(FORMULAS) * n_slots))
    expected = model.node_table()[batch.element_index] + model.fraction_encoding(
        batch.frac
    )
    torch.testing.assert_close(table.reshape(expected.shape), expected, atol=0, rtol=0)


def test_fraction_encoder_sees_fractions():
    # Without the encoder, a binary's node states ignore the fractions (each
    # node has one neighbour, whose attention weight is 1).
    model = _model(fraction_hidden=8)
    batch = _batch(formulas=["FeNi", "Fe3Ni"])
    table, _ = model.node_inputs(batch.element_index, batch.frac)
    nodes = table.detach().reshape(2, -1, SMALL["hidden"])
    assert float((nodes[0, 0] - nodes[1, 0]).abs().max()) > 1e-3


def test_config_without_fraction_hidden():
    values = ModelConfig(**SMALL).to_dict()
    del values["fraction_hidden"]
    assert ModelConfig.from_dict(values).fraction_hidden == 0


def test_config_bad_fraction_hidden():
    with pytest.raises(ValueError, match="fraction_hidden must be an integer >= 0"):
        ModelConfig(fraction_hidden=-1)


def test_init_seed_reproducible():
    first = CompositionMPNN(ModelConfig(**SMALL), seed=5)
    second = CompositionMPNN(ModelConfig(**SMALL), seed=5)
    other = CompositionMPNN(ModelConfig(**SMALL), seed=6)
    assert torch.equal(first.flat, second.flat)
    assert not torch.equal(first.flat, other.flat)


@pytest.mark.parametrize("use_fused", [True, False])
def test_more_than_eight_slots_rejected_on_both_paths(use_fused):
    # The kernels' limit K <= 8 applies to the reference path too, so a
    # model behaves the same whichever path it runs.
    model = _model()
    model.use_fused = use_fused
    element_index = torch.arange(9).reshape(1, 9)
    frac = torch.full((1, 9), 1 / 9, dtype=torch.float64)
    mask = torch.ones(1, 9, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"1 <= K <= 8, got \[1, 9\]"):
        model(element_index, frac, mask)


def test_forward_matches_reference():
    model = _model()
    model.use_fused = False
    batch = _batch()
    table, rows = model.node_inputs(batch.element_index, batch.frac)
    out = reference.model_forward(
        table,
        model.flat,
        rows,
        batch.frac,
        batch.mask,
        model.dims,
    )
    model.set_target_scaling(-0.3, 0.7)
    prediction = model(batch.element_index, batch.frac, batch.mask)
    torch.testing.assert_close(prediction, out[:, 0] * 0.7 - 0.3, atol=1e-12, rtol=0)


def test_forward_fused_matches_reference():
    model = _model()
    batch = _batch()
    model.use_fused = False
    expected = model(batch.element_index, batch.frac, batch.mask)
    model.use_fused = True
    actual = model(batch.element_index, batch.frac, batch.mask)
    torch.testing.assert_close(actual, expected, atol=1e-10, rtol=1e-10)


def test_fused_switch_calls_ops(monkeypatch):
    # Both paths enter ops.model_forward (which checks the inputs); only the
    # reference path reaches reference.model_forward.
    calls, reference_calls = [], []
    original, original_reference = ops.model_forward, reference.model_forward

    def spy(*args, **kwargs):
        calls.append(kwargs["use_fused"])
        return original(*args, **kwargs)

    def reference_spy(*args, **kwargs):
        reference_calls.append(True)
        return original_reference(*args, **kwargs)

    monkeypatch.setattr(ops, "model_forward", spy)
    monkeypatch.setattr(reference, "model_forward", reference_spy)
    model = _model()
    batch = _batch()
    model.use_fused = True
    model(batch.element_index, batch.frac, batch.mask)
    assert calls == [True]
    assert reference_calls == []
    model.use_fused = False
    model(batch.element_index, batch.frac, batch.mask)
    assert calls == [True, False]
    assert reference_calls == [True]


def test_slot_permutation_invariance():
    model = _model()
    model.use_fused = False
    batch = _batch(formulas=["NiTiZr", "AuAgPd"])
    permutation = torch.tensor([2, 0, 1])
    expected = model(batch.element_index, batch.frac, batch.mask)
    permuted = model(
        batch.element_index[:, permutation],
        batch.frac[:, permutation],
        batch.mask[:, permutation],
    )
    torch.testing.assert_close(permuted, expected, atol=1e-12, rtol=0)


def test_sliced_inputs_accepted():
    model = _model()
    batch = featurize(["FeNi", "Al2Cu"], k_max=4).to(dtype=torch.float64)
    expected = model(batch.element_index[:, :2], batch.frac[:, :2], batch.mask[:, :2])
    assert not batch.frac[:, :2].is_contiguous()
    compact = batch.trimmed()
    actual = model(compact.element_index, compact.frac, compact.mask)
    torch.testing.assert_close(expected, actual, atol=1e-12, rtol=0)


def test_padding_invariance():
    model = _model()
    model.use_fused = False
    narrow = featurize(["FeNi", "Al2Cu"]).to(dtype=torch.float64)
    padded = featurize(["FeNi", "Al2Cu"], k_max=5).to(dtype=torch.float64)
    expected = model(narrow.element_index, narrow.frac, narrow.mask)
    actual = model(padded.element_index, padded.frac, padded.mask)
    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=0)


def test_single_element_finite():
    model = _model()
    batch = _batch(formulas=["Fe", "Cu"])
    prediction = model(batch.element_index, batch.frac, batch.mask)
    assert bool(torch.isfinite(prediction).all())
    assert float(prediction[0].detach()) != float(prediction[1].detach())


@pytest.mark.parametrize("use_fused", [False, True])
def test_frac_gradient_matches_gradcheck(use_fused):
    model = _model()
    model.use_fused = use_fused
    batch = _batch(formulas=["NiTiZr", "FeNi", "Al2Cu"])
    frac = batch.frac.clone().requires_grad_(True)

    def predict(f):
        return model(batch.element_index, f, batch.mask)

    assert torch.autograd.gradcheck(predict, (frac,), eps=1e-6, atol=1e-7)


def test_gradients_reach_every_parameter():
    model = _model().train()
    batch = _batch()
    model(batch.element_index, batch.frac, batch.mask).sum().backward()
    for name in (*model.config.embedding_names, "flat"):
        gradient = getattr(model, name).grad
        assert gradient is not None, name
        assert bool(torch.isfinite(gradient).all()), name
    assert torch.count_nonzero(model.flat.grad) > 0.9 * model.flat.numel()


def test_dropout_mask_values():
    model = _model(dropout=0.25).train()
    model.dropout_generator = torch.Generator().manual_seed(0)
    mask = model.draw_dropout_mask(500)
    assert tuple(mask.shape) == (2, 500, 20)
    values = set(torch.unique(mask).tolist())
    assert values == {0.0, 1.0 / 0.75}
    kept = float((mask > 0).to(torch.float64).mean())
    assert kept == pytest.approx(0.75, abs=0.02)


def test_dropout_only_in_training():
    model = _model(dropout=0.3)
    batch = _batch()
    model.eval()
    assert model.draw_dropout_mask(len(batch)) is None
    first = model(batch.element_index, batch.frac, batch.mask)
    second = model(batch.element_index, batch.frac, batch.mask)
    assert torch.equal(first, second)
    model.train()
    noisy = model(batch.element_index, batch.frac, batch.mask)
    assert not torch.equal(noisy, first)


def test_mc_dropout_in_eval():
    model = _model(dropout=0.3).eval()
    batch = _batch()
    clean = model(batch.element_index, batch.frac, batch.mask)
    model.mc_dropout(True)
    assert model.mc_dropout_enabled
    sampled = model(batch.element_index, batch.frac, batch.mask)
    assert not torch.equal(sampled, clean)
    model.mc_dropout(False)
    assert torch.equal(model(batch.element_index, batch.frac, batch.mask), clean)


def test_dropout_generator_reproducible():
    model = _model(dropout=0.3).train()
    batch = _batch()
    model.dropout_generator = torch.Generator().manual_seed(4)
    first = model(batch.element_index, batch.frac, batch.mask)
    model.dropout_generator = torch.Generator().manual_seed(4)
    second = model(batch.element_index, batch.frac, batch.mask)
    assert torch.equal(first, second)


def test_dropout_reaches_kernel(monkeypatch):
    seen = []
    original = ops.model_forward

    def spy(*args, **kwargs):
        seen.append(args[6] if len(args) > 6 else kwargs.get("dropout_mask"))
        return original(*args, **kwargs)

    monkeypatch.setattr(ops, "model_forward", spy)
    model = _model(dropout=0.5).train()
    batch = _batch()
    model(batch.element_index, batch.frac, batch.mask)
    assert seen[0] is not None
    assert tuple(seen[0].shape) == (2, len(batch), 20)


def test_variance_units():
    model = _model(heteroscedastic=True)
    batch = _batch()
    model.set_target_scaling(0.0, 1.0)
    mean_1, variance_1 = model.forward_with_variance(
        batch.element_index, batch.frac, batch.mask
    )
    model.set_target_scaling(0.5, 2.0)
    mean_2, variance_2 = model.forward_with_variance(
        batch.element_index, batch.frac, batch.mask
    )
    torch.testing.assert_close(mean_2, mean_1 * 2.0 + 0.5, atol=1e-12, rtol=0)
    torch.testing.assert_close(variance_2, variance_1 * 4.0, atol=1e-12, rtol=1e-12)
    assert bool((variance_1 > 0).all())


def test_variance_needs_head():
    model = _model()
    batch = _batch()
    with pytest.raises(RuntimeError, match="heteroscedastic"):
        model.forward_with_variance(batch.element_index, batch.frac, batch.mask)


def test_has_uncertainty():
    assert not _model().has_uncertainty
    assert _model(heteroscedastic=True).has_uncertainty
    assert _model(dropout=0.1).has_uncertainty


def test_frac_dtype_mismatch():
    model = _model(dtype=torch.float32)
    batch = _batch(dtype=torch.float64)
    with pytest.raises(TypeError, match="dtype"):
        model(batch.element_index, batch.frac, batch.mask)


OUTSIDE_ROWS = r"element_index contains rows outside 0 \.\. 102, such as "


@pytest.mark.parametrize("fraction_hidden", [0, 8])
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("index -1", OUTSIDE_ROWS + r"\[-1\]"),
        ("index 200", OUTSIDE_ROWS + r"\[200\]"),
        ("nan", r"got values in \[nan, nan\]"),
        ("negative", r"each in \[0, 1\]"),
        ("times 3", r"sums in \[1, 3\]"),
        ("empty row", r"rows \[2\] of mask have no real slot"),
    ],
)
def test_invalid_values_named(fraction_hidden, change, message):
    """Values that no composition has raise instead of giving a prediction."""
    model = _model(fraction_hidden=fraction_hidden)
    batch = _batch()
    index, frac = batch.element_index.clone(), batch.frac.clone()
    mask = batch.mask.clone()
    if change.startswith("index"):
        index[1, 0] = int(change.split()[1])
    elif change == "nan":
        frac[:] = float("nan")
    elif change == "negative":
        frac[0, 0], frac[0, 1] = -0.5, 1.5
    elif change == "times 3":
        frac[4] *= 3
    else:
        mask[2] = False
    with pytest.raises(ValueError, match=message):
        model(index, frac, mask)


def test_empty_batch_gives_empty_output():
    model = _model()
    batch = _batch()
    out = model(batch.element_index[:0], batch.frac[:0], batch.mask[:0])
    assert out.shape == (0,)
    # The empty output stays in the graph, as any batch's does.
    out.sum().backward()
    assert torch.equal(model.flat.grad, torch.zeros_like(model.flat))


def test_batch_without_slots_rejected():
    model = _model()
    index = torch.zeros((3, 0), dtype=torch.int64)
    frac = torch.zeros((3, 0), dtype=torch.float64)
    mask = torch.zeros((3, 0), dtype=torch.bool)
    with pytest.raises(ValueError, match=r"shape \[3, 0\].*K >= 1"):
        model(index, frac, mask)


@pytest.mark.parametrize("fraction_hidden", [32, 0])
@pytest.mark.parametrize("use_fused", [True, False])
def test_poisoned_padding_is_ignored(use_fused, fraction_hidden):
    # Padded slots are outside the contract's values (NaN fractions, rows
    # outside the element table). The output and every gradient must equal
    # those of the clean batch, on both paths.
    model = _model(fraction_hidden=fraction_hidden)
    model.use_fused = use_fused
    batch = featurize(["FeNi", "Al2Cu", "NiTiZr"], k_max=5).to(dtype=torch.float64)
    results = []
    for poison in (False, True):
        model.zero_grad()
        frac = batch.frac.clone()
        index = batch.element_index.clone()
        if poison:
            frac[~batch.mask] = float("nan")
            index[0, 2:] = torch.tensor([500, -1, 10_000])
        frac.requires_grad_(True)
        out = model(index, frac, batch.mask)
        out.sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        results.append((out.detach(), frac.grad.clone(), grads))
    (clean, clean_frac, clean_grads), (dirty, dirty_frac, dirty_grads) = results
    assert torch.equal(clean, dirty)
    assert torch.equal(clean_frac, dirty_frac)
    for name, grad in clean_grads.items():
        assert torch.equal(grad, dirty_grads[name]), name


@pytest.mark.parametrize("hidden", [16.0, np.int64(16)])
def test_integral_float_sizes_become_ints(hidden):
    # Hand-written JSON may spell a width 16.0.
    config = ModelConfig.from_dict({**SMALL, "hidden": hidden, "fraction_hidden": 8.0})
    assert type(config.hidden) is int
    assert config.hidden == 16
    assert type(config.dims.hidden) is int
    assert type(parameter_count(config.dims)) is int
    model = CompositionMPNN(config, seed=0)
    assert model.emb_offset.shape[1] == 16


@pytest.mark.parametrize("value", ["false", "no", 2, None])
def test_heteroscedastic_must_be_boolean(value):
    # bool("false") is True, so strings are rejected rather than converted.
    with pytest.raises(ValueError, match="heteroscedastic must be true or false"):
        ModelConfig(heteroscedastic=value)


@pytest.mark.parametrize("hidden", [16.5, True, "16", float("inf")])
def test_non_integer_sizes_rejected(hidden):
    with pytest.raises(ValueError, match="hidden must be an integer >= 1"):
        ModelConfig(**{**SMALL, "hidden": hidden})


def test_target_scaling_invalid():
    model = _model()
    with pytest.raises(ValueError, match="positive finite std"):
        model.set_target_scaling(0.0, 0.0)


def test_float32_close_to_float64():
    model64 = _model(dtype=torch.float64)
    model32 = _model(dtype=torch.float64).to(dtype=torch.float32)
    batch = _batch()
    expected = model64(batch.element_index, batch.frac, batch.mask)
    batch32 = batch.to(dtype=torch.float32)
    actual = model32(batch32.element_index, batch32.frac, batch32.mask)
    assert actual.dtype == torch.float32
    np.testing.assert_allclose(actual.double().detach(), expected.detach(), atol=1e-5)


def test_device_move(device):
    model = _model(dtype=torch.float32).to(device)
    batch = _batch(dtype=torch.float32).to(device)
    prediction = model(batch.element_index, batch.frac, batch.mask)
    assert prediction.device.type == device.type
    cpu_model = _model(dtype=torch.float32)
    cpu_batch = _batch(dtype=torch.float32)
    expected = cpu_model(cpu_batch.element_index, cpu_batch.frac, cpu_batch.mask)
    np.testing.assert_allclose(prediction.cpu().detach(), expected.detach(), atol=1e-5)


@pytest.mark.parametrize("fraction_hidden", [32, 0])
def test_fused_second_derivative_raises(fraction_hidden):
    # torch.autograd.grad(..., inputs=frac) only runs the graph nodes on the
    # paths to frac. The node that raises must lie on them, or the second
    # derivative silently lacks the fused op's part (with the fraction
    # encoder on, its PyTorch part alone still reaches frac).
    batch = featurize(["Ni3Al", "FeNiCo"])
    model = _model(fraction_hidden=fraction_hidden).eval()
    frac = batch.frac.clone().requires_grad_()
    out = model(batch.element_index, frac, batch.mask).sum()
    (grad,) = torch.autograd.grad(out, frac, create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(grad.square().sum(), frac)
    # The reference path has the second derivative.
    model.use_fused = False
    frac = batch.frac.clone().requires_grad_()
    out = model(batch.element_index, frac, batch.mask).sum()
    (grad,) = torch.autograd.grad(out, frac, create_graph=True)
    (second,) = torch.autograd.grad(grad.square().sum(), frac)
    assert torch.isfinite(second).all()


TINY_CONFIG = ModelConfig(hidden=8, layers=1, gate_hidden=8, msg_hidden=8)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int64])
def test_model_rejects_other_dtypes(dtype):
    with pytest.raises(TypeError, match="torch.float32 or torch.float64"):
        CompositionMPNN(TINY_CONFIG, dtype=dtype)


def test_fraction_error_shows_digits():
    # A sum of 1.01 (1.0099999... in float32) must not print as 1.
    model = CompositionMPNN(TINY_CONFIG)
    batch = featurize(["NiAl"])
    with pytest.raises(ValueError, match=r"sums in \[1\.0099999\d*, 1\.0099999"):
        model(batch.element_index, batch.frac.float() * 1.01, batch.mask)
