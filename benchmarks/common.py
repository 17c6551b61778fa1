"""What every benchmark shares: timing, the real source task as tables, training jobs, results.

Timings on a shared machine are noisy, so every benchmark compares its contenders within one run,
alternating repetitions and taking medians; the ratios are what the benchmarks report.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else float("nan")


def machine() -> dict:
    """Where the numbers were taken: a ratio means little without the load it was measured under."""
    import torch

    info = {"host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
            "device": "cpu"}
    if torch.cuda.is_available():
        info["device"] = "cuda"
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_result(name: str, result: dict, out_dir: Optional[Path] = None) -> Path:
    """benchmarks/results/<name>.json (atomically), stamped with the time and the machine's load."""
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "load_avg_1m_at_end": round(os.getloadavg()[0], 2), **result}
    path = out_dir / f"{name}.json"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def alternate(contenders: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall seconds of each contender, run in turns (A B A B ...) so a load change hits all alike;
    the order flips every round so neither always runs first after a pause."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    times = {name: [] for name in names}
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - t0)
    return times


@contextlib.contextmanager
def env(**values: Optional[str]):
    """Set (or, with None, unset) environment variables for a block."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ----------------------------------------------------------------------------- data and jobs
def data_root(dataset: str = "fashion_mnist") -> Optional[str]:
    """Where the dataset is, when not where the prepare stage looks by default (a GPU machine)."""
    return os.environ.get("BENCH_FASHION_MNIST") if dataset == "fashion_mnist" else None


def task_tables(out_dir: Path, n_train: int, n_val: int = 500, dataset: str = "fashion_mnist") -> dict:
    """The default source task (Fashion-MNIST classes 0-4) as Parquet tables of `n_train` training
    and `n_val` validation images, as the prepare stage writes them. Beyond the images the dataset
    has, the training table repeats them (scaling benchmarks measure cost, not accuracy)."""
    import numpy as np

    from robust_transfer.config import DataConfig
    from robust_transfer.data import make_task_split, to_table, write_table

    out_dir = Path(out_dir)
    paths = {"train": out_dir / f"{dataset}_train_{n_train}.parquet", "val": out_dir / f"{dataset}_val_{n_val}.parquet"}
    if all(p.is_file() for p in paths.values()):
        return {k: str(v) for k, v in paths.items()}
    available = {"fashion_mnist": 30000, "digits": 900}.get(dataset, n_train)
    cfg = DataConfig(dataset=dataset, root=data_root(dataset), source_train_size=min(n_train, available),
                     source_test_size=n_val, shots=2, val_shots=1)
    split = make_task_split(cfg)
    images, labels, orig, names = split["source_train"]
    if len(labels) < n_train:
        reps = -(-n_train // len(labels))
        images, labels, orig = (np.concatenate([a] * reps)[:n_train] for a in (images, labels, orig))
    write_table(to_table(images, labels, orig, names), paths["train"])
    write_table(to_table(*split["source_test"]), paths["val"])
    return {k: str(v) for k, v in paths.items()}


def pretrain_job(paths: dict, objective: str, epochs: int, name: str = "bench", num_classes: int = 5,
                 **train: object) -> dict:
    """A pretrain job exactly as stages/pretrain.py builds it, with the default params' settings
    (threat model, optimiser, schedule) unless overridden."""
    from robust_transfer.config import ThreatConfig, TrainConfig, build, method_options

    cfg = build(TrainConfig, {"arch": "small_cnn", "width": 1, "batch_size": 128, "lr": 0.1,
                              "schedule": "onecycle", "amp": True, "epochs": epochs, **train}, name)
    threat = ThreatConfig()  # Linf, eps 0.1, step eps/4, 7 training steps: params.yaml's defaults
    return {"name": name, "kind": "pretrain", "method": objective, "options": method_options(objective, {}, name),
            "train": dataclasses.asdict(cfg), "threat": dataclasses.asdict(threat),
            "paths": {"train": paths["train"], "val": paths["val"]}, "num_classes": num_classes,
            "data_hash": "benchmark"}


def pickle_by_value() -> None:
    """Ray workers (of the shared runtime, too) do not have benchmarks/ on their path: ship this
    package's functions to them by value."""
    import ray.cloudpickle

    import benchmarks

    ray.cloudpickle.register_pickle_by_value(benchmarks)


def private_ray() -> None:
    """Have engine.connect start a Ray runtime of this process's own (RT_LOCAL_RAY=off) rather than
    join the shared one, which may be busy with someone else's jobs: ours would wait for CPUs."""
    os.environ["RT_LOCAL_RAY"] = "off"
