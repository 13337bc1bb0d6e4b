"""Resuming ``dvmrl run`` from a folder whose state files are damaged.

Each damaged file must stop the run with exit code 2 and a message that
names the file, states that it is corrupt and gives a way on. The ways
that the messages suggest are tested here too.
"""

import json
import re
import shutil

import numpy as np
import pytest

from dvmrl import experiment_agent
from dvmrl.cli import main
from dvmrl.experiment import RunSpec, run_experiment
from tiny_run import TINY


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("run_state")


@pytest.fixture(scope="module")
def budget_file(base):
    path = base / "tiny.json"
    path.write_text(json.dumps(TINY.to_dict()))
    return str(path)


@pytest.fixture(scope="module")
def random_run(base):
    out = base / "random"
    run_experiment(RunSpec(preset=TINY, seeds=[0], methods=["random"]), out)
    return out


@pytest.fixture(scope="module")
def agent_file(base, make_untrained_agent):
    return make_untrained_agent(base / "agent.pt")


@pytest.fixture(scope="module")
def agent_run(base, agent_file):
    """An agent run whose episode snapshots are all kept (none removed)."""
    out = base / "agent"
    spec = RunSpec(preset=TINY, seeds=[0], methods=["agent"], agent_path=agent_file)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(experiment_agent, "_remove_snapshots", lambda root, keep: None)
        run_experiment(spec, out)
    return out


def copy_of(run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run, out)
    return out


def resume(out, budget_file, *extra):
    return main(
        [
            "run",
            "--budget",
            budget_file,
            "--out",
            str(out),
            "--resume",
            "--no-progress",
            *extra,
        ]
    )


def resume_random(out, budget_file):
    return resume(out, budget_file, "--methods", "random")


def edit_state(out, edit):
    state = json.loads((out / "state.json").read_text())
    edit(state)
    (out / "state.json").write_text(json.dumps(state))


def trials(state):
    return state["units"]["random/seed0"]["trials"]


def chosen(state):
    return state["units"]["random/seed0"]["chosen"]


def test_fixture_run_complete(random_run):
    state = json.loads((random_run / "state.json").read_text())
    assert len(trials(state)) >= 2
    assert (random_run / "units" / "random-seed0" / "predictions.npz").is_file()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("state.json", b"[]", "contains an array, not the run state object"),
        ("state.json", b"{}", "has no 'format' and 'version' fields"),
        ("state.json", bytes(range(256)), "not valid JSON .*utf-8"),
        ("state.json", b'{"format": "dvmrl-run-st', "not valid JSON .*Unterminated"),
        ("run.json", b'{"format": "dvmrl-r', "not valid JSON .*Unterminated"),
        ("run.json", b"[1, 2]", "contains an array, not an object"),
        ("run.json", b'{"signature": 3}', '"signature" is not an object'),
    ],
)
def test_unreadable_json_file(
    random_run, tmp_path, budget_file, capsys, name, content, message
):
    out = copy_of(random_run, tmp_path)
    (out / name).write_bytes(content)
    assert resume_random(out, budget_file) == 2
    err = capsys.readouterr().err
    assert f"{out / name} is corrupt" in err
    assert re.search(message, err), err
    assert "start a fresh run with another --out" in err
    assert "internal error" not in err


