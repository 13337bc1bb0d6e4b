"""Fused composition-MPNN forward and backward, with input validation.

``model_forward`` has the signature of :func:`dvmrl.reference.model_forward`
and runs the whole model after the embedding (gather from ``node_table``,
every message-passing layer, the attention pooling and the head) in one
call of the compiled core, and its backward in one more call.

Shapes: B compositions, K element slots, E element-table rows, H hidden
width, D head depth, Hh head width.
"""

from __future__ import annotations

import torch

from dvmrl import reference
from dvmrl.layout import ModelDims, parameter_count

_FLOAT_DTYPES = (torch.float32, torch.float64)
MAX_SLOTS = 8


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
    _check_shape("flat", flat, (parameter_count(dims),))
    if element_index.dim() != 2 or not 1 <= element_index.shape[1] <= MAX_SLOTS:
        raise ValueError(
            f"element_index: expected shape [B, K] with 1 <= K <= {MAX_SLOTS}, "
            f"got {list(element_index.shape)}"
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
            :func:`dvmrl.layout.parameter_layout` says.
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
    validate_inputs(node_table, flat, element_index, frac, mask, dims, dropout_mask)
    return reference.model_forward(
        node_table, flat, element_index, frac, mask, dims, dropout_mask
    )
