"""Benchmark 6: peak memory (RSS) of each stage, and whether extract and prepare stream their tables.

Peak memory: one sampled `dvc repro` of a pipeline in a temporary copy (benchmarks/project.py):
per stage, its own process tree, and the Ray Train worker and controller processes of the shared
runtime while it runs; the runtime's daemons separately. The end-to-end benchmark (7) records the
same table for the default pipeline.

Streaming: a stage streams when its peak memory does not grow with its input. Each check runs the
stage's library call in a child process on a table of N rows and on one of 4N rows and compares the
growth of the child's own peak RSS (VmHWM) with the growth of the table's size in memory:
`growth_ratio` near 0 streams, near 1 (or more) holds the table whole.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ROOT, log, machine, write_result


# ----------------------------------------------------------------------------- per-stage peaks
def stage_peaks(pipeline: str = "smoke") -> dict:
    from benchmarks.project import copy_project, private_runtime, repro

    target = None if pipeline == "default" else f"pipelines/{pipeline}/dvc.yaml"
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp, private_runtime() as env:
        root = copy_project(Path(tmp) / "project")
        out = repro(root, target, env, sample_memory=True)
    return {"pipeline": pipeline, "wall_s": out["wall_s"], **out["memory"]}


# ----------------------------------------------------------------------------- streaming checks
# The child's own high-water mark: VmHWM of the address space its exec made. (Its ru_maxrss would not
# do: Linux carries the forking parent's peak RSS across exec into it, so a child of this benchmark,
# which holds the tables it built, read as large as the benchmark itself: 880 MiB at every size.)
PEAK = """
import json
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")][0].split()[1]
print(json.dumps(int(hwm) / 1024))
"""


def _child_peak(code: str, *args: str) -> float:
    """Peak RSS (MiB) of a child process running `code` (its own, see PEAK)."""
    wrapper = code + PEAK
    out = subprocess.run([sys.executable, "-c", wrapper, *args], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


def _image_table(path: Path, rows: int) -> float:
    """A prepare-format image table of `rows` Fashion-MNIST images; returns its size in memory (MiB)."""
    import numpy as np

    from robust_transfer.data import load_fashion_mnist, write_image_table

    split = load_fashion_mnist(None)["train"]
    reps = -(-rows // len(split.labels))
    images = np.concatenate([split.images] * reps)[:rows]
    labels = np.concatenate([split.labels] * reps)[:rows]
    write_image_table(images, labels, labels, split.class_names, path)  # as prepare writes its tables
    return images.nbytes / 2**20


def _parquet_dataset(folder: Path, rows: int) -> float:
    """A user's dataset for prepare's 'parquet' source: PNG bytes + label, train and test files."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from robust_transfer.data import load_fashion_mnist

    split = load_fashion_mnist(None)["train"]
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", rows), ("test", max(rows // 6, 100))):
        blobs, labels = [], []
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(split.images[i % len(split.labels)][:, :, 0]).save(buf, format="PNG")
            blobs.append(buf.getvalue())
            labels.append(int(split.labels[i % len(split.labels)]))
        pq.write_table(pa.table({"image": pa.array(blobs, pa.binary()), "label": pa.array(labels, pa.int64())}),
                       folder / f"{name}.parquet")
    return (rows + max(rows // 6, 100)) * 28 * 28 / 2**20  # decoded uint8 images


EXTRACT = """
import sys, torch
from robust_transfer import features
from robust_transfer.nets import build_net
torch.manual_seed(0)
net = build_net("small_cnn", 1, 5, 28).eval()
features.extract(net, sys.argv[1], sys.argv[2], [], {"source": "bench"}, batch_size=512)
"""

PREPARE = """
import sys, tempfile
from pathlib import Path
from robust_transfer.config import DataConfig
from robust_transfer.data import make_task_split, write_image_table
split = make_task_split(DataConfig(dataset="parquet", root=sys.argv[1], source_classes=[0, 1, 2, 3, 4],
                                   target_classes=[5, 6, 7, 8, 9], shots=5, val_shots=1))
with tempfile.TemporaryDirectory() as out:  # what the stage writes: every table, the whole source classes
    for name, (images, labels, orig, names) in split.items():
        write_image_table(images, labels, orig, names, Path(out) / f"{name}.parquet")
"""


def streaming(rows: int) -> dict:
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        tmp = Path(tmp)
        sizes, peaks = {}, {}
        for n in (rows, 4 * rows):
            sizes[n] = _image_table(tmp / f"images-{n}.parquet", n)
            peaks[n] = _child_peak(EXTRACT, str(tmp / f"images-{n}.parquet"), str(tmp / f"features-{n}.parquet"))
            log(f"[memory] extract on {n} rows ({sizes[n]:.0f} MiB of images): peak RSS {peaks[n]:.0f} MiB")
        out["extract"] = _verdict(sizes, peaks, rows)
        sizes, peaks = {}, {}
        for n in (rows, 4 * rows):
            sizes[n] = _parquet_dataset(tmp / f"user-{n}", n)
            peaks[n] = _child_peak(PREPARE, str(tmp / f"user-{n}"))
            log(f"[memory] prepare (parquet source) on {n} rows ({sizes[n]:.0f} MiB decoded): peak RSS {peaks[n]:.0f} MiB")
        out["prepare"] = _verdict(sizes, peaks, rows)
    return out


def _verdict(sizes: dict, peaks: dict, rows: int) -> dict:
    small, large = rows, 4 * rows
    growth = (peaks[large] - peaks[small]) / max(sizes[large] - sizes[small], 1e-9)
    return {"rows": [small, large], "table_mib": [round(sizes[small], 1), round(sizes[large], 1)],
            "peak_rss_mib": [round(peaks[small], 1), round(peaks[large], 1)], "growth_ratio": round(growth, 3),
            "streams": growth < 0.25}


def run(quick: bool = False, pipeline: str = "smoke", rows: int = 30000) -> dict:
    started = machine()  # the load average as the benchmark starts
    result = {"quick": quick, "machine": started, "streaming": streaming(rows // 5 if quick else rows)}
    if not quick:
        result["stage_peaks"] = stage_peaks(pipeline)
    result["summary"] = {f"{k}_streams": v["streams"] for k, v in result["streaming"].items()}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", default="smoke", help="smoke (default) or default: whose stages to sample")
    p.add_argument("--rows", type=int, default=30000, help="rows of the smaller table in the streaming checks")
    p.add_argument("--streaming-only", action="store_true")
    args = p.parse_args()
    res = run(quick=args.streaming_only, pipeline=args.pipeline, rows=args.rows)
    write_result("memory", res)
    print(json.dumps(res["summary"]))


if __name__ == "__main__":
    main()
