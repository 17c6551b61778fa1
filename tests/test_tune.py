"""The tune stage: search space, score, choice, Pareto front, tuned.yaml (fast, no Ray), and on the
smoke pipeline's real run (slow): trials as nested MLflow runs, outputs, and transfer using the choice."""
from __future__ import annotations

import copy
import json
import math

import pytest
import yaml

from robust_transfer import tuning
from robust_transfer.config import ConfigError, TuneConfig, load_params, tune_entries
from rt_testlib import SMOKE_PARAMS


def _row(value, clean, pgd, status="completed", baseline=False, model="lwf", option="lam"):
    return {"model": model, "options": {option: value}, option: value, "val_clean_acc": clean,
            "val_pgd_acc": pgd, "status": status, "baseline": baseline, "node_id": "n", "trial_id": str(value)}


# ----------------------------------------------------------------------------- score and space
def test_score_ranks_every_trial_over_the_floor_above_every_trial_under_it():
    assert tuning.score(0.8, 0.3, clean_floor=0.5) == 0.3
    assert tuning.score(0.49, 0.9, clean_floor=0.5) == pytest.approx(-0.51)
    under = [tuning.score(c, 0.9, 0.5) for c in (0.0, 0.2, 0.49)]
    assert max(under) < tuning.score(0.5, 0.0, 0.5) and under == sorted(under)  # nearer the floor ranks higher


def test_scored_metrics_add_score_and_epochs_and_drop_done_and_mark_failures():
    m = tuning.scored({"epoch": 3, "val_clean_acc": 0.7, "val_pgd_acc": 0.2, "done": True}, clean_floor=0.5)
    assert m["score"] == 0.2 and m["epochs_done"] == 4 and "done" not in m
    failed = tuning.scored({"failed": "loss became nan"}, clean_floor=0.5)
    assert failed["score"] == tuning.SCORE_FAILED and failed["epochs_done"] == 0


def test_search_points_start_with_the_params_value_and_cover_the_range_on_a_log_grid():
    import numpy as np

    pts = tuning.search_points({"lam": (0.0005, 0.5)}, {"lam": 0.005}, n=8, seed=0)
    assert pts[0] == {"lam": 0.005} and len(pts) == 8 and len({p["lam"] for p in pts}) == 8
    grid = [float(f"{v:.3g}") for v in np.geomspace(0.0005, 0.5, 8)]
    values = [p["lam"] for p in pts[1:]]
    assert set(values) < set(grid) and values[0] == 0.0005 and values[-1] == 0.5  # both ends stay
    (gave_way,) = set(grid) - set(values)
    assert gave_way == min(grid, key=lambda v: abs(math.log(v / 0.005)))  # the grid point nearest 0.005
    # a value outside the range keeps the whole grid; a value on the grid is not run twice
    assert [p["lam"] for p in tuning.search_points({"lam": (0.001, 0.1)}, {"lam": 0.5}, 4, 0)] == [0.5, 0.001, 0.01, 0.1]
    assert [p["lam"] for p in tuning.search_points({"lam": (0.001, 1.0)}, {"lam": 0.001}, 5, 0)] == \
        [0.001, 0.00562, 0.0316, 0.178, 1.0]


def test_search_points_for_several_options_are_seeded_draws_inside_the_box():
    space = {"lam": (0.001, 0.1), "w": (1.0, 10.0)}
    a = tuning.search_points(space, {"lam": 0.005, "w": 2.0}, n=6, seed=3)
    assert a == tuning.search_points(space, {"lam": 0.005, "w": 2.0}, n=6, seed=3)
    assert a != tuning.search_points(space, {"lam": 0.005, "w": 2.0}, n=6, seed=4)
    assert all(0.001 <= p["lam"] <= 0.1 and 1.0 <= p["w"] <= 10.0 for p in a[1:])


def test_asha_never_compares_lwf_trials_inside_its_head_only_phase():
    # the first half of LwF trains the head alone: every weight gives the same model there
    assert tuning.grace_epochs("lwf", {"head_only_frac": 0.5}, epochs=30, frac=0.2) == 16
    assert tuning.grace_epochs("cartl", {}, epochs=30, frac=0.2) == 6
    assert tuning.grace_epochs("lwf", {"head_only_frac": 0.5}, epochs=2, frac=0.5) == 2  # capped at max_t


