"""MLflow runs of the stages that train: opened after the Ray Train job, recorded as if opened before."""
from __future__ import annotations

import time

import pytest

from robust_transfer import tracking
from robust_transfer.config import MlflowConfig


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the stages export it for their workers: undone after the test
    return MlflowConfig(experiment="deferred", tracking_uri=uri)


def test_deferred_run_starts_when_the_stage_did_and_holds_params_and_tags(store):
    import mlflow

    before = int(time.time() * 1000)
    with tracking.deferred_stage_run(store, "transfer-x", {"train": {"lr": 0.1}}, "abc", {"model": "x"}) as deferred:
        time.sleep(0.3)  # the Ray Train job
        run = deferred.open()
        mlflow.log_metric("clean_acc", 0.9)
    got = mlflow.MlflowClient().get_run(run.info.run_id)
    assert got.info.status == "FINISHED"
    assert before <= got.info.start_time <= before + 250  # when the stage began, not after its job
    assert got.data.params == {"train.lr": "0.1"} and got.data.metrics == {"clean_acc": 0.9}
    assert got.data.tags["stage"] == "transfer-x" and got.data.tags["model"] == "x" and got.data.tags["data_hash"] == "abc"
    assert mlflow.active_run() is None


def test_a_job_that_fails_is_recorded_as_a_failed_run(store):
    import mlflow

    with pytest.raises(RuntimeError, match="worker died"):
        with tracking.deferred_stage_run(store, "pretrain-y", {"objective": "cartl"}, "abc"):
            raise RuntimeError("worker died")
    [failed] = mlflow.search_runs(experiment_names=["deferred"], output_format="list")
    assert failed.info.status == "FAILED" and failed.info.run_name == "pretrain-y"
    assert failed.data.params == {"objective": "cartl"}
    assert mlflow.active_run() is None


def test_an_unreachable_tracking_server_stops_the_stage_before_its_job(monkeypatch):
    from robust_transfer.config import ConfigError

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    cfg = MlflowConfig(experiment="x")
    with pytest.raises(ConfigError, match="is not reachable"):
        with tracking.deferred_stage_run(cfg, "transfer-x", {}, ""):
            pytest.fail("the job ran")
