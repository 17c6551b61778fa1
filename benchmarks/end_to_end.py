"""Benchmark 7: wall time of the default `dvc repro` from a clean state, and of a no-op repro.

A temporary copy of the project (benchmarks/project.py), nothing cached: the first `dvc repro`
runs every stage (prepare, pretrain, extract, tune, transfer, evaluate, report, register), the
first stage starting the shared local Ray runtime as on a fresh machine. The second `dvc repro`
finds everything up to date: that is the no-op time (goal <= 5 s). The first run is also sampled
for each stage's peak memory (benchmark 6's table, for the default pipeline).
Goal: the default pipeline in under 10 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks.common import log, machine, write_result


def run(pipeline: str = "default", keep: bool = False) -> dict:
    started = machine()  # the load average as the benchmark starts
    from benchmarks.project import copy_project, private_runtime, repro

    target = None if pipeline == "default" else f"pipelines/{pipeline}/dvc.yaml"
    tmp = tempfile.mkdtemp(prefix="bench-e2e-")
    with private_runtime() as env:
        root = copy_project(Path(tmp) / "project")
        first = repro(root, target, env, sample_memory=True)
        log(f"[e2e] {pipeline}: clean repro {first['wall_s']:.0f}s")
        noop = repro(root, target, env, sample_memory=False)
        log(f"[e2e] {pipeline}: no-op repro {noop['wall_s']:.1f}s")
    if not keep:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return {"machine": started, "pipeline": pipeline, "clean_repro_s": first["wall_s"], "noop_repro_s": noop["wall_s"],
            "memory": first["memory"], "project": tmp if keep else None,
            "summary": {"e2e_clean_repro_s": first["wall_s"], "e2e_noop_repro_s": noop["wall_s"]},
            "goal": "clean < 600 s, no-op <= 5 s"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", default="default", help="default, or a folder of pipelines/ (smoke)")
    p.add_argument("--keep", action="store_true", help="keep the temporary project (its metrics, models)")
    args = p.parse_args()
    res = run(args.pipeline, args.keep)
    write_result("end_to_end" if args.pipeline == "default" else f"end_to_end_{args.pipeline}", res)
    print(json.dumps(res["summary"]))


if __name__ == "__main__":
    main()
