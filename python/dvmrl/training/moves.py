"""Architecture moves on named parameters and their AdamW moments.

Each move maps the parameters of a ``CompositionMPNN`` (by name, as
``CompositionMPNN.named_parameter_tensors`` returns them) and the AdamW
moments of the same shapes to a new ``ModelConfig``:

- ``add_layer``: appends a message-passing layer whose residual branch ends
  in a zero ``msg_w2`` and ``msg_b2``, so the new layer adds 0 and the
  function is unchanged.
- ``remove_layer``: drops the last message-passing layer (changes the
  function).
- ``widen``: Net2Net-style widening of any of the unit groups (node state
  H, gate Hg, message Hm, head Hh) that preserves the function.
- ``narrow``: keeps the most important units of each group (changes the
  function).

Widening, derived per unit group. A group is a set of units that some
tensors produce and others consume. The groups are the node state h (the
embedding and every residual update produce it), the pooled vector, the
gate and message hidden units of each layer and of the pooling, and each
hidden layer of the head. The new units j of a group copy old units
g(j) (g(j) = j for the old units, a random old unit for the new ones).
Producers of the group (rows of ``emb_w``, ``msg_w2``, ``pool_msg_w2``,
``head_w{d}`` and ``frac_w2``, columns of ``emb_offset``, the biases) are
copied, so every copy carries the same value as its source, through the
residual sums and the elementwise SiLU alike. Consumers (input columns of
the matrices, and ``gate_u``) are copied and multiplied by split factors
alpha_j that sum to 1 over the copies of each old unit, so every
consumer's output is the same sum as before. The factors are random in
[0.5, 1.5] before normalisation, so the copies receive different
gradients and do not stay tied.

AdamW moments follow the same index map, unscaled. The moments that
correspond exactly to the widened model would scale the producer entries by
alpha (their gradients scale by alpha: dL/dh'_j = alpha_j dL/dh_g(j)), but
Adam's update m / sqrt(v) is invariant to that scale, so the copies would
then receive identical updates and stay tied for good. With the source's
moments copied unscaled, the new gradients enter each copy's averages with
its own alpha, the updates of the copies drift apart from the first steps,
and the widened units learn different features.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from dvmrl.layout import is_integral, parameter_layout
from dvmrl.model import ModelConfig, init_parameter

# Config field that sets the width of each kind of unit group.
_WIDTH_FIELDS = ("hidden", "gate_hidden", "msg_hidden", "head_hidden")

Axis = tuple[str, str] | None  # (unit group, "out" or "in"), None for a fixed axis


def _group_field(group: str) -> str:
    if group in ("h", "pooled"):
        return "hidden"
    if group.endswith(".gate"):
        return "gate_hidden"
    if group.endswith(".msg"):
        return "msg_hidden"
    return "head_hidden"


def axis_groups(name: str, config: ModelConfig) -> tuple[Axis, ...]:
    """Return, per axis of a parameter, its unit group and role.

    Args:
        name (str): a flat-buffer name or one of ``config.embedding_names``.
        config (ModelConfig): sizes of the model.

    Returns:
        tuple: one entry per axis, ``(group, "out")`` when the parameter
        produces the units of that group, ``(group, "in")`` when it consumes
        them, or ``None`` for an axis that no move resizes.
    """
    if name == "emb_w":
        return (("h", "out"), None)
    if name == "emb_b":
        return (("h", "out"),)
    if name == "emb_offset":
        return (None, ("h", "out"))
    # The fraction encoder's hidden units form the group "frac", which no
    # move resizes; its output adds to the node state like the embedding.
    fraction_table = {
        "frac_w1": (("frac", "out"), None),
        "frac_b1": (("frac", "out"),),
        "frac_w2": (("h", "out"), ("frac", "in")),
        "frac_b2": (("h", "out"),),
    }
    if name in fraction_table:
        return fraction_table[name]
    if name.startswith("layer"):
        prefix, base = name.split(".")
        gate, msg = f"{prefix}.gate", f"{prefix}.msg"
        table = {
            "gate_w_i": ((gate, "out"), ("h", "in")),
            "gate_w_j": ((gate, "out"), ("h", "in")),
            "gate_b": ((gate, "out"),),
            "gate_u": ((gate, "in"),),
            "gate_d": (None,),
            "msg_w1_i": ((msg, "out"), ("h", "in")),
            "msg_w1_j": ((msg, "out"), ("h", "in")),
            "msg_b1": ((msg, "out"),),
            "msg_w2": (("h", "out"), (msg, "in")),
            "msg_b2": (("h", "out"),),
        }
        return table[base]
    pool_table = {
        "pool_gate_w": (("pool.gate", "out"), ("h", "in")),
        "pool_gate_b": (("pool.gate", "out"),),
        "pool_gate_u": (("pool.gate", "in"),),
        "pool_gate_d": (None,),
        "pool_msg_w1": (("pool.msg", "out"), ("h", "in")),
        "pool_msg_b1": (("pool.msg", "out"),),
        "pool_msg_w2": (("pooled", "out"), ("pool.msg", "in")),
        "pool_msg_b2": (("pooled", "out"),),
    }
    if name in pool_table:
        return pool_table[name]
    last_hidden = (
        f"head{config.head_layers - 1}" if config.head_layers > 0 else "pooled"
    )
    if name == "head_out_w":
        return (None, (last_hidden, "in"))
    if name == "head_out_b":
        return (None,)
    if name.startswith("head_w"):
        depth = int(name[len("head_w") :])
        source = "pooled" if depth == 0 else f"head{depth - 1}"
        return ((f"head{depth}", "out"), (source, "in"))
    if name.startswith("head_b"):
        return ((f"head{int(name[len('head_b') :])}", "out"),)
    raise KeyError(f"unknown parameter name {name!r}")


def parameter_names(config: ModelConfig) -> list[str]:
    """Return every parameter name of a model: the flat entries, then the embedding."""
    return [spec.name for spec in parameter_layout(config.dims)] + list(
        config.embedding_names
    )


@dataclasses.dataclass
class NamedState:
    """Parameters and AdamW moments of one model, by parameter name.

    Attributes:
        params (dict): name -> tensor.
        exp_avg (dict, optional): name -> AdamW first moment, same shapes.
        exp_avg_sq (dict, optional): name -> AdamW second moment.
    """

    params: dict[str, torch.Tensor]
    exp_avg: dict[str, torch.Tensor] | None = None
    exp_avg_sq: dict[str, torch.Tensor] | None = None

    @property
    def has_moments(self) -> bool:
        """Whether moments are present."""
        return self.exp_avg is not None and self.exp_avg_sq is not None


def _check_width(config: ModelConfig, field: str, value: int, grow: bool) -> int:
    """Return ``value`` as an int after checking it against the current width."""
    current = getattr(config, field)
    if not is_integral(value):
        raise ValueError(f"{field} must be an integer, got {value!r}")
    value = int(value)
    if grow and value <= current:
        raise ValueError(
            f"widen: new {field}={value} must exceed the current {current}; use "
            "narrow to shrink"
        )
    if not grow and not 1 <= value < current:
        raise ValueError(
            f"narrow: new {field}={value} must lie in 1 .. {current - 1} (current "
            f"{current}); use widen to grow"
        )
    return value


def _requested_widths(
    config: ModelConfig, widths: dict[str, int | None], grow: bool
) -> dict[str, int]:
    requested = {field: value for field, value in widths.items() if value is not None}
    if not requested:
        raise ValueError(
            f"no new width given; set at least one of {list(_WIDTH_FIELDS)}"
        )
    for field, value in requested.items():
        if field not in _WIDTH_FIELDS:
            raise ValueError(
                f"unknown width {field!r}; expected one of {_WIDTH_FIELDS}"
            )
        requested[field] = _check_width(config, field, value, grow)
    return requested


def _groups_of(config: ModelConfig) -> list[str]:
    groups = {"h", "pooled", "pool.gate", "pool.msg"}
    groups |= {
        f"layer{layer}.{kind}"
        for layer in range(config.layers)
        for kind in ("gate", "msg")
    }
    groups |= {f"head{depth}" for depth in range(config.head_layers)}
    return sorted(groups)


def _map_axes(
    tensor: torch.Tensor,
    axes: tuple[Axis, ...],
    index: dict[str, torch.Tensor],
    scale: Callable[[str, str], torch.Tensor | None],
) -> torch.Tensor:
    for axis, entry in enumerate(axes):
        if entry is None or entry[0] not in index:
            continue
        group, role = entry
        tensor = tensor.index_select(axis, index[group].to(tensor.device))
        factor = scale(group, role)
        if factor is not None:
            shape = [1] * tensor.dim()
            shape[axis] = -1
            tensor = tensor * factor.to(tensor.device, tensor.dtype).view(shape)
    return tensor


def widen(
    config: ModelConfig,
    state: NamedState,
    generator: torch.Generator,
    *,
    hidden: int | None = None,
    gate_hidden: int | None = None,
    msg_hidden: int | None = None,
    head_hidden: int | None = None,
) -> tuple[ModelConfig, NamedState]:
    """Widen unit groups Net2Net-style, preserving the function.

    Args:
        config (ModelConfig): current sizes.
        state (NamedState): current parameters (and moments).
        generator (torch.Generator): CPU generator for the copy sources and
            split factors.
        hidden (int, optional): new node-state width H, larger than now.
        gate_hidden (int, optional): new gate MLP width Hg, larger than now.
        msg_hidden (int, optional): new message MLP width Hm, larger than now.
        head_hidden (int, optional): new head width Hh, larger than now.

    Returns:
        (ModelConfig, NamedState): the new sizes and the mapped state.

    Raises:
        ValueError: when no width is given or a width does not grow.
    """
    requested = _requested_widths(
        config,
        {
            "hidden": hidden,
            "gate_hidden": gate_hidden,
            "msg_hidden": msg_hidden,
            "head_hidden": head_hidden,
        },
        grow=True,
    )
    new_config = dataclasses.replace(config, **requested)
    source: dict[str, torch.Tensor] = {}
    alpha: dict[str, torch.Tensor] = {}
    for group in _groups_of(config):
        field = _group_field(group)
        if field not in requested:
            continue
        old, new = getattr(config, field), requested[field]
        extra = torch.randint(0, old, (new - old,), generator=generator)
        mapping = torch.cat([torch.arange(old), extra])
        raw = 0.5 + torch.rand(new, generator=generator, dtype=torch.float64)
        total = torch.zeros(old, dtype=torch.float64).index_add_(0, mapping, raw)
        source[group] = mapping
        alpha[group] = raw / total[mapping]

    def param_scale(group: str, role: str) -> torch.Tensor | None:
        return alpha[group] if role == "in" else None

    def no_scale(group: str, role: str) -> None:
        return None

    return new_config, _apply(config, state, source, param_scale, no_scale, no_scale)


def unit_importance(
    config: ModelConfig, params: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Score every unit of every group for ``narrow``.

    The score of unit u is the norm of the weights that produce it times
    the norm of the weights that consume it. It is a first-order proxy for
    how much the output depends on the unit, and a unit that is produced as
    0 or never read scores 0.

    Returns:
        dict: group -> float64 scores [width].
    """
    produced: dict[str, torch.Tensor] = {}
    consumed: dict[str, torch.Tensor] = {}
    for name in parameter_names(config):
        value = params[name].detach().to(torch.float64)
        for axis, entry in enumerate(axis_groups(name, config)):
            if entry is None:
                continue
            group, role = entry
            other = [d for d in range(value.dim()) if d != axis]
            squares = value.pow(2).sum(dim=other) if other else value.pow(2)
            bucket = produced if role == "out" else consumed
            bucket[group] = bucket.get(group, 0) + squares
    return {
        group: produced.get(group, torch.zeros_like(consumed[group])).sqrt()
        * consumed.get(group, torch.zeros_like(produced[group])).sqrt()
        for group in set(produced) | set(consumed)
    }


