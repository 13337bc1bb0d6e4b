"""Checkpoint files: data only, written atomically, checked on load.

A checkpoint is a ``torch.save`` file of one dict whose values are tensors,
dicts of tensors, and JSON strings (config, metadata, provenance, element
table, history, trainer state), so it loads with
``torch.load(..., weights_only=True)``. That loader rebuilds only tensors
and plain containers, so a file that carries any other pickled object is
rejected before the object is built, and no code from the file runs.

Layout of format version 1 (keys of the top-level dict):

- ``dvmrl_checkpoint``: JSON ``{"format": "dvmrl-checkpoint",
  "format_version": 1, "tensors_sha256": "..."}``. The digest covers every
  tensor of the file (names, dtypes, shapes and bytes), so loading detects
  weights changed or damaged after writing; the zip archive's own checksums
  are not checked by ``torch.load``. Files written before the digest existed
  load without that check.
- ``model_config``, ``train_config``, ``target_scaling``, ``element_table``,
  ``data_fingerprint``, ``training_domain``, ``provenance``, ``metadata``,
  ``history``: JSON strings.
- ``model_state``: the model's ``state_dict`` (parameters and buffers).
- ``member_states`` (ensembles only): the ``state_dict`` of every member
  after the first, whose state is ``model_state``.
- ``resume`` (optional): ``trainer`` (JSON of counters and schedule state),
  ``optimizer`` (per parameter ``step``, ``exp_avg``, ``exp_avg_sq``),
  ``rng`` (generator states as uint8 tensors), ``best_state`` and
  ``sample_weights`` (tensors, when present).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import sys
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from dvmrl._files import builds_objects, file_kind, write_atomic
from dvmrl._runtime import resolve_device

FORMAT_NAME = "dvmrl-checkpoint"
FORMAT_VERSION = 1
HEADER_KEY = "dvmrl_checkpoint"
# Entry of an ensemble checkpoint with the states of members 1 .. M-1.
MEMBER_STATES_KEY = "member_states"

JSON_KEYS = (
    "model_config",
    "train_config",
    "target_scaling",
    "element_table",
    "data_fingerprint",
    "training_domain",
    "provenance",
    "metadata",
    "history",
)


def _json_kind(value: Any) -> str:
    """Name the JSON type of a parsed value: object, array, string, number, ..."""
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    return "number"


# The advice that ends the messages about files that are not dvmrl checkpoints.
MODEL_ADVICE = "pass a model.pt written by dvmrl train"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the reason."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint path that does not exist or is not a regular file."""


def provenance() -> dict[str, Any]:
    """Describe the software and the command that write a checkpoint now."""
    import dvmrl

    return {
        "dvmrl_version": dvmrl.__version__,
        "build_info": dvmrl.build_info(),
        "torch_version": torch.__version__,
        "python_version": sys.version.split()[0],
        "command": list(sys.argv),
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "format_version": FORMAT_VERSION,
    }


def element_table_json(descriptors: torch.Tensor) -> dict[str, Any]:
    """Describe the element table that a model's ``descriptors`` buffer contains."""
    from dvmrl import elements

    rows = descriptors.shape[0]
    symbols = list(elements.ELEMENTS[:rows])
    names = elements.descriptor_names()
    if len(names) != descriptors.shape[1]:
        names = [f"descriptor_{i}" for i in range(descriptors.shape[1])]
    return {
        "symbols": symbols,
        "descriptor_names": names,
        "standardised": True,
        "values": descriptors.detach().cpu().to(torch.float64).tolist(),
    }


def write_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write a checkpoint dict atomically (temporary file, then ``os.replace``).

    Args:
        path: destination file; its folder is created when missing.
        payload: the dict, without the header (added here). Values that
            belong to ``JSON_KEYS`` are serialised to JSON strings.

    Returns:
        Path: the written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {}
    for key, value in payload.items():
        if key in JSON_KEYS:
            document[key] = json.dumps(value, default=_json_default, allow_nan=True)
        else:
            document[key] = value
    document[HEADER_KEY] = json.dumps(
        {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "tensors_sha256": tensors_digest(document),
        }
    )
    save_torch_atomic(path, document, fsync=True)
    return path


