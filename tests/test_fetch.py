"""Materials Project fetch, run against a local stand-in for MPRester.

CI cannot reach the Materials Project, so these tests pass a stand-in client
in place of ``mp_api.client.MPRester``. The stand-in mimics the real client's
``materials.summary.search(...)`` call. It rejects keyword arguments and
``fields`` that the installed mp-api would not accept. It filters documents
the way the server does for ``num_elements``, ``exclude_elements`` and
``deprecated``. It returns the document objects that mp-api itself builds from
the server's JSON (``mp_api.client.core.schemas._convert_to_model``).
"""

from __future__ import annotations

import functools
import gzip
import inspect
import json
import logging
import sys

import pytest

from dvmrl import datasets
from dvmrl.cli import main
from dvmrl.datasets import materials_project as mp

KEY = "AbCdEfGhIjKlMnOpQrStUvWxYz012345"
assert len(KEY) == 32

# Server-side documents: field values as the summary endpoint returns them.
DOCUMENTS = [
    ("mp-1", "Ni3Al", ["Al", "Ni"], -0.40, 0.000, False),
    ("mp-2", "Ni3Al", ["Al", "Ni"], -0.30, 0.100, False),  # higher polymorph
    ("mp-3", "AlNi", ["Al", "Ni"], -0.60, 0.000, False),
    ("mp-4", "TiAlNi2", ["Al", "Ni", "Ti"], -0.50, 0.020, False),
    ("mp-5", "Fe2O3", ["Fe", "O"], -1.70, 0.000, False),  # non-metal
    ("mp-6", "CoCrFeNi", ["Co", "Cr", "Fe", "Ni"], 0.05, 0.100, False),  # quaternary
    ("mp-7", "Cu", ["Cu"], 0.00, 0.000, False),  # unary
    ("mp-8", "CuZn", ["Cu", "Zn"], -0.10, 0.010, True),  # deprecated
    ("mp-9", "MgZn2", ["Mg", "Zn"], None, None, False),  # no value
]


def _server_document(record) -> dict:
    material_id, formula, elements, e_form, e_hull, deprecated = record
    document = {
        "material_id": material_id,
        "formula_pretty": formula,
        "elements": elements,
        "nelements": len(elements),
        "deprecated": deprecated,
    }
    if e_form is not None:
        document["formation_energy_per_atom"] = e_form
        document["energy_above_hull"] = e_hull
    return document


def _client_documents(documents: list[dict], fields: list[str]) -> list:
    """Build the document objects the real client returns for ``fields``."""
    try:
        from emmet.core.summary import SummaryDoc
        from mp_api.client.core.schemas import _convert_to_model
    except ImportError:
        from types import SimpleNamespace

        return [
            SimpleNamespace(**{k: d[k] for k in fields if k in d}) for d in documents
        ]
    trimmed = [{k: d[k] for k in fields if k in d} for d in documents]
    return _convert_to_model(trimmed, SummaryDoc, requested_fields=fields)


def _check_search_arguments(kwargs: dict) -> None:
    """Raise TypeError for arguments the installed mp-api search would reject."""
    try:
        from emmet.core.summary import SummaryDoc
        from mp_api.client.routes.materials.summary import SummaryRester
    except ImportError:
        return
    accepted = set(inspect.signature(SummaryRester.search).parameters) - {"self"}
    unknown = set(kwargs) - accepted
    if unknown:
        raise TypeError(f"SummaryRester.search got unknown arguments {sorted(unknown)}")
    bad_fields = set(kwargs.get("fields") or []) - set(SummaryDoc.model_fields)
    if bad_fields:
        raise TypeError(f"fields not in SummaryDoc: {sorted(bad_fields)}")


class StandInSummary:
    """Stand-in for ``MPRester().materials.summary``."""

    def __init__(self, owner: StandInMPRester):
        self.owner = owner

    def search(self, include_gnome=True, **kwargs):
        _check_search_arguments(kwargs)
        self.owner.searches.append({**kwargs, "include_gnome": include_gnome})
        if self.owner.error is not None:
            raise self.owner.error
        low, high = kwargs.get("num_elements", (1, 8))
        excluded = set(kwargs.get("exclude_elements") or [])
        selected = []
        for record in self.owner.records:
            document = _server_document(record)
            if kwargs.get("deprecated") is False and document["deprecated"]:
                continue
            if not low <= document["nelements"] <= high:
                continue
            if excluded & set(document["elements"]):
                continue
            selected.append(document)
        return _client_documents(selected, kwargs["fields"])


