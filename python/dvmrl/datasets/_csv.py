"""Reading a user's own composition-target CSV file."""

from __future__ import annotations

import bz2
import contextlib
import csv
import difflib
import gzip
import io
import logging
import lzma
import math
import os
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from dvmrl.datasets._vendored import COLUMNS, COMPOSITION_COLUMN

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
# Separators that a one-cell header line suggests, with their names.
OTHER_SEPARATORS = {";": "semicolons", "\t": "tabs", "|": "vertical bars"}

_DECOMPRESSORS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


# A number as a CSV file writes it: an optional sign, digits with an optional
# decimal point, and an optional exponent. float() also reads "1_000",
# "infinity" and digits of other scripts, which a CSV cell should not contain.
CSV_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def _check_target(text: str) -> tuple[float | None, str | None]:
    """Return (value, None) for a finite number, else (None, reason)."""
    if text == "":
        return None, "missing target"
    try:
        value = float(text)
    except ValueError:
        if re.fullmatch(r"[+-]?[0-9.,]*[0-9][0-9.,]*", text) and "," in text:
            return None, (
                f"non-numeric target {text!r}: write numbers with a decimal point "
                "and no thousands separators, such as -0.0875 or 1000.5"
            )
        return None, f"non-numeric target {text!r}"
    if math.isnan(value):
        return None, f"target {text!r} is NaN"
    if not math.isfinite(value):
        return None, f"target {text!r} is not finite"
    if not CSV_NUMBER.fullmatch(text):
        return None, (
            f"non-numeric target {text!r}: expected a plain decimal number such "
            "as -0.25 or 1.5e-3"
        )
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


def _open_text(path: Path, stack: contextlib.ExitStack):
    """Open a CSV file as text, decompressing it by its suffix."""
    suffix = path.suffix.lower()
    options = {"encoding": "utf-8-sig", "newline": ""}
    if suffix in _DECOMPRESSORS:
        return stack.enter_context(_DECOMPRESSORS[suffix](path, "rt", **options))
    if suffix == ".zip":
        archive = stack.enter_context(zipfile.ZipFile(path))
        names = [info.filename for info in archive.infolist() if not info.is_dir()]
        if len(names) != 1:
            raise ValueError(
                f"{path} contains {len(names)} files: a zipped CSV file must "
                "contain exactly one file"
            )
        binary = stack.enter_context(archive.open(names[0]))
        return stack.enter_context(io.TextIOWrapper(binary, **options))
    return stack.enter_context(open(path, **options))


def separator_hint(header: list[str]) -> str | None:
    """Explain a one-cell header that contains another separator, or return None.

    A file saved with semicolons, tabs or vertical bars between its fields
    (such as a spreadsheet export with decimal commas) reads as one column
    whose name contains that separator.
    """
    if len(header) != 1:
        return None
    for separator, name in OTHER_SEPARATORS.items():
        if separator in header[0]:
            return (
                f"the file seems to separate its fields with {name}, but dvmrl "
                "reads comma-separated files (with a point as the decimal "
                "separator); save it as CSV with commas between the fields"
            )
    return None


def _is_blank(row: list[str]) -> bool:
    """Tell whether a parsed row has no text: an empty line, or only separators.

    Spreadsheet exports often end with rows such as ",," whose cells are all
    empty. They hold no composition, so they count as blank lines.
    """
    return all(cell.strip() == "" for cell in row)


def _read_rows(
    path: Path, columns: str
) -> tuple[list[str], list[list[str]], list[int]]:
    """Read the header cells, the data rows and the line where each row starts."""
    header: list[str] | None = None
    header_line = 0
    rows: list[list[str]] = []
    lines: list[int] = []
    with contextlib.ExitStack() as stack:
        handle = _open_text(path, stack)
        reader = csv.reader(handle, skipinitialspace=True, strict=True)
        while True:
            # line_num counts the physical lines read so far, so a row that
            # spans lines (a quoted field with a line break) starts one after.
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                if "field limit" in str(err):
                    raise ValueError(
                        f"{path} is not a valid CSV file: a field of the row that "
                        f"starts on line {start} is longer than "
                        f"{csv.field_size_limit()} characters; check that the "
                        "file is a CSV file of compositions and that every "
                        'quoted field ends with a " followed by a comma or a '
                        "line break"
                    ) from None
                raise ValueError(
                    f"{path} is not a valid CSV file: the row that starts on line "
                    f"{start} is malformed ({err}); check its quotes: a quoted "
                    'field must end with a " followed by a comma or a line break'
                ) from None
            if _is_blank(row):
                continue
            if header is None:
                header = [cell.strip() for cell in row]
                header_line = start
                continue
            if len(row) > len(header):
                if any(cell.strip() for cell in row[len(header) :]):
                    hint = separator_hint(header)
                    if hint is not None:
                        raise ValueError(
                            f"{path} has one column, {header[0]!r}, but line "
                            f"{start} has {len(row)} comma-separated fields: {hint}"
                        )
                    raise ValueError(
                        f"{path}: line {start} has {len(row)} fields, but the "
                        f"header (line {header_line}) has {len(header)}: quote "
                        'fields that contain a comma ("Fe,Ni") or add a header '
                        "cell for the extra column"
                    )
                row = row[: len(header)]
            elif len(row) < len(header):
                row = row + [""] * (len(header) - len(row))
            rows.append(row)
            lines.append(start)
    if header is None:
        raise ValueError(
            f"{path} is empty: expected a header line naming {columns}, then one "
            "composition per line"
        )
    return header, rows, lines


