import dataclasses
import json
import logging
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_run
from dvmrl import env as env_module
from dvmrl import plotting
from dvmrl import report as report_module
from dvmrl.experiment import (
    ONLINE_LEARNING_STARTS,
    PRESETS,
    SHARED_TRAIN_KEYS,
    BudgetError,
    Experiment,
    Preset,
    RunDirectoryError,
    RunSpec,
    resolve_preset,
    run_experiment,
)
from dvmrl.experiment_agent import (
    EpisodeStateError,
    constructor_snapshot,
    make_env,
    restore_episode,
    save_episode,
)
from dvmrl.report import (
    METHOD_LABELS,
    _winner_text,
    find_winner,
    search_curve,
    summarise,
    tail_share,
)
from dvmrl.search import SEARCH_SPACE

# Two seeds and larger parts than the shared budget, for per-seed results.
TINY = dataclasses.replace(
    tiny_run.TINY, seeds=2, max_train=300, max_val=200, robust_n=6
)


@pytest.fixture(scope="module")
def agent_file(tmp_path_factory, make_untrained_agent):
    return make_untrained_agent(tmp_path_factory.mktemp("agent") / "agent.pt")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, agent_file):
    out = tmp_path_factory.mktemp("run") / "out"
    spec = RunSpec(preset=TINY, seeds=[0], agent_path=agent_file)
    report = run_experiment(spec, out)
    return out, report


def test_report_has_every_unit(finished_run):
    _, report = finished_run
    units = {(row["method"], row["seed"]) for row in report["results"]}
    assert units == {(m, 0) for m in ("random", "bayesian", "agent")}
    assert report["complete"]


def test_report_rows_have_metrics(finished_run):
    _, report = finished_run
    for row in report["results"]:
        for key in (
            "test_rmse",
            "test_mae",
            "test_r2",
            "test_gcv_score",
            "robustness_radius",
            "vulnerability",
            "chemsys_rmse",
            "chemsys_mae",
        ):
            assert row[key] is not None, (row["method"], key)
            assert math.isfinite(row[key]), (row["method"], key)


def test_equal_epoch_budgets(finished_run):
    _, report = finished_run
    for row in report["results"]:
        assert 0 < row["epochs"] <= TINY.epochs


def test_chosen_configs_in_space(finished_run):
    _, report = finished_run
    for row in report["results"]:
        SEARCH_SPACE.check(row["config"])
        for name in ("batch_size", "layers", "hidden"):
            assert type(row["config"][name]) is int


def test_seconds_cover_scoring(finished_run):
    _, report = finished_run
    for row in report["results"]:
        assert set(row["seconds"]) == {"search", "test", "robustness", "chemsys"}


def test_provenance_recorded(finished_run):
    _, report = finished_run
    prov = report["provenance"]
    assert prov["data"] == "mp-formation-energy"
    assert len(prov["data_checksum"]) == 64
    assert "cpu_isa" in prov["build_info"]
    assert prov["versions"]["scikit-optimize"]


def test_gcv_ratio_inverse_square(finished_run):
    _, report = finished_run
    for method in ("random", "agent"):
        for entry in report["ratios_vs_bayesian"][method]["per_seed"]:
            assert entry["gcv_ratio"] == pytest.approx(
                entry["rmse_ratio"] ** -2, rel=1e-9
            )


def test_report_files_written(finished_run):
    out, report = finished_run
    for name in ("report.json", "report.md", "state.json", "run.json"):
        assert (out / name).is_file()
    for path in report["figures"].values():
        assert (out / path).stat().st_size > 0
    assert len(report["figures"]) == 4


def test_parity_plot_chosen_on_validation(finished_run, monkeypatch):
    out, report = finished_run
    titles = []
    # write_figures imports the plotting functions when it runs.
    monkeypatch.setattr(
        plotting, "parity_plot", lambda *args, title, **kw: titles.append(title)
    )
    figures = report_module.write_figures(out, report)
    rows = [r for r in report["results"] if r["complete"]]
    chosen = min(rows, key=lambda r: r["val_rmse"])
    label = METHOD_LABELS[chosen["method"]]
    assert titles == [f"{label}, seed {chosen['seed']}: lowest validation RMSE"]
    key = "parity plot of the model with the lowest validation RMSE"
    assert figures[key] == "figures/parity_best.png"


def test_markdown_states_radius_bounds(finished_run):
    out, report = finished_run
    text = (out / "report.md").read_text()
    assert "upper bound of the true one" in text
    assert "lower bounds" not in text
    # Radius changes are signed with fixed decimals, never in e-notation.
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if "radius change |" in line)
    changes = []
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        changes.append(line.split("|")[-2].strip())
    assert changes
    assert all(re.fullmatch(r"[+-]\d\.\d{4}|n/a", c) for c in changes), changes


def test_odd_trial_leftover_below_half_rejected():
    # 7 = 3 + 3 + 1, and 1 epoch is less than half of a 3-epoch trial.
    preset = Preset(**{**TINY.to_dict(), "epochs": 7, "trial_epochs": 3})
    with pytest.raises(ValueError, match="leave 1 epochs after the full trials"):
        preset.check()


def test_markdown_names_winners(finished_run):
    out, report = finished_run
    text = (out / "report.md").read_text()
    assert (
        "F1 score of the stability call (stable at or below 0 eV/atom, against the "
        "elements, not the convex hull; calling every test composition stable "
        "scores F1 = "
    ) in text
    assert "## Verdict" in text
    assert "Against Bayesian optimisation" in text
    assert "inverse square" in text


def test_report_reads_robustness_with_accuracy(finished_run):
    out, report = finished_run
    with np.load(out / "units" / "random-seed0" / "predictions.npz") as arrays:
        expected = float(np.std(arrays["y_true"]))
    assert report["constant_test_rmse"] == pytest.approx(expected)
    text = (out / "report.md").read_text()
    assert "read them together with the test RMSE" in text
    assert f"test RMSE of {expected:.4f} eV/atom (their standard deviation)" in text


def test_tail_share_of_hand_errors():
    # Errors 3, 1, 1, 1 of 4 predictions: the largest quarter (one error)
    # carries 9 of the 12 squared units. A 0.3 share rounds up to two errors.
    y_true = np.zeros(4)
    y_pred = np.array([1.0, -3.0, 1.0, -1.0])
    assert tail_share(y_true, y_pred, 0.25) == pytest.approx(9 / 12)
    assert tail_share(y_true, y_pred, 0.3) == pytest.approx(10 / 12)
    assert tail_share(y_true, y_true, 0.05) is None
    assert tail_share(y_true[:0], y_true[:0], 0.05) is None


@pytest.mark.parametrize(("shares", "verdict"), [([0.62, 0.71], True), ([0.3], False)])
def test_tail_share_sentence_claims_only_a_large_share(shares, verdict):
    # Normally distributed errors give about 28 %, so only a share above one
    # half shows that a few compositions set the RMSE.
    from dvmrl.report import _reading_lines

    tail = {"share_of_squared_error": {f"m/seed{i}": v for i, v in enumerate(shares)}}
    text = _reading_lines({"test_error_tail": tail})[0]
    low, high = round(100 * min(shares)), round(100 * max(shares))
    span = f"{low} %" if low == high else f"{low} to {high} %"
    assert f"carry {span} of the squared error of each chosen model" in text
    assert ("mostly measures those few compositions" in text) is verdict