# ----------------------------------------------------------------------------- the choice
def test_choice_is_the_most_robust_completed_trial_within_the_clean_drop():
    cfg = TuneConfig(clean_floor=0.5, max_clean_drop=0.05)
    rows = [_row(0.005, 0.80, 0.30, baseline=True), _row(0.05, 0.78, 0.40), _row(0.5, 0.70, 0.55),
            _row(1.0, 0.40, 0.60), _row(0.01, 0.80, 0.90, status="stopped")]
    pick, why = tuning.choose(rows, cfg)
    assert pick["options"] == {"lam": 0.05}, why  # 0.5 loses 10 points of clean, 1.0 is under the floor
    pick, _ = tuning.choose(rows, TuneConfig(clean_floor=0.5, max_clean_drop=None))
    assert pick["options"] == {"lam": 0.5}
    pick, _ = tuning.choose(rows, TuneConfig(clean_floor=0.0, max_clean_drop=None))
    assert pick["options"] == {"lam": 1.0}


def test_choice_ties_keep_the_higher_clean_accuracy_then_the_params_value():
    cfg = TuneConfig(clean_floor=0.0, max_clean_drop=None)
    rows = [_row(0.1, 0.6, 0.4), _row(0.005, 0.6, 0.4, baseline=True), _row(0.01, 0.6, 0.4), _row(1.0, 0.5, 0.4)]
    assert tuning.choose(rows, cfg)[0]["options"] == {"lam": 0.005}
    rows.append(_row(0.2, 0.65, 0.4))
    assert tuning.choose(rows, cfg)[0]["options"] == {"lam": 0.2}


def test_choice_keeps_the_params_value_when_nothing_qualifies():
    cfg = TuneConfig(clean_floor=0.9, max_clean_drop=0.02)
    rows = [_row(0.005, 0.8, 0.3, baseline=True), _row(0.05, 0.7, 0.5)]
    pick, why = tuning.choose(rows, cfg)
    assert pick["options"] == {"lam": 0.005} and "kept the params' value" in why
    pick, why = tuning.choose([_row(0.005, 0.8, 0.3, baseline=True, status="stopped")], cfg)
    assert pick["options"] == {"lam": 0.005} and "no trial ran every epoch" in why


def test_the_clean_drop_is_measured_from_the_most_accurate_trial_when_asha_stopped_the_params_value():
    cfg = TuneConfig(clean_floor=0.0, max_clean_drop=0.05)
    rows = [_row(0.005, 0.5, 0.3, baseline=True, status="stopped"), _row(0.05, 0.9, 0.2), _row(0.5, 0.8, 0.6)]
    assert tuning.choose(rows, cfg)[0]["options"] == {"lam": 0.05}


def test_asha_never_stops_the_params_value_but_stops_the_others():
    from types import SimpleNamespace

    import ray.cloudpickle
    from ray.tune.schedulers import TrialScheduler

    sched = tuning.asha_keeping_baseline({"lam": 0.005}, time_attr="epochs_done", max_t=8, grace_period=2,
                                         reduction_factor=2, metric="score", mode="max")
    sched = ray.cloudpickle.loads(ray.cloudpickle.dumps(sched))  # Tune pickles its config with the scheduler
    trials = [SimpleNamespace(config={"options": {"lam": lam}}, trial_id=str(i), is_finished=lambda: False)
              for i, lam in enumerate((0.1, 0.2, 0.005))]
    for t in trials:
        sched.on_trial_add(None, t)
    decisions = {}
    for t, score in zip(trials, (0.9, 0.8, 0.1)):  # the params' value scores worst at the first rung
        decisions[t.config["options"]["lam"]] = sched.on_trial_result(None, t, {"epochs_done": 2, "score": score})
    assert decisions[0.005] == TrialScheduler.CONTINUE
    assert decisions[0.2] == TrialScheduler.STOP  # ASHA itself still stops the others


