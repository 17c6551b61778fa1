"""A throw-away copy of the project and a `dvc repro` in it, sampled for memory as it runs.

Shared by the memory (6) and end-to-end (7) benchmarks. The copy is the checkout as a user has it
(tracked and new, not ignored files), a git repo of its own. Its stages use the shared local Ray
runtime as they would for a user, but the benchmark's own (a private TMPDIR keys it), which is
started by the first stage, as on a fresh machine, and stopped at the end.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from benchmarks.common import ROOT, log

BIN = Path(sys.executable).parent


def copy_project(dest: Path) -> Path:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    dest.mkdir(parents=True, exist_ok=True)
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(src.read_bytes())
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


@contextmanager
def private_runtime():
    """A TMPDIR of the benchmark's own (short: Ray's socket paths are limited to 107 characters):
    runtime.py keys the shared head by it. Yields the environment for the stages; stops the head."""
    import shutil

    tmp = Path(tempfile.mkdtemp(prefix="b8rt-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RT_LOCAL_RAY")}
    env.update(TMPDIR=str(tmp), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RT_RAY_IDLE_S="60")
    try:
        yield env  # callers add PYTHONPATH=<the copy>, so its stages run the copy's code
    finally:
        subprocess.run([sys.executable, "-m", "robust_transfer.runtime", "stop"], env=env, capture_output=True,
                       timeout=120)
        shutil.rmtree(tmp, ignore_errors=True)


def head_pid(env: dict) -> Optional[int]:
    """The watchdog pid of the benchmark's shared head, when it runs."""
    import json

    code = ("from robust_transfer import runtime; import json; h = runtime._read_head(runtime.state_dir()); "
            "print(json.dumps(h))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    try:
        head = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None
    return head["pid"] if head else None


class StageMemorySampler(threading.Thread):
    """Samples, every `interval` seconds, the resident memory of each running stage process
    (`python -m stages.<name> <key>`) with its descendants, and of the Ray Train processes of the
    benchmark's shared head, which belong to the stage running at the time (`dvc repro` runs one
    stage at a time). Peaks shorter than the interval can be missed."""

    def __init__(self, env: dict, interval: float = 1.0):
        super().__init__(daemon=True)
        self.env, self.interval = env, interval
        self.peaks: dict[str, dict[str, float]] = {}
        self.runtime_peak_mb = 0.0
        self._done = threading.Event()  # (not _stop: Thread.join calls its own _stop())
        self._head: Optional[int] = None

    def stop(self) -> dict:
        self._done.set()
        self.join(timeout=10)
        return {"stages": self.peaks, "ray_runtime_peak_mb": round(self.runtime_peak_mb, 1)}

    def run(self) -> None:
        import psutil

        while not self._done.wait(self.interval):
            try:
                self._sample(psutil)
            except Exception:  # a process ended mid-sample: skip this sample
                continue

    def _sample(self, psutil) -> None:
        procs = {}
        for p in psutil.process_iter(["pid", "ppid", "cmdline", "memory_info"]):
            info = p.info
            if info["memory_info"] is not None:
                procs[info["pid"]] = (info["ppid"], info["cmdline"] or [], info["memory_info"].rss / 2**20)
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in procs.items():
            children.setdefault(ppid, []).append(pid)

        def tree(root: int) -> list[int]:
            out, todo = [], [root]
            while todo:
                pid = todo.pop()
                out.append(pid)
                todo.extend(children.get(pid, []))
            return out

        stages = {}
        for pid, (_, cmd, _) in procs.items():
            if "-m" in cmd:
                i = cmd.index("-m")
                if i + 1 < len(cmd) and cmd[i + 1].startswith("stages."):
                    name = cmd[i + 1].split(".", 1)[1] + ("@" + cmd[i + 2] if len(cmd) > i + 2 and
                                                          not cmd[i + 2].startswith("-") else "")
                    stages[name] = pid
        if self._head is None and stages:
            self._head = head_pid(self.env)
        head_tree = set(tree(self._head)) if self._head in procs else set()
        ray_workers = [pid for pid in head_tree if procs[pid][1] and procs[pid][1][0].startswith("ray::")]
        runtime_mb = sum(procs[pid][2] for pid in head_tree if pid not in ray_workers)
        self.runtime_peak_mb = max(self.runtime_peak_mb, runtime_mb)
        for name, pid in stages.items():
            own = sum(procs[p][2] for p in tree(pid))
            workers = sum(procs[p][2] for p in ray_workers) if len(stages) == 1 else float("nan")
            peak = self.peaks.setdefault(name, {"stage_mb": 0.0, "ray_workers_mb": 0.0, "total_mb": 0.0})
            peak["stage_mb"] = round(max(peak["stage_mb"], own), 1)
            if workers == workers:
                peak["ray_workers_mb"] = round(max(peak["ray_workers_mb"], workers), 1)
                peak["total_mb"] = round(max(peak["total_mb"], own + workers), 1)


def repro(root: Path, target: Optional[str], env: dict, sample_memory: bool = True, timeout: int = 7200) -> dict:
    """`dvc repro [target]` in `root`: wall seconds, and per-stage peak memory when sampled."""
    sampler = StageMemorySampler(env) if sample_memory else None
    if sampler:
        sampler.start()
    cmd = [str(BIN / "dvc"), "repro"] + ([target] if target else [])
    log(f"[repro] {' '.join(cmd[1:])} in {root}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env={**env, "PYTHONPATH": str(root)}, capture_output=True, text=True,
                          timeout=timeout)
    wall = time.perf_counter() - t0
    memory = sampler.stop() if sampler else None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
        raise RuntimeError(f"dvc repro failed ({proc.returncode}):\n{tail}")
    return {"wall_s": round(wall, 2), "memory": memory, "log_tail": proc.stdout.splitlines()[-5:]}