def test_report_gives_tail_share_of_squared_error(finished_run):
    out, report = finished_run
    tail = report["test_error_tail"]
    assert tail["fraction"] == 0.05
    shares = tail["share_of_squared_error"]
    assert set(shares) == {f"{m}/seed0" for m in ("random", "bayesian", "agent")}
    for key, share in shares.items():
        method = key.split("/")[0]
        with np.load(out / "units" / f"{method}-seed0" / "predictions.npz") as arrays:
            squared = np.sort((arrays["y_pred"] - arrays["y_true"]) ** 2)
        top = math.ceil(0.05 * squared.size)
        assert share == pytest.approx(squared[-top:].sum() / squared.sum())
        assert 0.05 <= share <= 1.0
    text = (out / "report.md").read_text()
    low, high = round(100 * min(shares.values())), round(100 * max(shares.values()))
    span = f"{low} %" if low == high else f"{low} to {high} %"
    assert f"The largest 5 % of the absolute test errors carry {span}" in text
    verdict = "so the test RMSE mostly measures those few compositions"
    assert (verdict in text) == (min(shares.values()) > 0.5)


def test_report_gives_all_stable_f1(finished_run):
    # The F1 that a model must beat to show its stability call means something.
    out, report = finished_run
    with np.load(out / "units" / "random-seed0" / "predictions.npz") as arrays:
        stable = float(np.mean(arrays["y_true"] <= 0.0))
    expected = 2 * stable / (1 + stable)
    assert report["all_stable_test_f1"] == pytest.approx(expected)
    assert f"scores F1 = {expected:.3f}" in (out / "report.md").read_text()


def test_r2_and_gcv_follow_rmse_verdict(finished_run):
    out, report = finished_run
    rmse = report["winners"]["test_rmse"]
    for key in ("test_r2", "test_gcv_score"):
        assert report["winners"][key]["follows"] == "test_rmse"
        assert report["winners"][key]["winner"] == rmse["winner"]
        assert report["winners"][key]["tied_with"] == rmse["tied_with"]
    assert report["winners"]["val_rmse"]["selection_score"]
    text = (out / "report.md").read_text()
    assert "ties: " in text
    assert "(of 6)" in text
    assert "- best validation RMSE:" not in text


def test_markdown_points_to_unit_metrics(finished_run):
    out, report = finished_run
    text = (out / "report.md").read_text()
    assert "within 0.05 eV/atom of the target" in text
    row = report["results"][0]
    # The metrics the sentence names are in report.json for every unit.
    for key in ("test_max_error", "test_accuracy", "test_f1", "robustness_radius_l2"):
        assert math.isfinite(row[key]), key


def test_markdown_states_baseline_win(finished_run):
    out, report = finished_run
    text = (out / "report.md").read_text()
    winner = report["winners"]["test_rmse"]
    group = [winner["winner"], *winner["tied_with"]]
    line = next(x for x in text.splitlines() if x.startswith("- test RMSE:"))
    if winner["winner"] in ("random", "bayesian") and not winner["tie"]:
        assert "A baseline beats the agent here." in line
    elif winner["tie"] and "agent" not in group:
        assert "The agent is outside the tie" in line
    else:
        assert "agent" in group


def test_agent_outside_tie_named_per_baseline():
    from dvmrl.report import _agent_outside_text

    # Bayesian optimisation and random search tie; the agent ties with random
    # search by the spread rule but not with Bayesian optimisation.
    summary = {
        "random": {"mean": 0.4886, "std": 0.0178, "n": 2},
        "bayesian": {"mean": 0.4847, "std": 0.0100, "n": 2},
        "agent": {"mean": 0.4972, "std": 0.0084, "n": 2},
    }
    report = {"summary": {"chemsys_rmse": summary}}
    winner = find_winner(summary, higher_is_better=False)
    assert winner["winner"] == "bayesian"
    assert winner["tied_with"] == ["random"]
    text = _agent_outside_text(report, "chemsys_rmse", ["bayesian", "random"], False)
    assert "Bayesian optimisation beats it" in text
    assert "it ties with random search" in text


def test_one_method_wins_nothing():
    winner = find_winner({"agent": summarise([0.4, 0.5])}, higher_is_better=False)
    assert winner["winner"] is None
    assert _winner_text(winner) == "n/a"


def test_robust_count_of_a_test_part_without_alloys():
    from dvmrl.report import _robust_count

    finished = {
        "budget": {"robust_n": 4},
        "results": [{"complete": True, "robust_n": 0}, {"complete": True, "robust_n": 0}],
    }
    assert _robust_count(finished).startswith("no test composition")
    running = {"budget": {"robust_n": 4}, "results": [{"complete": False}]}
    assert _robust_count(running).endswith("(none measured yet)")


def test_caveat_for_shipped_agent_data():
    from dvmrl.report import _seen_data_lines

    report = {"methods": ["random", "agent"], "agent": {"path": None}}
    lines = _seen_data_lines(report, "mp-energy-above-hull")
    assert "meta-trained on tasks drawn from `mp-energy-above-hull`" in lines[0]
    assert _seen_data_lines(report, "mp-formation-energy") == []
    # Another agent file, or no agent method, needs no caveat.
    other_agent = {**report, "agent": {"path": "a.pt"}}
    assert _seen_data_lines(other_agent, "mp-energy-above-hull") == []
    no_agent = {**report, "methods": ["random"]}
    assert _seen_data_lines(no_agent, "mp-energy-above-hull") == []


def test_report_title_names_methods_run():
    from dvmrl.report import _title

    assert _title(["random", "bayesian", "agent"]) == (
        "agent against random search and Bayesian optimisation"
    )
    assert _title(["agent", "random"]) == "agent against random search"
    assert _title(["agent"]) == "DQN agent"


def test_rerun_same_results(finished_run, tmp_path, agent_file):
    # The units are rolled back to mid-search (random), before scoring
    # (bayesian) and to the episode start (agent); resuming must rebuild the
    # same results.
    out, report = finished_run
    spec = RunSpec(preset=TINY, seeds=[0], agent_path=agent_file)
    again = tmp_path / "again"
    shutil.copytree(out, again)
    state = json.loads((again / "state.json").read_text())
    for key in ("random/seed0", "bayesian/seed0", "agent/seed0"):
        unit = state["units"][key]
        for part in ("chosen", "test", "robustness", "chemsys"):
            unit.pop(part, None)
        if key == "random/seed0":
            unit["trials"] = unit["trials"][:1]
        if key == "agent/seed0":
            unit.pop("steps", None)
            unit.pop("episode", None)
    (again / "state.json").write_text(json.dumps(state))
    resumed = run_experiment(spec, again, resume=True)
    first = {(r["method"], r["seed"]): r for r in report["results"]}
    for row in resumed["results"]:
        reference = first[(row["method"], row["seed"])]
        assert row["test_rmse"] == reference["test_rmse"], row["method"]
        assert row["config"] == reference["config"], row["method"]
        assert row["chemsys_rmse"] == reference["chemsys_rmse"], row["method"]


def test_diverged_trial_skipped(tmp_path, agent_file, monkeypatch):
    # The real trainer reports a NaN loss for the first random-search trial
    # only; the run goes on, records the trial and chooses another one.
    from dvmrl.experiment import derive_seed
    from dvmrl.training.trainer import Trainer

    first_trial_seed = derive_seed(0, 0, 7)
    optimise_epoch = Trainer._optimise_epoch

    def diverge_first_trial(self):
        loss, lr = optimise_epoch(self)
        return (math.nan if self.train_config.seed == first_trial_seed else loss), lr

    monkeypatch.setattr(Trainer, "_optimise_epoch", diverge_first_trial)
    spec = RunSpec(preset=tiny_run.TINY, seeds=[0], methods=["random"])
    report = run_experiment(spec, tmp_path / "out")
    state = json.loads((tmp_path / "out" / "state.json").read_text())
    trials = state["units"]["random/seed0"]["trials"]
    assert trials[0]["val_rmse"] is None
    assert trials[0]["epochs"] == 1
    assert all(t["val_rmse"] is not None for t in trials[1:])
    (row,) = report["results"]
    assert row["test_rmse"] is not None
    assert row["chemsys_rmse"] is not None
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Baseline trials train 2 epochs each." in text
    assert "Bayesian optimisation starts" not in text
    assert "The agent (" not in text