class StandInMPRester:
    """Stand-in for ``mp_api.client.MPRester``: a context manager with a key."""

    instances: list[StandInMPRester] = []

    def __init__(self, api_key=None, records=DOCUMENTS, error=None, **kwargs):
        self.api_key = api_key
        self.records = records
        self.error = error
        self.kwargs = kwargs
        self.searches: list[dict] = []
        self.db_version = "2025.09.25"
        self.entered = False
        self.closed = False
        self.materials = type("Materials", (), {})()
        self.materials.summary = StandInSummary(self)
        StandInMPRester.instances.append(self)

    def __enter__(self):
        self.entered = True
        return self

    def __exit__(self, *exc_info):
        self.closed = True
        return False


@pytest.fixture(autouse=True)
def clean_key_sources(monkeypatch):
    """Remove every key source of the test machine; reset the stand-in log."""
    for name in mp.KEY_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(mp, "_pymatgen_settings_key", lambda: None)
    StandInMPRester.instances.clear()


def _fetch(tmp_path, prop="formation_energy_per_atom", **kwargs):
    kwargs.setdefault("environ", {"MP_API_KEY": KEY})
    kwargs.setdefault("rester", StandInMPRester)
    return mp.fetch_materials_project(prop, tmp_path / "mp.csv", **kwargs)


# ---------------------------------------------------------------------------
# Fetch against the stand-in


def test_fetch_writes_dataset(tmp_path):
    metadata = _fetch(tmp_path)
    frame = datasets.load_csv(tmp_path / "mp.csv")
    assert frame["formula"].tolist() == ["AlNi", "AlNi3", "TiAlNi2"]
    assert frame["target"].tolist() == [-0.60, -0.40, -0.50]
    assert frame["n_elements"].tolist() == [2, 2, 3]
    assert metadata["rows"] == 3
    assert metadata["documents"] == 5


def test_fetch_metadata_file(tmp_path):
    _fetch(tmp_path, prop="energy_above_hull")
    metadata = json.loads((tmp_path / "mp.json").read_text())
    assert metadata["database_version"] == "2025.09.25"
    assert metadata["thermo_type"] == "GGA_GGA+U_R2SCAN"
    assert metadata["property"] == "energy_above_hull"
    assert metadata["target_kind"] == "energy_above_hull"
    assert metadata["stability_threshold"] == 0.025
    assert metadata["units"] == "eV/atom"
    assert metadata["rows_dropped"]["missing_target"] == 1
    assert metadata["rows_dropped"]["higher_energy_polymorph"] == 1
    assert "APL Materials 1, 011002 (2013)" in metadata["attribution"]
    assert metadata["query"]["include_gnome"] is False
    assert metadata["query"]["num_elements"] == [2, 3]


def test_fetch_rejects_non_numeric_value(tmp_path):
    records = [("mp-1", "Ni3Al", ["Al", "Ni"], "n/a", 0.0, False)]

    class TextValues(StandInSummary):
        def search(self, include_gnome=True, **kwargs):
            fields = kwargs["fields"]
            return [
                {k: v for k, v in _server_document(r).items() if k in fields}
                for r in records
            ]

    def factory(api_key):
        client = StandInMPRester(api_key)
        client.materials.summary = TextValues(client)
        return client

    expected = "formation_energy_per_atom = 'n/a' for Ni3Al"
    with pytest.raises(mp.QueryError, match=expected):
        _fetch(tmp_path, rester=factory)
    assert not (tmp_path / "mp.csv").exists()


def test_fetched_file_keeps_target_kind(tmp_path, caplog):
    _fetch(tmp_path, prop="energy_above_hull")
    frame, info = datasets.resolve_data(tmp_path / "mp.csv")
    assert len(frame) == 3
    assert info["target_kind"] == "energy_above_hull"
    assert info["stability_threshold"] == 0.025
    assert info["database_version"] == "2025.09.25"
    assert "CC BY 4.0" in info["licence"]
    assert "APL Materials 1, 011002 (2013)" in info["attribution"]
    # An edited CSV file no longer matches the metadata file's checksum.
    with open(tmp_path / "mp.csv", "a") as handle:
        handle.write("CoNi,Co-Ni,2,0.1\n")
    _, edited = datasets.resolve_data(tmp_path / "mp.csv")
    assert edited["target_kind"] == "formation_energy"
    assert edited["attribution"] == "user-supplied data"
    assert "describes another version of mp.csv" in caplog.text


