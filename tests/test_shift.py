import numpy as np
import pytest

from dvmrl.datasets import load
from dvmrl.featurize import composition_features, featurize
from dvmrl.shift import (
    default_holdout_element,
    shift_auc,
    split_shift_table,
    strategy_shift_table,
)
from dvmrl.splits import KINDS, make_split

FAST = {"max_samples": 150, "folds": 3, "max_iter": 30}


@pytest.fixture(scope="module")
def data():
    df = (
        load("mp-formation-energy")
        .sample(n=1200, random_state=1)
        .reset_index(drop=True)
    )
    features = composition_features(featurize(df["formula"].tolist()))
    return df, features


def test_same_distribution_near_half():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(400, 6)), rng.normal(size=(400, 6))
    result = shift_auc(a, b, max_samples=400, importance=False)
    assert abs(result.auc - 0.5) < 0.1


def test_shifted_feature_detected():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 6)), rng.normal(size=(300, 6))
    b[:, 4] += 3.0
    names = [f"f{i}" for i in range(6)]
    result = shift_auc(a, b, feature_names=names, **FAST)
    assert result.auc > 0.95
    assert result.top_features[0][0] == "f4"


def test_small_shifted_sets_detected():
    # 20 + 20 rows in 2 folds: 20 training rows per fold, fewer than the
    # 40 that scikit-learn's default leaf size needs for one split.
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(20, 6)), rng.normal(size=(20, 6))
    b[:, 2] += 4.0
    result = shift_auc(a, b, folds=2, importance=False)
    assert result.constant_folds == 0
    assert result.auc > 0.9


def test_constant_scores_counted(caplog):
    a, b = np.ones((30, 4)), np.ones((30, 4))
    with caplog.at_level("WARNING", logger="dvmrl.shift"):
        result = shift_auc(a, b, folds=3, importance=False)
    assert result.auc == 0.5
    assert result.constant_folds == 3
    assert "not measured rather than no shift" in caplog.text


def test_subsample_is_bounded():
    rng = np.random.default_rng(2)
    result = shift_auc(rng.normal(size=(900, 3)), rng.normal(size=(50, 3)), **FAST)
    assert result.n_reference == 150
    assert result.n_other == 50


def test_result_reports_time():
    rng = np.random.default_rng(3)
    result = shift_auc(rng.normal(size=(100, 3)), rng.normal(size=(100, 3)), **FAST)
    assert result.seconds > 0.0


def test_mismatched_features_raise():
    with pytest.raises(ValueError, match="same feature count"):
        shift_auc(np.zeros((20, 3)), np.zeros((20, 4)))


def test_tiny_set_raises():
    with pytest.raises(ValueError, match="the other set has 2 rows"):
        shift_auc(np.zeros((20, 3)), np.zeros((2, 3)))


def test_fewer_samples_than_folds_raise():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="max_samples 10 is below folds 15"):
        shift_auc(
            rng.normal(size=(40, 3)), rng.normal(size=(40, 3)), max_samples=10, folds=15
        )


def test_split_table_covers_every_kind(data):
    df, features = data
    table = split_shift_table(df, features, importance=False, **FAST)
    assert set(table["split"]) == set(KINDS)
    assert len(table) == 2 * len(KINDS)


def test_binary_to_ternary_test_is_shifted(data):
    df, features = data
    table = split_shift_table(df, features, kinds=("binary-to-ternary",), **FAST)
    test_row = table[table["comparison"] == "train vs test"].iloc[0]
    assert test_row["auc"] > 0.95
    assert test_row["top_features"][0][0] == "n_elements"


def test_random_split_is_not_shifted(data):
    df, features = data
    table = split_shift_table(df, features, kinds=("random",), importance=False, **FAST)
    assert (table["auc"] < 0.7).all()


def test_split_table_takes_a_split_seed(data):
    # The split kinds can be cut with a checkpoint's division while the
    # classifier folds keep their own seed.
    df, features = data
    table = split_shift_table(
        df, features, kinds=("random",), seed=1, split_seed=0, importance=False, **FAST
    )
    split = make_split(df, "random", seed=0)
    expected = shift_auc(
        features[split.train], features[split.val], seed=1, importance=False, **FAST
    )
    row = table[table["comparison"] == "train vs validation pool"].iloc[0]
    assert row["auc"] == expected.auc


def test_strategy_table_rows(data):
    df, features = data
    split = make_split(df, "random", seed=0)
    selections = {"random": split.val[:60], "first": split.val[60:120]}
    table = strategy_shift_table(
        features, split.train, selections, importance=False, **FAST
    )
    assert list(table["strategy"]) == ["random", "first"]


def test_default_holdout_element(data):
    df, _ = data
    element = default_holdout_element(df)
    share = df["chemsys"].str.split("-").apply(lambda s: element in s).mean()
    assert 0.03 < share < 0.3


def test_shared_rows_warned(caplog):
    # Rows in both sets carry both labels, which pushes the AUC below 0.5.
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(60, 3))
    with caplog.at_level("WARNING", logger="dvmrl"):
        shift_auc(reference, reference[:30].copy(), folds=3, importance=False)
    assert "30 of the 30 rows of the other set also occur" in caplog.text


def test_generic_names_without_feature_names():
    # 100 columns of other statistics must not get the default feature names.
    rng = np.random.default_rng(1)
    a = rng.normal(size=(40, 100))
    b = rng.normal(size=(40, 100)) + np.eye(100)[7] * 3
    result = shift_auc(a, b, folds=2, n_top=1)
    assert result.top_features[0][0] == "feature_7"


def test_strategy_table_skips_small_sets(data, caplog):
    df, features = data
    train = np.arange(0, 200)
    with caplog.at_level("WARNING", logger="dvmrl"):
        table = strategy_shift_table(
            features, train, {"random": np.array([300, 301])}, **FAST
        )
    assert len(table) == 0
    assert "skips train vs the validation set of random: 2 rows" in caplog.text


@pytest.mark.parametrize("n_top", [0, -1, 1.5])
def test_shift_rejects_bad_n_top(n_top):
    rng = np.random.default_rng(0)
    reference, other = rng.normal(size=(60, 3)), rng.normal(size=(60, 3))
    with pytest.raises(ValueError, match="n_top must be an integer >= 1"):
        shift_auc(reference, other, n_top=n_top)
