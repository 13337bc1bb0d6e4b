import itertools
import math
import re

import numpy as np
import pytest
import torch
from scipy.optimize import linprog, minimize

from dvmrl.adversarial import (
    adversarial_search,
    feasible_bounds,
    robustness_radius,
    vulnerability,
)
from dvmrl.compositions import parse
from dvmrl.featurize import CompositionBatch, featurize

SYMBOLS = ["Al", "Co", "Cr", "Fe", "Ni", "Cu", "Ti", "V"]


def _compositions(n, seed, k_max=4):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(2, k_max + 1))
        symbols = rng.choice(SYMBOLS, k, replace=False)
        weights = np.maximum(rng.dirichlet(np.ones(k)), 0.003)
        out.append(
            dict(zip(symbols.tolist(), (weights / weights.sum()).tolist(), strict=True))
        )
    return out


def _linear_model(seed):
    weights = torch.tensor(np.random.default_rng(seed).normal(size=103))

    def predict(element_index, frac, mask):
        return (weights[element_index] * frac * mask).sum(dim=1)

    return predict, weights


def _quadratic_model(seed):
    rng = np.random.default_rng(seed)
    factor = rng.normal(size=(103, 5))
    q = torch.tensor(factor @ factor.T)  # positive semidefinite
    c = torch.tensor(rng.normal(size=103)) * 3.0

    def predict(element_index, frac, mask):
        f = frac * mask
        block = q[element_index[:, :, None], element_index[:, None, :]]
        return torch.einsum("bk,bkl,bl->b", f, block, f) + (c[element_index] * f).sum(1)

    return predict, q, c


def _row_bounds(batch, row, radius, floor=0.01):
    lo, hi = feasible_bounds(batch.frac, batch.mask, radius, floor)
    m = batch.mask[row].numpy()
    x = batch.frac[row].numpy()[m]
    return m, x, lo[row].numpy()[m] - x, hi[row].numpy()[m] - x


def _linear_max_change(batch, weights, row, radius):
    m, _, low, high = _row_bounds(batch, row, radius)
    c = weights[batch.element_index[row]].numpy()[m]
    a_eq, bounds = np.ones((1, m.sum())), list(zip(low, high, strict=True))
    best_up = -linprog(-c, A_eq=a_eq, b_eq=[0.0], bounds=bounds).fun
    best_down = linprog(c, A_eq=a_eq, b_eq=[0.0], bounds=bounds).fun
    return max(best_up, -best_down)


def test_search_linear_matches_linprog():
    batch = featurize(_compositions(150, seed=0))
    predict, weights = _linear_model(1)
    result = adversarial_search(predict, batch, 0.05, steps=40, starts=2)
    ratios = [
        abs(float(result.change[row])) / _linear_max_change(batch, weights, row, 0.05)
        for row in range(len(batch))
    ]
    assert min(ratios) >= 0.99
    assert max(ratios) <= 1.0 + 1e-9


def _vertices(low, high):
    n = len(low)
    for free in range(n):
        others = [i for i in range(n) if i != free]
        for combo in itertools.product(*[(low[i], high[i]) for i in others]):
            d = np.zeros(n)
            d[others] = combo
            d[free] = -sum(combo)
            if low[free] - 1e-12 <= d[free] <= high[free] + 1e-12:
                yield d


def test_search_quadratic_matches_vertices():
    # f is convex, so max (f(x + d) - f(x)) lies at a vertex and min is a
    # convex programme; the largest |change| is the larger of the two.
    batch = featurize(_compositions(120, seed=2))
    predict, q, c = _quadratic_model(3)
    # At radius 0.1 this change has several local maxima per composition, so
    # the search takes 8 runs (3 random starts per sign) to find the largest.
    result = adversarial_search(predict, batch, 0.1, starts=8)
    ratios = []
    for row in range(len(batch)):
        m, x, low, high = _row_bounds(batch, row, 0.1)
        e = batch.element_index[row].numpy()[m]
        a, b = q.numpy()[np.ix_(e, e)], c.numpy()[e]

        def change(d, x=x, a=a, b=b):
            return (x + d) @ a @ (x + d) + b @ (x + d) - x @ a @ x - b @ x

        best_up = max(change(d) for d in _vertices(low, high))
        lowest = minimize(
            change,
            np.zeros(len(x)),
            method="SLSQP",
            bounds=list(zip(low, high, strict=True)),
            constraints=[{"type": "eq", "fun": np.sum}],
        ).fun
        ratios.append(abs(float(result.change[row])) / max(best_up, -lowest))
    assert min(ratios) >= 0.99
    assert max(ratios) <= 1.0 + 1e-6


