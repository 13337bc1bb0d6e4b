"""Adversarial composition perturbations: search, vulnerability, robustness radius.

For a composition with fractions x (real slots only) and a box radius r in
fraction units (0.05 = 5 at.%), the feasible perturbations are

    delta with the same elements (padding stays 0), sum_k delta_k = 0,
    |delta_k| <= r and x_k + delta_k >= min(x_k, floor),

so every perturbed composition is valid, keeps all its elements, and an
element already below ``floor`` may only grow. In y = x + delta that is the
box-constrained simplex {sum y = 1, lo <= y <= hi} with
lo = max(x - r, min(x, floor)) and hi = x + r, onto which
:func:`dvmrl.projection.project_simplex_box` projects exactly.

The search maximises the objective |f(x + delta) - f(x)|^2 - lambda ||delta||^2
by projected gradient ascent, batched over compositions, random starts and
both signs of the change. Gradients with respect to the fractions come from
the predictor's backward pass (``torch.autograd.grad``). The gradient of the
squared change vanishes at delta = 0, so each run ascends on a signed
change s (f(x + delta) - f(x)) with s = +1 or -1 until that change is
positive, and on the objective from then on.

A predictor is any callable ``f(element_index, frac, mask) -> Tensor [B]`` in
eV/atom that is differentiable in ``frac``, such as
:class:`dvmrl.model.CompositionMPNN`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import torch

from dvmrl.compositions import format_formula
from dvmrl.elements import ELEMENTS
from dvmrl.projection import project_simplex_box

logger = logging.getLogger(__name__)

Predictor = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

DEFAULT_FLOOR = 0.01
DEFAULT_EPSILON = 0.05
DEFAULT_TAU = 0.05
DEFAULT_R_MAX = 0.25
DEFAULT_STEPS = 50
DEFAULT_STARTS = 4
# Random candidates screened (forward passes only) for each random start.
DEFAULT_SCREEN = 16
# Compositions per chunk of the search. A chunk puts starts rows per
# composition through the predictor in one call, so memory stays bounded for
# any batch size (the fused kernels' workspace is about 15 kB per float32 row
# at K = 3, so 4 starts take about 250 MB).
DEFAULT_CHUNK_SIZE = 4096
# Step size of the runs from screened random points, as a fraction of that
# of the runs from delta = 0, because they start near a good point and
# refine it. With full steps such a run at r = 0.2 or 0.25 could jump to a
# box vertex where the change had the wrong sign, and stop there. On 150
# compositions and a model trained for 30 epochs, the best of 2,000 random
# feasible points beat that search for 16 compositions, and beat the search
# with quarter steps for 5 to 6. At r <= 0.1 the mean change stayed the same.
SCREENED_STEP_FRACTION = 0.25


@dataclass
class SearchResult:
    """Best perturbation found per composition (B compositions, K slots).

    Attributes:
        frac (Tensor): original fractions [B, K], float64.
        delta (Tensor): best perturbation [B, K], float64; 0 in padding.
        perturbed (Tensor): ``frac + delta`` [B, K], float64, a valid
            composition in every row.
        base (Tensor): f(x) [B] in eV/atom.
        change (Tensor): f(x + delta) - f(x) [B] in eV/atom.
        objective (Tensor): |change|^2 - lambda ||delta||^2 [B].
        radius (Tensor): box radius r used per composition [B], fraction units.
        formulas (list[str]): original compositions as formulas.
        perturbed_formulas (list[str]): perturbed compositions as formulas
            with plain decimal amounts; they parse back to ``perturbed``
            within the rounding of its dtype (about 1e-16 in float64, 1e-7
            in float32).
    """

    frac: torch.Tensor
    delta: torch.Tensor
    perturbed: torch.Tensor
    base: torch.Tensor
    change: torch.Tensor
    objective: torch.Tensor
    radius: torch.Tensor
    formulas: list[str]
    perturbed_formulas: list[str]

    def table(self) -> pd.DataFrame:
        """Return one row per composition with the perturbation and its effect."""
        return pd.DataFrame(
            {
                "formula": self.formulas,
                "perturbed_formula": self.perturbed_formulas,
                "radius": self.radius.numpy(),
                "prediction": self.base.numpy(),
                "change": self.change.numpy(),
                "abs_change": self.change.abs().numpy(),
                "delta_l2": self.delta.norm(dim=1).numpy(),
                "delta_max": self.delta.abs().amax(dim=1).numpy(),
            }
        )


@dataclass
class VulnerabilityReport:
    """Vulnerability at radius epsilon: the mean largest |change| in eV/atom.

    Attributes:
        score (float): mean over compositions of max |f(x + delta) - f(x)|,
            eV/atom.
        epsilon (float): box radius, fraction units.
        table (DataFrame): per composition, the columns of
            :meth:`SearchResult.table`.
        search (SearchResult): the underlying search result.
    """

    score: float
    epsilon: float
    table: pd.DataFrame
    search: SearchResult


@dataclass
class RobustnessReport:
    """Robustness radius: the smallest r that moves a prediction by tau.

    Attributes:
        score (float): mean radius over compositions, fraction units.
        score_l2 (float): mean L2 radius, fraction units: the L2 norm of
            the perturbation found at the radius, or, for a composition of
            K >= 2 elements capped at r_max, r_max * sqrt(K / (K - 1)) (r_max
            for one element). A zero-sum perturbation of that L2 norm has no
            entry above r_max, so it lies in the box where no perturbation
            moved the composition by tau: the value bounds the L2 radius
            from below.
        tau (float): required |change|, eV/atom.
        r_max (float): cap of the radius; compositions that no perturbation
            within r_max moves by tau get r_max and ``reached = False``.
        table (DataFrame): per composition: ``formula``, ``radius``,
            ``radius_l2``, ``delta_l2`` (L2 norm of the perturbation found,
            capped or not), ``change`` (eV/atom), ``reached`` and
            ``perturbed_formula``.
        n_not_reached (int): compositions capped at r_max.
    """

    score: float
    score_l2: float
    tau: float
    r_max: float
    table: pd.DataFrame
    n_not_reached: int


class NonFinitePredictionError(ValueError):
    """The predictor returned NaN or inf at an unperturbed composition."""


# -- feasible set ----------------------------------------------------------


def feasible_bounds(
    frac: torch.Tensor, mask: torch.Tensor, radius: torch.Tensor | float, floor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the bounds lo, hi [B, K] of the perturbed fractions y = x + delta.

    lo = max(x - r, min(x, floor)) and hi = x + r on real slots, 0 in
    padding, so that {sum y = 1, lo <= y <= hi} is the feasible set of the
    module docstring. x itself is always feasible.

    Args:
        frac (Tensor): fractions x [B, K], float64.
        mask (Tensor): bool [B, K].
        radius (Tensor or float): r per composition [B] or one value.
        floor (float): minimum fraction, in (0, 1).
    """
    r = torch.as_tensor(radius, dtype=frac.dtype, device=frac.device)
    if r.dim() == 0:
        r = r.expand(frac.shape[0])
    r = r[:, None]
    lower = torch.maximum(frac - r, torch.clamp(frac, max=floor))
    upper = frac + r
    zero = torch.zeros((), dtype=frac.dtype, device=frac.device)
    return torch.where(mask, lower, zero), torch.where(mask, upper, zero)