def test_a_trial_replaces_the_params_value_only_by_more_than_the_validation_noise():
    rows = [_row(0.005, 0.80, 0.36, baseline=True), _row(0.0013, 0.80, 0.52), _row(0.05, 0.79, 0.30)]
    cfg = TuneConfig(clean_floor=0.5, max_clean_drop=0.02)
    # 25 validation images: a 16-point gain is under a one-sided 95% test (1.645 * sqrt(2 * .36 * .64 / 25) = 0.22)
    assert tuning.required_gain(cfg, 0.36, 25) == pytest.approx(1.645 * (2 * 0.36 * 0.64 / 25) ** 0.5)
    pick, why = tuning.choose(rows, cfg, n_val=25)
    assert pick["options"] == {"lam": 0.005} and "under min_gain 0.223" in why, why
    # 500 images: the same gain is far over the noise (0.05)
    assert tuning.choose(rows, cfg, n_val=500)[0]["options"] == {"lam": 0.0013}
    # an explicit min_gain replaces the test; 0 takes any gain
    assert tuning.choose(rows, TuneConfig(clean_floor=0.5, min_gain=0.0), n_val=25)[0]["options"] == {"lam": 0.0013}
    assert tuning.choose(rows, TuneConfig(clean_floor=0.5, min_gain=0.2), n_val=25)[0]["options"] == {"lam": 0.005}
    # a params' value under the clean floor protects nothing: the best qualifying trial replaces it
    rows = [_row(0.4, 0.48, 0.40, baseline=True), _row(0.93, 0.88, 0.60), _row(2.0, 0.40, 0.70)]
    pick, why = tuning.choose(rows, cfg, n_val=25)
    assert pick["options"] == {"lam": 0.93}, why


def test_pareto_front():
    pts = [(0.9, 0.1), (0.8, 0.5), (0.7, 0.4), (0.5, 0.6), (0.5, 0.5), (0.9, 0.1)]
    assert tuning.pareto_front(pts) == [True, True, False, True, False, True]


def test_plot_marks_front_choice_and_params_value(tmp_path):
    rows = [_row(0.005, 0.8, 0.3, baseline=True), _row(0.05, 0.78, 0.4), _row(0.5, 0.6, 0.5, status="stopped"),
            _row(0.4, 0.7, 0.2, model="cartl_ft", option="beta", baseline=True), _row(1.0, 0.6, 0.4, model="cartl_ft",
                                                                                    option="beta")]
    out = tmp_path / "tune.png"
    tuning.plot_trials(rows, {"lwf": rows[1], "cartl_ft": rows[4]}, 0.5, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


# ----------------------------------------------------------------------------- tuned.yaml
def test_tuned_yaml_round_trip_applies_over_params_and_names_every_transfer_model(tmp_path):
    params = load_params(SMOKE_PARAMS)
    models = list(params["transfer"]["models"])
    path = tmp_path / "tuned.yaml"
    tuning.write_tuned({"lwf": {"lam": 0.0316}}, models, path)
    tuned = tuning.read_tuned(path)
    assert list(tuned) == models and tuned["lwf"] == {"lam": 0.0316} and tuned["linear_robust"] == {}
    applied = tuning.apply_tuned(params, tuned)
    assert applied["transfer"]["models"]["lwf"]["lam"] == 0.0316
    assert applied["transfer"]["models"]["lwf"]["source"] == params["transfer"]["models"]["lwf"]["source"]
    assert "lam" not in params["transfer"]["models"]["lwf"]  # the caller's params are not changed
    with pytest.raises(ConfigError, match="'gone'.*not in transfer.models"):
        tuning.apply_tuned(params, {"gone": {"lam": 0.1}})
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="re-run the tune stage"):
        tuning.read_tuned(path)


def test_a_tuned_value_is_checked_like_a_param(tmp_path):
    from robust_transfer.config import transfer_entries

    params = tuning.apply_tuned(load_params(SMOKE_PARAMS), {"lwf": {"lam": "big"}})
    with pytest.raises(ConfigError, match=r"transfer.models.lwf.lam must be a number"):
        transfer_entries(params)


