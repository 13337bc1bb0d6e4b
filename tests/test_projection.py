import pytest
import torch

from conftest import requires_cuda
from dvmrl.projection import project_simplex_box, project_simplex_box_torch

PROJECTIONS = [project_simplex_box, project_simplex_box_torch]


def _random_problem(b=2000, k=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, k, generator=g) < 0.6
    mask[:, 0] = True
    x = torch.randn(b, k, generator=g, dtype=torch.float64)
    lo = torch.rand(b, k, generator=g, dtype=torch.float64) * 0.1
    hi = lo + torch.rand(b, k, generator=g, dtype=torch.float64)
    hi[:, 0] = 1.0  # keeps every row feasible
    return x.to(dtype), lo.to(dtype), hi.to(dtype), mask


def _bisection_reference(x, lo, hi, mask):
    x, lo, hi = x.double(), lo.double(), hi.double()
    left = torch.full((x.shape[0],), -100.0, dtype=torch.float64)
    right = torch.full((x.shape[0],), 100.0, dtype=torch.float64)
    for _ in range(200):
        mid = 0.5 * (left + right)
        total = torch.where(mask, torch.clamp(x - mid[:, None], lo, hi), 0.0).sum(1)
        left = torch.where(total > 1, mid, left)
        right = torch.where(total > 1, right, mid)
    return torch.where(mask, torch.clamp(x - left[:, None], lo, hi), 0.0)


@pytest.mark.parametrize("project", PROJECTIONS)
def test_projection_matches_bisection(project):
    x, lo, hi, mask = _random_problem()
    y = project(x, lo, hi, mask)
    assert (y - _bisection_reference(x, lo, hi, mask)).abs().max() < 1e-12


@pytest.mark.parametrize("project", PROJECTIONS)
def test_projection_sums_to_one(project):
    x, lo, hi, mask = _random_problem(seed=1)
    y = project(x, lo, hi, mask)
    assert (y.sum(dim=1) - 1.0).abs().max() < 1e-12


@pytest.mark.parametrize("project", PROJECTIONS)
def test_projection_respects_bounds(project):
    x, lo, hi, mask = _random_problem(seed=2)
    y = project(x, lo, hi, mask)
    assert bool(((y >= lo) | ~mask).all())
    assert bool(((y <= hi) | ~mask).all())


@pytest.mark.parametrize("project", PROJECTIONS)
def test_projection_padding_is_zero(project):
    x, lo, hi, mask = _random_problem(seed=3)
    y = project(x, lo, hi, mask)
    assert bool((y[~mask] == 0).all())


def test_kernel_matches_twin():
    x, lo, hi, mask = _random_problem(b=5000, k=8, seed=4)
    a = project_simplex_box(x, lo, hi, mask)
    b = project_simplex_box_torch(x, lo, hi, mask)
    assert (a - b).abs().max() < 1e-14


# From |x| of about 1e16, x - hi rounds to x - lo, so the piece that contains
# the threshold shrinks to a point.
@pytest.mark.parametrize("project", PROJECTIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", [1e16, 1e20, 1e30])
def test_projection_huge_entries(project, dtype, scale):
    x = torch.tensor(
        [[scale, -scale, 0.0], [scale, 0.5 * scale, 0.0], [0.3, 0.3, -scale]], dtype=dtype
    )
    lo = torch.zeros_like(x)
    hi = torch.ones_like(x)
    mask = torch.ones(x.shape, dtype=torch.bool)
    out = project(x, lo, hi, mask)
    expected = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], dtype=dtype)
    assert torch.equal(out, expected)


# Entries of 1e12 and more but close together: x - hi and x - t cancel
# unless the row is centred first.
@pytest.mark.parametrize("project", PROJECTIONS)
@pytest.mark.parametrize("scale", [1e12, 1e16, 1e300])
def test_projection_large_close_entries(project, scale):
    x = torch.tensor(
        [[scale, scale, 0.0], [scale, scale * (1 + 1e-15), 0.0]], dtype=torch.float64
    )
    mask = torch.tensor([[True, True, False], [True, True, False]])
    lo = torch.zeros_like(x)
    hi = torch.ones_like(x)
    out = project(x, lo, hi, mask)
    assert torch.equal(out[0], torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))
    assert (out[1].sum() - 1).abs() < 1e-15
    assert bool(((out >= lo) & (out <= hi)).all())