def save_torch_atomic(
    path: str | os.PathLike, obj: Any, *, fsync: bool = False
) -> Path:
    """Write ``obj`` with ``torch.save`` to ``path`` through :func:`write_atomic`.

    Raises:
        KeyboardInterrupt: for a Ctrl-C during the write.
        OSError: naming ``path``, for a failed write (a full disk, the file
            size limit).
    """
    try:
        return write_atomic(
            path, lambda stream: torch.save(obj, stream), binary=True, fsync=fsync
        )
    except BaseException as err:
        # Ctrl-C inside torch.save makes its zip writer fail on exit with a
        # RuntimeError that hides the KeyboardInterrupt. Re-raise the
        # interrupt, so that callers stop as for any other Ctrl-C.
        if not isinstance(err, KeyboardInterrupt) and _interrupted(err):
            raise KeyboardInterrupt from err
        # A failed write (a full disk, the file size limit) reaches torch.save
        # as an OSError of the stream, which its zip writer replaces with a
        # RuntimeError that names no file. Raise the OSError for this path.
        system = _cause_of_type(err, OSError)
        if system is not None and not isinstance(err, OSError):
            raise OSError(system.errno, system.strerror, os.fspath(path)) from err
        raise


def tensors_digest(document: dict[str, Any]) -> str:
    """Return the SHA-256 of every tensor in a checkpoint dict, as hex.

    Entries are visited in sorted key order (lists in order), and each
    tensor contributes its path of keys, dtype, shape and raw bytes, so any
    change to a tensor changes the digest. The header and the JSON strings
    are not covered.
    """
    digest = hashlib.sha256()

    def visit(value: Any, name: str) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                visit(value[key], f"{name}/{key}")
        elif isinstance(value, (list, tuple)):
            for position, item in enumerate(value):
                visit(item, f"{name}/{position}")

    for key in sorted(document):
        if key != HEADER_KEY:
            visit(document[key], key)
    return digest.hexdigest()


def _interrupted(err: BaseException) -> bool:
    """Return whether a KeyboardInterrupt is among the causes of ``err``."""
    return _cause_of_type(err, KeyboardInterrupt) is not None


def _cause_of_type(err: BaseException, kind: type) -> BaseException | None:
    """Return the first exception of type ``kind`` in the cause chain of ``err``."""
    seen = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, kind):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