# ----------------------------------------------------------------------------- params
@pytest.mark.parametrize("tune, message", [
    ({"models": {"nope": {"lam": [0.1, 1.0]}}}, r"tune.models.nope: 'nope' is not a key of transfer.models"),
    ({"models": {"lwf": {"lr": [0.1, 1.0]}}}, r"unknown parameter tune.models.lwf.lr"),
    ({"models": {"lwf": {"source": [0.1, 1.0]}}}, r"unknown parameter tune.models.lwf.source"),
    ({"models": {"lwf": {"lam": [1.0, 0.1]}}}, r"tune.models.lwf.lam must be \[low, high\] with 0 < low <= high"),
    ({"models": {"lwf": {"lam": 0.1}}}, r"tune.models.lwf.lam must be a \[low, high\] range"),
    ({"models": {"linear_robust": {"x": [0.1, 1.0]}}}, r"method linear has no numeric option to tune"),
    ({"models": {"rrm": {"w_ce": [0.001, 0.1]}}}, r"not from a pretrain source"),
    ({"max_concurent_trials": 2}, r"unknown parameter tune.max_concurent_trials \(did you mean 'max_concurrent_trials'\?\)"),
    ({"clean_floor": 1.5}, r"tune.clean_floor must be in \[0, 1\]"),
    ({"reduction_factor": 1}, r"tune.reduction_factor must be >= 2"),
    ({"min_gain": 2}, r"tune.min_gain must be in \[0, 1\] or null"),
])
def test_bad_tune_params_fail_with_one_line_naming_the_key(tune, message):
    params = load_params(SMOKE_PARAMS)
    params["tune"] = {**params["tune"], **tune}
    with pytest.raises(ConfigError, match=message) as err:
        tune_entries(params)
    assert "\n" not in str(err.value)


def test_the_pipelines_tune_sections_are_valid():
    from robust_transfer.config import load_all
    from rt_testlib import REPO

    for path in (REPO / "params.yaml", SMOKE_PARAMS):
        cfg, space = tune_entries(load_all(path))
        assert space and cfg.num_samples >= 2


def test_transfer_depends_on_its_own_entry_of_tuned_yaml():
    from rt_testlib import REPO

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert "tuned.yaml" in stages["tune"]["outs"][1]
    assert {"tuned.yaml": ["${key}"]} in stages["transfer"]["do"]["params"]


# ----------------------------------------------------------------------------- the smoke pipeline's run
def test_smoke_tune_stage_outputs_and_nested_mlflow_runs(smoke_project):
    import mlflow
    import pyarrow.parquet as pq

    params = yaml.safe_load((smoke_project / "params.yaml").read_text())
    tune = params["tune"]
    tuned = tuning.read_tuned(smoke_project / "tuned.yaml")
    assert list(tuned) == list(params["transfer"]["models"])
    trials = pq.read_table(smoke_project / "tune/trials.parquet").to_pylist()
    assert len(trials) == len(tune["models"]) * tune["num_samples"]
    for model, space in tune["models"].items():
        mine = [t for t in trials if t["model"] == model]
        ((option, (low, high)),) = space.items()
        base = [t for t in mine if t["baseline"]]
        assert len(base) == 1 and base[0][option] == params["transfer"]["models"][model].get(
            option, {"lwf": 0.005, "cartl_ft": 0.4}[model])
        assert all(low <= t[option] <= high for t in mine if not t["baseline"])
        assert any(t["status"] == "completed" for t in mine)
        for t in mine:  # no trial fails (one that did, once, went missing from the choice)
            assert t["status"] in ("completed", "stopped") and t["error"] is None, t
            assert 0 <= t["val_pgd_acc"] <= t["val_clean_acc"] + 1e-9 <= 1 + 1e-9 and t["node_id"]
        chosen = tuned[model]
        assert set(chosen) == {option} and any(t[option] == chosen[option] for t in mine)
    metrics = json.loads((smoke_project / "metrics/tune.json").read_text())
    assert set(metrics["models"]) == set(tune["models"]) and metrics["trials"] == len(trials)
    assert metrics["models"]["lwf"]["chosen"] == tuned["lwf"]
    assert (smoke_project / "plots/tune.png").read_bytes()[:4] == b"\x89PNG"

    client = mlflow.MlflowClient(f"sqlite:///{smoke_project.parents[1] / 'mlflow.db'}")
    exp = client.get_experiment_by_name(params["mlflow"]["experiment"])
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parent = [r for r in runs if r.data.tags.get("stage") == "tune"]
    assert len(parent) >= 1
    parent = max(parent, key=lambda r: r.info.start_time)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == len(trials)
    assert {t["mlflow_run_id"] for t in trials} == {r.info.run_id for r in children}
    assert all("val_pgd_acc" in r.data.metrics and "score" in r.data.metrics for r in children)
    assert all(any(k.startswith("options") for k in r.data.params) for r in children)

    # the transfer stage trained lwf with the chosen weight
    transfer = max((r for r in runs if r.data.tags.get("stage") == "transfer-lwf"), key=lambda r: r.info.start_time)
    assert math.isclose(float(transfer.data.params["options.lam"]), tuned["lwf"]["lam"])


