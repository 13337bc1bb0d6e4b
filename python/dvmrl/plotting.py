"""Parity plots of predicted against DFT values, coloured by composition class.

The figures are drawn with matplotlib's Agg canvas directly, so importing this
module never changes the global matplotlib backend and works without a
display.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from dvmrl._files import write_atomic

logger = logging.getLogger(__name__)

# Composition classes by element count, with their legend label and colour.
_CLASSES = (
    (1, "unary", "#7f7f7f"),
    (2, "binary", "#1f77b4"),
    (3, "ternary", "#d62728"),
)
_OTHER_LABEL = "4+ elements"
_OTHER_COLOUR = "#2ca02c"


# Axis names of the target kinds of dvmrl.datasets.
_QUANTITIES = {
    "formation_energy": "formation energy",
    "energy_above_hull": "energy above hull",
}


def quantity_name(target_kind: str | None) -> str:
    """Return the axis name of a target kind ("formation energy"), else "target"."""
    return _QUANTITIES.get(str(target_kind), "target")


def axis_labels(data_info: Mapping) -> dict[str, str]:
    """Return the ``quantity`` and ``reference`` of a parity plot of a data set.

    ``data_info`` is the metadata dict of ``dvmrl.datasets.resolve_data``.
    The vendored data sets contain DFT values. A user's file may contain
    measurements or other calculations, so its values are named "reference".
    """
    from dvmrl.datasets import DATASETS

    return {
        "quantity": quantity_name(data_info.get("target_kind")),
        "reference": "DFT" if data_info.get("name") in DATASETS else "reference",
    }


def composition_class(n_elements: int) -> str:
    """Return the class label ("unary", "binary", "ternary", "4+ elements")."""
    for count, label, _ in _CLASSES:
        if n_elements == count:
            return label
    return _OTHER_LABEL


def _as_vector(name: str, values) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(array)):
        bad = np.flatnonzero(~np.isfinite(array))[:5].tolist()
        raise ValueError(f"parity plot: {name} has non-finite values at rows {bad}")
    return array


def parity_figure(
    y_true: Sequence[float] | np.ndarray,
    y_pred: Sequence[float] | np.ndarray,
    n_elements: Sequence[int] | np.ndarray,
    *,
    title: str | None = None,
    metrics: Mapping[str, float | None] | None = None,
    unit: str = "eV/atom",
    quantity: str = "formation energy",
    reference: str = "DFT",
    predicted_quantity: str | None = None,
):
    """Draw a parity plot and return the matplotlib Figure (Agg canvas).

    Args:
        y_true: DFT values [N] in ``unit``.
        y_pred: predictions [N] in ``unit``.
        n_elements: element count of each composition [N]; points are
            coloured by binary, ternary and other classes.
        title: figure title.
        metrics: values shown in a corner box; ``rmse``, ``mae`` and ``r2``
            are shown when present.
        unit: unit of both axes.
        quantity: name of the target on the axis labels.
        reference: the source of ``y_true`` on the horizontal axis label
            (see :func:`axis_labels`).
        predicted_quantity: name of the predicted property on the vertical
            axis label, where the model predicts another property than
            ``quantity`` (a model of hull energies scored on formation
            energies); default ``quantity``.

    Returns:
        matplotlib.figure.Figure: the figure, attached to an Agg canvas.

    Raises:
        ValueError: if the arrays differ in length, are empty or hold
            non-finite values.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    true = _as_vector("y_true", y_true)
    pred = _as_vector("y_pred", y_pred)
    counts = np.asarray(n_elements).reshape(-1).astype(np.int64)
    if not (len(true) == len(pred) == len(counts)):
        raise ValueError(
            "parity plot: y_true, y_pred and n_elements must have the same length, "
            f"got {len(true)}, {len(pred)} and {len(counts)}"
        )
    if len(true) == 0:
        raise ValueError("parity plot: no points to draw (empty arrays)")

    figure = Figure(figsize=(5.5, 5.0), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)

    low = float(min(true.min(), pred.min()))
    high = float(max(true.max(), pred.max()))
    pad = 0.05 * (high - low) if high > low else 0.5
    limits = (low - pad, high + pad)
    axes.plot(limits, limits, color="black", linewidth=0.8, linestyle="--", zorder=1)

    labels = [composition_class(int(n)) for n in counts]
    colours = {label: colour for _, label, colour in _CLASSES}
    colours[_OTHER_LABEL] = _OTHER_COLOUR
    for label in [entry[1] for entry in _CLASSES] + [_OTHER_LABEL]:
        selected = np.array([item == label for item in labels])
        if not selected.any():
            continue
        axes.scatter(
            true[selected],
            pred[selected],
            s=6,
            alpha=0.5,
            color=colours[label],
            edgecolors="none",
            label=f"{label} ({int(selected.sum())})",
            zorder=2,
        )

    axes.set_xlim(limits)
    axes.set_ylim(limits)
    axes.set_aspect("equal")
    axes.set_xlabel(f"{reference} {quantity} ({unit})")
    axes.set_ylabel(f"predicted {predicted_quantity or quantity} ({unit})")
    if title:
        axes.set_title(title)
    axes.legend(loc="lower right", frameon=False, markerscale=2.5)

    if metrics:
        lines = []
        for key, label in (("rmse", "RMSE"), ("mae", "MAE")):
            value = metrics.get(key)
            if value is not None:
                lines.append(f"{label} {value:.3f} {unit}")
        if metrics.get("r2") is not None:
            lines.append(f"R$^2$ {metrics['r2']:.3f}")
        if lines:
            axes.text(
                0.03,
                0.97,
                "\n".join(lines),
                transform=axes.transAxes,
                va="top",
                ha="left",
                fontsize=9,
            )
    figure.tight_layout()
    return figure


