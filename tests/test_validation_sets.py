import numpy as np
import pytest
import torch

from dvmrl.datasets import load
from dvmrl.featurize import composition_features, featurize
from dvmrl.splits import make_split
from dvmrl.validation import STRATEGIES, gp_predictive_std, select_validation_set


@pytest.fixture(scope="module")
def data():
    df = (
        load("mp-formation-energy")
        .sample(n=1500, random_state=0)
        .reset_index(drop=True)
    )
    split = make_split(df, "random", seed=0)
    batch = featurize(df["formula"].tolist())
    features = composition_features(batch)
    targets = df["target"].to_numpy()
    return df, split, batch, features, targets


def _linear_predictor():
    weights = torch.tensor(np.random.default_rng(0).normal(size=103))

    def predict(element_index, frac, mask):
        return (weights[element_index] * frac * mask).sum(dim=1)

    return predict


def _options(strategy, data):
    _, split, batch, features, targets = data
    options = {
        "test_indices": split.test,
        "train_indices": split.train,
        "batch": batch,
        "features": features,
        "targets": targets,
        "gp_max_train": 300,
    }
    if strategy == "ensemble-variance":
        rng = np.random.default_rng(1)
        options["samples"] = rng.normal(size=(6, len(split.val))) * np.linspace(
            0, 1, len(split.val)
        )
    if strategy == "adversarial":
        options["predictor"] = _linear_predictor()
        options["adversarial_anchors"] = 64
        options["search_options"] = {"steps": 5, "starts": 2}
    return options


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_selection_is_subset_of_pool(strategy, data):
    split = data[1]
    chosen = select_validation_set(
        strategy, split.val, 40, 0, **_options(strategy, data)
    )
    assert len(chosen) == 40
    assert len(np.unique(chosen)) == 40
    assert np.isin(chosen, split.val).all()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_selection_avoids_test_and_train(strategy, data):
    split = data[1]
    chosen = select_validation_set(
        strategy, split.val, 40, 0, **_options(strategy, data)
    )
    assert not np.isin(chosen, split.test).any()
    assert not np.isin(chosen, split.train).any()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_selection_is_reproducible(strategy, data):
    split = data[1]
    a = select_validation_set(strategy, split.val, 30, 5, **_options(strategy, data))
    b = select_validation_set(strategy, split.val, 30, 5, **_options(strategy, data))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_selection_leaves_training_data(strategy, data):
    df, split, batch, features, _ = data
    train_before = split.train.copy()
    frac_before = batch.frac.clone()
    features_before = features.copy()
    select_validation_set(strategy, split.val, 20, 0, **_options(strategy, data))
    assert np.array_equal(split.train, train_before)
    assert torch.equal(batch.frac, frac_before)
    assert np.array_equal(features, features_before)


def test_random_seed_changes_selection(data):
    split = data[1]
    a = select_validation_set("random", split.val, 30, 0, test_indices=split.test)
    b = select_validation_set("random", split.val, 30, 1, test_indices=split.test)
    assert not np.array_equal(a, b)


def test_pool_with_test_rows_raises(data):
    split = data[1]
    pool = np.concatenate([split.val, split.test[:3]])
    with pytest.raises(ValueError, match="contains 3 test row"):
        select_validation_set("random", pool, 10, 0, test_indices=split.test)


@pytest.mark.parametrize("strategy", ["random", "gp-uncertainty"])
def test_negative_pool_indices_raise(strategy, data):
    """-1 would read as the last row and carry a test row past the check."""
    df, split = data[0], data[1]
    pool = split.test[:5] - len(df)
    options = _options(strategy, data)
    with pytest.raises(ValueError, match="pool_indices contains negative row indices"):
        select_validation_set(strategy, pool, 3, 0, **options)


@pytest.mark.parametrize("strategy", ["random", "gp-uncertainty"])
def test_pool_indices_out_of_range_raise(strategy, data):
    df = data[0]
    pool = np.array([len(df), len(df) + 1])
    options = _options(strategy, data)
    message = f"out of range for the {len(df)} rows of the data"
    with pytest.raises(ValueError, match=message):
        select_validation_set(strategy, pool, 1, 0, **options)


