"""Train / validation / test splits of a data set.

Kinds:

- ``random``: rows drawn at random. In data that repeat a composition
  (polymorphs in a user's file), the rows of one composition are drawn
  together, here and in the validation pools of every kind.
- ``chemsys``: whole chemical systems held out. The test and the validation
  pool each get complete systems, so no system appears in two parts.
- ``element``: every composition that contains ``holdout_element`` forms the
  test part; the validation pool is drawn at random from the rest.
- ``binary-to-ternary``: the ternaries form the test part and the binaries
  are divided into train and validation pool. Rows with one element or
  more than three are in no part.

The test part is cut with the fixed seed :data:`TEST_SEED` and depends only
on the data, the kind, ``holdout_element`` and ``test_fraction``. The
``seed`` of a run changes only the division of the remaining rows into train
and validation pool. Index arrays are positions (``df.iloc``), sorted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dvmrl._files import write_atomic, write_text_atomic
from dvmrl.datasets._vendored import COMPOSITION_COLUMN
from dvmrl.layout import is_integral

logger = logging.getLogger(__name__)

KINDS = ("random", "chemsys", "element", "binary-to-ternary")

# Seed of the test cut, fixed so that every run on a data set shares one test part.
TEST_SEED = 20_240_601


class EmptyTrainingPartError(ValueError):
    """A split left no training row, because the data have too few rows or groups.

    ``cause`` gives the reason without the advice, which depends on the
    caller's options.
    """

    def __init__(self, message: str, cause: str = "") -> None:
        super().__init__(message)
        self.cause = cause or message


@dataclass(frozen=True)
class Split:
    """Index arrays of one split; positions into the data frame, int64, sorted."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    kind: str
    seed: int
    data_fingerprint: str
    holdout_element: str | None = None
    params: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        """Return a SHA-256 hex digest of the data fingerprint, kind and indices.

        Checkpoints store it to detect a resumed run on other data or splits.
        """
        digest = hashlib.sha256()
        digest.update(self.data_fingerprint.encode())
        digest.update(self.kind.encode())
        for part in (self.train, self.val, self.test):
            digest.update(np.int64(len(part)).tobytes())
            digest.update(np.ascontiguousarray(part, dtype="<i8").tobytes())
        return digest.hexdigest()

    def sizes(self) -> dict[str, int]:
        """Return the number of rows in each part."""
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def to_dict(self) -> dict:
        """Return a JSON-ready dict of the indices and the split settings."""
        return {
            "kind": self.kind,
            "seed": self.seed,
            "holdout_element": self.holdout_element,
            "params": dict(self.params),
            "test_seed": TEST_SEED,
            "data_fingerprint": self.data_fingerprint,
            "fingerprint": self.fingerprint(),
            "train": self.train.tolist(),
            "val": self.val.tolist(),
            "test": self.test.tolist(),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the split to ``.npz`` (numpy arrays) or ``.json``, atomically.

        Raises:
            ValueError: when the suffix is neither ``.npz`` nor ``.json``.
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".npz", ".json"):
            raise ValueError(f"split file {str(path)!r} must end in .npz or .json")
        if suffix == ".json":
            # allow_nan=False keeps the file valid JSON (NaN is not JSON).
            write_text_atomic(path, json.dumps(self.to_dict(), allow_nan=False) + "\n")
            return
        meta = {
            k: v for k, v in self.to_dict().items() if k not in ("train", "val", "test")
        }
        write_atomic(
            path,
            lambda handle: np.savez(
                handle,
                train=self.train,
                val=self.val,
                test=self.test,
                meta=np.array(json.dumps(meta, allow_nan=False)),
            ),
            binary=True,
        )


