"""Fused message-passing kernels on a CUDA GPU (skipped without one)."""

from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda
from test_ops_message_passing import (
    FLOAT32_CASES,
    ROWS,
    SMALL,
    TABLE_FRAC_CASES,
    adamw_step_differences,
    forward_and_grads,
    fractions_at_floor,
    make_batch,
    make_dims,
    negative_fraction_batch,
    rel_error,
    table_and_frac_grads,
    table_frac_case,
)

from dvmrl import ops, reference
from dvmrl.layout import parameter_layout

pytestmark = [pytest.mark.cuda, requires_cuda]


def to_cuda(args):
    return [None if t is None else t.cuda() for t in args]


@pytest.mark.parametrize("dropout", [False, True])
def test_cuda_float64_matches_reference(dropout):
    args = make_batch(37, 6, SMALL, torch.float64, seed=1, dropout=dropout)
    ref = forward_and_grads(reference.model_forward, *args[:5], SMALL, args[5])
    cuda_args = to_cuda(args)
    fused = forward_and_grads(ops.model_forward, *cuda_args[:5], SMALL, cuda_args[5])
    for name, a, b in zip(("out", "node_table", "flat", "frac"), fused, ref):
        assert a.is_cuda, name
        assert rel_error(a.cpu(), b) < 1e-11, name


def test_cuda_gradcheck_float64():
    node_table, flat, index, frac, mask, _ = to_cuda(
        make_batch(3, 4, SMALL, torch.float64, seed=2, sizes=[4, 1, 2])
    )

    def fn(table, params, fractions):
        return ops.model_forward(table, params, index, fractions, mask, SMALL)

    inputs = tuple(t.clone().requires_grad_() for t in (node_table, flat, frac))
    # The backward sums gradients with atomicAdd, whose order may vary.
    assert torch.autograd.gradcheck(
        fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, nondet_tol=1e-12
    )


@pytest.mark.parametrize(("batch", "slots", "hidden"), FLOAT32_CASES)
def test_cuda_float32_matches_reference(batch, slots, hidden):
    dims = make_dims(hidden)
    args = make_batch(batch, slots, dims, torch.float32, seed=batch + slots + hidden)
    ref64 = [t.double() for t in args[:2]] + [args[2], args[3].double(), args[4]]
    ref = forward_and_grads(reference.model_forward, *ref64, dims, None)
    fused = forward_and_grads(ops.model_forward, *to_cuda(args[:5]), dims, None)
    assert rel_error(fused[0].cpu(), ref[0]) <= 1e-5
    for name, a, b in zip(("node_table", "flat", "frac"), fused[1:], ref[1:]):
        assert rel_error(a.cpu(), b) <= 1e-4, name


def test_cuda_padding_poison_never_leaks():
    dims = make_dims(16)
    node_table, flat, index, frac, mask, _ = make_batch(12, 6, dims, torch.float64, seed=5)
    frac_poisoned = torch.where(mask, frac, torch.full_like(frac, float("nan")))
    clean = forward_and_grads(ops.model_forward, *to_cuda([node_table, flat, index, frac, mask]), dims, None)
    dirty = forward_and_grads(
        ops.model_forward, *to_cuda([node_table, flat, index, frac_poisoned, mask]), dims, None
    )
    for name, a, b in zip(("out", "node_table", "flat"), clean[:3], dirty[:3]):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), name
    assert torch.all(dirty[3][~mask.cuda()] == 0)


