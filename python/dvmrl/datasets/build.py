"""Derive the vendored alloy data sets from the raw DFT files.

Each raw file is a CSV with the columns ``formula`` and ``target``
(eV/atom). A vendored data set keeps the binary and ternary compositions
whose elements are all metals (pymatgen ``Element.is_metal``). It drops rows
whose target is physically implausible (``|target| > MAX_ABS_TARGET``). Of
the rest it keeps one row per pymatgen reduced formula, with the minimum
target over its polymorphs (the lowest-energy structure).

The output CSV is gzip-compressed with a zero timestamp and written with
rows in a fixed order, so rebuilding from the same raw files gives the same
bytes. ``scripts/build_datasets.py`` is the command-line front end.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dvmrl._files import write_bytes_atomic

logger = logging.getLogger(__name__)

# The MP raw files stay below 5 eV/atom in absolute value. The OQMD file
# contains four metallic ternaries at 6.6 to 14.4 eV/atom, far above every other
# metallic value in the raw files (at most 4.8 eV/atom), so the rule treats them
# as failed calculations.
MAX_ABS_TARGET = 5.0
IMPLAUSIBILITY_RULE = "|target| > 5.0 eV/atom"
ALLOWED_ELEMENT_COUNTS = (2, 3)
COLUMNS = ["formula", "chemsys", "n_elements", "target"]

# Drop reasons, in the order the filters run. Each raw row is counted once,
# under the first filter that removes it.
DROP_REASONS = (
    "unparsable_formula",
    "missing_target",
    "not_binary_or_ternary",
    "contains_non_metal",
    "implausible_target",
    "higher_energy_polymorph",
)

_CC_BY_LICENCE = "CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/)"
_MP_CITATION = "A. Jain et al., APL Materials 1, 011002 (2013)"
_MATBENCH_CITATION = "A. Dunn et al., npj Comput. Mater. 6, 138 (2020)"
_OQMD_CITATIONS = [
    "J. E. Saal et al., JOM 65, 1501 (2013)",
    "S. Kirklin et al., npj Comput. Mater. 1, 15010 (2015)",
]
_CRABNET = (
    "Raw files copied from the CrabNet repository (github.com/anthony-wang/CrabNet, "
    "commit 457b4d4), which redistributes them under the MIT licence."
)


@dataclass(frozen=True)
class DatasetRecipe:
    """Raw inputs and provenance text of one vendored data set."""

    name: str
    raw_files: tuple[str, ...]
    description: str
    target_description: str
    target_kind: str
    stability_threshold: float
    source: str
    licence: str
    citations: tuple[str, ...]
    attribution: str
    extra: dict = field(default_factory=dict)


RECIPES: dict[str, DatasetRecipe] = {
    "mp-formation-energy": DatasetRecipe(
        name="mp-formation-energy",
        raw_files=("mp_e_form.csv",),
        description=(
            "DFT formation energy per atom of binary and ternary all-metal "
            "compositions from the Materials Project (Matbench v0.1 task "
            "matbench_mp_e_form), lowest-energy polymorph per formula."
        ),
        target_description="formation energy per atom",
        target_kind="formation_energy",
        stability_threshold=0.0,
        source="Materials Project via Matbench v0.1 (matbench_mp_e_form)",
        licence=_CC_BY_LICENCE,
        citations=(_MP_CITATION, _MATBENCH_CITATION),
        attribution=(
            "Derived from Materials Project data, released under CC BY 4.0; cite "
            f"{_MP_CITATION}. Selected through the Matbench v0.1 task "
            f"matbench_mp_e_form; cite {_MATBENCH_CITATION}. {_CRABNET}"
        ),
    ),
    "mp-energy-above-hull": DatasetRecipe(
        name="mp-energy-above-hull",
        raw_files=("mp_e_hull_train.csv", "mp_e_hull_val.csv"),
        description=(
            "DFT energy above the convex hull of binary and ternary all-metal "
            "compositions from the Materials Project (training and validation "
            "parts of a published 70/15/15 split, merged), lowest value per "
            "formula."
        ),
        target_description="energy above the convex hull per atom",
        target_kind="energy_above_hull",
        stability_threshold=0.025,
        source="Materials Project (energy above hull benchmark files)",
        licence=_CC_BY_LICENCE,
        citations=(_MP_CITATION,),
        attribution=(
            "Derived from Materials Project data, released under CC BY 4.0; cite "
            f"{_MP_CITATION}. {_CRABNET}"
        ),
    ),
    "oqmd-formation-energy": DatasetRecipe(
        name="oqmd-formation-energy",
        raw_files=("oqmd_formation_enthalpy_part1.csv",),
        description=(
            "DFT formation enthalpy per atom of binary and ternary all-metal "
            "compositions from the Open Quantum Materials Database (one 15 % "
            "part of a published 70/15/15 split), lowest value per formula."
        ),
        target_description="formation enthalpy per atom",
        target_kind="formation_energy",
        stability_threshold=0.0,
        source="Open Quantum Materials Database (OQMD)",
        licence=_CC_BY_LICENCE,
        citations=tuple(_OQMD_CITATIONS),
        attribution=(
            "Derived from OQMD data, released under CC BY 4.0; cite "
            f"{_OQMD_CITATIONS[0]} and {_OQMD_CITATIONS[1]}. {_CRABNET}"
        ),
    ),
}


@dataclass
class ReducedData:
    """Rows kept by :func:`reduce_compositions` and the count dropped per reason."""

    frame: pd.DataFrame
    dropped: dict[str, int]
    input_rows: int


def sha256_file(path: str | os.PathLike) -> str:
    """Return the hex SHA-256 digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_raw_csv(path: str | os.PathLike) -> pd.DataFrame:
    """Read a raw ``formula,target`` file with formulas kept as text.

    Pandas would read the formula "NaN" (sodium nitride) as a missing value,
    so only empty cells count as missing here.
    """
    frame = pd.read_csv(
        path, dtype={"formula": str}, keep_default_na=False, na_values={"target": [""]}
    )
    missing = {"formula", "target"} - set(frame.columns)
    if missing:
        raise ValueError(
            f"raw file {path} lacks the column(s) {sorted(missing)}: expected the "
            "columns formula,target"
        )
    frame["target"] = pd.to_numeric(frame["target"], errors="coerce")
    return frame[["formula", "target"]]