def _check_scalar(name: str, value: float, low: float, high: float, fix: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and low < value < high):
        raise ValueError(
            f"{name} must lie in ({low:g}, {high:g}), got {value!r}; {fix}"
        )
    return value


def _check_floor(
    floor: float, mask: torch.Tensor, formulas: list[str] | None, option: str = "floor"
) -> float:
    """Check the floor against the compositions; ``option`` names it in messages."""
    floor = float(floor)
    # A floor of 0 would let the search remove an element, which changes the
    # chemical system instead of the composition.
    if not (math.isfinite(floor) and 0.0 < floor < 1.0):
        raise ValueError(
            f"floor must lie in (0, 1), got {floor!r}; the default is 0.01"
        )
    n_real = mask.sum(dim=1)
    if len(n_real) and float(n_real.max()) * floor > 1.0:
        # The composition with the most elements sets the bound named below.
        row = int(torch.argmax(n_real))
        name = formulas[row] if formulas else f"row {row}"
        count = int(n_real[row])
        raise ValueError(
            f"{option} {floor:g} exceeds 1/K for {name} with {count} elements "
            f"(K * floor = {count * floor:g} > 1), so some of its elements "
            "lie below the floor and may only grow; the floor is meant as a small "
            f"minimum fraction (default {DEFAULT_FLOOR}): pass {option} <= "
            f"{1.0 / count:g}"
        )
    return floor