def test_a_failed_trial_is_recorded_by_what_went_wrong_not_by_the_actor_that_raised_it():
    ray_text = ("\x1b[36mray::ResourceTrainable.train()\x1b[39m (pid=25511, ip=192.0.2.2, actor_id=42613d)\n"
                "  File \"tuning.py\", line 158, in get\n    item = pickle.loads(path.read_bytes())\n"
                "           ^^^^^^^^^^^^\nEOFError: Ran out of input\n")
    assert tuning.error_line(RuntimeError(ray_text)) == "EOFError: Ran out of input"
    assert tuning.error_line(RuntimeError("")) == "RuntimeError"
    assert tuning.error_line(None) is None


def test_the_mailbox_delivers_messages_from_another_process_in_the_order_they_were_sent(tmp_path):
    """A trial's channel from its Train controller (another process on its node): messages arrive
    whole and in order, `get` waits and then raises queue.Empty, `empty` says whether one is unread."""
    import queue
    import subprocess
    import sys

    box = tuning.Mailbox(tmp_path)
    assert box.empty()
    with pytest.raises(queue.Empty):
        box.get(timeout=0.1)
    sender = ("from robust_transfer.tuning import Mailbox; import sys; box = Mailbox(sys.argv[1])\n"
              "for i in range(5): box.put(('metrics', {'epoch': i, 'pad': 'x' * 100000}))")
    subprocess.run([sys.executable, "-c", sender, str(tmp_path)], check=True)
    box.put(("metrics", {"epoch": 5}))
    got = [box.get(timeout=1)[1]["epoch"] for _ in range(6)]
    assert got == list(range(6)) and box.empty()
    assert not list(tmp_path.iterdir())  # read messages are removed, no partial file is left
    # A message being written (put's temporary file, still empty) is not read: a trial once read one
    # and failed with EOFError.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tuning.os, "replace", lambda src, dst: None)  # put stops between its write and its rename
        box.put(("metrics", {"epoch": 6}))
    (partial,) = tmp_path.iterdir()
    partial.write_bytes(b"")  # as it is when the reader lists the folder before the writer has written
    assert box.empty()
    with pytest.raises(queue.Empty):
        box.get(timeout=0.1)


@pytest.mark.parametrize("grace, rf, epochs", [(16, 2, 30), (15, 2, 30), (60, 2, 120), (1, 2, 2), (5, 3, 100), (7, 1.5, 40)])
def test_a_trial_reports_at_every_rung_asha_compares_and_at_its_end(grace, rf, epochs):
    """Trials report at ASHA's rungs only (tuning.rung_epochs), not every epoch: the rungs must be
    exactly where Ray's ASHA compares (its first result at or past each milestone)."""
    from ray.tune.schedulers import ASHAScheduler

    asha = ASHAScheduler(time_attr="epochs_done", max_t=epochs, grace_period=grace, reduction_factor=rf)
    milestones = sorted(m for m, _ in asha._brackets[0]._rungs)
    reports = tuning.rung_epochs(grace, rf, epochs)
    assert reports[-1] == epochs and reports == sorted(set(reports))
    for m in milestones:  # the first report at or past each milestone is the epoch it is reached
        assert min(r for r in reports if r >= m) == math.ceil(m)
    assert set(reports) <= {math.ceil(m) for m in milestones} | {epochs}
