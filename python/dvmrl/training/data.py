"""Featurised data on the compute device, input checks and fingerprints."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch


def batch_tensors(x: Any, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(element_index, frac, mask)`` of a ``CompositionBatch``.

    Raises:
        TypeError: if ``x`` lacks those tensors; ``name`` labels it.
    """
    for attribute in ("element_index", "frac", "mask"):
        if not isinstance(getattr(x, attribute, None), torch.Tensor):
            raise TypeError(
                f"{name} must be a dvmrl.featurize.CompositionBatch (tensors "
                f"element_index, frac, mask), got {type(x).__name__}"
            )
    return x.element_index, x.frac, x.mask


def check_targets(y: Any, count: int, name: str) -> np.ndarray:
    """Return targets as a float64 array [count], rejecting NaN and infinities.

    Raises:
        ValueError: for values that are not numbers, a wrong length or
            non-finite values, with positions.
    """
    try:
        values = np.asarray(y, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"{name} must be numbers in eV/atom ({err}); convert them with "
            "float() or drop the rows that are not numbers"
        ) from None
    if values.shape[0] != count:
        raise ValueError(
            f"{name} has {values.shape[0]} values for {count} compositions"
        )
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        raise ValueError(
            f"{name} has {bad.size} NaN or infinite values (first positions "
            f"{bad[:10].tolist()}); drop or fix those rows"
        )
    return values


def data_fingerprint(x: Any, y: np.ndarray) -> str:
    """Return a SHA-256 hex digest of a featurised set and its targets."""
    element_index, frac, mask = batch_tensors(x, "x")
    digest = hashlib.sha256()
    digest.update(np.int64(len(y)).tobytes())
    for tensor, dtype in ((element_index, "<i8"), (frac, "<f8"), (mask, "|b1")):
        array = np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=dtype)
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    digest.update(np.ascontiguousarray(y, dtype="<f8").tobytes())
    return digest.hexdigest()


class DeviceSet:
    """A featurised set and its targets on the compute device.

    Attributes:
        element_index, frac, mask (Tensor): the batch tensors [N, K].
        y (Tensor): targets [N] in eV/atom, in the model dtype.
        y64 (Tensor): the same targets in float64, for validation errors.
        y_numpy (ndarray): float64 targets on the host.
        fingerprint (str): :func:`data_fingerprint` of the set.
    """

    def __init__(
        self, x: Any, y: Any, name: str, device: torch.device, dtype: torch.dtype
    ):
        element_index, frac, mask = batch_tensors(x, name)
        count = element_index.shape[0]
        if count == 0:
            raise ValueError(f"{name} is empty; it needs at least one composition")
        if not bool(mask.any(dim=1).all()):
            raise ValueError(f"{name} has a composition without any element")
        self.y_numpy = check_targets(y, count, f"targets of {name}")
        self.fingerprint = data_fingerprint(x, self.y_numpy)
        self.element_index = element_index.to(
            device=device, dtype=torch.int64
        ).contiguous()
        self.frac = frac.to(device=device, dtype=dtype).contiguous()
        self.mask = mask.to(device=device).contiguous()
        self.y = torch.tensor(self.y_numpy, dtype=dtype, device=device)
        # Validation errors are taken against the float64 targets.
        self.y64 = torch.tensor(self.y_numpy, dtype=torch.float64, device=device)

    def __len__(self) -> int:
        return self.element_index.shape[0]
