"""Fused composition-MPNN forward and backward, with input validation.

``model_forward`` has the signature of :func:`dvmrl.reference.model_forward`
and runs the whole model after the embedding (gather from ``node_table``,
every message-passing layer, the attention pooling and the head) in one
call of the compiled core, and its backward in one more call.

Shapes: B compositions, K element slots, E element-table rows, H hidden
width, D head depth, Hh head width.
"""

from __future__ import annotations

import functools
import logging
import warnings

import torch
from torch._C import _functions as autograd_functions
from torch._C._functorch import unwrap_if_dead

from dvmrl import _core, reference
from dvmrl.layout import ModelDims, parameter_count

__all__ = ["fused_backend_available", "model_forward", "parameter_count", "validate_inputs"]

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = (torch.float32, torch.float64)
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1}
MAX_SLOTS = 8

_warned_devices: set[str] = set()
# parameter_layout builds Python lists; cache the count per ModelDims.
_parameter_count = functools.lru_cache(maxsize=64)(parameter_count)
_cuda_backend: bool | None = None


def _core_has_cuda() -> bool:
    """Return whether the core was compiled with CUDA and a CUDA device is usable."""
    global _cuda_backend
    if _cuda_backend is None:
        info = _core.build_info()
        _cuda_backend = bool(info["cuda_compiled"]) and int(info["cuda_device_count"]) > 0
    return _cuda_backend


@functools.lru_cache(maxsize=16)
def _cuda_kernels_missing(index: int) -> str | None:
    """Return why the core's kernels cannot run on CUDA device ``index``, or None."""
    available, reason = _core.mp_cuda_kernels_available(index)
    return None if available else reason


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def fused_backend_available(device: torch.device) -> bool:
    """Return whether the compiled core has kernels for ``device``.

    For a CUDA device this also needs kernels compiled for the GPU's
    architecture (``dvmrl info`` lists the architectures of the build).
    """
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return _core_has_cuda() and _cuda_kernels_missing(_cuda_index(device)) is None
    return False


def _warn_fallback(device: torch.device) -> None:
    if device.type in _warned_devices:
        return
    _warned_devices.add(device.type)
    if device.type == "cuda" and _core_has_cuda():
        reason = _cuda_kernels_missing(_cuda_index(device))
        fix = (
            f"{reason}; rebuild for this GPU with DVMRL_CUDA=ON pip install . "
            "-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=<its compute capability, e.g. 75>"
        )
    elif device.type == "cuda" and _core.build_info()["cuda_compiled"]:
        # The kernels are there, but the core's CUDA runtime finds no device,
        # usually because the driver is older than the nvcc that built them.
        reason = _core.build_info()["cuda_unavailable_reason"]
        fix = (
            f"the core was built with CUDA, but its CUDA runtime sees no GPU: "
            f"{reason}; update the NVIDIA driver to one that supports the CUDA "
            "version of the build (dvmrl info), or rebuild with the nvcc that "
            "matches the driver: DVMRL_CUDA=ON pip install ."
        )
    elif device.type == "cuda":
        fix = "rebuild with CUDA: DVMRL_CUDA=ON pip install ."
    else:
        fix = "only CPU and CUDA kernels exist"
    message = (
        f"dvmrl._core has no fused kernels for device {device.type!r}; running the "
        f"plain PyTorch reference instead ({fix})"
    )
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    logger.warning(message)


def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(
            f"{name}: expected shape {list(expected)}, got {list(tensor.shape)}"
        )