def image_formats() -> list[str]:
    """Return the file suffixes (without the dot) that matplotlib can write."""
    from matplotlib.backend_bases import FigureCanvasBase

    return sorted(FigureCanvasBase.get_supported_filetypes())


def check_image_path(path: str | os.PathLike) -> None:
    """Raise ValueError unless matplotlib can write the format of ``path``'s suffix.

    A path without a suffix is written as PNG, so it passes.
    """
    suffix = Path(path).suffix.lstrip(".").lower()
    if suffix and suffix not in image_formats():
        raise ValueError(
            f"cannot write an image to {str(path)!r}: .{suffix} is not an image "
            f"format; use one of {', '.join('.' + name for name in image_formats())}"
        )


def new_figure(figsize: tuple[float, float], ncols: int = 1, dpi: int = 100):
    """Return ``(figure, axes)`` on an Agg canvas of its own, one row of ``ncols``.

    Unlike ``pyplot.subplots``, this changes no global matplotlib state, so
    the caller's backend stays and nothing needs closing. ``axes`` is one
    Axes for ``ncols`` = 1, else an array of them.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(figure)
    return figure, figure.subplots(1, ncols)


def save_figure(figure, path: str | os.PathLike) -> Path:
    """Write a figure to ``path`` atomically, in the format its suffix names.

    Without a suffix the format is PNG.
    The image goes to a temporary file in the same folder first and then
    replaces ``path``, so a reader never sees a half-written file.

    Returns:
        Path: the written file.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    image_format = target.suffix.lstrip(".").lower() or "png"
    write_atomic(
        target,
        lambda stream: figure.savefig(stream, format=image_format),
        binary=True,
    )
    logger.debug("wrote %s", target)
    return target


def parity_plot(
    path: str | os.PathLike,
    y_true: Sequence[float] | np.ndarray,
    y_pred: Sequence[float] | np.ndarray,
    n_elements: Sequence[int] | np.ndarray,
    **options,
) -> Path:
    """Draw a parity plot coloured by binary and ternary and write it to ``path``.

    Args:
        path: output image, PNG by default.
        y_true: DFT values [N], as in :func:`parity_figure`.
        y_pred: predictions [N].
        n_elements: element count of each composition [N].
        **options: ``title``, ``metrics``, ``unit``, ``quantity`` and
            ``reference`` of :func:`parity_figure`.

    Returns:
        Path: the written image.
    """
    figure = parity_figure(y_true, y_pred, n_elements, **options)
    return save_figure(figure, path)