def test_search_result_is_feasible():
    batch = featurize(_compositions(60, seed=4, k_max=6))
    predict, _, _ = _quadratic_model(5)
    result = adversarial_search(predict, batch, 0.07, steps=20, starts=2, floor=0.02)
    lo, hi = feasible_bounds(batch.frac, batch.mask, 0.07, 0.02)
    mask = batch.mask
    assert result.delta.sum(dim=1).abs().max() < 1e-12
    assert result.delta.abs().max() <= 0.07 + 1e-12
    assert bool((result.delta[~mask] == 0).all())
    assert bool(((result.perturbed >= lo - 1e-12) | ~mask).all())
    assert bool(((result.perturbed > 0) | ~mask).all())
    assert result.perturbed.shape == hi.shape


def test_search_formulas_parse_back():
    batch = featurize(_compositions(40, seed=6))
    predict, _ = _linear_model(7)
    result = adversarial_search(predict, batch, 0.05, steps=10, starts=2)
    for row, formula in enumerate(result.perturbed_formulas):
        parsed = parse(formula)
        m = batch.mask[row]
        values = result.perturbed[row][m].tolist()
        assert (
            max(abs(parsed[s] - v) for s, v in zip(parsed, values, strict=True)) < 1e-9
        )
        assert "e" not in formula.replace("Fe", "").replace("Ce", "")