def _json_default(value: Any) -> Any:
    # Arrays and tensors of any size become (nested) lists, numpy scalars
    # numbers. .item() comes second because it fails on more than one value.
    if hasattr(value, "tolist") and getattr(value, "ndim", 0) > 0:
        return value.tolist()
    if hasattr(value, "item"):  # numpy scalars, 0-d arrays and tensors
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load and check a checkpoint file; JSON entries come back parsed.

    Raises:
        CheckpointNotFoundError: the path does not exist or is not a file.
        CheckpointError: the file is corrupt or truncated, carries a pickled
            object other than tensors and plain containers, is not a dvmrl
            checkpoint, or was written in an incompatible format version.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint {path} not found")
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint {path} is not a file")
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols it did not write; the
            # rejection below reports the file instead.
            warnings.simplefilter("ignore", UserWarning)
            document = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failed load means a bad file
        # PyTorch's own message suggests weights_only=False, which would run
        # the code in the file, so it is neither chained nor quoted.
        raise _unreadable_checkpoint(path, err) from None

    if not isinstance(document, dict) or HEADER_KEY not in document:
        raise CheckpointError(
            f"{path} is not a dvmrl checkpoint: it lacks the {HEADER_KEY!r} header; "
            f"{MODEL_ADVICE}"
        )
    try:
        header = json.loads(document[HEADER_KEY])
    except (TypeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"checkpoint {path} has a corrupt header: {err}"
        ) from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a dvmrl checkpoint (header {header!r})")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        hint = (
            "upgrade dvmrl to read it"
            if newer
            else "retrain the model with this dvmrl version"
        )
        raise CheckpointError(
            f"checkpoint {path} was written in format version {version!r}, which "
            f"this dvmrl (format version {FORMAT_VERSION}) cannot read; {hint}"
        )

    parsed: dict[str, Any] = {"format_version": version}
    for key, value in document.items():
        if key == HEADER_KEY:
            continue
        if key in JSON_KEYS:
            try:
                parsed[key] = json.loads(value)
            except (TypeError, json.JSONDecodeError) as err:
                raise CheckpointError(
                    f"checkpoint {path} is corrupt: entry {key!r} is not valid "
                    f"JSON ({err})"
                ) from None
        else:
            parsed[key] = value
    # The integrity digest covers tensors only, so the JSON entries may be
    # damaged. Checking their kind here lets callers index them safely.
    for key in JSON_KEYS:
        expected = list if key == "history" else dict
        value = parsed.get(key)
        if value is not None and not isinstance(value, expected):
            raise CheckpointError(
                f"checkpoint {path} is corrupt: entry {key!r} is a JSON "
                f"{_json_kind(value)}, not a JSON {_json_kind(expected())}; restore "
                "a copy or retrain with dvmrl train"
            )
    missing = [key for key in ("model_config", "model_state") if key not in parsed]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: missing entries {missing}"
        )
    if not _is_tensor_dict(parsed["model_state"]):
        raise CheckpointError(
            f"checkpoint {path} is corrupt: 'model_state' is not a dict of tensors"
        )
    members = parsed.get(MEMBER_STATES_KEY, [])
    if not isinstance(members, list):
        raise CheckpointError(
            f"checkpoint {path} is corrupt: '{MEMBER_STATES_KEY}' is not a list"
        )
    for position, member_state in enumerate(members, start=1):
        if not _is_tensor_dict(member_state):
            raise CheckpointError(
                f"checkpoint {path} is corrupt: the state of member {position} is "
                "not a dict of tensors"
            )
    stored_digest = header.get("tensors_sha256")
    if stored_digest is not None and stored_digest != tensors_digest(document):
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its tensors differ from the digest "
            "stored when it was written, so the file was changed or damaged "
            "since; restore a copy or retrain with dvmrl train"
        )

    # NaN or infinite weights would make every prediction NaN. The digest
    # cannot catch them in files written without one, so they are checked here.
    for position, member_state in enumerate([parsed["model_state"], *members]):
        for name, tensor in member_state.items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise CheckpointError(
                    f"checkpoint {path} is corrupt: tensor {name!r} of member "
                    f"{position} contains NaN or infinite values; restore a copy "
                    "or retrain with dvmrl train"
                )
    return parsed


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(item, torch.Tensor) for item in value.values()
    )


def _unreadable_checkpoint(path: Path, err: Exception) -> CheckpointError:
    """Return the error for a file that ``torch.load(weights_only=True)`` rejected."""
    if isinstance(err, pickle.UnpicklingError) and builds_objects(path):
        return CheckpointError(
            f"checkpoint {path} was rejected without being loaded: it carries a "
            "pickled Python object that is not a tensor or plain data, which "
            "could run code; dvmrl checkpoints never contain one"
        )
    try:
        kind = file_kind(path)
    except OSError as read_error:
        return CheckpointError(
            f"checkpoint {path} cannot be read: {read_error.strerror or read_error}"
        )
    problem = {
        "empty": "the file is empty",
        "zip": "its zip archive is truncated or corrupt",
        "pickle": "it is a bare pickle stream, not the zip archive torch.save writes",
        "other": "it is not the zip archive that torch.save writes",
    }[kind]
    return CheckpointError(
        f"checkpoint {path} is corrupt or not a dvmrl checkpoint: {problem} "
        f"({type(err).__name__}); {MODEL_ADVICE}"
    )