def _batch_tensors(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    for name in ("element_index", "frac", "mask"):
        if not isinstance(getattr(batch, name, None), torch.Tensor):
            raise TypeError(
                "batch must be a dvmrl.featurize.CompositionBatch (or have tensor "
                f"attributes element_index, frac and mask); {name} is missing"
            )
    element_index, frac, mask = batch.element_index, batch.frac, batch.mask
    if element_index.dtype != torch.int64:
        raise TypeError(f"element_index must be int64, got {element_index.dtype}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool, got {mask.dtype}")
    if not frac.is_floating_point():
        raise TypeError(f"frac must be a floating dtype, got {frac.dtype}")
    if frac.dim() != 2 or element_index.shape != frac.shape or mask.shape != frac.shape:
        raise ValueError(
            "element_index, frac and mask must share one [B, K] shape, got "
            f"{tuple(element_index.shape)}, {tuple(frac.shape)}, {tuple(mask.shape)}"
        )
    frac = frac.double()
    _check_fractions(frac, mask)
    return element_index, frac, mask


def _check_fractions(frac: torch.Tensor, mask: torch.Tensor) -> None:
    """Raise ValueError unless every composition's fractions are >= 0 and sum to 1.

    The feasible set keeps the sum at 1, so amounts in atomic per cent or
    counts of atoms would be moved onto the simplex by the first projection,
    and the search would report that jump as the perturbation.
    """
    from dvmrl.model import SUM_TOLERANCE

    real = torch.where(mask, frac, 0.0)
    sums = real.sum(dim=1)
    # NaN compares false, so a NaN fraction fails both checks.
    negative = ~(torch.where(mask, frac, 1.0) >= 0).all(dim=1)
    unnormalised = ~((sums - 1.0).abs() < SUM_TOLERANCE)
    bad = torch.nonzero(negative | unnormalised).flatten()
    if bad.numel():
        row = int(bad[0])
        values = ", ".join(f"{float(v):.6g}" for v in frac[row][mask[row]])
        raise ValueError(
            f"composition {row} has fractions [{values}] summing to "
            f"{float(sums[row]):.10g}; fractions must be >= 0 and sum to 1 (within "
            f"{SUM_TOLERANCE:g}): divide atomic per cent or atom counts by their "
            "sum, or build the batch with dvmrl.featurize"
        )


def compositions_to_formulas(
    element_index: torch.Tensor, frac: torch.Tensor, mask: torch.Tensor
) -> list[str]:
    """Write each row as a formula with plain decimal amounts.

    Float32 fractions get 7 significant digits, their precision, so that
    0.38333333 is not written as 0.38333332538604736; float64 fractions get
    the shortest decimal that reads back as the same value.
    """
    digits = 7 if frac.dtype == torch.float32 else None
    index = element_index.cpu().numpy()
    values = frac.detach().cpu().double().numpy()
    real = mask.cpu().numpy()
    formulas = []
    for row in range(index.shape[0]):
        mapping = {
            ELEMENTS[int(e)]: float(v)
            for e, v, m in zip(index[row], values[row], real[row], strict=True)
            if m
        }
        formulas.append(format_formula(mapping, digits=digits))
    return formulas


@dataclass(frozen=True)
class _Rows:
    """A subset of a batch's rows, with the three tensors of a CompositionBatch."""

    element_index: torch.Tensor
    frac: torch.Tensor
    mask: torch.Tensor


# -- predictor handling ----------------------------------------------------


def predictor_dtype(predictor: Predictor) -> torch.dtype:
    """Return the floating dtype the predictor expects for ``frac``."""
    if isinstance(predictor, torch.nn.Module):
        for parameter in predictor.parameters():
            if parameter.is_floating_point():
                return parameter.dtype
    return torch.float64


@contextlib.contextmanager
def deterministic(predictor: Predictor):
    """Set a module up for a search or a deterministic pass, then restore it.

    The module runs in evaluation mode without MC dropout, and its
    parameters stop requiring gradients, so the passes build no autograd
    graph for them; only ``frac`` requires a gradient.
    """
    if not isinstance(predictor, torch.nn.Module):
        yield
        return
    was_training = predictor.training
    mc = getattr(predictor, "mc_dropout_enabled", False)
    parameters = [p for p in predictor.parameters() if p.requires_grad]
    predictor.eval()
    if mc:
        predictor.mc_dropout(False)
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in parameters:
            parameter.requires_grad_(True)
        predictor.train(was_training)
        if mc:
            predictor.mc_dropout(True)


def _evaluate(
    predictor: Predictor,
    element_index: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    model_dtype: torch.dtype,
) -> torch.Tensor:
    out = predictor(element_index, y.to(model_dtype), mask)
    if not isinstance(out, torch.Tensor) or out.shape != (y.shape[0],):
        shape = (
            tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        )
        raise ValueError(
            f"the predictor must return a tensor of shape [{y.shape[0]}] (one value "
            f"in eV/atom per composition), got {shape}"
        )
    # A callable may wrap a model of another dtype (such as a float32 model
    # behind a float64 callable); the search keeps one dtype throughout.
    return out.to(model_dtype)


def _value_and_grad(
    predictor: Predictor,
    element_index: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    model_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    y = y.detach().requires_grad_(True)
    with torch.enable_grad():
        out = _evaluate(predictor, element_index, y, mask, model_dtype)
        if not out.requires_grad:
            raise ValueError(
                "the predictor output does not depend differentiably on frac; the "
                "search needs gradients with respect to the fractions"
            )
        (grad,) = torch.autograd.grad(out.sum(), y)
    return out.detach().to(y.dtype), grad.to(y.dtype)


# -- search ----------------------------------------------------------------


def _step_sizes(steps: int, step_size: float) -> list[float]:
    """Cosine schedule from ``step_size`` down to 1 % of it, in units of r."""
    if steps == 1:
        return [step_size]
    return [
        step_size * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * t / (steps - 1))))
        for t in range(steps)
    ]