def test_fetch_query_arguments(tmp_path):
    _fetch(tmp_path)
    (client,) = StandInMPRester.instances
    assert client.api_key == KEY
    assert client.entered
    assert client.closed
    (query,) = client.searches
    assert query["num_elements"] == (2, 3)
    assert query["deprecated"] is False
    assert query["include_gnome"] is False
    assert "O" in query["exclude_elements"]
    assert "Ni" not in query["exclude_elements"]
    assert "formation_energy_per_atom" in query["fields"]
    assert "formula_pretty" in query["fields"]


def test_fetch_gzip_output(tmp_path):
    mp.fetch_materials_project(
        "energy_above_hull",
        tmp_path / "hull.csv.gz",
        environ={"MP_API_KEY": KEY},
        rester=StandInMPRester,
    )
    assert gzip.decompress((tmp_path / "hull.csv.gz").read_bytes()).startswith(
        b"formula,"
    )
    assert (tmp_path / "hull.json").is_file()
    frame, info = datasets.resolve_data(tmp_path / "hull.csv.gz")
    assert frame["target"].tolist() == [0.0, 0.0, 0.02]
    assert info["rows"] == 3


def test_fetch_keeps_foreign_json(tmp_path):
    # Stand-in client: the Materials Project API cannot be reached from here.
    notes = tmp_path / "hull.json"
    notes.write_text('{"experiment": "my own notes"}\n')
    with pytest.raises(FileExistsError, match="is not the metadata of an earlier"):
        mp.fetch_materials_project(
            "energy_above_hull",
            tmp_path / "hull.csv",
            environ={"MP_API_KEY": KEY},
            rester=StandInMPRester,
        )
    assert notes.read_text() == '{"experiment": "my own notes"}\n'
    assert not (tmp_path / "hull.csv").exists()
    assert StandInMPRester.instances == []


def test_fetch_replaces_only_its_own_metadata(tmp_path):
    fetch = functools.partial(
        mp.fetch_materials_project,
        "energy_above_hull",
        environ={"MP_API_KEY": KEY},
        rester=StandInMPRester,
    )
    fetch(tmp_path / "hull.csv")
    first = (tmp_path / "hull.json").read_text()
    # A second fetch to the same CSV refreshes both files.
    fetch(tmp_path / "hull.csv")
    assert json.loads((tmp_path / "hull.json").read_text())["name"] == "hull.csv"
    # hull.csv.gz would share hull.json with hull.csv, whose metadata stays.
    with pytest.raises(FileExistsError, match="earlier fetch to hull.csv.gz"):
        fetch(tmp_path / "hull.csv.gz")
    assert json.loads((tmp_path / "hull.json").read_text())["name"] == "hull.csv"
    assert json.loads(first)["name"] == "hull.csv"


def test_fetch_client_object(tmp_path):
    client = StandInMPRester(api_key=KEY)
    metadata = _fetch(tmp_path, rester=client)
    assert metadata["rows"] == 3
    assert client.closed


def test_fetch_bad_property(tmp_path):
    with pytest.raises(ValueError, match="unknown property 'band_gap'"):
        _fetch(tmp_path, prop="band_gap")


def test_fetch_bad_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"must end in \.csv or \.csv\.gz"):
        mp.fetch_materials_project(
            "energy_above_hull",
            tmp_path / "mp.parquet",
            environ={"MP_API_KEY": KEY},
            rester=StandInMPRester,
        )
    assert StandInMPRester.instances == []


def test_fetch_no_metals(tmp_path):
    factory = lambda api_key: StandInMPRester(api_key, records=DOCUMENTS[4:7])  # noqa: E731
    with pytest.raises(mp.QueryError, match="returned 0 documents and none"):
        _fetch(tmp_path, rester=factory)
    assert not (tmp_path / "mp.csv").exists()


