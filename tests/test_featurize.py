"""Padded composition batches and composition features."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dvmrl import elements
from dvmrl.compositions import CompositionError
from dvmrl.featurize import (
    DEFAULT_STATS,
    FEATURE_STATS,
    CompositionBatch,
    composition_feature_names,
    composition_features,
    featurize,
)

FE, NI, AL, CO = 25, 27, 12, 26


def test_featurize_shapes_and_dtypes():
    batch = featurize(["Ni3Al", {"Fe": 1.0}, "AlCoNi"])
    assert batch.element_index.shape == (3, 3)
    assert batch.frac.shape == (3, 3)
    assert batch.mask.shape == (3, 3)
    assert batch.element_index.dtype == torch.int64
    assert batch.frac.dtype == torch.float64
    assert batch.mask.dtype == torch.bool
    assert len(batch) == 3
    assert batch.k_max == 3


def test_featurize_order_and_padding():
    batch = featurize([{"Ni": 0.75, "Al": 0.25}, "Fe"])
    assert batch.element_index.tolist() == [[AL, NI], [FE, 0]]
    assert batch.frac.tolist() == [[0.25, 0.75], [1.0, 0.0]]
    assert batch.mask.tolist() == [[True, True], [True, False]]
    assert batch.n_elements.tolist() == [2, 1]


def test_featurize_k_max_pads():
    batch = featurize(["Ni3Al"], k_max=8)
    assert batch.k_max == 8
    assert batch.mask.sum().item() == 2
    assert batch.element_index[0, 2:].eq(0).all()
    assert batch.frac[0, 2:].eq(0).all()


def test_featurize_k_max_errors():
    with pytest.raises(ValueError, match="k_max=1 is smaller than the 2 elements"):
        featurize(["Ni3Al"], k_max=1)
    with pytest.raises(ValueError, match=r"k_max must be an integer in 1 \.\. 8"):
        featurize(["Ni3Al"], k_max=9)
    with pytest.raises(ValueError, match=r"an integer in 1 \.\. 8, got 2.5"):
        featurize(["Ni3Al"], k_max=2.5)
    assert featurize(["Ni3Al"], k_max=3.0).k_max == 3


def test_featurize_empty():
    batch = featurize([])
    assert len(batch) == 0
    assert batch.k_max == 1


def test_featurize_alloy_notation():
    standard = featurize(["(CoCrFeNi)90Al10"])
    alloy = featurize(["(CoCrFeNi)90Al10"], alloy_notation=True)
    assert standard.frac[0, 0].item() == pytest.approx(10 / 370)
    assert alloy.frac[0, 0].item() == pytest.approx(0.1)


def test_featurize_reports_position():
    with pytest.raises(CompositionError, match="unknown element symbol") as caught:
        featurize(["Ni3Al", "Xx"])
    assert "composition at position 1" in caught.value.__notes__


@pytest.mark.parametrize("missing", [None, float("nan")])
def test_featurize_names_missing_position(missing):
    # pandas reads an empty formula cell as NaN, a float.
    with pytest.raises(TypeError, match=f"composition at position 1 is {missing!r}"):
        featurize(["Ni3Al", missing])


def test_featurize_metals_only():
    with pytest.raises(CompositionError, match="O is not a metal"):
        featurize([{"Fe": 2, "O": 3}], metals_only=True)


def test_batch_select():
    batch = featurize(["Ni3Al", "Fe", "AlCoNi"])
    picked = batch[np.array([2, 0])]
    assert picked.element_index.tolist() == [[AL, CO, NI], [AL, NI, 0]]
    assert batch[1:].element_index.shape == (2, 3)
    assert batch[-1].element_index.tolist() == [[AL, CO, NI]]
    assert batch[torch.tensor([False, True, False])].frac.tolist() == [[1.0, 0.0, 0.0]]
    with pytest.raises(IndexError, match="out of range"):
        batch[3]


def test_batch_select_zero_dim_index():
    # A 0-d tensor or array, as from argmax, selects one row like an int.
    batch = featurize(["Ni3Al", "Fe", "AlCoNi"])
    expected = batch[2].element_index.tolist()
    assert batch[torch.tensor(2)].element_index.tolist() == expected
    assert batch[np.array(-1)].element_index.tolist() == expected
    with pytest.raises(IndexError, match="out of range"):
        batch[torch.tensor(3)]
    with pytest.raises(TypeError, match="0-d index must be an integer, got True"):
        batch[torch.tensor(True)]
    with pytest.raises(TypeError, match="0-d index must be an integer, got 1.5"):
        batch[np.array(1.5)]


def test_batch_rejects_float_index_arrays():
    # A cast would cut 1.7 to 1 and select another composition.
    batch = featurize(["Ni3Al", "Fe", "AlCoNi"])
    with pytest.raises(TypeError, match="integers or bools, got torch.float64"):
        batch[np.array([0.0, 1.7])]
    picked = batch[np.array([0, 2])].element_index.tolist()
    assert picked == batch[[0, 2]].element_index.tolist()
    # An empty list is a float array to numpy, and selects nothing.
    assert len(batch[[]]) == 0
    assert len(batch[np.array([])]) == 0


def test_features_reject_unnormalised_fractions():
    batch = featurize(["Ni3Al", "FeCo"])
    scaled = CompositionBatch(batch.element_index, batch.frac * 100, batch.mask)
    with pytest.raises(ValueError, match="composition 0 sum to 100, not 1"):
        composition_features(scaled)
    nan = batch.frac.clone()
    nan[1, 0] = float("nan")
    with pytest.raises(ValueError, match="composition 1 sum to nan"):
        composition_features(CompositionBatch(batch.element_index, nan, batch.mask))


def test_batch_to_dtype():
    batch = featurize(["Ni3Al"]).to(dtype=torch.float32)
    assert batch.frac.dtype == torch.float32
    assert batch.element_index.dtype == torch.int64
    with pytest.raises(TypeError, match="must be floating"):
        batch.to(dtype=torch.int32)


def test_batch_to_device(device):
    batch = featurize(["Ni3Al"]).to(device=device)
    assert batch.device.type == device.type
    assert batch.mask.device.type == device.type


def test_batch_trimmed():
    batch = featurize(["Ni3Al", "AlCoNi"], k_max=6)[0:1].trimmed()
    assert batch.k_max == 2


def test_batch_checks_shapes():
    index = torch.zeros((2, 3), dtype=torch.int64)
    frac = torch.zeros((2, 3), dtype=torch.float64)
    with pytest.raises(ValueError, match="share one"):
        CompositionBatch(index, frac, torch.zeros((2, 2), dtype=torch.bool))
    with pytest.raises(TypeError, match="element_index must be int64"):
        CompositionBatch(index.int(), frac, torch.zeros((2, 3), dtype=torch.bool))


def test_features_hand_case():
    table = elements.descriptor_matrix()
    features = composition_features(["Ni3Al"])
    names = composition_feature_names()
    assert features.shape == (1, len(names))
    column = elements.descriptor_names().index("melting_point")
    al, ni = table[AL, column], table[NI, column]
    mean = 0.25 * al + 0.75 * ni
    row = dict(zip(names, features[0], strict=True))
    assert row["mean_melting_point"] == pytest.approx(mean)
    assert row["avg_dev_melting_point"] == pytest.approx(
        0.25 * abs(al - mean) + 0.75 * abs(ni - mean)
    )
    assert row["min_melting_point"] == pytest.approx(min(al, ni))
    assert row["max_melting_point"] == pytest.approx(max(al, ni))
    assert row["range_melting_point"] == pytest.approx(abs(al - ni))
    assert row["n_elements"] == 2
    assert row["frac_norm_2"] == pytest.approx((0.25**2 + 0.75**2) ** 0.5)


def test_features_std():
    features = composition_features(["Ni3Al"], stats=("std",), stoichiometry=False)
    table = elements.descriptor_matrix()
    values = table[[AL, NI]]
    mean = 0.25 * values[0] + 0.75 * values[1]
    expected = np.sqrt(0.25 * (values[0] - mean) ** 2 + 0.75 * (values[1] - mean) ** 2)
    np.testing.assert_allclose(features[0], expected)


def test_features_ignore_padding():
    narrow = composition_features(featurize(["Ni3Al", "Fe"]))
    wide = composition_features(featurize(["Ni3Al", "Fe"], k_max=8))
    np.testing.assert_array_equal(narrow, wide)


def test_features_single_element():
    features = composition_features(["Fe"], stats=FEATURE_STATS, stoichiometry=False)
    table = elements.descriptor_matrix()
    per_stat = features.reshape(len(FEATURE_STATS), -1)
    np.testing.assert_allclose(per_stat[FEATURE_STATS.index("mean")], table[FE])
    np.testing.assert_allclose(per_stat[FEATURE_STATS.index("avg_dev")], 0.0)
    np.testing.assert_allclose(per_stat[FEATURE_STATS.index("range")], 0.0)


def test_features_float32_batch():
    batch = featurize(["Ni3Al", "AlCoNi"])
    np.testing.assert_allclose(
        composition_features(batch.to(dtype=torch.float32)),
        composition_features(batch),
        rtol=1e-6,
        atol=1e-6,
    )


def test_features_finite_and_float64():
    features = composition_features(["Ni3Al", "Lr2Li", "AlTiVCrMnFeCoNi"])
    assert features.dtype == np.float64
    assert np.isfinite(features).all()


def test_feature_names_match_stats():
    names = composition_feature_names(stats=("mean", "max"), stoichiometry=False)
    assert len(names) == 2 * len(elements.descriptor_names())
    assert names[0] == "mean_atomic_number"
    assert len(composition_feature_names()) == (
        len(DEFAULT_STATS) * len(elements.descriptor_names()) + 5
    )
    with pytest.raises(ValueError, match="stats must be"):
        composition_feature_names(stats=("median",))


@pytest.mark.parametrize(
    ("value", "fix"),
    [
        ("NiAl", "such as featurize(['NiAl'])"),
        ({"Ni": 1}, "such as featurize([{'Ni': 1}])"),
        (None, "pass a list of formulas"),
    ],
)
def test_single_composition_rejected(value, fix):
    """A string would otherwise be read one character at a time."""
    with pytest.raises(TypeError, match="must be a sequence of formulas") as caught:
        featurize(value)
    assert fix in str(caught.value)