def read_text_table(
    path: str | os.PathLike, columns: str = "a formula and a target column"
) -> tuple[pd.DataFrame, list[int]]:
    """Read a CSV file into a table of text cells, with each row's line number.

    Every cell stays text, so the formula "NaN" (sodium nitride) is not read
    as a missing value. Header cells are stripped of surrounding spaces,
    empty lines and rows whose cells are all empty are skipped, spaces after
    a comma are dropped, and rows with fewer fields than the header get empty
    cells.
    Files ending in .gz, .bz2, .xz or .zip (one file inside) are
    decompressed, and a UTF-8 byte order mark is dropped.

    Returns:
        (table, lines): the table, with the stripped header cells as columns
        (repeats kept) and a RangeIndex, and for each of its rows the
        1-based line of the file where the row starts. Line 1 is the
        file's first line, and lines count after decompression.

    ``columns`` describes the columns that the message of an empty file asks
    for.

    Raises:
        ValueError: when the file is empty, is not valid UTF-8 CSV text or
            not a valid compressed file, or a row has more non-empty fields
            than the header.
    """
    path = Path(path)
    try:
        header, rows, lines = _read_rows(path, columns)
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{path} is not UTF-8 text ({err}): save it as UTF-8 CSV"
        ) from None
    except (EOFError, zlib.error, lzma.LZMAError, zipfile.BadZipFile) as err:
        raise ValueError(
            f"{path} is not a valid {path.suffix} file ({err}): compress it again "
            "or pass the uncompressed CSV file"
        ) from None
    except OSError as err:
        # Decompressors report corrupt data as an OSError without an errno,
        # while a failed read of the disk carries one and is not an input error.
        if err.errno is not None or path.suffix.lower() not in _DECOMPRESSORS:
            raise
        raise ValueError(
            f"{path} is not a valid {path.suffix} file ({err}): compress it again "
            "or pass the uncompressed CSV file"
        ) from None
    table = pd.DataFrame(rows, columns=header, dtype=object)
    return table, lines


def guess_column(name: str, columns: list[str]) -> str | None:
    """Return the column that a missing column name probably means, or None.

    A name that differs from a column only in case, or by a typo (difflib
    similarity of at least 0.6), probably means that column, so messages
    name it instead of advising a rename.
    """
    same_letters = [column for column in columns if column.lower() == name.lower()]
    close = same_letters or difflib.get_close_matches(name, columns, n=1, cutoff=0.6)
    return close[0] if close else None