def test_fetch_error_masks_key(tmp_path):
    error = ConnectionError(f"REST query failed with headers {{'x-api-key': '{KEY}'}}")
    factory = lambda api_key: StandInMPRester(api_key, error=error)  # noqa: E731
    with pytest.raises(RuntimeError, match="Materials Project query failed") as caught:
        _fetch(tmp_path, rester=factory)
    assert KEY not in str(caught.value)
    assert "***" in str(caught.value)
    assert caught.value.__cause__ is None


# ---------------------------------------------------------------------------
# API key checks


def test_key_missing(tmp_path):
    with pytest.raises(mp.ApiKeyError, match="no Materials Project API key found"):
        _fetch(tmp_path, environ={})
    assert StandInMPRester.instances == []


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        ("0123456789abcdef", "it is 16 characters long"),
        ("", "it is 0 characters long"),
        ("AbCdEfGhIjKlMnOpQrStUvWxYz0123456", "it is 33 characters long"),
        ("AbCdEfGhIjKlMnOp-QrStUvWxYz01234", "it contains characters other than"),
        ("AbCdEfGhIjKlMnOp_rStUvWxYz012345", "it contains characters other than"),
    ],
)
def test_key_malformed(key, reason):
    with pytest.raises(mp.ApiKeyError, match=reason) as caught:
        mp.check_api_key(key, "environment variable MP_API_KEY")
    assert "next-gen.materialsproject.org/api" in str(caught.value)
    if key:
        assert key not in str(caught.value)


def test_key_malformed_env(tmp_path):
    bad = "x" * 20
    with pytest.raises(mp.ApiKeyError, match="from environment variable MP_API_KEY"):
        _fetch(tmp_path, environ={"MP_API_KEY": bad})
    assert StandInMPRester.instances == []


def test_key_env_order():
    other = "Z" * 32
    assert mp.read_api_key(environ={"MP_API_KEY": KEY, "PMG_MAPI_KEY": other}) == KEY
    assert mp.read_api_key(environ={"PMG_MAPI_KEY": other}) == other


def test_key_pymatgen_setting(monkeypatch):
    monkeypatch.setattr(mp, "_pymatgen_settings_key", lambda: KEY)
    assert mp.read_api_key(environ={}) == KEY


def test_key_file_wins(tmp_path):
    path = tmp_path / "key"
    path.write_text(KEY + "\n")
    path.chmod(0o600)
    assert mp.read_api_key(path, environ={"MP_API_KEY": "Z" * 32}) == KEY


def test_key_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="API key file .* not found"):
        mp.read_api_key(tmp_path / "absent", environ={})


def test_key_file_readable_warns(tmp_path, caplog):
    path = tmp_path / "key"
    path.write_text(KEY)
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        mp.read_api_key(path, environ={})
    assert "readable by other users" in caplog.text


def test_key_file_with_byte_order_mark(tmp_path):
    path = tmp_path / "key"
    path.write_text("\ufeff" + KEY + "\n", encoding="utf-8")
    path.chmod(0o600)
    assert mp.read_api_key(path, environ={}) == KEY


def test_key_file_malformed(tmp_path):
    path = tmp_path / "key"
    path.write_text("not a key\n")
    with pytest.raises(mp.ApiKeyError, match=r"from file .*key is malformed"):
        mp.read_api_key(path, environ={})


# ---------------------------------------------------------------------------
# CLI


@pytest.fixture
def cli_stand_in(monkeypatch):
    monkeypatch.setattr(mp, "_default_rester", lambda: StandInMPRester)


def test_cli_fetch_key_never_shown(tmp_path, monkeypatch, capsys, cli_stand_in):
    monkeypatch.setenv("MP_API_KEY", KEY)
    log_path = tmp_path / "debug.log"
    handler = logging.FileHandler(log_path)
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.DEBUG)

    try:
        out = tmp_path / "fetched.csv"
        code = main(
            [
                "--verbose",
                "data",
                "fetch",
                "--property",
                "energy_above_hull",
                "--out",
                str(out),
            ]
        )
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()

    assert code == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out
    assert "database 2025.09.25" in captured.out
    for text in (captured.out, captured.err, log_path.read_text()):
        assert KEY not in text
    for path in tmp_path.iterdir():
        assert KEY.encode() not in path.read_bytes(), path.name
    assert "querying the Materials Project" in log_path.read_text()


