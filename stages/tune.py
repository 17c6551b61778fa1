"""tune: Ray Tune over the regularisation weights of the transfer models named in tune.models.

outs: tuned.yaml (every transfer model -> its chosen options, {} when not tuned; the transfer stage
applies them over params), tune/trials.parquet (one row per trial), metrics/tune.json (the choice per
model), plots/tune.png (validation clean vs PGD accuracy of every trial, Pareto front marked).
Each trial trains the transfer stage's own job on target_fit and is scored on target_val (never the
test set); each is an MLflow run nested under this stage's run. See robust_transfer/tuning.py.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import mlflow
import pyarrow.parquet as pq

from robust_transfer import engine, tracking, tuning
from robust_transfer.config import MlflowConfig, RayConfig, load_section, transfer_entries, tune_entries
from robust_transfer.data import write_json, write_table
from stages._common import run
from stages.transfer import TUNED, transfer_job

TRIALS = Path("tune/trials.parquet")
METRICS = Path("metrics/tune.json")
PLOT = Path("plots/tune.png")


def main(args, params) -> None:
    cfg, space = tune_entries(params)
    ray_cfg = load_section(RayConfig, params, "ray")
    ml_cfg = load_section(MlflowConfig, params, "mlflow")
    models = list(transfer_entries(params))
    jobs = {m: transfer_job(m, params, train_table="target_fit") for m in space}  # every input checked first
    data_hash = next(iter(jobs.values()))[1]["card"]["data_hash"] if jobs else ""
    run_params = {"tune": dataclasses.asdict(cfg), "ray": dataclasses.asdict(ray_cfg)}
    n_val = min(pq.ParquetFile("data/target_val.parquet").metadata.num_rows, engine.VAL_PGD_IMAGES)
    start = time.perf_counter()
    rows, choices, summary = [], {}, {}
    with tracking.stage_run(ml_cfg, "tune", run_params, data_hash, {"models": ",".join(space)}) as parent:
        if space:
            engine.connect(dataclasses.replace(ray_cfg, num_workers=cfg.workers_per_trial,
                                               cpus_per_worker=cfg.cpus_per_worker))
        storage = engine.storage_path(ray_cfg, Path(".checkpoints"))
        for model, (job, info) in jobs.items():
            t0 = time.perf_counter()
            trial_tags = {"pipeline": tracking.pipeline_name(), "stage": "tune-trial", "model": model,
                          "method": info["method"], "data_hash": data_hash}
            callback = tuning.mlflow_callback(tracking.tracking_uri(ml_cfg), ml_cfg.experiment,
                                              parent.info.run_id, trial_tags)
            model_rows = tuning.search(model, job, space[model], cfg, ray_cfg, storage, [callback])
            _attach_run_ids(model_rows, parent.info.run_id)
            pick, why = tuning.choose(model_rows, cfg, n_val)
            base = next((r for r in model_rows if r["baseline"]), None)
            choices[model] = dict(pick["options"]) if pick else {}
            summary[model] = _summary(model_rows, pick, base, why, time.perf_counter() - t0)
            print(f"tune {model}: chose {_fmt(choices[model])} ({why}); val clean "
                  f"{_acc(pick, 'val_clean_acc')} PGD {_acc(pick, 'val_pgd_acc')}, params' "
                  f"{_fmt(base['options'] if base else {})}: clean {_acc(base, 'val_clean_acc')} "
                  f"PGD {_acc(base, 'val_pgd_acc')}")
            for r in model_rows:
                if r["error"]:
                    print(f"tune {model}: trial {_fmt(r['options'])} failed, also on its {ray_cfg.max_failures} retries: {r['error']}")
            rows += model_rows
        seconds = time.perf_counter() - start
        metrics = {"seconds": round(seconds, 1), "trials": len(rows), "models": summary}
        mlflow.log_metric("tune_seconds", seconds)
        for model, options in choices.items():
            mlflow.log_params({f"chosen.{model}.{k}": v for k, v in options.items()})
        for path in (TRIALS, METRICS, PLOT):
            path.parent.mkdir(parents=True, exist_ok=True)
        write_table(tuning.trial_table(rows), TRIALS)
        tuning.plot_trials(rows, {m: _pick(rows, m, choices[m]) for m in choices}, cfg.clean_floor, PLOT)
        write_json(metrics, METRICS)
        tuning.write_tuned(choices, models, TUNED)
        for path in (TUNED, METRICS, PLOT):
            mlflow.log_artifact(str(path), artifact_path="tune")
    print(f"tune: {len(rows)} trials of {len(space)} model(s) in {seconds:.0f}s -> {TUNED}")


def _attach_run_ids(rows: list[dict], parent_run_id: str) -> None:
    """Each trial's MLflow run id (Ray's logger names runs by trial; find them under the parent)."""
    runs = mlflow.search_runs(filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                              search_all_experiments=True, output_format="list")
    by_name = {r.data.tags.get("trial_name"): r.info.run_id for r in runs}
    for r in rows:
        r["mlflow_run_id"] = by_name.get(f"{r['model']}_{r['trial_id']}")


def _summary(rows, pick, base, why, seconds) -> dict:
    front = tuning.pareto_front([(r["val_clean_acc"], r["val_pgd_acc"]) for r in rows if r["status"] == "completed"])
    return {
        "chosen": dict(pick["options"]) if pick else {},
        "val_clean_acc": pick["val_clean_acc"] if pick else None,
        "val_pgd_acc": pick["val_pgd_acc"] if pick else None,
        "params_value": dict(base["options"]) if base else {},
        "params_val_clean_acc": base["val_clean_acc"] if base else None,
        "params_val_pgd_acc": base["val_pgd_acc"] if base else None,
        "trials": len(rows),
        "completed": sum(r["status"] == "completed" for r in rows),
        "stopped_early": sum(r["status"] == "stopped" for r in rows),
        "failed": sum(r["status"] == "error" for r in rows),
        "pareto_front": int(sum(front)),
        "nodes": len({r["node_id"] for r in rows if r["node_id"]}),
        "reason": why,
        "seconds": round(seconds, 1),
    }


def _pick(rows, model, options):
    return next((r for r in rows if r["model"] == model and r["options"] == options), None)


def _fmt(options: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in options.items()) or "-"


def _acc(row, key) -> str:
    return f"{row[key]:.3f}" if row and row.get(key) is not None else "-"


if __name__ == "__main__":
    run(main)