def test_cuda_runs_on_current_stream():
    # The inputs reach their buffers on the side stream, behind a long GPU
    # sleep, and the buffers hold poison until then: a kernel launched on any
    # other stream would read the poison and give other outputs.
    dims = make_dims(32)
    args = to_cuda(make_batch(100, 5, dims, torch.float32, seed=6)[:5])
    expected = ops.model_forward(*args, dims)
    late = []
    for a in args:
        poison = float("nan") if a.is_floating_point() else 0
        late.append(torch.full_like(a, poison))
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(100_000_000)
        for buffer, value in zip(late, args, strict=True):
            buffer.copy_(value)
        out = ops.model_forward(*late, dims)
    stream.synchronize()
    assert torch.allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_cuda_empty_batch():
    dims = make_dims(8)
    table = torch.randn(103, 8, device="cuda", dtype=torch.float64, requires_grad=True)
    flat = torch.zeros(ops.parameter_count(dims), device="cuda", dtype=torch.float64)
    out = ops.model_forward(
        table,
        flat,
        torch.zeros(0, 3, dtype=torch.int64, device="cuda"),
        torch.zeros(0, 3, dtype=torch.float64, device="cuda"),
        torch.zeros(0, 3, dtype=torch.bool, device="cuda"),
        dims,
    )
    assert out.shape == (0, 1)
    out.sum().backward()
    assert torch.all(table.grad == 0)


# The GPU sums node-table gradients with atomicAdd, so the modes agree to
# rounding rather than bit for bit.
@pytest.mark.parametrize("case", ["single", "mixed_k", "repeated_rows", "identity_table"])
def test_cuda_table_frac_mode_equals_full_backward(case):
    settings = {**TABLE_FRAC_CASES[case], "dtype": torch.float64}
    node_table, flat, index, frac, mask, dims, drop = table_frac_case(**settings)
    node_table, flat, index, frac, mask, drop = to_cuda(
        [node_table, flat, index, frac, mask, drop]
    )
    full = forward_and_grads(ops.model_forward, node_table, flat, index, frac, mask, dims, drop)
    grad_table, grad_frac = table_and_frac_grads(
        node_table, flat, index, frac, mask, dims, drop
    )
    assert grad_table.is_cuda
    assert rel_error(grad_table.cpu(), full[1].cpu()) < 1e-12
    assert rel_error(grad_frac.cpu(), full[3].cpu()) < 1e-12


def test_cuda_gradcheck_table_frac_mode_float64():
    node_table, flat, index, frac, mask, _ = make_batch(
        4, 4, SMALL, torch.float64, seed=8, sizes=[4, 1, 3, 2]
    )
    index = (index % 5) * mask
    node_table, flat, index, frac, mask = to_cuda(
        [node_table[:5].contiguous(), flat, index, frac, mask]
    )

    def fn(table, fractions):
        return ops.model_forward(table, flat, index, fractions, mask, SMALL)

    inputs = tuple(t.clone().requires_grad_() for t in (node_table, frac))
    # The backward sums gradients with atomicAdd, whose order may vary.
    assert torch.autograd.gradcheck(
        fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, nondet_tol=1e-12
    )


def test_cuda_rejects_index_outside_table():
    args = list(make_batch(3, 4, SMALL, torch.float64, seed=12)[:5])
    args[2] = args[2].clone()
    args[2][1, 0] = ROWS + 5
    with pytest.raises(
        ValueError,
        match=r"element_index\[1, 0\] = 108 is outside the node table with 103 rows",
    ):
        ops.model_forward(*to_cuda(args), SMALL)


# Widths that are not multiples of the 32-wide weight tiles, and K = 8, the
# largest shared-memory tile, in float64.
@pytest.mark.parametrize(("batch", "slots", "hidden"), [(33, 8, 24), (50, 5, 36), (7, 3, 130)])
def test_cuda_float64_odd_widths_match_reference(batch, slots, hidden):
    dims = make_dims(hidden, gate_hidden=hidden - 4, msg_hidden=hidden + 2)
    args = make_batch(batch, slots, dims, torch.float64, seed=batch + hidden)
    ref = forward_and_grads(reference.model_forward, *args[:5], dims, None)
    fused = forward_and_grads(ops.model_forward, *to_cuda(args[:5]), dims, None)
    for name, a, b in zip(("out", "node_table", "flat", "frac"), fused, ref):
        assert rel_error(a.cpu(), b) < 1e-11, name