def load_split(path: str | os.PathLike) -> Split:
    """Read a split written by :meth:`Split.save`.

    Raises:
        ValueError: when the file is not a split file or its fingerprint
            does not match its indices.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".npz"):
        raise ValueError(f"split file {str(path)!r} must end in .npz or .json")
    try:
        if suffix == ".json":
            record = json.loads(path.read_text(encoding="utf-8"))
            arrays = {part: record[part] for part in ("train", "val", "test")}
        else:
            with np.load(path, allow_pickle=False) as archive:
                record = json.loads(str(archive["meta"]))
                arrays = {part: archive[part] for part in ("train", "val", "test")}
        split = Split(
            **{
                part: np.asarray(values, dtype=np.int64)
                for part, values in arrays.items()
            },
            kind=record["kind"],
            seed=int(record["seed"]),
            data_fingerprint=record["data_fingerprint"],
            holdout_element=record.get("holdout_element"),
            params=record.get("params", {}),
        )
        stored = record["fingerprint"]
    except (KeyError, TypeError, ValueError) as err:
        # A JSON list, a foreign .npz archive or a missing entry all end here.
        raise ValueError(
            f"{str(path)!r} is not a split file of `dvmrl data split` "
            f"({type(err).__name__}: {err}); write one with `dvmrl data split`"
        ) from err
    if split.fingerprint() != stored:
        raise ValueError(
            f"split file {str(path)!r} is corrupt: its fingerprint does not match "
            "its indices; write it again with `dvmrl data split`"
        )
    return split


def data_fingerprint(df: pd.DataFrame) -> str:
    """Return a SHA-256 hex digest of the formulas and targets, in row order."""
    digest = hashlib.sha256()
    digest.update("\n".join(df["formula"].astype(str)).encode("utf-8"))
    digest.update(np.ascontiguousarray(df["target"].to_numpy(), dtype="<f8").tobytes())
    return digest.hexdigest()


# Kinds whose test part is a share of the rows set by test_fraction.
FRACTION_KINDS = ("random", "chemsys")
# Default shares of the test part and the validation pool (make_split).
TEST_FRACTION = 0.1
VAL_FRACTION = 0.1


def fewest_rows(share: float, needed: int = 1) -> int:
    """Return the smallest row count n for which round(share * n) >= needed.

    The random split draws round(share * n) rows for its test part and its
    validation pool, and Python rounds halves to even, so 15 rows give a
    10 % share 2 rows and 14 rows give it 1.
    """
    count = max(1, math.floor((needed - 0.5) / share) - 1)
    while round(share * count) < needed:
        count += 1
    return count


def _check_fractions(kind: str, test_fraction: float, val_fraction: float) -> None:
    for name, value in (
        ("test_fraction", test_fraction),
        ("val_fraction", val_fraction),
    ):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    if kind in FRACTION_KINDS and test_fraction + val_fraction >= 1.0:
        raise ValueError(
            f"test_fraction + val_fraction must be below 1 to leave training rows, "
            f"got {test_fraction} + {val_fraction}"
        )


def _warn_lopsided(
    kind: str,
    part: str,
    n_rows: int,
    n_train: int,
    n_part: int,
    share: tuple[str, float] | None,
) -> None:
    """Warn when the test or validation part outgrows its share or the training part.

    The chemsys and element splits and data with repeated compositions take
    whole groups, so one large chemical system or held-out element can leave
    the model few training rows and test or select it on most of the data.

    Args:
        part: "test" or "validation".
        share: (option name, expected rows) where the part has a set share.
    """
    if share is not None:
        name, expected = share
        if n_part > 2 * expected and n_part - expected >= 2:
            logger.warning(
                "the %s split puts %d of %d rows (%.0f %%) in the %s part, where "
                "%s asks for about %.0f, because it takes whole groups of rows "
                "and a large one overshoots; the metrics then score a model "
                "trained on %d rows",
                kind,
                n_part,
                n_rows,
                100.0 * n_part / n_rows,
                part,
                name,
                expected,
                n_train,
            )
            return
    # binary-to-ternary tests on every ternary by design.
    if n_train < n_part and not (kind == "binary-to-ternary" and part == "test"):
        logger.warning(
            "the %s split leaves %d of %d rows for training against %d in the %s "
            "part; the metrics then score a model trained on few rows, so use "
            "more data or another split",
            kind,
            n_train,
            n_rows,
            n_part,
            part,
        )


def _draw_rows(rows: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Draw ``count`` of ``rows`` at random without replacement."""
    return rng.permutation(rows)[:count]


