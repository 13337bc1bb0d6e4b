"""Euclidean projection onto {sum y = 1, lo <= y <= hi}, row by row.

Each row of a padded batch [B, K] is projected over its real entries (mask
true); padding entries come back as 0. The projection is
``y_k = clamp(x_k - t, lo_k, hi_k)`` for the threshold ``t`` at which the
row sums to 1. Both implementations find ``t`` exactly: they sort the
breakpoints ``x_k - hi_k`` and ``x_k - lo_k``, locate the linear piece of
the clamped sum that crosses 1, and solve that piece in closed form. The
results agree with the exact projection to about 1e-15 in float64 (the
arithmetic is float64 for float32 inputs too).

- :func:`project_simplex_box` runs the compiled kernel (CPU thread pool, or
  CUDA when the core was built with it).
- :func:`project_simplex_box_torch` is the plain PyTorch twin, used as the
  test oracle and as the fallback on devices the core does not support.

Neither output carries gradients: the adversarial search projects after
each gradient step and never differentiates through the projection.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

_STATUS_TEXT = {
    3: "some lower bound exceeds its upper bound; set lo <= hi entry by entry",
    4: "it contains NaN or infinite values; pass finite x, lo and hi",
    5: "it has no real entries (mask is all false); give every row at least one",
}
_warned_fallback: set[str] = set()
# Status of a row with more real entries than the kernel's stack arrays hold.
_TOO_MANY_ENTRIES = 6
_WIDE_ROWS = "rows with more than {} real entries"


def _core():
    from dvmrl._runtime import _core as core

    return core


def _tolerance(dtype: torch.dtype, k: int) -> float:
    """Slack on sum(lo) <= 1 <= sum(hi) for bounds rounded to ``dtype``."""
    return 8.0 * max(k, 1) * torch.finfo(dtype).eps


def _failure_message(row: int, status: int, sum_lo: float, sum_hi: float) -> str:
    if status == 1:
        reason = (
            f"its lower bounds sum to {sum_lo:.17g} > 1, so no point sums to 1; "
            "lower lo in that row"
        )
    elif status == 2:
        reason = (
            f"its upper bounds sum to {sum_hi:.17g} < 1, so no point sums to 1; "
            "raise hi in that row"
        )
    else:
        reason = _STATUS_TEXT.get(status, f"status code {status}")
    return f"project_simplex_box: row {row} is infeasible: {reason}"


def _validate(
    x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, mask: torch.Tensor
) -> None:
    for name, value in (("x", x), ("lo", lo), ("hi", hi), ("mask", mask)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(
                f"project_simplex_box: {name} must be a torch.Tensor, got "
                f"{type(value).__name__}"
            )
    if x.dim() != 2:
        raise ValueError(
            f"project_simplex_box: x must be 2-D [B, K], got shape {tuple(x.shape)}"
        )
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"project_simplex_box: x must be float32 or float64, got {x.dtype}"
        )
    for name, value in (("lo", lo), ("hi", hi)):
        if value.dtype != x.dtype:
            raise TypeError(
                f"project_simplex_box: {name} must have the dtype of x ({x.dtype}), "
                f"got {value.dtype}"
            )
    if mask.dtype != torch.bool:
        raise TypeError(f"project_simplex_box: mask must be bool, got {mask.dtype}")
    for name, value in (("lo", lo), ("hi", hi), ("mask", mask)):
        if value.shape != x.shape:
            raise ValueError(
                f"project_simplex_box: {name} has shape {tuple(value.shape)}, "
                f"expected the shape of x {tuple(x.shape)}"
            )
        if value.device != x.device:
            raise ValueError(
                f"project_simplex_box: {name} is on {value.device} but x is on "
                f"{x.device}; move all inputs to one device"
            )


def _raise_for_status(status: torch.Tensor, lo, hi, mask) -> None:
    """Raise the message of the first failing row, given per-row status codes."""
    bad = torch.nonzero(status != 0)
    if bad.numel() == 0:
        return
    row = int(bad[0, 0])
    real = mask[row]
    sum_lo = float(lo[row][real].double().sum())
    sum_hi = float(hi[row][real].double().sum())
    raise ValueError(_failure_message(row, int(status[row]), sum_lo, sum_hi))


def project_simplex_box(
    x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Project each row onto {sum of real entries = 1, lo <= y <= hi} (kernel).

    Args:
        x (Tensor): points [B, K], float32 or float64.
        lo (Tensor): lower bounds [B, K], dtype of ``x``.
        hi (Tensor): upper bounds [B, K], dtype of ``x``.
        mask (Tensor): bool [B, K], true for real entries; rows may have
            different numbers of real entries.

    Returns:
        Tensor: the projections [B, K] on the device and in the dtype of
        ``x``; padding entries are 0.

    Raises:
        TypeError: for non-tensors, a non-float ``x``, mixed dtypes or a
            non-bool mask.
        ValueError: for mismatched shapes or devices, and naming the first
            infeasible row (sum of lo > 1, sum of hi < 1, lo > hi, NaN).
    """
    _validate(x, lo, hi, mask)
    b, k = x.shape
    if b == 0:
        return torch.zeros_like(x)
    core = _core()
    reason = None
    if x.device.type == "cuda" and not hasattr(core, "project_simplex_box_cuda"):
        reason = "a core built without CUDA"
    elif x.device.type not in ("cpu", "cuda"):
        reason = f"device {x.device.type}"
    if reason is not None:
        return _fallback(reason, x, lo, hi, mask)

    x_c, lo_c, hi_c, mask_c = (t.detach().contiguous() for t in (x, lo, hi, mask))
    tolerance = _tolerance(x.dtype, k)
    if x.device.type == "cpu":
        out, row, status, sum_lo, sum_hi = core.project_simplex_box(
            x_c.numpy(), lo_c.numpy(), hi_c.numpy(), mask_c.numpy(), tolerance
        )
        if row >= 0 and status == _TOO_MANY_ENTRIES:
            return _fallback(
                _WIDE_ROWS.format(core.projection_max_entries), x, lo, hi, mask
            )
        if row >= 0:
            raise ValueError(_failure_message(int(row), int(status), sum_lo, sum_hi))
        return torch.from_numpy(out)

    out = torch.empty_like(x_c)
    status = torch.empty(b, dtype=torch.int32, device=x.device)
    with torch.cuda.device(x.device):
        stream = torch.cuda.current_stream(x.device).cuda_stream
        core.project_simplex_box_cuda(
            x_c.data_ptr(),
            lo_c.data_ptr(),
            hi_c.data_ptr(),
            mask_c.data_ptr(),
            out.data_ptr(),
            status.data_ptr(),
            b,
            k,
            x.dtype == torch.float64,
            tolerance,
            x.device.index,  # a CUDA tensor's device always has its index
            stream,
        )
    if bool((status == _TOO_MANY_ENTRIES).any()):
        return _fallback(
            _WIDE_ROWS.format(core.projection_max_entries), x, lo, hi, mask
        )
    _raise_for_status(status, lo_c, hi_c, mask_c)
    return out