def test_non_finite_robustness_recorded(tmp_path, agent_file, monkeypatch):
    # A chosen model that predicts NaN on a probed composition leaves its
    # robustness scores missing; the run goes on and reports n/a.
    import dvmrl.experiment
    from dvmrl.adversarial import NonFinitePredictionError

    def non_finite(*args, **kwargs):
        raise NonFinitePredictionError("the predictor returned nan for compositions")

    monkeypatch.setattr(dvmrl.experiment, "robustness", non_finite)
    spec = RunSpec(preset=tiny_run.TINY, seeds=[0], methods=["random"])
    report = run_experiment(spec, tmp_path / "out")
    state = json.loads((tmp_path / "out" / "state.json").read_text())
    robust = state["units"]["random/seed0"]["robustness"]
    assert robust["robustness_radius"] is None
    assert "returned nan" in robust["error"]
    (row,) = report["results"]
    assert row["robustness_radius"] is None
    assert row["test_rmse"] is not None
    text = (tmp_path / "out" / "report.md").read_text()
    assert re.search(r"\| robustness radius[^\n]*\| n/a \|", text)


def test_run_split_warnings_logged_once(tmp_path, caplog):
    # 30 Al-Ni rows and 30 one-row systems: the chemsys validation part of
    # seed 3 takes Al-Ni whole, which the splits warn about. The size check
    # makes the split, and the pools reuse it.
    firsts = ("Co", "Cu", "Ti", "V", "Cr", "Mn")
    seconds = ("Fe", "Zn", "Mo", "W", "Nb")
    rows = [f"Ni{i}Al{31 - i},{-0.01 * i}" for i in range(1, 31)]
    rows += [f"{a}{b},-0.05" for a in firsts for b in seconds]
    csv = tmp_path / "lopsided.csv"
    csv.write_text("formula,target\n" + "\n".join(rows) + "\n")
    spec = RunSpec(data=str(csv), preset=TINY, seeds=[2, 3], methods=["random"])
    experiment = Experiment(spec, tmp_path / "out")
    with caplog.at_level(logging.WARNING, logger="dvmrl.splits"):
        experiment.prepare()
        pools = experiment.pools("chemsys", 3)
    experiment.close()
    warnings = [r for r in caplog.records if r.name == "dvmrl.splits"]
    assert len(pools.split.val) > 20
    assert len(warnings) == 1
    assert "in the validation part" in warnings[0].getMessage()


