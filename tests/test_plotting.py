from __future__ import annotations

import os
import stat

import matplotlib
import numpy as np
import pytest
from matplotlib.image import imread

from dvmrl.plotting import composition_class, parity_figure, parity_plot


def _points(n: int = 40):
    rng = np.random.default_rng(0)
    truth = rng.normal(-0.2, 0.4, n)
    prediction = truth + rng.normal(0.0, 0.05, n)
    counts = np.where(np.arange(n) % 3 == 0, 2, 3)
    return truth, prediction, counts


def test_parity_plot_writes_png(tmp_path):
    truth, prediction, counts = _points()
    path = parity_plot(tmp_path / "parity.png", truth, prediction, counts)
    image = imread(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert image.shape[0] > 100
    assert image.shape[1] > 100


def test_parity_plot_leaves_no_temp_files(tmp_path):
    truth, prediction, counts = _points()
    parity_plot(tmp_path / "parity.png", truth, prediction, counts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parity.png"]


def test_parity_plot_keeps_global_backend(tmp_path):
    before = matplotlib.get_backend()
    truth, prediction, counts = _points()
    parity_plot(tmp_path / "parity.png", truth, prediction, counts)
    assert matplotlib.get_backend() == before


def test_parity_figure_colours_classes():
    truth, prediction, counts = _points(30)
    metrics = {"rmse": 0.05, "mae": 0.04}
    figure = parity_figure(truth, prediction, counts, metrics=metrics)
    axes = figure.axes[0]
    labels = [text.get_text() for text in axes.get_legend().get_texts()]
    assert labels == ["binary (10)", "ternary (20)"]
    colours = {tuple(np.round(c.get_facecolor()[0][:3], 3)) for c in axes.collections}
    assert len(colours) == 2


def test_parity_figure_shows_metrics():
    truth, prediction, counts = _points()
    metrics = {"rmse": 0.1234, "r2": 0.9}
    figure = parity_figure(truth, prediction, counts, metrics=metrics)
    texts = " ".join(text.get_text() for text in figure.axes[0].texts)
    assert "RMSE 0.123 eV/atom" in texts
    assert "0.900" in texts


def test_parity_figure_rejects_length_mismatch():
    with pytest.raises(ValueError, match="same length"):
        parity_figure([0.0, 1.0], [0.0], [2, 2])


def test_parity_figure_rejects_nan():
    with pytest.raises(ValueError, match="non-finite values at rows \\[1\\]"):
        parity_figure([0.0, float("nan")], [0.0, 0.1], [2, 3])


def test_parity_figure_rejects_empty():
    with pytest.raises(ValueError, match="no points"):
        parity_figure([], [], [])


@pytest.mark.parametrize(
    ("count", "label"),
    [(1, "unary"), (2, "binary"), (3, "ternary"), (5, "4+ elements")],
)
def test_composition_class(count, label):
    assert composition_class(count) == label


def test_parity_plot_mode_follows_umask(tmp_path):
    truth, prediction, counts = _points()
    previous = os.umask(0o027)
    try:
        path = parity_plot(tmp_path / "parity.png", truth, prediction, counts)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


@pytest.mark.parametrize(
    ("name", "kind", "xlabel", "ylabel"),
    [
        (
            "mp-formation-energy",
            "formation_energy",
            "DFT formation energy (eV/atom)",
            "predicted formation energy (eV/atom)",
        ),
        (
            "mp-energy-above-hull",
            "energy_above_hull",
            "DFT energy above hull (eV/atom)",
            "predicted energy above hull (eV/atom)",
        ),
        (
            "my_alloys.csv",
            "formation_energy",
            "reference formation energy (eV/atom)",
            "predicted formation energy (eV/atom)",
        ),
    ],
)
def test_parity_axis_labels_follow_data(name, kind, xlabel, ylabel):
    from dvmrl.plotting import axis_labels

    truth, prediction, counts = _points()
    labels = axis_labels({"name": name, "target_kind": kind})
    axes = parity_figure(truth, prediction, counts, **labels).axes[0]
    assert axes.get_xlabel() == xlabel
    assert axes.get_ylabel() == ylabel


def test_learning_curve_keeps_global_backend(tmp_path):
    """Figures are drawn on their own canvas, whatever backend the caller chose."""
    from dvmrl.meta import plot_learning_curve

    before = matplotlib.get_backend()
    matplotlib.use("pdf")
    try:
        path = tmp_path / "curve.png"
        plot_learning_curve([{"return": 0.1}, {"return": 0.3}], path)
        assert matplotlib.get_backend() == "pdf"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        matplotlib.use(before)
