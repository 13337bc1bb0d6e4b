"""Hyperparameter search baselines: random search and Bayesian optimisation.

Both methods search one space (``SEARCH_SPACE``) under a budget counted in
training epochs (one epoch is one pass over the training pool, whatever the
model size). A trial trains one configuration from scratch and returns its
best validation RMSE (eV/atom); the search returns the trial with the lowest
one.

Searches are resumable without pickles: every finished trial is a plain
record (``TrialRecord``), and a search started with a list of records
continues as if it had never stopped. Random search draws trial ``i`` from
a generator seeded by ``(seed, i)``. Bayesian optimisation replays the
records into a fresh ``skopt.Optimizer`` (one ``ask`` and one ``tell`` per
record), which consumes the optimiser's random state exactly as the
uninterrupted run did, so the next proposal is the same.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from dvmrl.layout import is_integral

logger = logging.getLogger(__name__)

# Validation RMSE (eV/atom) passed to the surrogate for a trial whose training
# diverged (non-finite RMSE), so the GP receives a bad but finite value.
DIVERGED_RMSE = 10.0


@dataclass(frozen=True)
class Dimension:
    """One hyperparameter of the search space.

    Attributes:
        name: key in the configuration dictionaries (``lr``, ``hidden``, ...).
        low: smallest value, inclusive.
        high: largest value, inclusive.
        kind: ``"real"`` or ``"integer"``; integers reach the objective as
            Python ints.
        log: sample uniformly in the logarithm (base 2 for integers).
        description: meaning and unit, shown in the report.
    """

    name: str
    low: float
    high: float
    kind: str
    log: bool
    description: str

    def contains(self, value: Any) -> bool:
        """Return whether ``value`` lies in the range (and is integral for integers)."""
        if self.kind == "integer" and int(value) != value:
            return False
        return self.low <= value <= self.high

    def to_skopt(self, surrogate: bool = False):
        """Return the equivalent ``skopt.space`` dimension.

        With ``surrogate`` (the space of ``skopt.Optimizer``), an integer
        dimension without a log scale becomes the real interval [low - 0.5,
        high + 0.5], which :meth:`SearchSpace.to_config` rounds to the
        nearest integer. The optimiser rescales its dimensions to [0, 1], and
        its ``Integer`` then rounds uniform draws on [low, high], which gives
        the two end values half the probability of the others. The interval
        gives every integer the same share, as random search draws them.
        """
        from skopt.space import Integer, Real

        prior = "log-uniform" if self.log else "uniform"
        if surrogate and self.kind == "integer" and not self.log:
            return Real(self.low - 0.5, self.high + 0.5, prior=prior, name=self.name)
        if self.kind == "integer":
            return Integer(
                int(self.low), int(self.high), prior=prior, base=2, name=self.name
            )
        return Real(float(self.low), float(self.high), prior=prior, name=self.name)


@dataclass(frozen=True)
class SearchSpace:
    """The hyperparameters every method tunes, with their ranges."""

    dimensions: tuple[Dimension, ...]

    @property
    def names(self) -> list[str]:
        """Dimension names in order."""
        return [d.name for d in self.dimensions]

    def __getitem__(self, name: str) -> Dimension:
        for dim in self.dimensions:
            if dim.name == name:
                return dim
        raise KeyError(name)

    def to_skopt(self, surrogate: bool = False) -> list:
        """Return the space as a list of ``skopt.space`` dimensions.

        ``surrogate`` selects the form for ``skopt.Optimizer`` (see
        :meth:`Dimension.to_skopt`).
        """
        return [d.to_skopt(surrogate) for d in self.dimensions]

    def to_config(self, values: Sequence[Any]) -> dict[str, Any]:
        """Turn a point (one value per dimension, in order) into a configuration.

        Integer dimensions become Python ``int`` and real ones Python
        ``float``, whatever numpy type the sampler produced, so that the
        configuration is JSON-serialisable and the trainer gets plain ints.
        A real value of an integer dimension (from the optimiser's interval
        [low - 0.5, high + 0.5]) rounds half up and stays within [low, high].
        """
        if len(values) != len(self.dimensions):
            raise ValueError(
                f"a point needs {len(self.dimensions)} values ({self.names}), "
                f"got {len(values)}"
            )
        config: dict[str, Any] = {}
        for dim, value in zip(self.dimensions, values, strict=True):
            if dim.kind == "integer":
                nearest = math.floor(float(value) + 0.5)
                config[dim.name] = int(min(max(nearest, dim.low), dim.high))
            else:
                config[dim.name] = float(value)
        return config

    def to_point(self, config: dict[str, Any]) -> list[Any]:
        """Turn a configuration back into a point in dimension order."""
        missing = [n for n in self.names if n not in config]
        if missing:
            raise ValueError(f"configuration lacks {missing}; it has {sorted(config)}")
        return [
            int(config[d.name]) if d.kind == "integer" else float(config[d.name])
            for d in self.dimensions
        ]

    def check(self, config: dict[str, Any]) -> None:
        """Raise ValueError if a configuration value lies outside its range."""
        for dim in self.dimensions:
            value = config[dim.name]
            if not dim.contains(value):
                raise ValueError(
                    f"{dim.name}={value!r} is outside the search space "
                    f"[{dim.low}, {dim.high}]"
                )

    def describe(self) -> list[dict[str, Any]]:
        """Return the dimensions as JSON-ready dictionaries."""
        return [asdict(d) for d in self.dimensions]


# The agent's moves (learning rate x0.5 / x2, batch size x0.5 / x2, weight
# decay x0.1 / x10, dropout -0.1 / +0.1, add / remove a layer, widen /
# narrow) are kept inside these same ranges (dvmrl.env.LR_RANGE and its
# siblings). So every method searches the same set of configurations.
SEARCH_SPACE = SearchSpace(
    (
        Dimension("lr", 1e-4, 3.2e-2, "real", True, "AdamW learning rate"),
        Dimension("batch_size", 16, 512, "integer", True, "compositions per step"),
        Dimension("weight_decay", 1e-8, 1e-2, "real", True, "AdamW weight decay"),
        Dimension("dropout", 0.0, 0.5, "real", False, "dropout rate in the head"),
        Dimension("layers", 1, 6, "integer", False, "message-passing layers"),
        Dimension("hidden", 16, 256, "integer", True, "node state width H"),
    )
)


def shortest_trial_epochs(trial_epochs: int) -> int:
    """Return the epochs of the shortest last trial: half of a full one, rounded up."""
    return max(1, -(-trial_epochs // 2))


@dataclass
class EpochBudget:
    """Budget of one search, in training epochs.

    Trials get ``trial_epochs`` each. The last one may be shortened to what
    is left, but not below ``min_trial_epochs``; the search stops when less
    than that is left.

    Attributes:
        total: epochs available to the search.
        trial_epochs: epochs of one full trial.
        min_trial_epochs: shortest trial worth running; default: half of
            ``trial_epochs``, rounded up.
        spent: epochs used so far (every pass over the training pool counts).
        seconds: wall seconds used so far, including surrogate fits.
    """

    total: int
    trial_epochs: int
    min_trial_epochs: int | None = None
    spent: int = 0
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.min_trial_epochs is None:
            self.min_trial_epochs = shortest_trial_epochs(self.trial_epochs)
        if self.trial_epochs < 1:
            raise ValueError(f"trial_epochs must be >= 1, got {self.trial_epochs}")
        if not 1 <= self.min_trial_epochs <= self.trial_epochs:
            raise ValueError(
                f"min_trial_epochs must lie in [1, trial_epochs={self.trial_epochs}], "
                f"got {self.min_trial_epochs}"
            )
        if self.total < self.min_trial_epochs:
            raise ValueError(
                f"a budget of {self.total} epochs cannot fit one trial of at least "
                f"{self.min_trial_epochs} epochs; raise the budget or shorten trials"
            )

    @property
    def remaining(self) -> int:
        """Epochs left."""
        return self.total - self.spent

    def next_trial_epochs(self) -> int:
        """Return the epochs of the next trial, or 0 when none fits."""
        epochs = min(self.trial_epochs, self.remaining)
        return epochs if epochs >= self.min_trial_epochs else 0

    def charge(self, epochs: int, seconds: float) -> None:
        """Record epochs and wall seconds used."""
        if epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {epochs}")
        self.spent += int(epochs)
        self.seconds += float(seconds)


@dataclass
class TrialResult:
    """Outcome of one trial, returned by the objective.

    Attributes:
        val_rmse: best validation RMSE along the trial, eV/atom (may be inf
            or nan when training diverged).
        epochs: epochs trained (at most the epochs the trial was given).
        seconds: wall seconds of the training.
        extra: JSON-ready details kept in the record (per-epoch curve, ...).
    """

    val_rmse: float
    epochs: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrialRecord:
    """One finished trial, as stored in the resume state (plain JSON data).

    Attributes:
        index: position in the search, from 0.
        config: the configuration trained.
        val_rmse: best validation RMSE, eV/atom (``None`` when not finite).
        epochs: epochs trained.
        seconds: wall seconds of the trial, surrogate work included.
        epochs_before: budget epochs spent before this trial.
        extra: details from the objective.
    """

    index: int
    config: dict[str, Any]
    val_rmse: float | None
    epochs: int
    seconds: float
    epochs_before: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return the record as a JSON-ready dictionary."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialRecord:
        """Rebuild a record written by ``to_dict``."""
        return cls(**data)

    @property
    def score(self) -> float:
        """Validation RMSE used for ranking (inf when training diverged)."""
        return math.inf if self.val_rmse is None else float(self.val_rmse)


Objective = Callable[[dict[str, Any], int, int], TrialResult]
"""``objective(config, trial_index, epochs) -> TrialResult``."""


def _check_seed(seed, limit: int | None = None) -> int:
    """Return the seed as an int; raise ValueError unless 0 <= seed < limit."""
    if not is_integral(seed) or seed < 0 or (limit is not None and seed >= limit):
        bound = "" if limit is None else f" below {limit}"
        raise ValueError(
            f"seed must be an integer >= 0{bound}, got {seed!r}; pass a whole "
            "number such as 0"
        )
    return int(seed)


# scikit-optimize seeds NumPy's legacy RandomState, which takes 0 to 2**32 - 1.
BAYESIAN_SEED_LIMIT = 2**32


class RandomProposer:
    """Random search: trial ``i`` is drawn from a generator seeded by (seed, i)."""

    def __init__(self, space: SearchSpace, seed: int) -> None:
        self.space = space
        self.seed = _check_seed(seed)
        self._dims = space.to_skopt()
        self._count = 0

    def ask(self) -> dict[str, Any]:
        """Return the configuration of the next trial."""
        state = np.random.SeedSequence([self.seed, self._count]).generate_state(1)[0]
        rng = np.random.RandomState(int(state))
        values = [dim.rvs(1, random_state=rng)[0] for dim in self._dims]
        return self.space.to_config(values)

    def tell(self, config: dict[str, Any], val_rmse: float) -> None:
        """Move on to the next trial (random search ignores the result)."""
        self._count += 1


class BayesianProposer:
    """Bayesian optimisation with scikit-optimize's GP surrogate, via ask/tell.

    The surrogate is ``skopt.Optimizer(base_estimator="GP")`` with the
    ``gp_hedge`` acquisition; the first ``n_initial_points`` trials are drawn
    at random from the optimiser's own generator.
    """

    def __init__(
        self, space: SearchSpace, seed: int, n_initial_points: int = 5
    ) -> None:
        from skopt import Optimizer

        seed = _check_seed(seed, BAYESIAN_SEED_LIMIT)
        if n_initial_points < 1:
            raise ValueError(f"n_initial_points must be >= 1, got {n_initial_points}")
        self.space = space
        self.optimizer = Optimizer(
            space.to_skopt(surrogate=True),
            base_estimator="GP",
            n_initial_points=int(n_initial_points),
            acq_func="gp_hedge",
            random_state=int(seed),
        )

    def ask(self) -> dict[str, Any]:
        """Return the configuration the optimiser proposes next."""
        with warnings.catch_warnings(), _one_blas_thread():
            # skopt warns when it proposes a point it has seen; it then draws
            # a random one, which is what a resumed run replays too.
            warnings.simplefilter("ignore", UserWarning)
            point = self.optimizer.ask()
        return self.space.to_config(point)

    def tell(self, config: dict[str, Any], val_rmse: float) -> None:
        """Report a trial's validation RMSE (eV/atom) and refit the surrogate."""
        value = float(val_rmse)
        if not math.isfinite(value):
            value = DIVERGED_RMSE
        with warnings.catch_warnings(), _one_blas_thread():
            warnings.simplefilter("ignore", UserWarning)
            self.optimizer.tell(self.space.to_point(config), min(value, DIVERGED_RMSE))