def test_unwritable_parent_named(tmp_path, monkeypatch):
    # Root ignores folder permissions, so a stand-in for mkdir fails as it
    # does below a read-only folder.
    import errno

    out = tmp_path / "ro" / "new"
    (tmp_path / "ro").mkdir()

    def reject(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", reject)
    spec = RunSpec(preset=TINY, seeds=[0], methods=["random"])
    with pytest.raises(RunDirectoryError) as caught:
        Experiment(spec, out).prepare()
    message = str(caught.value)
    assert f"cannot create output folder {out}: {tmp_path / 'ro'} is not" in message


def test_report_explains_chosen_configurations(finished_run):
    out, _ = finished_run
    text = (out / "report.md").read_text()
    section = text.split("## Chosen configurations", 1)[1]
    assert "the configuration of the model that the method kept" in section
    assert "before any later moves in run.log" in section
    assert "| kept at epoch |" in section


def test_occupied_folder_rejected(finished_run, tmp_path):
    out, _ = finished_run
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    spec = RunSpec(preset=TINY, seeds=[0], methods=["random"])
    with pytest.raises(RunDirectoryError, match="not empty"):
        Experiment(spec, out).prepare()
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert before == after


def test_resume_removes_stale_temporaries(finished_run, tmp_path, agent_file):
    # Files that a kill -9 left mid-write; a resume holds the folder's lock,
    # so no other process can be writing them.
    out, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    stale = [
        copy / ".state.json.k3j2.tmp",
        copy / "units" / "random-seed0" / ".best.pt.x.tmp",
    ]
    for path in stale:
        path.write_bytes(b"partial")
    keep = copy / "units" / "notes.tmp"
    keep.write_text("not a staged file")
    spec = RunSpec(preset=TINY, seeds=[0], agent_path=agent_file)
    experiment = Experiment(spec, copy, resume=True)
    experiment.prepare()
    experiment.close()
    for path in stale:
        assert not path.exists(), path
    assert keep.exists()


def test_folder_in_use_rejected(finished_run, tmp_path):
    out, _ = finished_run
    spec = RunSpec(preset=TINY, seeds=[0])
    first = Experiment(spec, out, resume=True)
    first._lock_folder()
    try:
        with pytest.raises(RunDirectoryError, match="in use by another dvmrl process"):
            Experiment(spec, out, resume=True).prepare()
        fresh = tmp_path / "fresh"
        fresh.mkdir()
        holder = Experiment(spec, fresh)
        holder._lock_folder()
        with pytest.raises(RunDirectoryError, match="in use by another dvmrl process"):
            Experiment(spec, fresh).prepare()
        holder.close()
        assert not any(fresh.iterdir())
    finally:
        first.close()


def test_resume_other_settings_rejected(finished_run):
    out, _ = finished_run
    spec = RunSpec(preset=TINY, seeds=[0, 1], methods=["random"])
    with pytest.raises(RunDirectoryError, match="other settings") as caught:
        Experiment(spec, out, resume=True).prepare()
    # Each difference shows the stored value next to the requested one.
    message = str(caught.value)
    assert "seeds: stored [0], requested [0, 1]" in message
    assert 'methods: stored ["random", "bayesian", "agent"], requested ["random"]' in (
        message
    )
    assert "agent: stored " in message
    assert "requested the pretrained agent" in message
    assert "differ)" not in message
    # Only one of the two runs uses an agent, so no agent file changed.
    assert "changed since the run started" not in message


def test_resume_rejects_a_replaced_agent_file(finished_run, tmp_path, agent_file):
    out, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    # The copied run names its own agent file, so that it can be replaced.
    agent_path = tmp_path / "agent.pt"
    shutil.copyfile(agent_file, agent_path)
    run = json.loads((copy / "run.json").read_text())
    run["signature"]["agent_path"] = str(agent_path)
    (copy / "run.json").write_text(json.dumps(run))
    spec = RunSpec(preset=TINY, seeds=[0], agent_path=str(agent_path))
    experiment = Experiment(spec, copy, resume=True)
    experiment.prepare()
    experiment.close()

    from dvmrl.agent import DQNAgent

    agent = DQNAgent.load(agent_path)
    with torch.no_grad():
        next(agent.online.parameters()).add_(0.5)
    agent.save(agent_path)
    with pytest.raises(RunDirectoryError, match="the agent file changed since the run"):
        Experiment(spec, copy, resume=True).prepare()


def test_run_spec_checks_target_kind():
    with pytest.raises(ValueError, match="unknown target_kind 'hull'"):
        RunSpec(preset=TINY, seeds=[0], target_kind="hull").check()
    spec = RunSpec(preset=TINY, seeds=[0], target_kind="energy_above_hull")
    spec.check()
    assert spec.signature("checksum")["target_kind"] == "energy_above_hull"


def test_run_csv_target_kind(tmp_path):
    from dvmrl.datasets import load
    from dvmrl.experiment import load_data

    hull = load("mp-energy-above-hull").iloc[:100]
    path = tmp_path / "hull.csv"
    hull[["formula", "target"]].to_csv(path, index=False)
    _, info = load_data(str(path), target_kind="energy_above_hull")
    assert info["stability_threshold"] == 0.025
    _, info = load_data(str(path))
    assert info["stability_threshold"] == 0.0


def test_markdown_states_hull_threshold(finished_run):
    from dvmrl.report import render_markdown

    _, report = finished_run
    provenance = {
        **report["provenance"],
        "data_stability_threshold": 0.025,
        "data_target_kind": "energy_above_hull",
    }
    text = render_markdown({**report, "provenance": provenance})
    assert "(stable at or below 0.025 eV/atom; calling every" in text
    assert "against the elements" not in text


def test_one_seed_verdict_names_leaders(finished_run):
    from dvmrl.report import render_markdown

    _, report = finished_run
    assert report["seeds"] == [0]
    verdict = render_markdown(report).split("## Verdict")[1].split("## ")[0]
    assert "Metrics led, with one seed" in verdict
    assert "won outright" not in verdict
    assert " wins." not in verdict


def test_markdown_names_machine_and_agent(finished_run):
    import dvmrl
    from dvmrl.report import render_markdown

    out, report = finished_run
    text = render_markdown(report)
    info = dvmrl.build_info()
    assert f"dvmrl kernels {info['cpu_isa']} on " in text
    assert f"Run started {report['provenance']['started']}" in text
    checksum = json.loads((out / "run.json").read_text())["signature"]["agent_checksum"]
    assert report["agent"]["checksum"] == checksum
    assert f"SHA-256 {checksum[:16]}..." in text


def test_kept_at_epoch_of_trial_and_steps():
    from dvmrl.report import kept_at_epoch

    trials = [
        {"index": 0, "epochs_before": 0, "extra": {"val_curve": [0.5, 0.4, 0.45]}},
        {"index": 1, "epochs_before": 3, "extra": {"val_curve": [0.6, 0.38, 0.39]}},
    ]
    assert kept_at_epoch({"chosen": {"trial": 1}, "trials": trials}) == 5
    assert kept_at_epoch({"chosen": {"trial": 0}, "trials": trials}) == 2
    steps = [
        {"epochs_spent": 5, "kept_val_rmse": 0.5},
        {"epochs_spent": 10, "kept_val_rmse": 0.4},
        {"epochs_spent": 15, "kept_val_rmse": 0.4},
    ]
    kept_trained = {"trial": "agent", "epochs_trained": 10}
    assert kept_at_epoch({"chosen": kept_trained, "steps": steps}) == 10
    # The kept state's own epoch count decides: an agent that never beat its
    # untrained model kept epoch 0, which no step records.
    kept_untrained = {"trial": "agent", "epochs_trained": 0}
    assert kept_at_epoch({"chosen": kept_untrained, "steps": steps}) == 0
    # No kept model, or a kept state without its epoch count: unknown.
    assert kept_at_epoch({"chosen": None, "trials": trials}) is None
    assert kept_at_epoch({"chosen": {"trial": "agent"}, "steps": steps}) is None


def test_report_rows_name_kept_epoch(finished_run):
    _, report = finished_run
    for row in report["results"]:
        assert 0 <= row["kept_at_epoch"] <= row["epochs"]


def test_foreign_folder_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    spec = RunSpec(preset=TINY, seeds=[0], methods=["random"])
    with pytest.raises(RunDirectoryError, match="not a dvmrl run folder"):
        Experiment(spec, tmp_path, resume=True).prepare()
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_train_folder_names_quoted_resume(tmp_path):
    # A dvmrl train folder whose name contains a space: the advice must be a
    # command that a shell runs as printed.
    folder = tmp_path / "my train"
    folder.mkdir()
    (folder / "run.json").write_text(json.dumps({"train": {"epochs": 3}}))
    spec = RunSpec(preset=TINY, seeds=[0], methods=["random"])
    with pytest.raises(RunDirectoryError) as caught:
        Experiment(spec, folder, resume=True).prepare()
    message = str(caught.value)
    assert "contains a dvmrl train run" in message
    assert f"dvmrl train --resume --out '{folder}'" in message


def test_removed_folder_stops_state_writes(tmp_path):
    import shutil

    from dvmrl._files import FolderReplacedError

    out = tmp_path / "run"
    spec = RunSpec(preset=TINY, seeds=[0], methods=["random"])
    experiment = Experiment(spec, out)
    experiment.prepare()
    try:
        shutil.rmtree(out)
        with pytest.raises(FolderReplacedError, match="removed or replaced"):
            experiment._write_state()
        assert not out.exists()
    finally:
        experiment.close()


def test_budget_without_trial_rejected():
    preset = Preset(**{**TINY.to_dict(), "epochs": 1, "trial_epochs": 4})
    with pytest.raises(ValueError, match="cannot fit one trial"):
        preset.check()


def test_budget_without_agent_step_rejected():
    changes = {"epochs": 2, "trial_epochs": 1, "agent_slice": 3}
    preset = Preset(**{**TINY.to_dict(), **changes})
    with pytest.raises(ValueError, match="cannot fit one agent step"):
        RunSpec(preset=preset, seeds=[0], methods=["random", "agent"]).check()


def test_agent_steps_checked_only_with_agent():
    # epochs 16 are no multiple of agent_slice 3: the agent could not spend
    # them, but a run without the agent never takes agent steps.
    changes = {"epochs": 16, "trial_epochs": 4, "agent_slice": 3, "n_initial_points": 2}
    preset = Preset(**{**TINY.to_dict(), **changes})
    RunSpec(preset=preset, seeds=[0], methods=["random", "bayesian"]).check()
    with pytest.raises(ValueError, match="not a multiple of agent_slice 3"):
        RunSpec(preset=preset, seeds=[0], methods=["random", "agent"]).check()


def test_seeds_checked():
    with pytest.raises(ValueError, match=r"seeds listed twice: \[0, 0\]"):
        RunSpec(preset=TINY, seeds=[0, 0], methods=["random"]).check()
    for bad in ([-1], [1.5], [True]):
        with pytest.raises(ValueError, match="seeds must be integers >= 0"):
            RunSpec(preset=TINY, seeds=bad, methods=["random"]).check()
    spec = RunSpec(preset=TINY, seeds=list(np.arange(2)), methods=["random"])
    spec.check()
    assert spec.seeds == [0, 1] and all(type(s) is int for s in spec.seeds)
    json.dumps(spec.signature("checksum"))


def test_preset_by_name():
    spec = RunSpec(preset="quick", seeds=[0], methods=["random"])
    spec.check()
    assert spec.preset == PRESETS["quick"]
    with pytest.raises(ValueError, match="unknown budget 'huge'"):
        RunSpec(preset="huge", seeds=[0], methods=["random"]).check()
    with pytest.raises(ValueError, match="preset must be a Preset"):
        RunSpec(preset=3, seeds=[0], methods=["random"]).check()


def test_all_trials_diverged_recorded(tmp_path, monkeypatch):
    # Every baseline trial reports a NaN loss: the unit has no model, its
    # results are recorded as missing, the report names the reason, and a resume of
    # the finished folder gives the same report instead of failing.
    from dvmrl.training.trainer import Trainer

    optimise_epoch = Trainer._optimise_epoch

    def diverge(self):
        loss, lr = optimise_epoch(self)
        return math.nan, lr

    monkeypatch.setattr(Trainer, "_optimise_epoch", diverge)
    spec = RunSpec(preset=tiny_run.TINY, seeds=[0], methods=["random"])
    report = run_experiment(spec, tmp_path / "out")
    unit = json.loads((tmp_path / "out" / "state.json").read_text())["units"][
        "random/seed0"
    ]
    assert unit["chosen"] is None
    assert unit["epochs_used"] == tiny_run.TINY.epochs
    assert all(t["val_rmse"] is None for t in unit["trials"])
    assert unit["test"]["rmse"] is None
    assert "diverged" in unit["test"]["error"]
    assert unit["chemsys"]["rmse"] is None
    assert unit["robustness"]["vulnerability"] is None
    (row,) = report["results"]
    assert row["no_model"]
    assert row["test_rmse"] is None
    assert row["complete"]
    text = (tmp_path / "out" / "report.md").read_text()
    assert "No model, so no results (n/a) for random search seed 0" in text
    assert re.search(r"\| random search \| 0 \|( n/a \|){6}", text)
    again = run_experiment(spec, tmp_path / "out", resume=True)
    assert again["results"] == report["results"]


def test_robustness_probes_distinct_compositions():
    # Unaries cannot change, and a composition that several rows repeat
    # counts once, so the probe set skips both.
    import types

    import pandas as pd

    from dvmrl.datasets._vendored import COMPOSITION_COLUMN
    from dvmrl.featurize import featurize

    formulas = ["Fe", "FeNi", "NiFe", "Al2Cu", "Cu", "CuZn", "FeNi", "AlNiTi"]
    # A loaded data frame's columns: the probes read n_elements from it.
    df = pd.DataFrame({"formula": formulas, "n_elements": [1, 2, 2, 2, 1, 2, 2, 3]})
    df[COMPOSITION_COLUMN] = [
        "Fe", "FeNi", "FeNi", "Al2Cu", "Cu", "CuZn", "FeNi", "AlNiTi"
    ]
    experiment = Experiment.__new__(Experiment)
    experiment.df = df
    experiment.spec = types.SimpleNamespace(
        preset=dataclasses.replace(TINY, robust_n=10)
    )
    test_index = np.array([0, 1, 2, 3, 4, 5, 6, 7])
    pools = types.SimpleNamespace(x_test=featurize(formulas), test_index=test_index)
    rows = experiment.robust_rows(pools)
    assert rows.tolist() == [1, 3, 5, 7]
    experiment.spec = types.SimpleNamespace(
        preset=dataclasses.replace(TINY, robust_n=2)
    )
    picked = experiment.robust_rows(pools)
    assert len(picked) == 2
    assert set(picked.tolist()) <= {1, 3, 5, 7}


def test_bayesian_without_surrogate_rejected():
    preset = Preset(**{**TINY.to_dict(), "epochs": 16, "trial_epochs": 4,
                       "n_initial_points": 4})
    with pytest.raises(ValueError, match="n_initial_points 4 is not below the 4 trials"):
        RunSpec(preset=preset, seeds=[0], methods=["random", "bayesian"]).check()
    RunSpec(preset=preset, seeds=[0], methods=["random", "agent"]).check()


def test_budget_file_any_extension(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text(json.dumps({**TINY.to_dict(), "name": "mine"}))
    assert resolve_preset(str(path)).epochs == TINY.epochs
    for missing in ("missing.json", "MISSING.JSON"):
        with pytest.raises(FileNotFoundError, match="check the path, or pass quick"):
            resolve_preset(str(tmp_path / missing))


def test_unknown_budget_rejected():
    with pytest.raises(ValueError, match="unknown budget 'huge'"):
        resolve_preset("huge")


def test_unknown_method_rejected():
    with pytest.raises(ValueError, match="unknown method"):
        RunSpec(preset=TINY, methods=["random", "grid"]).check()


def test_unknown_data_rejected(tmp_path):
    spec = RunSpec(data="no-such-data", preset=TINY, seeds=[0], methods=["random"])
    with pytest.raises((ValueError, FileNotFoundError), match="no-such-data"):
        Experiment(spec, tmp_path / "out").prepare()
    assert not (tmp_path / "out").exists()


def test_presets_scale():
    small, full = PRESETS["small"], PRESETS["full"]
    assert full.epochs >= 10 * small.epochs
    assert full.seeds == 5
    assert small.seeds == 3
    for preset in PRESETS.values():
        preset.check()


def test_space_matches_env_ranges():
    ranges = {
        "lr": env_module.LR_RANGE,
        "batch_size": env_module.BATCH_RANGE,
        "weight_decay": env_module.WEIGHT_DECAY_RANGE,
        "dropout": env_module.DROPOUT_RANGE,
        "layers": env_module.LAYER_RANGE,
        "hidden": env_module.HIDDEN_RANGE,
    }
    for name, (low, high) in ranges.items():
        assert SEARCH_SPACE[name].low == low, name
        assert SEARCH_SPACE[name].high == high, name


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, agent_file):
    spec = RunSpec(preset=TINY, seeds=[0], agent_path=agent_file)
    experiment = Experiment(spec, tmp_path_factory.mktemp("env") / "out")
    experiment.prepare()
    return experiment


def test_env_gets_baseline_pools(prepared):
    pools = prepared.pools("random", 0)
    env = make_env(prepared, 0)
    formulas = prepared.df["formula"].to_numpy()
    assert sorted(env.train_formulas) == sorted(formulas[pools.train_index])
    assert sorted(env.pool_formulas) == sorted(formulas[pools.val_index])
    assert env.budget_epochs == TINY.epochs


def test_env_never_sees_test(prepared):
    pools = prepared.pools("random", 0)
    env = make_env(prepared, 0)
    test = set(prepared.df["formula"].to_numpy()[pools.test_index])
    assert not test & set(env.train_formulas)
    assert not test & set(env.pool_formulas)


def test_episode_snapshot_round_trip(prepared, tmp_path):
    env = make_env(prepared, 0)
    constructor = constructor_snapshot(env)
    env.reset(seed=3)
    continue_action = env_module.ACTION_INDEX["continue"]
    env.step(env_module.ACTION_INDEX["lr-half"])
    save_episode(env, constructor, tmp_path / "snap", {"note": 1})
    _, reward, _, _, info = env.step(continue_action)
    weights = env.trainer.model.flat.detach().clone()

    copy = make_env(prepared, 0)
    extra = restore_episode(copy, tmp_path / "snap")
    _, reward_copy, _, _, info_copy = copy.step(continue_action)
    assert extra == {"note": 1}
    assert reward_copy == reward
    assert info_copy["val_rmse"] == info["val_rmse"]
    assert info_copy["best_val_rmse"] == info["best_val_rmse"]
    assert np.array_equal(copy.trainer.model.flat.detach().numpy(), weights.numpy())


def test_interrupted_step_snapshot_leaves_no_folder(tmp_path, monkeypatch):
    from dvmrl import experiment_agent

    def interrupted_save(env, constructor, folder, extra):
        folder.mkdir()
        (folder / "env.pt").write_bytes(b"half written")
        raise KeyboardInterrupt

    monkeypatch.setattr(experiment_agent, "save_episode", interrupted_save)
    loop = {"obs": [0.0], "info": {}, "done": False}
    with pytest.raises(KeyboardInterrupt):
        experiment_agent._persist_step(None, None, None, tmp_path, 3, loop, None)
    assert list(tmp_path.iterdir()) == []


def test_episode_snapshot_rejects_foreign_class(prepared, tmp_path):
    env = make_env(prepared, 0)
    constructor = constructor_snapshot(env)
    env.reset(seed=3)
    save_episode(env, constructor, tmp_path / "snap", {})
    manifest_path = tmp_path / "snap" / "episode.json"
    manifest = json.loads(manifest_path.read_text())
    name = next(k for k, v in manifest["entries"].items() if v["kind"] == "config")
    manifest["entries"][name]["class"] = "os:system"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(EpisodeStateError, match="is not a dvmrl config class"):
        restore_episode(make_env(prepared, 0), tmp_path / "snap")


def test_winner_tie_within_spread():
    summaries = {
        "random": summarise([0.30, 0.34, 0.32]),
        "bayesian": summarise([0.31, 0.35, 0.33]),
        "agent": summarise([0.50, 0.51, 0.52]),
    }
    winner = find_winner(summaries, higher_is_better=False)
    assert winner["winner"] == "random"
    assert winner["tied_with"] == ["bayesian"]
    assert winner["tie"]


def test_winner_clear_when_apart():
    summaries = {"random": summarise([0.30, 0.31]), "agent": summarise([0.40, 0.41])}
    winner = find_winner(summaries, higher_is_better=False)
    assert winner["winner"] == "random"
    assert not winner["tie"]


def test_winner_must_lead_every_seed():
    # The means are 0.05 apart with spreads of 0.03 and 0.02, but the second
    # method is ahead in seed 2, where both trained on the same pools.
    per_seed = {
        "random": {0: 0.30, 1: 0.31, 2: 0.36},
        "agent": {0: 0.38, 1: 0.39, 2: 0.35},
    }
    summaries = {m: summarise(list(v.values())) for m, v in per_seed.items()}
    assert find_winner(summaries, False)["tie"] is False
    winner = find_winner(summaries, False, per_seed)
    assert winner["winner"] == "random"
    assert winner["tied_with"] == ["agent"]
    # Ahead in every seed: a win.
    per_seed["random"][2] = 0.33
    summaries = {m: summarise(list(v.values())) for m, v in per_seed.items()}
    assert find_winner(summaries, False, per_seed)["tie"] is False


def test_winner_higher_is_better():
    summaries = {"random": summarise([0.1, 0.11]), "agent": summarise([0.2, 0.21])}
    assert find_winner(summaries, higher_is_better=True)["winner"] == "agent"


def test_winner_single_seed_unassessed():
    summaries = {"random": summarise([0.3]), "agent": summarise([0.31])}
    winner = find_winner(summaries, higher_is_better=False)
    assert winner["winner"] == "random"
    assert not winner["spread_assessed"]


def test_winner_single_seed_invisible_tie():
    # 0.478717 and 0.478709 eV/atom both print as 0.4787.
    summaries = {"agent": summarise([0.478709]), "random": summarise([0.478717])}
    winner = find_winner(summaries, higher_is_better=False)
    assert winner["winner"] == "agent"
    assert winner["tied_with"] == ["random"]
    assert winner["tie"]
    assert "ties not assessed" not in _winner_text(winner)


def test_winner_tie_below_resolution():
    # 0.4 % apart, with spreads far smaller than the difference.
    summaries = {
        "random": summarise([0.5000, 0.5001]),
        "agent": summarise([0.5020, 0.5021]),
    }
    winner = find_winner(summaries, higher_is_better=False)
    assert winner["tied_with"] == ["agent"]
    assert winner["tie"]


def test_winner_single_seed_text():
    summaries = {"random": summarise([0.3]), "agent": summarise([0.31])}
    text = _winner_text(find_winner(summaries, higher_is_better=False))
    assert text == "random search (one seed: ties judged at 0.5 % only)"


def test_summarise_skips_missing():
    summary = summarise([0.2, None, 0.4])
    assert summary["n"] == 2
    assert summary["mean"] == pytest.approx(0.3)
    assert summary["std"] == pytest.approx(np.std([0.2, 0.4], ddof=1))


def test_test_part_independent_of_seed(prepared):
    first = prepared.pools("random", 0).test_index
    second = prepared.pools("random", 1).test_index
    assert np.array_equal(first, second)


def test_paths_inside_out(finished_run):
    out, _ = finished_run
    for path in Path(out).rglob("*.tmp"):
        pytest.fail(f"temporary file left behind: {path}")


def test_agent_learning_online(tmp_path, agent_file):
    before = Path(agent_file).read_bytes()
    spec = RunSpec(
        preset=TINY,
        seeds=[0],
        methods=["agent"],
        agent_path=agent_file,
        agent_learn=True,
    )
    report = run_experiment(spec, tmp_path / "out")
    state = json.loads((tmp_path / "out" / "state.json").read_text())
    unit = state["units"]["agent/seed0"]
    assert report["complete"]
    last = unit["steps"][-1]
    assert last["terminated"] or last["truncated"]
    assert unit["epochs_used"] <= TINY.epochs
    assert report["agent"]["path"] == agent_file
    assert report["agent"]["learn"] is True
    # The agent updates from the first transition of the episode on.
    assert ONLINE_LEARNING_STARTS == 1
    assert unit["steps"][0]["agent_gradient_steps"] > 0
    # The user's agent file is read, never rewritten.
    assert Path(agent_file).read_bytes() == before
    assert not list((tmp_path / "out" / "units" / "agent-seed0").glob("episode-*"))


def test_env_model_matches_baselines(prepared):
    from dvmrl.experiment import START_CONFIG, model_and_train_configs

    env = make_env(prepared, 0)
    env.reset(seed=0)
    baseline_model, baseline_train = model_and_train_configs(START_CONFIG, 2, 0)
    assert env.trainer.model_config == baseline_model
    assert env.hyperparameters() == START_CONFIG
    env_train = env.trainer.train_config
    for key in SHARED_TRAIN_KEYS:
        assert getattr(env_train, key) == getattr(baseline_train, key), key
    assert baseline_train.schedule == "constant"


def test_agent_without_snapshots(tmp_path, agent_file, monkeypatch, finished_run):
    from dvmrl import experiment_agent

    def refuse(*args, **kwargs):
        raise experiment_agent.EpisodeStateError("unsupported attribute")

    monkeypatch.setattr(experiment_agent, "save_episode", refuse)
    spec = RunSpec(preset=TINY, seeds=[0], methods=["agent"], agent_path=agent_file)
    out = tmp_path / "out"
    report = run_experiment(spec, out)
    state = json.loads((out / "state.json").read_text())
    unit = state["units"]["agent/seed0"]
    assert "snapshot" not in unit["episode"]
    # Resuming with steps but no snapshot replays the episode from the start.
    for part in ("chosen", "test", "robustness", "chemsys"):
        unit.pop(part)
    (out / "state.json").write_text(json.dumps(state))
    resumed = run_experiment(spec, out, resume=True)
    again = json.loads((out / "state.json").read_text())["units"]["agent/seed0"]
    assert [s["action"] for s in again["steps"]] == [s["action"] for s in unit["steps"]]
    assert resumed["results"][0]["test_rmse"] == report["results"][0]["test_rmse"]
    reference = next(r for r in finished_run[1]["results"] if r["method"] == "agent")
    assert report["results"][0]["test_rmse"] == reference["test_rmse"]


def test_method_training_settings_pinned():
    # Every method of dvmrl run trains with the settings of the shipped
    # agent's environment, not with those in dvmrl.defaults.
    from dvmrl.experiment import START_CONFIG, model_and_train_configs

    model_config, train_config = model_and_train_configs(START_CONFIG, 3, 0)
    assert train_config.loss == "mse"
    assert train_config.monitor == "val_rmse"
    assert train_config.ema_decay == 0.0
    assert model_config.fraction_hidden == 0


def write_budget(tmp_path, text):
    path = tmp_path / "budget.json"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        # Missing fields are named. adversarial_steps and _starts have defaults.
        (
            {"drop": ["trial_epochs", "robust_n"]},
            r"budget keys \['trial_epochs', 'robust_n'\] are missing",
        ),
        ({"epochs": "8"}, r'epochs must be an integer >= 1, got "8"'),
        ({"epochs": True}, "epochs must be an integer >= 1, got true"),
        ({"epochs": 8.0}, "epochs must be an integer >= 1, got 8.0"),
        ({"robust_n": 0}, "robust_n must be an integer >= 1, got 0"),
        ({"max_val": "all"}, r'max_val must be an integer >= 2 or null .*"all"'),
    ],
)
def test_budget_file_bad_field(tmp_path, change, message):
    data = {**TINY.to_dict(), "name": "mine"}
    for key in change.pop("drop", []):
        del data[key]
    data.update(change)
    path = write_budget(tmp_path, json.dumps(data))
    with pytest.raises(ValueError, match=message) as caught:
        resolve_preset(str(path))
    assert str(path) in str(caught.value)


