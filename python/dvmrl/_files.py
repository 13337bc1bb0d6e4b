"""Atomic file writes, strict JSON values and file-type checks, shared by modules."""

from __future__ import annotations

import errno
import fcntl
import io
import logging
import math
import os
import pickletools
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

logger = logging.getLogger(__name__)

# Maximum name prefix, in bytes, of a temporary file beside its target.
# mkstemp adds 8 random characters and the suffix, and most file systems
# allow 255 bytes per name.
MAX_TEMPORARY_PREFIX_BYTES = 200


def json_ready(value: Any) -> Any:
    """Return ``value`` converted for strict JSON.

    NaN and infinities become None, because ``json.dumps(...,
    allow_nan=False)`` rejects them. NumPy arrays and scalars become Python
    lists and numbers, paths become strings and dict keys become strings.
    """
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item) for item in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, np.generic):
        return json_ready(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_atomic(
    path: str | os.PathLike,
    write: Callable[[IO[Any]], Any],
    *,
    binary: bool = False,
    fsync: bool = False,
    mode: int | None = None,
) -> Path:
    """Write a file with ``write(stream)`` so that a reader never sees half of it.

    A regular file is written through a temporary file in the same folder
    and renamed over the path. A symbolic link is followed, so the rename
    replaces the file it points to and the link stays. A path that is not a
    regular file (a named pipe, a device such as /dev/stdout) cannot be
    replaced, so it is written directly.

    Args:
        path: the file to write; missing parent folders are created.
        write: called once with the open stream (text in UTF-8, or binary).
        binary: open the stream in binary mode.
        fsync: flush the data to the disk before the rename.
        mode: permission bits of the written file; default 0o666 less the
            umask, as for a file that ``open`` creates (``mkstemp`` alone
            would leave 0o600).

    Returns:
        Path: the file written, with symbolic links resolved.

    Raises:
        OSError: when the system rejects the write (a full disk, no
            permission). Its ``filename`` is ``path``, or the folder of
            ``path`` when that folder does not accept new files.
    """
    target = Path(os.path.realpath(path))
    open_mode = "wb" if binary else "w"
    encoding = None if binary else "utf-8"
    # A path from the command line may carry bytes that are not UTF-8, as
    # lone surrogates. Text such as a report writes them as \udcXX.
    errors = None if binary else "backslashreplace"
    temporary = None
    try:
        if target.exists() and not target.is_file():
            with open(target, open_mode, encoding=encoding, errors=errors) as stream:
                write(stream)
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        # Most file systems allow 255 bytes per name, so a long name gets a
        # short prefix that leaves room for the random part and the suffix.
        stem = target.name
        if len(os.fsencode(stem)) > MAX_TEMPORARY_PREFIX_BYTES:
            stem = stem[: MAX_TEMPORARY_PREFIX_BYTES // 4]
        try:
            handle, temporary = tempfile.mkstemp(
                dir=target.parent, prefix=f".{stem}.", suffix=".tmp"
            )
        except OSError as err:
            # Name the folder that rejects new files, not the temporary name.
            raise OSError(err.errno, err.strerror, os.fspath(target.parent)) from err
        try:
            opened = os.fdopen(handle, open_mode, encoding=encoding, errors=errors)
            with opened as stream:
                write(stream)
                if fsync:
                    stream.flush()
                    os.fsync(stream.fileno())
            os.chmod(temporary, _default_mode() if mode is None else mode)
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    except OSError as err:
        if err.filename is not None and err.filename != temporary:
            raise
        # A failed write or flush (a full device) names no file, and the
        # temporary file is gone by now, so the message names the path.
        raise OSError(err.errno, err.strerror, os.fspath(path)) from err
    return target


def write_text_atomic(
    path: str | os.PathLike, text: str, *, fsync: bool = False
) -> Path:
    """Write ``text`` (UTF-8) to ``path`` with :func:`write_atomic`."""
    return write_atomic(path, lambda stream: stream.write(text), fsync=fsync)


def write_bytes_atomic(
    path: str | os.PathLike, data: bytes, *, mode: int | None = None
) -> Path:
    """Write ``data`` to ``path`` with :func:`write_atomic`."""
    return write_atomic(
        path, lambda stream: stream.write(data), binary=True, mode=mode
    )


def _default_mode() -> int:
    """Return 0o666 less the process umask, the mode ``open`` gives new files."""
    return 0o666 & ~_umask()


def _umask() -> int:
    """Return the process umask without changing it where Linux reports it."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Elsewhere, read it by setting it, which other threads could observe
    # for an instant.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def probe_folder(folder: str | os.PathLike) -> None:
    """Create a file in ``folder`` and remove it, raising OSError on failure.

    os.access reports /sys and /proc writable to root, although nothing can
    be created there, so only creating a file shows that results can be
    written.
    """
    handle, probe = tempfile.mkstemp(
        dir=folder, prefix=".dvmrl-write-test.", suffix=".tmp"
    )
    os.close(handle)
    os.unlink(probe)


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete temporary files (``.NAME.*.tmp``) left under ``folder``; return the count.

    write_atomic and the checkpoint writers stage files under such names and
    rename them when complete, so a process killed mid-write (kill -9, power
    loss) leaves one behind. Call this only while holding the folder's
    FolderLock, when no other process can be writing one.
    """
    removed = 0
    for path in Path(folder).rglob(".*.tmp"):
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed += 1
    if removed:
        logger.info("removed %d unfinished temporary files under %s", removed, folder)
    return removed


class FolderInUseError(ValueError):
    """Another process holds the lock of an output folder."""


class FolderReplacedError(OSError):
    """A locked output folder was removed or replaced while its command ran."""


def folder_identity(folder: str | os.PathLike) -> tuple[int, int]:
    """Return the (device, inode) pair of a folder, for :func:`check_same_folder`."""
    info = os.stat(folder)
    return info.st_dev, info.st_ino


def check_same_folder(
    folder: str | os.PathLike,
    identity: tuple[int, int],
    option: str = "--out",
    reported_path: str | os.PathLike | None = None,
) -> None:
    """Raise FolderReplacedError unless ``folder`` is still the folder of ``identity``.

    A folder deleted (or moved away and replaced) while a command runs takes
    the run's files, and the lock on it, with it. Writes that followed would
    recreate the path piecemeal, unlocked and without the run's earlier
    files, so commands check before they write. A new folder could reuse a
    deleted folder's inode number, but not while a FolderLock keeps the old
    one open, as the command that writes the folder does.
    """
    try:
        current = folder_identity(folder)
    except FileNotFoundError:
        current = None
    if current == tuple(identity):
        return
    named = folder if reported_path is None else reported_path
    raise FolderReplacedError(
        errno.ENOENT,
        f"{option} {named} was removed or replaced while this command ran, so "
        "the run's earlier files are no longer there and it cannot continue; "
        f"start it again in a new or empty {option}",
    )


class FolderLock:
    """Exclusive flock() on a folder, held from ``acquire`` (or ``with``) to release.

    Two dvmrl processes writing one output folder overwrite each other's
    files. The lock is taken on the folder itself, so it leaves no file
    behind, and the kernel drops it when the process ends, also after
    kill -9. Where the file system has no flock (some network file systems)
    a warning is logged and the command runs unlocked.

    Args:
        folder: the folder to lock, or with ``lock_file`` a file that stands
            for an output that is not a folder (created empty if missing).
        option: the command-line option that named the output.
        reported_path: the path that messages name (default: ``folder``).
        lock_file: lock the file ``folder`` instead of a folder.
        resumable: the command has --resume, which the message then names.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        option: str = "--out",
        reported_path: str | os.PathLike | None = None,
        lock_file: bool = False,
        resumable: bool = True,
    ) -> None:
        self.folder = Path(folder)
        self.option = option
        self.reported_path = Path(folder if reported_path is None else reported_path)
        self.lock_file = lock_file
        self.resumable = resumable
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        """Take the lock; raise FolderInUseError when another process holds it."""
        if self._fd is not None:
            return self
        flags = os.O_RDONLY | (os.O_CREAT if self.lock_file else 0)
        fd = os.open(self.folder, flags, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            then = ""
            if self.resumable:
                then = " (then pass --resume to continue its work)"
            raise FolderInUseError(
                f"{self.option} {self.reported_path} is in use by another dvmrl "
                f"process; wait for it to end{then} or choose another {self.option}"
            ) from None
        except OSError as err:
            os.close(fd)
            logger.warning(
                "could not lock %s (%s); start no second dvmrl command in it",
                self.folder,
                err.strerror,
            )
            return self
        self._fd = fd
        return self

    def check_in_place(self) -> None:
        """Raise FolderReplacedError if the locked folder is no longer at its path.

        See :func:`check_same_folder`. Nothing is checked when the lock was
        not taken.
        """
        if self._fd is None:
            return
        locked = os.fstat(self._fd)
        check_same_folder(
            self.folder, (locked.st_dev, locked.st_ino), self.option, self.reported_path
        )

    def release(self) -> None:
        """Release the lock; the end of the process also releases it."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        # An owner that is dropped without release() must not keep the
        # descriptor, and with it the lock, for the rest of the process.
        self.release()

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def file_kind(path: str | os.PathLike) -> str:
    """Classify a file by its first bytes: "empty", "zip", "pickle" or "other".

    ``torch.save`` and ``np.savez`` both write zip archives. A file that
    starts with the pickle PROTO opcode (protocol 2 to 5) is a bare pickle.

    Raises:
        OSError: when the file cannot be read.
    """
    with open(path, "rb") as stream:
        head = stream.read(4)
    if not head:
        return "empty"
    if head.startswith(b"PK\x03\x04") or head.startswith(b"PK\x05\x06"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    return "other"


# Pickle opcodes that import a global or call one to build an object.
_OBJECT_OPCODES = frozenset(
    {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "REDUCE", "BUILD"}
)


def _pickle_bytes(path: str | os.PathLike) -> bytes:
    """Return the pickle stream of a torch.save archive or a bare pickle file."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = [name for name in archive.namelist() if name.endswith("data.pkl")]
            return archive.read(names[0]) if names else b""
    data = Path(path).read_bytes()
    # A raw pickle of protocol 2 or later starts with the PROTO opcode. Other
    # bytes, such as a truncated archive, are not scanned as a pickle.
    return data if data[:1] == b"\x80" else b""


def builds_objects(path: str | os.PathLike) -> bool:
    """Tell whether a file's pickle stream imports or builds Python objects.

    The file is a ``torch.save`` zip archive (its ``data.pkl`` is scanned) or
    a bare pickle. Only the opcodes are parsed (``pickletools.genops``), which
    never executes them. The result is False for a file without a valid pickle.
    """
    try:
        data = _pickle_bytes(path)
    except Exception:  # noqa: BLE001 - an unreadable archive has no pickle to scan
        # Damaged archives raise more than BadZipFile: a member name that is
        # not UTF-8 raises UnicodeDecodeError, an unknown compression method
        # NotImplementedError, corrupt deflate data zlib.error. The load that
        # follows reports such a file as corrupt.
        return False
    stream = io.BytesIO(data)
    # A legacy (non-zip) torch.save file is several pickles in a row: the
    # magic number, the protocol, the system information and then the
    # object, so each one is scanned until the raw tensor bytes begin.
    while stream.tell() < len(data):
        try:
            for opcode, _, _ in pickletools.genops(stream):
                if opcode.name in _OBJECT_OPCODES:
                    return True
        except (ValueError, EOFError, IndexError):
            return False
    return False