def validate_inputs(
    node_table: torch.Tensor,
    flat: torch.Tensor,
    element_index: torch.Tensor,
    frac: torch.Tensor,
    mask: torch.Tensor,
    dims: ModelDims,
    dropout_mask: torch.Tensor | None = None,
) -> None:
    """Check dtypes, devices, contiguity and shapes of the model inputs.

    Raises:
        TypeError: for a wrong dtype (float tensors must share one dtype,
            float32 or float64; ``element_index`` int64; ``mask`` bool).
        ValueError: for a wrong shape, device or layout; the message names
            the tensor, the expected and the actual value.
    """
    dtype = node_table.dtype
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"node_table: expected float32 or float64, got {dtype}")
    for name, tensor in (("flat", flat), ("frac", frac)):
        if tensor.dtype != dtype:
            raise TypeError(f"{name}: expected {dtype} like node_table, got {tensor.dtype}")
    if dropout_mask is not None and dropout_mask.dtype != dtype:
        raise TypeError(
            f"dropout_mask: expected {dtype} like node_table, got {dropout_mask.dtype}"
        )
    if element_index.dtype != torch.int64:
        raise TypeError(f"element_index: expected torch.int64, got {element_index.dtype}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask: expected torch.bool, got {mask.dtype}")

    if node_table.dim() != 2:
        raise ValueError(
            f"node_table: expected shape [E, {dims.hidden}], got {list(node_table.shape)}"
        )
    _check_shape("node_table", node_table, (node_table.shape[0], dims.hidden))
    _check_shape("flat", flat, (_parameter_count(dims),))
    if element_index.dim() != 2 or not 1 <= element_index.shape[1] <= MAX_SLOTS:
        raise ValueError(
            f"element_index: expected shape [B, K] with 1 <= K <= {MAX_SLOTS}, "
            f"got {list(element_index.shape)}; a composition has at most "
            f"{MAX_SLOTS} elements, and a batch padded wider drops its empty slots "
            "with CompositionBatch.trimmed()"
        )
    batch, slots = element_index.shape
    _check_shape("frac", frac, (batch, slots))
    _check_shape("mask", mask, (batch, slots))
    if dropout_mask is not None:
        _check_shape(
            "dropout_mask", dropout_mask, (dims.head_layers, batch, dims.head_hidden)
        )

    tensors = {
        "node_table": node_table,
        "flat": flat,
        "element_index": element_index,
        "frac": frac,
        "mask": mask,
    }
    if dropout_mask is not None:
        tensors["dropout_mask"] = dropout_mask
    device = node_table.device
    for name, tensor in tensors.items():
        if tensor.device != device:
            raise ValueError(
                f"{name}: expected device {device} like node_table, got {tensor.device}"
            )
        if not tensor.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor; call .contiguous()")


def model_forward(
    node_table: torch.Tensor,
    flat: torch.Tensor,
    element_index: torch.Tensor,
    frac: torch.Tensor,
    mask: torch.Tensor,
    dims: ModelDims,
    dropout_mask: torch.Tensor | None = None,
    use_fused: bool = True,
) -> torch.Tensor:
    """Run the composition MPNN after the embedding.

    Args:
        node_table (Tensor): initial node state of every element [E, H].
        flat (Tensor): flat parameter buffer, laid out as
            :func:`dvmrl.layout.parameter_layout` describes.
        element_index (Tensor): int64 [B, K] rows of ``node_table``.
        frac (Tensor): atomic fractions [B, K] (padded slots 0).
        mask (Tensor): bool [B, K], true for real elements.
        dims (ModelDims): sizes of the model.
        dropout_mask (Tensor, optional): [D, B, Hh] multipliers for the
            head's hidden layers; ``None`` means no dropout.
        use_fused (bool): run the compiled kernels (default) or the plain
            PyTorch reference.

    Returns:
        Tensor: [B, n_out], differentiable in ``node_table``, ``flat`` and
        ``frac``.
    """
    plan = _checked_plan(node_table, flat, element_index, frac, mask, dims, dropout_mask)
    if use_fused and plan is None:
        _warn_fallback(node_table.device)
        use_fused = False
    if not use_fused:
        # The reference path gathers with plain indexing, where -1 would
        # silently read the table's last row. On a GPU the check would wait
        # for the device at every forward, so there, as in the model's own
        # value checks, only the CPU is checked.
        if element_index.device.type == "cpu":
            _check_index_range(element_index, mask, node_table.shape[0])
        return reference.model_forward(
            node_table, flat, element_index, frac, mask, dims, dropout_mask
        )
    if dropout_mask is not None and dropout_mask.requires_grad:
        raise ValueError(
            "dropout_mask: the fused kernels give no gradient for it, but it "
            "requires grad; pass dropout_mask.detach(), or use_fused=False for its "
            "gradient"
        )
    return _apply_fused(node_table, flat, element_index, frac, mask, plan, dropout_mask)


