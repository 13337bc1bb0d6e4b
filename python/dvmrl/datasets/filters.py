"""Data filters: the Hume-Rothery screen and chemical-family subsets.

Hume-Rothery screen: for a composition with atomic fractions c_i and atomic
radii r_i, the atomic-size mismatch is

    delta = sqrt(sum_i c_i (1 - r_i / r_mean)^2),   r_mean = sum_i c_i r_i

and the electronegativity spread is max_i chi_i - min_i chi_i over the
Pauling electronegativities chi_i. A composition passes when
``delta <= max_size_mismatch`` and the spread is ``<= max_electronegativity_spread``.

Radii are pymatgen's ``Element.atomic_radius`` (the empirical "Atomic
radius" of its periodic_table.json, in angstrom). Where that is None,
``Element.atomic_radius_calculated`` (the "Atomic radius calculated" entry)
fills in. Electronegativities are pymatgen's ``Element.X`` (Pauling scale).
A composition with an element that has neither radius, or no Pauling value,
gets NaN metrics and fails the screen, because it cannot be checked. With
pymatgen 2026.10.24 every metal has a Pauling value, and Fr and the
actinides from Cm on have neither radius.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

DEFAULT_MAX_SIZE_MISMATCH = 0.15
DEFAULT_MAX_ELECTRONEGATIVITY_SPREAD = 0.4

FAMILIES = ("transition-metal", "rare-earth", "alkali-alkaline-earth")


@functools.cache
def element_radius(symbol: str) -> float:
    """Return the atomic radius of an element in angstrom, NaN when unknown."""
    from pymatgen.core import Element

    element = Element(symbol)
    radius = element.atomic_radius
    if radius is None:
        with warnings.catch_warnings():
            # pymatgen warns when it has no calculated radius either.
            warnings.simplefilter("ignore", UserWarning)
            radius = element.atomic_radius_calculated
    return math.nan if radius is None else float(radius)


@functools.cache
def element_electronegativity(symbol: str) -> float:
    """Return the Pauling electronegativity of an element, NaN when unknown."""
    from pymatgen.core import Element

    with warnings.catch_warnings():
        # pymatgen warns and returns NaN for elements without a Pauling value.
        warnings.simplefilter("ignore", UserWarning)
        value = Element(symbol).X
    return float(value) if value is not None else math.nan


def composition_metrics(fractions: dict[str, float]) -> tuple[float, float]:
    """Compute the Hume-Rothery metrics of one composition.

    Args:
        fractions: element symbol -> atomic fraction (summing to 1).

    Returns:
        (delta, spread): the atomic-size mismatch (a fraction) and the Pauling
        electronegativity spread; each is NaN when an element lacks the value.
    """
    symbols = list(fractions)
    c = np.array([fractions[symbol] for symbol in symbols], dtype=np.float64)
    c = c / c.sum()
    radii = np.array([element_radius(symbol) for symbol in symbols])
    chi = np.array([element_electronegativity(symbol) for symbol in symbols])
    if np.isnan(radii).any():
        delta = math.nan
    else:
        r_mean = float(np.dot(c, radii))
        delta = float(np.sqrt(np.dot(c, (1.0 - radii / r_mean) ** 2)))
    spread = math.nan if np.isnan(chi).any() else float(chi.max() - chi.min())
    return delta, spread


def hume_rothery_metrics(df: pd.DataFrame) -> pd.DataFrame:
    """Compute the size mismatch and electronegativity spread of every row.

    Args:
        df: a data set frame with a ``formula`` column.

    Returns:
        A DataFrame with df's index and the float64 columns size_mismatch
        (delta, a fraction) and electronegativity_spread (Pauling units).
    """
    from dvmrl.compositions import parse

    values = [composition_metrics(parse(formula)) for formula in df["formula"]]
    metrics = pd.DataFrame(
        values, index=df.index, columns=["size_mismatch", "electronegativity_spread"]
    )
    return metrics.astype(np.float64)


def hume_rothery_passing_rows(
    df: pd.DataFrame,
    max_size_mismatch: float = DEFAULT_MAX_SIZE_MISMATCH,
    max_electronegativity_spread: float = DEFAULT_MAX_ELECTRONEGATIVITY_SPREAD,
) -> tuple[np.ndarray, dict]:
    """Find the rows that pass the Hume-Rothery screen.

    Args:
        df: a data set frame with a ``formula`` column.
        max_size_mismatch: largest atomic-size mismatch delta kept (fraction).
        max_electronegativity_spread: largest Pauling electronegativity spread
            kept.

    Returns:
        (rows, record): the positions (``df.iloc``) of the passing rows,
        int64 and sorted, and a dict of the thresholds and the row counts
        before and after, for reports.

    Raises:
        ValueError: when a threshold is negative or not finite.
    """
    for name, value in (
        ("max_size_mismatch", max_size_mismatch),
        ("max_electronegativity_spread", max_electronegativity_spread),
    ):
        if not (math.isfinite(value) and value >= 0.0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    metrics = hume_rothery_metrics(df)
    # NaN compares False, so rows with an unknown radius or electronegativity fail.
    passes = (metrics["size_mismatch"] <= max_size_mismatch) & (
        metrics["electronegativity_spread"] <= max_electronegativity_spread
    )
    rows = np.flatnonzero(passes.to_numpy()).astype(np.int64)
    record = {
        "max_size_mismatch": float(max_size_mismatch),
        "max_electronegativity_spread": float(max_electronegativity_spread),
        "rows_before": len(df),
        "rows_after": len(rows),
        "rows_unknown_property": int(metrics.isna().any(axis=1).sum()),
    }
    logger.info(
        "Hume-Rothery screen (delta <= %g, electronegativity spread <= %g) kept %d "
        "of %d rows",
        max_size_mismatch,
        max_electronegativity_spread,
        len(rows),
        len(df),
    )
    return rows, record


def hume_rothery_screen(
    df: pd.DataFrame,
    max_size_mismatch: float = DEFAULT_MAX_SIZE_MISMATCH,
    max_electronegativity_spread: float = DEFAULT_MAX_ELECTRONEGATIVITY_SPREAD,
) -> pd.DataFrame:
    """Keep the compositions that pass the Hume-Rothery screen.

    Args:
        df: a data set frame with a ``formula`` column.
        max_size_mismatch: largest atomic-size mismatch delta kept (fraction).
        max_electronegativity_spread: largest Pauling electronegativity spread
            kept.

    Returns:
        The passing rows as a new frame with a RangeIndex. Its
        ``attrs["hume_rothery_screen"]`` records the thresholds and the row
        counts before and after, for reports. :func:`hume_rothery_passing_rows`
        returns the positions of these rows in ``df``.

    Raises:
        ValueError: when a threshold is negative or not finite.
    """
    rows, record = hume_rothery_passing_rows(
        df, max_size_mismatch, max_electronegativity_spread
    )
    screened = df.iloc[rows].reset_index(drop=True)
    screened.attrs["hume_rothery_screen"] = record
    return screened


def _in_family(symbol: str, family: str) -> bool:
    from pymatgen.core import Element

    element = Element(symbol)
    if family == "transition-metal":
        return bool(element.is_transition_metal)
    if family == "rare-earth":
        return bool(element.is_lanthanoid) or symbol in ("Sc", "Y")
    return bool(element.is_alkali or element.is_alkaline)


def family_subset(df: pd.DataFrame, family: str) -> pd.DataFrame:
    """Select the compositions of one chemical family.

    Families, by the element classes of pymatgen ``Element``:

    - ``transition-metal``: every element is a transition metal
      (``is_transition_metal``: groups 3 to 12, which pymatgen takes to
      include La and Ac).
    - ``rare-earth``: at least one lanthanide (La to Lu), Sc or Y.
    - ``alkali-alkaline-earth``: at least one alkali or alkaline-earth metal.

    Args:
        df: a data set frame with a ``chemsys`` column.
        family: one of :data:`FAMILIES`.

    Returns:
        The matching rows as a new frame with a RangeIndex.

    Raises:
        ValueError: when ``family`` is unknown.
    """
    if family not in FAMILIES:
        raise ValueError(
            f"unknown chemical family {family!r}: expected one of {FAMILIES}"
        )
    combine = all if family == "transition-metal" else any
    member = {}

    def matches(chemsys: str) -> bool:
        if chemsys not in member:
            symbols = chemsys.split("-")
            member[chemsys] = combine(_in_family(s, family) for s in symbols)
        return member[chemsys]

    selected = df["chemsys"].map(matches).to_numpy(dtype=bool)
    return df.loc[selected].reset_index(drop=True)