def narrow(
    config: ModelConfig,
    state: NamedState,
    *,
    hidden: int | None = None,
    gate_hidden: int | None = None,
    msg_hidden: int | None = None,
    head_hidden: int | None = None,
) -> tuple[ModelConfig, NamedState]:
    """Keep the highest-scoring units of each narrowed group.

    Units are ranked by :func:`unit_importance` and kept in their original
    order; the parameters and moments of the dropped units are removed.
    This changes the function, by as much as the dropped units contributed.

    Raises:
        ValueError: when no width is given or a width does not shrink.
    """
    requested = _requested_widths(
        config,
        {
            "hidden": hidden,
            "gate_hidden": gate_hidden,
            "msg_hidden": msg_hidden,
            "head_hidden": head_hidden,
        },
        grow=False,
    )
    new_config = dataclasses.replace(config, **requested)
    scores = unit_importance(config, state.params)
    keep: dict[str, torch.Tensor] = {}
    for group in _groups_of(config):
        field = _group_field(group)
        if field not in requested:
            continue
        # Stable sort so that ties keep the lower index.
        order = torch.sort(-scores[group], stable=True).indices
        keep[group] = torch.sort(order[: requested[field]]).values

    def no_scale(group: str, role: str) -> None:
        return None

    return new_config, _apply(config, state, keep, no_scale, no_scale, no_scale)