class _Plan:
    """Call settings of the fused kernels for one input shape, computed once.

    Attributes:
        dims (ModelDims): sizes of the model.
        dims_list (list[int]): the core's dims, [B, K, E, H, Hg, Hm, L, Hh, D, n_out].
        dtype_code (int): 0 for float32, 1 for float64.
        workspace_size (int): elements of the saved-activation workspace.
        scratch_size (int): elements of the temporaries of one CUDA call, 0
            on the CPU.
        device_index (int): CUDA device index, -1 for the CPU.
        out_shape (tuple[int, int]): [B, n_out].
    """

    __slots__ = (
        "dims",
        "dims_list",
        "dtype_code",
        "workspace_size",
        "scratch_size",
        "device_index",
        "out_shape",
    )

    def __init__(self, dims: ModelDims, batch: int, slots: int, rows: int, dtype, device):
        self.dims = dims
        self.dims_list, self.workspace_size = _call_sizes(dims, batch, slots, rows)
        self.dtype_code = _DTYPE_CODES[dtype]
        if device.type == "cpu":
            self.device_index = -1
            self.scratch_size = 0
        else:
            self.device_index = _cuda_index(device)
            self.scratch_size = int(_core.mp_cuda_scratch_size(self.dims_list))
        self.out_shape = (batch, dims.n_out)

    def stream(self, device: torch.device) -> int:
        """Return the address of the current CUDA stream, 0 on the CPU."""
        if self.device_index < 0:
            return 0
        return torch.cuda.current_stream(device).cuda_stream

    def scratch(self, dtype, device: torch.device) -> tuple:
        """Return the trailing (scratch, scratch_numel) arguments of a core call.

        The tensor is returned too, to be kept alive until the call has been
        queued. PyTorch's caching allocator orders its reuse on the current
        stream, the stream the kernels run on.
        """
        if self.scratch_size == 0:
            return None, ()
        buffer = torch.empty(self.scratch_size, dtype=dtype, device=device)
        return buffer, (buffer.data_ptr(), self.scratch_size)


def _check_index_range(element_index: torch.Tensor, mask: torch.Tensor, rows: int) -> None:
    """Raise ValueError for a real slot whose element_index lies outside the table.

    The CPU core checks this itself. The CUDA kernels do not, and an index
    outside the table would make them read outside it and add gradients
    outside grad_node_table, so CUDA calls of the kernels pay this check (one
    device synchronisation). The reference path runs it on CPU tensors,
    where row -1 would otherwise read the table's last row.
    """
    outside = mask & ((element_index < 0) | (element_index >= rows))
    if not bool(outside.any()):
        return
    b, k = (int(v) for v in outside.nonzero()[0])
    raise ValueError(
        f"model_forward: element_index[{b}, {k}] = {int(element_index[b, k])} is outside "
        f"the node table with {rows} rows"
    )


# Plans by (dims, dtype, device, node_table, flat, element_index and
# dropout shapes); a hit means validate_inputs accepted these sizes before.
_plans: dict[tuple, _Plan] = {}
_MAX_PLANS = 1024


def _checked_plan(node_table, flat, element_index, frac, mask, dims, dropout_mask):
    """Validate the inputs and return the call plan, or None without kernels.

    A shape seen before is checked with a few comparisons (dtypes, shapes,
    devices, contiguity). The full validate_inputs runs on the first call of
    each shape and whenever a quick check fails, so the error messages stay
    the same.
    """
    dtype = node_table.dtype
    device = node_table.device
    index_shape = element_index.shape
    drop_shape = None if dropout_mask is None else dropout_mask.shape
    key = (dims, dtype, device, node_table.shape, flat.shape, index_shape, drop_shape)
    plan = _plans.get(key)
    if (
        plan is not None
        and flat.dtype == dtype
        and frac.dtype == dtype
        and element_index.dtype == torch.int64
        and mask.dtype == torch.bool
        and frac.shape == index_shape
        and mask.shape == index_shape
        and flat.device == device
        and element_index.device == device
        and frac.device == device
        and mask.device == device
        and node_table.is_contiguous()
        and flat.is_contiguous()
        and element_index.is_contiguous()
        and frac.is_contiguous()
        and mask.is_contiguous()
        and (
            dropout_mask is None
            or (
                dropout_mask.dtype == dtype
                and dropout_mask.device == device
                and dropout_mask.is_contiguous()
            )
        )
    ):
        return plan
    validate_inputs(node_table, flat, element_index, frac, mask, dims, dropout_mask)
    if not fused_backend_available(device):
        return None
    if plan is None:
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        plan = _Plan(dims, index_shape[0], index_shape[1], node_table.shape[0], dtype, device)
        _plans[key] = plan
    return plan


