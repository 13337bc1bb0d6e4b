"""Alloy data sets: the vendored DFT sets, users' CSV files and data filters.

Every data frame here has the columns ``formula``, ``chemsys`` (element
symbols joined by '-' in alphabetical order), ``n_elements`` and ``target``
(eV/atom). The vendored sets hold binary and ternary all-metal compositions,
one row per reduced formula; ``dataset_info(name)`` gives their source,
licence and attribution.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from pathlib import Path

import pandas as pd

from dvmrl.datasets._csv import load_csv
from dvmrl.datasets._vendored import (
    COLUMNS,
    DATASETS,
    DEFAULT_DATASET,
    dataset_info,
    list_datasets,
    load,
)
from dvmrl.datasets.filters import (
    DEFAULT_MAX_ELECTRONEGATIVITY_SPREAD,
    DEFAULT_MAX_SIZE_MISMATCH,
    FAMILIES,
    family_subset,
    hume_rothery_metrics,
    hume_rothery_screen,
)

# target_kind -> stability threshold in eV/atom (stable when target <= it).
STABILITY_THRESHOLDS = {"formation_energy": 0.0, "energy_above_hull": 0.025}

__all__ = [
    "COLUMNS",
    "DATASETS",
    "DEFAULT_DATASET",
    "FAMILIES",
    "STABILITY_THRESHOLDS",
    "dataset_info",
    "family_subset",
    "hume_rothery_metrics",
    "hume_rothery_screen",
    "list_datasets",
    "load",
    "load_csv",
    "resolve_data",
    "stated_target_kind",
]


logger = logging.getLogger(__name__)

# Entries of the metadata file of `dvmrl data fetch` that describe its CSV
# file's target and origin.
_FETCH_FIELDS = (
    "source",
    "property",
    "target_kind",
    "stability_threshold",
    "database_version",
    "licence",
    "citations",
    "attribution",
)


def _fetch_metadata(path: Path, warn: bool = True) -> dict | None:
    """Return the metadata that ``dvmrl data fetch`` wrote beside ``path``, if any.

    The file ``<stem>.json`` counts only when its ``csv_sha256`` matches the
    CSV text, so an edited CSV file or an unrelated JSON file is ignored.
    ``warn`` logs a mismatch; the loader does, so an earlier look need not.
    """
    name = path.name
    stem = name[: -len(".csv.gz")] if name.endswith(".csv.gz") else path.stem
    sidecar = path.with_name(f"{stem}.json")
    if not sidecar.is_file():
        return None
    try:
        metadata = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(metadata, dict) or "csv_sha256" not in metadata:
        return None
    raw = path.read_bytes()
    if name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError):
            return None
    if hashlib.sha256(raw).hexdigest() != metadata["csv_sha256"]:
        if warn:
            logger.warning(
                "%s describes another version of %s (its csv_sha256 differs), so "
                "its target kind and attribution are not used",
                sidecar,
                path.name,
            )
        return None
    if metadata.get("target_kind") not in STABILITY_THRESHOLDS:
        return None
    return {key: metadata[key] for key in _FETCH_FIELDS if key in metadata}


def _looks_like_hull_energies(frame: pd.DataFrame) -> bool:
    """Tell whether targets look like energies above the hull, not formation energies.

    Hull energies are never negative and are exactly 0 for every stable
    composition (51 % of mp-energy-above-hull); formation energies of
    alloys are mostly negative.
    """
    target = frame["target"]
    return len(target) > 0 and bool((target >= 0).all()) and (target == 0).mean() >= 0.2


def stated_target_kind(name_or_path: str | os.PathLike) -> str | None:
    """Return the target kind that a data source states itself, or None.

    A vendored data set states its kind, and so does a CSV file of ``dvmrl
    data fetch`` through the ``<stem>.json`` file beside it. Another CSV file
    states none, so the caller's ``target_kind`` describes it.
    """
    text = str(name_or_path)
    if text in DATASETS:
        return dataset_info(text)["target_kind"]
    path = Path(text).expanduser()
    if not path.is_file():
        return None
    fetched = _fetch_metadata(path, warn=False)
    return None if fetched is None else fetched["target_kind"]


def _user_file_info(path: Path, frame: pd.DataFrame, target_kind: str) -> dict:
    return {
        "name": path.name,
        "source": f"user file {path}",
        "path": str(path),
        "units": "eV/atom",
        "target_kind": target_kind,
        "stability_threshold": STABILITY_THRESHOLDS[target_kind],
        "rows": len(frame),
        "binaries": int((frame["n_elements"] == 2).sum()),
        "ternaries": int((frame["n_elements"] == 3).sum()),
        "attribution": "user-supplied data",
    }


def resolve_data(
    name_or_path: str | os.PathLike,
    *,
    formula_column: str = "formula",
    target_column: str = "target",
    target_kind: str = "formation_energy",
    alloy_notation: bool = False,
    hume_rothery: bool = False,
    max_size_mismatch: float = DEFAULT_MAX_SIZE_MISMATCH,
    max_electronegativity_spread: float = DEFAULT_MAX_ELECTRONEGATIVITY_SPREAD,
) -> tuple[pd.DataFrame, dict]:
    """Load a vendored data set by name or a user's CSV file by path.

    This backs the CLI's ``--data`` option. A name in :data:`DATASETS` wins
    over a file of the same name in the working folder.

    Args:
        name_or_path: a vendored data set name or a CSV path.
        formula_column: formula column of a CSV file.
        target_column: target column of a CSV file (eV/atom).
        target_kind: ``formation_energy`` or ``energy_above_hull``; sets the
            stability threshold of a CSV file (vendored sets carry their own,
            and so does a CSV file of ``dvmrl data fetch`` through the
            ``<stem>.json`` file written beside it).
        alloy_notation: read a CSV file's group amounts as at.% shares.
        hume_rothery: apply :func:`hume_rothery_screen` with the two
            thresholds below (off by default).
        max_size_mismatch: size-mismatch threshold of the screen (fraction).
        max_electronegativity_spread: electronegativity-spread threshold.

    Returns:
        (df, info): the data frame and a metadata dict with at least name,
        source, units, target_kind, stability_threshold, rows, attribution
        and ``hume_rothery_screen`` (None when the screen was off, else its
        thresholds and row counts).

    Raises:
        ValueError: when the argument is neither a data set name nor an
            existing file, or the file's content is invalid.
    """
    text = os.fspath(name_or_path)
    if not text.strip():
        raise ValueError(
            f"the data set name is empty: pass one of {', '.join(DATASETS)} or "
            "the path of a CSV file"
        )
    if text in DATASETS:
        frame = load(text)
        info = dataset_info(text)
    else:
        path = Path(text)
        if path.is_dir():
            raise ValueError(
                f"data path {text!r} is a folder; pass a CSV file with formula and "
                f"target columns inside it, or one of the vendored data sets "
                f"{', '.join(DATASETS)}"
            )
        if not path.is_file() and (path.suffix or os.sep in text):
            # It reads as a path, not as a data set name.
            raise ValueError(
                f"data file {text!r} not found: check the path, or pass one of "
                f"the vendored data sets {', '.join(DATASETS)}"
            )
        if not path.is_file():
            raise ValueError(
                f"unknown data set {text!r}: expected one of {', '.join(DATASETS)} "
                "or the path of an existing CSV file"
            )
        if target_kind not in STABILITY_THRESHOLDS:
            raise ValueError(
                f"unknown target kind {target_kind!r}: expected one of "
                f"{list(STABILITY_THRESHOLDS)}"
            )
        frame = load_csv(
            path, formula_column, target_column, alloy_notation=alloy_notation
        )
        fetched = _fetch_metadata(path)
        if fetched is not None:
            # A file from `dvmrl data fetch` states its own target kind.
            target_kind = fetched["target_kind"]
        info = _user_file_info(path, frame, target_kind)
        if fetched is not None:
            info.update(fetched)
        elif target_kind == "energy_above_hull" and (frame["target"] < 0).any():
            logger.warning(
                "%s: %d of %d targets are below 0 eV/atom, but energies above the "
                "convex hull are never negative; if the file contains formation "
                "energies, pass --target-kind formation_energy (in Python, "
                "target_kind='formation_energy')",
                path,
                int((frame["target"] < 0).sum()),
                len(frame),
            )
        elif target_kind == "formation_energy" and _looks_like_hull_energies(frame):
            logger.warning(
                "%s: every target is >= 0 and %d of %d are exactly 0, as energies "
                "above the convex hull are; dvmrl reads a CSV file as formation "
                "energies (stable when <= 0 eV/atom) unless told otherwise, so for "
                "hull energies pass --target-kind energy_above_hull (in Python, "
                "target_kind='energy_above_hull')",
                path,
                int((frame["target"] == 0).sum()),
                len(frame),
            )
    info["hume_rothery_screen"] = None
    if hume_rothery:
        frame = hume_rothery_screen(
            frame, max_size_mismatch, max_electronegativity_spread
        )
        info["hume_rothery_screen"] = dict(frame.attrs["hume_rothery_screen"])
        info["rows"] = len(frame)
        info["binaries"] = int((frame["n_elements"] == 2).sum())
        info["ternaries"] = int((frame["n_elements"] == 3).sum())
    return frame, info
