"""python -m benchmarks [--quick] [--only NAME ...] [--device cpu|cuda] [--threads N]

--quick runs benchmarks 1-3 (engine overhead, stage fixed cost, attack throughput; a few minutes on
a quiet 2-core machine); without it every benchmark runs, the default `dvc repro` included. Each
writes benchmarks/results/<name>.json; the last line printed is one JSON object with the headline
numbers: {"engine_overhead_ratio": ..., "stage_fixed_seconds": ..., "pgd_throughput_ratio_vs_torchattacks": ...}
"""
from __future__ import annotations

import argparse
import json
import time

from benchmarks.common import log, write_result

QUICK = ("attack", "stage", "engine")
FULL = QUICK + ("scaling", "memory", "e2e")
HEADLINE = ("engine_overhead_ratio", "stage_fixed_seconds", "pgd_throughput_ratio_vs_torchattacks")


def _run(name: str, quick: bool, device: str, threads: int) -> tuple[str, dict]:
    """(result file name, result) of one benchmark."""
    suffix = "" if device == "cpu" else f"_{device}"
    if name == "attack":
        from benchmarks import attack_throughput
        return f"attack_throughput{suffix}", attack_throughput.run(quick=quick, device=device, threads=threads)
    if name == "stage":
        from benchmarks import stage_fixed_cost
        return "stage_fixed_cost", stage_fixed_cost.run(quick=quick)
    if name == "engine":
        from benchmarks import engine_overhead
        return f"engine_overhead{suffix}", engine_overhead.run(quick=quick, device=device, threads=threads)
    if name == "scaling":
        from benchmarks import scaling
        return f"scaling{suffix}", scaling.run(quick=False, device=device, threads=threads)
    if name == "memory":
        from benchmarks import memory
        return "memory", memory.run(quick=False)
    if name == "e2e":
        from benchmarks import end_to_end
        return "end_to_end", end_to_end.run()
    raise SystemExit(f"unknown benchmark {name!r}: expected one of {', '.join(FULL)}")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="benchmarks 1-3 only, at small sizes")
    p.add_argument("--only", nargs="+", choices=FULL, help="run just these")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (engine with use_gpu, attacks on the GPU)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the engine's cpus_per_worker)")
    args = p.parse_args()
    names = args.only or (QUICK if args.quick else FULL)
    if args.device != "cpu":  # the stage, memory and end-to-end benchmarks measure the CPU pipeline
        names = [n for n in names if n in ("attack", "engine", "scaling")]
    summary, t0 = {}, time.perf_counter()
    for name in names:
        log(f"== benchmark {name} ==")
        t = time.perf_counter()
        file, result = _run(name, args.quick, args.device, args.threads)
        result["seconds"] = round(time.perf_counter() - t, 1)
        path = write_result(file, result)
        summary.update(result.get("summary", {}))
        log(f"== {name}: {json.dumps(result.get('summary', {}))} ({result['seconds']:.0f}s, {path})")
    suffix = "" if args.device == "cpu" else f"_{args.device}"
    write_result(("summary_quick" if args.quick else "summary") + suffix,
                 {"benchmarks": list(names), "seconds": round(time.perf_counter() - t0, 1), "summary": summary})
    print(json.dumps({k: summary.get(k) for k in HEADLINE if k in summary} if set(HEADLINE) & set(summary)
                     else summary))


if __name__ == "__main__":
    main()
