"""The main job: the agent against random search and Bayesian optimisation.

Each method tunes the same model (``dvmrl.model.CompositionMPNN``) over the
same search space (``dvmrl.search.SEARCH_SPACE``), on the same training and
validation pools, under the same budget in training epochs. Per method and
seed the job then

1. scores the chosen model on the test part of the random split, which no
   search, reward or selection has seen;
2. measures its adversarial vulnerability and robustness radius on a fixed
   subsample of that test part;
3. retrains the chosen configuration on the training part of the chemsys
   split (whole chemical systems held out) and scores it on that split's
   test part.

Every completed unit of work (a trial, an agent step, a scoring) is written
to ``state.json`` in the output folder with an atomic replace before the
next one starts. A run killed at any point therefore continues from the
last completed unit with ``resume=True``, and it ends with the same test
metrics and chosen configurations as an uninterrupted run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import os
import shlex
import sys
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dvmrl._files import (
    FolderInUseError,
    FolderLock,
    probe_folder,
    remove_stale_temporaries,
    write_atomic,
    write_text_atomic,
)
from dvmrl.search import (
    BAYESIAN_SEED_LIMIT,
    SEARCH_SPACE,
    EpochBudget,
    SearchSpace,
    TrialRecord,
    TrialResult,
    best_trial,
    run_search,
    shortest_trial_epochs,
)

logger = logging.getLogger(__name__)

METHODS = ("random", "bayesian", "agent")
STATE_FORMAT = "dvmrl-run-state"
STATE_VERSION = 1
RUN_FILE = "run.json"
STATE_FILE = "state.json"
DEFAULT_DATA = "mp-formation-energy"
# The way on that messages about a corrupt run folder suggest.
FRESH_RUN = "start a fresh run with another --out (this folder is left as it is)"

# Robustness settings: box radius of the vulnerability (fraction units), the
# prediction change that defines the robustness radius (eV/atom) and its cap.
ROBUST_EPSILON = 0.05
ROBUST_TAU = 0.05
ROBUST_R_MAX = 0.25

# Training settings that every method takes from the agent's environment.
SHARED_TRAIN_KEYS = (
    "grad_clip",
    "schedule",
    "warmup_epochs",
    "ema_decay",
    "loss",
    "monitor",
)

# Model sizes that no method tunes, the same for every method. They are fixed
# here rather than read from dvmrl.defaults so that the presets' wall times,
# measured with these sizes, do not move when the default model changes. The
# head is not heteroscedastic, so training minimises the squared error that
# the validation RMSE selects on. The fraction encoder stays off. The
# shipped agent was meta-trained on a smaller model (env.DEFAULT_MODEL).
BASE_MODEL = {
    "gate_hidden": 64,
    "msg_hidden": 64,
    "head_hidden": 128,
    "head_layers": 2,
    "heteroscedastic": False,
    "fraction_hidden": 0,
}

# With --agent-learn the agent updates its Q-network once an episode has given
# it this many transitions. A pretrained agent needs no warm-up of its replay
# buffer, and the presets' episodes last at most 8 to 30 steps, fewer than the
# 128 transitions that meta-training waits for.
ONLINE_LEARNING_STARTS = 1

# The agent's episode starts from this configuration (inside SEARCH_SPACE).
START_CONFIG = {
    "lr": 2e-3,
    "batch_size": 128,
    "weight_decay": 1e-5,
    "dropout": 0.0,
    "layers": 3,
    "hidden": 64,
}


class BudgetError(ValueError):
    """A budget (preset or budget file) whose fields cannot make a fair run."""


@dataclass(frozen=True)
class Preset:
    """A budget preset: what each method gets per seed.

    Attributes:
        name: preset name (``quick``, ``small``, ``full`` or a custom one).
        epochs: training epochs per method and seed. One epoch is one pass
            over the training pool, whatever the model size.
        trial_epochs: epochs of one baseline trial.
        seeds: seeds run by default.
        max_train: training-pool subsample size (None: the whole pool).
        max_val: validation-pool subsample size (None: the whole pool).
        retrain_epochs: epochs of the chemsys retraining of each chosen
            configuration.
        robust_n: test compositions on which vulnerability and robustness
            radius are measured.
        n_initial_points: random trials before the GP surrogate takes over.
        agent_slice: epochs the agent's environment trains per step.
        adversarial_steps: gradient steps of each perturbation search.
        adversarial_starts: runs of each perturbation search per composition,
            half on each sign of the change.
    """

    name: str
    epochs: int
    trial_epochs: int
    seeds: int
    max_train: int | None
    max_val: int | None
    retrain_epochs: int
    robust_n: int
    n_initial_points: int
    agent_slice: int
    adversarial_steps: int = 30
    adversarial_starts: int = 2

    def to_dict(self) -> dict[str, Any]:
        """Return the preset as a JSON-ready dictionary."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preset:
        """Build a preset from a dictionary, rejecting unknown and missing keys."""
        if not isinstance(data, dict):
            raise ValueError(
                "a budget must be a JSON object with the fields of "
                f"dvmrl.experiment.Preset, got {_json_type(data)}"
            )
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown budget keys {unknown}; known keys: {sorted(known)}"
            )
        missing = [
            name
            for name, spec in cls.__dataclass_fields__.items()
            if name not in data and spec.default is MISSING
        ]
        if missing:
            raise ValueError(
                f"budget keys {missing} are missing; a budget gives every field "
                "of dvmrl.experiment.Preset except adversarial_steps and "
                "adversarial_starts (default 30 and 2), and a budget file may "
                "also leave out name (default: the file name); see the presets "
                "in 'dvmrl run --help'"
            )
        return cls(**data)

    def check(self, baselines: bool = True) -> None:
        """Raise BudgetError when a field has the wrong type or the preset cannot run.

        Counts must be JSON integers (not floats, strings or booleans).

        Args:
            baselines: also check that ``epochs`` splits into baseline trials
                (:meth:`check_baseline_trials`); runs without random search
                and Bayesian optimisation pass False.
        """
        if not isinstance(self.name, str) or not self.name:
            raise BudgetError(
                f"budget name must be a non-empty string, got {_shown(self.name)}"
            )
        for name in (
            "epochs",
            "trial_epochs",
            "seeds",
            "retrain_epochs",
            "agent_slice",
            "robust_n",
            "n_initial_points",
            "adversarial_steps",
            "adversarial_starts",
        ):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise BudgetError(
                    f"budget {self.name!r}: {name} must be an integer >= 1, "
                    f"got {_shown(value)}"
                )
        for name in ("max_train", "max_val"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 2):
                raise BudgetError(
                    f"budget {self.name!r}: {name} must be an integer >= 2 or null "
                    f"(the whole pool), got {_shown(value)}"
                )
        if baselines:
            self.check_baseline_trials()

    def check_baseline_trials(self) -> None:
        """Raise BudgetError when ``epochs`` do not split into baseline trials.

        Random search and Bayesian optimisation need at least two trials of
        ``trial_epochs`` (the last one may be cut to half) and no leftover
        too short for a last trial. The agent does not use ``trial_epochs``.
        """
        try:
            EpochBudget(self.epochs, self.trial_epochs)
        except ValueError as err:
            shortest = shortest_trial_epochs(self.trial_epochs)
            raise BudgetError(
                f"budget {self.name!r}: epochs {self.epochs} cannot fit one trial "
                f"of trial_epochs {self.trial_epochs} (the last trial may be cut "
                f"to half of trial_epochs, {shortest} epochs, but no shorter); "
                f"raise epochs to at least {shortest} or lower trial_epochs"
            ) from err
        two_trials = self.trial_epochs + shortest_trial_epochs(self.trial_epochs)
        if self.epochs < two_trials:
            # One trial would make random search and Bayesian optimisation
            # return their first random configuration, with nothing compared.
            raise BudgetError(
                f"budget {self.name!r}: epochs {self.epochs} fit only one trial of "
                f"trial_epochs {self.trial_epochs}, so the baselines would compare "
                f"no configurations; raise epochs to at least {two_trials} (one "
                "full trial and one cut to half) or lower trial_epochs"
            )
        leftover = self.epochs % self.trial_epochs
        shortest_trial = EpochBudget(self.epochs, self.trial_epochs).min_trial_epochs
        if 0 < leftover < shortest_trial:
            raise BudgetError(
                f"budget {self.name!r}: epochs {self.epochs} leave {leftover} epochs "
                f"after the full trials of trial_epochs {self.trial_epochs}, too few "
                "for a last trial (at least half of trial_epochs), so the baselines "
                f"would train {self.epochs - leftover} epochs and the agent "
                f"{self.epochs}; make epochs a multiple of trial_epochs"
            )

    def check_agent_steps(self) -> None:
        """Raise BudgetError when the agent could not spend exactly ``epochs``.

        Only runs with the agent need this: it trains whole steps of
        ``agent_slice`` epochs, and every method must spend the same epochs.
        """
        if self.epochs < self.agent_slice:
            raise BudgetError(
                f"budget {self.name!r}: {self.epochs} epochs cannot fit one agent "
                "step of "
                f"{self.agent_slice} epochs; raise epochs or lower agent_slice"
            )
        if self.epochs % self.agent_slice:
            used = self.epochs - self.epochs % self.agent_slice
            raise BudgetError(
                f"budget {self.name!r}: epochs {self.epochs} is not a multiple of "
                f"agent_slice {self.agent_slice}, so the agent would train {used} "
                f"epochs and the baselines {self.epochs}; make epochs a multiple of "
                "agent_slice"
            )