def _parse_symbols(text: str):
    """Return (Composition, sorted symbols) of a formula, or None if invalid."""
    from pymatgen.core import Composition, Element

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            composition = Composition(text)
            elements = composition.elements
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    # pymatgen reads unknown symbols such as "Xx" as dummy species; reject them.
    if not elements or not all(isinstance(e, Element) for e in elements):
        return None
    if composition.num_atoms <= 0:
        return None
    return composition, sorted(element.symbol for element in elements)


@functools.cache
def _is_metal(symbol: str) -> bool:
    from pymatgen.core import Element

    return bool(Element(symbol).is_metal)


def reduce_compositions(
    formulas: Sequence[str],
    targets: Sequence[float],
    *,
    max_abs_target: float = MAX_ABS_TARGET,
) -> ReducedData:
    """Select binary and ternary all-metal compositions, one row per formula.

    Args:
        formulas: formula strings as pymatgen ``Composition`` reads them.
        targets: target values in eV/atom, one per formula.
        max_abs_target: rows with ``|target|`` above this (eV/atom) are dropped.

    Returns:
        The kept rows (columns formula, chemsys, n_elements, target), sorted by
        chemsys and formula, and the count of rows dropped for each reason in
        :data:`DROP_REASONS`.
    """
    if len(formulas) != len(targets):
        raise ValueError(
            f"got {len(formulas)} formulas but {len(targets)} targets: pass one "
            "target per formula"
        )
    dropped = dict.fromkeys(DROP_REASONS, 0)
    kept = []
    for text, target in zip(formulas, targets, strict=True):
        parsed = _parse_symbols(text.strip()) if isinstance(text, str) else None
        if parsed is None:
            dropped["unparsable_formula"] += 1
            continue
        target = float(target)
        if not np.isfinite(target):
            dropped["missing_target"] += 1
            continue
        composition, symbols = parsed
        if len(symbols) not in ALLOWED_ELEMENT_COUNTS:
            dropped["not_binary_or_ternary"] += 1
            continue
        if not all(_is_metal(symbol) for symbol in symbols):
            dropped["contains_non_metal"] += 1
            continue
        if abs(target) > max_abs_target:
            dropped["implausible_target"] += 1
            continue
        # The reduced formula is the slow step, so it runs only on kept rows.
        reduced = composition.reduced_formula
        kept.append((reduced, "-".join(symbols), len(symbols), target))

    frame = pd.DataFrame(kept, columns=COLUMNS)
    before = len(frame)
    # Lowest target per formula: sort by target and keep the first row of each
    # formula, so ties resolve the same way on every run.
    frame = frame.sort_values(["formula", "target"], kind="mergesort")
    frame = frame.drop_duplicates("formula", keep="first")
    dropped["higher_energy_polymorph"] = before - len(frame)
    frame = frame.sort_values(["chemsys", "formula"], kind="mergesort")
    frame = frame.reset_index(drop=True)
    frame["n_elements"] = frame["n_elements"].astype(np.int64)
    frame["target"] = frame["target"].astype(np.float64)
    return ReducedData(frame=frame, dropped=dropped, input_rows=len(formulas))