def _scaled_ascent(
    ascent: torch.Tensor,
    y: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Scale an ascent direction so that its feasible part has largest entry 1.

    The feasible part is the projection onto the tangent cone at y,
    {sum d = 0, d_k >= 0 where y_k = lo_k, d_k <= 0 where y_k = hi_k}.
    Scaling by it, not by the raw direction, keeps a large entry that
    pushes against an active bound from shrinking the step of the entries
    that can still move. The projection after the step clamps such entries
    back onto their bounds. Rows with no feasible ascent get 0.
    """
    scale = ascent.abs().amax(dim=1, keepdim=True)
    g = torch.where(mask & (scale > 0), ascent / scale.clamp(min=1e-300), 0.0)
    # |g| <= 1, so a cone direction never needs entries beyond +-4. The cone
    # is then a box-constrained plane, solved by the same exact projection
    # after shifting sum d = 0 to sum = 1.
    width = 4.0
    eps = torch.finfo(g.dtype).eps
    margin = max(1e-13, 4.0 * eps)
    lower = torch.where(y <= lo + margin, 0.0, -width)
    upper = torch.where(y >= hi - margin, 0.0, width)
    n_real = mask.sum(dim=1, keepdim=True).clamp(min=1).to(g.dtype)
    shift = torch.where(mask, 1.0 / n_real, 0.0)
    cone = project_simplex_box(g + shift, lower + shift, upper + shift, mask) - shift
    size = torch.where(mask, cone, 0.0).abs().amax(dim=1, keepdim=True)
    # Below this size the cone direction is rounding error of the projection.
    tiny = max(1e-12, 64.0 * eps)
    return torch.where(size > tiny, g / size.clamp(min=tiny), 0.0)


def _search_chunk(
    predictor: Predictor,
    element_index: torch.Tensor,
    frac: torch.Tensor,
    mask: torch.Tensor,
    radius: torch.Tensor,
    floor: float,
    lam: float,
    steps: int,
    starts: int,
    step_size: float,
    screen: int,
    generator: torch.Generator,
    dtype: torch.dtype,
    first_row: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Search one chunk of C compositions; return delta, base, change, objective.

    ``first_row`` is the chunk's offset in the whole batch, for messages.

    The iterates live in ``dtype`` (the predictor's). All ``starts`` runs of
    the chunk go through the predictor together, C * starts rows per call.
    The result is polished in float64: the best iterate is projected again
    onto the float64 feasible set, and for a lower-precision predictor its
    change is evaluated once more at that point.
    """
    c = frac.shape[0]
    runs = starts
    device = frac.device
    x64 = frac
    x_c = frac.to(dtype)
    with torch.no_grad():
        base = _evaluate(predictor, element_index, x_c, mask, dtype)
    bad = torch.nonzero(~torch.isfinite(base)).flatten()
    if bad.numel():
        # A NaN change never beats the start's change of 0, so the search
        # would report such a composition as unmoved, the most robust score.
        rows = (bad[:5] + first_row).tolist()
        raise NonFinitePredictionError(
            f"the predictor returned {base[bad[0]].item()} for compositions at rows "
            f"{rows}{' ...' if bad.numel() > 5 else ''}; a search needs finite "
            "predictions: check the model's weights and inputs"
        )
    # Rows are grouped by composition: row c * runs + j is run j of composition
    # c. Even runs ascend on +change and odd runs on -change. Runs 0 and 1
    # start at delta = 0, the others at screened random points.
    run = torch.arange(runs, device=device).repeat(c)
    sign_run = torch.where(torch.arange(runs) % 2 == 0, 1.0, -1.0).to(dtype)
    sign = sign_run.to(device).repeat(c)
    ei = element_index.repeat_interleave(runs, dim=0)
    x = x_c.repeat_interleave(runs, dim=0)
    m = mask.repeat_interleave(runs, dim=0)
    r = radius.to(dtype).repeat_interleave(runs, dim=0)
    f0 = base.repeat_interleave(runs, dim=0)
    lo, hi = feasible_bounds(x, m, r, floor)
    y = x.clone()

    random_rows = torch.nonzero(run >= 2).squeeze(1)
    if random_rows.numel():
        y[random_rows] = _screened_starts(
            predictor,
            ei[random_rows],
            x[random_rows],
            m[random_rows],
            r[random_rows],
            lo[random_rows],
            hi[random_rows],
            f0[random_rows],
            sign[random_rows],
            lam,
            screen,
            generator,
            dtype,
        )

    n = x.shape[0]
    best_obj = torch.full((n,), -math.inf, dtype=dtype, device=device)
    best_y = x.clone()
    best_change = torch.zeros(n, dtype=dtype, device=device)

    # Rows still moving, and their copies of the per-row tensors. Each run
    # steps from its accepted iterate y. A step to a point with a lower merit
    # (below) and no feasible ascent direction is undone, and that run's
    # steps are halved: from delta = 0 a full first step can land on a box
    # vertex where the change has the wrong sign and the gradient points out
    # of the box, and without the check the run stopped there. A row whose
    # feasible ascent direction at an accepted y is 0 stays where it is for
    # good (the same point gives the same direction), so it leaves the set.
    rows = torch.arange(n, device=device)
    step_r = r.clone()
    step_r[random_rows] = step_r[random_rows] * SCREENED_STEP_FRACTION

    def record(rows, x_a, y_a, change) -> None:
        objective = change * change
        if lam:
            objective = objective - lam * (y_a - x_a).square().sum(dim=1)
        better = objective > best_obj[rows]
        picked = rows[better]
        best_obj[picked] = objective[better]
        best_change[picked] = change[better]
        best_y[picked] = y_a[better]

    def merit_and_direction(x_a, y_a, lo_a, hi_a, m_a, f0_a, s_a, value, grad):
        # The run's merit is s |s| with s the signed change, less the
        # penalty: it grows with the signed change on both sides of 0, and
        # above 0 it is the objective. Below 0 the ascent follows the signed
        # change alone, because the penalty's pull to delta = 0 would cancel
        # it at the start.
        signed = s_a * (value - f0_a)
        merit = signed * signed.abs()
        climbing = (signed > 0)[:, None]
        ascent = torch.where(climbing, 2.0 * signed[:, None] * grad, grad)
        ascent = ascent * s_a[:, None]
        if lam:
            penalty = lam * (y_a - x_a).square().sum(dim=1)
            merit = merit - penalty
            ascent = torch.where(climbing, ascent - 2.0 * lam * (y_a - x_a), ascent)
        return merit, _scaled_ascent(ascent, y_a, lo_a, hi_a, m_a)

    value, grad = _value_and_grad(predictor, ei, y, m, dtype)
    record(rows, x, y, value - f0)
    merit, direction = merit_and_direction(x, y, lo, hi, m, f0, sign, value, grad)
    scale = torch.ones(n, dtype=dtype, device=device)
    state = [ei, m, x, lo, hi, step_r, f0, sign, y, merit, direction, scale]
    # Positions in state of what a step updates.
    y_at, merit_at, direction_at, scale_at = 8, 9, 10, 11
    passes = n
    schedule = _step_sizes(steps, step_size)
    # NOTE: a run whose start has an exactly zero feasible ascent direction
    # (a stationary point, seen only with synthetic predictors) leaves at
    # once, so with starts=2, which has no screened starts, such a
    # composition reads as unmoved.
    for step, eta in enumerate(schedule):
        moving = state[direction_at].abs().amax(dim=1) > 0
        if not bool(moving.all()):
            rows = rows[moving]
            state = [tensor[moving] for tensor in state]
            if rows.numel() == 0:
                break
        ei_a, m_a, x_a, lo_a, hi_a, r_a, f0_a, s_a, y_a, merit_a, dir_a, scale_a = state
        candidate = project_simplex_box(
            y_a + (eta * r_a * scale_a)[:, None] * dir_a, lo_a, hi_a, m_a
        )
        if step == len(schedule) - 1:
            # No step follows the last one, so its point needs no gradient.
            with torch.no_grad():
                value = _evaluate(predictor, ei_a, candidate, m_a, dtype)
            record(rows, x_a, candidate, value - f0_a)
            break
        passes += rows.numel()
        value, grad = _value_and_grad(predictor, ei_a, candidate, m_a, dtype)
        record(rows, x_a, candidate, value - f0_a)
        merit_c, dir_c = merit_and_direction(
            x_a, candidate, lo_a, hi_a, m_a, f0_a, s_a, value, grad
        )
        # Only a step to a worse point where the run would stop is undone:
        # other steps to worse points are kept, because such a run may still
        # climb to a better point beyond them.
        accept = (merit_c >= merit_a) | (dir_c.abs().amax(dim=1) > 0)
        state[y_at] = torch.where(accept[:, None], candidate, y_a)
        state[merit_at] = torch.where(accept, merit_c, merit_a)
        state[direction_at] = torch.where(accept[:, None], dir_c, dir_a)
        state[scale_at] = torch.where(accept, scale_a, 0.5 * scale_a)

    logger.debug(
        "search chunk of %d compositions: %d of %d gradient passes (%.0f %%), the "
        "rest skipped after their runs stopped",
        c,
        passes,
        n * steps,
        100.0 * passes / max(n * steps, 1),
    )

    # Best run per composition, polished in float64.
    pick = best_obj.view(c, runs).argmax(dim=1)
    best = torch.arange(c, device=device) * runs + pick
    y_best = best_y[best].double()
    change = best_change[best].double()
    if dtype != torch.float64:
        lo64, hi64 = feasible_bounds(x64, mask, radius, floor)
        y_best = project_simplex_box(y_best, lo64, hi64, mask)
        with torch.no_grad():
            value = _evaluate(predictor, element_index, y_best.to(dtype), mask, dtype)
        change = value.double() - base.double()
    delta = torch.where(mask, y_best - x64, 0.0)
    objective = change.square() - lam * delta.square().sum(dim=1)
    return delta, base.double(), change, objective


def _screened_starts(
    predictor: Predictor,
    ei: torch.Tensor,
    x: torch.Tensor,
    m: torch.Tensor,
    r: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    f0: torch.Tensor,
    sign: torch.Tensor,
    lam: float,
    screen: int,
    generator: torch.Generator,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Return per row the best of ``screen`` random feasible points [R, K].

    Each candidate pushes every entry by +-r before the projection, so the
    candidates lie near different vertices, where a convex change peaks.
    The best signed change (less the penalty) wins; this costs forward
    passes only.
    """
    best_score = torch.full((x.shape[0],), -math.inf, dtype=dtype, device=x.device)
    start = x.clone()
    push = r[:, None]
    for _ in range(screen):
        coin = torch.rand(x.shape, generator=generator) < 0.5
        coin = coin.to(x.device)
        moved = torch.where(m, torch.where(coin, x - push, x + push), x)
        candidate = project_simplex_box(moved, lo, hi, m)
        with torch.no_grad():
            value = _evaluate(predictor, ei, candidate, m, dtype)
        score = sign * (value - f0)
        if lam:
            score = score - lam * (candidate - x).square().sum(dim=1)
        better = score > best_score
        best_score = torch.where(better, score, best_score)
        start = torch.where(better[:, None], candidate, start)
    return start


def adversarial_search(
    predictor: Predictor,
    batch,
    radius: float | torch.Tensor = DEFAULT_EPSILON,
    *,
    floor: float = DEFAULT_FLOOR,
    lam: float = 0.0,
    steps: int = DEFAULT_STEPS,
    starts: int = DEFAULT_STARTS,
    step_size: float = 1.0,
    screen: int = DEFAULT_SCREEN,
    seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> SearchResult:
    """Find per composition the feasible perturbation that maximises the objective.

    The objective is |f(x + delta) - f(x)|^2 - lam ||delta||_2^2 over the
    feasible set of the module docstring. Every composition runs ``starts``
    projected gradient ascents in all, split between the two signs of the
    change (ceil(starts / 2) on +change, floor(starts / 2) on -change). The
    first run of each sign starts from delta = 0, the others from the best
    of ``screen`` random feasible points. Each run takes ``steps`` steps with
    a cosine schedule of step sizes from ``step_size * r`` per entry (a
    quarter of that for runs from screened points). A run stops early once
    its feasible ascent direction is 0, unless it got there by a step that
    lowered its signed change (less the penalty): that step is undone and
    the run's later steps are halved. The best point of all runs wins.

    The iterates are kept in the predictor's dtype (a module's parameter
    dtype, float64 for other callables). With a float32 model the passes run
    in float32 and only the winner is projected and evaluated again in
    float64, so the returned perturbation is exactly feasible.

    Args:
        predictor (callable): f(element_index, frac, mask) -> [B] in eV/atom,
            differentiable in ``frac``. Modules run in evaluation mode with
            MC dropout off during the search.
        batch (CompositionBatch): B compositions.
        radius (float or Tensor): box radius r in (0, 1), fraction units;
            one value or one per composition [B]. Default: 0.05.
        floor (float): minimum fraction of an element, in (0, 1). Default: 0.01.
        lam (float): weight lambda >= 0 of the L2 penalty. Default: 0.
        steps (int): gradient steps per run (>= 1). Default: 50.
        starts (int): runs per composition in all, split between the two
            signs (>= 2, so that both signs are searched; 1 is read as 2).
            Default: 4.
        step_size (float): first step in units of r (> 0). Default: 1.
        screen (int): random candidates screened per random start (>= 1);
            the run starts from the one with the best signed change.
            Default: 16.
        seed (int): seed of the random starts. The starts are drawn chunk by
            chunk, so the same seed with another chunk_size gives other starts.
        chunk_size (int): compositions searched together.

    Returns:
        SearchResult: float64 tensors on the CPU and the formulas.

    Raises:
        ValueError: for a radius outside (0, 1), a floor outside (0, 1) or
            one above 1/K for a composition of K elements, lam < 0,
            steps, starts or chunk_size < 1, or a predictor that returns the
            wrong shape or no gradient.
        NonFinitePredictionError: a ValueError, for a predictor that returns
            NaN or inf at an unperturbed composition.
        TypeError: for a batch without the three tensors.
    """
    element_index, frac, mask = _batch_tensors(batch)
    b = frac.shape[0]
    r = torch.as_tensor(radius, dtype=torch.float64).detach().cpu()
    if r.dim() == 0:
        _check_scalar("radius", float(r), 0.0, 1.0, "the default is 0.05 (5 at.%)")
        r = r.expand(b).clone()
    elif r.shape != (b,):
        raise ValueError(
            f"radius must be a number or a [{b}] tensor, got {tuple(r.shape)}"
        )
    elif b and not bool(((r > 0) & (r < 1)).all()):
        raise ValueError(
            f"every radius must lie in (0, 1), got values from {float(r.min())} to "
            f"{float(r.max())}"
        )
    _check_floor(floor, mask, None)
    if not (math.isfinite(float(lam)) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    counts = (
        ("steps", steps),
        ("screen", screen),
        ("chunk_size", chunk_size),
    )
    for name, value in counts:
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if int(starts) != starts or starts < 1:
        raise ValueError(
            f"starts must be an integer >= 1 (runs per composition, split between "
            f"the two signs of the change; 1 runs one per sign, as 2 does), got "
            f"{starts!r}"
        )
    if starts == 1:
        # NOTE: starts used to count runs per sign. Callers that still pass 1
        # get the run per sign that 1 meant then, rather than an error.
        logger.debug("starts=1 searches one run per sign, as starts=2 does")
        starts = 2
    if not (math.isfinite(float(step_size)) and step_size > 0):
        raise ValueError(f"step_size must be > 0, got {step_size!r}")

    model_dtype = predictor_dtype(predictor)
    generator = torch.Generator().manual_seed(int(seed))
    deltas, bases, changes, objectives = [], [], [], []
    with deterministic(predictor):
        for begin in range(0, b, int(chunk_size)):
            end = min(begin + int(chunk_size), b)
            out = _search_chunk(
                predictor,
                element_index[begin:end],
                frac[begin:end],
                mask[begin:end],
                r[begin:end].to(frac.device),
                float(floor),
                float(lam),
                int(steps),
                int(starts),
                float(step_size),
                int(screen),
                generator,
                model_dtype,
                begin,
            )
            for store, value in zip(
                (deltas, bases, changes, objectives), out, strict=True
            ):
                store.append(value.detach().cpu())
    k = frac.shape[1]
    empty = torch.zeros((0, k), dtype=torch.float64)
    delta = torch.cat(deltas) if deltas else empty
    frac_cpu = frac.detach().cpu()
    perturbed = torch.where(mask.cpu(), frac_cpu + delta, 0.0)
    none = torch.zeros(0, dtype=torch.float64)
    return SearchResult(
        frac=frac_cpu,
        delta=delta,
        perturbed=perturbed,
        base=torch.cat(bases) if bases else none,
        change=torch.cat(changes) if changes else none,
        objective=torch.cat(objectives) if objectives else none,
        radius=r,
        formulas=compositions_to_formulas(element_index, frac_cpu, mask),
        # In the model's dtype: a float32 model's delta carries float32
        # rounding, whose noise digits a float64 formula would print.
        perturbed_formulas=compositions_to_formulas(
            element_index, perturbed.to(model_dtype), mask
        ),
    )


# -- scores ----------------------------------------------------------------


def vulnerability(
    predictor: Predictor,
    batch,
    epsilon: float = DEFAULT_EPSILON,
    **search_options,
) -> VulnerabilityReport:
    """Score the mean largest |f(x + delta) - f(x)| at box radius epsilon.

    Args:
        predictor (callable): as :func:`adversarial_search`.
        batch (CompositionBatch): B >= 1 compositions.
        epsilon (float): box radius in (0, 1), fraction units. Default: 0.05.
        **search_options: ``floor``, ``lam``, ``steps``, ``starts``,
            ``step_size``, ``screen``, ``seed``, ``chunk_size`` of
            :func:`adversarial_search`.

    Returns:
        VulnerabilityReport: the score in eV/atom and a per-composition table.

    Raises:
        ValueError: for an empty batch and as :func:`adversarial_search`.
    """
    epsilon = _check_scalar("epsilon", epsilon, 0.0, 1.0, "the default is 0.05")
    _batch_tensors(batch)  # a TypeError naming the missing tensor
    if len(batch.frac) == 0:
        raise ValueError("vulnerability needs at least one composition, got 0")
    result = adversarial_search(predictor, batch, epsilon, **search_options)
    return VulnerabilityReport(
        score=float(result.change.abs().mean()),
        epsilon=epsilon,
        table=result.table(),
        search=result,
    )


def robustness_radius(
    predictor: Predictor,
    batch,
    tau: float = DEFAULT_TAU,
    r_max: float = DEFAULT_R_MAX,
    *,
    bisection_steps: int = 8,
    **search_options,
) -> RobustnessReport:
    """Find per composition the smallest radius that moves the prediction by tau.

    A first search at ``r_max`` finds the compositions that some perturbation
    moves by at least ``tau``. Those compositions bisect on r in (0, r_max]
    together, with the search inside, and keep the smallest radius at which
    the search reached ``tau`` (resolution r_max / 2^bisection_steps).
    The others get ``r_max`` and ``reached = False``. Because the search is a
    local method, each radius is an upper bound of the true one.

    Args:
        predictor (callable): as :func:`adversarial_search`.
        batch (CompositionBatch): B >= 1 compositions.
        tau (float): required |change| in eV/atom, > 0. Default: 0.05.
        r_max (float): cap of the radius in (0, 1), fraction units. Default: 0.25.
        bisection_steps (int): halvings of the radius interval (>= 1).
        **search_options: as :func:`vulnerability`; ``lam`` defaults to 0.

    Returns:
        RobustnessReport: the mean radius, the mean L2 norm of the
        perturbations found, and a per-composition table.

    Raises:
        ValueError: for tau <= 0, r_max outside (0, 1), an empty batch, and as
            :func:`adversarial_search`.
    """
    tau = float(tau)
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a positive number of eV/atom, got {tau!r}")
    r_max = _check_scalar("r_max", r_max, 0.0, 1.0, "the default is 0.25")
    if int(bisection_steps) != bisection_steps or bisection_steps < 1:
        raise ValueError(
            f"bisection_steps must be an integer >= 1, got {bisection_steps!r}"
        )
    b = len(_batch_tensors(batch)[1])
    if b == 0:
        raise ValueError("robustness_radius needs at least one composition, got 0")

    element_index, frac, mask = _batch_tensors(batch)
    first = adversarial_search(predictor, batch, r_max, **search_options)
    reached = first.change.abs() >= tau
    upper = torch.full((b,), r_max, dtype=torch.float64)
    best_delta = first.delta.clone()
    best_change = first.change.clone()
    # Only compositions that r_max moves by tau take part in the bisection.
    rows = torch.nonzero(reached).squeeze(1)
    if rows.numel():
        on_device = rows.to(frac.device)
        subset = _Rows(element_index[on_device], frac[on_device], mask[on_device])
        low = torch.zeros(rows.numel(), dtype=torch.float64)
        high = upper[rows].clone()
        for _ in range(int(bisection_steps)):
            middle = 0.5 * (low + high)
            result = adversarial_search(predictor, subset, middle, **search_options)
            hit = result.change.abs() >= tau
            high = torch.where(hit, middle, high)
            low = torch.where(hit, low, middle)
            best_delta[rows] = torch.where(hit[:, None], result.delta, best_delta[rows])
            best_change[rows] = torch.where(hit, result.change, best_change[rows])
        upper[rows] = high
    radius = torch.where(reached, upper, torch.full_like(upper, r_max))
    delta_l2 = best_delta.norm(dim=1)
    # A capped composition's perturbation did not reach tau, so its norm is
    # not a radius. A zero-sum change of K fractions with L2 norm
    # r_max * sqrt(K / (K - 1)) has no entry above r_max. So it lies in the
    # box where the search found no change of tau, and that norm bounds the
    # L2 radius from below. For a binary it is the largest norm in the box.
    n_real = mask.sum(dim=1).cpu().to(torch.float64)
    widening = torch.where(
        n_real > 1, torch.sqrt(n_real / (n_real - 1).clamp(min=1)), 1.0
    )
    radius_l2 = torch.where(reached, delta_l2, r_max * widening)
    perturbed = torch.where(mask.cpu(), first.frac + best_delta, 0.0)
    table = pd.DataFrame(
        {
            "formula": first.formulas,
            "radius": radius.numpy(),
            "radius_l2": radius_l2.numpy(),
            "delta_l2": delta_l2.numpy(),
            "change": best_change.numpy(),
            "reached": reached.numpy().astype(bool),
            # In the model's dtype, as in adversarial_search.
            "perturbed_formula": compositions_to_formulas(
                element_index, perturbed.to(predictor_dtype(predictor)), mask
            ),
        }
    )
    n_not_reached = int((~reached).sum())
    if n_not_reached:
        logger.info(
            "%d of %d compositions did not move by %g eV/atom within r_max = %g",
            n_not_reached,
            b,
            tau,
            r_max,
        )
    return RobustnessReport(
        score=float(radius.mean()),
        score_l2=float(radius_l2.mean()),
        tau=tau,
        r_max=r_max,
        table=table,
        n_not_reached=n_not_reached,
    )


def most_vulnerable(table: pd.DataFrame, n: int = 10) -> pd.DataFrame:
    """Return the ``n`` rows of a vulnerability table with the largest |change|."""
    return table.sort_values("abs_change", ascending=False, kind="stable").head(n)


__all__ = [
    "DEFAULT_EPSILON",
    "DEFAULT_FLOOR",
    "DEFAULT_R_MAX",
    "DEFAULT_STEPS",
    "DEFAULT_STARTS",
    "DEFAULT_TAU",
    "NonFinitePredictionError",
    "RobustnessReport",
    "SearchResult",
    "VulnerabilityReport",
    "adversarial_search",
    "compositions_to_formulas",
    "feasible_bounds",
    "most_vulnerable",
    "robustness_radius",
    "vulnerability",
]