def _is_int(value: Any) -> bool:
    """Return True for an integer that is not a boolean."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    """Name the JSON type of a parsed value with its article, for messages."""
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(value), f"a {type(value).__name__}")


def _shown(value: Any) -> str:
    """Show a value as JSON writes it (true, "8", NaN), for messages."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


# Sized so that on 2 CPU cores quick finishes within 3 minutes and small
# within 15 (3 methods). full is meant for GPU nodes and the full Materials
# Project data. Measured times are in docs/benchmarks.md.
PRESETS: dict[str, Preset] = {
    "quick": Preset(
        name="quick",
        epochs=16,
        trial_epochs=4,
        seeds=1,
        max_train=1000,
        max_val=400,
        retrain_epochs=4,
        robust_n=24,
        n_initial_points=2,
        agent_slice=2,
        adversarial_steps=15,
        adversarial_starts=2,
    ),
    "small": Preset(
        name="small",
        epochs=60,
        trial_epochs=10,
        seeds=3,
        max_train=4000,
        max_val=1000,
        retrain_epochs=10,
        robust_n=48,
        n_initial_points=2,
        agent_slice=5,
        adversarial_steps=20,
        adversarial_starts=2,
    ),
    "full": Preset(
        name="full",
        epochs=600,
        trial_epochs=50,
        seeds=5,
        max_train=None,
        max_val=None,
        retrain_epochs=50,
        robust_n=256,
        n_initial_points=4,
        agent_slice=20,
        adversarial_steps=50,
        adversarial_starts=4,
    ),
}


def resolve_preset(name_or_path: str | Preset) -> Preset:
    """Return a preset by name, or read a custom one from a JSON file.

    Raises:
        ValueError: for an unknown name or an invalid preset.
        FileNotFoundError: for a JSON path that does not exist.
    """
    if isinstance(name_or_path, Preset):
        preset = name_or_path
    elif name_or_path in PRESETS:
        preset = PRESETS[name_or_path]
    elif str(name_or_path).lower().endswith(".json") or Path(name_or_path).is_file():
        # An existing file is read as JSON whatever its extension.
        return _read_budget_file(Path(name_or_path))
    else:
        raise ValueError(
            f"unknown budget {name_or_path!r}; expected one of {', '.join(PRESETS)} "
            "or a JSON file with the fields of dvmrl.experiment.Preset"
        )
    preset.check(baselines=False)
    return preset


def _read_budget_file(path: Path) -> Preset:
    """Read and check a budget JSON file. Every error names the file."""
    if path.is_dir():
        raise ValueError(
            f"budget file {path} is a folder; pass a JSON file with the fields of "
            "dvmrl.experiment.Preset, or quick, small or full"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"budget file {path} not found; check the path, or pass quick, small or "
            "full"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"budget file {path} is not valid JSON: {err}") from err
    try:
        if isinstance(data, dict):
            data.setdefault("name", path.stem)
        preset = Preset.from_dict(data)
        # The baseline trial rules depend on the methods, which RunSpec.check
        # receives.
        preset.check(baselines=False)
    except ValueError as err:
        raise ValueError(f"budget file {path}: {err}") from err
    return preset