@functools.lru_cache(maxsize=256)
def _call_sizes(dims: ModelDims, batch: int, slots: int, rows: int) -> tuple[list, int]:
    """Return the core's dims list and the workspace length for one call shape."""
    dims_list = _dims_list(dims, batch, slots, rows)
    return dims_list, int(_core.mp_workspace_size(dims_list))


def _dims_list(dims: ModelDims, batch: int, slots: int, rows: int) -> list[int]:
    return [
        batch,
        slots,
        rows,
        dims.hidden,
        dims.gate_hidden,
        dims.msg_hidden,
        dims.layers,
        dims.head_hidden,
        dims.head_layers,
        dims.n_out,
    ]


class _FusedModel(torch.autograd.Function):
    """Whole model after the embedding in one forward and one backward call.

    The forward saves the activations the backward needs in one workspace
    tensor (node states and first-layer projections of every layer, the
    pooling pre-activations and the head pre-activations), so the backward
    recomputes only the per-edge activations. Which inputs need a gradient
    picks one of three backward modes:

    - flat: the gradients of node_table, flat and frac.
    - node_table but not flat (node states that depend on frac through
      earlier PyTorch ops, as with the fraction encoder): those of
      node_table and frac, without the weight-gradient sums.
    - neither: the frac gradient alone.

    The backward itself is not differentiable (no double backward).
    """

    @staticmethod
    def forward(ctx, node_table, flat, element_index, frac, mask, plan, dropout_mask):
        device = node_table.device
        dtype = node_table.dtype
        if plan.device_index >= 0:
            _check_index_range(element_index, mask, node_table.shape[0])
        out = torch.empty(plan.out_shape, dtype=dtype, device=device)
        workspace = torch.empty(plan.workspace_size, dtype=dtype, device=device)
        dropout_ptr = 0 if dropout_mask is None else dropout_mask.data_ptr()
        _scratch, scratch_args = plan.scratch(dtype, device)
        _core.mp_forward(
            plan.dtype_code,
            plan.device_index,
            plan.stream(device),
            plan.dims_list,
            node_table.data_ptr(),
            node_table.numel(),
            flat.data_ptr(),
            flat.numel(),
            element_index.data_ptr(),
            frac.data_ptr(),
            mask.data_ptr(),
            dropout_ptr,
            out.data_ptr(),
            workspace.data_ptr(),
            plan.workspace_size,
            *scratch_args,
        )
        ctx.plan = plan
        ctx.dropout_ptr = dropout_ptr
        if dropout_mask is None:
            ctx.save_for_backward(node_table, flat, element_index, frac, mask, workspace)
        else:
            ctx.save_for_backward(
                node_table, flat, element_index, frac, mask, workspace, dropout_mask
            )
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # The engine runs backward with grad mode off unless create_graph is
        # set. Only then are gradients needed whose own backward raises.
        if torch.is_grad_enabled():
            return _fused_backward_create_graph(ctx, grad_out)
        return _fused_backward(ctx, grad_out)


def _check_deterministic(plan: _Plan) -> None:
    """Honour torch.use_deterministic_algorithms for the CUDA backward.

    The CUDA backward sums gradients with atomicAdd, so its last bits vary
    from run to run. As PyTorch does for its own such ops, it raises when
    deterministic algorithms are requested, or warns with warn_only=True.
    """
    if plan.device_index < 0 or not torch.are_deterministic_algorithms_enabled():
        return
    message = (
        "dvmrl's CUDA backward sums gradients with atomicAdd, so it is not "
        "deterministic, but torch.use_deterministic_algorithms(True) is set; run "
        "on the CPU, whose kernels are deterministic, or use "
        "torch.use_deterministic_algorithms(True, warn_only=True)"
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, UserWarning, stacklevel=2)
        return
    raise RuntimeError(message)