def load_checkpoint(
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
):
    """Load a model for inference, with its metadata.

    Args:
        path: a file written by ``Trainer.save``.
        device: where to put the model: ``"cpu"``, ``"cuda"``, ``"cuda:N"``
            or ``"auto"`` (CUDA when usable). Default: CPU.
        dtype: torch.float32 or torch.float64; default: the stored one.

    Returns:
        (CompositionMPNN or EnsembleModel, dict): the model in evaluation
        mode (an ``EnsembleModel`` for a checkpoint with member states), and
        the metadata. The dict contains the keys given to ``Trainer.save(...,
        metadata=...)`` plus ``model_config``, ``train_config``,
        ``target_scaling`` (``mean``, ``std`` in eV/atom), ``element_table``,
        ``data_fingerprint``, ``training_domain`` (``elements``: symbols seen
        in training, ``max_elements``, ``min_fraction``), ``provenance``, ``history``,
        ``epochs_done`` and ``format_version``.

    Raises:
        CheckpointError: as :func:`read_checkpoint`, or when the weights do not
            fit the stored config.
        TypeError: for another dtype.
        ValueError, RuntimeError: for an unknown device, or CUDA without a
            usable GPU (as :func:`dvmrl.resolve_device`).
    """
    from dvmrl.model import check_dtype

    if dtype is not None:
        check_dtype(dtype)
    # resolve_device accepts "auto" and names the fix when CUDA is unusable,
    # where .to("cuda") fails with a bare AssertionError. None keeps the CPU
    # default, whereas resolve_device reads it as "auto".
    target = resolve_device("cpu" if device is None else device)
    document = read_checkpoint(path)
    model = model_from_document(document, path)
    if dtype is not None:
        model = model.to(dtype=dtype)
    model = model.to(target)
    model.eval()
    return model, metadata_from_document(document, path)


def model_from_document(document: dict[str, Any], path: str | os.PathLike):
    """Build the model that a parsed checkpoint describes (on the CPU)."""
    from dvmrl.model import CompositionMPNN, ModelConfig

    try:
        config = ModelConfig.from_dict(document["model_config"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {path} has an invalid model config: {err}"
        ) from None
    state = document["model_state"]
    if "descriptors" not in state:
        raise CheckpointError(f"checkpoint {path} is corrupt: no 'descriptors' buffer")
    dtype = state["flat"].dtype if "flat" in state else torch.float32
    if not dtype.is_floating_point:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its flat parameters have dtype {dtype}, "
            "not a floating dtype"
        )
    descriptors = state["descriptors"].to(torch.float64)
    states = [state, *document.get(MEMBER_STATES_KEY, [])]
    members = []
    # read_checkpoint has checked that every state is a dict of tensors.
    for position, member_state in enumerate(states):
        model = CompositionMPNN(config, descriptors=descriptors, dtype=dtype)
        try:
            model.load_state_dict(member_state, strict=True)
        except RuntimeError as err:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: the weights of member {position} do "
                f"not fit its config ({err})"
            ) from None
        members.append(model)
    if MEMBER_STATES_KEY not in document:
        return members[0]
    from dvmrl.training.ensemble import EnsembleModel

    return EnsembleModel(members)


# Top-level checkpoint entries copied into the metadata that load_checkpoint
# returns. User metadata may not use these names.
_DOCUMENT_KEYS = (
    "model_config",
    "train_config",
    "target_scaling",
    "element_table",
    "data_fingerprint",
    "training_domain",
    "provenance",
    "history",
)


def metadata_from_document(
    document: dict[str, Any], path: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Collect the metadata dict that :func:`load_checkpoint` returns.

    Raises:
        CheckpointError: when the stored trainer state is not a JSON object.
    """
    metadata = dict(document.get("metadata") or {})
    for key in _DOCUMENT_KEYS:
        metadata[key] = document.get(key)
    resume = document.get("resume") or {}
    trainer_state = resume.get("trainer") if isinstance(resume, dict) else None
    history = document.get("history") or []
    metadata["epochs_done"] = len(history)
    if trainer_state:
        # The integrity digest covers tensors only, so this text may be damaged.
        try:
            trainer = json.loads(trainer_state)
            epochs_done = trainer.get("epochs_done", len(history))
        except (TypeError, ValueError, AttributeError) as err:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: its trainer state is not valid "
                f"JSON ({type(err).__name__}: {err})"
            ) from None
        metadata["epochs_done"] = epochs_done
    metadata["format_version"] = document["format_version"]
    return metadata


RESERVED_METADATA_KEYS = frozenset({*_DOCUMENT_KEYS, "epochs_done", "format_version"})


def check_metadata_keys(metadata: dict[str, Any]) -> None:
    """Raise ValueError for caller metadata that uses a reserved key.

    load_checkpoint gives the checkpoint's own values under these keys, so
    the caller's values would be lost.
    """
    clash = sorted(set(metadata) & RESERVED_METADATA_KEYS)
    if clash:
        raise ValueError(
            f"metadata keys {clash} are reserved for the checkpoint itself; "
            "rename them"
        )