def test_mismatched_row_counts_raise(data):
    # Targets of other rows than the batch used to fail deep in the GP with
    # an IndexError.
    split = data[1]
    options = {**_options("gp-uncertainty", data), "targets": data[4][:10]}
    with pytest.raises(ValueError, match=r"targets 10 rows"):
        select_validation_set("gp-uncertainty", split.val, 3, 0, **options)


@pytest.mark.parametrize("seed", [None, -1, 1.5])
def test_bad_seed_raises(data, seed):
    split = data[1]
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        select_validation_set("random", split.val, 3, seed, **_options("random", data))


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("gp_max_train", 0, "gp_max_train must be an integer >= 1, got 0"),
        ("adversarial_anchors", -3, "adversarial_anchors must be an integer >= 1"),
        ("n_samples", 2.5, "n_samples must be an integer >= 1, got 2.5"),
        ("epsilon", 0.0, r"epsilon must lie in \(0, 1\) .*got 0.0"),
        ("epsilon", "0.05", r"epsilon must lie in \(0, 1\) .*got '0.05'"),
    ],
)
def test_bad_numeric_options_named(data, option, value, message):
    # Checked up front, for every strategy, instead of failing inside
    # scikit-learn or NumPy with a message that names no argument.
    split = data[1]
    options = {**_options("random", data), option: value}
    with pytest.raises(ValueError, match=message):
        select_validation_set("random", split.val, 3, 0, **options)


def test_ensemble_variance_with_trainer_without_dropout(data):
    from dvmrl.model import ModelConfig
    from dvmrl.training import TrainConfig, Trainer

    _, split, batch, _, targets = data
    config = ModelConfig(hidden=8, layers=1, gate_hidden=8, msg_hidden=8, dropout=0.0)
    trainer = Trainer(
        config, TrainConfig(epochs=1), batch[split.train], targets[split.train]
    )
    options = {"test_indices": split.test, "batch": batch, "trainer": trainer}
    with pytest.raises(ValueError, match="MC-dropout sampling needs head dropout"):
        select_validation_set("ensemble-variance", split.val, 3, 0, **options)
    with pytest.raises(ValueError, match="n_samples must be >= 2 for a variance"):
        select_validation_set(
            "ensemble-variance", split.val, 3, 0, n_samples=1, **options
        )


def test_pool_with_train_rows_raises(data):
    split = data[1]
    pool = np.concatenate([split.val, split.train[:2]])
    with pytest.raises(ValueError, match="contains 2 training row"):
        select_validation_set(
            "random", pool, 10, 0, test_indices=split.test, train_indices=split.train
        )


def test_unknown_strategy_raises(data):
    split = data[1]
    with pytest.raises(ValueError, match="unknown validation strategy 'newest'"):
        select_validation_set("newest", split.val, 10, 0, test_indices=split.test)


def test_size_above_pool_raises(data):
    split = data[1]
    with pytest.raises(ValueError, match="size must be an integer in 1"):
        select_validation_set(
            "random", split.val, len(split.val) + 1, 0, test_indices=split.test
        )


def test_ensemble_variance_picks_largest_variance(data):
    split = data[1]
    n = len(split.val)
    spread = np.zeros(n)
    spread[[3, 10, 20]] = 1.0
    samples = np.random.default_rng(2).normal(size=(8, n)) * (0.01 + spread)
    chosen = select_validation_set(
        "ensemble-variance", split.val, 3, 0, test_indices=split.test, samples=samples
    )
    assert np.array_equal(chosen, np.sort(split.val[[3, 10, 20]]))


def test_ensemble_variance_rejects_non_finite_predictions():
    # A diverged member predicts NaN; NaN variances would sort last and the
    # composition would quietly never be drawn.
    pool, test = np.arange(10, 20), np.arange(10)
    samples = np.tile(np.linspace(0.0, 1.0, 10), (4, 1)) * np.arange(4)[:, None]
    samples[0, 3] = np.nan
    with pytest.raises(ValueError, match=r"pool rows \[13\] are not finite"):
        select_validation_set(
            "ensemble-variance", pool, 3, 0, test_indices=test, samples=samples
        )


