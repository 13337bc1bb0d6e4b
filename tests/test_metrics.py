"""Regression, accuracy, stability and GCV-score metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from dvmrl import metrics

Y_TRUE = np.array([0.0, -1.0, 0.5, 0.2])
Y_PRED = np.array([0.1, -0.8, 0.4, -0.1])
# Residuals -0.1, -0.2, 0.1, 0.3: SSE = 0.15, MSE = 0.0375.


def test_rmse_hand():
    assert metrics.rmse(Y_TRUE, Y_PRED) == pytest.approx(math.sqrt(0.0375))


def test_mae_hand():
    assert metrics.mae(Y_TRUE, Y_PRED) == pytest.approx(0.175)


def test_max_error_hand():
    assert metrics.max_error(Y_TRUE, Y_PRED) == pytest.approx(0.3)


def test_r2_hand():
    # mean (-0.075); SST = 0.005625 + 0.855625 + 0.330625 + 0.075625 = 1.2675
    assert metrics.r2(Y_TRUE, Y_PRED) == pytest.approx(1.0 - 0.15 / 1.2675)


def test_gcv_score_hand():
    # (n - 1) / (n * SSE) = 3 / (4 * 0.15)
    assert metrics.gcv_score(Y_TRUE, Y_PRED) == pytest.approx(5.0)


def test_gcv_score_identity():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=50)
    prediction = truth + rng.normal(scale=0.1, size=50)
    mse = np.mean((truth - prediction) ** 2)
    assert metrics.gcv_score(truth, prediction) == pytest.approx(49 / (50**2 * mse))


def test_gcv_score_perfect_fit():
    assert metrics.gcv_score([1.0, 2.0], [1.0, 2.0]) == math.inf


def test_gcv_score_needs_two():
    with pytest.raises(ValueError, match="at least 2 values, got 1"):
        metrics.gcv_score([1.0], [1.0])


def test_accuracy_within_hand():
    assert metrics.accuracy_within(Y_TRUE, Y_PRED, tolerance=0.15) == pytest.approx(0.5)
    assert metrics.accuracy_within(Y_TRUE, Y_PRED) == 0.0


def test_accuracy_within_inclusive():
    assert metrics.accuracy_within([0.0, 0.0], [0.05, -0.05]) == 1.0


def test_accuracy_within_bad_tolerance():
    with pytest.raises(ValueError, match="tolerance must be finite and >= 0"):
        metrics.accuracy_within(Y_TRUE, Y_PRED, tolerance=-0.1)


def test_stability_hand():
    # Stable (<= 0): true [T, T, F, F], predicted [F, T, F, T].
    scores = metrics.stability_scores(Y_TRUE, Y_PRED)
    assert scores["tp"] == 1
    assert scores["fp"] == 1
    assert scores["fn"] == 1
    assert scores["tn"] == 1
    assert scores["precision"] == pytest.approx(0.5)
    assert scores["recall"] == pytest.approx(0.5)
    assert scores["f1"] == pytest.approx(0.5)


def test_stability_threshold_inclusive():
    scores = metrics.stability_scores([0.025, 0.03], [0.025, 0.03], threshold=0.025)
    assert scores["tp"] == 1
    assert scores["tn"] == 1


def test_stability_zero_division():
    scores = metrics.stability_scores([0.5, 0.7], [0.4, 0.9])
    assert scores["precision"] == 0.0
    assert scores["recall"] == 0.0
    assert scores["f1"] == 0.0


@pytest.mark.parametrize("threshold", [0.0, 0.025, -0.3])
def test_stability_matches_sklearn(threshold):
    rng = np.random.default_rng(1)
    truth = rng.normal(scale=0.5, size=300)
    prediction = truth + rng.normal(scale=0.2, size=300)
    scores = metrics.stability_scores(truth, prediction, threshold)
    expected = skm.precision_recall_fscore_support(
        truth <= threshold, prediction <= threshold, average="binary", zero_division=0
    )
    assert scores["precision"] == pytest.approx(expected[0])
    assert scores["recall"] == pytest.approx(expected[1])
    assert scores["f1"] == pytest.approx(expected[2])


def test_regression_matches_sklearn():
    rng = np.random.default_rng(2)
    truth = rng.normal(size=200)
    prediction = truth + rng.normal(scale=0.3, size=200)
    assert metrics.rmse(truth, prediction) == pytest.approx(
        math.sqrt(skm.mean_squared_error(truth, prediction))
    )
    assert metrics.mae(truth, prediction) == pytest.approx(
        skm.mean_absolute_error(truth, prediction)
    )
    assert metrics.r2(truth, prediction) == pytest.approx(
        skm.r2_score(truth, prediction)
    )
    assert metrics.max_error(truth, prediction) == pytest.approx(
        skm.max_error(truth, prediction)
    )


def test_r2_constant_truth():
    assert metrics.r2([1.0, 1.0], [1.0, 1.0]) == 1.0
    assert metrics.r2([1.0, 1.0], [1.0, 2.0]) == 0.0
    # The float mean of three 0.1s is not 0.1, so SST is about 1e-33, not 0.
    assert np.mean([0.1] * 3) != 0.1
    assert metrics.r2([0.1] * 3, [0.11] * 3) == 0.0
    assert metrics.r2([0.1] * 3, [0.1] * 3) == 1.0
    assert metrics.regression_metrics([0.1] * 3, [0.11, 0.1, 0.1])["r2"] == 0.0


def test_regression_metrics_keys():
    result = metrics.regression_metrics(Y_TRUE, Y_PRED)
    assert set(result) == {
        "rmse", "mae", "r2", "max_error", "gcv_score", "gcv_score_infinite",
        "accuracy", "precision", "recall", "f1", "n_predicted_stable", "n_stable",
        "n",
    }  # fmt: skip
    assert result["n"] == 4
    stability = metrics.stability_scores(Y_TRUE, Y_PRED)
    assert result["n_predicted_stable"] == stability["tp"] + stability["fp"]
    assert result["n_stable"] == stability["tp"] + stability["fn"]
    assert result["gcv_score"] == pytest.approx(5.0)
    assert result["gcv_score_infinite"] is False


def test_regression_metrics_options():
    result = metrics.regression_metrics(
        Y_TRUE, Y_PRED, tolerance=0.15, stability_threshold=0.3
    )
    assert result["accuracy"] == pytest.approx(0.5)
    assert result["recall"] == pytest.approx(1.0)


def test_regression_metrics_perfect_fit_json():
    result = metrics.regression_metrics([0.1, -0.2, 0.3], [0.1, -0.2, 0.3])
    assert result["gcv_score"] is None
    assert result["gcv_score_infinite"] is True
    assert json.loads(json.dumps(result, allow_nan=False)) == result


def test_inputs_torch_and_columns():
    truth = torch.tensor([[0.0], [-1.0], [0.5], [0.2]])
    assert metrics.mae(truth, Y_PRED) == pytest.approx(0.175, rel=1e-6)


def test_inputs_length_mismatch():
    with pytest.raises(ValueError, match="differ in length: 4 and 3"):
        metrics.rmse(Y_TRUE, Y_PRED[:3])


def test_inputs_nan():
    with pytest.raises(
        ValueError, match="y_pred has 1 NaN or infinite values .*index 2"
    ):
        metrics.mae(Y_TRUE, [0.0, 0.0, float("nan"), 0.0])


def test_inputs_empty():
    with pytest.raises(ValueError, match="at least 1 value, got 0"):
        metrics.mae([], [])


def test_inputs_not_1d():
    with pytest.raises(ValueError, match="must be 1-D"):
        metrics.mae(np.zeros((2, 2)), np.zeros((2, 2)))


def test_inputs_not_numeric():
    with pytest.raises(TypeError, match="y_true must contain real numbers"):
        metrics.mae(["a", "b"], [0.0, 0.0])
