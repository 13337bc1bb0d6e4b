"""Fused message-passing kernels (CPU) against the PyTorch reference."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dvmrl
from child_env import child_environment
from conftest import requires_cuda
from dvmrl import _core, ops, reference
from dvmrl.layout import ModelDims, parameter_count, parameter_layout, unflatten

ROWS = 103


def make_dims(hidden: int, **overrides) -> ModelDims:
    sizes = dict(
        hidden=hidden,
        gate_hidden=hidden,
        msg_hidden=hidden,
        layers=3,
        head_hidden=32,
        head_layers=2,
        n_out=1,
    )
    sizes.update(overrides)
    return ModelDims(**sizes)


def random_flat(dims: ModelDims, generator: torch.Generator, dtype) -> torch.Tensor:
    """Flat buffer with fan-in scaled weights and small random biases."""
    flat = torch.empty(parameter_count(dims), dtype=torch.float64)
    for spec in parameter_layout(dims):
        values = torch.randn(spec.shape, generator=generator, dtype=torch.float64)
        scale = 1.0 / math.sqrt(spec.shape[-1]) if len(spec.shape) == 2 else 0.3
        flat[spec.offset : spec.offset + spec.numel] = (values * scale).reshape(-1)
    return flat.to(dtype)


def make_batch(batch, slots, dims, dtype, seed=0, sizes=None, dropout=False):
    """Random inputs with mixed composition sizes (1..slots unless given)."""
    generator = torch.Generator().manual_seed(seed)
    if sizes is None:
        sizes = torch.randint(1, slots + 1, (batch,), generator=generator)
        sizes[0] = slots
    else:
        sizes = torch.as_tensor(sizes)
    mask = torch.arange(slots)[None, :] < sizes[:, None]
    element_index = torch.randint(0, ROWS, (batch, slots), generator=generator) * mask
    frac = torch.rand(batch, slots, generator=generator, dtype=torch.float64) + 0.05
    frac = frac * mask
    frac = (frac / frac.sum(dim=1, keepdim=True)).to(dtype)
    node_table = torch.randn(ROWS, dims.hidden, generator=generator, dtype=dtype)
    flat = random_flat(dims, generator, dtype)
    dropout_mask = None
    if dropout:
        keep = (
            torch.rand(dims.head_layers, batch, dims.head_hidden, generator=generator)
            >= 0.25
        )
        dropout_mask = keep.to(dtype) / 0.75
    return node_table, flat, element_index, frac, mask, dropout_mask


def forward_and_grads(
    fn, node_table, flat, element_index, frac, mask, dims, drop, seed=1
):
    """Return (out, d node_table, d flat, d frac) for a random output weighting."""
    leaves = [t.detach().clone().requires_grad_() for t in (node_table, flat, frac)]
    out = fn(leaves[0], leaves[1], element_index, leaves[2], mask, dims, drop)
    weight = torch.randn(
        out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    ).to(out.device, out.dtype)
    grads = torch.autograd.grad((out * weight).sum(), leaves)
    return (out.detach(), *grads)


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    scale = expected.abs().max().item()
    return (actual.double() - expected.double()).abs().max().item() / max(scale, 1e-30)


SMALL = ModelDims(
    hidden=4,
    gate_hidden=3,
    msg_hidden=5,
    layers=2,
    head_hidden=3,
    head_layers=2,
    n_out=2,
)


@pytest.mark.parametrize("dropout", [False, True])
def test_gradcheck_float64(dropout):
    node_table, flat, index, frac, mask, drop = make_batch(
        4, 4, SMALL, torch.float64, seed=3, sizes=[4, 1, 3, 2], dropout=dropout
    )

    def fn(table, params, fractions):
        return ops.model_forward(table, params, index, fractions, mask, SMALL, drop)

    inputs = tuple(t.clone().requires_grad_() for t in (node_table, flat, frac))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# One small composition runs the dot-product path, larger batches the
# transposed-weight path; B = 16 splits into two halves.
@pytest.mark.parametrize(
    ("batch", "dropout"), [(1, False), (9, False), (9, True), (16, True)]
)
def test_float64_matches_reference(batch, dropout):
    args = make_batch(batch, 5, SMALL, torch.float64, seed=4, sizes=None if batch > 1 else [3], dropout=dropout)
    fused = forward_and_grads(ops.model_forward, *args[:5], SMALL, args[5])
    ref = forward_and_grads(reference.model_forward, *args[:5], SMALL, args[5])
    for name, a, b in zip(("out", "node_table", "flat", "frac"), fused, ref):
        assert rel_error(a, b) < 1e-12, name


# Every listed B, K and H appears at least once; mixed sizes in each batch.
FLOAT32_CASES = [
    (1, 2, 16),
    (1, 8, 128),
    (7, 3, 64),
    (7, 5, 16),
    (64, 5, 128),
    (64, 2, 64),
    (1000, 3, 64),
    (1000, 8, 16),
]


@pytest.mark.parametrize(("batch", "slots", "hidden"), FLOAT32_CASES)
def test_float32_matches_reference(batch, slots, hidden):
    dims = make_dims(hidden)
    args = make_batch(batch, slots, dims, torch.float32, seed=batch + slots + hidden)
    fused = forward_and_grads(ops.model_forward, *args[:5], dims, None)
    ref64_inputs = [t.double() for t in args[:2]] + [args[2], args[3].double(), args[4]]
    ref = forward_and_grads(reference.model_forward, *ref64_inputs, dims, None)
    assert fused[0].dtype == torch.float32
    assert rel_error(fused[0], ref[0]) <= 1e-5
    for name, a, b in zip(("node_table", "flat", "frac"), fused[1:], ref[1:]):
        assert rel_error(a, b) <= 1e-4, name


def test_padding_poison_never_leaks():
    dims = make_dims(16)
    node_table, flat, index, frac, mask, _ = make_batch(
        12, 6, dims, torch.float64, seed=5
    )
    clean = forward_and_grads(
        ops.model_forward, node_table, flat, index, frac, mask, dims, None
    )
    poisoned_index = torch.where(mask, index, torch.full_like(index, ROWS - 1))
    poisoned_frac = torch.where(mask, frac, torch.full_like(frac, float("nan")))
    poisoned_table = node_table.clone()
    used = set(index[mask].tolist())
    assert ROWS - 1 not in used
    poisoned_table[ROWS - 1] = float("nan")
    poisoned = forward_and_grads(
        ops.model_forward,
        poisoned_table,
        flat,
        poisoned_index,
        poisoned_frac,
        mask,
        dims,
        None,
    )
    assert torch.equal(clean[0], poisoned[0])
    assert torch.equal(clean[2], poisoned[2])
    real_rows = sorted(used)
    assert torch.equal(clean[1][real_rows], poisoned[1][real_rows])
    assert torch.all(poisoned[1][ROWS - 1] == 0)
    assert torch.equal(poisoned[3][mask], clean[3][mask])
    assert torch.all(poisoned[3][~mask] == 0)


def test_large_gates_stay_finite_float32():
    dims = make_dims(16)
    node_table, flat, index, frac, mask, _ = make_batch(
        40, 5, dims, torch.float32, seed=6
    )
    layout = {spec.name: spec for spec in parameter_layout(dims)}
    flat = flat.clone()
    for name in ("layer0.gate_u", "layer1.gate_u", "layer2.gate_u", "pool_gate_u"):
        spec = layout[name]
        flat[spec.offset : spec.offset + spec.numel] *= 400.0
    for name in ("layer0.gate_d", "pool_gate_d"):
        flat[layout[name].offset] = 90.0
    # Pre-activations of magnitude 80 and more in the silu layers too.
    node_table = node_table * 40.0
    fused = forward_and_grads(
        ops.model_forward, node_table, flat, index, frac, mask, dims, None
    )
    for name, value in zip(("out", "node_table", "flat", "frac"), fused):
        assert torch.isfinite(value).all(), name
    ref = reference.model_forward(
        node_table.double(), flat.double(), index, frac.double(), mask, dims
    )
    gates = unflatten(flat.double(), dims)["pool_gate_u"]
    assert gates.abs().max() > 80
    assert rel_error(fused[0], ref) <= 1e-4


def test_single_element_rows_are_finite():
    dims = make_dims(16)
    args = make_batch(5, 3, dims, torch.float64, seed=7, sizes=[1, 1, 2, 1, 3])
    fused = forward_and_grads(ops.model_forward, *args[:5], dims, None)
    ref = forward_and_grads(reference.model_forward, *args[:5], dims, None)
    for name, a, b in zip(("out", "node_table", "flat", "frac"), fused, ref):
        assert torch.isfinite(a).all(), name
        assert rel_error(a, b) < 1e-12, name


def fractions_at_floor(mask: torch.Tensor, floor: float) -> torch.Tensor:
    """Return float64 fractions [B, K]: every real slot but the first at ``floor``."""
    frac = torch.full(mask.shape, floor, dtype=torch.float64) * mask
    frac[:, 0] = 1.0 - frac[:, 1:].sum(dim=1)
    return frac


@pytest.mark.parametrize("floor", [0.01, 1e-4, 0.0])
def test_fractions_at_floor(floor):
    dims = make_dims(16)
    node_table, flat, index, _, mask, _ = make_batch(
        6, 4, dims, torch.float64, seed=8, sizes=[4, 3, 2, 4, 1, 3]
    )
    frac = fractions_at_floor(mask, floor)
    frac[3] = torch.tensor([floor, floor, floor, floor], dtype=torch.float64)
    fused = forward_and_grads(
        ops.model_forward, node_table, flat, index, frac, mask, dims, None
    )
    ref = forward_and_grads(
        reference.model_forward, node_table, flat, index, frac, mask, dims, None
    )
    for name, a, b in zip(("out", "node_table", "flat", "frac"), fused, ref):
        assert torch.isfinite(a).all(), name
        assert rel_error(a, b) < 1e-12, name


# Negative fractions (outside the model's domain, but accepted by the op)
# can make a weighted-softmax denominator zero or negative. The reference
# then divides by 1, and the fused backward must differentiate that branch.
def negative_fraction_batch():
    """Five compositions whose weights are negative or sum to 0 or less.

    They take the softmax branch whose denominator is replaced by 1 and whose
    max gradient is shared among ties. Returns (dims, node_table, flat,
    element_index, frac, mask).
    """
    dims = make_dims(16)
    node_table, flat, index, _, mask, _ = make_batch(
        5, 3, dims, torch.float64, seed=14, sizes=[3, 3, 3, 2, 3]
    )
    frac = torch.tensor(
        [
            [0.5, 0.3, -0.9],
            [0.5, 0.6, -0.1],
            [-0.2, -0.3, -0.5],
            [0.4, -0.4, 0.0],
            [0.0, 0.0, 0.0],
        ],
        dtype=torch.float64,
    )
    return dims, node_table, flat, index, frac, mask


def test_negative_fractions_match_reference():
    dims, node_table, flat, index, frac, mask = negative_fraction_batch()
    fused = forward_and_grads(ops.model_forward, node_table, flat, index, frac, mask, dims, None)
    ref = forward_and_grads(
        reference.model_forward, node_table, flat, index, frac, mask, dims, None
    )
    for name, a, b in zip(("out", "node_table", "flat", "frac"), fused, ref):
        assert rel_error(a, b) < 1e-12, name

    # Finite differences need denominators away from 0, where the branch
    # changes: the first three rows.
    def fn(table, params, fractions):
        return ops.model_forward(table, params, index[:3], fractions, mask[:3], dims)

    inputs = tuple(t.clone().requires_grad_() for t in (node_table, flat, frac[:3]))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


# B = 1 and 9 run serially, and 16 splits into two halves. B = 200 splits
# into two backward chunks and seven forward blocks, and B = 700 into
# several of each. H = 36 leaves scalar edges in the transposition and in
# the vector loops.
@pytest.mark.parametrize(
    ("batch", "slots", "hidden", "seed"),
    [
        (700, 6, 32, 9),
        (1, 5, 32, 51),
        (9, 5, 32, 59),
        (16, 5, 36, 66),
        (200, 5, 32, 250),
    ],
)
def test_threads_bitwise_equal(batch, slots, hidden, seed):
    dims = make_dims(hidden)
    args = make_batch(batch, slots, dims, torch.float32, seed=seed)
    before = dvmrl.get_num_threads()
    try:
        dvmrl.set_num_threads(1)
        one = forward_and_grads(ops.model_forward, *args[:5], dims, None)
        dvmrl.set_num_threads(2)
        two = forward_and_grads(ops.model_forward, *args[:5], dims, None)
    finally:
        dvmrl.set_num_threads(before)
    for name, a, b in zip(("out", "node_table", "flat", "frac"), one, two):
        assert torch.equal(a, b), name


# The parent runs a parallel job on 2 threads and forks. The child inherits
# the pool's state but not its worker threads. It must run parallel jobs,
# resize the pool and exit without waiting on workers that do not exist.
_FORK_SCRIPT = """
import os, sys, torch
import dvmrl
from dvmrl import ops
from test_ops_message_passing import forward_and_grads, make_batch, make_dims
dims = make_dims(16)
args = make_batch(300, 5, dims, torch.float32, seed=3)
dvmrl.set_num_threads(2)
parent = forward_and_grads(ops.model_forward, *args[:5], dims, None)
pid = os.fork()
if pid == 0:
    threads = dvmrl.get_num_threads()
    first = forward_and_grads(ops.model_forward, *args[:5], dims, None)
    dvmrl.set_num_threads(2)
    second = forward_and_grads(ops.model_forward, *args[:5], dims, None)
    same = all(torch.equal(a, b) and torch.equal(a, c)
               for a, b, c in zip(parent, first, second))
    sys.exit(0 if threads == 2 and same else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_forked_child_runs_and_exits():
    env = child_environment()
    env["PYTHONPATH"] = str(Path(__file__).parent) + os.pathsep + env["PYTHONPATH"]
    result = subprocess.run(
        [sys.executable, "-c", _FORK_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("batch", [1, 16, 300])
def test_grads_accumulate_over_two_backwards(batch):
    dims = make_dims(24, gate_hidden=20, msg_hidden=18)
    node_table, flat, index, frac, mask, _ = make_batch(batch, 5, dims, torch.float64, seed=60)
    leaves = [t.clone().requires_grad_() for t in (node_table, flat, frac)]
    first = torch.autograd.grad(
        ops.model_forward(leaves[0], leaves[1], index, leaves[2], mask, dims).sum(), leaves
    )
    copies = [g.clone() for g in first]
    # A second call with other inputs must not write into the first call's gradients.
    other = [(t * 1.5).requires_grad_() for t in (node_table, flat, frac)]
    torch.autograd.grad(
        ops.model_forward(other[0], other[1], index, other[2], mask, dims).sum(), other
    )
    for name, grad, saved in zip(("node_table", "flat", "frac"), first, copies):
        assert torch.equal(grad, saved), name
    for _ in range(2):
        ops.model_forward(leaves[0], leaves[1], index, leaves[2], mask, dims).sum().backward()
    for name, leaf, grad in zip(("node_table", "flat", "frac"), leaves, first):
        assert torch.equal(leaf.grad, 2 * grad), name


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_isa_variant_matches_reference(isa):
    best = _core.build_info()["cpu_isa"]
    order = ["baseline", "avx2", "avx512"]
    if order.index(isa) > order.index(best):
        pytest.skip(f"CPU supports up to {best}")
    dims = make_dims(24, gate_hidden=20, msg_hidden=18)
    args = make_batch(300, 5, dims, torch.float64, seed=10, dropout=True)
    try:
        _core.mp_set_cpu_isa(isa)
        fused = forward_and_grads(ops.model_forward, *args[:5], dims, args[5])
    finally:
        _core.mp_set_cpu_isa("auto")
    ref = forward_and_grads(reference.model_forward, *args[:5], dims, args[5])
    for name, a, b in zip(("out", "node_table", "flat", "frac"), fused, ref):
        assert rel_error(a, b) < 1e-12, name



# The float32 register-block transposes have their own shuffle code per
# ISA, and widths 36, 20 and 28 leave scalar edges in them.
@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_isa_variant_float32_matches_reference(isa):
    best = _core.build_info()["cpu_isa"]
    order = ["baseline", "avx2", "avx512"]
    if order.index(isa) > order.index(best):
        pytest.skip(f"CPU supports up to {best}")
    dims = make_dims(36, gate_hidden=20, msg_hidden=28)
    args = make_batch(300, 5, dims, torch.float32, seed=10)
    try:
        _core.mp_set_cpu_isa(isa)
        fused = forward_and_grads(ops.model_forward, *args[:5], dims, None)
    finally:
        _core.mp_set_cpu_isa("auto")
    ref64_inputs = [t.double() for t in args[:2]] + [args[2], args[3].double(), args[4]]
    ref = forward_and_grads(reference.model_forward, *ref64_inputs, dims, None)
    assert rel_error(fused[0], ref[0]) <= 1e-5
    for name, a, b in zip(("node_table", "flat", "frac"), fused[1:], ref[1:]):
        assert rel_error(a, b) <= 1e-4, name

def test_empty_batch_returns_zeros():
    dims = make_dims(8)
    node_table, flat, *_ = make_batch(1, 2, dims, torch.float64)
    table = node_table.clone().requires_grad_()
    out = ops.model_forward(
        table,
        flat,
        torch.zeros(0, 3, dtype=torch.int64),
        torch.zeros(0, 3, dtype=torch.float64),
        torch.zeros(0, 3, dtype=torch.bool),
        dims,
    )
    assert out.shape == (0, 1)
    out.sum().backward()
    assert torch.all(table.grad == 0)


def test_use_fused_false_is_reference():
    args = make_batch(5, 4, SMALL, torch.float64, seed=11)
    a = ops.model_forward(*args[:5], SMALL, use_fused=False)
    b = reference.model_forward(*args[:5], SMALL)
    assert torch.equal(a, b)


def test_fallback_warns_once_for_device_without_kernels(monkeypatch):
    monkeypatch.setattr(ops, "_warned_devices", set())
    args = [t.to("meta") for t in make_batch(3, 2, SMALL, torch.float64)[:5]]
    with pytest.warns(RuntimeWarning, match="no fused kernels for device 'meta'"):
        out = ops.model_forward(*args, SMALL)
    assert out.shape == (3, 2)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.model_forward(*args, SMALL)


def test_cuda_fallback_message_says_how_to_rebuild(monkeypatch):
    monkeypatch.setattr(ops, "_warned_devices", set())
    with pytest.warns(RuntimeWarning, match="DVMRL_CUDA=ON pip install ."):
        ops._warn_fallback(torch.device("cuda"))


def test_cuda_build_without_usable_driver_names_driver(monkeypatch):
    # A CUDA build whose runtime finds no GPU (a driver older than the nvcc
    # of the build): a rebuild without a newer driver would not help, so the
    # warning names the driver and the runtime's reason.
    import types

    reason = "CUDA driver version is insufficient for CUDA runtime version"
    info = {**ops._core.build_info(), "cuda_compiled": True}
    info["cuda_unavailable_reason"] = reason
    stand_in = types.SimpleNamespace(build_info=lambda: info)
    monkeypatch.setattr(ops, "_core", stand_in)
    monkeypatch.setattr(ops, "_core_has_cuda", lambda: False)
    monkeypatch.setattr(ops, "_warned_devices", set())
    with pytest.warns(RuntimeWarning, match="update the NVIDIA driver") as record:
        ops._warn_fallback(torch.device("cuda"))
    assert reason in str(record[0].message)


def test_gpu_without_kernel_image_falls_back(monkeypatch):
    # A CUDA build for other GPU architectures: the core reports the missing
    # kernel image, and the fallback warning names the rebuild option.
    reason = "no kernel image is available for execution on the device"
    monkeypatch.setattr(ops, "_warned_devices", set())
    monkeypatch.setattr(ops, "_core_has_cuda", lambda: True)
    monkeypatch.setattr(ops, "_cuda_kernels_missing", lambda index: reason)
    device = torch.device("cuda", 0)
    assert not ops.fused_backend_available(device)
    with pytest.warns(RuntimeWarning, match="CMAKE_CUDA_ARCHITECTURES") as record:
        ops._warn_fallback(device)
    assert reason in str(record[0].message)


# -- input validation ------------------------------------------------------


def valid_args():
    return list(make_batch(3, 4, SMALL, torch.float64, seed=12)[:5])


def test_rejects_wrong_frac_dtype():
    args = valid_args()
    args[3] = args[3].float()
    with pytest.raises(TypeError, match="frac: expected torch.float64 like node_table"):
        ops.model_forward(*args, SMALL)


def test_rejects_integer_node_table():
    args = valid_args()
    args[0] = args[0].long()
    with pytest.raises(TypeError, match="node_table: expected float32 or float64"):
        ops.model_forward(*args, SMALL)


def test_rejects_wrong_index_dtype():
    args = valid_args()
    args[2] = args[2].int()
    with pytest.raises(TypeError, match="element_index: expected torch.int64"):
        ops.model_forward(*args, SMALL)


def test_rejects_wrong_frac_shape():
    args = valid_args()
    args[3] = torch.zeros(3, 5, dtype=torch.float64)
    with pytest.raises(
        ValueError, match=r"frac: expected shape \[3, 4\], got \[3, 5\]"
    ):
        ops.model_forward(*args, SMALL)


def test_rejects_wrong_flat_length():
    args = valid_args()
    args[1] = args[1][:-1]
    count = parameter_count(SMALL)
    with pytest.raises(
        ValueError, match=rf"flat: expected shape \[{count}\], got \[{count - 1}\]"
    ):
        ops.model_forward(*args, SMALL)


def test_rejects_too_many_slots():
    dims = SMALL
    args = list(make_batch(2, 9, dims, torch.float64)[:5])
    with pytest.raises(
        ValueError, match=r"element_index: expected shape \[B, K\] with 1 <= K <= 8"
    ):
        ops.model_forward(*args, dims)


def test_rejects_wrong_dropout_shape():
    args = valid_args()
    drop = torch.ones(SMALL.head_layers, 2, SMALL.head_hidden, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"dropout_mask: expected shape \[2, 3, 3\]"):
        ops.model_forward(*args, SMALL, drop)


def test_rejects_dropout_mask_requiring_grad():
    args = make_batch(3, 4, SMALL, torch.float64, seed=12, dropout=True)
    drop = args[5].clone().requires_grad_()
    with pytest.raises(ValueError, match="dropout_mask: the fused kernels give no gradient"):
        ops.model_forward(*args[:5], SMALL, drop)
    reference_out = ops.model_forward(*args[:5], SMALL, drop, use_fused=False)
    assert reference_out.requires_grad


def test_rejects_non_contiguous():
    args = valid_args()
    args[0] = torch.randn(SMALL.hidden, ROWS, dtype=torch.float64).T
    with pytest.raises(ValueError, match="node_table: expected a contiguous tensor"):
        ops.model_forward(*args, SMALL)


def test_rejects_mixed_devices():
    args = valid_args()
    args[3] = args[3].to("meta")
    with pytest.raises(
        ValueError, match="frac: expected device cpu like node_table, got meta"
    ):
        ops.model_forward(*args, SMALL)


@pytest.mark.parametrize("use_fused", [True, False])
@pytest.mark.parametrize("value", [ROWS + 5, ROWS, -1])
def test_rejects_index_outside_table(value, use_fused):
    # On the reference path -1 would otherwise read the table's last row.
    args = valid_args()
    args[2] = args[2].clone()
    args[2][1, 0] = value
    with pytest.raises(
        ValueError,
        match=rf"element_index\[1, 0\] = {value} is outside the node table with "
        rf"{ROWS} rows",
    ):
        ops.model_forward(*args, SMALL, use_fused=use_fused)


def test_core_rechecks_sizes():
    node_table, flat, index, frac, mask = valid_args()
    dims = [3, 4, ROWS, 4, 3, 5, 2, 3, 2, 2]
    out = torch.zeros(3, 2, dtype=torch.float64)
    ws = torch.zeros(_core.mp_workspace_size(dims), dtype=torch.float64)
    with pytest.raises(
        ValueError,
        match=rf"model_forward: flat has 7 elements, expected {flat.numel()}",
    ):
        _core.mp_forward(
            1,
            -1,
            0,
            dims,
            node_table.data_ptr(),
            node_table.numel(),
            flat.data_ptr(),
            7,
            index.data_ptr(),
            frac.data_ptr(),
            mask.data_ptr(),
            0,
            out.data_ptr(),
            ws.data_ptr(),
            ws.numel(),
        )
    with pytest.raises(
        ValueError, match=r"mp_workspace_size: K \(slots\) must be in \[1, 8\], got 9"
    ):
        _core.mp_workspace_size([3, 9, ROWS, 4, 3, 5, 2, 3, 2, 2])


# -- training with the model ------------------------------------------------


def small_model(dtype, use_fused):
    from dvmrl.model import CompositionMPNN, ModelConfig

    config = ModelConfig(
        hidden=16,
        layers=2,
        gate_hidden=12,
        msg_hidden=10,
        head_hidden=16,
        head_layers=2,
    )
    model = CompositionMPNN(config, seed=0).to(dtype)
    model.use_fused = use_fused
    return model


def training_batches(dtype, n_batches, batch, seed):
    dims = make_dims(16)
    batches = []
    for b in range(n_batches):
        _, _, index, frac, mask, _ = make_batch(batch, 5, dims, dtype, seed=seed + b)
        target = torch.sin(index.double().sum(dim=1) / 40.0).to(dtype) + frac[:, 0]
        batches.append((index, frac, mask, target))
    return batches


def adamw_step_differences(device: str) -> dict[str, float]:
    """Return, per parameter, the largest difference after one AdamW step of
    the fused and the reference model (float64, same seed and batch)."""
    fused = small_model(torch.float64, use_fused=True).to(device)
    ref = copy.deepcopy(fused)
    ref.use_fused = False
    ((index, frac, mask, target),) = training_batches(torch.float64, 1, 48, seed=20)
    batch = [t.to(device) for t in (index, frac, mask, target)]
    for model in (fused, ref):
        optimiser = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-3)
        loss = torch.nn.functional.mse_loss(model(*batch[:3]), batch[3])
        loss.backward()
        optimiser.step()
    return {
        name: (a - b).abs().max().item()
        for (name, a), (_, b) in zip(fused.named_parameters(), ref.named_parameters())
    }


def test_adamw_step_matches_reference_float64():
    for name, difference in adamw_step_differences("cpu").items():
        assert difference <= 1e-10, name


def test_loss_curves_match_reference_float32():
    batches = training_batches(torch.float32, 6, 64, seed=30)
    curves = []
    for use_fused in (True, False):
        model = small_model(torch.float32, use_fused)
        optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(4):
            total = 0.0
            for index, frac, mask, target in batches:
                optimiser.zero_grad()
                loss = torch.nn.functional.mse_loss(model(index, frac, mask), target)
                loss.backward()
                optimiser.step()
                total += loss.item()
            losses.append(total / len(batches))
        curves.append(losses)
    fused, ref = curves
    assert ref[-1] < ref[0]
    for epoch, (a, b) in enumerate(zip(fused, ref)):
        assert abs(a - b) <= 1e-3 * abs(b), epoch


# A loss linear in the output gives a grad_out that does not require grad.
# The gradient penalty must still fail instead of treating the gradient as
# a constant.
@pytest.mark.parametrize("loss", ["linear", "square"])
def test_double_backward_raises(loss):
    args = make_batch(3, 3, SMALL, torch.float64, seed=13)
    frac = args[3].clone().requires_grad_()
    flat = args[1].clone().requires_grad_()
    out = ops.model_forward(args[0], flat, args[2], frac, args[4], SMALL)
    total = out.sum() if loss == "linear" else out.pow(2).sum()
    grad_frac, grad_flat = torch.autograd.grad(total, (frac, flat), create_graph=True)
    plain = torch.autograd.grad(
        ops.model_forward(args[0], flat, args[2], frac, args[4], SMALL).sum(), (frac, flat)
    )
    if loss == "linear":
        assert torch.equal(grad_frac, plain[0])
        assert torch.equal(grad_flat, plain[1])
    assert grad_frac.requires_grad
    assert grad_flat.requires_grad
    with pytest.raises(RuntimeError, match="no double backward"):
        (total + grad_frac.pow(2).sum()).backward()


def test_torch_func_transforms_point_to_reference():
    args = make_batch(3, 3, SMALL, torch.float64, seed=14)

    def total(frac, fused):
        forward = ops.model_forward if fused else reference.model_forward
        return forward(args[0], args[1], args[2], frac, args[4], SMALL).sum()

    with pytest.raises(RuntimeError, match="use_fused=False"):
        torch.func.grad(lambda frac: total(frac, True))(args[3])
    # The reference path runs under the transform and gives the fused gradient.
    from_func = torch.func.grad(lambda frac: total(frac, False))(args[3])
    frac = args[3].clone().requires_grad_()
    (from_fused,) = torch.autograd.grad(total(frac, True), frac)
    torch.testing.assert_close(from_func, from_fused, rtol=1e-10, atol=1e-12)


# -- gradient for frac alone ---------------------------------------------------


@pytest.mark.parametrize(
    ("batch", "dtype"), [(1, torch.float64), (40, torch.float64), (700, torch.float32)]
)
def test_frac_gradient_alone_equals_full_backward(batch, dtype):
    dims = make_dims(24, gate_hidden=20, msg_hidden=18)
    node_table, flat, index, frac, mask, drop = make_batch(
        batch, 5, dims, dtype, seed=40 + batch, dropout=True
    )
    full = forward_and_grads(ops.model_forward, node_table, flat, index, frac, mask, dims, drop)
    frac_leaf = frac.clone().requires_grad_()
    out = ops.model_forward(node_table, flat, index, frac_leaf, mask, dims, drop)
    weight = torch.randn(
        out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    ).to(dtype)
    (alone,) = torch.autograd.grad((out * weight).sum(), frac_leaf)
    assert torch.equal(alone, full[3])


def test_core_frac_gradient_needs_no_parameter_buffers():
    node_table, flat, index, frac, mask = valid_args()
    dims = [3, 4, ROWS, 4, 3, 5, 2, 3, 2, 2]
    out = torch.empty(3, 2, dtype=torch.float64)
    ws = torch.empty(_core.mp_workspace_size(dims), dtype=torch.float64)
    head = (1, -1, 0, dims, node_table.data_ptr(), node_table.numel(), flat.data_ptr())
    inputs = (flat.numel(), index.data_ptr(), frac.data_ptr(), mask.data_ptr(), 0)
    _core.mp_forward(*head, *inputs, out.data_ptr(), ws.data_ptr(), ws.numel())
    grad_out = torch.ones(3, 2, dtype=torch.float64)
    grads = [torch.empty_like(t) for t in (node_table, flat, frac)]
    ptrs = [g.data_ptr() for g in grads]
    tail = (ws.data_ptr(), ws.numel(), grad_out.data_ptr())
    _core.mp_backward(*head, *inputs, *tail, *ptrs, True, True)
    alone = torch.empty_like(frac)
    _core.mp_backward(*head, *inputs, *tail, 0, 0, alone.data_ptr(), False, False)
    assert torch.equal(alone, grads[2])


# -- gradients of node_table and frac without flat -------------------------


def table_and_frac_grads(node_table, flat, element_index, frac, mask, dims, drop, seed=1):
    """Return (d node_table, d frac) with flat not requiring a gradient.

    The output weighting is the one forward_and_grads draws for the same seed.
    """
    table = node_table.detach().clone().requires_grad_()
    fractions = frac.detach().clone().requires_grad_()
    out = ops.model_forward(table, flat, element_index, fractions, mask, dims, drop)
    weight = torch.randn(
        out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    ).to(out.device, out.dtype)
    return torch.autograd.grad((out * weight).sum(), (table, fractions))


def table_frac_case(batch, slots, dtype, seed, sizes=None, rows=None, identity=False):
    """Inputs for the node_table and frac mode, with a chosen node table.

    rows: keep only that many table rows (indices modulo rows), so rows
    repeat within and across backward chunks. identity: one table row per
    slot [B * K, H] read through identity indices, as the model builds it
    with a fraction encoder.
    """
    dims = make_dims(24, gate_hidden=20, msg_hidden=18)
    node_table, flat, index, frac, mask, drop = make_batch(
        batch, slots, dims, dtype, seed=seed, sizes=sizes, dropout=True
    )
    if rows is not None:
        index = (index % rows) * mask
        node_table = node_table[:rows].contiguous()
    if identity:
        generator = torch.Generator().manual_seed(seed + 1)
        node_table = torch.randn(batch * slots, dims.hidden, generator=generator).to(dtype)
        index = torch.arange(batch * slots).reshape(batch, slots)
    return (node_table, flat, index, frac, mask, dims, drop)


# B = 1 runs serially, B = 40 splits into two halves, B = 300 into three
# backward chunks and B = 1000 into eight. Every case mixes composition
# sizes with padded slots.
TABLE_FRAC_CASES = {
    "single": dict(batch=1, slots=4, dtype=torch.float64, seed=70, sizes=[3]),
    "mixed_k": dict(batch=40, slots=6, dtype=torch.float64, seed=71),
    "repeated_rows": dict(batch=300, slots=5, dtype=torch.float64, seed=72, rows=3),
    "repeated_rows_f32": dict(batch=1000, slots=8, dtype=torch.float32, seed=73, rows=7),
    "batch_1000": dict(batch=1000, slots=5, dtype=torch.float32, seed=74),
    "identity_table": dict(batch=200, slots=5, dtype=torch.float32, seed=75, identity=True),
}


@pytest.mark.parametrize("case", list(TABLE_FRAC_CASES))
def test_table_frac_mode_equals_full_backward(case):
    node_table, flat, index, frac, mask, dims, drop = table_frac_case(**TABLE_FRAC_CASES[case])
    full = forward_and_grads(ops.model_forward, node_table, flat, index, frac, mask, dims, drop)
    grad_table, grad_frac = table_and_frac_grads(
        node_table, flat, index, frac, mask, dims, drop
    )
    assert torch.equal(grad_table, full[1])
    assert torch.equal(grad_frac, full[3])


def test_table_frac_mode_zeroes_unread_rows():
    node_table, flat, index, frac, mask, dims, drop = table_frac_case(
        batch=30, slots=5, dtype=torch.float64, seed=76, identity=True
    )
    grad_table, _ = table_and_frac_grads(node_table, flat, index, frac, mask, dims, drop)
    padded_rows = index[~mask]
    assert padded_rows.numel() > 0
    assert torch.all(grad_table[padded_rows] == 0)
    assert torch.all(grad_table[index[mask]].abs().sum(dim=1) > 0)


@pytest.mark.parametrize("dropout", [False, True])
def test_gradcheck_table_frac_mode_float64(dropout):
    node_table, flat, index, frac, mask, drop = make_batch(
        5, 4, SMALL, torch.float64, seed=77, sizes=[4, 1, 3, 2, 4], dropout=dropout
    )
    index = (index % 6) * mask  # rows repeat across compositions
    node_table = node_table[:6].contiguous()

    def fn(table, fractions):
        return ops.model_forward(table, flat, index, fractions, mask, SMALL, drop)

    inputs = tuple(t.clone().requires_grad_() for t in (node_table, frac))
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("case", ["mixed_k", "repeated_rows_f32", "batch_1000"])
def test_table_frac_mode_threads_bitwise_equal(case):
    args = table_frac_case(**TABLE_FRAC_CASES[case])
    before = dvmrl.get_num_threads()
    try:
        dvmrl.set_num_threads(1)
        one = table_and_frac_grads(*args)
        dvmrl.set_num_threads(2)
        two = table_and_frac_grads(*args)
    finally:
        dvmrl.set_num_threads(before)
    for name, a, b in zip(("node_table", "frac"), one, two):
        assert torch.equal(a, b), name


def core_backward_inputs():
    """Run the core forward on valid_args and return the backward's arguments."""
    node_table, flat, index, frac, mask = valid_args()
    dims = [3, 4, ROWS, 4, 3, 5, 2, 3, 2, 2]
    out = torch.empty(3, 2, dtype=torch.float64)
    ws = torch.empty(_core.mp_workspace_size(dims), dtype=torch.float64)
    head = (1, -1, 0, dims, node_table.data_ptr(), node_table.numel(), flat.data_ptr())
    inputs = (flat.numel(), index.data_ptr(), frac.data_ptr(), mask.data_ptr(), 0)
    _core.mp_forward(*head, *inputs, out.data_ptr(), ws.data_ptr(), ws.numel())
    grad_out = torch.ones(3, 2, dtype=torch.float64)
    tail = (ws.data_ptr(), ws.numel(), grad_out.data_ptr())
    # The tensors must outlive the calls that read their addresses.
    keep = (node_table, flat, index, frac, mask, out, ws, grad_out)
    return (*head, *inputs, *tail), keep


def test_core_table_frac_mode_leaves_flat_untouched():
    args, keep = core_backward_inputs()
    node_table, flat, _, frac = keep[:4]
    grads = [torch.empty_like(t) for t in (node_table, flat, frac)]
    _core.mp_backward(*args, *[g.data_ptr() for g in grads], True, True)
    table = torch.full_like(node_table, float("nan"))
    fractions = torch.full_like(frac, float("nan"))
    sentinel = torch.full_like(flat, 7.0)
    _core.mp_backward(
        *args, table.data_ptr(), sentinel.data_ptr(), fractions.data_ptr(), True, False
    )
    assert torch.equal(table, grads[0])
    assert torch.equal(fractions, grads[2])
    assert torch.all(sentinel == 7.0)
    # grad_flat may be absent in this mode.
    _core.mp_backward(*args, table.data_ptr(), 0, fractions.data_ptr(), True, False)
    assert torch.equal(table, grads[0])


def test_core_rejects_flat_grad_without_table_grad():
    args, keep = core_backward_inputs()
    grads = [torch.empty_like(t) for t in (keep[0], keep[1], keep[3])]
    with pytest.raises(ValueError, match="flat_grad=True requires table_grad=True"):
        _core.mp_backward(*args, *[g.data_ptr() for g in grads], False, True)


def test_core_table_frac_mode_needs_grad_table():
    args, keep = core_backward_inputs()
    fractions = torch.empty_like(keep[3])
    with pytest.raises(ValueError, match="grad_node_table"):
        _core.mp_backward(*args, 0, 0, fractions.data_ptr(), True, False)


def test_model_frac_gradient_frozen_parameters():
    from dvmrl.model import CompositionMPNN, ModelConfig

    config = ModelConfig()
    assert config.fraction_hidden > 0
    model = CompositionMPNN(config, seed=0).to(torch.float64)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    dims = make_dims(config.hidden)
    _, _, index, frac, mask, _ = make_batch(300, 6, dims, torch.float64, seed=78)
    weight = torch.randn(300, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = []
    for use_fused in (True, False):
        model.use_fused = use_fused
        leaf = frac.clone().requires_grad_()
        (grad,) = torch.autograd.grad((model(index, leaf, mask) * weight).sum(), leaf)
        grads.append(grad)
    fused, ref = grads
    assert torch.all(fused[~mask] == ref[~mask])
    assert rel_error(fused, ref) < 1e-10


def test_checks_run_again_after_a_valid_call():
    args = valid_args()
    ops.model_forward(*args, SMALL)
    args[3] = args[3].float()
    with pytest.raises(TypeError, match="frac: expected torch.float64 like node_table"):
        ops.model_forward(*args, SMALL)


def test_contiguity_checked_after_a_valid_call():
    args = valid_args()
    ops.model_forward(*args, SMALL)
    args[2] = torch.zeros(4, 3, dtype=torch.int64).T
    with pytest.raises(ValueError, match="element_index: expected a contiguous tensor"):
        ops.model_forward(*args, SMALL)


@pytest.mark.cuda
@requires_cuda
def test_cuda_frac_gradient_alone_equals_full():
    dims = make_dims(24, gate_hidden=20, msg_hidden=18)
    args = make_batch(45, 5, dims, torch.float64, seed=44, dropout=True)
    node_table, flat, index, frac, mask, drop = [t.cuda() for t in args]
    full = forward_and_grads(ops.model_forward, node_table, flat, index, frac, mask, dims, drop)
    frac_leaf = frac.clone().requires_grad_()
    out = ops.model_forward(node_table, flat, index, frac_leaf, mask, dims, drop)
    weight = torch.randn(
        out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    ).to(out.device)
    (alone,) = torch.autograd.grad((out * weight).sum(), frac_leaf)
    assert rel_error(alone.cpu(), full[3].cpu()) < 1e-12


def test_cuda_backward_honours_deterministic_algorithms():
    # The check runs before any kernel, so a CUDA plan stand-in suffices.
    # The CPU kernels are deterministic and pass.
    import types
    import warnings

    cuda_plan = types.SimpleNamespace(device_index=0)
    cpu_plan = types.SimpleNamespace(device_index=-1)
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        with pytest.raises(RuntimeError, match="not deterministic"):
            ops._check_deterministic(cuda_plan)
        ops._check_deterministic(cpu_plan)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="atomicAdd"):
            ops._check_deterministic(cuda_plan)
        torch.use_deterministic_algorithms(False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ops._check_deterministic(cuda_plan)
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