def _one_blas_thread():
    """Limit BLAS to one thread while the GP is fitted and queried.

    The GP's matrices are tiny, and on a busy machine a multi-threaded BLAS
    spends more time waiting than computing.
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


def make_proposer(
    method: str, space: SearchSpace, seed: int, n_initial_points: int = 5
) -> RandomProposer | BayesianProposer:
    """Return the proposer of a baseline method (``random`` or ``bayesian``)."""
    if method == "random":
        return RandomProposer(space, seed)
    if method == "bayesian":
        return BayesianProposer(space, seed, n_initial_points)
    raise ValueError(
        f"unknown search method {method!r}; expected 'random' or 'bayesian'"
    )


def replay(
    proposer: RandomProposer | BayesianProposer, history: Sequence[TrialRecord]
) -> None:
    """Bring a fresh proposer to the state it had after ``history``.

    Each record gets one ``ask`` and one ``tell``, in order. A proposal
    that differs from the recorded configuration means the history came from
    another space or seed; the recorded configuration is passed to ``tell`` anyway and a
    warning is logged.
    """
    for record in history:
        proposed = proposer.ask()
        if not _same_config(proposed, record.config):
            logger.warning(
                "trial %d: replayed proposal %s differs from the recorded %s; "
                "the history was written with another space or seed",
                record.index,
                proposed,
                record.config,
            )
        proposer.tell(record.config, record.score)


def _same_config(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a.keys() != b.keys():
        return False
    return all(math.isclose(float(a[k]), float(b[k]), rel_tol=1e-12) for k in a)


def best_trial(history: Sequence[TrialRecord]) -> TrialRecord | None:
    """Return the trial with the lowest validation RMSE (the first on ties)."""
    finished = [r for r in history if math.isfinite(r.score)]
    if not finished:
        return None
    return min(finished, key=lambda r: (r.score, r.index))


def run_search(
    method: str,
    objective: Objective,
    budget: EpochBudget,
    seed: int,
    space: SearchSpace = SEARCH_SPACE,
    history: Sequence[TrialRecord] = (),
    on_trial: Callable[[TrialRecord], None] | None = None,
    n_initial_points: int = 5,
) -> list[TrialRecord]:
    """Run (or continue) a random or Bayesian search until the budget is spent.

    Args:
        method: ``"random"`` or ``"bayesian"``.
        objective: trains one configuration; see ``Objective``.
        budget: the epoch budget; charged with every trial, including the
            replayed ones, so pass a fresh budget when resuming.
        seed: seeds the proposals.
        space: the search space.
        history: trials finished before an interruption, in order.
        on_trial: called after every finished trial with its record, so the
            caller can write it to disk before the next trial starts.
        n_initial_points: random trials before the GP takes over (Bayesian
            optimisation only).

    Returns:
        list[TrialRecord]: every trial of the search, the replayed ones first.

    Raises:
        ValueError: for an unknown method.
    """
    proposer = make_proposer(method, space, seed, n_initial_points)
    records = list(history)
    started = time.perf_counter()
    replay(proposer, records)
    for record in records:
        budget.charge(record.epochs, record.seconds)
    budget.seconds += time.perf_counter() - started

    while True:
        epochs = budget.next_trial_epochs()
        if epochs == 0:
            break
        started = time.perf_counter()
        config = proposer.ask()
        result = objective(config, len(records), epochs)
        if result.epochs > epochs:
            raise RuntimeError(
                f"objective trained {result.epochs} epochs, more than the {epochs} "
                "it was given"
            )
        if result.epochs == 0:
            # An objective that trains nothing would loop forever.
            raise RuntimeError(f"objective trained 0 epochs on trial {len(records)}")
        val_rmse = float(result.val_rmse)
        proposer.tell(config, val_rmse)
        record = TrialRecord(
            index=len(records),
            config=config,
            val_rmse=val_rmse if math.isfinite(val_rmse) else None,
            epochs=int(result.epochs),
            seconds=time.perf_counter() - started,
            epochs_before=budget.spent,
            extra=result.extra,
        )
        budget.charge(record.epochs, record.seconds)
        records.append(record)
        logger.debug(
            "%s trial %d: %s -> val RMSE %s eV/atom in %d epochs",
            method,
            record.index,
            config,
            record.val_rmse,
            record.epochs,
        )
        if on_trial is not None:
            on_trial(record)
    return records
