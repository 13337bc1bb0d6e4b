"""Padded composition batches and Magpie-style composition features.

`featurize` turns B compositions into padded arrays [B, K]: the element table
rows (atomic number minus 1), the atomic fractions and a mask of real slots.
In each row the real slots come first, in atomic-number order; padding slots
hold index 0, fraction 0 and mask False.

`composition_features` reduces the standardised element descriptors of each
composition to fixed-length statistics weighted by atomic fraction, for
models that need a plain feature vector (Gaussian processes, classifiers,
the agent's observation).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dvmrl import elements
from dvmrl.compositions import MAX_ELEMENTS, parse, validate


@dataclass(frozen=True)
class CompositionBatch:
    """A padded batch of B compositions with K slots each (CPU or device tensors).

    Attributes:
        element_index: int64 [B, K], element table row (Z - 1); 0 in padding.
        frac: float64 (or the dtype given to `.to`) [B, K], atomic fraction;
            0 in padding, each row sums to 1 over the real slots.
        mask: bool [B, K], true for real elements, which come first in a row.
    """

    element_index: torch.Tensor
    frac: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        for name in ("element_index", "frac", "mask"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor")
        if self.element_index.dtype != torch.int64:
            raise TypeError(
                f"element_index must be int64, got {self.element_index.dtype}"
            )
        if not self.frac.is_floating_point():
            raise TypeError(f"frac must be a floating dtype, got {self.frac.dtype}")
        if self.mask.dtype != torch.bool:
            raise TypeError(f"mask must be bool, got {self.mask.dtype}")
        shape = self.element_index.shape
        if len(shape) != 2 or self.frac.shape != shape or self.mask.shape != shape:
            raise ValueError(
                "element_index, frac and mask must share one [B, K] shape, got "
                f"{tuple(shape)}, {tuple(self.frac.shape)} and {tuple(self.mask.shape)}"
            )

    def __len__(self) -> int:
        return self.element_index.shape[0]

    @property
    def k_max(self) -> int:
        """Number of slots K per composition."""
        return self.element_index.shape[1]

    @property
    def device(self) -> torch.device:
        """Device of the tensors."""
        return self.element_index.device

    @property
    def n_elements(self) -> torch.Tensor:
        """Number of real elements per composition, int64 [B]."""
        return self.mask.sum(dim=1)

    def __getitem__(self, index) -> CompositionBatch:
        """Select compositions by an int, slice, index array or bool mask."""
        if isinstance(index, torch.Tensor | np.ndarray) and index.ndim == 0:
            # A 0-d integer tensor or array selects one composition like an int.
            value = index.item()
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(
                    f"a 0-d index must be an integer, got {value!r}; a bool mask "
                    f"needs one entry per composition ({len(self)})"
                )
            index = value
        if isinstance(index, int | np.integer):
            position = int(index) + (len(self) if index < 0 else 0)
            if not 0 <= position < len(self):
                raise IndexError(f"index {index} is out of range for {len(self)} rows")
            index = slice(position, position + 1)
        elif not isinstance(index, slice):
            if not isinstance(index, torch.Tensor):
                index = torch.as_tensor(np.asarray(index))
            # Casting a float index would cut 1.7 to 1 and select another
            # composition. An empty list is a float array too, and selects nothing.
            if (index.is_floating_point() or index.is_complex()) and index.numel():
                raise TypeError(
                    f"an index array must hold integers or bools, got {index.dtype}; "
                    "round and cast it to int first"
                )
            if index.dtype != torch.bool:
                index = index.to(torch.int64)
            index = index.to(self.element_index.device)
        return CompositionBatch(
            self.element_index[index], self.frac[index], self.mask[index]
        )

    def to(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> CompositionBatch:
        """Move the batch to a device and cast `frac` to a floating dtype.

        Args:
            device: target device; None keeps the current one.
            dtype: floating dtype for `frac`; None keeps the current one. The
                index stays int64 and the mask bool.
        """
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype applies to frac and must be floating, got {dtype}")
        return CompositionBatch(
            self.element_index.to(device=device),
            self.frac.to(device=device, dtype=dtype),
            self.mask.to(device=device),
        )

    def trimmed(self) -> CompositionBatch:
        """Return the batch with trailing slots that are padding in every row removed.

        At least one slot is kept.
        """
        keep = max(int(self.n_elements.max()) if len(self) else 0, 1)
        return CompositionBatch(
            self.element_index[:, :keep], self.frac[:, :keep], self.mask[:, :keep]
        )


def featurize(
    compositions: Iterable[Mapping | str],
    k_max: int | None = None,
    *,
    alloy_notation: bool = False,
    metals_only: bool = False,
) -> CompositionBatch:
    """Build a padded batch from compositions.

    Args:
        compositions: B items, each a {symbol: amount} mapping (normalised
            with `compositions.validate`) or a formula string (read with
            `compositions.parse`).
        k_max: slots per row, at least the largest number of elements in the
            batch and at most MAX_ELEMENTS (8); None uses that largest number
            (1 for an empty batch).
        alloy_notation: read formula strings in alloy notation.
        metals_only: reject compositions that contain a non-metal.

    Returns:
        CompositionBatch of CPU tensors, frac in float64.

    Raises:
        CompositionError: for an invalid composition, with its position.
        ValueError: when k_max is out of range.
        TypeError: when ``compositions`` is one formula or mapping, or not
            iterable, instead of a sequence of them.
    """
    # A string or a mapping is iterable too, and its characters or keys would
    # be read as compositions.
    single = isinstance(compositions, str | Mapping)
    if single or not isinstance(compositions, Iterable):
        fix = (
            f"wrap one composition in a list, such as featurize([{compositions!r}])"
            if single
            else "pass a list of formulas, such as ['Ni3Al', 'FeNi']"
        )
        raise TypeError(
            "compositions must be a sequence of formulas or mappings, got "
            f"{type(compositions).__name__} {compositions!r}; {fix}"
        )
    parsed = [
        _as_fractions(item, position, alloy_notation, metals_only)
        for position, item in enumerate(compositions)
    ]
    widest = max((len(fractions) for fractions in parsed), default=1)
    if k_max is None:
        k_max = widest
    elif int(k_max) != k_max or not 1 <= k_max <= MAX_ELEMENTS:
        raise ValueError(
            f"k_max must be an integer in 1 .. {MAX_ELEMENTS}, got {k_max!r}"
        )
    elif k_max < widest:
        raise ValueError(
            f"k_max={k_max} is smaller than the {widest} elements of the largest "
            "composition; raise k_max or leave it None"
        )
    k_max = int(k_max)
    index = np.zeros((len(parsed), k_max), dtype=np.int64)
    frac = np.zeros((len(parsed), k_max), dtype=np.float64)
    mask = np.zeros((len(parsed), k_max), dtype=bool)
    lookup = elements.ELEMENT_INDEX
    for row, fractions in enumerate(parsed):
        width = len(fractions)
        # validate() and parse() return the symbols in atomic-number order.
        index[row, :width] = [lookup[symbol] for symbol in fractions]
        frac[row, :width] = list(fractions.values())
        mask[row, :width] = True
    return CompositionBatch(
        torch.from_numpy(index), torch.from_numpy(frac), torch.from_numpy(mask)
    )


def _as_fractions(
    item: Mapping | str, position: int, alloy_notation: bool, metals_only: bool
) -> dict[str, float]:
    if item is None or isinstance(item, float):
        # None or NaN (an empty CSV cell): the message names its position.
        raise TypeError(
            f"composition at position {position} is {item!r}; pass a formula "
            "string or a mapping of element symbol to amount"
        )
    try:
        if isinstance(item, str):
            return parse(item, alloy_notation=alloy_notation, metals_only=metals_only)
        return validate(item, metals_only=metals_only)
    except (ValueError, TypeError) as error:
        # A NaN from an empty CSV cell is a TypeError, and its position is
        # what finds the row.
        error.add_note(f"composition at position {position}")
        raise


# Statistics over the elements of one composition, weighted by atomic fraction.
FEATURE_STATS: tuple[str, ...] = ("mean", "avg_dev", "std", "min", "max", "range")
DEFAULT_STATS: tuple[str, ...] = ("mean", "avg_dev", "min", "max", "range")
# Magpie's stoichiometric attributes: the number of elements and L^p norms of
# the fractions.
STOICHIOMETRY_FEATURES: tuple[str, ...] = (
    "n_elements",
    "frac_norm_2",
    "frac_norm_3",
    "frac_norm_5",
    "frac_norm_10",
)


def _check_stats(stats: Sequence[str]) -> tuple[str, ...]:
    stats = tuple(stats)
    unknown = [stat for stat in stats if stat not in FEATURE_STATS]
    if unknown or not stats:
        raise ValueError(
            f"stats must be a non-empty selection of {FEATURE_STATS}, got {stats}"
        )
    return stats


def composition_feature_names(
    stats: Sequence[str] = DEFAULT_STATS, stoichiometry: bool = True
) -> list[str]:
    """Return the column names of `composition_features` with the same arguments.

    Names read "<stat>_<descriptor>", stat-major, then the stoichiometric
    features when requested.
    """
    names = [
        f"{stat}_{descriptor}"
        for stat in _check_stats(stats)
        for descriptor in elements.descriptor_names()
    ]
    if stoichiometry:
        names.extend(STOICHIOMETRY_FEATURES)
    return names


@functools.cache
def _descriptor_matrix() -> np.ndarray:
    matrix = elements.descriptor_matrix()
    matrix.setflags(write=False)
    return matrix


def composition_features(
    batch: CompositionBatch | Iterable[Mapping | str],
    stats: Sequence[str] = DEFAULT_STATS,
    stoichiometry: bool = True,
) -> np.ndarray:
    """Compute fraction-weighted statistics of the standardised descriptors.

    For descriptor values x_k and fractions w_k of one composition (real slots
    only): mean = sum w_k x_k, avg_dev = sum w_k |x_k - mean| (Magpie's
    average deviation), std = sqrt(sum w_k (x_k - mean)^2), min, max and
    range = max - min. The stoichiometric features are the number of
    elements and the L^p norms (sum w_k^p)^(1/p) for p = 2, 3, 5, 10.

    Args:
        batch: a CompositionBatch, or compositions accepted by `featurize`.
        stats: which statistics to compute, in output order.
        stoichiometry: append the stoichiometric features.

    Returns:
        float64 array [B, F], columns as in `composition_feature_names`;
        F = len(stats) * F0 (+ 5 with stoichiometry).
    """
    stats = _check_stats(stats)
    if not isinstance(batch, CompositionBatch):
        batch = featurize(batch)
    index = batch.element_index.detach().cpu().numpy()
    weights = batch.frac.detach().cpu().to(torch.float64).numpy()
    mask = batch.mask.detach().cpu().numpy()
    weights = np.where(mask, weights, 0.0)
    if len(batch) and not np.all(mask[:, 0]):
        raise ValueError("every composition in the batch needs at least one element")
    from dvmrl.model import SUM_TOLERANCE

    sums = weights.sum(axis=1)
    normalised = np.abs(sums - 1.0) < SUM_TOLERANCE  # False for NaN sums too
    bad = np.flatnonzero(~normalised)
    if bad.size:
        # Unnormalised amounts would scale every statistic silently.
        raise ValueError(
            f"the fractions of composition {int(bad[0])} sum to {sums[bad[0]]:.10g}, "
            "not 1; build the batch with dvmrl.featurize, which normalises the "
            "amounts, or pass formulas"
        )

    values = _descriptor_matrix()[index]  # [B, K, F0]
    w = weights[:, :, None]
    mean = np.einsum("bk,bkf->bf", weights, values)
    if {"min", "max", "range"} & set(stats):
        low = np.where(mask[:, :, None], values, np.inf).min(axis=1)
        high = np.where(mask[:, :, None], values, -np.inf).max(axis=1)
    columns = []
    for stat in stats:
        if stat == "mean":
            columns.append(mean)
        elif stat == "avg_dev":
            columns.append((w * np.abs(values - mean[:, None, :])).sum(axis=1))
        elif stat == "std":
            variance = (w * (values - mean[:, None, :]) ** 2).sum(axis=1)
            columns.append(np.sqrt(np.maximum(variance, 0.0)))
        elif stat == "min":
            columns.append(low)
        elif stat == "max":
            columns.append(high)
        else:
            columns.append(high - low)
    if stoichiometry:
        columns.append(mask.sum(axis=1, dtype=np.float64)[:, None])
        for p in (2, 3, 5, 10):
            columns.append(((weights**p).sum(axis=1) ** (1.0 / p))[:, None])
    return np.concatenate(columns, axis=1)