def test_cli_fetch_key_file(tmp_path, capsys, cli_stand_in):
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    key_file.chmod(0o600)
    out = tmp_path / "fetched.csv"
    argv = [
        "data",
        "fetch",
        "--property",
        "formation_energy_per_atom",
        "--out",
        str(out),
    ]
    assert main([*argv, "--api-key-file", str(key_file)]) == 0
    assert out.is_file()
    assert StandInMPRester.instances[0].api_key == KEY


def test_cli_fetch_missing_key(tmp_path, capsys, cli_stand_in):
    argv = [
        "data",
        "fetch",
        "--property",
        "energy_above_hull",
        "--out",
        str(tmp_path / "x.csv"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("dvmrl data fetch: error: no Materials Project API key found")
    assert "https://next-gen.materialsproject.org/api" in err
    assert StandInMPRester.instances == []


def test_cli_fetch_malformed_key(tmp_path, monkeypatch, capsys, cli_stand_in):
    bad = "legacykey1234567"
    monkeypatch.setenv("PMG_MAPI_KEY", bad)
    argv = [
        "data",
        "fetch",
        "--property",
        "energy_above_hull",
        "--out",
        str(tmp_path / "x.csv"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "from environment variable PMG_MAPI_KEY is malformed" in err
    assert bad not in err
    assert StandInMPRester.instances == []


def test_cli_fetch_without_mp_api(tmp_path, monkeypatch, capsys):
    # A None entry in sys.modules makes the import raise ImportError.
    monkeypatch.setitem(sys.modules, "mp_api.client", None)
    monkeypatch.setenv("MP_API_KEY", KEY)
    argv = [
        "data",
        "fetch",
        "--property",
        "energy_above_hull",
        "--out",
        str(tmp_path / "x.csv"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert 'pip install "dvmrl[mp]"' in err
    assert KEY not in err


def test_cli_fetch_rejects_key_option(tmp_path, capsys, cli_stand_in):
    out = str(tmp_path / "x.csv")
    argv = ["data", "fetch", "--property", "energy_above_hull", "--out", out]
    assert main([*argv, "--api-key", KEY]) == 2
    err = capsys.readouterr().err
    assert "--api-key is not accepted" in err
    assert KEY not in err
    assert StandInMPRester.instances == []


def test_cli_fetch_checks_out_first(tmp_path, capsys, cli_stand_in):
    """An --out that cannot be written fails before the service is asked."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = str(blocker / "x.csv")
    argv = ["data", "fetch", "--property", "energy_above_hull", "--out", out]
    assert main(argv) == 2
    assert f"{blocker} is a file, so nothing can be written" in capsys.readouterr().err
    assert StandInMPRester.instances == []


def test_key_file_given_key(tmp_path, capsys, cli_stand_in):
    out = str(tmp_path / "x.csv")
    argv = ["data", "fetch", "--property", "energy_above_hull", "--out", out]
    assert main([*argv, "--api-key-file", KEY]) == 2
    err = capsys.readouterr().err
    assert "looks like an API key, not a file path" in err
    assert KEY not in err


def test_cli_fetch_unreachable_service(tmp_path, monkeypatch, capsys):
    # The stand-in client raises what requests raises when the host name
    # does not resolve; the real service is not reachable from the tests.
    error = ConnectionError(
        f"HTTPSConnectionPool(host='api.materialsproject.org', port=443): "
        f"NameResolutionError with headers {{'x-api-key': '{KEY}'}}"
    )
    factory = lambda api_key: StandInMPRester(api_key, error=error)  # noqa: E731
    monkeypatch.setattr(mp, "_default_rester", lambda: factory)
    monkeypatch.setenv("MP_API_KEY", KEY)
    out = tmp_path / "fetched.csv"
    argv = ["data", "fetch", "--property", "energy_above_hull", "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Materials Project query failed: ConnectionError" in err
    assert "api.materialsproject.org can be reached" in err
    assert "internal error" not in err
    assert KEY not in err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_fetch_out_folder_before_query(tmp_path, monkeypatch, capsys, cli_stand_in):
    monkeypatch.setenv("MP_API_KEY", KEY)
    folder = tmp_path / "d.csv"
    folder.mkdir()
    argv = ["data", "fetch", "--property", "energy_above_hull", "--out", str(folder)]
    assert main(argv) == 2
    assert f"--out {folder}: the path is a folder" in capsys.readouterr().err
    # The path is rejected before any client is made.
    assert StandInMPRester.instances == []