BASELINE_TRIAL_CASES = [
    (
        {"epochs": 8, "trial_epochs": 20, "agent_slice": 2},
        "epochs 8 cannot fit one trial of trial_epochs 20 .*half of "
        "trial_epochs, 10 epochs",
    ),
    (
        {"epochs": 16, "trial_epochs": 32, "agent_slice": 2},
        "epochs 16 fit only one trial of trial_epochs 32",
    ),
    (
        {"epochs": 16, "trial_epochs": 12, "agent_slice": 2},
        "epochs 16 fit only one trial of trial_epochs 12, so the baselines "
        "would compare no configurations; raise epochs to at least 18",
    ),
    (
        {"epochs": 9, "trial_epochs": 4, "agent_slice": 1},
        "epochs 9 leave 1 epochs after the full trials of trial_epochs 4",
    ),
]


@pytest.mark.parametrize("methods", [["random"], ["bayesian", "agent"]])
@pytest.mark.parametrize(("change", "message"), BASELINE_TRIAL_CASES)
def test_baseline_trial_rules_apply_with_baselines(tmp_path, change, message, methods):
    path = write_budget(tmp_path, json.dumps({**TINY.to_dict(), **change}))
    preset = resolve_preset(str(path))
    spec = RunSpec(preset=preset, seeds=[0], methods=methods)
    with pytest.raises(BudgetError, match=message):
        spec.check()


