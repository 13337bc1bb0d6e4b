"""The alloy data sets shipped with dvmrl, read from ``datasets/data/``."""

from __future__ import annotations

import copy
import functools
import json
from importlib import resources

import numpy as np
import pandas as pd

DATASETS = ("mp-formation-energy", "mp-energy-above-hull", "oqmd-formation-energy")
DEFAULT_DATASET = "mp-formation-energy"
COLUMNS = ["formula", "chemsys", "n_elements", "target"]
# Extra column of a user's data with repeated compositions: the composition
# written in one canonical form, which the splits group rows by.
COMPOSITION_COLUMN = "composition"


def list_datasets() -> list[str]:
    """Return the names of the vendored data sets, the default first."""
    return list(DATASETS)


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(
            f"unknown data set {name!r}: expected one of {', '.join(DATASETS)} "
            "(see `dvmrl data list`), or pass a CSV path where a path is accepted"
        )


def _data_file(filename: str):
    return resources.files("dvmrl.datasets").joinpath("data", filename)


@functools.cache
def _read_info(name: str) -> dict:
    with _data_file(f"{name}.json").open("r", encoding="utf-8") as handle:
        return json.load(handle)


@functools.cache
def _read_frame(name: str) -> pd.DataFrame:
    with _data_file(f"{name}.csv.gz").open("rb") as handle:
        frame = pd.read_csv(
            handle,
            compression="gzip",
            dtype={"formula": str, "chemsys": str, "n_elements": np.int64},
            keep_default_na=False,
        )
    frame["target"] = frame["target"].astype(np.float64)
    return frame[COLUMNS]


def load(name: str = DEFAULT_DATASET) -> pd.DataFrame:
    """Load a vendored data set.

    Args:
        name: one of :data:`DATASETS`.

    Returns:
        A new DataFrame with the columns formula (pymatgen reduced formula),
        chemsys (symbols joined by '-' in alphabetical order), n_elements
        (int64) and target (float64, eV/atom), with a RangeIndex.

    Raises:
        ValueError: when ``name`` is not a vendored data set.
    """
    _check_name(name)
    return _read_frame(name).copy()


def dataset_info(name: str = DEFAULT_DATASET) -> dict:
    """Return the metadata of a vendored data set as a new dict.

    The keys include source, licence, citations, attribution, rows,
    binaries, ternaries, units ("eV/atom"), target_kind ("formation_energy"
    or "energy_above_hull") and stability_threshold in eV/atom. A composition
    is stable when its target is at or below that threshold. rows_dropped
    counts the removed raw rows per reason, and raw_files and csv_sha256 give
    the SHA-256 checksums of the inputs and of the CSV text.

    Raises:
        ValueError: when ``name`` is not a vendored data set.
    """
    _check_name(name)
    return copy.deepcopy(_read_info(name))
