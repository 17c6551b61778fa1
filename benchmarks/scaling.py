"""Benchmarks 4 and 5: how training cost grows with the data and the model width, and with workers.

4. Pretrain (the default robust source: FGSM-RS, small CNN) through the Ray Train engine at 1x, 2x
   and 4x the default source data (12,000 images; beyond the 30,000 the five classes have, images
   repeat) and at widths 1 and 2: seconds per epoch (the second epoch: the first warms up), per
   image, and the exponent of a power law fitted to the data points (1.0: linear). `--pipeline`
   also times the whole default pipeline at 0.5x, 1x and 2x its source data (what the dataset has),
   each a clean `dvc repro` in a temporary copy (tens of minutes).
5. Workers: the same job with 1 worker x 2 CPUs and 2 workers x 1 CPU (DDP over gloo) on the same
   two cores, and 1 GPU worker when there is one. Each worker takes `batch_size` images a step, so
   two workers take twice the images per optimiser step; an epoch is the same images either way.
   Efficiency = epoch time with 1 worker / epoch time with 2 (1.0: no loss from distributing).
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

from benchmarks.common import log, machine, pretrain_job, private_ray, task_tables, write_result
from benchmarks.engine_overhead import engine_run

BASE_IMAGES = 12000


def _epoch_seconds(job: dict, workdir: Path, threads: int, num_workers: int = 1, use_gpu: bool = False) -> dict:
    eng = engine_run(job, threads, workdir / "ray", num_workers=num_workers, use_gpu=use_gpu)
    last = eng["epochs"][-1]
    return {"epoch_s": round(last["epoch_s"], 3), "steps_s": round(last["steps_s"], 3),
            "epochs": eng["epochs"], "fit_s": round(eng["fit_s"], 2)}


def _power_law(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x: cost ~ data^slope."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def data_and_width(workdir: Path, threads: int, base: int, scales=(1, 2, 4), widths=(1, 2)) -> dict:
    rows = []
    for width in widths:
        for scale in (scales if width == widths[0] else scales[:1]):
            n = base * scale
            job = pretrain_job(task_tables(workdir, n), "fgsm_rs", 2, name=f"scale-{n}-w{width}", width=width)
            log(f"[scaling] pretrain fgsm_rs, {n} images, width {width}")
            r = _epoch_seconds(job, workdir, threads)
            rows.append({"images": n, "width": width, "epoch_s": r["epoch_s"], "steps_s": r["steps_s"],
                         "ms_per_image": round(1000 * r["steps_s"] / n, 3), "fit_s": r["fit_s"]})
            log(f"[scaling] {n} images, width {width}: epoch {r['epoch_s']:.1f}s ({rows[-1]['ms_per_image']} ms/image)")
    w1 = [r for r in rows if r["width"] == widths[0]]
    exponent = _power_law([r["images"] for r in w1], [r["steps_s"] for r in w1])
    wide = [r for r in rows if r["width"] == widths[1]]
    width_cost = wide[0]["steps_s"] / w1[0]["steps_s"] if wide else None
    return {"rows": rows, "data_exponent": round(exponent, 3),
            "width_cost_ratio": round(width_cost, 3) if width_cost else None}


def workers(workdir: Path, n: int, use_gpu: bool = False) -> dict:
    job = pretrain_job(task_tables(workdir, n), "fgsm_rs", 2, name=f"workers-{n}")
    out = {}
    for label, num, threads in (("1x2cpu", 1, 2), ("2x1cpu", 2, 1)):
        log(f"[workers] {label}: {n} images")
        out[label] = _epoch_seconds(job, workdir, threads, num_workers=num)
    out["efficiency_2_workers"] = round(out["1x2cpu"]["epoch_s"] / out["2x1cpu"]["epoch_s"], 3)
    if use_gpu:
        out["1gpu"] = _epoch_seconds(job, workdir, 2, num_workers=1, use_gpu=True)
        out["gpu_speedup_vs_2cpu"] = round(out["1x2cpu"]["epoch_s"] / out["1gpu"]["epoch_s"], 3)
    log(f"[workers] epoch 1 worker {out['1x2cpu']['epoch_s']:.1f}s, 2 workers {out['2x1cpu']['epoch_s']:.1f}s: "
        f"efficiency {out['efficiency_2_workers']:.2f}")
    return out


def pipeline_scaling(scales=(0.5, 1, 2)) -> dict:
    """The default pipeline, clean, at a few source-data sizes (each a full `dvc repro`)."""
    import yaml

    from benchmarks.project import copy_project, private_runtime, repro

    rows = []
    for scale in scales:
        with tempfile.TemporaryDirectory(prefix="bench-pipe-") as tmp, private_runtime() as env:
            root = copy_project(Path(tmp) / "project")
            params = yaml.safe_load((root / "params.yaml").read_text())
            params["data"]["source_train_size"] = int(BASE_IMAGES * scale)
            (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            out = repro(root, None, env, sample_memory=False)
            rows.append({"scale": scale, "source_train_size": int(BASE_IMAGES * scale), "wall_s": out["wall_s"]})
            log(f"[scaling] default pipeline at {scale}x data: {out['wall_s']:.0f}s")
    return {"rows": rows, "data_exponent": round(_power_law([r["scale"] for r in rows], [r["wall_s"] for r in rows]), 3)}


def run(quick: bool = False, device: str = "cpu", threads: int = 2, pipeline: bool = False) -> dict:
    started = machine()  # the load average as the benchmark starts
    private_ray()
    gpu = device != "cpu"
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        work = Path(tmp)
        base = 2000 if quick else BASE_IMAGES
        result = {"quick": quick, "machine": started, "base_images": base,
                  "data_and_width": data_and_width(work, threads, base),
                  "workers": workers(work, base, use_gpu=gpu)}
    if pipeline:
        result["pipeline"] = pipeline_scaling()
    result["summary"] = {"pretrain_data_exponent": result["data_and_width"]["data_exponent"],
                         "pretrain_width2_cost_ratio": result["data_and_width"]["width_cost_ratio"],
                         "two_worker_efficiency": result["workers"]["efficiency_2_workers"]}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2,000 images as 1x: checks the benchmark runs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pipeline", action="store_true", help="also time the whole default pipeline at 3 data sizes")
    args = p.parse_args()
    res = run(quick=args.quick, device=args.device, threads=args.threads, pipeline=args.pipeline)
    write_result("scaling" if args.device == "cpu" else f"scaling_{args.device}", res)
    print(json.dumps(res["summary"]))


if __name__ == "__main__":
    main()
