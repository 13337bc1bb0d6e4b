"""Element table: symbols of Z = 1 .. 103 and their physical descriptors.

Row r of every table and matrix here is the element with atomic number r + 1,
so a composition's `element_index` is its atomic numbers minus 1.

The descriptors come from pymatgen's element data (`pymatgen.core.Element`)
and are vendored in `dvmrl/data/element_descriptors.csv`, written by
`scripts/build_element_table.py`; importing this module does not import
pymatgen. The descriptors, with their raw units:

- `atomic_number`, `group` (1 .. 18, 3 for lanthanides and actinides),
  `period`, `mendeleev_number` (pymatgen's `mendeleev_no`)
- `atomic_mass` (amu), `electronegativity` (Pauling), `atomic_radius`
  (angstrom, empirical), `melting_point` (K), `molar_volume` (cm^3/mol),
  `density` (density of the solid, kg/m^3), `first_ionization_energy` (eV),
  `electron_affinity` (eV)
- `valence_s`, `valence_p`, `valence_d`, `valence_f`, `valence_total`:
  electrons outside the noble-gas core per subshell type, counted from the
  full electronic structure. Fe ([Ar] 3d6 4s2) gives 2, 0, 6, 0 and 8, and
  Lu ([Xe] 4f14 5d1 6s2) gives 2, 0, 1, 14 and 17.
- `is_transition_metal`, `is_rare_earth`: 0/1 flags as pymatgen defines them
  (pymatgen counts Sc, Y, the lanthanides and the actinides as rare earths)

Missing values are filled when the table is loaded, in two steps:

1. `density` where pymatgen has none is 1000 * atomic_mass / molar_volume
   (kg/m^3), when the molar volume is known. This fills the metals Hg, Am and
   Es and the non-metals H, N, O, F, Cl, Br, He, Ne, Ar, Kr, Xe and Rn.
2. Every value still missing is the median of that column over the metals
   (pymatgen `Element.is_metal`, 78 of the 103 elements). This fills
   `atomic_radius` of the metals Fr, Cm, Bk, Cf, Es, Fm, Md, No and Lr and of
   He, Ne, Kr, Xe, At and Rn; `molar_volume` and `density` of Fr, Fm, Md, No,
   Lr and At; and `electronegativity` of He, Ne and Ar.

`filled_cells()` lists exactly which (symbol, descriptor) cells were filled.
After filling no value is NaN. `descriptor_table()` then standardises every
column to zero mean and unit variance over the metals (population variance),
so the values of non-metals can lie far outside [-3, 3].
"""

from __future__ import annotations

import functools
from importlib import resources

import numpy as np
import pandas as pd

# Symbols of Z = 1 .. 103, so ELEMENTS[z - 1] has atomic number z.
ELEMENTS: tuple[str, ...] = tuple(
    """
    H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni
    Cu Zn Ga Ge As Se Br Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe
    Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au
    Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am Cm Bk Cf Es Fm Md No Lr
    """.split()
)
N_ELEMENTS = len(ELEMENTS)
ELEMENT_INDEX: dict[str, int] = {symbol: i for i, symbol in enumerate(ELEMENTS)}

# (descriptor name, column name of the raw table with its unit).
_DESCRIPTORS: tuple[tuple[str, str], ...] = (
    ("atomic_number", "atomic_number"),
    ("group", "group"),
    ("period", "period"),
    ("mendeleev_number", "mendeleev_number"),
    ("atomic_mass", "atomic_mass_amu"),
    ("electronegativity", "electronegativity_pauling"),
    ("atomic_radius", "atomic_radius_angstrom"),
    ("melting_point", "melting_point_K"),
    ("molar_volume", "molar_volume_cm3_per_mol"),
    ("density", "density_kg_per_m3"),
    ("first_ionization_energy", "first_ionization_energy_eV"),
    ("electron_affinity", "electron_affinity_eV"),
    ("valence_s", "valence_s"),
    ("valence_p", "valence_p"),
    ("valence_d", "valence_d"),
    ("valence_f", "valence_f"),
    ("valence_total", "valence_total"),
    ("is_transition_metal", "is_transition_metal"),
    ("is_rare_earth", "is_rare_earth"),
)
_RAW_COLUMNS = tuple(raw for _, raw in _DESCRIPTORS)
_CSV_NAME = "element_descriptors.csv"


def descriptor_names() -> list[str]:
    """Return the descriptor names, the columns of `descriptor_table()`."""
    return [name for name, _ in _DESCRIPTORS]


def raw_descriptor_names() -> list[str]:
    """Return the raw column names with units, the columns of the raw table."""
    return list(_RAW_COLUMNS)


