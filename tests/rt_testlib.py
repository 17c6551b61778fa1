"""Shared helpers of the unit tests: tiny real data (scikit-learn digits), a trained small CNN, and
small on-disk projects for stage subprocesses. Expensive things are cached per test session.

Imported as `from rt_testlib import ...` (pytest puts tests/ on sys.path: tests/ has no __init__.py).
"""
from __future__ import annotations

import copy
import functools
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

# The in-process tests use tiny models (8x8 digits) where a second thread buys nothing, while on a
# busy machine an intra-op thread pool that waits for a core costs up to 10x. Stage subprocesses
# set their own thread count (engine: cpus_per_worker).
torch.set_num_threads(int(os.environ.get("RT_TEST_TORCH_THREADS", "1")))

REPO = Path(__file__).resolve().parents[1]
SMOKE_PARAMS = REPO / "pipelines" / "smoke" / "params.yaml"


def tensors(split):
    """RawSplit -> (float NCHW images in [0, 1], int64 labels)."""
    x = torch.from_numpy(split.images).permute(0, 3, 1, 2).float().div(255.0)
    return x.contiguous(), torch.from_numpy(split.labels)


@functools.cache
def digits():
    """scikit-learn digits as tensors: {'train': (x, y), 'test': (x, y)}, 8x8 grey, 10 classes."""
    from robust_transfer.data import load_digits

    d = load_digits()
    return {k: tensors(v) for k, v in d.items()}


@functools.cache
def _trained_digits_net():
    """A small CNN trained naturally on all of digits-train (a few seconds on an idle CPU)."""
    from robust_transfer.nets import build_net

    torch.manual_seed(0)
    x, y = digits()["train"]
    net = build_net("small_cnn", 1, 10, 8)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(4):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def trained_digits_net():
    """A fresh copy (in eval mode) of the cached trained network, so tests cannot disturb each other."""
    return copy.deepcopy(_trained_digits_net()).eval()


def smoke_params(**overrides) -> dict:
    """The smoke pipeline's params with `{section: {key: value}}` overrides merged one level deep."""
    params = yaml.safe_load(SMOKE_PARAMS.read_text())
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(params.get(section), dict):
            params[section] = {**params[section], **values}
        else:
            params[section] = values
    return params


def write_params(folder: Path, params: dict, name: str = "params.yaml") -> Path:
    path = Path(folder) / name
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def stage_env(**extra) -> dict:
    """Environment of a stage subprocess: this venv first on PATH, the repo importable, no inherited
    cluster or tracking server."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO}:{env.get('PYTHONPATH', '')}".rstrip(":")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_stage(cwd: Path, *args, params: str = "params.yaml", timeout: float = 300, **env) -> subprocess.CompletedProcess:
    """`python -m stages.<args> --params <params>` in `cwd`, as DVC would run it."""
    cmd = [sys.executable, "-m", f"stages.{args[0]}", *args[1:], "--params", params]
    return run_group(cmd, timeout, cwd=cwd, env=stage_env(**env))


def run_group(cmd: list, timeout: int, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run in a session of its own; on timeout the whole process group is killed, not just
    `dvc`: a stage process left behind would keep its Ray workers' CPUs and stall every later test."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            tail = "\n".join((out + err).splitlines()[-40:])
            raise AssertionError(f"{' '.join(map(str, cmd))} timed out after {timeout} s:\n{tail}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def error_lines(stderr: str) -> list[str]:
    """The `error: ...` lines a stage printed (warnings of libraries may surround them)."""
    return [ln for ln in stderr.splitlines() if ln.startswith("error: ")]


def snapshot(folder: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `folder` (to show nothing was overwritten)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@functools.cache
def prepared_project() -> Path:
    """A temporary project folder holding the smoke params and the prepare stage's outputs (digits).
    Made once per test session; tests that change it must copy it first (see `copy_prepared`)."""
    import atexit
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="rt-prepared-"))
    atexit.register(shutil.rmtree, root, True)
    write_params(root, smoke_params())
    proc = run_stage(root, "prepare")
    assert proc.returncode == 0, proc.stderr
    return root


def copy_prepared(dest: Path) -> Path:
    """A private copy of `prepared_project()` (params and data/) at `dest`."""
    import shutil

    shutil.copytree(prepared_project(), dest, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts",
                                                                            ".checkpoints"))
    return Path(dest)
