from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from dvmrl.crossval import (
    cross_validate,
    group_kfold_assignment,
    kfold_assignment,
    summarise_folds,
)


def test_kfold_assignment_balanced():
    folds = kfold_assignment(103, 5, seed=1)
    counts = np.bincount(folds, minlength=5)
    assert counts.max() - counts.min() <= 1
    assert counts.sum() == 103


def test_kfold_assignment_seeded():
    first = kfold_assignment(50, 4, seed=3)
    second = kfold_assignment(50, 4, seed=3)
    other = kfold_assignment(50, 4, seed=4)
    assert np.array_equal(first, second)
    assert not np.array_equal(first, other)


def test_kfold_assignment_rejects_one_fold():
    with pytest.raises(ValueError, match="n_folds must be an integer >= 2"):
        kfold_assignment(10, 1, seed=0)


def test_kfold_assignment_rejects_too_many_folds():
    with pytest.raises(ValueError, match="exceeds the 3 rows"):
        kfold_assignment(3, 4, seed=0)


def test_group_assignment_keeps_groups_together():
    rng = np.random.default_rng(0)
    groups = np.array([f"A-B{g}" for g in rng.integers(0, 40, size=300)])
    folds = group_kfold_assignment(groups, 5, seed=2)
    for group in np.unique(groups):
        assert len(np.unique(folds[groups == group])) == 1


def test_group_assignment_balances_rows():
    rng = np.random.default_rng(1)
    groups = np.array([f"G{g}" for g in rng.integers(0, 200, size=2000)])
    counts = np.bincount(group_kfold_assignment(groups, 5, seed=0), minlength=5)
    assert counts.max() - counts.min() <= 30


def test_group_assignment_rejects_too_few_groups():
    with pytest.raises(ValueError, match="exceeds the 2 groups"):
        group_kfold_assignment(["A-B", "A-B", "C-D"], 3, seed=0)


def test_summarise_folds_mean_and_spread():
    folds = [{"rmse": 1.0, "mae": 0.5}, {"rmse": 3.0, "mae": 0.5}]
    mean, std, sem = summarise_folds(folds)
    assert mean["rmse"] == pytest.approx(2.0)
    assert std["rmse"] == pytest.approx(math.sqrt(2.0))
    assert sem["rmse"] == pytest.approx(1.0)
    assert std["mae"] == 0.0


def test_summarise_folds_skips_infinite_gcv():
    folds = [{"gcv_score": None}, {"gcv_score": 4.0}, {"gcv_score": 6.0}]
    mean, std, _ = summarise_folds(folds)
    assert mean["gcv_score"] == pytest.approx(5.0)
    assert std["gcv_score"] == pytest.approx(math.sqrt(2.0))


def test_summarise_folds_ignores_flags():
    mean, _, _ = summarise_folds([{"gcv_score_infinite": False, "n": 3}])
    assert "gcv_score_infinite" not in mean
    assert mean["n"] == 3.0


@pytest.fixture(scope="module")
def small_frame():
    from dvmrl.datasets import load

    df = load("mp-formation-energy")
    return df.sample(n=300, random_state=0).reset_index(drop=True)


@pytest.fixture(scope="module")
def tiny_configs():
    from dvmrl.model import ModelConfig
    from dvmrl.training import TrainConfig

    model = ModelConfig(
        hidden=8, layers=1, gate_hidden=8, msg_hidden=8, head_hidden=8, head_layers=1
    )
    train = TrainConfig(epochs=2, batch_size=64, patience=5)
    return model, train


def test_cross_validate_kfold(small_frame, tiny_configs):
    model, train = tiny_configs
    seen = []
    result = cross_validate(
        small_frame,
        kind="kfold",
        n_folds=3,
        model_config=model,
        train_config=train,
        fold_callback=lambda fold, metrics: seen.append(fold),
    )
    assert seen == [0, 1, 2]
    assert sum(m["n_test"] for m in result.fold_metrics) == len(small_frame)
    assert math.isfinite(result.mean["rmse"])
    assert result.std["rmse"] >= 0.0
    assert all(m["epochs"] == 2 for m in result.fold_metrics)


def test_cross_validate_chemsys_disjoint(small_frame, tiny_configs):
    model, train = tiny_configs
    result = cross_validate(
        small_frame, kind="chemsys", n_folds=3, model_config=model, train_config=train
    )
    payload = json.loads(json.dumps(result.to_dict()))
    assert payload["kind"] == "chemsys"
    assert len(payload["folds"]) == 3
    assert sum(m["n_test"] for m in result.fold_metrics) == len(small_frame)
    assert set(payload["mean"]) >= {"rmse", "mae", "r2", "f1"}
    systems_per_fold = small_frame.groupby(result.assignment)["chemsys"].nunique()
    assert systems_per_fold.sum() == small_frame["chemsys"].nunique()