def csv_bytes(frame: pd.DataFrame) -> bytes:
    """Serialise a data frame to CSV text with shortest round-trip floats."""
    return frame[COLUMNS].to_csv(index=False, lineterminator="\n").encode("utf-8")


def gzip_bytes(data: bytes) -> bytes:
    """Compress bytes with gzip, storing no file name and a zero timestamp."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0) as handle:
        handle.write(data)
    return buffer.getvalue()


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to ``path`` atomically, readable by everyone (mode 0o644)."""
    write_bytes_atomic(path, data, mode=0o644)


def build_dataset(name: str, raw_dir: str | os.PathLike) -> tuple[pd.DataFrame, dict]:
    """Build one vendored data set from the raw files in ``raw_dir``.

    Returns:
        The data frame and its metadata dict (provenance, counts, checksums).

    Raises:
        ValueError: when ``name`` is not a known data set.
        FileNotFoundError: when a raw file is missing from ``raw_dir``.
    """
    if name not in RECIPES:
        raise ValueError(
            f"unknown data set {name!r}: expected one of {sorted(RECIPES)}"
        )
    recipe = RECIPES[name]
    raw_dir = Path(raw_dir)
    frames = []
    raw_info = []
    for filename in recipe.raw_files:
        path = raw_dir / filename
        if not path.is_file():
            raise FileNotFoundError(
                f"raw file {path} not found: pass --raw-dir with the folder that "
                f"contains {', '.join(recipe.raw_files)}"
            )
        raw = read_raw_csv(path)
        frames.append(raw)
        raw_info.append(
            {"file": filename, "rows": len(raw), "sha256": sha256_file(path)}
        )
    raw = pd.concat(frames, ignore_index=True)
    reduced = reduce_compositions(raw["formula"].tolist(), raw["target"].to_numpy())
    frame = reduced.frame
    csv = csv_bytes(frame)
    target = frame["target"]
    metadata = {
        "name": recipe.name,
        "description": recipe.description,
        "target": recipe.target_description,
        "target_kind": recipe.target_kind,
        "units": "eV/atom",
        "stability_threshold": recipe.stability_threshold,
        "stability_rule": "a composition is stable when target <= stability_threshold",
        "columns": {
            "formula": "pymatgen reduced formula",
            "chemsys": "element symbols joined by '-' in alphabetical order",
            "n_elements": "number of elements (2 or 3)",
            "target": f"{recipe.target_description} in eV/atom",
        },
        "rows": len(frame),
        "binaries": int((frame["n_elements"] == 2).sum()),
        "ternaries": int((frame["n_elements"] == 3).sum()),
        "target_min": float(target.min()),
        "target_max": float(target.max()),
        "selection": (
            "binary and ternary compositions whose elements are all metals "
            "(pymatgen Element.is_metal); one row per pymatgen reduced formula "
            "with the minimum target over polymorphs"
        ),
        "implausibility_rule": IMPLAUSIBILITY_RULE,
        "input_rows": reduced.input_rows,
        "rows_dropped": reduced.dropped,
        "source": recipe.source,
        "licence": recipe.licence,
        "citations": list(recipe.citations),
        "attribution": recipe.attribution,
        "raw_files": raw_info,
        "csv_sha256": hashlib.sha256(csv).hexdigest(),
        "build_script": "scripts/build_datasets.py",
        **recipe.extra,
    }
    return frame, metadata


def write_dataset(
    frame: pd.DataFrame, metadata: dict, out_dir: str | os.PathLike
) -> dict:
    """Write ``<name>.csv.gz`` and ``<name>.json`` into ``out_dir`` atomically.

    Returns:
        The metadata as written: the input plus ``file`` and ``file_sha256``,
        the checksum of the compressed file. ``csv_sha256`` covers the
        uncompressed text, which does not depend on the zlib version.
    """
    out_dir = Path(out_dir)
    name = metadata["name"]
    compressed = gzip_bytes(csv_bytes(frame))
    csv_path = out_dir / f"{name}.csv.gz"
    json_path = out_dir / f"{name}.json"
    metadata = {**metadata, "file": csv_path.name}
    metadata["file_sha256"] = hashlib.sha256(compressed).hexdigest()
    text = json.dumps(metadata, indent=2, sort_keys=False) + "\n"
    write_atomic(csv_path, compressed)
    write_atomic(json_path, text.encode("utf-8"))
    return metadata


def build_all(
    raw_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    names: Sequence[str] | None = None,
) -> dict[str, dict]:
    """Build and write every named data set (all of them by default).

    Returns:
        The metadata of each data set written, keyed by name.
    """
    written = {}
    for name in names or list(RECIPES):
        frame, metadata = build_dataset(name, raw_dir)
        written[name] = write_dataset(frame, metadata, out_dir)
        logger.info(
            "wrote %s: %d rows, dropped %s", name, len(frame), metadata["rows_dropped"]
        )
    return written