def test_gp_std_grows_away_from_training():
    rng = np.random.default_rng(3)
    train = rng.normal(size=(200, 4))
    near = rng.normal(size=(20, 4)) * 0.5
    far = rng.normal(size=(20, 4)) * 0.5 + 6.0
    std = gp_predictive_std(train, np.concatenate([near, far]), train[:, 0] ** 2)
    assert std[20:].min() > std[:20].max()


def test_gp_selection_prefers_novel_pool_rows(data):
    df, split, batch, features, targets = data
    # Rows whose chemical systems never occur in training are the most novel.
    train_systems = set(df["chemsys"].to_numpy()[split.train])
    novel = np.array(
        [s not in train_systems for s in df["chemsys"].to_numpy()[split.val]]
    )
    chosen = select_validation_set(
        "gp-uncertainty", split.val, 30, 0, **_options("gp-uncertainty", data)
    )
    share = np.isin(chosen, split.val[novel]).mean()
    assert share > novel.mean()


def test_adversarial_needs_predictor(data):
    split = data[1]
    with pytest.raises(ValueError, match="needs predictor"):
        select_validation_set(
            "adversarial",
            split.val,
            10,
            0,
            test_indices=split.test,
            train_indices=split.train,
            batch=data[2],
        )


def _fractions_only(batch):
    # Features of another width than composition_features: the sorted
    # fractions, padded to 8 columns.
    frac = torch.sort(batch.frac.double(), dim=1, descending=True).values
    return torch.nn.functional.pad(frac, (0, 8 - frac.shape[1])).numpy()


def test_adversarial_accepts_other_features(data):
    _, split, batch, _, _ = data
    options = _options("adversarial", data)
    options["features"] = _fractions_only(batch)
    chosen = select_validation_set("adversarial", split.val, 40, 0, **options)
    assert len(np.unique(chosen)) == 40


def test_adversarial_uses_feature_function(data):
    _, split, batch, _, _ = data
    options = _options("adversarial", data)
    options["features"] = _fractions_only(batch)
    from_array = select_validation_set(
        "adversarial", split.val, 40, 0, feature_fn=_fractions_only, **options
    )
    del options["features"]
    computed = select_validation_set(
        "adversarial", split.val, 40, 0, feature_fn=_fractions_only, **options
    )
    default = select_validation_set(
        "adversarial", split.val, 40, 0, **_options("adversarial", data)
    )
    assert np.array_equal(from_array, computed)
    assert not np.array_equal(from_array, default)


def test_adversarial_rejects_mismatched_features(data):
    split = data[1]
    options = _options("adversarial", data)
    with pytest.raises(ValueError, match="features has 100 columns but feature_fn"):
        select_validation_set(
            "adversarial", split.val, 40, 0, feature_fn=_fractions_only, **options
        )


def test_gp_std_in_target_units():
    rng = np.random.default_rng(3)
    train_x = rng.normal(size=(120, 3))
    pool_x = rng.normal(size=(20, 3)) * 2.0
    train_y = np.sin(train_x[:, 0]) + 0.1 * rng.normal(size=120)
    std = gp_predictive_std(train_x, pool_x, train_y)
    scaled = gp_predictive_std(train_x, pool_x, 10.0 * train_y)
    assert np.allclose(scaled, 10.0 * std, rtol=1e-6)


def test_empty_pool_named(data):
    split = data[1]
    with pytest.raises(ValueError, match="pool_indices is empty"):
        select_validation_set("random", [], 1, 0, test_indices=split.test)


def test_ensemble_variance_needs_two_predictors(data):
    _, split, batch, _, _ = data
    with pytest.raises(ValueError, match="two or more predictors.*got 1"):
        select_validation_set(
            "ensemble-variance",
            split.val,
            3,
            0,
            test_indices=split.test,
            batch=batch,
            predictors=[_linear_predictor()],
        )


def test_gp_uncertainty_names_non_finite_targets(data):
    options = _options("gp-uncertainty", data)
    split = data[1]
    targets = options["targets"].copy()
    targets[split.train[4]] = np.nan
    options["targets"] = targets
    options["gp_max_train"] = len(split.train)
    message = rf"training rows \[{split.train[4]}\] are not finite"
    with pytest.raises(ValueError, match=message):
        select_validation_set("gp-uncertainty", split.val, 5, 0, **options)
