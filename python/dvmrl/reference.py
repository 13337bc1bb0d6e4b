"""Plain PyTorch versions of dvmrl's fused ops.

These are the test oracles for the C++/CUDA kernels and the fallback when
the core lacks a backend for a tensor's device. They use dense [B, K, K]
attention over padded batches, so every input, ``frac`` included, receives
gradients through ordinary autograd.

Shapes: B compositions, K element slots, H hidden width, E element-table
rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dvmrl.layout import ModelDims, parameter_count, parameter_layout


def _split_parameters(flat: torch.Tensor, dims: ModelDims) -> dict[str, torch.Tensor]:
    """Split the flat buffer into named views with one ``torch.split``.

    Same result as :func:`dvmrl.layout.unflatten`, but the backward pass
    concatenates the gradients of all views once, where slicing would add a
    zero-filled gradient of the whole buffer per view.
    """
    expected = parameter_count(dims)
    if flat.dim() != 1 or flat.numel() != expected:
        raise ValueError(
            f"flat parameter buffer: expected shape [{expected}] for {dims}, "
            f"got {list(flat.shape)}"
        )
    specs = parameter_layout(dims)
    parts = torch.split(flat, [spec.numel for spec in specs])
    return {
        spec.name: part.view(spec.shape)
        for spec, part in zip(specs, parts, strict=True)
    }


def _weighted_softmax(
    logits: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return a = w exp(g) / sum w exp(g) over the last dim, and "row has any".

    The maximum is subtracted first, so gates of any magnitude stay finite.
    Invalid slots get weight 0 and never reach exp() with a large value,
    which keeps their gradients finite too.
    """
    very_negative = torch.finfo(logits.dtype).min
    row_max = torch.where(valid, logits, very_negative).amax(dim=-1, keepdim=True)
    row_has_any = valid.any(dim=-1, keepdim=True)
    row_max = torch.where(row_has_any, row_max, torch.zeros_like(row_max))
    safe = torch.where(valid, logits - row_max, torch.zeros_like(logits))
    scores = torch.where(valid, weights * torch.exp(safe), torch.zeros_like(logits))
    denom = scores.sum(dim=-1, keepdim=True)
    attention = scores / torch.where(denom > 0, denom, torch.ones_like(denom))
    return attention, row_has_any.squeeze(-1)


def message_passing_layer(
    h: torch.Tensor,
    frac: torch.Tensor,
    mask: torch.Tensor,
    params: dict[str, torch.Tensor],
    prefix: str,
) -> torch.Tensor:
    """Apply one weighted soft-attention layer with its residual.

    Args:
        h (Tensor): node states [B, K, H]; padded slots are ignored.
        frac (Tensor): atomic fractions [B, K], same dtype as ``h``.
        mask (Tensor): bool [B, K], true for real elements.
        params (dict): views from :func:`dvmrl.layout.unflatten`.
        prefix (str): ``"layer{l}."``.

    Returns:
        Tensor: updated node states [B, K, H]; padded slots are 0.
    """
    p = {
        name[len(prefix) :]: t for name, t in params.items() if name.startswith(prefix)
    }
    k = h.shape[1]
    not_self = ~torch.eye(k, dtype=torch.bool, device=h.device)
    pair = mask[:, :, None] & mask[:, None, :] & not_self  # [B, i, j]

    # The first linear layer splits into a per-node part for i and for j.
    gate_i = h @ p["gate_w_i"].T  # [B, K, Hg]
    gate_j = h @ p["gate_w_j"].T
    gate_hidden = F.silu(gate_i[:, :, None, :] + gate_j[:, None, :, :] + p["gate_b"])
    gate = gate_hidden @ p["gate_u"] + p["gate_d"]  # [B, K, K]

    msg_i = h @ p["msg_w1_i"].T  # [B, K, Hm]
    msg_j = h @ p["msg_w1_j"].T
    msg_hidden = F.silu(msg_i[:, :, None, :] + msg_j[:, None, :, :] + p["msg_b1"])

    weights = frac[:, None, :].expand_as(gate)
    attention, has_neighbour = _weighted_softmax(gate, weights, pair)
    aggregated = (attention[..., None] * msg_hidden).sum(dim=2)  # [B, K, Hm]
    # The attention of a node with neighbours sums to 1, so the last linear
    # layer applies after aggregation; a node without neighbours gets nothing.
    update = aggregated @ p["msg_w2"].T + p["msg_b2"] * has_neighbour[..., None].to(
        h.dtype
    )
    return (h + update) * mask[..., None].to(h.dtype)


def attention_pool(
    h: torch.Tensor,
    frac: torch.Tensor,
    mask: torch.Tensor,
    params: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Pool node states into one vector per composition [B, H]."""
    gate_hidden = F.silu(h @ params["pool_gate_w"].T + params["pool_gate_b"])
    gate = gate_hidden @ params["pool_gate_u"] + params["pool_gate_d"]  # [B, K]
    attention, _ = _weighted_softmax(gate, frac, mask)
    msg_hidden = F.silu(h @ params["pool_msg_w1"].T + params["pool_msg_b1"])
    messages = msg_hidden @ params["pool_msg_w2"].T + params["pool_msg_b2"]  # [B, K, H]
    return (attention[..., None] * messages).sum(dim=1)


def head(
    pooled: torch.Tensor,
    params: dict[str, torch.Tensor],
    dims: ModelDims,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Apply the MLP head to pooled vectors [B, H] and return [B, n_out]."""
    x = pooled
    for depth in range(dims.head_layers):
        x = F.silu(x @ params[f"head_w{depth}"].T + params[f"head_b{depth}"])
        if dropout_mask is not None:
            x = x * dropout_mask[depth]
    return x @ params["head_out_w"].T + params["head_out_b"]


def model_forward(
    node_table: torch.Tensor,
    flat: torch.Tensor,
    element_index: torch.Tensor,
    frac: torch.Tensor,
    mask: torch.Tensor,
    dims: ModelDims,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the whole composition MPNN after the embedding, in plain PyTorch.

    Args:
        node_table (Tensor): initial node state of every element [E, H].
        flat (Tensor): the flat parameter buffer, laid out as
            :func:`dvmrl.layout.parameter_layout` defines; same dtype as
            ``node_table``.
        element_index (Tensor): int64 [B, K] rows of ``node_table``.
        frac (Tensor): atomic fractions [B, K] (padded slots 0).
        mask (Tensor): bool [B, K], true for real elements; every row has at
            least one.
        dims (ModelDims): sizes of the model.
        dropout_mask (Tensor, optional): [D, B, Hh] multipliers for the
            head's hidden layers (0 or 1 / (1 - p)); ``None`` means no
            dropout.

    Returns:
        Tensor: [B, n_out] in the model's standardised target units.
    """
    params = _split_parameters(flat, dims)
    # Padded slots may contain anything (the fused kernels never read them),
    # so they are replaced before use: a NaN times a zero mask is still NaN.
    frac = torch.where(mask, frac, 0)
    rows = torch.where(mask, element_index, 0)
    h = torch.where(mask[..., None], node_table[rows], 0)
    for layer in range(dims.layers):
        h = message_passing_layer(h, frac, mask, params, f"layer{layer}.")
    pooled = attention_pool(h, frac, mask, params)
    return head(pooled, params, dims, dropout_mask)