def test_large_seed_rejected_only_with_bayesian():
    # scikit-optimize takes seeds below 2**32; random search takes any.
    with pytest.raises(ValueError, match=r"seed 4294967296 is too large for Bayesian"):
        RunSpec(preset=TINY, seeds=[0, 2**32], methods=["bayesian"]).check()
    RunSpec(preset=TINY, seeds=[2**32], methods=["random"]).check()


@pytest.mark.parametrize(("change", "message"), BASELINE_TRIAL_CASES)
def test_agent_only_run_ignores_trial_epochs(tmp_path, change, message):
    # The agent trains whole steps of agent_slice epochs; trial_epochs is a
    # setting of the baselines alone.
    path = write_budget(tmp_path, json.dumps({**TINY.to_dict(), **change}))
    spec = RunSpec(preset=resolve_preset(str(path)), seeds=[0], methods=["agent"])
    spec.check()
    assert spec.preset.epochs == change["epochs"]


def test_budget_file_nan_rejected(tmp_path):
    text = json.dumps({**TINY.to_dict(), "epochs": 8}).replace("8", "NaN", 1)
    path = write_budget(tmp_path, text)
    with pytest.raises(ValueError, match="epochs must be an integer >= 1, got NaN"):
        resolve_preset(str(path))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "must be a JSON object .* got an array"),
        ('{"epochs": 8,\n', "is not valid JSON"),
        ("", "is not valid JSON"),
    ],
)
def test_budget_file_not_an_object(tmp_path, text, message):
    path = write_budget(tmp_path, text)
    with pytest.raises(ValueError, match=message) as caught:
        resolve_preset(str(path))
    assert str(path) in str(caught.value)