def test_cuda_large_gates_stay_finite_float32():
    dims = make_dims(16)
    node_table, flat, index, frac, mask, _ = make_batch(40, 5, dims, torch.float32, seed=6)
    layout = {spec.name: spec for spec in parameter_layout(dims)}
    flat = flat.clone()
    for name in ("layer0.gate_u", "layer1.gate_u", "layer2.gate_u", "pool_gate_u"):
        spec = layout[name]
        flat[spec.offset : spec.offset + spec.numel] *= 400.0
    node_table = node_table * 40.0
    fused = forward_and_grads(
        ops.model_forward, *to_cuda([node_table, flat, index, frac, mask]), dims, None
    )
    for name, value in zip(("out", "node_table", "flat", "frac"), fused):
        assert torch.isfinite(value).all(), name
    ref = reference.model_forward(
        node_table.double(), flat.double(), index, frac.double(), mask, dims
    )
    assert rel_error(fused[0].cpu(), ref) <= 1e-4


@pytest.mark.parametrize("floor", [1e-4, 0.0])
def test_cuda_fractions_at_floor_and_single_elements(floor):
    dims = make_dims(16)
    node_table, flat, index, _, mask, _ = make_batch(
        6, 4, dims, torch.float64, seed=8, sizes=[4, 1, 2, 4, 1, 3]
    )
    args = [node_table, flat, index, fractions_at_floor(mask, floor), mask]
    ref = forward_and_grads(reference.model_forward, *args, dims, None)
    fused = forward_and_grads(ops.model_forward, *to_cuda(args), dims, None)
    for name, a, b in zip(("out", "node_table", "flat", "frac"), fused, ref):
        assert torch.isfinite(a).all(), name
        assert rel_error(a.cpu(), b) < 1e-12, name


def test_cuda_adamw_step_matches_reference_float64():
    for name, difference in adamw_step_differences("cuda").items():
        assert difference <= 1e-10, name


# atomicAdd sums in a varying order, so two backwards match twice one to
# rounding, not bit for bit.
def test_cuda_grads_accumulate_over_two_backwards():
    dims = make_dims(24, gate_hidden=20, msg_hidden=18)
    node_table, flat, index, frac, mask = to_cuda(
        make_batch(300, 5, dims, torch.float64, seed=60)[:5]
    )
    leaves = [t.clone().requires_grad_() for t in (node_table, flat, frac)]
    first = torch.autograd.grad(
        ops.model_forward(leaves[0], leaves[1], index, leaves[2], mask, dims).sum(), leaves
    )
    for _ in range(2):
        ops.model_forward(leaves[0], leaves[1], index, leaves[2], mask, dims).sum().backward()
    for name, leaf, grad in zip(("node_table", "flat", "frac"), leaves, first):
        assert torch.allclose(leaf.grad, 2 * grad, rtol=1e-12, atol=1e-14), name


def test_cuda_scratch_counts_in_torch_memory():
    dims = make_dims(64)
    args = to_cuda(make_batch(2000, 5, dims, torch.float32, seed=3)[:5])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    ops.model_forward(*args, dims)
    torch.cuda.synchronize()
    plan = next(p for p in ops._plans.values() if p.out_shape == (2000, 1))
    peak = torch.cuda.max_memory_allocated() - before
    assert plan.scratch_size > 0
    assert peak >= 4 * (plan.scratch_size + plan.workspace_size)


def test_cuda_negative_fractions_match_reference():
    dims, *args = negative_fraction_batch()
    ref = forward_and_grads(reference.model_forward, *args, dims, None)
    cuda = forward_and_grads(ops.model_forward, *to_cuda(args), dims, None)
    for name, a, b in zip(("out", "node_table", "flat", "frac"), cuda, ref):
        assert rel_error(a.cpu(), b) < 1e-11, name


@pytest.mark.parametrize("overrides", [{"layers": 0}, {"head_layers": 0}])
def test_cuda_without_layers_or_head_matches_reference(overrides):
    dims = make_dims(16, **overrides)
    args = list(make_batch(9, 4, dims, torch.float64, seed=15)[:5])
    ref = forward_and_grads(reference.model_forward, *args, dims, None)
    cuda = forward_and_grads(ops.model_forward, *to_cuda(args), dims, None)
    for name, a, b in zip(("out", "node_table", "flat", "frac"), cuda, ref):
        assert rel_error(a.cpu(), b) < 1e-11, name