@pytest.mark.parametrize(
    ("edit", "where", "expected"),
    [
        (
            lambda s: trials(s)[1].update(val_rmse="oops"),
            "['trials'][1]['val_rmse'] is \"oops\"",
            "a number or null",
        ),
        (
            lambda s: trials(s)[0].update(epochs=1e9),
            "['trials'][0]['epochs'] is 1000000000.0",
            "an integer >= 0 and <= 6",
        ),
        (
            lambda s: chosen(s).update(val_rmse=-5.0),
            "['chosen']['val_rmse'] is -5.0",
            "a number >= 0 or null",
        ),
        (
            lambda s: s["units"]["random/seed0"]["test"].update(rmse=None, r2="x"),
            "['test']['r2'] is \"x\"",
            "a number or null",
        ),
        (
            lambda s: s["units"]["random/seed0"].update(epochs_used=10**9),
            "['epochs_used'] is 1000000000",
            "an integer >= 0 and <= 6",
        ),
        (
            lambda s: s["units"]["random/seed0"]["robustness"].update(
                vulnerability=float("inf")
            ),
            "['robustness']['vulnerability'] is Infinity",
            "a finite number or null",
        ),
        (
            lambda s: s["units"]["random/seed0"].update(trials=[1, 2]),
            "['trials'][0] is 1",
            "an object",
        ),
    ],
)
def test_wrong_values_in_state(
    random_run, tmp_path, budget_file, capsys, edit, where, expected
):
    out = copy_of(random_run, tmp_path)
    edit_state(out, edit)
    assert resume_random(out, budget_file) == 2
    err = capsys.readouterr().err
    assert f"{out / 'state.json'} is corrupt: units['random/seed0']{where}" in err
    assert f"expected {expected};" in err
    assert "remove the entry 'random/seed0' from \"units\"" in err
    # Nothing reached the report.
    assert (out / "report.md").read_bytes() == (random_run / "report.md").read_bytes()


def test_state_units_not_an_object(random_run, tmp_path, budget_file, capsys):
    out = copy_of(random_run, tmp_path)
    edit_state(out, lambda s: s.update(units=[]))
    assert resume_random(out, budget_file) == 2
    err = capsys.readouterr().err
    assert '"units" is [], expected an object' in err
    assert f"delete {out / 'state.json'} and rerun with --resume" in err


def test_removed_unit_recomputed(random_run, tmp_path, budget_file):
    # The fix a unit-level message suggests.
    out = copy_of(random_run, tmp_path)
    edit_state(out, lambda s: trials(s)[1].update(val_rmse="oops"))
    edit_state(out, lambda s: s["units"].pop("random/seed0"))
    assert resume_random(out, budget_file) == 0
    assert same_results(out, random_run)


def test_deleted_state_recomputed(random_run, tmp_path, budget_file):
    # The fix a message about an unreadable state.json suggests.
    out = copy_of(random_run, tmp_path)
    (out / "state.json").unlink()
    assert resume_random(out, budget_file) == 0
    assert same_results(out, random_run)


def same_results(out, reference):
    got = json.loads((out / "state.json").read_text())["units"]
    want = json.loads((reference / "state.json").read_text())["units"]
    keys = ("chosen", "test", "robustness", "chemsys")
    return sorted(got) == sorted(want) and all(
        got[unit][key] == want[unit][key] for unit in want for key in keys
    )


def test_truncated_predictions(random_run, tmp_path, budget_file, capsys):
    out = copy_of(random_run, tmp_path)
    path = out / "units" / "random-seed0" / "predictions.npz"
    path.write_bytes(path.read_bytes()[:100])
    assert resume_random(out, budget_file) == 2
    err = capsys.readouterr().err
    assert f"{path} is corrupt" in err
    assert "delete it and rerun with --resume" in err
    assert "internal error" not in err

    # The suggested fix: the chosen model is scored again, with the same result.
    path.unlink()
    assert resume_random(out, budget_file) == 0
    assert same_results(out, random_run)
    reference = random_run / "units" / "random-seed0" / "predictions.npz"
    with np.load(path) as got, np.load(reference) as want:
        assert np.array_equal(got["y_pred"], want["y_pred"])


# -- agent episode snapshots ------------------------------------------------
#
# A snapshot only speeds a resumed episode up. One that cannot be restored
# is dropped with a warning, as a truncated trainer checkpoint already was.
# The episode then replays from its first step, with the same result.


def rewind_agent(out):
    """Make the agent unit resume from its last kept snapshot."""
    folders = sorted((out / "units" / "agent-seed0").glob("episode-*"))
    assert folders

    def edit(state):
        unit = state["units"]["agent/seed0"]
        for part in ("chosen", "test", "robustness", "chemsys"):
            unit.pop(part)
        unit["episode"]["snapshot"] = folders[-1].name

    edit_state(out, edit)
    return folders[-1]