def test_budget_file_folder(tmp_path):
    folder = tmp_path / "budget.json"
    folder.mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        resolve_preset(str(folder))


def test_budget_file_defaults_adversarial(tmp_path):
    data = TINY.to_dict()
    del data["adversarial_steps"], data["adversarial_starts"], data["name"]
    preset = resolve_preset(str(write_budget(tmp_path, json.dumps(data))))
    assert preset.name == "budget"
    assert (preset.adversarial_steps, preset.adversarial_starts) == (30, 2)


def test_report_robustness_count_used(finished_run, tmp_path):
    # With robust_n above the test part's size, every test composition is
    # probed, so the report states the count that the units recorded.
    from dvmrl.report import write_report

    out, _ = finished_run
    assert f"measured on {TINY.robust_n} fixed test compositions (box radius" in (
        (out / "report.md").read_text()
    )
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    run = json.loads((copy / "run.json").read_text())
    run["signature"]["preset"]["robust_n"] = 100000
    (copy / "run.json").write_text(json.dumps(run))
    report = write_report(copy)
    text = (copy / "report.md").read_text()
    assert "measured on 6 fixed test compositions (the budget asks for 100000" in text
    assert {row["robust_n"] for row in report["results"]} == {TINY.robust_n}


def test_report_agent_without_result(finished_run, tmp_path):
    # The agent's chemsys retraining left no metrics: the verdict must not
    # say that a baseline beats it, and the figure must draw no bar for it.
    from dvmrl.report import write_report

    out, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    state = json.loads((copy / "state.json").read_text())
    state["units"]["agent/seed0"]["chemsys"].update(rmse=None, mae=None)
    (copy / "state.json").write_text(json.dumps(state))
    report = write_report(copy)
    assert report["summary"]["chemsys_rmse"]["agent"]["mean"] is None
    verdict = (copy / "report.md").read_text().split("## Verdict")[1]
    lines = [line for line in verdict.splitlines() if line.startswith("- chemsys")]
    assert len(lines) == 2
    for line in lines:
        assert "The agent has no result for this metric." in line
        assert "beat" not in line.split("The best mean")[-1]
    assert (copy / "figures" / "test_metrics.png").stat().st_size > 0


def test_verdict_counts_only_compared_metrics(finished_run, tmp_path):
    # No unit has chemsys results: those two metrics compare nothing, so the
    # verdict counts its ties among the other four and states that.
    from dvmrl.report import write_report

    out, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    state = json.loads((copy / "state.json").read_text())
    for unit in state["units"].values():
        unit["chemsys"].update(rmse=None, mae=None)
    (copy / "state.json").write_text(json.dumps(state))
    write_report(copy)
    verdict = (copy / "report.md").read_text().split("## Verdict")[1]
    pattern = r"ties: \d \(of 4\)\. 2 metrics of 6 had results from fewer"
    assert re.search(pattern, verdict)


def test_agent_checkpoint_describes_kept_weights(finished_run):
    from dvmrl.training import load_checkpoint

    out, _ = finished_run
    state = json.loads((out / "state.json").read_text())
    chosen = state["units"]["agent/seed0"]["chosen"]
    _, metadata = load_checkpoint(out / "units" / "agent-seed0" / "best.pt")
    assert metadata["epochs_done"] == chosen["epochs_trained"]
    assert len(metadata["history"]) == chosen["epochs_trained"]
    assert metadata["config"] == chosen["config"]