def _draw_groups(
    rows: np.ndarray, groups: np.ndarray, target: float, rng: np.random.Generator
) -> np.ndarray:
    """Take whole groups in random order until at least ``target`` rows are taken.

    The groups are put in sorted order first, so the draw depends only on the
    group labels and the generator.
    """
    if target <= 0 or len(rows) == 0:
        return rows[:0]
    labels, inverse = np.unique(groups[rows], return_inverse=True)
    counts = np.bincount(inverse, minlength=len(labels))
    order = rng.permutation(len(labels))
    taken = np.cumsum(counts[order])
    n_groups = int(np.searchsorted(taken, target)) + 1
    chosen = np.zeros(len(labels), dtype=bool)
    chosen[order[: min(n_groups, len(labels))]] = True
    return rows[chosen[inverse]]


def repeated_compositions(df: pd.DataFrame) -> np.ndarray | None:
    """Return the canonical composition of each row when the data repeat one.

    ``load_csv`` adds that column to data with repeated compositions. A
    frame built another way (such as in Python with the four columns alone)
    gets the same keys from its formulas, so that no composition lands in
    two parts of a split. Data without repeats, such as the vendored data
    sets, return None and keep their row-wise draws.
    """
    if COMPOSITION_COLUMN in df.columns:
        return df[COMPOSITION_COLUMN].to_numpy(dtype=str)
    keys = np.array([formula_key(str(f)) for f in df["formula"]], dtype=str)
    if len(np.unique(keys)) == len(keys):
        return None
    return keys


def distinct_alloy_rows(df: pd.DataFrame, rows: np.ndarray) -> np.ndarray:
    """Mark each of ``rows`` whose composition a search can perturb, once.

    A single element has no fraction to move, and a composition that several
    rows repeat counts at its first row among ``rows``.

    Returns:
        bool [len(rows)], true for the rows kept.
    """
    keep = df["n_elements"].to_numpy()[rows] >= 2
    keys = repeated_compositions(df)
    if keys is not None:
        first = np.zeros(len(rows), dtype=bool)
        first[np.unique(keys[rows], return_index=True)[1]] = True
        keep &= first
    return keep


@functools.lru_cache(maxsize=1 << 17)
def formula_key(formula: str) -> str:
    """Return the key that dvmrl.datasets.load_csv gives a formula's composition.

    Cached, because the splits of one data set parse the same formulas again
    (about 0.4 s for the 18,400 of mp-formation-energy).
    """
    from dvmrl.compositions import CompositionError, composition_key, parse

    try:
        return composition_key(parse(formula))
    except CompositionError:
        # The split needs no parsed formula; featurising reports bad ones.
        return formula.strip()


def _element_mask(df: pd.DataFrame, element: str) -> np.ndarray:
    pattern = rf"(?:^|-){re.escape(element)}(?:-|$)"
    return df["chemsys"].astype(str).str.contains(pattern, regex=True).to_numpy(bool)


def _check_holdout_element(df: pd.DataFrame, element: str | None) -> str:
    if element is None:
        raise ValueError(
            "the element split needs holdout_element (--holdout-element), e.g. 'Ni'"
        )
    from dvmrl.compositions import element_symbol_problem

    element = str(element).strip()
    # dvmrl's element table, not pymatgen's, which also reads D, T and
    # elements beyond Lr that no composition here can contain.
    problem = element_symbol_problem(element)
    if problem is not None:
        raise ValueError(f"holdout_element (--holdout-element): {problem}")
    return element