def agent_resume(out, budget_file, agent_file):
    return resume(out, budget_file, "--methods", "agent", "--agent", agent_file)


def break_manifest(folder):
    (folder / "episode.json").write_text("[1, 2]")


def break_generator(folder):
    manifest = json.loads((folder / "episode.json").read_text())
    generators = [e for e in manifest["entries"].values() if e["kind"] == "generator"]
    generators[0]["state"] = "garbage"
    (folder / "episode.json").write_text(json.dumps(manifest))


def break_torch_rng(folder):
    import torch

    tensors = torch.load(folder / "tensors.pt", weights_only=True)
    tensors["torch_rng"] = torch.zeros(3)
    torch.save(tensors, folder / "tensors.pt")


@pytest.mark.parametrize("damage", [break_manifest, break_generator, break_torch_rng])
def test_broken_snapshot_restarts_episode(
    agent_run, tmp_path, budget_file, agent_file, caplog, damage
):
    out = copy_of(agent_run, tmp_path)
    damage(rewind_agent(out))
    assert agent_resume(out, budget_file, agent_file) == 0
    assert "is corrupt" in caplog.text
    assert "restarting the episode from its first step" in caplog.text
    assert same_results(out, agent_run)


def test_intact_snapshot_resumes(agent_run, tmp_path, budget_file, agent_file, caplog):
    out = copy_of(agent_run, tmp_path)
    rewind_agent(out)
    assert agent_resume(out, budget_file, agent_file) == 0
    assert "restarting the episode" not in caplog.text
    assert "resuming the episode" in caplog.text
    assert same_results(out, agent_run)


def test_agent_checkpoint_records_its_training(agent_run):
    """The agent's chosen model records the epochs of its episode."""
    from dvmrl.training.checkpoint import read_checkpoint

    document = read_checkpoint(agent_run / "units" / "agent-seed0" / "best.pt")
    history = document["history"]
    assert len(history) > 0
    assert [record["epoch"] for record in history] == list(
        range(1, len(history) + 1)
    )


def test_agent_checkpoint_corrupt(agent_run, tmp_path, budget_file, agent_file, capsys):
    out = copy_of(agent_run, tmp_path)

    def rescore(state):
        unit = state["units"]["agent/seed0"]
        for part in ("test", "robustness", "chemsys"):
            unit.pop(part)

    edit_state(out, rescore)
    checkpoint = out / "units" / "agent-seed0" / "best.pt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:200])
    assert agent_resume(out, budget_file, agent_file) == 2
    err = capsys.readouterr().err
    assert f"{checkpoint} of the agent's chosen model is missing or corrupt" in err
    assert "remove the entry 'agent/seed0'" in err

    # The suggested fix reruns the episode, with the same result.
    edit_state(out, lambda s: s["units"].pop("agent/seed0"))
    assert agent_resume(out, budget_file, agent_file) == 0
    assert same_results(out, agent_run)


def test_broken_learning_snapshot_restarts(
    base, tmp_path, budget_file, agent_file, caplog
):
    reference = base / "learn"
    spec = RunSpec(
        preset=TINY,
        seeds=[0],
        methods=["agent"],
        agent_path=agent_file,
        agent_learn=True,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(experiment_agent, "_remove_snapshots", lambda root, keep: None)
        run_experiment(spec, reference)
    out = copy_of(reference, tmp_path)
    buffer = rewind_agent(out) / "buffer.npz"
    buffer.write_bytes(buffer.read_bytes()[:100])
    code = resume(
        out, budget_file, "--methods", "agent", "--agent", agent_file, "--agent-learn"
    )
    assert code == 0
    assert "buffer.npz" in caplog.text
    assert "restarting the episode from its first step" in caplog.text
    assert same_results(out, reference)