def test_report_states_chemsys_epochs_and_scope(finished_run):
    out, _ = finished_run
    text = (out / "report.md").read_text()
    label = f"chemsys hold-out RMSE (eV/atom), retrained {TINY.retrain_epochs} epochs"
    assert f"| {label}, lower is better |" in text
    assert "they do not measure the accuracy that `dvmrl train` reaches" in text


def test_report_notes_name_only_methods_run(finished_run, tmp_path):
    # A run of random search alone has no GP fits and no agent to explain.
    from dvmrl.report import write_report

    out, _ = finished_run
    text = (out / "report.md").read_text()
    assert "GP fits, agent decisions, test scoring" in text
    assert "The agent selects its checkpoint" in text
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    state = json.loads((copy / "state.json").read_text())
    state["units"] = {"random/seed0": state["units"]["random/seed0"]}
    (copy / "state.json").write_text(json.dumps(state))
    run = json.loads((copy / "run.json").read_text())
    run["signature"]["methods"] = ["random"]
    (copy / "run.json").write_text(json.dumps(run))
    write_report(copy)
    single = (copy / "report.md").read_text()
    assert "do not count: test scoring, robustness searches and the chemsys" in single
    assert "GP fits" not in single
    assert "The agent selects its checkpoint" not in single


def test_parity_plot_shows_best_metrics(finished_run, tmp_path, monkeypatch):
    # The run's parity plot carries the metrics box of dvmrl evaluate's plot.
    import dvmrl.plotting
    from dvmrl.report import write_report

    out, _ = finished_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    calls = []
    real = dvmrl.plotting.parity_plot

    def record(path, *args, **options):
        calls.append(options)
        return real(path, *args, **options)

    monkeypatch.setattr(dvmrl.plotting, "parity_plot", record)
    report = write_report(copy)
    best = min(report["results"], key=lambda row: row["test_rmse"])
    (options,) = calls
    assert options["metrics"]["rmse"] == best["test_rmse"]
    assert options["metrics"]["mae"] == best["test_mae"]
    assert options["metrics"]["r2"] == best["test_r2"]


def test_report_capped_radii_and_base_model(finished_run):
    """report.md counts the radii at r_max and names the fixed base model."""
    out, report = finished_run
    text = (out / "report.md").read_text()
    assert "in fraction units, tau 0.05 eV/atom)" in text
    for method in ("random", "bayesian", "agent"):
        rows = [r for r in report["results"] if r["method"] == method]
        capped = sum(r["robust_capped"] for r in rows)
        counted = sum(r["robust_n"] for r in rows)
        label = METHOD_LABELS[method]
        assert f"{label} {capped} of {counted}" in text
    assert "which is not the default model of `dvmrl train`" in text
    assert "| epochs used by the method |" in text


def test_report_keeps_global_backend(finished_run, tmp_path):
    import matplotlib

    from dvmrl.report import write_report

    copy = tmp_path / "copy"
    shutil.copytree(finished_run[0], copy)
    before = matplotlib.get_backend()
    matplotlib.use("pdf")
    try:
        write_report(copy)
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(before)
    assert (copy / "figures" / "robustness_radii.png").is_file()


def test_report_states_test_sizes(finished_run, tmp_path):
    from dvmrl.report import SMALL_TEST_PART, write_report

    out, report = finished_run
    random_n = {row["test_n"] for row in report["results"]}
    chemsys_n = {row["chemsys_n"] for row in report["results"]}
    assert len(random_n) == 1
    assert len(chemsys_n) == 1
    text = (out / "report.md").read_text()
    expected = (
        f"Test parts: {random_n.pop()} compositions (random split), "
        f"{chemsys_n.pop()} compositions (chemsys split)."
    )
    assert expected in text
    assert "rough guide" not in text
    # With a small user data set, the report warns how few compositions rank them.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    state = json.loads((copy / "state.json").read_text())
    for unit in state["units"].values():
        unit["test"]["n"] = 3
    (copy / "state.json").write_text(json.dumps(state))
    write_report(copy)
    text = (copy / "report.md").read_text()
    assert "Test parts: 3 compositions (random split)" in text
    assert f"With fewer than {SMALL_TEST_PART} test compositions" in text


def test_method_order_keeps_results(finished_run, tmp_path, agent_file):
    # Every unit seeds its own generators, so a resumed run may list the
    # methods in another order.
    out, report = finished_run
    methods = ["agent", "bayesian", "random"]
    spec = RunSpec(preset=TINY, seeds=[0], methods=methods, agent_path=agent_file)
    again = run_experiment(spec, tmp_path / "reordered")
    first = {row["method"]: row for row in report["results"]}
    for row in again["results"]:
        for key in ("test_rmse", "chemsys_rmse", "robustness_radius", "config"):
            assert row[key] == first[row["method"]][key], (row["method"], key)
    Experiment(spec, out, resume=True).prepare()


@pytest.mark.parametrize("rows", [5, 10])
def test_pools_reject_tiny_data(rows):
    from dvmrl.datasets import load
    from dvmrl.experiment import make_pools

    df = load("mp-formation-energy").sample(n=rows, random_state=1)
    df = df.reset_index(drop=True)
    with pytest.raises(ValueError, match=f"random split of the {rows} compositions"):
        make_pools(df, "random", 0, PRESETS["quick"])


def test_pools_name_more_systems_for_one_system():
    from dvmrl.datasets import load
    from dvmrl.experiment import make_pools

    df = load("mp-formation-energy")
    largest = df["chemsys"].value_counts().index[0]
    df = df[df["chemsys"] == largest].reset_index(drop=True)
    with pytest.raises(ValueError, match="pass a data set with more chemical systems"):
        make_pools(df, "chemsys", 0, PRESETS["quick"])


def test_pools_accept_twenty_rows():
    from dvmrl.datasets import load
    from dvmrl.experiment import make_pools

    df = load("mp-formation-energy").sample(n=20, random_state=1).reset_index(drop=True)
    pools = make_pools(df, "random", 0, PRESETS["quick"])
    assert len(pools.test_index) >= 2
    assert len(pools.val_index) >= 2


def test_readme_budget_equals_small_preset():
    """The budget file that README.md shows loads and equals the small preset."""
    import re
    from pathlib import Path

    readme = Path(__file__).resolve().parents[1] / "README.md"
    if not readme.is_file():
        pytest.skip("README.md is not beside the tests")
    block = re.search(r"```json\n(.*?)```", readme.read_text(), re.S)
    assert block is not None
    example = Preset.from_dict(json.loads(block.group(1)))
    assert {**example.to_dict(), "name": "small"} == PRESETS["small"].to_dict()


def test_agent_curve_ends_at_kept_model(finished_run):
    out, _ = finished_run
    state = json.loads((Path(out) / "state.json").read_text())
    unit = state["units"]["agent/seed0"]
    curve = search_curve(unit)
    assert len(curve) == len(unit["steps"])
    assert curve[-1][1] == pytest.approx(unit["chosen"]["val_rmse"], rel=1e-9)


def test_agent_curve_follows_kept_model():
    steps = [
        {"epochs_spent": 2, "val_rmse": 0.5, "kept_val_rmse": 0.5},
        {"epochs_spent": 4, "val_rmse": 0.3, "kept_val_rmse": 0.5},
        {"epochs_spent": 6, "val_rmse": 0.4, "kept_val_rmse": 0.45},
    ]
    assert search_curve({"steps": steps}) == [(2, 0.5), (4, 0.5), (6, 0.45)]
    # Steps recorded without the kept model's RMSE give the best so far.
    old = [{k: v for k, v in step.items() if k != "kept_val_rmse"} for step in steps]
    assert search_curve({"steps": old}) == [(2, 0.5), (4, 0.3), (6, 0.3)]
