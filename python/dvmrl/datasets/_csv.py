"""Reading a user's own composition-target CSV file."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from dvmrl.datasets._vendored import COLUMNS

logger = logging.getLogger(__name__)

# How many bad rows one error message lists before it summarises the rest.
MAX_LISTED_ERRORS = 5
# Largest |target| accepted, in eV/atom. An all-electron total energy of
# uranium is about -8e5 eV (estimate), so no per-atom energy comes near it.
# It also keeps squared errors below the float32 limit of 3.4e38.
MAX_ABS_TARGET = 1e7
# Formation enthalpies and energies above the hull of alloys lie within a few
# eV/atom, so larger targets are more likely in kJ/mol or meV/atom. They get
# a warning, not an error, because a user's property may be another one.
PLAUSIBLE_ABS_TARGET = 10.0


def _check_target(text: str) -> tuple[float | None, str | None]:
    """Return (value, None) for a finite number, else (None, reason)."""
    if text == "":
        return None, "missing target"
    try:
        value = float(text)
    except ValueError:
        return None, f"non-numeric target {text!r}"
    if math.isnan(value):
        return None, f"target {text!r} is NaN"
    if not math.isfinite(value):
        return None, f"target {text!r} is not finite"
    if abs(value) > MAX_ABS_TARGET:
        return None, (
            f"target {text!r} is beyond +-{MAX_ABS_TARGET:g} eV/atom, no per-atom "
            "energy (check that the column is in eV/atom)"
        )
    return value, None


def _check_formula(
    text: str, metals_only: bool, alloy_notation: bool
) -> tuple[dict[str, float] | None, str | None]:
    """Return (fractions, None) for a valid formula, else (None, reason)."""
    from dvmrl.compositions import CompositionError, parse

    if text == "":
        return None, "empty formula"
    try:
        fractions = parse(text, alloy_notation=alloy_notation, metals_only=metals_only)
    except CompositionError as err:
        return None, str(err)
    return fractions, None


def _read_text_table(path: Path) -> pd.DataFrame:
    try:
        # Every cell stays text: pandas would otherwise read the formula "NaN"
        # (sodium nitride) as a missing value.
        return pd.read_csv(
            path, dtype=str, keep_default_na=False, skipinitialspace=True
        )
    except pd.errors.EmptyDataError:
        raise ValueError(
            f"{path} is empty: expected a header line naming a formula and a target "
            "column, then one composition per line"
        ) from None
    except pd.errors.ParserError as err:
        raise ValueError(f"{path} is not a valid CSV file: {err}") from None
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text ({err}): save it as UTF-8 CSV"
        ) from None


def load_csv(
    path: str | os.PathLike,
    formula_column: str = "formula",
    target_column: str = "target",
    metals_only: bool = True,
    *,
    alloy_notation: bool = False,
) -> pd.DataFrame:
    """Read a user's CSV file of compositions and targets.

    Formulas are parsed by :func:`dvmrl.compositions.parse`. Other columns are
    ignored. Repeated formulas are kept, with a warning in the log.

    Args:
        path: CSV file with a header line.
        formula_column: header of the formula column.
        target_column: header of the target column (eV/atom).
        metals_only: reject compositions with an element that is not a metal
            (pymatgen ``Element.is_metal``).
        alloy_notation: read a parenthesised group's amount as its at.% share,
            as in ``parse(text, alloy_notation=True)``. The formula column
            then contains ``format_formula`` of the parsed fractions, so that a
            plain ``parse`` of it gives the same fractions.

    Returns:
        A DataFrame with the columns formula, chemsys (symbols joined by '-'
        in alphabetical order), n_elements (int64) and target (float64,
        eV/atom), in file order, with a RangeIndex.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: for an empty file, a missing column, or rows with a
            missing, NaN, non-numeric or implausibly large target (above
            1e7 eV/atom in magnitude) or an invalid formula. The
            message names the file lines (line 1 is the header).
    """
    from dvmrl.compositions import format_formula

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV file {str(path)!r} not found: check the path")
    table = _read_text_table(path)
    columns = [str(column).strip() for column in table.columns]
    table.columns = columns
    missing = [name for name in (formula_column, target_column) if name not in columns]
    if missing:
        raise ValueError(
            f"{path} has no column(s) {', '.join(repr(m) for m in missing)}; its "
            f"columns are {columns}: rename the formula and target columns to "
            f"{formula_column!r} and "
            f"{target_column!r} (dvmrl data and dvmrl predict also take "
            "--formula-column and --target-column, load_csv takes formula_column= "
            "and target_column=)"
        )
    if len(table) == 0:
        raise ValueError(f"{path} has a header line but no data rows")

    rows = []
    keys = []
    errors = []
    formulas = table[formula_column].astype(str).str.strip()
    targets = table[target_column].astype(str).str.strip()
    for row, (formula, target_text) in enumerate(zip(formulas, targets, strict=True)):
        line = row + 2
        fractions, formula_error = _check_formula(formula, metals_only, alloy_notation)
        target, target_error = _check_target(target_text)
        reasons = [reason for reason in (formula_error, target_error) if reason]
        if reasons:
            errors.append(f"line {line}: {'; '.join(reasons)}")
            continue
        symbols = sorted(fractions)
        key = format_formula(fractions)
        keys.append(key)
        text = key if alloy_notation else formula
        rows.append((text, "-".join(symbols), len(symbols), target))

    if errors:
        listed = "; ".join(errors[:MAX_LISTED_ERRORS])
        more = len(errors) - MAX_LISTED_ERRORS
        suffix = f"; and {more} more bad row(s)" if more > 0 else ""
        raise ValueError(
            f"{path}: {len(errors)} of {len(table)} row(s) are invalid "
            f"(formula column {formula_column!r}, target column {target_column!r}): "
            f"{listed}{suffix}. Fix or remove these rows"
        )

    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["n_elements"] = frame["n_elements"].astype(np.int64)
    frame["target"] = frame["target"].astype(np.float64)
    magnitude = frame["target"].abs()
    large = magnitude > PLAUSIBLE_ABS_TARGET
    if large.any():
        logger.warning(
            "%s: %d of %d target(s) exceed %g eV/atom in magnitude (largest %g); "
            "dvmrl reads targets in eV/atom, so convert kJ/mol (divide by 96.485) "
            "or meV/atom (divide by 1000) first",
            path,
            int(large.sum()),
            len(frame),
            PLAUSIBLE_ABS_TARGET,
            float(magnitude.max()),
        )
    repeats = int(pd.Series(keys).duplicated().sum())
    if repeats:
        logger.warning(
            "%s: %d row(s) repeat the composition of an earlier row; random splits "
            "may put the same composition in train and test",
            path,
            repeats,
        )
    return frame
