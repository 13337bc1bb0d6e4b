"""Tests of the development parts that bench/bench_accuracy.py cuts from the pool."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from dvmrl.datasets import load
from dvmrl.splits import make_split

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_accuracy.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_accuracy", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data():
    return load("mp-formation-energy")


@pytest.mark.parametrize("kind", ["random", "chemsys"])
def test_development_part_excludes_test_rows(bench, data, kind):
    test_formulas = set(data["formula"].iloc[make_split(data, kind, 0).test])
    frame = bench.development_frame(data, kind)
    dev = make_split(frame, kind, 0).test
    assert len(frame) == len(data) - len(test_formulas)
    assert test_formulas.isdisjoint(frame["formula"])
    assert 0.09 * len(frame) <= len(dev) <= 0.11 * len(frame)


@pytest.mark.parametrize("kind", ["random", "chemsys"])
def test_development_part_ignores_split_seed(bench, data, kind):
    frame = bench.development_frame(data, kind)
    first = make_split(frame, kind, 0)
    other = make_split(frame, kind, 3)
    assert np.array_equal(first.test, other.test)
    assert not np.array_equal(first.val, other.val)


def test_chemsys_development_part_keeps_systems_whole(bench, data):
    frame = bench.development_frame(data, "chemsys")
    split = make_split(frame, "chemsys", 0)
    dev_systems = set(frame["chemsys"].iloc[split.test])
    pool_systems = set(frame["chemsys"].iloc[np.concatenate([split.train, split.val])])
    assert dev_systems.isdisjoint(pool_systems)


def test_run_split_records_members_and_targets(bench, data):
    from dvmrl.model import ModelConfig
    from dvmrl.training import TrainConfig

    frame = data.sample(n=300, random_state=3).reset_index(drop=True)
    small = ModelConfig(
        hidden=8, layers=1, gate_hidden=8, msg_hidden=8, head_hidden=8, head_layers=1
    )
    result = bench.run_split(
        frame, "random", 0, small, TrainConfig(epochs=1, batch_size=64), members=2
    )
    assert len(result["test_targets"]) == result["n_test"] == len(result["test_rows"])
    targets = frame["target"].to_numpy()[result["test_rows"]]
    assert np.array_equal(targets, result["test_targets"])
    # Each member trains on its own division, and the top level repeats member 0's.
    assert result["members"][0]["n_train"] == result["n_train"]
    for member in result["members"]:
        assert member["n_train"] + member["n_val"] == 300 - result["n_test"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--score-on", "dev", "--splits", "binary-to-ternary"], "has no ternaries"),
        (["--json", "/nonexistent-folder/out.json"], "is missing or not writable"),
    ],
)
def test_bad_options_stop_before_training(bench, argv, message, capsys):
    with pytest.raises(SystemExit) as caught:
        bench.main(argv)
    assert caught.value.code == 2
    assert message in capsys.readouterr().err
