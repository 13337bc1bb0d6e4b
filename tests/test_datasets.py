"""Vendored data sets, their rebuild from the raw files, CSV loading and filters."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dvmrl import datasets
from dvmrl.cli import main
from dvmrl.datasets import build
from dvmrl.datasets._csv import read_text_table
from dvmrl.datasets.filters import hume_rothery_passing_rows

ROOT = Path(__file__).resolve().parent.parent
RAW_DIR = Path(os.environ.get("DVMRL_RAW_DATA", ROOT.parent / "shared" / "data"))
DATA_DIR = ROOT / "python" / "dvmrl" / "datasets" / "data"
requires_raw = pytest.mark.skipif(
    not RAW_DIR.is_dir(), reason=f"raw data folder {RAW_DIR} not present"
)


# ---------------------------------------------------------------------------
# Rebuild from the raw files


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    """Rebuild every data set from the raw files into a temporary folder."""
    if not RAW_DIR.is_dir():
        pytest.skip(f"raw data folder {RAW_DIR} not present")
    out = tmp_path_factory.mktemp("rebuilt")
    return out, build.build_all(RAW_DIR, out)


@requires_raw
@pytest.mark.parametrize("name", datasets.DATASETS)
def test_rebuild_matches_vendored(rebuilt, name):
    out, written = rebuilt
    info = datasets.dataset_info(name)
    rebuilt_frame = pd.read_csv(out / f"{name}.csv.gz", keep_default_na=False)
    assert len(rebuilt_frame) == info["rows"]
    assert written[name]["csv_sha256"] == info["csv_sha256"]
    with gzip.open(out / f"{name}.csv.gz", "rb") as handle:
        assert hashlib.sha256(handle.read()).hexdigest() == info["csv_sha256"]
    assert written[name]["raw_files"] == info["raw_files"]
    assert written[name]["rows_dropped"] == info["rows_dropped"]
    pd.testing.assert_frame_equal(rebuilt_frame, datasets.load(name))


@requires_raw
@pytest.mark.parametrize("name", datasets.DATASETS)
def test_rebuild_bytes_reproducible(rebuilt, name):
    # Same zlib, same bytes: the gzip header contains no name and a zero mtime.
    out, _ = rebuilt
    assert (out / f"{name}.csv.gz").read_bytes() == (
        DATA_DIR / f"{name}.csv.gz"
    ).read_bytes()


@requires_raw
def test_raw_checksums_match():
    for name in datasets.DATASETS:
        for raw in datasets.dataset_info(name)["raw_files"]:
            assert build.sha256_file(RAW_DIR / raw["file"]) == raw["sha256"], raw[
                "file"
            ]


def test_vendored_file_checksum():
    for name in datasets.DATASETS:
        info = datasets.dataset_info(name)
        data = (DATA_DIR / info["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == info["file_sha256"], name
        assert hashlib.sha256(gzip.decompress(data)).hexdigest() == info["csv_sha256"]


def test_implausible_rule_counts():
    formulas = [
        "TbU2V",
        "La2NiTh",
        "AlNi",
        "NiAl",
        "Fe2O3",
        "Fe",
        "CoCrFeNi",
        "Xx2",
        "CuZn",
    ]
    targets = [6.6, -5.5, -0.3, -0.5, -1.0, 0.0, 0.1, 0.2, math.nan]
    reduced = build.reduce_compositions(formulas, targets)
    assert reduced.dropped == {
        "unparsable_formula": 1,
        "missing_target": 1,
        "not_binary_or_ternary": 2,
        "contains_non_metal": 1,
        "implausible_target": 2,
        "higher_energy_polymorph": 1,
    }
    assert reduced.frame["formula"].tolist() == ["AlNi"]
    assert reduced.frame["target"].tolist() == [-0.5]


def test_reduce_keeps_boundary_target():
    reduced = build.reduce_compositions(["AlNi", "CuZn"], [-5.0, 5.0])
    assert len(reduced.frame) == 2


def test_reduce_columns():
    reduced = build.reduce_compositions(["Ni3Al", "AlNi2Ti"], [-0.4, -0.5])
    frame = reduced.frame
    assert frame["formula"].tolist() == ["AlNi3", "TiAlNi2"]
    assert frame["chemsys"].tolist() == ["Al-Ni", "Al-Ni-Ti"]
    assert frame["n_elements"].tolist() == [2, 3]


def test_raw_reader_keeps_nan_formula(tmp_path):
    path = tmp_path / "raw.csv"
    path.write_text("formula,target\nNaN,0.1\nAlNi,\n")
    raw = build.read_raw_csv(path)
    assert raw["formula"].tolist() == ["NaN", "AlNi"]
    assert np.isnan(raw["target"].iloc[1])


def test_build_unknown_name():
    with pytest.raises(ValueError, match="unknown data set 'mp-bandgap'"):
        build.build_dataset("mp-bandgap", RAW_DIR)


def test_build_missing_raw_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="mp_e_form.csv not found"):
        build.build_dataset("mp-formation-energy", tmp_path)


# ---------------------------------------------------------------------------
# Vendored sets


def test_list_datasets():
    assert datasets.list_datasets() == [
        "mp-formation-energy",
        "mp-energy-above-hull",
        "oqmd-formation-energy",
    ]
    assert datasets.DEFAULT_DATASET == "mp-formation-energy"


@pytest.mark.parametrize("name", datasets.DATASETS)
def test_load_columns_and_dtypes(name):
    frame = datasets.load(name)
    info = datasets.dataset_info(name)
    assert list(frame.columns) == ["formula", "chemsys", "n_elements", "target"]
    assert frame["n_elements"].dtype == np.int64
    assert frame["target"].dtype == np.float64
    assert len(frame) == info["rows"]
    assert set(frame["n_elements"]) == {2, 3}
    assert frame["formula"].is_unique
    assert frame["target"].abs().max() <= build.MAX_ABS_TARGET
    assert (frame["n_elements"] == 2).sum() == info["binaries"]


def test_load_formulas_are_reduced():
    from pymatgen.core import Composition

    frame = datasets.load("mp-formation-energy").sample(200, random_state=0)
    for formula, chemsys in zip(frame["formula"], frame["chemsys"], strict=True):
        composition = Composition(formula)
        assert composition.reduced_formula == formula
        assert composition.chemical_system == chemsys
        assert all(element.is_metal for element in composition.elements)


def test_load_returns_copy():
    frame = datasets.load("mp-formation-energy")
    frame.loc[0, "target"] = 99.0
    assert datasets.load("mp-formation-energy").loc[0, "target"] != 99.0


def test_row_counts():
    counts = {name: datasets.dataset_info(name)["rows"] for name in datasets.DATASETS}
    assert counts == {
        "mp-formation-energy": 18400,
        "mp-energy-above-hull": 9591,
        "oqmd-formation-energy": 29125,
    }
    assert (
        datasets.dataset_info("oqmd-formation-energy")["rows_dropped"][
            "implausible_target"
        ]
        == 4
    )


def test_info_thresholds():
    assert (
        datasets.dataset_info("mp-formation-energy")["target_kind"]
        == "formation_energy"
    )
    assert datasets.dataset_info("mp-formation-energy")["stability_threshold"] == 0.0
    hull = datasets.dataset_info("mp-energy-above-hull")
    assert hull["target_kind"] == "energy_above_hull"
    assert hull["stability_threshold"] == 0.025
    assert hull["units"] == "eV/atom"


def test_info_attribution():
    mp = datasets.dataset_info("mp-formation-energy")
    assert "APL Materials 1, 011002 (2013)" in mp["attribution"]
    assert "npj Comput. Mater. 6, 138 (2020)" in mp["attribution"]
    assert mp["licence"].startswith("CC BY 4.0")
    oqmd = datasets.dataset_info("oqmd-formation-energy")
    assert "JOM 65, 1501 (2013)" in oqmd["attribution"]
    assert "npj Comput. Mater. 1, 15010 (2015)" in oqmd["attribution"]
    assert "MIT" in oqmd["attribution"]


def test_attribution_file_present():
    text = (DATA_DIR / "ATTRIBUTION.md").read_text()
    assert "CC BY 4.0" in text
    assert "Saal" in text


def test_installed_package_ships_attributions():
    # Read through importlib.resources, so that under an installed wheel this
    # checks the wheel's contents, not the source tree.
    from importlib import resources

    package = resources.files("dvmrl")
    # The files wrap their lines, so compare with single spaces.
    data_sets = " ".join(
        package.joinpath("datasets", "data", "ATTRIBUTION.md").read_text().split()
    )
    assert "Copyright (c) 2021 Sterling G. Baird" in data_sets
    elements = " ".join(package.joinpath("data", "ATTRIBUTION.md").read_text().split())
    assert "Copyright (c) 2011-2012 MIT & LBNL" in elements
    assert "pymatgen" in elements


def test_load_unknown_name():
    with pytest.raises(ValueError, match="unknown data set 'mp-bandgap'"):
        datasets.load("mp-bandgap")


# ---------------------------------------------------------------------------
# User CSV files


def _write(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_csv_good_file(tmp_path):
    path = _write(tmp_path, "formula,target,note\nNi3Al,-0.4,a\n AlCoCrFeNi , 0.05,b\n")
    frame = datasets.load_csv(path)
    assert frame["formula"].tolist() == ["Ni3Al", "AlCoCrFeNi"]
    assert frame["chemsys"].tolist() == ["Al-Ni", "Al-Co-Cr-Fe-Ni"]
    assert frame["n_elements"].tolist() == [2, 5]
    assert frame["target"].tolist() == [-0.4, 0.05]
    assert frame["n_elements"].dtype == np.int64


def test_load_csv_custom_columns(tmp_path):
    path = _write(tmp_path, "comp,e_form\nFe70Ni30,-0.1\n")
    frame = datasets.load_csv(path, formula_column="comp", target_column="e_form")
    assert frame["formula"].tolist() == ["Fe70Ni30"]


def test_load_csv_alloy_notation(tmp_path):
    from dvmrl.compositions import parse

    path = _write(tmp_path, "formula,target\n(CoCrFeNi)90Al10,0.0\n")
    frame = datasets.load_csv(path, alloy_notation=True)
    assert parse(frame["formula"].iloc[0])["Al"] == pytest.approx(0.10, abs=1e-12)
    standard = datasets.load_csv(path)
    assert parse(standard["formula"].iloc[0])["Al"] == pytest.approx(
        10 / 370, abs=1e-12
    )


def test_load_csv_warns_on_alloy_notation_lookalikes(tmp_path, caplog):
    path = _write(tmp_path, "formula,target\nNiAl,-0.5\n(TiVNi)80Nb20,0.1\n")
    datasets.load_csv(path)
    expected = "1 formula(s) with a bracketed group, such as (TiVNi)80Nb20 (line 3)"
    assert expected in caplog.text
    caplog.clear()
    datasets.load_csv(path, alloy_notation=True)
    assert "bracketed group" not in caplog.text


def test_load_csv_gzip(tmp_path):
    path = tmp_path / "data.csv.gz"
    path.write_bytes(gzip.compress(b"formula,target\nAlNi,-0.6\n"))
    assert datasets.load_csv(path)["target"].tolist() == [-0.6]


def test_load_csv_metals_only_off(tmp_path):
    path = _write(tmp_path, "formula,target\nNaN,0.1\nFe2O3,-1.7\n")
    frame = datasets.load_csv(path, metals_only=False)
    assert frame["chemsys"].tolist() == ["N-Na", "Fe-O"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"data\.csv is empty: expected a header line"),
        ("formula,target\n", r"has a header line but no data rows"),
        ("comp,target\nAlNi,0.1\n", r"has no column\(s\) 'formula'; its columns are"),
        ("formula,energy\nAlNi,0.1\n", r"has no column\(s\) 'target'"),
        ("formula,target\nAlNi,0.1\nCuZn,nan\n", r"line 3: target 'nan' is NaN"),
        ("formula,target\nAlNi,abc\n", r"line 2: non-numeric target 'abc'"),
        # A decimal comma or a thousands separator, in a quoted cell.
        (
            'formula,target\nAlNi,"-0,0875"\n',
            r"line 2: non-numeric target '-0,0875': write numbers with a decimal "
            r"point and no thousands separators",
        ),
        ('formula,target\nAlNi,"1,000.5"\n', r"'1,000.5': write numbers with a"),
        ("formula,target\nAlNi,\n", r"line 2: missing target"),
        ("formula,target\nAlNi,inf\n", r"line 2: target 'inf' is not finite"),
        (
            "formula,target\nAlNi,0.1\nFe3Pt,1e30\n",
            r"line 3: target '1e30' is beyond \+-1e\+07 eV/atom",
        ),
        ("formula,target\nAlNi,-2e7\n", r"line 2: target '-2e7' is beyond"),
        ("formula,target\n,0.1\n", r"line 2: empty formula"),
        ("formula,target\nXx2Ni,0.1\n", r"line 2: .*unknown element symbol 'Xx'"),
        ("formula,target\nni3al,0.1\n", r"line 2: .*wrong letter case"),
        ("formula,target\nFe2O3,0.1\n", r"line 2: .*O is not a metal"),
        ("formula,target\nAl0Ni,0.1\n", r"line 2: .*amount is zero"),
    ],
)
def test_load_csv_bad_file(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=message):
        datasets.load_csv(path)


def test_load_csv_bad_rows_summarised(tmp_path):
    rows = "".join(f"AlNi,bad{i}\n" for i in range(8))
    path = _write(tmp_path, "formula,target\n" + rows)
    with pytest.raises(ValueError, match=r"8 of 8 row\(s\) are invalid") as caught:
        datasets.load_csv(path)
    assert "and 3 more bad row(s)" in str(caught.value)
    assert "line 7:" not in str(caught.value)


def test_load_csv_both_reasons(tmp_path):
    path = _write(tmp_path, "formula,target\nXx,abc\n")
    with pytest.raises(ValueError, match=r"line 2: .*'Xx'.*; non-numeric target 'abc'"):
        datasets.load_csv(path)


def test_load_csv_lines_count_blank_lines(tmp_path):
    path = _write(tmp_path, "formula,target\nFeNi,0.1\n\n\nCoNi,0.2\nFeXx,0.3\n")
    with pytest.raises(ValueError, match=r"line 6: .*'Xx'") as caught:
        datasets.load_csv(path)
    assert "line 4" not in str(caught.value)


def test_load_csv_line_after_quoted_line_break(tmp_path):
    text = 'formula,target,note\nFeNi,0.1,"two\nlines"\nFeXx,0.3,x\n'
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=r"line 4: .*'Xx'"):
        datasets.load_csv(path)


def test_load_csv_line_of_row_spanning_lines(tmp_path):
    text = 'formula,target,note\nFeNi,0.1,x\nFeXx,0.3,"two\nlines"\n'
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=r"line 3: .*'Xx'"):
        datasets.load_csv(path)


def test_load_csv_gzip_line_numbers(tmp_path):
    path = tmp_path / "data.csv.gz"
    path.write_bytes(gzip.compress(b"formula,target\n\nAlNi,-0.6\n\nAlNi,1_0\n"))
    with pytest.raises(ValueError, match=r"line 5: non-numeric target '1_0'"):
        datasets.load_csv(path)


def test_read_text_table_lines(tmp_path):
    text = '\nformula,target\r\nAlNi,0.1\r\n  \r\n"Fe\nNi",0.2\nCoNi,0.3\n'
    path = _write(tmp_path, text)
    table, lines = read_text_table(path)
    assert list(table.columns) == ["formula", "target"]
    assert table["formula"].tolist() == ["AlNi", "Fe\nNi", "CoNi"]
    assert lines == [3, 5, 7]


def test_read_text_table_keeps_text(tmp_path):
    path = _write(tmp_path, "\ufeffformula , target,note\nNaN, 1e-3\n")
    table, lines = read_text_table(path)
    assert list(table.columns) == ["formula", "target", "note"]
    assert table.iloc[0].tolist() == ["NaN", "1e-3", ""]
    assert lines == [2]


@pytest.mark.parametrize(
    ("suffix", "compress"),
    [(".bz2", bz2.compress), (".xz", lzma.compress)],
)
def test_load_csv_other_compression(tmp_path, suffix, compress):
    path = tmp_path / f"data.csv{suffix}"
    path.write_bytes(compress(b"formula,target\nAlNi,-0.6\n"))
    assert datasets.load_csv(path)["target"].tolist() == [-0.6]


def test_load_csv_zip(tmp_path):
    path = tmp_path / "data.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("data.csv", "formula,target\nAlNi,-0.6\n")
    assert datasets.load_csv(path)["target"].tolist() == [-0.6]


def test_load_csv_corrupt_gzip(tmp_path):
    path = tmp_path / "data.csv.gz"
    path.write_bytes(b"formula,target\nAlNi,-0.6\n")
    with pytest.raises(ValueError, match=r"data\.csv\.gz is not a valid \.gz file"):
        datasets.load_csv(path)


@pytest.mark.parametrize("text", ["1_0", "1_000", "-0_5", "\uff11", "0x10", "1.0.0"])
def test_load_csv_rejects_non_plain_number(tmp_path, text):
    path = _write(tmp_path, f"formula,target\nAlNi,0.1\n\nFeNi,{text}\n")
    with pytest.raises(ValueError, match=rf"line 4: non-numeric target {text!r}"):
        datasets.load_csv(path)


@pytest.mark.parametrize("text", ["-0.25", "+1", "1.", ".5", "1.5E-3", "-2e+2"])
def test_load_csv_accepts_plain_number(tmp_path, text):
    path = _write(tmp_path, f"formula,target\nAlNi,{text}\n")
    assert datasets.load_csv(path)["target"].tolist() == [float(text)]


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("formula;target\nAlNi;0.1\n", "semicolons"),
        ("formula\ttarget\nAlNi\t0.1\n", "tabs"),
        # A spreadsheet export with decimal commas splits into more comma
        # fields than its one-cell header, which is no quoting problem.
        ("formula;target\nAlNi;-0,4\n", "semicolons"),
    ],
)
def test_load_csv_other_separator(tmp_path, text, name):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError) as caught:
        datasets.load_csv(path)
    message = str(caught.value)
    assert f"seems to separate its fields with {name}" in message
    assert "dvmrl reads comma-separated files" in message
    assert "rename" not in message
    assert "quote" not in message


def test_load_csv_field_over_limit(tmp_path):
    path = _write(tmp_path, "formula,target,note\nAlNi,0.1," + "x" * 140_000 + "\n")
    with pytest.raises(ValueError, match=r"line 2 is longer than 131072 characters"):
        datasets.load_csv(path)


def test_composition_keys_agree_with_evaluate(tmp_path):
    # A file that rounds fractions to 6 decimals repeats Al5Mn7; the loader,
    # the splits and evaluate's training-row check key both rows alike.
    from dvmrl.cli.train import _composition_keys
    from dvmrl.splits import repeated_compositions

    path = _write(tmp_path, "formula,target\nAl5Mn7,-0.1\nAl0.416667Mn0.583333,-0.2\n")
    frame = datasets.load_csv(path)
    assert frame["composition"].nunique() == 1
    formulas = frame["formula"].tolist()
    assert len(set(_composition_keys(formulas))) == 1
    built = frame[["formula", "chemsys", "n_elements", "target"]]
    assert len(set(repeated_compositions(built))) == 1


def test_composition_key_tie_fraction(tmp_path):
    # Ni's fraction is 1/128 = 0.0078125, a tie at the sixth decimal, and
    # Ni0.1Al12.7 parses to it plus one unit in the last place.
    from dvmrl.splits import repeated_compositions

    path = _write(tmp_path, "formula,target\nNiAl127,-0.1\nNi0.1Al12.7,-0.2\n")
    frame = datasets.load_csv(path)
    assert frame["composition"].nunique() == 1
    built = frame[["formula", "chemsys", "n_elements", "target"]]
    assert len(set(repeated_compositions(built))) == 1


def test_load_csv_column_message_names_real_options(tmp_path):
    path = _write(tmp_path, "comp,energy\nAlNi,0.1\n")
    with pytest.raises(ValueError) as caught:
        datasets.load_csv(path)
    message = str(caught.value)
    assert "name its formula and target columns with" in message
    assert "--formula-column and --target-column" in message
    assert "rename them to 'formula' and 'target'" in message


@pytest.mark.parametrize(
    ("target_column", "guess"),
    [("dh", "'dH' for 'dh'"), ("enrgy", "'energy' for 'enrgy'")],
)
def test_load_csv_guesses_misspelt_column(tmp_path, target_column, guess):
    path = _write(tmp_path, "composition,dH,energy\nAlNi,0.1,0.2\n")
    with pytest.raises(ValueError) as caught:
        datasets.load_csv(
            path, formula_column="composition", target_column=target_column
        )
    message = str(caught.value)
    assert f"did you mean {guess}?" in message
    assert "Column names are case-sensitive" in message
    # Renaming the file's column to the misspelt name would not help.
    assert "rename" not in message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("formula,target\nAlNi,0.1\nFe,Ni,0.2\n", r"line 3 has 3 fields, but the header"),
        # pandas.read_csv read such a first row as index, formula and target.
        ("formula,target\nFe,Ni,0.2\n", r"line 2 has 3 fields"),
        (
            'formula,target\nAlNi,0.1\nFeNi,"0.2\nCoNi,0.3\n',
            r"row that starts on line 3 is malformed",
        ),
        ("formula,target, target\nAlNi,0.1,0.2\n", r"has 2 columns named 'target'"),
    ],
    ids=["extra-field", "first-row-extra-field", "unclosed-quote", "repeated-column"],
)
def test_load_csv_malformed_rows(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ValueError, match=message):
        datasets.load_csv(path)


def test_load_csv_trailing_empty_field(tmp_path):
    path = _write(tmp_path, "formula,target\nAlNi,0.1,\n")
    assert datasets.load_csv(path)["target"].tolist() == [0.1]


def test_load_csv_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        datasets.load_csv(tmp_path / "absent.csv")


def test_load_csv_repeats_warn(tmp_path, caplog):
    path = _write(tmp_path, "formula,target\nNi3Al,0.1\nAlNi3,0.2\n")
    frame = datasets.load_csv(path)
    assert len(frame) == 2
    assert "1 row(s) repeat the composition" in caplog.text
    assert frame["composition"].tolist() == ["Al0.250000Ni0.750000"] * 2


def test_load_csv_skips_rows_of_empty_cells(tmp_path):
    # Spreadsheet exports often end with rows of separators only.
    text = "formula,target\nNi3Al,-0.4\n,\n , \nFeNi,0.1\n,,\n"
    frame = datasets.load_csv(_write(tmp_path, text))
    assert frame["formula"].tolist() == ["Ni3Al", "FeNi"]


def test_load_csv_repeats_despite_rounding(tmp_path, caplog):
    # Ni0.3Al0.1 normalises to Ni 0.7499999999999999, 1 ulp from Ni3Al's 0.75.
    text = "formula,target\nNi3Al,-0.4\nNi0.3Al0.1,-0.41\nFeNi,0.1\n"
    frame = datasets.load_csv(_write(tmp_path, text))
    assert "1 row(s) repeat the composition" in caplog.text
    assert "Ni3Al on lines 2, 3," in caplog.text
    keys = frame["composition"].tolist()
    assert keys[0] == keys[1]
    assert keys[2] != keys[0]


def test_load_csv_repeats_named(tmp_path, caplog):
    text = "formula,target\nNi3Al,-0.5\nFeNi,0.1\n\nAlNi3,0.7\n"
    datasets.load_csv(_write(tmp_path, text))
    assert "Ni3Al on lines 2, 5, targets -0.5 to 0.7 eV/atom" in caplog.text
    assert "the splits keep such rows in one part" in caplog.text
    assert "keeping one row per composition" in caplog.text


def test_load_csv_warns_on_kj_per_mol(tmp_path, caplog):
    path = _write(tmp_path, "formula,target\nNi3Al,-41.2\nFeNi,-4.5\nCuZn,0.1\n")
    frame = datasets.load_csv(path)
    assert len(frame) == 3
    # The message gives the largest target with its sign and its line.
    assert "1 of 3 target(s) exceed 10 eV/atom in magnitude" in caplog.text
    assert "(largest -41.2, line 2)" in caplog.text
    assert "divide by 96.485" in caplog.text


def test_load_csv_plausible_targets_quiet(tmp_path, caplog):
    path = _write(tmp_path, "formula,target\nNi3Al,-0.41\nFeNi,-9.9\n")
    datasets.load_csv(path)
    assert "exceed" not in caplog.text


# ---------------------------------------------------------------------------
# resolve_data


def test_resolve_name():
    frame, info = datasets.resolve_data("mp-energy-above-hull")
    assert len(frame) == info["rows"]
    assert info["hume_rothery_screen"] is None
    assert info["stability_threshold"] == 0.025


def test_resolve_path(tmp_path):
    path = _write(tmp_path, "formula,target\nAlNi,-0.6\nNi3Al,-0.4\n")
    frame, info = datasets.resolve_data(str(path), target_kind="energy_above_hull")
    assert len(frame) == 2
    assert info["source"] == f"user file {path}"
    assert info["stability_threshold"] == 0.025


def test_resolve_warns_on_hull_energies(tmp_path, caplog):
    hull = datasets.load("mp-energy-above-hull").iloc[:200]
    path = tmp_path / "hull.csv"
    hull[["formula", "target"]].to_csv(path, index=False)
    _, info = datasets.resolve_data(path)
    assert info["target_kind"] == "formation_energy"
    assert "as energies above the convex hull are" in caplog.text
    assert "--target-kind energy_above_hull" in caplog.text
    caplog.clear()
    _, info = datasets.resolve_data(path, target_kind="energy_above_hull")
    assert info["stability_threshold"] == 0.025
    assert "as energies above the convex hull are" not in caplog.text


def test_resolve_formation_energies_no_hull_warning(tmp_path, caplog):
    formation = datasets.load("mp-formation-energy").iloc[:200]
    path = tmp_path / "formation.csv"
    formation[["formula", "target"]].to_csv(path, index=False)
    datasets.resolve_data(path)
    assert "convex hull" not in caplog.text


def test_resolve_unknown():
    with pytest.raises(ValueError, match="or the path of an existing CSV file"):
        datasets.resolve_data("no-such-set")


def test_resolve_missing_file(tmp_path):
    missing = tmp_path / "nofile.csv"
    with pytest.raises(ValueError, match=f"data file '{missing}' not found"):
        datasets.resolve_data(str(missing))


def test_resolve_folder(tmp_path):
    with pytest.raises(ValueError, match=f"data path '{tmp_path}' is a folder"):
        datasets.resolve_data(str(tmp_path))


def test_resolve_bad_target_kind(tmp_path):
    path = _write(tmp_path, "formula,target\nAlNi,-0.6\n")
    with pytest.raises(ValueError, match="unknown target kind 'band_gap'"):
        datasets.resolve_data(path, target_kind="band_gap")


def test_resolve_hume_rothery():
    frame, info = datasets.resolve_data("mp-energy-above-hull", hume_rothery=True)
    screen = info["hume_rothery_screen"]
    assert screen["rows_before"] == 9591
    assert screen["rows_after"] == len(frame)
    assert info["rows"] == len(frame)
    assert 0 < len(frame) < 9591


# ---------------------------------------------------------------------------
# Hume-Rothery screen


def test_hume_rothery_hand_case():
    from pymatgen.core import Element

    # pymatgen 2026.10.24: Al 1.25 and Ni 1.35 angstrom, Pauling 1.61 and 1.91.
    assert float(Element("Al").atomic_radius) == 1.25
    assert float(Element("Ni").atomic_radius) == 1.35
    frame = pd.DataFrame({"formula": ["Ni3Al"]})
    metrics = datasets.hume_rothery_metrics(frame)
    r_mean = 0.75 * 1.35 + 0.25 * 1.25
    delta = math.sqrt(0.75 * (1 - 1.35 / r_mean) ** 2 + 0.25 * (1 - 1.25 / r_mean) ** 2)
    assert metrics["size_mismatch"].iloc[0] == pytest.approx(delta, rel=1e-12)
    assert metrics["size_mismatch"].iloc[0] == pytest.approx(0.03268, abs=1e-5)
    assert metrics["electronegativity_spread"].iloc[0] == pytest.approx(0.30, abs=1e-12)


def test_hume_rothery_equal_mismatch():
    frame = pd.DataFrame({"formula": ["AlNi"]})
    metrics = datasets.hume_rothery_metrics(frame)
    assert metrics["size_mismatch"].iloc[0] == pytest.approx(0.05 / 1.30, rel=1e-12)


def test_hume_rothery_screen_filters():
    frame = pd.DataFrame(
        {
            # Ni3Al passes; CsLi fails on size (2.60 vs 1.45 angstrom), AuCs on
            # electronegativity (2.54 - 0.79), FrNa has no radius for Fr.
            "formula": ["CsLi", "Ni3Al", "AuCs", "FrNa"],
            "chemsys": ["Cs-Li", "Al-Ni", "Au-Cs", "Fr-Na"],
            "n_elements": [2, 2, 2, 2],
            "target": [0.1, -0.4, -0.2, 0.0],
        }
    )
    kept = datasets.hume_rothery_screen(frame)
    assert kept["formula"].tolist() == ["Ni3Al"]
    assert kept.index.tolist() == [0]
    assert kept.attrs["hume_rothery_screen"]["rows_unknown_property"] == 1
    loose = datasets.hume_rothery_screen(frame, 1.0, 2.0)
    assert loose["formula"].tolist() == ["CsLi", "Ni3Al", "AuCs"]


def test_hume_rothery_passing_rows():
    frame = datasets.load("mp-energy-above-hull")
    rows, record = hume_rothery_passing_rows(frame)
    screened = datasets.hume_rothery_screen(frame)
    assert rows.dtype == np.int64
    assert record == screened.attrs["hume_rothery_screen"]
    assert frame["formula"].iloc[rows].tolist() == screened["formula"].tolist()


def test_hume_rothery_threshold_boundary():
    frame = pd.DataFrame({"formula": ["Ni3Al"]})
    spread = datasets.hume_rothery_metrics(frame)["electronegativity_spread"].iloc[0]
    assert len(datasets.hume_rothery_screen(frame, 0.15, spread)) == 1
    assert len(datasets.hume_rothery_screen(frame, 0.15, spread - 1e-9)) == 0


def test_hume_rothery_bad_threshold():
    frame = pd.DataFrame({"formula": ["Ni3Al"]})
    with pytest.raises(
        ValueError, match="max_size_mismatch must be a finite number >= 0"
    ):
        datasets.hume_rothery_screen(frame, max_size_mismatch=-0.1)


# ---------------------------------------------------------------------------
# Chemical families


_FAMILY_FRAME = pd.DataFrame(
    {
        "formula": ["FeNi", "AlNi", "LaNi5", "YNi", "LiMg", "CaZn", "ScCu", "NdAl2"],
        "chemsys": [
            "Fe-Ni",
            "Al-Ni",
            "La-Ni",
            "Ni-Y",
            "Li-Mg",
            "Ca-Zn",
            "Cu-Sc",
            "Al-Nd",
        ],
        "n_elements": [2] * 8,
        "target": [0.0] * 8,
    }
)


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("transition-metal", ["FeNi", "LaNi5", "YNi", "ScCu"]),
        ("rare-earth", ["LaNi5", "YNi", "ScCu", "NdAl2"]),
        ("alkali-alkaline-earth", ["LiMg", "CaZn"]),
    ],
)
def test_family_subset(family, expected):
    subset = datasets.family_subset(_FAMILY_FRAME, family)
    assert subset["formula"].tolist() == expected
    assert subset.index.tolist() == list(range(len(expected)))


def test_family_subset_real_data():
    from pymatgen.core import Element

    frame = datasets.load("mp-formation-energy")
    subset = datasets.family_subset(frame, "transition-metal")
    assert 0 < len(subset) < len(frame)
    symbols = set("-".join(subset["chemsys"]).split("-"))
    assert all(Element(symbol).is_transition_metal for symbol in symbols)


def test_family_subset_unknown():
    with pytest.raises(ValueError, match="unknown chemical family 'noble'"):
        datasets.family_subset(_FAMILY_FRAME, "noble")


# ---------------------------------------------------------------------------
# CLI


def test_cli_list(capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "mp-formation-energy" in out
    assert "18400 rows" in out
    assert "(default)" in out


def test_cli_list_json(capsys):
    assert main(["data", "list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in rows] == list(datasets.DATASETS)


def test_cli_info(capsys):
    assert main(["data", "info", "oqmd-formation-energy"]) == 0
    out = capsys.readouterr().out
    assert "rows 29125 (1495 binaries, 27630 ternaries)" in out
    assert "target (eV/atom): mean" in out
    assert "Saal" in out
    assert "Hume-Rothery screen off" in out


def test_cli_info_json(capsys):
    assert main(["data", "info", "mp-energy-above-hull", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 9591
    assert summary["stability_threshold"] == 0.025
    assert summary["target_statistics"]["min"] >= 0.0


def test_cli_info_screen(capsys):
    assert main(["data", "info", "mp-energy-above-hull", "--hume-rothery"]) == 0
    assert "Hume-Rothery screen on: delta <= 0.15" in capsys.readouterr().out


def test_cli_screen_names_unknown_properties(tmp_path, capsys):
    # Francium and nobelium have no metallic radius in the element table, so
    # the screen drops their rows, and the messages give the reason.
    path = _write(tmp_path, "formula,target\nFrNi,0.1\nNoNi,0.2\nFrCo,0.3\nNoCo,0.1\n")
    assert main(["data", "info", str(path), "--hume-rothery"]) == 0
    out = capsys.readouterr().out
    assert "kept 0 of 4 rows (4 rows failed because an element has no known" in out
    split = ["data", "split", str(path), "--hume-rothery", "--split", "random"]
    assert main([*split, "--out", str(tmp_path / "s.json")]) == 2
    err = capsys.readouterr().err
    assert "the Hume-Rothery screen kept 0 of 4 rows" in err
    assert "drop --hume-rothery" in err


def test_cli_info_csv(tmp_path, capsys):
    path = _write(tmp_path, "f,y\nAlNi,-0.6\nAlNi2Ti,-0.5\n")
    argv = ["data", "info", str(path), "--formula-column", "f", "--target-column", "y"]
    assert main(argv) == 0
    assert "rows 2 (1 binaries, 1 ternaries)" in capsys.readouterr().out


def test_cli_info_element_counts(tmp_path, capsys):
    """Each element with the compositions that contain it, in periodic order."""
    path = _write(tmp_path, "formula,target\nCuNi,-0.1\nAlNi,-0.6\nAlNi2Ti,-0.5\n")
    assert main(["data", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "compositions per element: Al 2, Ti 1, Ni 3, Cu 1\n" in out
    assert main(["data", "info", str(path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["elements"] == 4
    assert list(summary["element_counts"].items()) == [
        ("Al", 2), ("Ti", 1), ("Ni", 3), ("Cu", 1)
    ]


def test_cli_info_unknown(capsys):
    assert main(["data", "info", "no-such-set"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dvmrl data info: error: unknown data set 'no-such-set'")


def test_cli_info_bad_csv(tmp_path, capsys):
    path = _write(tmp_path, "formula,target\nAlNi,abc\n")
    assert main(["data", "info", str(path)]) == 2
    assert "line 2: non-numeric target 'abc'" in capsys.readouterr().err


def _strict_json(text: str):
    """Parse JSON as strict parsers do, which reject NaN and Infinity."""

    def reject(name):
        raise ValueError(f"{name} is not valid JSON")

    return json.loads(text, parse_constant=reject)


def test_cli_info_json_one_row(tmp_path, capsys):
    path = _write(tmp_path, "formula,target\nFeNi,0.1\n")
    assert main(["data", "info", str(path), "--json"]) == 0
    summary = _strict_json(capsys.readouterr().out)
    assert summary["target_statistics"]["std"] is None
    assert summary["target_statistics"]["mean"] == 0.1


def test_cli_info_text_one_row(tmp_path, capsys):
    path = _write(tmp_path, "formula,target\nFeNi,0.1\n")
    assert main(["data", "info", str(path)]) == 0
    assert "std undefined" in capsys.readouterr().out


def test_cli_list_json_strict(capsys):
    assert main(["data", "list", "--json"]) == 0
    assert len(_strict_json(capsys.readouterr().out)) == len(datasets.DATASETS)


def test_cli_info_blank_lines(tmp_path, capsys):
    path = _write(tmp_path, "formula,target\nFeNi,0.1\n\n\nCoNi,0.2\nFeXx,0.3\n")
    assert main(["data", "info", str(path)]) == 2
    assert "line 6: invalid composition 'FeXx'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option", ["--max-size-mismatch", "--max-electronegativity-spread"]
)
def test_cli_screen_threshold_needs_screen(tmp_path, capsys, option):
    path = _write(tmp_path, "formula,target\nFeNi,0.1\nCoNi,0.2\n")
    assert main(["data", "info", str(path), option, "0.01"]) == 2
    err = capsys.readouterr().err
    assert f"{option} 0.01 applies only with --hume-rothery" in err
    assert f"drop {option}" in err


def test_cli_screen_threshold_applies(capsys):
    argv = ["data", "info", "mp-energy-above-hull", "--hume-rothery"]
    assert main([*argv, "--max-size-mismatch", "0.01", "--json"]) == 0
    screen = _strict_json(capsys.readouterr().out)["hume_rothery_screen"]
    assert screen["max_size_mismatch"] == 0.01
    assert screen["max_electronegativity_spread"] == 0.4