def _fallback(reason: str, x, lo, hi, mask) -> torch.Tensor:
    if reason not in _warned_fallback:
        _warned_fallback.add(reason)
        logger.warning(
            "project_simplex_box: no kernel for %s; using the PyTorch version", reason
        )
    return project_simplex_box_torch(x, lo, hi, mask)


def project_simplex_box_torch(
    x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Project each row like :func:`project_simplex_box`, in plain PyTorch.

    The same sort-based exact threshold search, vectorised over rows: it
    evaluates the clamped sum at all 2K sorted breakpoints ([B, 2K, K]
    work), so it suits the small K of compositions.

    Args:
        x (Tensor): points [B, K], float32 or float64.
        lo (Tensor): lower bounds [B, K], dtype of ``x``.
        hi (Tensor): upper bounds [B, K], dtype of ``x``.
        mask (Tensor): bool [B, K], true for real entries.

    Returns:
        Tensor: the projections [B, K] in the dtype of ``x``; padding is 0.

    Raises:
        TypeError: as :func:`project_simplex_box`.
        ValueError: as :func:`project_simplex_box`.
    """
    _validate(x, lo, hi, mask)
    b, k = x.shape
    if b == 0:
        return torch.zeros_like(x)
    with torch.no_grad():
        zero = torch.zeros((), dtype=torch.float64, device=x.device)
        xs = torch.where(mask, x.detach().double(), zero)
        lower = torch.where(mask, lo.detach().double(), zero)
        upper = torch.where(mask, hi.detach().double(), zero)

        status = torch.zeros(b, dtype=torch.int32, device=x.device)
        finite = (xs.isfinite() & lower.isfinite() & upper.isfinite()).all(dim=1)
        # Bounds of non-finite rows are zeroed so the checks below stay quiet.
        xs = torch.where(finite[:, None], xs, zero)
        lower = torch.where(finite[:, None], lower, zero)
        upper = torch.where(finite[:, None], upper, zero)
        sum_lo = lower.sum(dim=1)
        sum_hi = upper.sum(dim=1)
        tolerance = _tolerance(x.dtype, k)
        status = torch.where(sum_hi < 1.0 - tolerance, 2, status)
        status = torch.where(sum_lo > 1.0 + tolerance, 1, status)
        status = torch.where((lower > upper).any(dim=1), 3, status)
        status = torch.where(~finite, 4, status)
        status = torch.where(~mask.any(dim=1), 5, status)
        _raise_for_status(status, lo, hi, mask)

        # Shift each row so that its largest real entry is 0, as the kernel
        # does: the projection is unchanged and large |x| do not cancel.
        largest = torch.finfo(torch.float64).max
        x_max = torch.where(mask, xs, -largest).amax(dim=1, keepdim=True)
        shifted = (xs - x_max).clamp(min=-largest)
        xs = torch.where(mask, shifted, zero)

        breakpoints, _ = torch.cat([xs - upper, xs - lower], dim=1).sort(dim=1)
        clamped = torch.clamp(
            xs[:, None, :] - breakpoints[:, :, None],
            lower[:, None, :],
            upper[:, None, :],
        )
        sums = clamped.sum(dim=2)  # [B, 2K], non-increasing along dim 1
        index = torch.arange(2 * k, device=x.device)
        crossing = (sums <= 1.0) & (index >= 1)
        right = torch.where(
            crossing.any(dim=1), crossing.int().argmax(dim=1), 2 * k - 1
        ).clamp(min=1)
        t_left = breakpoints.gather(1, (right - 1)[:, None])
        t_right = breakpoints.gather(1, right[:, None])
        # Each entry is at hi, at lo or free on the whole piece (t_left, t_right).
        at_hi = (xs - upper) >= t_right
        at_lo = ~at_hi & ((xs - lower) <= t_left)
        free = mask & ~at_hi & ~at_lo
        rest = torch.where(at_hi, upper, torch.where(at_lo, lower, xs)).sum(dim=1) - 1.0
        n_free = free.sum(dim=1)
        t = torch.where(
            n_free > 0, rest / n_free.clamp(min=1).double(), t_right.squeeze(1)
        )
        y = torch.clamp(xs - t[:, None], lower, upper)
        y = torch.where((sum_hi <= 1.0)[:, None], upper, y)
        y = torch.where((sum_lo >= 1.0)[:, None], lower, y)
        y = torch.where(mask, y, zero)
    return y.to(x.dtype)
