"""Benchmark: training throughput of pipelines/cifar100-to-cifar10's pretrain stage on a GPU.

The real stage (`python -m stages.prepare` then `python -m stages.pretrain robust`: WRN-28-10,
PGD-7 adversarial training, Linf 8/255) with the pipeline's own params, changed only in length
(`--epochs`, `--images`) and in the number of workers (the GPUs this machine has). Images are
CIFAR-shaped noise written in CIFAR's own file format: throughput does not depend on the pixels,
and the machine needs no network. Reported: training images per second (the stage's own
train_seconds, which exclude Ray's start-up and the evaluation), per GPU and in all, and the
forward-backward passes per second (PGD-7 training costs 8 per image), with and without `amp`.

    python -m benchmarks.cifar_pretrain_throughput              # on a GPU machine: a few minutes
    python -m benchmarks.cifar_pretrain_throughput --cpu --width 1 --images 256 --epochs 1   # a CPU smoke run

Results: benchmarks/results/cifar_pretrain_throughput.json (and a line for benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from benchmarks.common import ROOT, log, machine, write_result

PIPELINE = ROOT / "pipelines" / "cifar100-to-cifar10"


def write_noise_cifar(root: Path, train_per_class: int, test_per_class: int, seed: int = 0) -> None:
    """cifar-100-python/{train,test,meta} and cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}."""
    rng = np.random.default_rng(seed)

    def flat(n):
        return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)

    c100 = root / "cifar-100-python"
    c100.mkdir(parents=True, exist_ok=True)
    with open(c100 / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f, protocol=2)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(100), n)
        with open(c100 / split, "wb") as f:
            pickle.dump({"data": flat(len(labels)), "fine_labels": labels.tolist()}, f, protocol=2)
    c10 = root / "cifar-10-batches-py"
    c10.mkdir(parents=True, exist_ok=True)
    with open(c10 / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"k{i}" for i in range(10)]}, f, protocol=2)
    for i in range(1, 6):
        labels = np.repeat(np.arange(10), 2)
        with open(c10 / f"data_batch_{i}", "wb") as f:
            pickle.dump({"data": flat(len(labels)), "labels": labels.tolist()}, f, protocol=2)
    labels = np.repeat(np.arange(10), 2)
    with open(c10 / "test_batch", "wb") as f:
        pickle.dump({"data": flat(len(labels)), "labels": labels.tolist()}, f, protocol=2)


def params_for(data_root: Path, images: int, epochs: int, workers: int, use_gpu: bool, amp: bool, width: int,
               batch_size: int) -> dict:
    p = yaml.safe_load((PIPELINE / "params.yaml").read_text())
    p["data"].update(root=str(data_root), target_root=str(data_root), shots=10, val_shots=2,
                     source_train_size=images, source_test_size=200)
    p["ray"].update(num_workers=workers, use_gpu=use_gpu, cpus_per_worker=max(1, min(4, (os.cpu_count() or 2)
                                                                                     // max(workers, 1))))
    p["pretrain"]["train"].update(epochs=epochs, amp=amp, width=width, batch_size=batch_size)
    p["mlflow"]["experiment"] = "bench-cifar-throughput"
    return p


def run_stage(folder: Path, env: dict, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", *args, "--params", "params.yaml"], cwd=folder, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")


def measure(folder: Path, env: dict, params: dict, label: str) -> dict:
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stale in ("metrics", "models", "plots"):
        subprocess.run(["rm", "-rf", str(folder / stale)])
    start = time.perf_counter()
    run_stage(folder, env, "stages.pretrain", "robust")
    wall = time.perf_counter() - start
    m = json.loads((folder / "metrics" / "pretrain_robust.json").read_text())
    import csv

    rows = list(csv.DictReader((folder / "plots" / "pretrain_robust.csv").open()))
    epochs = [float(r["epoch_seconds"]) for r in rows if r.get("epoch_seconds")]
    images = params["data"]["source_train_size"]
    workers = params["ray"]["num_workers"]
    # the first epoch includes CUDA warm-up (cudnn autotune, allocator)
    steady = epochs[1:] or epochs
    out = {
        "label": label, "amp": params["pretrain"]["train"]["amp"], "workers": workers,
        "batch_per_worker": params["pretrain"]["train"]["batch_size"], "images": images, "epochs": len(epochs),
        "train_seconds": round(m["train_seconds"], 2), "stage_wall_seconds": round(wall, 1),
        "epoch_seconds": [round(e, 2) for e in epochs],
        # the training loop's own seconds (no validation, no Ray start-up), first epoch's warm-up included
        "images_per_s": round(images * len(epochs) / m["train_seconds"], 1),
        # epochs after the first, their validation pass included
        "images_per_s_steady_epochs": round(images / (sum(steady) / len(steady)), 1),
        "passes_per_s": round(m["train_passes"] / m["train_seconds"], 1),
        "clean_acc": m["clean_acc"], "pgd_acc": m["pgd_acc"],
    }
    out["images_per_s_per_worker"] = round(out["images_per_s"] / workers, 1)
    log(f"[cifar] {label}: {out['images_per_s']} images/s ({out['images_per_s_per_worker']} per worker), "
        f"epochs {out['epoch_seconds']} s, stage {wall:.0f}s")
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=5120, help="CIFAR-100 training images per epoch")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--width", type=int, default=10)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[128],
                    help="per worker; 128: one GPU at the papers' batch (the params' 16 is per worker of 8)")
    ap.add_argument("--no-fp32", action="store_true", help="skip the amp: false comparison")
    ap.add_argument("--cpu", action="store_true", help="no GPU: a smoke run of the benchmark itself")
    args = ap.parse_args(argv)
    import torch

    use_gpu = not args.cpu
    workers = max(1, torch.cuda.device_count()) if use_gpu else 1
    if use_gpu and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA GPU visible (use --cpu for a smoke run)")
    with tempfile.TemporaryDirectory(prefix="bench-cifar-") as tmp:
        tmp = Path(tmp)
        per_class = max(1, -(-args.images // 100))
        write_noise_cifar(tmp / "datasets", per_class, 2)
        folder = tmp / "project"
        folder.mkdir()
        rt_tmp = Path(tempfile.mkdtemp(prefix="bcrt-", dir="/tmp"))  # a private shared Ray head (short socket paths)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
        env.update(PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlflow.db'}", TMPDIR=str(rt_tmp),
                   RT_RAY_IDLE_S="60", PYTHONUNBUFFERED="1")
        base = params_for(tmp / "datasets", args.images, args.epochs, workers, use_gpu, True, args.width,
                          args.batch_sizes[0])
        (folder / "params.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
        run_stage(folder, env, "stages.prepare")
        results = []
        for bs in args.batch_sizes:
            for amp in ([True] if args.no_fp32 or not use_gpu else [True, False]):
                p = params_for(tmp / "datasets", args.images, args.epochs, workers, use_gpu, amp, args.width, bs)
                results.append(measure(folder, env, p, f"batch {bs}/worker, {'bf16 amp' if amp else 'fp32'}"))
        subprocess.run([sys.executable, "-m", "robust_transfer.runtime", "stop"], env=env, capture_output=True)
    result = {"machine": machine(), "workers": workers, "arch": f"wide_resnet width {args.width} (WRN-28-{args.width})",
              "objective": "pgd_at, PGD-7, Linf 8/255", "results": results}
    path = write_result("cifar_pretrain_throughput", result)
    log(f"[cifar] wrote {path}")
    for r in results:
        print(f"| {result['machine'].get('gpu', 'cpu')} x{workers} | WRN-28-{args.width} PGD-7 AT | {r['label']} | "
              f"{r['images_per_s']:.0f} | {r['images_per_s_per_worker']:.0f} |")
    return result


if __name__ == "__main__":
    main()
