"""Element table: symbols, vendored descriptors, filling and standardisation."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pymatgen.core import Element

from dvmrl import elements

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "build_element_table.py"
VENDORED_CSV = ROOT / "python" / "dvmrl" / "data" / "element_descriptors.csv"


def _load_script():
    spec = importlib.util.spec_from_file_location("build_element_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_symbols_follow_atomic_number():
    assert len(elements.ELEMENTS) == 103
    for z, symbol in enumerate(elements.ELEMENTS, start=1):
        assert Element.from_Z(z).symbol == symbol


def test_element_index_is_z_minus_one():
    assert elements.element_index("H") == 0
    assert elements.element_index("Fe") == 25
    assert elements.element_index("Lr") == 102


def test_element_index_unknown():
    with pytest.raises(ValueError, match="unknown element symbol 'Xx'"):
        elements.element_index("Xx")


def test_descriptor_table_layout():
    table = elements.descriptor_table()
    assert table.shape == (103, len(elements.descriptor_names()))
    assert list(table.index) == list(elements.ELEMENTS)
    assert list(table.columns) == elements.descriptor_names()


def test_descriptor_table_has_no_nan():
    assert np.isfinite(elements.descriptor_matrix()).all()
    assert not elements.raw_descriptor_table().isna().to_numpy().any()


def test_descriptor_standardised_over_metals():
    matrix = elements.descriptor_matrix()[elements.metal_mask()]
    np.testing.assert_allclose(matrix.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(matrix.std(axis=0), 1.0, rtol=1e-12)


def test_descriptor_matrix_matches_table():
    matrix = elements.descriptor_matrix()
    assert matrix.dtype == np.float64
    np.testing.assert_array_equal(matrix, elements.descriptor_table().to_numpy())


def test_descriptor_matrix_is_a_copy():
    matrix = elements.descriptor_matrix()
    matrix[:] = 0.0
    assert elements.descriptor_matrix()[25].any()


def test_standardization_reproduces_matrix():
    mean, std = elements.standardization()
    raw = elements.raw_descriptor_table().to_numpy()
    np.testing.assert_allclose((raw - mean) / std, elements.descriptor_matrix())


def test_raw_columns_carry_units():
    columns = list(elements.raw_descriptor_table().columns)
    assert columns == elements.raw_descriptor_names()
    for column in (
        "melting_point_K",
        "molar_volume_cm3_per_mol",
        "atomic_radius_angstrom",
    ):
        assert column in columns


@pytest.mark.parametrize(
    ("symbol", "s", "p", "d", "f"),
    [
        ("H", 1, 0, 0, 0),
        ("He", 2, 0, 0, 0),
        ("Ne", 2, 6, 0, 0),  # the core of Ne is He
        ("Al", 2, 1, 0, 0),  # [Ne] 3s2 3p1
        ("Cr", 1, 0, 5, 0),  # [Ar] 3d5 4s1
        ("Fe", 2, 0, 6, 0),  # [Ar] 3d6 4s2
        ("Cu", 1, 0, 10, 0),  # [Ar] 3d10 4s1
        ("Ga", 2, 1, 10, 0),  # [Ar] 3d10 4s2 4p1
        ("Pd", 0, 0, 10, 0),  # [Kr] 4d10
        ("La", 2, 0, 1, 0),  # [Xe] 5d1 6s2
        ("Gd", 2, 0, 1, 7),  # [Xe] 4f7 5d1 6s2
        ("Lu", 2, 0, 1, 14),  # [Xe] 4f14 5d1 6s2
        ("Hg", 2, 0, 10, 14),  # [Xe] 4f14 5d10 6s2
        ("U", 2, 0, 1, 3),  # [Rn] 5f3 6d1 7s2
    ],
)
def test_valence_counts(symbol, s, p, d, f):
    row = elements.raw_descriptor_table().loc[symbol]
    assert row["valence_s"] == s
    assert row["valence_p"] == p
    assert row["valence_d"] == d
    assert row["valence_f"] == f
    assert row["valence_total"] == s + p + d + f


def test_raw_values_from_pymatgen():
    row = elements.raw_descriptor_table().loc["Fe"]
    assert row["atomic_number"] == 26
    assert row["group"] == 8
    assert row["period"] == 4
    assert row["electronegativity_pauling"] == pytest.approx(1.83)
    assert row["melting_point_K"] == pytest.approx(1811.0)
    assert row["is_transition_metal"] == 1
    assert row["is_rare_earth"] == 0


def test_metal_mask_matches_pymatgen():
    expected = [Element.from_Z(z).is_metal for z in range(1, 104)]
    assert elements.metal_mask().tolist() == expected
    assert elements.is_metal("Fe")
    assert not elements.is_metal("O")


# The filled cells of metals, as the module docstring lists them.
FILLED_METAL_CELLS = {
    *((symbol, "atomic_radius") for symbol in "Fr Cm Bk Cf Es Fm Md No Lr".split()),
    *((symbol, "molar_volume") for symbol in "Fr Fm Md No Lr".split()),
    *((symbol, "density") for symbol in "Hg Am Es Fr Fm Md No Lr".split()),
}


def test_filled_cells_of_metals():
    metal_cells = {
        cell for cell in elements.filled_cells() if elements.is_metal(cell[0])
    }
    assert metal_cells == FILLED_METAL_CELLS


def test_density_filled_from_molar_volume():
    raw = elements.raw_descriptor_table()
    expected = (
        1000.0
        * raw.loc["Hg", "atomic_mass_amu"]
        / raw.loc["Hg", "molar_volume_cm3_per_mol"]
    )
    assert raw.loc["Hg", "density_kg_per_m3"] == pytest.approx(expected)


def test_missing_filled_with_metal_median():
    metals = [
        Element.from_Z(z)
        for z in range(1, 104)
        if Element.from_Z(z).is_metal and Element.from_Z(z).atomic_radius is not None
    ]
    median = float(np.median([float(element.atomic_radius) for element in metals]))
    raw = elements.raw_descriptor_table()
    assert raw.loc["Fr", "atomic_radius_angstrom"] == pytest.approx(median)


def test_vendored_table_regenerates(tmp_path):
    metadata = json.loads(VENDORED_CSV.with_suffix(".json").read_text())
    installed = importlib.metadata.version("pymatgen")
    if metadata["pymatgen_version"] != installed:
        pytest.skip(
            f"the table was built with pymatgen {metadata['pymatgen_version']}, "
            f"this environment has {installed}"
        )
    script = _load_script()
    out = tmp_path / "element_descriptors.csv"
    script.write_table(script.build_table(), out)
    assert out.read_text() == VENDORED_CSV.read_text()
    assert json.loads(out.with_suffix(".json").read_text()) == metadata


def test_import_skips_pymatgen():
    code = (
        "import sys\n"
        "from dvmrl import compositions, elements\n"
        "elements.descriptor_table()\n"
        "compositions.parse('Ni3Al', metals_only=True)\n"
        "print('pymatgen' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "False"
