"""Benchmark 1: one epoch of adversarial training through the Ray Train engine vs a bare PyTorch loop.

Same model (small CNN), same data (the default source task: Fashion-MNIST classes 0-4), same
objective function (robust_transfer.objectives: PGD-AT, FGSM-RS), same optimiser and schedule,
same torch thread count. The bare loop does nothing but the training steps; the engine's epoch is
timed inside its worker from the start of one epoch to the end of its checkpoint report, so it
includes everything the engine adds per epoch: per-step bookkeeping, the fast-AT guard, the
validation pass and the checkpoint. The engine's fixed start-up cost is benchmark 2.

Order: bare epochs, the engine's epochs, bare epochs again; the ratio is the median engine epoch
over the median bare epoch (first epoch of each dropped: warm-up). The goal is <= 1.05.
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks.common import (log, machine, median, pickle_by_value, pretrain_job, private_ray, ratio,
                               task_tables, write_result)

DEFAULT_TRAIN_IMAGES = 12000  # params.yaml: data.source_train_size


# ----------------------------------------------------------------------------- worker side
def instrumented_loop(job: dict) -> None:
    """engine.train_loop_per_worker, with timers around the engine's per-epoch extras; the timings
    go to the file job['bench_out'] (one per rank)."""
    import time as _time

    import ray.train

    from robust_transfer import engine

    rank = ray.train.get_context().get_world_rank()
    rec = {"entry_wall": _time.time(), "loop_start": None, "loop_start_cpu": None, "first_step_wall": None,
           "calls": {"validate": [], "guard": [], "report": []}, "report_end_cpu": []}
    saved = {}

    def patch(attr: str, key: str) -> None:
        fn = saved[attr] = getattr(engine, attr)

        def timed(*args, **kwargs):
            t0 = _time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                rec["calls"][key].append((t0, _time.perf_counter()))
                if key == "report":
                    rec["report_end_cpu"].append(_time.process_time())
        setattr(engine, attr, timed)

    patch("_validate", "validate")
    patch("_guard_tripped", "guard")
    patch("_report", "report")
    progress = saved["_progress"] = engine._progress

    def progress_marking_start(*args, **kwargs):  # called right before the epoch loop
        rec["loop_start"], rec["loop_start_cpu"] = _time.perf_counter(), _time.process_time()
        return progress(*args, **kwargs)
    engine._progress = progress_marking_start
    forward = saved["forward"] = engine.TrainModule.forward

    def forward_marking_first(self, batch):
        if rec["first_step_wall"] is None:
            rec["first_step_wall"] = _time.time()
        return forward(self, batch)
    engine.TrainModule.forward = forward_marking_first
    try:
        engine.train_loop_per_worker(job)
    finally:
        engine.TrainModule.forward = saved.pop("forward")
        for attr, fn in saved.items():
            setattr(engine, attr, fn)
        Path(f"{job['bench_out']}.rank{rank}").write_text(json.dumps(rec))


def _epoch_breakdown(rec: dict) -> list[dict]:
    """Per epoch: wall seconds from its start to the end of its report (and the worker's CPU seconds),
    and the part of it spent in validation, the guard and the checkpoint report (steps: the rest)."""
    ends = [end for _, end in rec["calls"]["report"]]
    starts = [rec["loop_start"]] + ends[:-1]
    cpu = [rec["loop_start_cpu"]] + rec["report_end_cpu"]
    rows = []
    for i, (start, end) in enumerate(zip(starts, ends)):
        row = {"epoch_s": end - start, "cpu_s": cpu[i + 1] - cpu[i]}
        for key, calls in rec["calls"].items():
            row[f"{key}_s"] = sum(b - a for a, b in calls if a >= start and b <= end)
        row["steps_s"] = row["epoch_s"] - row["validate_s"] - row["guard_s"] - row["report_s"]
        rows.append(row)
    return rows


def engine_run(job: dict, threads: int, storage: Path, num_workers: int = 1, use_gpu: bool = False) -> dict:
    """Run `job` through engine.fit with the instrumented loop; return the per-epoch breakdown."""
    from robust_transfer import engine
    from robust_transfer.config import RayConfig

    pickle_by_value()
    out = storage / f"timings-{uuid.uuid4().hex[:8]}"
    job = dict(job, bench_out=str(out))  # also makes the job (and its run name) unique: no resume
    ray_cfg = RayConfig(num_workers=num_workers, use_gpu=use_gpu, cpus_per_worker=threads, max_failures=0)
    original = engine.train_loop_per_worker
    engine.train_loop_per_worker = instrumented_loop
    t0 = time.perf_counter()
    try:
        result = engine.fit(job, ray_cfg, storage, job["name"])
    finally:
        engine.train_loop_per_worker = original
    fit_s = time.perf_counter() - t0
    rec = json.loads(Path(f"{out}.rank0").read_text())
    return {"epochs": _epoch_breakdown(rec), "fit_s": fit_s, "train_seconds": result.seconds,
            "history": result.history, "record": rec}


# ----------------------------------------------------------------------------- bare loop
class BareLoop:
    """The same plan (network, objective, data, optimiser, schedule) trained by a plain loop."""

    def __init__(self, job: dict, total_epochs: int, threads: int, device: str = "cpu"):
        import torch

        from robust_transfer import engine
        from robust_transfer.methods import build_plan

        torch.set_num_threads(threads)
        job = dict(job, train=dict(job["train"], epochs=total_epochs))  # the schedule spans every bare epoch
        self.plan = build_plan(job, device)
        cfg = self.plan.train_cfg
        torch.manual_seed(cfg.seed)
        self.module = engine.TrainModule(self.plan).to(device)
        self.opt = engine._optimizer(list(self.plan.params), cfg)
        self.n = len(self.plan.train["y"])
        self.steps = math.ceil(self.n / cfg.batch_size)
        self.sched = engine._schedule(self.opt, cfg, self.steps)
        self.data = {k: v.to(device) for k, v in self.plan.train.items()}
        self.batch_size, self.device = cfg.batch_size, device

    def epoch(self) -> float:
        import torch

        t0 = time.perf_counter()
        self.module.train()
        order = torch.randperm(self.n, device=self.device)
        for i in range(self.steps):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            loss, _, _ = self.module({k: v[idx] for k, v in self.data.items()})
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
        if self.device != "cpu":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


# ----------------------------------------------------------------------------- benchmark
def bare_epochs(job: dict, epochs: int, threads: int, device: str = "cpu") -> list[dict]:
    """A warm-up epoch, then `epochs` timed ones of the bare loop, in a child process of its own
    session. Why a child: Linux's autogroup scheduler shares the CPU between sessions, and Ray starts
    its workers in sessions of their own; on a busy machine a loop in the benchmark's own session
    would get a smaller share than the engine's worker and the ratio would flatter the engine."""
    import subprocess
    import sys

    from benchmarks.common import ROOT

    arg = json.dumps({"job": job, "epochs": epochs, "threads": threads, "device": device})
    out = subprocess.run([sys.executable, "-m", "benchmarks.engine_overhead", "--bare", arg], cwd=ROOT,
                         capture_output=True, text=True, start_new_session=True)
    if out.returncode != 0:
        raise RuntimeError(f"bare loop failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _bare_main(arg: str) -> None:
    spec = json.loads(arg)
    loop = BareLoop(spec["job"], 1 + spec["epochs"], spec["threads"], spec["device"])
    loop.epoch()  # warm-up
    rows = []
    for _ in range(spec["epochs"]):
        c0 = time.process_time()
        rows.append({"epoch_s": loop.epoch(), "cpu_s": time.process_time() - c0})
    print(json.dumps(rows))


def compare(objective: str, n_train: int, engine_epochs: int, bare_per_block: int, threads: int, workdir: Path,
            device: str = "cpu") -> dict:
    paths = task_tables(workdir, n_train)
    job = pretrain_job(paths, objective, engine_epochs, name=f"bench-{objective}")
    log(f"[engine] {objective}: {n_train} images, {threads} threads: bare loop")
    bare = bare_epochs(job, bare_per_block, threads, device)
    log(f"[engine] {objective}: bare {[round(b['epoch_s'], 2) for b in bare]}s; engine, {engine_epochs} epochs")
    eng = engine_run(job, threads, workdir / "ray", use_gpu=device != "cpu")
    bare += bare_epochs(job, bare_per_block, threads, device)
    epochs = eng["epochs"][1:] if len(eng["epochs"]) > 1 else eng["epochs"]  # the first one warms up
    med = {key: median(e[key] for e in epochs) for key in epochs[0]}
    bare_med, bare_cpu = median(b["epoch_s"] for b in bare), median(b["cpu_s"] for b in bare)
    # The same per-epoch extras spread over the default epoch (12,000 images): the validation and
    # checkpoint cost per epoch does not grow with the data, the steps (and the guard) do.
    scale = DEFAULT_TRAIN_IMAGES / n_train
    fixed = med["validate_s"] + med["report_s"]
    projected = ratio((med["steps_s"] + med["guard_s"]) * scale + fixed, bare_med * scale)
    out = {
        "objective": objective, "train_images": n_train, "threads": threads, "device": device,
        "bare_epochs": bare, "engine_epochs": eng["epochs"], "engine_fit_s": round(eng["fit_s"], 2),
        "engine_epoch_s_median": round(med["epoch_s"], 3), "bare_epoch_s_median": round(bare_med, 3),
        "ratio": ratio(med["epoch_s"], bare_med),
        "steps_ratio": ratio(med["steps_s"], bare_med),
        "cpu_ratio": ratio(med["cpu_s"], bare_cpu),
        "per_epoch_extras_s": {k: round(med[f"{k}_s"], 3) for k in ("validate", "guard", "report")},
        "ratio_projected_default_epoch": projected,
    }
    log(f"[engine] {objective}: engine epoch {med['epoch_s']:.2f}s (steps {med['steps_s']:.2f}, validate "
        f"{med['validate_s']:.2f}, guard {med['guard_s']:.2f}, report {med['report_s']:.2f}) vs bare "
        f"{bare_med:.2f}s: ratio {out['ratio']:.3f} (CPU time {out['cpu_ratio']:.3f}), steps only "
        f"{out['steps_ratio']:.3f}, projected to {DEFAULT_TRAIN_IMAGES} images {projected:.3f}")
    return out


def run(quick: bool = True, device: str = "cpu", threads: int = 2, workdir: Path | None = None) -> dict:
    private_ray()
    sizes = {"pgd_at": 1024, "fgsm_rs": 2048} if quick else {"pgd_at": 4096, "fgsm_rs": DEFAULT_TRAIN_IMAGES}
    if device != "cpu":
        sizes = {k: v * 4 for k, v in sizes.items()}
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        work = Path(workdir or tmp)
        results = {obj: compare(obj, n, engine_epochs=3, bare_per_block=2, threads=threads, workdir=work, device=device)
                   for obj, n in sizes.items()}
    summary = {"engine_overhead_ratio": results["pgd_at"]["ratio"],
               "engine_overhead_ratio_fgsm_rs": results["fgsm_rs"]["ratio"],
               "engine_overhead_ratio_projected_default_epoch": results["pgd_at"]["ratio_projected_default_epoch"]}
    return {"quick": quick, "machine": machine(), "results": results, "summary": summary, "goal": "ratio <= 1.05"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bare", help=argparse.SUPPRESS)  # internal: the bare loop's child process
    args = p.parse_args()
    if args.bare:
        return _bare_main(args.bare)
    res = run(quick=not args.full, device=args.device, threads=args.threads)
    name = "engine_overhead" if args.device == "cpu" else f"engine_overhead_{args.device}"
    write_result(name, res)
    print(json.dumps(res["summary"]))


if __name__ == "__main__":
    main()