class _Float32Linear(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        self.weights = torch.nn.Parameter(_linear_model(seed)[1].float())

    def forward(self, element_index, frac, mask):
        return (self.weights[element_index] * frac * mask).sum(dim=1)


def test_float32_model_formula_digits():
    # A float32 model's search rounds its delta to float32; the perturbed
    # formulas carry 7 significant digits, not that rounding's noise.
    batch = featurize(_compositions(20, seed=8))
    model = _Float32Linear(7)
    result = adversarial_search(model, batch, 0.05, steps=10, starts=2)
    radii = robustness_radius(model, batch, tau=0.05, steps=10, bisection_steps=2)
    for formula in [*result.perturbed_formulas, *radii.table["perturbed_formula"]]:
        for amount in re.findall(r"[0-9.]+", formula):
            assert len(amount.replace(".", "").lstrip("0")) <= 7, formula


def test_feasible_bounds_keep_low_fraction():
    batch = featurize([{"Al": 0.005, "Ni": 0.995}, {"Al": 0.2, "Ni": 0.8}])
    lo, hi = feasible_bounds(batch.frac, batch.mask, 0.1, 0.01)
    assert float(lo[0, 0]) == pytest.approx(0.005, abs=1e-15)
    assert float(lo[1, 0]) == pytest.approx(0.1, abs=1e-15)
    assert float(hi[1, 0]) == pytest.approx(0.3, abs=1e-15)


def test_search_stops_at_floor():
    batch = featurize([{"Al": 0.05, "Ni": 0.95}])

    def predict(element_index, frac, mask):
        # Ni is Z = 28. Raising Ni to 0.99 changes f more than lowering it to 0.85.
        nickel = (frac * (element_index == 27) * mask).sum(dim=1)
        return torch.exp(20.0 * nickel)

    result = adversarial_search(predict, batch, 0.1, floor=0.01, steps=20, starts=2)
    assert float(result.perturbed[0, 0]) == pytest.approx(0.01, abs=1e-12)


def test_search_is_reproducible():
    batch = featurize(_compositions(30, seed=8))
    predict, _, _ = _quadratic_model(9)
    a = adversarial_search(predict, batch, 0.05, steps=10, seed=3)
    b = adversarial_search(predict, batch, 0.05, steps=10, seed=3)
    assert torch.equal(a.delta, b.delta)


def test_search_penalty_shrinks_delta():
    batch = featurize(_compositions(30, seed=10))
    predict, _ = _linear_model(11)
    free = adversarial_search(predict, batch, 0.1, steps=30, starts=2)
    penalised = adversarial_search(predict, batch, 0.1, steps=30, starts=2, lam=50.0)
    assert float(penalised.delta.norm(dim=1).mean()) < float(
        free.delta.norm(dim=1).mean()
    )


def test_search_rejects_radius():
    batch = featurize(_compositions(3, seed=12))
    predict, _ = _linear_model(0)
    with pytest.raises(ValueError, match="radius must lie in"):
        adversarial_search(predict, batch, 1.0)


def test_search_rejects_floor():
    batch = featurize([{"Al": 0.25, "Co": 0.25, "Ni": 0.25, "Fe": 0.25}])
    predict, _ = _linear_model(0)
    with pytest.raises(ValueError, match="K \\* floor = 1.2 > 1.*may only grow"):
        adversarial_search(predict, batch, 0.05, floor=0.3)


def test_floor_message_names_widest_composition():
    # The suggested bound is 1/K of the composition with the most elements,
    # and the message names that composition, not the first one over.
    batch = featurize(["AlNi", "AlCoNi", "AlCoFeNi"])
    predict, _ = _linear_model(0)
    with pytest.raises(ValueError, match=r"for row 2 with 4 elements.*<= 0.25$"):
        adversarial_search(predict, batch, 0.05, floor=0.6)


def test_search_rejects_zero_floor():
    batch = featurize([{"Al": 0.5, "Ni": 0.5}])
    predict, _ = _linear_model(0)
    # A floor of 0 would let the search remove an element.
    with pytest.raises(ValueError, match=r"floor must lie in \(0, 1\), got 0.0"):
        adversarial_search(predict, batch, 0.05, floor=0.0)


@pytest.mark.parametrize(
    "fractions, total",
    [
        ([50.0, 50.0], "100"),
        ([0.5, 0.6], "1.1"),
        ([1.2, -0.2], "1"),
        ([math.nan, 1.0], "nan"),
    ],
)
@pytest.mark.parametrize("score", ["search", "vulnerability", "radius"])
def test_scores_reject_unnormalised_fractions(fractions, total, score):
    # At.% or atom counts would be projected onto the simplex by the first
    # step, and that jump would be reported as the perturbation.
    good = featurize(["AlNi", "CoFeNi"])
    frac = good.frac.clone()
    frac[1, :2] = torch.tensor(fractions, dtype=frac.dtype)
    frac[1, 2] = 0.0
    mask = good.mask.clone()
    mask[1, 2] = False
    batch = CompositionBatch(good.element_index, frac, mask)
    predict, _ = _linear_model(0)
    call = {
        "search": lambda: adversarial_search(predict, batch, 0.05),
        "vulnerability": lambda: vulnerability(predict, batch, 0.05),
        "radius": lambda: robustness_radius(predict, batch, tau=0.1),
    }[score]
    with pytest.raises(
        ValueError, match=rf"composition 1 has fractions .* summing to {total};"
    ):
        call()


def test_search_rejects_bad_predictor_shape():
    batch = featurize(_compositions(3, seed=13))
    with pytest.raises(ValueError, match="must return a tensor of shape"):
        adversarial_search(lambda e, f, m: f, batch, 0.05)


@pytest.mark.parametrize("chunk_size", [1, 64])
def test_search_rejects_nan_prediction(chunk_size):
    # A NaN change never beats the start's 0, so without the check such a
    # composition would score as unmoved (perfectly robust).
    batch = featurize(_compositions(4, seed=16))
    predict, _ = _linear_model(17)

    def nan_at_row_2(element_index, frac, mask):
        value = predict(element_index, frac, mask)
        bad = (element_index == batch.element_index[2]).all(dim=1)
        return torch.where(bad, float("nan"), value)

    expected = r"returned nan for compositions at rows \[2\]"
    with pytest.raises(ValueError, match=expected):
        vulnerability(nan_at_row_2, batch, steps=3, chunk_size=chunk_size)
    with pytest.raises(ValueError, match="needs finite predictions"):
        robustness_radius(nan_at_row_2, batch, steps=3, bisection_steps=1)


def test_vulnerability_is_mean_abs_change():
    batch = featurize(_compositions(50, seed=14))
    predict, _ = _linear_model(15)
    report = vulnerability(predict, batch, epsilon=0.05, steps=20, starts=2)
    assert report.score == pytest.approx(float(report.table["abs_change"].mean()))
    assert len(report.table) == 50


def _linear_radius(batch, weights, row, tau):
    low, high = 0.0, 0.25
    for _ in range(40):
        middle = 0.5 * (low + high)
        if _linear_max_change(batch, weights, row, middle) >= tau:
            high = middle
        else:
            low = middle
    return high


def test_robustness_radius_linear():
    batch = featurize(_compositions(12, seed=16))
    predict, weights = _linear_model(17)
    report = robustness_radius(
        predict, batch, tau=0.05, r_max=0.25, bisection_steps=8, steps=20, starts=2
    )
    resolution = 0.25 / 2**8
    for row in range(len(batch)):
        expected = _linear_radius(batch, weights, row, 0.05)
        if expected < 0.25 - resolution:
            assert report.table["radius"][row] == pytest.approx(
                expected, abs=2 * resolution
            )
    assert report.score == pytest.approx(float(report.table["radius"].mean()))
    reached = report.table["reached"].to_numpy()
    assert reached.any()
    l2 = report.table["radius_l2"].to_numpy()
    norms = report.table["delta_l2"].to_numpy()
    assert np.array_equal(l2[reached], norms[reached])
    n_real = batch.mask.sum(dim=1).numpy()[~reached]
    np.testing.assert_allclose(l2[~reached], 0.25 * np.sqrt(n_real / (n_real - 1)))
    assert report.score_l2 == pytest.approx(float(l2.mean()))


def test_robustness_radius_caps_unreached():
    batch = featurize(_compositions(5, seed=18))

    def flat(element_index, frac, mask):
        return 1e-3 * (frac * mask).sum(dim=1) + 1e-4 * frac[:, 0]

    report = robustness_radius(flat, batch, tau=0.05, r_max=0.2, steps=5, starts=2)
    assert report.n_not_reached == 5
    assert bool((report.table["radius"] == 0.2).all())
    assert not bool(report.table["reached"].any())
    # The L2 radius of a capped composition is the L2 norm that the r_max box
    # contains, r_max * sqrt(K / (K - 1)), not the norm of its own
    # perturbation, which did not reach tau.
    n_real = batch.mask.sum(dim=1).numpy()
    expected = 0.2 * np.sqrt(n_real / (n_real - 1))
    np.testing.assert_allclose(report.table["radius_l2"].to_numpy(), expected)
    assert report.score_l2 == pytest.approx(float(expected.mean()))


def test_capped_binary_l2_radius_above_reached():
    # A steep binary reaches tau inside the r_max box; a flat one does not.
    batch = featurize(["Al0.5Ni0.5", "Fe0.5Co0.5"])
    weights = torch.zeros(103, dtype=torch.float64)
    steep, flat = batch.element_index[0], batch.element_index[1]
    weights[steep[0]], weights[steep[1]] = 0.25, -0.25
    weights[flat[0]], weights[flat[1]] = 0.05, -0.05

    def predict(element_index, frac, mask):
        return (weights[element_index] * frac * mask).sum(dim=1)

    report = robustness_radius(predict, batch, tau=0.1, r_max=0.25, steps=20, starts=2)
    reached = report.table["reached"].to_numpy()
    l2 = report.table["radius_l2"].to_numpy()
    assert reached.tolist() == [True, False]
    # The flat binary is the more robust one, so its L2 radius is the larger.
    assert l2[1] > l2[0]


def test_robustness_radius_rejects_tau():
    batch = featurize(_compositions(2, seed=19))
    predict, _ = _linear_model(0)
    with pytest.raises(ValueError, match="tau must be a positive"):
        robustness_radius(predict, batch, tau=0.0)


def test_search_on_mpnn():
    from dvmrl.model import CompositionMPNN, ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(
        hidden=16, layers=1, gate_hidden=8, msg_hidden=8, head_hidden=16
    )
    model = CompositionMPNN(config).double()
    batch = featurize(_compositions(20, seed=20))
    result = adversarial_search(model, batch, 0.05, steps=10, starts=2)
    with torch.no_grad():
        again = model(batch.element_index, result.perturbed, batch.mask)
    change = again - model(batch.element_index, batch.frac, batch.mask)
    assert (change - result.change).abs().max() < 1e-10
    assert float(result.change.abs().min()) > 0.0


def test_search_one_start_runs_both_signs():
    batch = featurize(_compositions(20, seed=21))
    predict, _, _ = _quadratic_model(22)
    one = adversarial_search(predict, batch, 0.05, steps=10, starts=1)
    two = adversarial_search(predict, batch, 0.05, steps=10, starts=2)
    assert torch.equal(one.delta, two.delta)


def test_search_rejects_zero_starts():
    batch = featurize(_compositions(3, seed=23))
    predict, _ = _linear_model(0)
    with pytest.raises(ValueError, match="starts must be an integer >= 1"):
        adversarial_search(predict, batch, 0.05, starts=0)


def test_float32_formulas_have_seven_digits():
    from dvmrl.adversarial import compositions_to_formulas

    index = torch.tensor([[27, 40], [12, 27]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    frac = torch.tensor([[0.38333333, 0.61666667], [0.5, 0.5]])
    assert compositions_to_formulas(index, frac, mask) == [
        "Ni0.3833333Nb0.6166667",
        "Al0.5Ni0.5",
    ]
    exact = compositions_to_formulas(index, frac.double(), mask)
    assert exact[0] == "Ni0.38333332538604736Nb0.6166666746139526"


def test_search_finds_peak_of_oscillating_binary():
    # sin(30 x_Al) has several peaks within r = 0.2; a full first step from a
    # screened point overshoots them, so the screened runs take smaller steps.
    formulas = ["Al0.5Ni0.5", "Al0.52Ni0.48", "Al0.3Ni0.7"]
    batch = featurize(formulas)

    def predict(element_index, frac, mask):
        return torch.sin(30 * frac[:, 0])

    result = adversarial_search(predict, batch, 0.2, floor=0.01, steps=50, starts=4)
    lo, hi = feasible_bounds(batch.frac, batch.mask, 0.2, 0.01)
    for row in range(len(formulas)):
        start = float(batch.frac[row, 0])
        grid = torch.linspace(
            max(float(lo[row, 0]), 1 - float(hi[row, 1])),
            min(float(hi[row, 0]), 1 - float(lo[row, 1])),
            20001,
            dtype=torch.float64,
        )
        best = float((torch.sin(30 * grid) - math.sin(30 * start)).abs().max())
        assert abs(float(result.change[row])) == pytest.approx(best, rel=1e-3)


def test_search_leaves_wrong_sign_vertex():
    # 0.06 sin(2 pi (x_Al - 0.5) / 0.25) peaks at x_Al = 0.5625 and has the
    # wrong sign at both vertices of the r = 0.25 box around x_Al = 0.5,
    # where its gradient points out of the box. A full first step from
    # delta = 0 lands there; the run must undo it rather than stop.
    batch = featurize(["Al0.5Ni0.5"])

    def predict(element_index, frac, mask):
        return 0.06 * torch.sin(2 * math.pi * (frac[:, 0] - 0.5) / 0.25)

    for radius in (0.125, 0.25):
        result = adversarial_search(predict, batch, radius, starts=2, steps=20)
        assert abs(float(result.change[0])) == pytest.approx(0.06, rel=1e-3)
    report = robustness_radius(predict, batch, tau=0.05, r_max=0.25, starts=2, steps=20)
    exact = 0.25 * math.asin(0.05 / 0.06) / (2 * math.pi)
    assert bool(report.table["reached"].iloc[0])
    assert exact <= float(report.table["radius"].iloc[0]) <= exact + 0.002


def test_float64_callable_around_a_float32_model():
    # A callable that returns float32 predictions to a search that runs in
    # float64, like the wrapper docs/architecture.md gives for a float32
    # model. sin(30 x_Al) keeps the runs moving up to the last step.
    batch = featurize(["Al0.5Ni0.5", "Al0.52Ni0.48", "Al0.3Ni0.7"])

    def predict64(element_index, frac, mask):
        return torch.sin(30 * frac[:, 0])

    def predict32(element_index, frac, mask):
        return predict64(element_index, frac.float(), mask).float()

    direct = adversarial_search(predict64, batch, 0.2, steps=20)
    wrapped = adversarial_search(predict32, batch, 0.2, steps=20)
    assert wrapped.change.dtype == torch.float64
    assert torch.allclose(wrapped.change.abs(), direct.change.abs(), atol=1e-4)
    report = robustness_radius(predict32, batch, tau=0.5, r_max=0.25, steps=20)
    assert len(report.table) == 3


@pytest.mark.parametrize("score", [vulnerability, robustness_radius])
def test_scores_reject_a_batch_without_tensors(score):
    with pytest.raises(TypeError, match="batch must be a dvmrl.featurize"):
        score(lambda i, f, m: f.sum(dim=1), ["Ni3Al"])
