"""Regenerate python/dvmrl/data/element_descriptors.csv from pymatgen.

The CSV contains the raw (unstandardised, unfilled) element descriptors for
Z = 1 .. 103 so that dvmrl does not import pymatgen's element data at run time
and its results do not drift with the installed pymatgen version. Missing
values are written as empty cells; dvmrl.elements fills them when it loads
the table. A sidecar JSON records the pymatgen version that produced the table.

Usage:
    python scripts/build_element_table.py [--out PATH]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import pandas as pd

DEFAULT_OUT = (
    Path(__file__).resolve().parents[1]
    / "python"
    / "dvmrl"
    / "data"
    / "element_descriptors.csv"
)
NOBLE_GAS_Z = (2, 10, 18, 36, 54, 86)
MAX_Z = 103

# Column order of the CSV after `symbol` and `is_metal`; dvmrl.elements reads
# the same names.
RAW_COLUMNS = (
    "atomic_number",
    "group",
    "period",
    "mendeleev_number",
    "atomic_mass_amu",
    "electronegativity_pauling",
    "atomic_radius_angstrom",
    "melting_point_K",
    "molar_volume_cm3_per_mol",
    "density_kg_per_m3",
    "first_ionization_energy_eV",
    "electron_affinity_eV",
    "valence_s",
    "valence_p",
    "valence_d",
    "valence_f",
    "valence_total",
    "is_transition_metal",
    "is_rare_earth",
)


def _float_or_nan(value) -> float:
    if value is None:
        return math.nan
    number = float(value)
    return number if math.isfinite(number) else math.nan


def valence_counts(element) -> dict[str, int]:
    """Count the electrons outside the noble-gas core per subshell type.

    The core is the configuration of the largest noble gas with a smaller
    atomic number (none for H and He). Counting from
    `Element.full_electronic_structure` avoids `Element.valence`, which raises
    ValueError for Cr, Nb, Mo, Ru, Rh, Ce, Gd, Pt, Pa, U, Np and Cm in
    pymatgen 2026.10.24. Fe ([Ar] 3d6 4s2) gives s=2, p=0, d=6, f=0.
    """
    from pymatgen.core import Element

    core_z = max((z for z in NOBLE_GAS_Z if z < element.Z), default=0)
    shells = Counter()
    for n, orbital, count in element.full_electronic_structure:
        shells[(n, orbital)] += count
    if core_z:
        for n, orbital, count in Element.from_Z(core_z).full_electronic_structure:
            shells[(n, orbital)] -= count
    by_type = {orbital: 0 for orbital in "spdf"}
    for (_, orbital), count in shells.items():
        if count < 0:
            raise RuntimeError(
                f"{element.symbol}: the electronic structure lacks part of the "
                f"noble-gas core (Z={core_z})"
            )
        by_type[orbital] += count
    return by_type


def element_row(z: int) -> dict[str, object]:
    """Collect the raw descriptors of the element with atomic number z."""
    from pymatgen.core import Element

    element = Element.from_Z(z)
    valence = valence_counts(element)
    row = {
        "symbol": element.symbol,
        "is_metal": int(bool(element.is_metal)),
        "atomic_number": element.Z,
        "group": element.group,
        "period": element.row,
        "mendeleev_number": _float_or_nan(element.mendeleev_no),
        "atomic_mass_amu": _float_or_nan(element.atomic_mass),
        "electronegativity_pauling": _float_or_nan(element.X),
        "atomic_radius_angstrom": _float_or_nan(element.atomic_radius),
        "melting_point_K": _float_or_nan(element.melting_point),
        "molar_volume_cm3_per_mol": _float_or_nan(element.molar_volume),
        "density_kg_per_m3": _float_or_nan(element.density_of_solid),
        "first_ionization_energy_eV": _float_or_nan(element.ionization_energy),
        "electron_affinity_eV": _float_or_nan(element.electron_affinity),
        "valence_s": valence["s"],
        "valence_p": valence["p"],
        "valence_d": valence["d"],
        "valence_f": valence["f"],
        "valence_total": sum(valence.values()),
        "is_transition_metal": int(bool(element.is_transition_metal)),
        "is_rare_earth": int(bool(element.is_rare_earth)),
    }
    return row


def build_table() -> pd.DataFrame:
    """Build the raw descriptor table for Z = 1 .. 103, one row per element."""
    with warnings.catch_warnings():
        # pymatgen warns for every property it has no value for (noble-gas
        # electronegativities and the like); those become empty cells.
        warnings.simplefilter("ignore")
        rows = [element_row(z) for z in range(1, MAX_Z + 1)]
    return pd.DataFrame(rows, columns=["symbol", "is_metal", *RAW_COLUMNS])


def write_table(table: pd.DataFrame, out: Path) -> None:
    """Write the table and its sidecar JSON atomically next to each other."""
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "source": "pymatgen.core.Element",
        "pymatgen_version": importlib.metadata.version("pymatgen"),
        "rows": len(table),
        "missing_cells": int(table[list(RAW_COLUMNS)].isna().sum().sum()),
        "generator": "scripts/build_element_table.py",
    }
    for path, text in (
        (out, table.to_csv(index=False, lineterminator="\n")),
        (out.with_suffix(".json"), json.dumps(metadata, indent=2) + "\n"),
    ):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="CSV path to write"
    )
    args = parser.parse_args(argv)
    table = build_table()
    write_table(table, args.out)
    print(f"wrote {len(table)} elements to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
