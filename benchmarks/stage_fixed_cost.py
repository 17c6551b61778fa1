"""Benchmark 2: a stage's fixed cost, from process start to its first training step and to exit.

The stage is the real pretrain stage (`stages.pretrain.main`) on a trivial job: the smoke
pipeline's digits data, one epoch of natural training. It runs in a child process (a probe) that
times its phases: interpreter and imports, `engine.connect` (Ray), Ray Train's start-up until the
worker enters the training loop, the first step, the end of `fit`, the stage's own work after it
(evaluation, MLflow, outputs) and the exit. Each Ray mode a stage can meet is measured:

- shared_cold: the first stage of a `dvc repro` starts the shared local runtime (runtime.py);
- shared_warm: a later stage joins it (the common case: the headline number);
- private: RT_LOCAL_RAY=off, a Ray instance per process (full mode only).

The shared runtime here is the benchmark's own (a private TMPDIR keys it), so neither another
pipeline's head nor its queued jobs are involved, and it is stopped at the end. Goal: <= 10 s.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import ROOT, log, machine, median, write_result


def _project(folder: Path) -> Path:
    """A tiny project: the smoke params with one natural source trained for one epoch, prepared."""
    import yaml

    params = yaml.safe_load((ROOT / "pipelines" / "smoke" / "params.yaml").read_text())
    params["pretrain"]["sources"]["natural"] = {"objective": "natural", "epochs": 1}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([sys.executable, "-m", "stages.prepare", "--params", "params.yaml"], cwd=folder,
                   env=_env(folder), check=True, capture_output=True)
    return folder


def _env(folder: Path, tmpdir: Path | None = None, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RT_LOCAL_RAY")}
    env.update(PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlflow.db'}", PYTHONUNBUFFERED="1",
               **extra)
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)  # keys runtime.py's shared head (and Ray's session folder) to this benchmark
    return env


def probe_once(folder: Path, env: dict) -> dict:
    """Run the probe child; returns its phase timestamps, relative to the moment it was started."""
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.stage_fixed_cost", "--probe", str(folder)],
                          cwd=folder, env={**env, "BENCH_T0": repr(t0)}, capture_output=True, text=True)
    t_exit = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"stage probe failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    marks = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1])
    marks["exit"] = t_exit
    return marks


# ----------------------------------------------------------------------------- the probe (child)
def _probe(folder: str) -> None:
    t0 = float(os.environ["BENCH_T0"])
    marks = {"interpreter": time.time() - t0}
    import argparse as _argparse

    from robust_transfer import engine
    from robust_transfer.config import load_all
    from stages import pretrain

    marks["imports"] = time.time() - t0
    from benchmarks.common import pickle_by_value
    from benchmarks.engine_overhead import instrumented_loop

    pickle_by_value()
    rec_path = Path(folder) / f"probe-{os.getpid()}"
    connect = engine.connect

    def timed_connect(*args, **kwargs):
        marks["connect_start"] = time.time() - t0
        connect(*args, **kwargs)
        marks["connected"] = time.time() - t0
    engine.connect = timed_connect
    engine.train_loop_per_worker = instrumented_loop
    fit = engine.fit

    def timed_fit(job, *args, **kwargs):
        result = fit(dict(job, bench_out=str(rec_path)), *args, **kwargs)
        marks["fit_returned"] = time.time() - t0
        return result
    engine.fit = timed_fit
    params = load_all(Path(folder) / "params.yaml")
    pretrain.main(_argparse.Namespace(source="natural", params="params.yaml"), params)
    marks["stage_done"] = time.time() - t0
    rec = json.loads(Path(f"{rec_path}.rank0").read_text())
    marks["worker_entered"] = rec["entry_wall"] - t0
    marks["first_step"] = rec["first_step_wall"] - t0
    print(json.dumps(marks), flush=True)


# ----------------------------------------------------------------------------- benchmark
PHASES = [("interpreter", "python start"), ("imports", "imports (torch, ray, mlflow, stage)"),
          ("connect_start", "params, data check, MLflow run"), ("connected", "engine.connect (Ray)"),
          ("worker_entered", "Ray Train start until the worker runs"), ("first_step", "plan built, first step"),
          ("fit_returned", "training and Ray Train tear-down"), ("stage_done", "evaluation, MLflow, outputs"),
          ("exit", "interpreter exit")]


def _phases(marks: dict) -> dict:
    out, prev = {}, 0.0
    for key, _ in PHASES:
        out[key] = round(marks[key] - prev, 3)
        prev = marks[key]
    return out


def run(quick: bool = True, reps: int | None = None) -> dict:
    started = machine()  # the load average as the benchmark starts
    reps = reps or (1 if quick else 3)
    modes = ["shared_cold", "shared_warm"] + ([] if quick else ["private"])
    results = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="bench-stage-") as tmp:
        folder = _project(Path(tmp) / "project")
        # A short private temp folder: Ray's socket paths must stay under 108 characters.
        rt_tmp = Path(tempfile.mkdtemp(prefix="b8rt-", dir="/tmp"))
        try:
            for r in range(reps):
                for mode in modes:
                    if mode == "shared_cold":
                        _stop_shared(folder, rt_tmp)
                    extra = {"RT_LOCAL_RAY": "off"} if mode == "private" else {"RT_RAY_IDLE_S": "120"}
                    log(f"[stage] {mode} (round {r + 1}/{reps})")
                    marks = probe_once(folder, _env(folder, rt_tmp, **extra))
                    results[mode].append(marks)
                    log(f"[stage] {mode}: first step at {marks['first_step']:.1f}s, exit at {marks['exit']:.1f}s: "
                        + ", ".join(f"{k} {v:.1f}" for k, v in _phases(marks).items()))
        finally:
            _stop_shared(folder, rt_tmp)
            shutil.rmtree(rt_tmp, ignore_errors=True)
    table = {m: {"first_step_s": round(median(x["first_step"] for x in rs), 2),
                 "exit_s": round(median(x["exit"] for x in rs), 2),
                 "phases_s": {k: round(median(_phases(x)[k] for x in rs), 2) for k, _ in PHASES}}
             for m, rs in results.items()}
    summary = {"stage_fixed_seconds": table["shared_warm"]["first_step_s"],
               "stage_fixed_seconds_cold": table["shared_cold"]["first_step_s"],
               "stage_exit_seconds": table["shared_warm"]["exit_s"]}
    return {"quick": quick, "machine": started, "phases": dict(PHASES), "modes": table, "runs": results,
            "summary": summary, "goal": "first step <= 10 s after process start"}


def _stop_shared(folder: Path, rt_tmp: Path) -> None:
    """Stop the benchmark's own shared head (only that one: its state lives under rt_tmp)."""
    subprocess.run([sys.executable, "-m", "robust_transfer.runtime", "stop"], cwd=folder, env=_env(folder, rt_tmp),
                   capture_output=True, timeout=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true")
    p.add_argument("--reps", type=int)
    p.add_argument("--probe", help=argparse.SUPPRESS)  # internal: the child that runs the stage
    args = p.parse_args()
    if args.probe:
        return _probe(args.probe)
    res = run(quick=not args.full, reps=args.reps)
    write_result("stage_fixed_cost", res)
    print(json.dumps(res["summary"]))


if __name__ == "__main__":
    main()