def _test_part(
    df: pd.DataFrame,
    kind: str,
    holdout_element: str | None,
    test_fraction: float,
    compositions: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (test rows, rows left for train and validation).

    ``compositions`` is the output of :func:`repeated_compositions`.
    """
    n = len(df)
    rows = np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(TEST_SEED)
    if kind == "random" and compositions is not None:
        test = _draw_groups(rows, compositions, test_fraction * n, rng)
    elif kind == "random":
        test = _draw_rows(rows, int(round(test_fraction * n)), rng)
    elif kind == "chemsys":
        test = _draw_groups(
            rows, df["chemsys"].to_numpy(dtype=str), test_fraction * n, rng
        )
    elif kind == "element":
        mask = _element_mask(df, holdout_element)
        if not mask.any():
            raise ValueError(
                f"no composition in the data contains {holdout_element!r}: choose an "
                "element that occurs in it (see `dvmrl data info`)"
            )
        if mask.all():
            raise ValueError(
                f"every composition contains {holdout_element!r}, so holding it out "
                "leaves no training data: choose another element"
            )
        test = rows[mask]
    else:
        n_elements = df["n_elements"].to_numpy()
        if not (n_elements == 3).any():
            raise ValueError("binary-to-ternary split: the data contain no ternaries")
        if not (n_elements == 2).any():
            raise ValueError("binary-to-ternary split: the data contain no binaries")
        test = rows[n_elements == 3]
        rows = rows[n_elements == 2]
        return np.sort(test), rows
    rest = np.setdiff1d(rows, test, assume_unique=True)
    return np.sort(test), rest


def make_split(
    df: pd.DataFrame,
    kind: str,
    seed: int = 0,
    holdout_element: str | None = None,
    test_fraction: float = TEST_FRACTION,
    val_fraction: float = VAL_FRACTION,
    rows: np.ndarray | None = None,
) -> Split:
    """Split a data frame into train, validation pool and test rows.

    Args:
        df: a data set frame (columns formula, chemsys, n_elements, target).
        kind: one of :data:`KINDS`.
        seed: seed of the train / validation division; the test part never
            depends on it.
        holdout_element: element symbol held out by the ``element`` kind.
        test_fraction: share of rows in the test part for ``random`` and
            ``chemsys``, where ``chemsys`` takes whole systems until the share
            is reached. The other kinds define their test part themselves.
        val_fraction: share of all rows in the validation pool. The
            ``chemsys`` kind takes whole systems here too, and
            ``binary-to-ternary`` takes the share of the binaries.
        rows: positions in ``df`` of the rows to split, such as those that
            pass a screen; default: every row. The split is made as if
            ``df.iloc[rows]`` were the data, but its indices are positions
            in ``df``, its data fingerprint is that of all of ``df``, and
            the other rows are in no part.

    Returns:
        The :class:`Split`; its three parts are disjoint.

    Raises:
        ValueError: for an unknown kind, a negative seed, a fraction outside
            [0, 1), a test and validation share that add up to 1 or more
            for ``random`` and ``chemsys``, a missing or unknown
            ``holdout_element``, ``rows`` that are not distinct positions in
            ``df``, or data that leave the training part empty. The test
            and validation parts of a few rows may be empty (5 rows at the
            default shares give none), so callers that need them check
            their sizes, as the command line does.
    """
    if kind not in KINDS:
        raise ValueError(
            f"unknown split kind {kind!r}: expected one of {', '.join(KINDS)}"
        )
    missing = {"formula", "chemsys", "n_elements", "target"} - set(df.columns)
    if missing:
        raise ValueError(f"data frame lacks the column(s) {sorted(missing)}")
    if rows is not None:
        return _split_rows(
            df, rows, kind, seed, holdout_element, test_fraction, val_fraction
        )
    if len(df) < 3:
        raise ValueError(f"cannot split {len(df)} row(s): need at least 3")
    _check_fractions(kind, test_fraction, val_fraction)
    if kind == "element":
        holdout_element = _check_holdout_element(df, holdout_element)
    elif holdout_element is not None:
        raise ValueError(
            f"holdout_element={holdout_element!r} applies only to the element split, "
            f"not to {kind!r}"
        )
    # int(1.5) would quietly give the split of seed 1, and True that of 1.
    if not is_integral(seed) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    seed = int(seed)

    compositions = repeated_compositions(df)
    test, rest = _test_part(df, kind, holdout_element, test_fraction, compositions)
    rng = np.random.default_rng(seed)
    base = len(rest) if kind == "binary-to-ternary" else len(df)
    if kind == "chemsys":
        val = _draw_groups(
            rest, df["chemsys"].to_numpy(dtype=str), val_fraction * base, rng
        )
    elif compositions is not None:
        val = _draw_groups(rest, compositions, val_fraction * base, rng)
    else:
        val = _draw_rows(rest, int(round(val_fraction * base)), rng)
    val = np.sort(val)
    train = np.setdiff1d(rest, val, assume_unique=True)
    if len(train) == 0:
        shares = "val_fraction"
        if kind in FRACTION_KINDS:
            shares = "test_fraction or val_fraction"
        if kind == "chemsys":
            reason = (
                "its test and validation parts take whole chemical systems, and the "
                f"data have only {df['chemsys'].nunique()}"
            )
        elif compositions is not None:
            reason = (
                "its test and validation parts keep the rows of a composition "
                f"together, and the data have only {len(set(compositions))} "
                "distinct compositions"
            )
        else:
            reason = "its test and validation parts took every row"
        cause = f"the {kind} split of {len(df)} rows leaves no training rows: {reason}"
        raise EmptyTrainingPartError(
            f"{cause}; use more data, or lower {shares}", cause=cause
        )
    test_share = None
    if kind in FRACTION_KINDS:
        test_share = ("test_fraction", test_fraction * len(df))
    _warn_lopsided(kind, "test", len(df), len(train), len(test), test_share)
    val_share = ("val_fraction", val_fraction * base)
    _warn_lopsided(kind, "validation", len(df), len(train), len(val), val_share)
    params = {"test_fraction": test_fraction, "val_fraction": val_fraction}
    return Split(
        train=train.astype(np.int64),
        val=val.astype(np.int64),
        test=test.astype(np.int64),
        kind=kind,
        seed=seed,
        data_fingerprint=data_fingerprint(df),
        holdout_element=holdout_element,
        params=params,
    )


def _split_rows(
    df: pd.DataFrame,
    rows: np.ndarray,
    kind: str,
    seed: int,
    holdout_element: str | None,
    test_fraction: float,
    val_fraction: float,
) -> Split:
    """Split ``df.iloc[rows]`` and give the parts as positions in ``df``."""
    rows = np.asarray(rows)
    if rows.ndim != 1 or (rows.size and not np.issubdtype(rows.dtype, np.integer)):
        raise ValueError("rows must be a 1-D array of integer positions")
    rows = rows.astype(np.int64)
    if rows.size and (rows.min() < 0 or rows.max() >= len(df)):
        raise ValueError(
            f"rows must be positions in the data frame, 0 to {len(df) - 1}, got "
            f"{int(rows.min())} to {int(rows.max())}"
        )
    if len(np.unique(rows)) != len(rows):
        raise ValueError("rows must not repeat a position")
    subset = df.iloc[rows].reset_index(drop=True)
    split = make_split(subset, kind, seed, holdout_element, test_fraction, val_fraction)
    return Split(
        train=np.sort(rows[split.train]),
        val=np.sort(rows[split.val]),
        test=np.sort(rows[split.test]),
        kind=split.kind,
        seed=split.seed,
        data_fingerprint=data_fingerprint(df),
        holdout_element=split.holdout_element,
        params=split.params,
    )