def _fused_backward(ctx, grad_out):
    """Run the core backward and return the gradients of the forward's inputs."""
    # Unpacking checks that no saved tensor was modified in place.
    node_table, flat, element_index, frac, mask, workspace, *_ = ctx.saved_tensors
    plan = ctx.plan
    _check_deterministic(plan)
    needs = ctx.needs_input_grad
    # flat's gradient needs the weight-gradient sums, the expensive part of
    # the backward, and that pass also yields node_table's. node_table alone
    # (with frac) skips them, and frac alone also skips the table scatter.
    flat_grad = needs[1]
    table_grad = needs[0] or flat_grad
    if not grad_out.is_contiguous():
        grad_out = grad_out.contiguous()
    grad_frac = torch.empty_like(frac)
    grad_table = torch.empty_like(node_table) if table_grad else None
    grad_flat = torch.empty_like(flat) if flat_grad else None
    if plan.out_shape[0] == 0:
        if table_grad:
            grad_table.zero_()
        if flat_grad:
            grad_flat.zero_()
    else:
        _scratch, scratch_args = plan.scratch(node_table.dtype, node_table.device)
        _core.mp_backward(
            plan.dtype_code,
            plan.device_index,
            plan.stream(node_table.device),
            plan.dims_list,
            node_table.data_ptr(),
            node_table.numel(),
            flat.data_ptr(),
            flat.numel(),
            element_index.data_ptr(),
            frac.data_ptr(),
            mask.data_ptr(),
            ctx.dropout_ptr,
            workspace.data_ptr(),
            plan.workspace_size,
            grad_out.data_ptr(),
            grad_table.data_ptr() if table_grad else 0,
            grad_flat.data_ptr() if flat_grad else 0,
            grad_frac.data_ptr(),
            table_grad,
            flat_grad,
            *scratch_args,
        )
    return (
        grad_table if needs[0] else None,
        grad_flat if needs[1] else None,
        None,
        grad_frac if needs[3] else None,
        None,
        None,
        None,
    )


_NO_DOUBLE_BACKWARD = (
    b"dvmrl's fused kernels have no double backward (a backward through "
    b"gradients taken with create_graph=True); run the plain PyTorch reference "
    b"with use_fused=False (model.use_fused = False) for that"
)


def _fused_backward_create_graph(ctx, grad_out):
    """Return the gradients with a graph node that raises on a second backward.

    torch's once_differentiable adds that node only when grad_out requires
    grad. With a loss linear in the output it does not, and a gradient
    penalty built on the returned gradients would silently miss its
    dependence on the inputs. So every gradient gets the node here.
    """
    with torch.no_grad():
        grads = _fused_backward(ctx, grad_out)
    present = [g.detach().requires_grad_() for g in grads if g is not None]
    if not present:
        return grads
    # The node also takes the op's differentiable inputs (node_table, flat,
    # frac), so that every path from the gradients back to those inputs runs
    # through it. With the detached gradients alone, torch.autograd.grad(...,
    # inputs=frac) pruned the node and returned a second derivative without
    # the fused op's part.
    saved = ctx.saved_tensors
    linked = [t for t in (saved[0], saved[1], saved[3]) if t.requires_grad]
    raise_on_backward = autograd_functions.DelayedError(
        _NO_DOUBLE_BACKWARD, len(present) + len(linked)
    )
    guarded = raise_on_backward(*present, *linked)
    if isinstance(guarded, torch.Tensor):
        guarded = (guarded,)
    guarded = iter(guarded[: len(present)])
    return tuple(None if g is None else next(guarded) for g in grads)

# torch.autograd.Function.apply (torch 2.13) checks for functorch transforms
# and unwraps dead functorch wrappers in Python before it calls the C++
# apply of torch._C._FunctionBase. Doing the same steps here directly took
# the forward call at B = 1, H = 64 from 69 to 62 us (median, each call
# right after a PyTorch step; 2-core AMD EPYC VM).
_base_apply = super(torch.autograd.Function, _FusedModel).apply
_functorch_active = torch._C._are_functorch_transforms_active


def _apply_fused(node_table, flat, element_index, frac, mask, plan, dropout_mask):
    if _functorch_active():
        # torch.func needs setup_context and vmap rules, which the kernels'
        # raw-pointer calls cannot follow, so the error names the alternatives.
        raise RuntimeError(
            "dvmrl's fused kernels do not run under torch.func transforms (grad, "
            "vmap, jacrev, jacfwd); run the plain PyTorch reference with "
            "use_fused=False (model.use_fused = False) for them, or use "
            "torch.autograd.grad / torch.autograd.functional.jacobian"
        )
    if dropout_mask is not None:
        dropout_mask = unwrap_if_dead(dropout_mask)
    return _base_apply(
        unwrap_if_dead(node_table),
        unwrap_if_dead(flat),
        unwrap_if_dead(element_index),
        unwrap_if_dead(frac),
        unwrap_if_dead(mask),
        plan,
        dropout_mask,
    )
