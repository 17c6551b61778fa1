"""The smoke pipeline end to end: a real `dvc repro` in a temporary copy (tests/conftest.py), then
its outputs, its MLflow runs and a no-op second repro."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import yaml

from conftest import BIN, project_env
from rt_testlib import run_group


def _params(pipeline: Path) -> dict:
    return yaml.safe_load((pipeline / "params.yaml").read_text())


def _prob(v) -> bool:
    return isinstance(v, float) and 0.0 <= v <= 1.0 and not math.isnan(v)


def test_prepare_writes_tables_and_a_card_that_matches_them(smoke_project):
    from robust_transfer.data import verify_card

    p = _params(smoke_project)["data"]
    card = json.loads((smoke_project / "data/card.json").read_text())
    tables = {t: smoke_project / "data" / f"{t}.parquet" for t in card["tables"]}
    assert {"source_train", "source_test", "target_train", "target_test"} <= set(tables)
    verify_card(smoke_project / "data/card.json", tables)  # hashes match the files
    target = card["tables"]["target_train"]
    assert set(target["counts"].values()) == {p["shots"]} and len(target["counts"]) == len(p["target_classes"])


def test_every_source_and_transfer_model_has_a_checkpoint_and_metrics(smoke_project):
    from robust_transfer.nets import load_model

    params = _params(smoke_project)
    for source in params["pretrain"]["sources"]:
        m = json.loads((smoke_project / f"metrics/pretrain_{source}.json").read_text())
        assert _prob(m["clean_acc"]) and _prob(m["pgd_acc"]) and m["pgd_acc"] <= m["clean_acc"] + 1e-9
        load_model(smoke_project / f"models/{source}.pt")
    for name, entry in params["transfer"]["models"].items():
        m = json.loads((smoke_project / f"metrics/transfer_{name}.json").read_text())
        assert m["method"] == entry["method"] and _prob(m["clean_acc"]) and _prob(m["pgd_acc"])
        assert m["train_seconds"] > 0 and m["train_passes"] > 0
        net, extra = load_model(smoke_project / f"models/{name}.pt")
        assert extra["method"] == entry["method"] and extra["run_id"]


def test_each_stage_is_an_mlflow_run_tagged_with_the_data_hash(smoke_project):
    import mlflow

    card = json.loads((smoke_project / "data/card.json").read_text())
    client = mlflow.MlflowClient(f"sqlite:///{smoke_project.parents[1] / 'mlflow.db'}")
    exp = client.get_experiment_by_name(_params(smoke_project)["mlflow"]["experiment"])
    runs = client.search_runs([exp.experiment_id], max_results=500)
    by_stage = {r.data.tags.get("stage"): r for r in runs}
    params = _params(smoke_project)
    expected = {"prepare"} | {f"pretrain-{s}" for s in params["pretrain"]["sources"]} | \
               {f"transfer-{m}" for m in params["transfer"]["models"]}
    assert expected <= set(by_stage), f"missing runs: {expected - set(by_stage)}"
    for stage in expected:
        run = by_stage[stage]
        assert run.info.status == "FINISHED" and run.data.tags["data_hash"] == card["data_hash"]
    robust = by_stage["pretrain-robust"]
    assert "val_pgd_acc" in robust.data.metrics  # per-epoch history was logged
    assert any(a.path == "checkpoint" for a in client.list_artifacts(robust.info.run_id))


def test_a_second_repro_with_nothing_changed_does_nothing(smoke_project):
    root = smoke_project.parents[1]
    proc = run_group([str(BIN / "dvc"), "repro", "pipelines/smoke/dvc.yaml"], 300, cwd=root, env=project_env(root))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Running stage" not in proc.stdout, proc.stdout[-2000:]
