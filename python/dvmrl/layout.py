"""Sizes of the composition MPNN and the layout of its flat parameter buffer.

The message-passing layers, the pooling and the head keep all their
parameters in one contiguous 1-D buffer, so a fused kernel reads the whole
model from a single pointer. The order below is the contract between the
PyTorch model, the reference ops and the C++/CUDA kernels.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

# Deepest head the compiled core takes (kMaxHeadDepth in
# csrc/include/dvmrl/mp_math.h).
MAX_HEAD_LAYERS = 16


@dataclass(frozen=True)
class ModelDims:
    """Sizes that fix the flat buffer.

    Attributes:
        hidden (int): node state width H.
        gate_hidden (int): width Hg of the attention-gate MLPs.
        msg_hidden (int): width Hm of the message MLPs.
        layers (int): number L of message-passing layers (>= 0).
        head_hidden (int): width Hh of the head's hidden layers.
        head_layers (int): number D of hidden layers in the head (>= 0).
        n_out (int): outputs per composition: 1, or 2 for mean and
            log-variance.
    """

    hidden: int
    gate_hidden: int
    msg_hidden: int
    layers: int
    head_hidden: int
    head_layers: int
    n_out: int = 1

    def __post_init__(self) -> None:
        for name, least in (
            ("hidden", 1),
            ("gate_hidden", 1),
            ("msg_hidden", 1),
            ("head_hidden", 1),
            ("n_out", 1),
            ("layers", 0),
            ("head_layers", 0),
        ):
            value = getattr(self, name)
            if not is_integral(value) or value < least:
                raise ValueError(
                    f"ModelDims.{name} must be an integer >= {least}, got {value!r}"
                )
            # Sizes read from JSON may be integral floats (16.0), but tensor
            # constructors and slices need Python ints.
            object.__setattr__(self, name, int(value))
        if self.head_layers > MAX_HEAD_LAYERS:
            raise ValueError(
                f"ModelDims.head_layers must be at most {MAX_HEAD_LAYERS} (the "
                f"fused kernels' limit), got {self.head_layers}"
            )


def is_integral(value) -> bool:
    """Return True for a real number with an integer value (16 or 16.0)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return False
    return math.isfinite(value) and int(value) == value


@dataclass(frozen=True)
class ParamSpec:
    """One named parameter inside the flat buffer."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        """Number of scalars in the parameter."""
        return math.prod(self.shape)


def layer_specs(dims: ModelDims) -> list[tuple[str, tuple[int, ...]]]:
    """List the (name suffix, shape) pairs of one message-passing layer."""
    h, hg, hm = dims.hidden, dims.gate_hidden, dims.msg_hidden
    return [
        ("gate_w_i", (hg, h)),
        ("gate_w_j", (hg, h)),
        ("gate_b", (hg,)),
        ("gate_u", (hg,)),
        ("gate_d", (1,)),
        ("msg_w1_i", (hm, h)),
        ("msg_w1_j", (hm, h)),
        ("msg_b1", (hm,)),
        ("msg_w2", (h, hm)),
        ("msg_b2", (h,)),
    ]


def parameter_layout(dims: ModelDims) -> list[ParamSpec]:
    """Return every parameter of the flat buffer with its shape and offset.

    Order: layers 0..L-1 (names prefixed ``layer{l}.``), then the pooling
    (``pool_*``), then the head (``head_w{d}``, ``head_b{d}``, ``head_out_*``).
    Matrices are row-major [out, in].
    """
    h, hg, hm = dims.hidden, dims.gate_hidden, dims.msg_hidden
    entries: list[tuple[str, tuple[int, ...]]] = []
    for layer in range(dims.layers):
        entries += [(f"layer{layer}.{name}", shape) for name, shape in layer_specs(dims)]
    entries += [
        ("pool_gate_w", (hg, h)),
        ("pool_gate_b", (hg,)),
        ("pool_gate_u", (hg,)),
        ("pool_gate_d", (1,)),
        ("pool_msg_w1", (hm, h)),
        ("pool_msg_b1", (hm,)),
        ("pool_msg_w2", (h, hm)),
        ("pool_msg_b2", (h,)),
    ]
    width = h
    for depth in range(dims.head_layers):
        entries += [
            (f"head_w{depth}", (dims.head_hidden, width)),
            (f"head_b{depth}", (dims.head_hidden,)),
        ]
        width = dims.head_hidden
    entries += [("head_out_w", (dims.n_out, width)), ("head_out_b", (dims.n_out,))]

    specs = []
    offset = 0
    for name, shape in entries:
        spec = ParamSpec(name, shape, offset)
        specs.append(spec)
        offset += spec.numel
    return specs


def parameter_count(dims: ModelDims) -> int:
    """Return the length of the flat buffer."""
    last = parameter_layout(dims)[-1]
    return last.offset + last.numel


def unflatten(flat: torch.Tensor, dims: ModelDims) -> dict[str, torch.Tensor]:
    """Split a flat buffer into named views (no copies; gradients flow back).

    Raises:
        ValueError: if ``flat`` is not 1-D with ``parameter_count(dims)`` values.
    """
    expected = parameter_count(dims)
    if flat.dim() != 1 or flat.numel() != expected:
        raise ValueError(
            f"flat parameter buffer: expected shape [{expected}] for {dims}, "
            f"got {list(flat.shape)}"
        )
    return {
        spec.name: flat[spec.offset : spec.offset + spec.numel].view(spec.shape)
        for spec in parameter_layout(dims)
    }