@functools.cache
def _vendored_table() -> pd.DataFrame:
    with resources.files("dvmrl").joinpath("data", _CSV_NAME).open("r") as handle:
        table = pd.read_csv(handle, index_col="symbol")
    if tuple(table.index) != ELEMENTS:
        raise RuntimeError(
            f"{_CSV_NAME} does not list the elements Z = 1 .. {N_ELEMENTS} in "
            "order; regenerate it with scripts/build_element_table.py"
        )
    missing = [column for column in ("is_metal", *_RAW_COLUMNS) if column not in table]
    if missing:
        raise RuntimeError(
            f"{_CSV_NAME} lacks the columns {missing}; regenerate it with "
            "scripts/build_element_table.py"
        )
    return table


@functools.cache
def _metal_mask() -> np.ndarray:
    mask = _vendored_table()["is_metal"].to_numpy(dtype=bool)
    mask.setflags(write=False)
    return mask


def metal_mask() -> np.ndarray:
    """Return a bool array [103], true where pymatgen calls the element a metal."""
    return _metal_mask().copy()


@functools.cache
def _metal_symbols() -> frozenset[str]:
    return frozenset(np.asarray(ELEMENTS)[_metal_mask()].tolist())


def is_metal(symbol: str) -> bool:
    """Return whether pymatgen's `Element.is_metal` is true for the symbol."""
    if symbol not in ELEMENT_INDEX:
        raise ValueError(
            f"unknown element symbol {symbol!r}; expected one of H .. Lr (Z 1 .. 103)"
        )
    return symbol in _metal_symbols()


@functools.cache
def _filled_raw_table() -> tuple[pd.DataFrame, tuple[tuple[str, str], ...]]:
    raw = _vendored_table()[list(_RAW_COLUMNS)].astype(np.float64)
    originally_missing = raw.isna()

    density = "density_kg_per_m3"
    from_volume = 1000.0 * raw["atomic_mass_amu"] / raw["molar_volume_cm3_per_mol"]
    raw[density] = raw[density].fillna(from_volume)

    metals = _metal_mask()
    medians = raw[metals].median(axis=0, skipna=True)
    raw = raw.fillna(medians)
    if raw.isna().to_numpy().any():
        raise RuntimeError(f"{_CSV_NAME} has a column with no value for any metal")

    raw_to_name = {raw_name: name for name, raw_name in _DESCRIPTORS}
    cells = tuple(
        (symbol, raw_to_name[column])
        for column in _RAW_COLUMNS
        for symbol in raw.index[originally_missing[column].to_numpy()]
    )
    return raw, cells


def raw_descriptor_table() -> pd.DataFrame:
    """Return the unstandardised descriptors with missing values filled.

    Returns:
        DataFrame [103, F0] indexed by symbol in atomic-number order, one
        float64 column per descriptor, named with its unit (for example
        `melting_point_K`).
    """
    return _filled_raw_table()[0].copy()


def filled_cells() -> list[tuple[str, str]]:
    """Return the (symbol, descriptor) cells that pymatgen has no value for.

    These are the cells filled by the rules in the module docstring.
    """
    return list(_filled_raw_table()[1])


@functools.cache
def _standardization() -> tuple[np.ndarray, np.ndarray]:
    raw = _filled_raw_table()[0].to_numpy(dtype=np.float64)
    metals = raw[_metal_mask()]
    mean = metals.mean(axis=0)
    std = metals.std(axis=0)
    if np.any(std == 0.0):
        constant = [_DESCRIPTORS[i][0] for i in np.flatnonzero(std == 0.0)]
        raise RuntimeError(f"the descriptors {constant} are constant over the metals")
    mean.setflags(write=False)
    std.setflags(write=False)
    return mean, std


def standardization() -> tuple[np.ndarray, np.ndarray]:
    """Return the metal mean and standard deviation of each raw column.

    Returns:
        (mean, std), float64 arrays [F0] in raw units, so that
        `descriptor_table() == (raw_descriptor_table() - mean) / std`.
    """
    mean, std = _standardization()
    return mean.copy(), std.copy()


@functools.cache
def _descriptor_matrix() -> np.ndarray:
    mean, std = _standardization()
    raw = _filled_raw_table()[0].to_numpy(dtype=np.float64)
    matrix = (raw - mean) / std
    matrix.setflags(write=False)
    return matrix


def descriptor_matrix() -> np.ndarray:
    """Return the standardised descriptors as a float64 array [103, F0].

    Row Z - 1 is the element with atomic number Z and the columns follow
    `descriptor_names()`. The array is a fresh copy on every call.
    """
    return _descriptor_matrix().copy()


def descriptor_table() -> pd.DataFrame:
    """Return the standardised descriptors as a DataFrame indexed by symbol.

    Each column has zero mean and unit variance over the metals. The columns
    follow `descriptor_names()`.
    """
    return pd.DataFrame(
        descriptor_matrix(),
        index=pd.Index(ELEMENTS, name="symbol"),
        columns=descriptor_names(),
    )


def element_index(symbol: str) -> int:
    """Return the table row of an element symbol, its atomic number minus 1."""
    try:
        return ELEMENT_INDEX[symbol]
    except KeyError:
        raise ValueError(
            f"unknown element symbol {symbol!r}; expected one of H .. Lr (Z 1 .. 103)"
        ) from None