def _missing_columns_message(
    path: Path,
    columns: list[str],
    missing: list[str],
    formula_column: str,
    target_column: str,
) -> str:
    """Explain a missing formula or target column and how to fix it."""
    hint = separator_hint(columns)
    if hint is not None:
        return (
            f"{path} has one column, {columns[0]!r}: {hint}, and the columns "
            f"{formula_column!r} and {target_column!r}"
        )
    guesses = []
    for name in missing:
        guess = guess_column(name, columns)
        if guess is not None:
            guesses.append(f"{guess!r} for {name!r}")
    listed = ", ".join(repr(m) for m in missing)
    if guesses:
        return (
            f"{path} has no column(s) {listed}; its columns are {columns}: did you "
            f"mean {' and '.join(guesses)}? Column names are case-sensitive; pass "
            "them as the header spells them with --formula-column and "
            "--target-column (formula_column= and target_column= in Python)"
        )
    return (
        f"{path} has no column(s) {listed}; its "
        f"columns are {columns}: name its formula and target columns with "
        "--formula-column and --target-column (formula_column= and "
        "target_column= in Python), or rename them to "
        f"{formula_column!r} and {target_column!r}"
    )


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
        eV/atom), in file order, with a RangeIndex. When a composition
        repeats, a fifth column, composition, contains each row's key
        (:func:`dvmrl.compositions.composition_key`), on which the splits keep
        repeated rows together.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: for an empty or malformed file, a missing or repeated
            column, or rows with a missing, NaN, non-numeric or implausibly
            large target (above 1e7 eV/atom in magnitude) or an invalid
            formula. A target must be written as a plain decimal number,
            so "1_000" is rejected. The message names the line of the file
            where each bad row starts, counting blank lines (line 1 is the
            file's first line).
    """
    from dvmrl.compositions import composition_key, format_formula

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV file {str(path)!r} not found: check the path")
    table, lines = read_text_table(path)
    columns = list(table.columns)
    missing = [name for name in (formula_column, target_column) if name not in columns]
    if missing:
        message = _missing_columns_message(
            path, columns, missing, formula_column, target_column
        )
        raise ValueError(message)
    for name in dict.fromkeys((formula_column, target_column)):
        if columns.count(name) > 1:
            raise ValueError(
                f"{path} has {columns.count(name)} columns named {name!r}: rename "
                "or remove all but one of them"
            )
    if len(table) == 0:
        raise ValueError(f"{path} has a header line but no data rows")

    rows = []
    keys = []
    key_lines = []  # file line of each entry of keys
    errors = []
    formulas = table[formula_column].astype(str).str.strip()
    targets = table[target_column].astype(str).str.strip()
    for line, formula, target_text in zip(lines, formulas, targets, strict=True):
        fractions, formula_error = _check_formula(formula, metals_only, alloy_notation)
        target, target_error = _check_target(target_text)
        reasons = [reason for reason in (formula_error, target_error) if reason]
        if reasons:
            errors.append(f"line {line}: {'; '.join(reasons)}")
            continue
        symbols = sorted(fractions)
        # Fractions rounded to 6 decimals, so that one composition written two
        # ways (Ni3Al, Ni0.3Al0.1, or rounded by the file) gives one key.
        keys.append(composition_key(fractions))
        key_lines.append(line)
        text = format_formula(fractions) if alloy_notation else formula
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

    if not alloy_notation:
        from dvmrl.compositions import reads_as_alloy_notation

        ambiguous = [
            f"{formula} (line {line})"
            for (formula, *_), line in zip(rows, key_lines, strict=True)
            if reads_as_alloy_notation(formula)
        ]
        if ambiguous:
            logger.warning(
                "%s: %d formula(s) with a bracketed group, such as %s, were "
                "read in standard notation, where a group's number multiplies each "
                "of its elements; if their numbers are at.%% shares, pass "
                "--alloy-notation (alloy_notation=True)",
                path,
                len(ambiguous),
                ", ".join(ambiguous[:3]),
            )

    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["n_elements"] = frame["n_elements"].astype(np.int64)
    frame["target"] = frame["target"].astype(np.float64)
    magnitude = frame["target"].abs()
    large = magnitude > PLAUSIBLE_ABS_TARGET
    if large.any():
        largest = int(magnitude.to_numpy().argmax())
        logger.warning(
            "%s: %d of %d target(s) exceed %g eV/atom in magnitude (largest %g, "
            "line %d); dvmrl reads targets in eV/atom, so convert kJ/mol (divide "
            "by 96.485) or meV/atom (divide by 1000) first",
            path,
            int(large.sum()),
            len(frame),
            PLAUSIBLE_ABS_TARGET,
            float(frame["target"].iloc[largest]),
            key_lines[largest],
        )
    repeats = int(pd.Series(keys).duplicated().sum())
    if repeats:
        # The splits keep the rows of one composition in one part when this
        # column exists, so no composition is in both training and test.
        frame[COMPOSITION_COLUMN] = keys
        logger.warning(
            "%s: %d row(s) repeat the composition of an earlier row (%s); the "
            "splits keep such rows in one part, and a model trained or scored on "
            "them counts each of their targets, so consider keeping one row per "
            "composition, such as the lowest-energy polymorph",
            path,
            repeats,
            _repeat_examples(
                keys, key_lines, frame["formula"].tolist(), frame["target"].to_numpy()
            ),
        )
    return frame


def _repeat_examples(
    keys: list[str], lines: list[int], formulas: list[str], targets: np.ndarray
) -> str:
    """Describe the first repeated compositions: their lines and target range.

    A composition is named by the formula of its first row, as the file
    writes it.
    """
    groups: dict[str, list[int]] = {}
    for position, key in enumerate(keys):
        groups.setdefault(key, []).append(position)
    examples = []
    for positions in groups.values():
        if len(positions) < 2:
            continue
        values = targets[positions]
        where = ", ".join(str(lines[p]) for p in positions[:MAX_LISTED_ERRORS])
        examples.append(
            f"{formulas[positions[0]]} on lines {where}, targets {values.min():g} "
            f"to {values.max():g} eV/atom"
        )
        if len(examples) == 3:
            break
    return "; ".join(examples)
