import errno
import os
import stat

import pytest

from dvmrl import _files
from dvmrl._files import write_atomic, write_bytes_atomic, write_text_atomic


def test_text_replaces_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old\n")
    write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_creates_parent_folders(tmp_path):
    path = tmp_path / "a" / "b" / "out.bin"
    write_bytes_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"


def test_symlink_target_written(tmp_path):
    real = tmp_path / "real.txt"
    real.write_text("old\n")
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    written = write_text_atomic(link, "new\n")
    assert link.is_symlink()
    assert real.read_text() == "new\n"
    assert written == real.resolve()


def test_fifo_written_directly(fifo_reader):
    fifo, received, reader = fifo_reader
    write_text_atomic(fifo, "through the pipe\n")
    reader.join(timeout=30)
    assert received == ["through the pipe\n"]
    assert stat.S_ISFIFO(fifo.stat().st_mode)


def test_mode_follows_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "out.txt", "x")
    finally:
        os.umask(previous)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o640


def test_explicit_mode(tmp_path):
    write_bytes_atomic(tmp_path / "data.gz", b"x", mode=0o644)
    assert (tmp_path / "data.gz").stat().st_mode & 0o777 == 0o644


def test_failed_write_keeps_old_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old\n")

    def fail(stream):
        stream.write("partial")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        write_atomic(path, fail, fsync=True)
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_full_device_names_path(tmp_path):
    # A private node of the Linux full device (char 1, 7): every write fails
    # with ENOSPC. Creating it needs root, as in CI.
    full = tmp_path / "full"
    try:
        os.mknod(full, 0o666 | stat.S_IFCHR, os.makedev(1, 7))
    except (PermissionError, AttributeError):
        pytest.skip("creating a device node needs root on Linux")
    with pytest.raises(OSError) as caught:
        write_text_atomic(full, "x" * 100_000)
    assert caught.value.strerror == "No space left on device"
    assert caught.value.filename == str(full)
    assert full.is_char_device()


def test_unwritable_folder_named(tmp_path, monkeypatch):
    # Root ignores folder permissions, so the refusal comes from a stand-in
    # for mkstemp that fails as it does in a read-only folder.
    def reject(dir, prefix, suffix):  # noqa: A002 - mkstemp's own name
        path = os.path.join(dir, f"{prefix}abc{suffix}")
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(_files.tempfile, "mkstemp", reject)
    with pytest.raises(PermissionError) as caught:
        write_text_atomic(tmp_path / "run.json", "{}")
    assert caught.value.filename == str(tmp_path)
    assert caught.value.errno == errno.EACCES
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder_named(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(PermissionError) as caught:
            write_text_atomic(folder / "run.json", "{}")
    finally:
        folder.chmod(0o700)
    assert caught.value.filename == str(folder)


def test_text_with_surrogates_escaped(tmp_path):
    # A command line with the bytes of a Latin-1 file name reaches Python as
    # lone surrogates, which strict UTF-8 cannot encode.
    path = tmp_path / "report.md"
    write_text_atomic(path, "--out run-lat\udce9n\n")
    assert path.read_text(encoding="utf-8") == "--out run-lat\\udce9n\n"


def test_long_name_written(tmp_path):
    # A 250-byte name fits the file system, but not with a temporary file's
    # random part and suffix added to it.
    path = tmp_path / ("a" * 246 + ".txt")
    write_text_atomic(path, "x")
    assert path.read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_failed_rename_names_path(tmp_path, monkeypatch):
    # The temporary file is removed after a failed rename, so the message
    # names the target instead.
    def fail(source, target):
        raise OSError(errno.ENOSPC, "No space left on device", source)

    monkeypatch.setattr(_files.os, "replace", fail)
    with pytest.raises(OSError) as caught:
        write_text_atomic(tmp_path / "run.json", "{}")
    assert caught.value.filename == str(tmp_path / "run.json")
    assert list(tmp_path.iterdir()) == []


def test_json_ready_converts_for_strict_json(tmp_path):
    import json
    import math

    import numpy as np

    value = {
        1: [float("nan"), math.inf, 0.5],
        "array": np.array([1.0, np.nan]),
        "scalars": (np.int64(3), np.float32(0.25), np.bool_(True)),
        "path": tmp_path,
    }
    ready = _files.json_ready(value)
    assert ready == {
        "1": [None, None, 0.5],
        "array": [1.0, None],
        "scalars": [3, 0.25, True],
        "path": str(tmp_path),
    }
    assert type(ready["scalars"][0]) is int
    json.dumps(ready, allow_nan=False)


def test_lock_detects_removed_folder(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    with _files.FolderLock(folder) as lock:
        lock.check_in_place()
        folder.rmdir()
        with pytest.raises(_files.FolderReplacedError, match="removed or replaced"):
            lock.check_in_place()


def test_lock_detects_replaced_folder(tmp_path):
    # A write after the removal recreates the path: a new folder, not the
    # locked one, so the check still fails.
    folder = tmp_path / "run"
    folder.mkdir()
    with _files.FolderLock(folder) as lock:
        folder.rmdir()
        write_text_atomic(folder / "member0" / "state.json", "{}")
        with pytest.raises(_files.FolderReplacedError) as caught:
            lock.check_in_place()
        assert f"--out {folder} was removed or replaced" in str(caught.value)


def test_lock_check_ignores_folder_contents(tmp_path):
    # Files added or removed inside the folder leave it the locked folder.
    folder = tmp_path / "run"
    folder.mkdir()
    with _files.FolderLock(folder) as lock:
        write_text_atomic(folder / "a.json", "{}")
        (folder / "a.json").unlink()
        lock.check_in_place()


def test_same_folder_check_by_identity(tmp_path):
    # What a member process checks while its parent holds the lock. The
    # lock's open descriptor keeps the removed folder's inode allocated, so
    # a new folder at the path cannot reuse its number.
    folder = tmp_path / "run"
    folder.mkdir()
    with _files.FolderLock(folder):
        identity = _files.folder_identity(folder)
        _files.check_same_folder(folder, identity)
        folder.rmdir()
        with pytest.raises(_files.FolderReplacedError, match="--out .* was removed"):
            _files.check_same_folder(folder, identity)
        folder.mkdir()
        with pytest.raises(_files.FolderReplacedError):
            _files.check_same_folder(folder, identity)
