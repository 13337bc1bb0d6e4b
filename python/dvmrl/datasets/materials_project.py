"""Download binary and ternary all-metal data from the Materials Project.

Uses the official mp-api client (``from mp_api.client import MPRester``),
an optional dependency: ``pip install "dvmrl[mp]"``. The API key comes from
a file named by the caller, else the environment variable ``MP_API_KEY``,
else ``PMG_MAPI_KEY`` (the environment variable or the .pmgrc.yaml
setting, as pymatgen reads it). Its format is checked before any network
call. The key is never printed, logged or written to a file, and error
messages from the client have it masked.

The query requests from the summary endpoint the materials with 2 or 3
elements and none of the non-metals (pymatgen ``Element.is_metal``), leaving
out deprecated materials and, where the installed mp-api offers the filter,
the GNoME materials (r2SCAN static calculations of predicted structures),
which the vendored data sets do not contain. The rows then go through the
same selection as the vendored data
(:func:`dvmrl.datasets.build.reduce_compositions`), which keeps one row per
reduced formula with the lowest value over polymorphs.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.metadata
import inspect
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dvmrl.datasets import build

logger = logging.getLogger(__name__)

API_KEY_URL = "https://next-gen.materialsproject.org/api"
KEY_ENV_VARS = ("MP_API_KEY", "PMG_MAPI_KEY")
# mp-api 0.46.5 rejects keys that are not 32 characters long, and current keys
# are 32 letters and digits.
API_KEY_PATTERN = re.compile(r"[A-Za-z0-9]{32}")
INSTALL_HINT = 'mp-api is not installed: run pip install "dvmrl[mp]"'

# Property name of the summary document -> (target_kind, stability threshold
# in eV/atom), matching the vendored data sets.
PROPERTIES = {
    "formation_energy_per_atom": ("formation_energy", 0.0),
    "energy_above_hull": ("energy_above_hull", 0.025),
}
SUMMARY_FIELDS = ["material_id", "formula_pretty", "nelements", "elements"]

# NOTE: summary documents carry no thermo_type field, so this is the default
# thermo type that mp-api 0.46.5 names for the current database (the mixed
# GGA/GGA+U/r2SCAN hull, in MPRester.get_entries_in_chemsys). A change of the
# default on the server side would not show here.
SUMMARY_THERMO_TYPE = "GGA_GGA+U_R2SCAN"

_CITATION = "A. Jain et al., APL Materials 1, 011002 (2013)"


class ApiKeyError(ValueError):
    """A missing or malformed Materials Project API key."""


class MissingDependencyError(RuntimeError):
    """The optional mp-api client is not installed."""


class QueryError(RuntimeError):
    """A failed Materials Project request: network, service or client error."""


def _key_help() -> str:
    return (
        f"get a key at {API_KEY_URL} (log in, then copy it from the API page) and "
        "set MP_API_KEY, or put it alone in a file readable only by you and pass "
        "--api-key-file"
    )


def check_api_key(key: str, source: str) -> str:
    """Check a key's format and return it stripped of surrounding whitespace.

    Args:
        key: the candidate key.
        source: where it came from, for the message (never the key itself).

    Raises:
        ApiKeyError: when the key is not 32 letters and digits. The message
            gives the length and the source but not the key.
    """
    # A key file saved as UTF-8 with a byte-order mark starts with U+FEFF.
    key = key.strip().lstrip("\ufeff").strip()
    if not API_KEY_PATTERN.fullmatch(key):
        reason = (
            f"is {len(key)} characters long"
            if len(key) != 32
            else "contains characters other than letters and digits"
        )
        raise ApiKeyError(
            f"the Materials Project API key from {source} is malformed: it "
            f"{reason}, but current keys are 32 letters and digits; {_key_help()}"
        )
    return key


def _pymatgen_settings_key() -> str | None:
    try:
        from pymatgen.core import SETTINGS
    except ImportError:
        return None
    value = SETTINGS.get("PMG_MAPI_KEY")
    return str(value) if value else None


def read_api_key(
    api_key_file: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """Find the Materials Project API key and check its format.

    Order: ``api_key_file``, then ``MP_API_KEY``, then ``PMG_MAPI_KEY`` in
    the environment, then the ``PMG_MAPI_KEY`` setting of pymatgen.

    Args:
        api_key_file: a file holding only the key.
        environ: the environment to read; default ``os.environ``.

    Raises:
        ApiKeyError: when no key is found or the key is malformed.
        FileNotFoundError: when ``api_key_file`` does not exist.
    """
    environ = os.environ if environ is None else environ
    if api_key_file is not None:
        path = Path(api_key_file)
        if not path.is_file():
            if API_KEY_PATTERN.fullmatch(str(api_key_file).strip()):
                # The caller passed the key itself; keep it out of the message.
                raise ApiKeyError(
                    "the API key file argument looks like an API key, not a file "
                    "path: put the key in a file and pass its path, or set MP_API_KEY"
                )
            raise FileNotFoundError(
                f"API key file {str(path)!r} not found: check the path, or set "
                "MP_API_KEY instead"
            )
        if path.stat().st_mode & 0o077:
            logger.warning(
                "API key file %s is readable by other users: chmod 600 it", path
            )
        return check_api_key(path.read_text(encoding="utf-8"), f"file {path}")
    for name in KEY_ENV_VARS:
        value = environ.get(name)
        if value and value.strip():
            return check_api_key(value, f"environment variable {name}")
    value = _pymatgen_settings_key()
    if value:
        return check_api_key(value, "the PMG_MAPI_KEY setting of pymatgen")
    raise ApiKeyError(f"no Materials Project API key found: {_key_help()}")


def non_metal_symbols() -> list[str]:
    """Return the symbols of elements 1 to 103 that pymatgen does not call metals."""
    from pymatgen.core import Element

    return [
        element.symbol
        for element in Element
        if element.Z <= 103 and not element.is_metal
    ]


def _default_rester() -> Callable:
    try:
        from mp_api.client import MPRester
    except ImportError:
        raise MissingDependencyError(INSTALL_HINT) from None
    return MPRester


def _field(document, name: str):
    """Read a field from an mp-api document object or a plain dict."""
    if isinstance(document, Mapping):
        return document.get(name)
    return getattr(document, name, None)


def _mask(text: str, key: str) -> str:
    return text.replace(key, "***") if key else text


def _database_version(client) -> str | None:
    version = getattr(client, "db_version", None)
    if version is None and hasattr(client, "get_database_version"):
        version = client.get_database_version()
    return None if version is None else str(version)


def _as_context(client):
    if hasattr(client, "__enter__"):
        return client
    return contextlib.nullcontext(client)


def _query(client, prop: str, chunk_size: int) -> tuple[list, dict[str, Any]]:
    """Run the summary search; return the documents and the filters sent."""
    search = client.materials.summary.search
    filters: dict[str, Any] = {
        "num_elements": (2, 3),
        "exclude_elements": non_metal_symbols(),
        "deprecated": False,
    }
    try:
        parameters = inspect.signature(search).parameters
    except (TypeError, ValueError):
        parameters = {}
    if "include_gnome" in parameters:
        # mp-api includes the GNoME materials by default (batch
        # gnome_r2scan_statics: r2SCAN static calculations of predicted
        # structures). The vendored sets, from Matbench v0.1, have none of
        # them, so fetched data leave them out too.
        filters["include_gnome"] = False
    fields = [*SUMMARY_FIELDS, prop]
    documents = list(search(**filters, fields=fields, chunk_size=chunk_size))
    return documents, filters


def _out_paths(out: str | os.PathLike) -> tuple[Path, Path]:
    out = Path(out)
    name = out.name
    if not (name.endswith(".csv") or name.endswith(".csv.gz")):
        raise ValueError(
            f"output path {str(out)!r} must end in .csv or .csv.gz (gzip-compressed)"
        )
    stem = name[: -len(".csv.gz")] if name.endswith(".csv.gz") else name[: -len(".csv")]
    metadata = out.with_name(f"{stem}.json")
    for path in (out, metadata):
        # Checked before the query, so that no download is wasted.
        if path.is_dir():
            raise ValueError(
                f"output path {str(path)!r} is a folder; choose a file name that "
                "no folder has"
            )
    if metadata.is_file() and not _is_own_metadata(metadata, name):
        raise FileExistsError(
            f"{str(metadata)!r} exists and is not the metadata of an earlier fetch "
            f"to {name}, so writing {name} would replace it; choose another --out "
            "name, or move that file"
        )
    return out, metadata


def _is_own_metadata(path: Path, csv_name: str) -> bool:
    """Tell whether ``path`` is the JSON file of an earlier fetch to ``csv_name``.

    A fetch may replace its own earlier output, but not a file of the user's
    or the metadata of another CSV with the same stem (alloys.csv and
    alloys.csv.gz share alloys.json).
    """
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return (
        isinstance(document, dict)
        and document.get("name") == csv_name
        and str(document.get("source", "")).startswith("Materials Project summary")
    )


def fetch_materials_project(
    prop: str,
    out: str | os.PathLike,
    *,
    api_key_file: str | os.PathLike | None = None,
    rester: Callable | None = None,
    environ: Mapping[str, str] | None = None,
    chunk_size: int = 1000,
) -> dict:
    """Download all-metal binaries and ternaries and write them as a data set.

    Writes ``out`` (CSV, gzip-compressed when it ends in .gz) with the columns
    formula, chemsys, n_elements and target (eV/atom). Next to it goes a JSON
    file (``<stem>.json``) with the database version, the thermo type of the
    energies, the query, row counts and the licence.

    Args:
        prop: ``formation_energy_per_atom`` or ``energy_above_hull``.
        out: output CSV path.
        api_key_file: file holding the API key; see :func:`read_api_key`.
        rester: the client class ``mp_api.client.MPRester`` (the default) or
            a stand-in for it: a factory called as ``rester(api_key=key)``
            that returns a context manager with ``materials.summary.search``
            and ``db_version``, or such a client object itself.
        environ: the environment to read the key from; default ``os.environ``.
        chunk_size: documents per request.

    Returns:
        The metadata written to the JSON file.

    Raises:
        ValueError: for an unknown property or output suffix.
        FileExistsError: when ``<stem>.json`` exists and is not the metadata
            of an earlier fetch to the same CSV (before any request).
        ApiKeyError: when the key is missing or malformed (before any request).
        MissingDependencyError: when mp-api is not installed and no
            ``rester`` is given.
        QueryError: when the query fails; the key is masked in the message.
    """
    if prop not in PROPERTIES:
        raise ValueError(
            f"unknown property {prop!r}: expected one of {list(PROPERTIES)}"
        )
    out_csv, out_json = _out_paths(out)
    key = read_api_key(api_key_file, environ)
    factory = _default_rester() if rester is None else rester

    logger.info("querying the Materials Project summary endpoint for %s", prop)
    try:
        # A class or factory gets the checked key. A client object passed in
        # already carries its own key and is used as it is.
        client_or_manager = factory(api_key=key) if callable(factory) else factory
        with _as_context(client_or_manager) as client:
            db_version = _database_version(client)
            documents, filters = _query(client, prop, chunk_size)
    except Exception as err:  # noqa: BLE001 - re-raised with the key masked
        message = _mask(f"{type(err).__name__}: {err}", key)
        raise QueryError(f"Materials Project query failed: {message}") from None

    formulas = []
    targets = []
    for document in documents:
        formula = _field(document, "formula_pretty")
        value = _field(document, prop)
        try:
            target = float("nan") if value is None else float(value)
        except (TypeError, ValueError):
            raise QueryError(
                f"the Materials Project returned {prop} = {value!r} for {formula}, "
                "which is not a number; check the property name, or retry later"
            ) from None
        formulas.append(formula)
        targets.append(target)
    reduced = build.reduce_compositions(formulas, targets)
    frame = reduced.frame
    if frame.empty:
        raise QueryError(
            f"the Materials Project returned {len(documents)} documents and none "
            "is a binary or ternary all-metal composition with a value; check the "
            "query"
        )
    csv = build.csv_bytes(frame)
    payload = build.gzip_bytes(csv) if out_csv.name.endswith(".gz") else csv
    target_kind, threshold = PROPERTIES[prop]
    metadata = {
        "name": out_csv.name,
        "source": "Materials Project summary endpoint (live query with mp-api)",
        "property": prop,
        "target_kind": target_kind,
        "units": "eV/atom",
        "stability_threshold": threshold,
        "stability_rule": "a composition is stable when target <= stability_threshold",
        "database_version": db_version,
        "thermo_type": SUMMARY_THERMO_TYPE,
        # A JSON round trip turns the tuple of num_elements into a list.
        "query": json.loads(json.dumps(filters)),
        "mp_api_version": _package_version("mp-api"),
        "retrieved_at": datetime.datetime.now(datetime.UTC).isoformat(
            timespec="seconds"
        ),
        "documents": len(documents),
        "rows": len(frame),
        "binaries": int((frame["n_elements"] == 2).sum()),
        "ternaries": int((frame["n_elements"] == 3).sum()),
        "implausibility_rule": build.IMPLAUSIBILITY_RULE,
        "rows_dropped": reduced.dropped,
        "licence": "CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/)",
        "citations": [_CITATION],
        "attribution": (
            f"Materials Project data, released under CC BY 4.0; cite {_CITATION}."
        ),
        "csv_sha256": hashlib.sha256(csv).hexdigest(),
    }
    build.write_atomic(out_csv, payload)
    build.write_atomic(out_json, (json.dumps(metadata, indent=2) + "\n").encode())
    logger.info(
        "wrote %s: %d compositions from %d documents (database %s)",
        out_csv,
        len(frame),
        len(documents),
        db_version,
    )
    return metadata


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