@dataclass
class RunSpec:
    """Everything that defines a run; two runs with equal specs give equal results.

    Attributes:
        data: vendored data set name or CSV path.
        formula_column: formula column of a CSV file.
        target_column: target column of a CSV file (eV/atom).
        target_kind: what a CSV file's targets are, ``formation_energy`` or
            ``energy_above_hull``; it sets the stability threshold.
        preset: the budget.
        seeds: the seeds, one search per method and seed.
        methods: method names, a subset of ``METHODS``.
        agent_path: agent file (None: the pretrained agent shipped with dvmrl).
        agent_learn: let the agent learn online during its episodes.
        space: the search space.
    """

    data: str = DEFAULT_DATA
    formula_column: str = "formula"
    target_column: str = "target"
    target_kind: str = "formation_energy"
    preset: Preset = field(default_factory=lambda: PRESETS["small"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    agent_path: str | None = None
    agent_learn: bool = False
    space: SearchSpace = SEARCH_SPACE

    def check(self) -> None:
        """Raise ValueError for unknown methods, empty lists or a bad preset."""
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(
                f"unknown method(s) {unknown}; expected a subset of "
                f"{', '.join(METHODS)}"
            )
        if not self.methods:
            raise ValueError(
                "no methods given; pass at least one of " + ", ".join(METHODS)
            )
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods listed twice: {self.methods}")
        from dvmrl.datasets import STABILITY_THRESHOLDS

        if self.target_kind not in STABILITY_THRESHOLDS:
            raise ValueError(
                f"unknown target_kind {self.target_kind!r}: expected one of "
                f"{', '.join(STABILITY_THRESHOLDS)}"
            )
        if not self.seeds:
            raise ValueError("no seeds given; pass --seeds N with N >= 1")
        bad = [s for s in self.seeds if not _is_int(s) or s < 0]
        if bad:
            raise ValueError(
                f"seeds must be integers >= 0, got {bad}; pass seeds such as [0, 1, 2]"
            )
        # NumPy integers become ints, which run.json can store.
        self.seeds = [int(s) for s in self.seeds]
        if "bayesian" in self.methods and max(self.seeds) >= BAYESIAN_SEED_LIMIT:
            raise ValueError(
                f"seed {max(self.seeds)} is too large for Bayesian optimisation, "
                f"whose scikit-optimize generator takes seeds below "
                f"{BAYESIAN_SEED_LIMIT}; pass smaller seeds such as [0, 1, 2]"
            )
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(
                f"seeds listed twice: {self.seeds}; list each seed once (a repeat "
                "would count one run twice in the summaries)"
            )
        if isinstance(self.preset, str):
            self.preset = resolve_preset(self.preset)
        if not isinstance(self.preset, Preset):
            raise ValueError(
                f"preset must be a Preset or the name of one ({', '.join(PRESETS)}) "
                f"or a budget JSON file, got {_shown(self.preset)}"
            )
        baselines = any(m in self.methods for m in ("random", "bayesian"))
        self.preset.check(baselines=baselines)
        preset = self.preset
        if "agent" in self.methods:
            preset.check_agent_steps()
        trials = -(-preset.epochs // preset.trial_epochs)
        if "bayesian" in self.methods and preset.n_initial_points >= trials:
            raise BudgetError(
                f"budget {preset.name!r}: n_initial_points {preset.n_initial_points} "
                f"is not below the {trials} trials that epochs {preset.epochs} and "
                f"trial_epochs {preset.trial_epochs} give, so Bayesian optimisation "
                "would never fit its Gaussian process and would be random search; "
                f"lower n_initial_points below {trials} or raise epochs"
            )

    def signature(
        self, data_checksum: str, agent_checksum: str | None = None
    ) -> dict[str, Any]:
        """Return what must match for a resumed run to continue this one.

        ``agent_checksum`` is the SHA-256 of the agent file when the agent
        runs, so that a file replaced under the same path (or a shipped agent
        changed by an upgrade) is not mixed into a resumed run.
        """
        return {
            "data_checksum": data_checksum,
            "preset": self.preset.to_dict(),
            "seeds": list(self.seeds),
            "methods": list(self.methods),
            "agent_path": self.agent_path,
            "agent_checksum": agent_checksum,
            "agent_learn": self.agent_learn,
            "target_kind": self.target_kind,
            "space": self.space.describe(),
        }


# ---------------------------------------------------------------------------
# Files


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to ``path`` atomically and flushed to the disk."""
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=False)
    write_text_atomic(path, text + "\n", fsync=True)


def save_npz_atomic(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """Write arrays to an ``.npz`` file atomically."""
    write_atomic(path, lambda handle: np.savez(handle, **arrays), binary=True)


def finite_or_none(value: Any) -> Any:
    """Return floats that JSON can hold: non-finite values become None."""
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.ndarray):
        return finite_or_none(value.tolist())
    return value


def frame_checksum(df) -> str:
    """Return the SHA-256 of a data frame's formulas and targets."""
    digest = hashlib.sha256()
    digest.update(df["formula"].astype(str).str.cat(sep="\n").encode())
    digest.update(np.ascontiguousarray(df["target"].to_numpy(np.float64)).tobytes())
    return digest.hexdigest()


def derive_seed(*parts: int) -> int:
    """Return a 31-bit seed derived from integers (stable across platforms)."""
    return int(
        np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] >> 1
    )


# ---------------------------------------------------------------------------
# Data


@dataclass
class Pools:
    """Featurised training, validation and test parts of one split.

    Attributes:
        kind: the split kind (``random`` or ``chemsys``).
        x_train, x_val, x_test: ``CompositionBatch`` of each part.
        y_train, y_val, y_test: targets in eV/atom, float64 [N].
        train_index, val_index, test_index: rows of the data frame in each
            part, after subsampling.
        split: the split before subsampling.
        train_size, val_size: pool sizes before subsampling.
    """

    kind: str
    x_train: Any
    y_train: np.ndarray
    x_val: Any
    y_val: np.ndarray
    x_test: Any
    y_test: np.ndarray
    train_index: np.ndarray
    val_index: np.ndarray
    test_index: np.ndarray
    split: Any
    train_size: int
    val_size: int


def load_data(
    data: str,
    formula_column: str = "formula",
    target_column: str = "target",
    target_kind: str = "formation_energy",
):
    """Load a vendored data set by name or a user's CSV; return (df, info).

    ``formula_column`` and ``target_column`` name the columns of a CSV file,
    and ``target_kind`` says what its targets are.
    """
    from dvmrl import datasets

    resolve = getattr(datasets, "resolve_data", None)
    if resolve is not None:
        df, info = resolve(
            data,
            formula_column=formula_column,
            target_column=target_column,
            target_kind=target_kind,
        )
    elif data in datasets.list_datasets():
        df, info = datasets.load(data), datasets.dataset_info(data)
    else:
        path = Path(data)
        if not path.is_file():
            raise FileNotFoundError(
                f"data {data!r} is neither a vendored data set "
                f"({', '.join(datasets.list_datasets())}) nor an existing CSV file"
            )
        df, info = datasets.load_csv(path), {"file": str(path)}
    info = dict(info)
    info["frame_sha256"] = frame_checksum(df)
    return df, info


def featurize_rows(df, index: np.ndarray):
    """Featurise the compositions at ``index`` rows of ``df``."""
    from dvmrl.featurize import featurize

    formulas = df["formula"].to_numpy()[index]
    return featurize([str(f) for f in formulas])


def subsample(index: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Return at most ``limit`` entries of ``index``, drawn by seed, sorted."""
    index = np.asarray(index, dtype=np.int64)
    if limit is None or len(index) <= limit:
        return index
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(index, size=int(limit), replace=False))


def check_split_sizes(split, kind: str, rows: int) -> None:
    """Raise ValueError when a part of ``split`` has fewer than 2 compositions.

    Validation scores and test metrics (R^2, the GCV score) need two or more
    compositions per part.
    """
    sizes = {"training": len(split.train), "validation": len(split.val)}
    sizes["test"] = len(split.test)
    small = [f"{part} {count}" for part, count in sizes.items() if count < 2]
    if small:
        raise ValueError(
            f"the {kind} split of the {rows} compositions leaves too few in some "
            f"parts ({', '.join(small)}); dvmrl run needs at least 2 in each, so "
            "pass a data set with more compositions"
        )


def split_for_run(df, kind: str, seed: int):
    """Return the ``kind`` split of ``df`` that dvmrl run uses, checked for size.

    Raises:
        ValueError: when a part has fewer than 2 rows, with advice that fits
            dvmrl run, whose splits have fixed shares.
    """
    from dvmrl.splits import EmptyTrainingPartError, make_split

    try:
        split = make_split(df, kind, seed)
    except EmptyTrainingPartError as err:
        # dvmrl run splits with fixed shares, so only more data can help.
        groups = "chemical systems" if kind == "chemsys" else "compositions"
        use = " (it retrains the chosen models on it)" if kind == "chemsys" else ""
        raise ValueError(
            f"the {kind} split{use} of {len(df)} rows leaves no training rows; its "
            f"test and validation parts keep {groups} whole, so pass a data set "
            f"with more {groups}"
        ) from err
    check_split_sizes(split, kind, len(df))
    return split


def make_pools(df, kind: str, seed: int, preset: Preset, split=None) -> Pools:
    """Split ``df``, subsample the training and validation pools, featurise them.

    ``split`` is the ``kind`` split of ``df`` for ``seed`` when the caller
    made it already (default: made here with :func:`split_for_run`).
    """
    if split is None:
        split = split_for_run(df, kind, seed)
    train = subsample(split.train, preset.max_train, derive_seed(seed, 1))
    val = subsample(split.val, preset.max_val, derive_seed(seed, 2))
    test = np.asarray(split.test, dtype=np.int64)
    target = df["target"].to_numpy(np.float64)
    return Pools(
        kind=kind,
        x_train=featurize_rows(df, train),
        y_train=target[train],
        x_val=featurize_rows(df, val),
        y_val=target[val],
        x_test=featurize_rows(df, test),
        y_test=target[test],
        train_index=train,
        val_index=val,
        test_index=test,
        split=split,
        train_size=len(split.train),
        val_size=len(split.val),
    )


# ---------------------------------------------------------------------------
# Training, scoring and robustness of one configuration


def shipped_agent_saw(data: str | None, agent_path: str | None) -> bool:
    """Tell whether the shipped agent was meta-trained on tasks of ``data``."""
    from dvmrl.meta import TASK_DATASETS

    return agent_path is None and data in TASK_DATASETS


def model_and_train_configs(config: dict[str, Any], epochs: int, seed: int):
    """Return (ModelConfig, TrainConfig) for a search-space configuration.

    The training procedure is that of the agent's environment
    (``dvmrl.env.DEFAULT_TRAIN``): a constant learning rate without warm-up,
    the same gradient clipping, the squared error and selection on the
    validation RMSE. So the methods differ only in the settings they choose.
    """
    from dvmrl.env import DEFAULT_TRAIN
    from dvmrl.model import ModelConfig
    from dvmrl.training import TrainConfig

    model_config = ModelConfig(
        hidden=int(config["hidden"]),
        layers=int(config["layers"]),
        dropout=float(config["dropout"]),
        **BASE_MODEL,
    )
    train_config = TrainConfig(
        lr=float(config["lr"]),
        batch_size=int(config["batch_size"]),
        weight_decay=float(config["weight_decay"]),
        epochs=int(epochs),
        seed=int(seed),
        **{key: DEFAULT_TRAIN[key] for key in SHARED_TRAIN_KEYS},
    )
    return model_config, train_config


def train_config_on(
    pools: Pools, config: dict[str, Any], epochs: int, seed: int, device
):
    """Train one configuration from scratch; return (trainer, per-epoch history)."""
    from dvmrl.training import Trainer

    model_config, train_config = model_and_train_configs(config, epochs, seed)
    trainer = Trainer(
        model_config,
        train_config,
        pools.x_train,
        pools.y_train,
        pools.x_val,
        pools.y_val,
        device=device,
    )
    history = trainer.fit(epochs=epochs)
    return trainer, history


def score(
    trainer_or_model, x, y: np.ndarray, stability_threshold: float | None = None
) -> tuple[dict[str, Any], np.ndarray]:
    """Return (test metrics, predictions in eV/atom) of a trainer or a model.

    ``stability_threshold`` (eV/atom) sets the stability call of precision,
    recall and F1; None uses the formation-energy threshold (0 eV/atom).
    """
    from dvmrl.metrics import FORMATION_ENERGY_THRESHOLD, regression_metrics

    if hasattr(trainer_or_model, "predict"):
        prediction = np.asarray(trainer_or_model.predict(x), dtype=np.float64)
    else:
        prediction = predict_model(trainer_or_model, x)
    if stability_threshold is None:
        stability_threshold = FORMATION_ENERGY_THRESHOLD
    metrics = regression_metrics(y, prediction, stability_threshold=stability_threshold)
    return finite_or_none(dict(metrics)), prediction


def predict_model(model, x, batch_size: int = 4096) -> np.ndarray:
    """Return a model's predictions (eV/atom) on a ``CompositionBatch``."""
    import torch

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batch = x.to(device, dtype)
    out = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(batch.frac), batch_size):
            stop = start + batch_size
            pred = model(
                batch.element_index[start:stop],
                batch.frac[start:stop],
                batch.mask[start:stop],
            )
            out.append(pred.detach().to("cpu", torch.float64).numpy())
    return np.concatenate(out) if out else np.zeros(0)


def robustness(model, x, preset: Preset, seed: int) -> dict[str, Any]:
    """Measure a model's vulnerability and robustness radius on compositions ``x``.

    Vulnerability is the mean largest |f(x + delta) - f(x)| (eV/atom) at box
    radius 0.05; the robustness radius is the mean smallest radius (fraction
    units, capped at 0.25) that moves a prediction by 0.05 eV/atom.

    Returns:
        dict: the two scores, the mean L2 norm of the perturbations, the
        settings and per-composition lists (formula, largest change at
        epsilon, radius, whether tau was reached within r_max).
    """
    from dvmrl import adversarial

    model.eval()
    options = {
        "steps": preset.adversarial_steps,
        "starts": preset.adversarial_starts,
        "seed": int(seed),
    }
    vulnerable = adversarial.vulnerability(model, x, epsilon=ROBUST_EPSILON, **options)
    radius = adversarial.robustness_radius(
        model, x, tau=ROBUST_TAU, r_max=ROBUST_R_MAX, **options
    )
    return {
        "vulnerability": float(vulnerable.score),
        "robustness_radius": float(radius.score),
        "robustness_radius_l2": float(radius.score_l2),
        "n_not_reached": int(radius.n_not_reached),
        "epsilon": ROBUST_EPSILON,
        "tau": ROBUST_TAU,
        "r_max": ROBUST_R_MAX,
        "n_compositions": len(x),
        "per_composition": {
            "formula": [str(f) for f in radius.table["formula"]],
            "max_change": [float(v) for v in vulnerable.table["abs_change"]],
            "radius": [float(v) for v in radius.table["radius"]],
            "reached": [bool(v) for v in radius.table["reached"]],
        },
    }


# Reason recorded for a unit whose search trained no usable model.
NO_MODEL_REASON = "every trial of the search diverged, so no model was chosen"


def _missing_robustness(n_compositions: int, error: str) -> dict[str, Any]:
    """Return the robustness record of a unit whose scores could not be measured."""
    return {
        "vulnerability": None,
        "robustness_radius": None,
        "robustness_radius_l2": None,
        "n_not_reached": None,
        "epsilon": ROBUST_EPSILON,
        "tau": ROBUST_TAU,
        "r_max": ROBUST_R_MAX,
        "n_compositions": n_compositions,
        "per_composition": {},
        "error": error,
    }


# ---------------------------------------------------------------------------
# The run


class RunDirectoryError(ValueError):
    """The output folder contains another run, or a run with other settings."""


@dataclass
class UnitPaths:
    """Files of one (method, seed) unit inside the output folder."""

    root: Path

    @property
    def checkpoint(self) -> Path:
        """Checkpoint of the best model found so far."""
        return self.root / "best.pt"

    @property
    def predictions(self) -> Path:
        """Test predictions of the chosen model (random and chemsys splits)."""
        return self.root / "predictions.npz"


def unit_files(out_dir: str | os.PathLike, method: str, seed: int) -> UnitPaths:
    """Return the file paths of one (method, seed) unit of the run in ``out_dir``."""
    return UnitPaths(Path(out_dir) / "units" / f"{method}-seed{seed}")


def _read_run_json(path: Path, fix: str) -> Any:
    """Read a JSON file of the run folder, raising RunDirectoryError if corrupt."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RunDirectoryError(
            f"{path} is corrupt: it is not valid JSON ({err}); {fix}"
        ) from err


def _check_run_file(recorded: Any, path: Path) -> None:
    """Raise RunDirectoryError unless ``run.json`` has the parts the report reads."""
    if (
        isinstance(recorded, dict)
        and "signature" not in recorded
        and isinstance(recorded.get("train"), dict)
    ):
        folder = path.parent
        raise RunDirectoryError(
            f"{folder} contains a dvmrl train run, not a dvmrl run; continue it with "
            f"dvmrl train --resume --out {shlex.quote(str(folder))}, or choose "
            "another --out"
        )
    problem = None
    if not isinstance(recorded, dict):
        problem = f"it contains {_json_type(recorded)}, not an object"
    elif not isinstance(recorded.get("signature"), dict):
        problem = '"signature" is not an object'
    elif not isinstance(recorded.get("data_info", {}), dict):
        problem = '"data_info" is not an object'
    elif not isinstance(recorded.get("command_line", []), (list, type(None))):
        problem = '"command_line" is not a list'
    if problem is not None:
        raise RunDirectoryError(f"{path} is corrupt: {problem}; {FRESH_RUN}")


def _describe_difference(key: str, old: Any, new: Any, recorded: dict) -> str:
    """Describe one setting that differs between a stored run and a request."""
    if key == "preset" and isinstance(old, dict):
        fields = [f for f in new if old.get(f) != new[f]]
        stored = ", ".join(f"{f} {_shown(old.get(f))}" for f in fields)
        requested = ", ".join(f"{f} {_shown(new[f])}" for f in fields)
        return f"budget: stored {stored}, requested {requested}"
    if key == "data_checksum":
        return (
            f"data: stored {_shown(recorded.get('data'))} (checksum "
            f"{str(old)[:12]}...), requested data has checksum {new[:12]}..."
        )
    if key == "space":
        return "search space: the stored run used another dvmrl.search.SEARCH_SPACE"
    if key == "agent_checksum":
        return (
            "agent: the agent file changed since the run started (checksum "
            f"{str(old)[:12]}... then, {str(new)[:12]}... now); restore that file "
            "to continue the run"
        )
    if key == "agent_path":
        shipped = "the pretrained agent"
        return (
            f"agent: stored {shipped if old is None else _shown(old)}, requested "
            f"{shipped if new is None else _shown(new)}"
        )
    label = {"agent_learn": "agent-learn", "target_kind": "target kind"}.get(key, key)
    return f"{label}: stored {_shown(old)}, requested {_shown(new)}"


def _state_problem(value: Any, kind: str, high: float | None = None) -> str | None:
    """Return what is wrong with one stored value, or None when it is fine.

    ``kind`` is ``count`` (an integer >= 0), ``number`` (a finite number),
    ``positive`` (a finite number >= 0) or ``share`` (a number in [0, 1]).
    None (JSON null) is accepted for numbers, as non-finite values are stored so.
    """
    if kind == "count":
        if not _is_int(value) or value < 0 or (high is not None and value > high):
            upper = "" if high is None else f" and <= {high:g}"
            return f"an integer >= 0{upper}"
        return None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "a number or null"
    if not math.isfinite(value):
        return "a finite number or null"
    low = {"number": None, "positive": 0.0, "share": 0.0}[kind]
    if kind == "share":
        high = 1.0
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        return f"a number {bounds} or null"
    return None


# Per part of a unit: the fields checked and their kinds (see _state_problem).
_METRIC_FIELDS = {
    "rmse": "positive",
    "mae": "positive",
    "r2": "number",
    "max_error": "positive",
    "gcv_score": "positive",
    "accuracy": "share",
    "precision": "share",
    "recall": "share",
    "f1": "share",
}
_ROBUSTNESS_FIELDS = {
    "vulnerability": "positive",
    "robustness_radius": "positive",
    "robustness_radius_l2": "positive",
    "n_compositions": "count",
}


def check_state(state: dict[str, Any], preset: Preset, path: Path, fix: str) -> None:
    """Raise RunDirectoryError when the resume state has wrong types or values.

    Checks what the run and its report read: the types of every part of a
    unit, and the sign or range of the epochs, errors, scores and seconds.
    ``fix`` is the way out that the message gives when the whole state is unusable.
    """
    checker = _StateChecker(path, fix, preset.epochs)
    units = checker.obj(state.get("units"), '"units"')
    for key, unit in units.items():
        checker.unit(key, unit)


class _StateChecker:
    """Checker of one resume state. Each failure names the file, entry and fix."""

    def __init__(self, path: Path, fix: str, epochs: int) -> None:
        self.path = path
        self.fix = fix
        self.epochs = epochs
        self.key: str | None = None

    def fail(self, where: str, value: Any, expected: str) -> None:
        remedy = self.fix
        if self.key is not None:
            remedy = (
                f'remove the entry {self.key!r} from "units" in it and rerun '
                f"with --resume to recompute that unit, or {FRESH_RUN}"
            )
        raise RunDirectoryError(
            f"{self.path} is corrupt: {where} is {_shown(value)}, expected "
            f"{expected}; {remedy}"
        )

    def value(self, value: Any, kind: str, where: str, high=None) -> None:
        expected = _state_problem(value, kind, high)
        if expected is not None:
            self.fail(where, value, expected)

    def obj(self, value: Any, where: str) -> dict:
        if not isinstance(value, dict):
            self.fail(where, value, "an object")
        return value

    def array(self, value: Any, where: str) -> list:
        if not isinstance(value, list):
            self.fail(where, value, "an array")
        return value

    def unit(self, key: str, unit: Any) -> None:
        self.key = key
        at = f"units[{key!r}]"
        self.obj(unit, at)
        method, seed = unit.get("method"), unit.get("seed")
        if method not in METHODS or not _is_int(seed) or key != f"{method}/seed{seed}":
            self.fail(f"{at} method and seed", [method, seed], f"those of {key!r}")

        seconds = self.obj(unit.get("seconds", {}), f"{at}['seconds']")
        for name, value in seconds.items():
            self.value(value, "positive", f"{at}['seconds'][{name!r}]")
        for i, trial in enumerate(
            self.array(unit.get("trials", []), f"{at}['trials']")
        ):
            self.trial(trial, f"{at}['trials'][{i}]")

        for i, step in enumerate(self.array(unit.get("steps", []), f"{at}['steps']")):
            where = f"{at}['steps'][{i}]"
            self.obj(step, where)
            self.value(step.get("val_rmse"), "positive", f"{where}['val_rmse']")
            spent = step.get("epochs_spent")
            self.value(spent, "count", f"{where}['epochs_spent']", self.epochs)

        episode = self.obj(unit.get("episode", {}), f"{at}['episode']")
        snapshot = episode.get("snapshot")
        if snapshot is not None and (not isinstance(snapshot, str) or "/" in snapshot):
            self.fail(f"{at}['episode']['snapshot']", snapshot, "a folder name")

        if unit.get("chosen") is not None:
            self.chosen(unit["chosen"], f"{at}['chosen']")
        if "epochs_used" in unit:
            used = unit["epochs_used"]
            self.value(used, "count", f"{at}['epochs_used']", self.epochs)
        for part in ("test", "chemsys"):
            if part in unit:
                metrics = self.obj(unit[part], f"{at}[{part!r}]")
                for name, kind in _METRIC_FIELDS.items():
                    where = f"{at}[{part!r}][{name!r}]"
                    self.value(metrics.get(name), kind, where)
        if "robustness" in unit:
            self.robustness(unit["robustness"], f"{at}['robustness']")

    def trial(self, trial: Any, where: str) -> None:
        self.obj(trial, where)
        fields = set(TrialRecord.__dataclass_fields__)
        if not fields - {"extra"} <= set(trial) <= fields:
            self.fail(f"{where} keys", sorted(trial), f"those of {sorted(fields)}")
        self.config(trial["config"], f"{where}['config']")
        self.value(trial["val_rmse"], "positive", f"{where}['val_rmse']")
        for name in ("epochs", "epochs_before"):
            self.value(trial[name], "count", f"{where}[{name!r}]", self.epochs)
        self.value(trial["index"], "count", f"{where}['index']")
        self.value(trial["seconds"], "positive", f"{where}['seconds']")
        extra = self.obj(trial.get("extra", {}), f"{where}['extra']")
        curve = self.array(extra.get("val_curve", []), f"{where}['extra']['val_curve']")
        for j, value in enumerate(curve):
            self.value(value, "positive", f"{where}['extra']['val_curve'][{j}]")

    def chosen(self, chosen: Any, where: str) -> None:
        self.obj(chosen, where)
        self.config(chosen.get("config"), f"{where}['config']")
        self.value(chosen.get("val_rmse"), "positive", f"{where}['val_rmse']")
        trained = chosen.get("epochs_trained")
        self.value(trained, "count", f"{where}['epochs_trained']", self.epochs)

    def config(self, config: Any, where: str) -> None:
        self.obj(config, where)
        for name in SEARCH_SPACE.names:
            value = config.get(name)
            if value is None:
                self.fail(f"{where}[{name!r}]", value, "a number")
            self.value(value, "positive", f"{where}[{name!r}]")

    def robustness(self, robust: Any, where: str) -> None:
        self.obj(robust, where)
        for name, kind in _ROBUSTNESS_FIELDS.items():
            self.value(robust.get(name, 0), kind, f"{where}[{name!r}]")
        table = self.obj(
            robust.get("per_composition", {}), f"{where}['per_composition']"
        )
        where = f"{where}['per_composition']['radius']"
        for j, value in enumerate(self.array(table.get("radius", []), where)):
            self.value(value, "positive", f"{where}[{j}]")


class Experiment:
    """One run of the main job, resumable from its output folder.

    Args:
        spec: what to run.
        out_dir: output folder; ``state.json``, ``run.json``, per-unit
            checkpoints and the report go there.
        resume: continue the run already in ``out_dir``. Without it an
            output folder that contains anything raises ``RunDirectoryError``,
            and with it a folder that contains no run raises it.
        device: torch device (or name) to train on.
        command_line: recorded in the provenance.
        progress: a factory ``progress(method, seed, total_epochs)`` returning
            an object with ``update(n)`` and ``close()`` (a tqdm bar, for
            instance), or None for no progress display.
    """

    def __init__(
        self,
        spec: RunSpec,
        out_dir: str | os.PathLike,
        resume: bool = False,
        device: Any = "cpu",
        command_line: Sequence[str] | None = None,
        progress: Callable[[str, int, int], Any] | None = None,
    ) -> None:
        spec.check()
        self.spec = spec
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.device = device
        self.command_line = list(sys.argv if command_line is None else command_line)
        self.progress = progress
        self.state: dict[str, Any] = {}
        self.df = None
        self.data_info: dict[str, Any] = {}
        self._pools: dict[tuple[str, int], Pools] = {}
        # Splits by (kind, seed), made once by the size check before any work.
        self._splits: dict[tuple[str, int], Any] = {}
        self._lock: FolderLock | None = None

    # -- setup --------------------------------------------------------------

    def prepare(self) -> None:
        """Load the data, check the output folder and write or check ``run.json``.

        Raises:
            RunDirectoryError: when the folder contains another run (or any file)
                and ``resume`` is false; when ``resume`` is true and the folder
                contains no run, the recorded run differs from the request or a
                state file is corrupt; when the folder is not writable; or when
                another process runs in it.
        """
        try:
            self._prepare()
        except BaseException:
            self.close()
            raise

    def _prepare(self) -> None:
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise RunDirectoryError(
                f"--out {self.out_dir} is a file, but --out must be a folder; "
                "choose another path (a new or empty folder)"
            )
        existing = self.out_dir.is_dir() and any(self.out_dir.iterdir())
        if existing and not self.resume:
            raise RunDirectoryError(
                f"output folder {self.out_dir} is not empty (it contains another "
                "run or "
                "other files); pass --resume to continue the run in it, or choose "
                "another --out"
            )
        run_file = self.out_dir / RUN_FILE
        if self.resume and not existing:
            where = "is empty" if self.out_dir.is_dir() else "does not exist"
            raise RunDirectoryError(
                f"nothing to resume: output folder {self.out_dir} {where}; start "
                "the run without --resume"
            )
        if self.resume and not run_file.is_file():
            raise RunDirectoryError(
                f"output folder {self.out_dir} contains files but no {RUN_FILE}; "
                "it is not "
                "a dvmrl run folder, so choose another --out"
            )
        if self.resume:
            self._lock_folder()
            remove_stale_temporaries(self.out_dir)
        self.df, self.data_info = load_data(
            self.spec.data,
            self.spec.formula_column,
            self.spec.target_column,
            self.spec.target_kind,
        )
        self._check_data_size()
        if "agent" in self.spec.methods:
            # Fail before any work when the agent file is missing, invalid or
            # made for an environment of other observation or action sizes.
            from dvmrl.env import ACTIONS, observation_size, task_feature_count
            from dvmrl.experiment_agent import check_agent_fits, load_agent

            agent = load_agent(self.spec.agent_path)
            n_obs = observation_size(task_feature_count())
            check_agent_fits(agent, n_obs, len(ACTIONS))
            if shipped_agent_saw(self.spec.data, self.spec.agent_path):
                logger.warning(
                    "the shipped agent was meta-trained on tasks drawn from %s, so "
                    "it is not compared on unseen data; use mp-formation-energy or "
                    "your own data for a fair comparison",
                    self.spec.data,
                )
        signature = self.spec.signature(
            self.data_info["frame_sha256"], self._agent_checksum()
        )
        if self.resume:
            recorded = _read_run_json(run_file, FRESH_RUN)
            _check_run_file(recorded, run_file)
            self._check_signature(recorded, signature)
            self.state = self._read_state()
            self._check_unit_files()
            self._check_writable()
            logger.info("resuming the run in %s", self.out_dir)
            return
        self._check_writable()
        self._lock_folder()
        if any(self.out_dir.iterdir()):
            # Another run filled the folder between the first check and the lock.
            raise RunDirectoryError(
                f"output folder {self.out_dir} is not empty (another run started "
                "in it); pass --resume to continue that run, or choose another --out"
            )
        write_json_atomic(
            run_file,
            {
                "format": "dvmrl-run",
                "signature": signature,
                "data": self.spec.data,
                "formula_column": self.spec.formula_column,
                "target_column": self.spec.target_column,
                "data_info": finite_or_none(self.data_info),
                "command_line": self.command_line,
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
        self.state = {"format": STATE_FORMAT, "version": STATE_VERSION, "units": {}}
        self._write_state()

    def _check_data_size(self) -> None:
        """Raise ValueError, before anything is written, when a split is too small.

        The splits are kept for :meth:`pools`, so each is made, and each of
        its lopsided-split warnings logged, once.
        """
        for seed in self.spec.seeds:
            for kind in ("random", "chemsys"):
                self._splits[(kind, seed)] = split_for_run(self.df, kind, seed)

    def _lock_folder(self) -> None:
        """Take the output folder's lock (see FolderLock) until close() or exit."""
        if self._lock is not None:
            return
        lock = FolderLock(self.out_dir)
        try:
            lock.acquire()
        except FolderInUseError as err:
            raise RunDirectoryError(str(err)) from None
        self._lock = lock

    def close(self) -> None:
        """Release the output folder's lock; the process exit also releases it."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _check_writable(self) -> None:
        """Create the output folder if needed, and raise if it is not writable."""
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            probe_folder(self.out_dir)
        except FileExistsError as err:
            # mkdir reports a symbolic link to nowhere as an existing file.
            if not self.out_dir.is_symlink():
                raise
            raise RunDirectoryError(
                f"--out {self.out_dir} is a symbolic link to "
                f"{os.readlink(self.out_dir)!r}, which does not exist or loops; "
                "create its target as a folder or choose another --out"
            ) from err
        except OSError as err:
            if not isinstance(err, PermissionError) and err.errno != errno.EROFS:
                raise
            if not self.out_dir.is_dir():
                # The folder could not be created: its nearest existing
                # ancestor rejects new entries.
                parent = next(p for p in self.out_dir.parents if p.is_dir())
                raise RunDirectoryError(
                    f"cannot create output folder {self.out_dir}: {parent} is not "
                    f"writable ({err.strerror}); make it writable or choose "
                    "another --out"
                ) from err
            raise RunDirectoryError(
                f"output folder {self.out_dir} is not writable ({err.strerror}); "
                "make it writable or choose another --out"
            ) from err

    def _agent_checksum(self) -> str | None:
        """Return the SHA-256 of the agent file, or None when the agent does not run."""
        if "agent" not in self.spec.methods:
            return None
        from dvmrl.agent import PRETRAINED_AGENT
        from dvmrl.datasets.build import sha256_file

        return sha256_file(self.spec.agent_path or PRETRAINED_AGENT)

    def _check_signature(self, recorded: dict[str, Any], signature: dict) -> None:
        """Raise RunDirectoryError naming each setting that differs from the run."""
        stored = recorded["signature"]
        differences = []
        for key, requested in signature.items():
            if key in ("agent_checksum", "target_kind") and key not in stored:
                # Runs of earlier versions recorded neither the agent's
                # checksum nor a target kind (they read CSV files as
                # formation energies).
                if key == "target_kind" and requested != "formation_energy":
                    differences.append(
                        f"target kind: stored formation_energy, requested {requested}"
                    )
                continue
            old = stored.get(key)
            if key == "agent_checksum" and (old is None) != (requested is None):
                # The agent runs in one of the two runs only: the methods
                # differ, and that difference is the one to name.
                continue
            if key == "methods" and isinstance(old, list):
                # The units do not depend on the order of the methods (each
                # seeds its own generators), so only the set must match.
                same = sorted(map(str, old)) == sorted(requested)
            else:
                same = old == requested
            if not same:
                differences.append(_describe_difference(key, old, requested, recorded))
        if differences:
            raise RunDirectoryError(
                f"output folder {self.out_dir} contains a run with other settings "
                f"({'; '.join(differences)}); resume it with the stored --data, "
                "--budget, --seeds, --methods, --agent and --agent-learn, or choose "
                "another --out"
            )

    @property
    def stability_threshold(self) -> float | None:
        """Stability threshold of the data (eV/atom), or None when it states none."""
        value = self.data_info.get("stability_threshold")
        return None if value is None else float(value)

    def _read_state(self) -> dict[str, Any]:
        path = self.out_dir / STATE_FILE
        if not path.is_file():
            return {"format": STATE_FORMAT, "version": STATE_VERSION, "units": {}}
        fix = (
            f"delete {path} and rerun with --resume to recompute every unit in "
            f"this folder, or {FRESH_RUN}"
        )
        state = _read_run_json(path, fix)
        if not isinstance(state, dict):
            raise RunDirectoryError(
                f"{path} is corrupt: it contains {_json_type(state)}, not the run "
                f"state object; {fix}"
            )
        if "format" not in state and "version" not in state:
            raise RunDirectoryError(
                f"{path} is corrupt: it has no 'format' and 'version' fields; {fix}"
            )
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise RunDirectoryError(
                f"{path} was written by another version of dvmrl "
                f"(format {state.get('format')!r}, version {state.get('version')!r}, "
                f"expected {STATE_FORMAT!r}, {STATE_VERSION!r}); {fix}"
            )
        check_state(state, self.spec.preset, path, fix)
        return state

    def _check_unit_files(self) -> None:
        """Raise RunDirectoryError when a unit's stored test predictions are unreadable.

        A missing predictions file is recomputed by ``run_unit``; an unreadable
        one is reported, so that a damaged folder does not pass unnoticed.
        """
        for unit in self.state["units"].values():
            if "test" not in unit:
                continue
            path = unit_files(self.out_dir, unit["method"], unit["seed"]).predictions
            if not path.is_file():
                continue
            try:
                with np.load(path) as arrays:
                    for key in ("test_index", "y_true", "y_pred", "n_elements"):
                        arrays[key]
            except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
                raise RunDirectoryError(
                    f"{path} is corrupt ({type(err).__name__}: {err}); delete it and "
                    "rerun with --resume to score the unit's chosen model again, or "
                    f"{FRESH_RUN}"
                ) from err

    def check_folder(self) -> None:
        """Raise FolderReplacedError when the locked output folder is gone.

        Called before each write into the folder, so that a folder deleted
        during the run is not recreated piecemeal (see FolderLock).
        """
        if self._lock is not None:
            self._lock.check_in_place()

    def _write_state(self) -> None:
        self.check_folder()
        write_json_atomic(self.out_dir / STATE_FILE, finite_or_none(self.state))

    def unit(self, method: str, seed: int) -> dict[str, Any]:
        """Return the state of one (method, seed) unit, creating it if new."""
        key = f"{method}/seed{seed}"
        units = self.state["units"]
        if key not in units:
            units[key] = {"method": method, "seed": seed, "trials": [], "seconds": {}}
        return units[key]

    def unit_paths(self, method: str, seed: int) -> UnitPaths:
        """Return the file paths of one unit, creating its folder."""
        paths = unit_files(self.out_dir, method, seed)
        paths.root.mkdir(parents=True, exist_ok=True)
        return paths

    def pools(self, kind: str, seed: int) -> Pools:
        """Return the featurised pools of one split kind and seed (cached)."""
        key = (kind, seed)
        if key not in self._pools:
            self._pools[key] = make_pools(
                self.df, kind, seed, self.spec.preset, split=self._splits.get(key)
            )
        return self._pools[key]

    # -- the job ------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run (or continue) every unit, then write the report and return its data."""
        from dvmrl.report import write_report

        if self.df is None:
            self.prepare()
        for seed in self.spec.seeds:
            for method in self.spec.methods:
                self.run_unit(method, seed)
            # Pools and splits of finished seeds are not needed again.
            for key in [k for k in self._pools if k[1] == seed]:
                del self._pools[key]
            for key in [k for k in self._splits if k[1] == seed]:
                del self._splits[key]
        self.check_folder()
        return write_report(self.out_dir)

    def run_unit(self, method: str, seed: int) -> dict[str, Any]:
        """Run the search, scoring, robustness and chemsys retraining of one unit."""
        unit = self.unit(method, seed)
        if "chosen" in unit and unit["chosen"] is None:
            self._record_no_model(unit, seed)
            return unit
        if "test" in unit and not self.unit_paths(method, seed).predictions.is_file():
            # The test predictions were deleted (or never written): score again.
            del unit["test"]
        if "chosen" not in unit:
            if method == "agent":
                self._agent_search(unit, seed)
            else:
                self._baseline_search(unit, method, seed)
            if unit["chosen"] is None:
                self._record_no_model(unit, seed)
                return unit
        if "test" not in unit:
            self._score_test(unit, method, seed)
        if "robustness" not in unit:
            self._measure_robustness(unit, method, seed)
        if "chemsys" not in unit:
            self._retrain_chemsys(unit, method, seed)
        return unit

    def _record_no_model(self, unit: dict[str, Any], seed: int) -> None:
        """Record missing results for a unit whose search chose no model."""
        reason = NO_MODEL_REASON
        if "test" not in unit:
            n_test = len(self.pools("random", seed).y_test)
            unit["test"] = {name: None for name in _METRIC_FIELDS}
            unit["test"].update(n=n_test, error=reason)
        if "robustness" not in unit:
            unit["robustness"] = _missing_robustness(0, reason)
        if "chemsys" not in unit:
            n_test = len(self.pools("chemsys", seed).y_test)
            unit["chemsys"] = {"rmse": None, "mae": None, "n": n_test, "error": reason}
            unit["chemsys_epochs"] = 0
        self._write_state()

    # -- searches -------------------------------------------------------------

    def _baseline_search(self, unit: dict[str, Any], method: str, seed: int) -> None:
        preset = self.spec.preset
        pools = self.pools("random", seed)
        paths = self.unit_paths(method, seed)
        history = [TrialRecord.from_dict(r) for r in unit["trials"]]
        best = best_trial(history)
        bar = self._bar(method, seed, sum(r.epochs for r in history))
        state = {"best": best.score if best else math.inf}

        def objective(config: dict[str, Any], index: int, epochs: int) -> TrialResult:
            from dvmrl.training import TrainingDivergedError

            started = time.perf_counter()
            try:
                trainer, epoch_history = train_config_on(
                    pools, config, epochs, derive_seed(seed, index, 7), self.device
                )
            except TrainingDivergedError as err:
                # A diverged trial counts its epochs and is never chosen; the
                # search goes on with the next configuration.
                logger.warning("%s seed %d trial %d diverged: %s", method, seed, index, err)
                return TrialResult(
                    val_rmse=math.nan,
                    epochs=int(err.epoch or epochs),
                    seconds=time.perf_counter() - started,
                    extra={"val_curve": [], "diverged_epoch": err.epoch},
                )
            curve = [finite_or_none(float(h["val_rmse"])) for h in epoch_history]
            finite = [v for v in curve if v is not None]
            val_rmse = min(finite) if finite else math.inf
            if val_rmse < state["best"]:
                # The checkpoint is written before the trial's record, so a
                # kill in between only costs a rerun of this trial.
                self._save_checkpoint(
                    trainer, paths.checkpoint, method, seed, index, config
                )
                state["best"] = val_rmse
            return TrialResult(
                val_rmse=val_rmse,
                epochs=int(trainer.epochs_done),
                seconds=time.perf_counter() - started,
                extra={"val_curve": curve},
            )

        def on_trial(record: TrialRecord) -> None:
            unit["trials"].append(record.to_dict())
            self._write_state()
            if bar is not None:
                bar.update(record.epochs)

        budget = EpochBudget(preset.epochs, preset.trial_epochs)
        records = run_search(
            method,
            objective,
            budget,
            seed,
            space=self.spec.space,
            history=history,
            on_trial=on_trial,
            n_initial_points=preset.n_initial_points,
        )
        if bar is not None:
            bar.close()
        best = best_trial(records)
        unit["epochs_used"] = budget.spent
        unit["seconds"]["search"] = budget.seconds
        if best is None:
            # No model to score: run_unit records the unit's results as
            # missing (n/a in the report) and the run goes on.
            logger.warning(
                "%s seed %d: every trial diverged (non-finite validation RMSE); "
                "no model was chosen",
                method,
                seed,
            )
            unit["chosen"] = None
            self._write_state()
            return
        unit["chosen"] = {
            "config": best.config,
            "trial": best.index,
            "val_rmse": best.val_rmse,
            "epochs_trained": best.epochs,
        }
        self._write_state()
        logger.info(
            "%s seed %d: best trial %d, val RMSE %.4f eV/atom, %d epochs used",
            method,
            seed,
            best.index,
            best.score,
            budget.spent,
        )

    def _save_checkpoint(
        self, trainer, path: Path, method, seed, trial, config
    ) -> None:
        self.check_folder()
        tmp = path.with_name(f".{path.name}.tmp")
        trainer.save(
            tmp,
            metadata={"method": method, "seed": seed, "trial": trial, "config": config},
        )
        os.replace(tmp, path)

    def _load_chosen(self, unit: dict[str, Any], method: str, seed: int):
        """Return the chosen model, retrained if its checkpoint is missing or stale."""
        from dvmrl.training import CheckpointError, load_checkpoint

        paths = self.unit_paths(method, seed)
        chosen = unit["chosen"]
        if paths.checkpoint.is_file():
            try:
                model, metadata = load_checkpoint(paths.checkpoint)
            except CheckpointError as err:
                logger.warning(
                    "%s is unreadable (%s); retraining it", paths.checkpoint, err
                )
            else:
                if _metadata_value(metadata, "trial") == chosen.get("trial"):
                    return model.to(self.device)
                logger.warning(
                    "%s contains trial %s, not the chosen trial %s; retraining it",
                    paths.checkpoint,
                    _metadata_value(metadata, "trial"),
                    chosen.get("trial"),
                )
        if method == "agent":
            raise RunDirectoryError(
                f"{paths.checkpoint} of the agent's chosen model is missing or "
                f"corrupt; remove the entry '{method}/seed{seed}' from \"units\" in "
                f"{self.out_dir / STATE_FILE} and rerun with --resume to rerun its "
                f"episode, or {FRESH_RUN}"
            )
        trainer, _ = train_config_on(
            self.pools("random", seed),
            chosen["config"],
            chosen["epochs_trained"],
            derive_seed(seed, chosen["trial"], 7),
            self.device,
        )
        self._save_checkpoint(
            trainer, paths.checkpoint, method, seed, chosen["trial"], chosen["config"]
        )
        return trainer.model

    def _agent_search(self, unit: dict[str, Any], seed: int) -> None:
        from dvmrl.experiment_agent import run_agent_unit

        run_agent_unit(self, unit, seed)

    # -- scoring ------------------------------------------------------------

    def _score_test(self, unit: dict[str, Any], method: str, seed: int) -> None:
        started = time.perf_counter()
        pools = self.pools("random", seed)
        model = self._load_chosen(unit, method, seed)
        metrics, prediction = score(
            model, pools.x_test, pools.y_test, self.stability_threshold
        )
        paths = self.unit_paths(method, seed)
        save_npz_atomic(
            paths.predictions,
            test_index=pools.test_index,
            y_true=pools.y_test,
            y_pred=prediction,
            n_elements=pools.x_test.n_elements.numpy(),
        )
        unit["test"] = metrics
        unit["seconds"]["test"] = time.perf_counter() - started
        self._write_state()
        logger.info(
            "%s seed %d: test RMSE %.4f, MAE %.4f eV/atom",
            method,
            seed,
            metrics["rmse"],
            metrics["mae"],
        )

    def robust_rows(self, pools: Pools) -> np.ndarray:
        """Return the test positions used for robustness, the same for every unit.

        Only compositions of two or more elements can be perturbed, and a
        composition that several rows repeat counts once (its first row), so
        the probe set contains distinct compositions that can change. The test
        part of the random split does not depend on the seed, so a fixed
        generator picks the same compositions for every method and seed.
        """
        from dvmrl.splits import distinct_alloy_rows

        candidates = np.flatnonzero(distinct_alloy_rows(self.df, pools.test_index))
        rng = np.random.default_rng(20260101)
        count = min(self.spec.preset.robust_n, len(candidates))
        picked = rng.choice(len(candidates), size=count, replace=False)
        return candidates[np.sort(picked)]

    def _measure_robustness(self, unit: dict[str, Any], method: str, seed: int) -> None:
        started = time.perf_counter()
        pools = self.pools("random", seed)
        rows = self.robust_rows(pools)
        x = pools.x_test[rows]
        from dvmrl.adversarial import NonFinitePredictionError

        if len(rows) == 0:
            result = _missing_robustness(
                0, "the test part has no composition of two or more elements"
            )
        else:
            model = self._load_chosen(unit, method, seed)
            try:
                result = robustness(model, x, self.spec.preset, derive_seed(seed, 11))
            except NonFinitePredictionError as err:
                # Recorded as missing scores: the report shows n/a for this
                # unit instead of the whole run stopping.
                logger.warning(
                    "%s seed %d: robustness not measured: %s", method, seed, err
                )
                result = _missing_robustness(len(x), str(err))
        result["test_index"] = [int(i) for i in pools.test_index[rows]]
        unit["robustness"] = finite_or_none(result)
        unit["seconds"]["robustness"] = time.perf_counter() - started
        self._write_state()
        if result["vulnerability"] is not None:
            logger.info(
                "%s seed %d: vulnerability %.4f eV/atom, robustness radius %.4f",
                method,
                seed,
                result["vulnerability"],
                result["robustness_radius"],
            )

    def _retrain_chemsys(self, unit: dict[str, Any], method: str, seed: int) -> None:
        started = time.perf_counter()
        pools = self.pools("chemsys", seed)
        config = unit["chosen"]["config"]
        from dvmrl.training import TrainingDivergedError

        try:
            trainer, _ = train_config_on(
                pools,
                config,
                self.spec.preset.retrain_epochs,
                derive_seed(seed, 13),
                self.device,
            )
        except TrainingDivergedError as err:
            # Recorded as missing metrics: the report shows n/a for this unit
            # instead of the whole run stopping.
            logger.warning("%s seed %d: chemsys retraining diverged: %s", method, seed, err)
            unit["chemsys"] = {
                "rmse": None,
                "mae": None,
                "n": int(len(pools.y_test)),
                "diverged_epoch": err.epoch,
            }
            unit["chemsys_epochs"] = int(err.epoch or 0)
            unit["seconds"]["chemsys"] = time.perf_counter() - started
            self._write_state()
            return
        metrics, prediction = score(
            trainer, pools.x_test, pools.y_test, self.stability_threshold
        )
        paths = self.unit_paths(method, seed)
        save_npz_atomic(
            paths.root / "chemsys_predictions.npz",
            test_index=pools.test_index,
            y_true=pools.y_test,
            y_pred=prediction,
        )
        unit["chemsys"] = metrics
        unit["chemsys_epochs"] = int(trainer.epochs_done)
        unit["seconds"]["chemsys"] = time.perf_counter() - started
        self._write_state()
        logger.info(
            "%s seed %d: chemsys hold-out RMSE %.4f, MAE %.4f eV/atom",
            method,
            seed,
            metrics["rmse"],
            metrics["mae"],
        )

    def _bar(self, method: str, seed: int, done: int):
        if self.progress is None:
            return None
        bar = self.progress(method, seed, self.spec.preset.epochs)
        if done:
            bar.update(done)
        return bar


def _metadata_value(metadata: dict[str, Any], key: str) -> Any:
    """Find ``key`` in checkpoint metadata, at the top level or under a user section."""
    if key in metadata:
        return metadata[key]
    for section in ("user", "metadata", "extra"):
        inner = metadata.get(section)
        if isinstance(inner, dict) and key in inner:
            return inner[key]
    return None


def run_experiment(
    spec: RunSpec,
    out_dir: str | os.PathLike,
    resume: bool = False,
    device: Any = "cpu",
    command_line: Sequence[str] | None = None,
    progress: Callable[[str, int, int], Any] | None = None,
) -> dict[str, Any]:
    """Run the main job into ``out_dir`` (see ``Experiment``) and return the report."""
    experiment = Experiment(spec, out_dir, resume, device, command_line, progress)
    try:
        experiment.prepare()
        return experiment.run()
    finally:
        experiment.close()


__all__ = [
    "DEFAULT_DATA",
    "METHODS",
    "PRESETS",
    "Experiment",
    "Preset",
    "RunDirectoryError",
    "RunSpec",
    "resolve_preset",
    "run_experiment",
]