def test_infeasible_message_shows_the_excess():
    x = torch.zeros((1, 2), dtype=torch.float64)
    lo = torch.tensor([[0.5, 0.5 + 1e-13]], dtype=torch.float64)
    mask = torch.ones((1, 2), dtype=torch.bool)
    with pytest.raises(ValueError, match=r"sum to 1\.00000000000009\d* > 1"):
        project_simplex_box(x, lo, torch.ones_like(x), mask)


def test_projection_of_feasible_point_is_identity():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(100, 4, generator=g, dtype=torch.float64)
    x = x / x.sum(dim=1, keepdim=True)
    mask = torch.ones_like(x, dtype=torch.bool)
    y = project_simplex_box(x, torch.zeros_like(x), torch.ones_like(x), mask)
    assert (y - x).abs().max() < 1e-15


@pytest.mark.parametrize("project", PROJECTIONS)
def test_projection_float32(project):
    x, lo, hi, mask = _random_problem(seed=6, dtype=torch.float32)
    y = project(x, lo, hi, mask)
    assert y.dtype == torch.float32
    assert (y.double() - _bisection_reference(x, lo, hi, mask)).abs().max() < 1e-6


@pytest.mark.parametrize("project", PROJECTIONS)
def test_projection_snaps_to_tight_bounds(project):
    lo = torch.tensor([[0.25, 0.75, 0.0]], dtype=torch.float64)
    hi = torch.tensor([[0.5, 1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    y = project(torch.tensor([[3.0, -2.0, 0.0]], dtype=torch.float64), lo, hi, mask)
    assert torch.equal(y, lo)


@pytest.mark.parametrize("project", PROJECTIONS)
def test_projection_lower_sum_infeasible(project):
    x, lo, hi, mask = _random_problem(b=10, seed=7)
    lo[4] = 0.9
    hi[4] = 1.0
    mask[4, :2] = True
    with pytest.raises(ValueError, match="row 4 is infeasible: its lower bounds sum"):
        project(x, lo, hi, mask)


@pytest.mark.parametrize("project", PROJECTIONS)
def test_projection_upper_sum_infeasible(project):
    x, lo, hi, mask = _random_problem(b=10, seed=8)
    lo[7] = 0.0
    hi[7] = 0.1
    with pytest.raises(ValueError, match="row 7 is infeasible: its upper bounds sum"):
        project(x, lo, hi, mask)


@pytest.mark.parametrize("project", PROJECTIONS)
def test_projection_rejects_nan(project):
    x, lo, hi, mask = _random_problem(b=10, seed=9)
    x[2, 0] = float("nan")
    with pytest.raises(ValueError, match="row 2 is infeasible: it contains NaN"):
        project(x, lo, hi, mask)


def test_projection_rejects_mixed_dtypes():
    x, lo, hi, mask = _random_problem(b=4)
    with pytest.raises(TypeError, match="lo must have the dtype of x"):
        project_simplex_box(x, lo.float(), hi, mask)


def test_projection_rejects_int_mask():
    x, lo, hi, mask = _random_problem(b=4)
    with pytest.raises(TypeError, match="mask must be bool"):
        project_simplex_box(x, lo, hi, mask.int())


def test_projection_rejects_shape_mismatch():
    x, lo, hi, mask = _random_problem(b=4)
    with pytest.raises(ValueError, match="hi has shape"):
        project_simplex_box(x, lo, hi[:3], mask)


@requires_cuda
@pytest.mark.cuda
def test_projection_cuda_matches_cpu():
    x, lo, hi, mask = _random_problem(b=5000, k=8, seed=10)
    cpu = project_simplex_box(x, lo, hi, mask)
    gpu = project_simplex_box(x.cuda(), lo.cuda(), hi.cuda(), mask.cuda())
    assert (gpu.cpu() - cpu).abs().max() < 1e-15


@requires_cuda
@pytest.mark.cuda
def test_projection_cuda_infeasible_row():
    x, lo, hi, mask = _random_problem(b=10, seed=11)
    hi[3] = 0.01
    lo[3] = 0.0
    with pytest.raises(ValueError, match="row 3 is infeasible"):
        project_simplex_box(x.cuda(), lo.cuda(), hi.cuda(), mask.cuda())


def test_projection_wide_rows_fall_back():
    x, lo, hi, mask = _random_problem(b=50, k=40, seed=12)
    mask[:, :] = True
    lo = lo * 0.1  # 40 lower bounds below 0.01 each keep every row feasible
    y = project_simplex_box(x, lo, hi, mask)
    assert (y - _bisection_reference(x, lo, hi, mask)).abs().max() < 1e-12