def test_cross_validate_seeded(small_frame, tiny_configs):
    model, train = tiny_configs
    first = cross_validate(
        small_frame, n_folds=2, model_config=model, train_config=train
    )
    second = cross_validate(
        small_frame, n_folds=2, model_config=model, train_config=train
    )
    assert first.mean["rmse"] == second.mean["rmse"]


def test_cross_validate_training_seeds(small_frame, tiny_configs, monkeypatch):
    import dvmrl.training

    model, train = tiny_configs
    seeds = []
    real = dvmrl.training.Trainer

    def recording(model_config, train_config, *args, **kwargs):
        seeds.append(train_config.seed)
        return real(model_config, train_config, *args, **kwargs)

    monkeypatch.setattr(dvmrl.training, "Trainer", recording)
    cross_validate(
        small_frame, n_folds=2, seed=7, model_config=model, train_config=train
    )
    assert seeds == [7, 8]


def test_grouped_folds_keep_a_fit_part(small_frame, tiny_configs):
    model, train = tiny_configs
    systems = small_frame["chemsys"].value_counts().index[:2]
    frame = small_frame[small_frame["chemsys"].isin(systems)].reset_index(drop=True)
    with pytest.raises(ValueError, match=r"has 1 group \(chemical system or repeated"):
        cross_validate(
            frame, kind="chemsys", n_folds=2, model_config=model, train_config=train
        )


def test_cross_validate_rejects_kind(small_frame):
    with pytest.raises(ValueError, match="unknown cross-validation kind 'loo'"):
        cross_validate(small_frame, kind="loo")


def test_cross_validate_rejects_bad_metric_options(small_frame, monkeypatch):
    # A misspelt option failed only when the first trained fold was scored.
    from dvmrl.training import Trainer

    def fail(*args, **kwargs):
        raise AssertionError("a fold trained")

    monkeypatch.setattr(Trainer, "fit", fail)
    with pytest.raises(ValueError, match=r"unknown keys \['threshold'\]"):
        cross_validate(small_frame, metric_options={"threshold": 0.1})


def test_cross_validate_rejects_missing_column(small_frame):
    with pytest.raises(ValueError, match="missing \\['chemsys'\\]"):
        cross_validate(small_frame.drop(columns=["chemsys"]), kind="chemsys")


def test_kfold_keeps_repeated_compositions_together(small_frame, tiny_configs):
    model, train = tiny_configs
    frame = pd.concat([small_frame, small_frame], ignore_index=True)
    frame["composition"] = frame["formula"]
    result = cross_validate(
        frame, kind="kfold", n_folds=3, model_config=model, train_config=train
    )
    folds_per_composition = frame.groupby(result.assignment)["composition"].nunique()
    assert folds_per_composition.sum() == small_frame["formula"].nunique()


def test_cross_validate_rejects_one_row_fold(small_frame, tiny_configs):
    # 12 rows in 7 folds leave two folds with one test row each. The check
    # runs before the first fold trains.
    model, train = tiny_configs
    frame = small_frame.head(12).reset_index(drop=True)
    seen = []
    with pytest.raises(ValueError, match=r"would test on only 1 of the 12 rows"):
        cross_validate(
            frame,
            n_folds=7,
            model_config=model,
            train_config=train,
            fold_callback=lambda fold, metrics: seen.append(fold),
        )
    assert seen == []


def test_cross_validate_accepts_integral_float_folds(small_frame, tiny_configs):
    model, train = tiny_configs
    result = cross_validate(
        small_frame, n_folds=2.0, model_config=model, train_config=train
    )
    assert len(result.fold_metrics) == 2


def test_fold_assignments_accept_integral_float_counts():
    groups = np.array(["Al-Ni", "Al-Ni", "Fe-Ni", "Cu-Zn", "Cu-Zn", "Co-Cr"])
    grouped = group_kfold_assignment(groups, 2.0, seed=0)
    assert np.array_equal(grouped, group_kfold_assignment(groups, 2, seed=0))
    rows = kfold_assignment(6, 3.0, seed=0)
    assert np.array_equal(rows, kfold_assignment(6, 3, seed=0))
    with pytest.raises(ValueError, match="n_folds must be an integer >= 2, got 2.5"):
        group_kfold_assignment(groups, 2.5, seed=0)