def _apply(
    config: ModelConfig,
    state: NamedState,
    index: dict[str, torch.Tensor],
    param_scale: Callable[[str, str], torch.Tensor | None],
    avg_scale: Callable[[str, str], torch.Tensor | None],
    avg_sq_scale: Callable[[str, str], torch.Tensor | None],
) -> NamedState:
    params, exp_avg, exp_avg_sq = {}, {}, {}
    for name in parameter_names(config):
        axes = axis_groups(name, config)
        params[name] = _map_axes(state.params[name], axes, index, param_scale)
        if state.has_moments:
            exp_avg[name] = _map_axes(state.exp_avg[name], axes, index, avg_scale)
            exp_avg_sq[name] = _map_axes(
                state.exp_avg_sq[name], axes, index, avg_sq_scale
            )
    if not state.has_moments:
        return NamedState(params)
    return NamedState(params, exp_avg, exp_avg_sq)


def add_layer(
    config: ModelConfig, state: NamedState, generator: torch.Generator
) -> tuple[ModelConfig, NamedState]:
    """Append a message-passing layer that leaves the function unchanged.

    The new layer's gate and first message weights get the usual fresh
    initialisation, and its ``msg_w2`` and ``msg_b2`` are 0, so its update
    is 0 until training moves them. Its AdamW first moments start at 0 and
    its second moments at the mean second moment of the same parameter in
    the previous last layer (0 when there was none). With zero second
    moments and a step count far past the bias-correction transient, Adam
    would take steps of about 3 to 6 times the learning rate on the new
    entries during their first hundreds of steps.
    """
    new_config = dataclasses.replace(config, layers=config.layers + 1)
    new_prefix = f"layer{config.layers}."
    parent = f"layer{config.layers - 1}." if config.layers > 0 else None
    any_tensor = next(iter(state.params.values()))
    params = dict(state.params)
    exp_avg = dict(state.exp_avg) if state.has_moments else None
    exp_avg_sq = dict(state.exp_avg_sq) if state.has_moments else None
    for spec in parameter_layout(new_config.dims):
        if not spec.name.startswith(new_prefix):
            continue
        base = spec.name[len(new_prefix) :]
        if base in ("msg_w2", "msg_b2"):
            value = torch.zeros(spec.shape, dtype=torch.float64)
        else:
            value = init_parameter(spec.name, spec.shape, generator)
        params[spec.name] = value.to(any_tensor.device, any_tensor.dtype)
        if exp_avg is not None:
            exp_avg[spec.name] = torch.zeros_like(params[spec.name])
            fill = 0.0
            if parent is not None:
                fill = float(state.exp_avg_sq[parent + base].mean())
            exp_avg_sq[spec.name] = torch.full_like(params[spec.name], fill)
    return new_config, NamedState(params, exp_avg, exp_avg_sq)


def remove_layer(
    config: ModelConfig, state: NamedState
) -> tuple[ModelConfig, NamedState]:
    """Drop the last message-passing layer with its parameters and moments.

    Raises:
        RuntimeError: when the model has no message-passing layer.
    """
    if config.layers == 0:
        raise RuntimeError("remove_layer: the model has no message-passing layer left")
    new_config = dataclasses.replace(config, layers=config.layers - 1)
    prefix = f"layer{config.layers - 1}."

    def keep(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            name: value for name, value in values.items() if not name.startswith(prefix)
        }

    if not state.has_moments:
        return new_config, NamedState(keep(state.params))
    return new_config, NamedState(
        keep(state.params), keep(state.exp_avg), keep(state.exp_avg_sq)
    )
