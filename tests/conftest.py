"""Session fixtures: one real end-to-end `dvc repro` of pipelines/smoke/, shared by every test that
needs a whole pipeline's outputs (it takes minutes, and runs while the other tests do; they use
tiny in-process models and single stages)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from rt_testlib import run_group

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def copy_project(dest: Path) -> Path:
    """The checkout as a user has it (tracked and new, not ignored files), as its own git repo."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    dest.mkdir(parents=True, exist_ok=True)
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(src.read_bytes())
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def project_env(root: Path, **extra: str) -> dict:
    """Stages of the copy run its own code (PYTHONPATH; the engine forwards it to Ray workers) and use
    its own MLflow store unless a test points them elsewhere. Python writes its bytecode caches, as on a
    user's machine (the code folders are DVC dependencies: .dvcignore must keep the caches out of them)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PYTHONDONTWRITEBYTECODE")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(root), **extra)
    return env


def dvc_repro(root: Path, target: str, env: dict, timeout: int = 1500) -> subprocess.CompletedProcess:
    proc = run_group([str(BIN / "dvc"), "repro", target], timeout, cwd=root, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise AssertionError(f"dvc repro {target} failed ({proc.returncode}):\n{tail}")
    return proc


SMOKE = "pipelines/smoke/dvc.yaml"
_smoke: dict = {}


def _uses_smoke(item) -> bool:
    return "smoke_project" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(session, config, items):
    """The smoke pipeline's real `dvc repro` starts in the background as soon as the tests are
    collected, and the tests on its outputs run last: its stages spend much of their time starting
    processes and waiting on Ray, time the unit tests fill meanwhile."""
    items.sort(key=_uses_smoke)  # stable: the order within each group stays
    if config.option.collectonly or not any(map(_uses_smoke, items)):
        return
    root = copy_project(Path(tempfile.mkdtemp(prefix="rt-smoke-")) / "project")
    log = open(root.parent / "repro.log", "w")
    proc = subprocess.Popen([str(BIN / "dvc"), "repro", SMOKE], cwd=root, env=project_env(root), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    _smoke.update(root=root, log=log, proc=proc, started=time.monotonic())


def pytest_sessionfinish(session, exitstatus):
    proc = _smoke.get("proc")
    if proc is not None and proc.poll() is None:  # the session ended before the pipeline did
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if proc is not None and exitstatus == 0:
        shutil.rmtree(_smoke["root"].parent, ignore_errors=True)


@pytest.fixture(scope="session")
def smoke_project() -> Path:
    """A temporary copy of the project after `dvc repro pipelines/smoke/dvc.yaml` (started at
    collection, see above); returns the pipeline folder (its data/, models/, metrics/ ...). The MLflow
    store is the copy's mlflow.db; the run's output is repro.log beside the copy."""
    proc, root, timeout = _smoke["proc"], _smoke["root"], 1500
    try:
        proc.wait(timeout=max(1.0, timeout - (time.monotonic() - _smoke["started"])))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole group: no stage may keep its Ray workers
        proc.wait()
    _smoke["log"].close()
    if proc.returncode != 0:
        tail = "\n".join((root.parent / "repro.log").read_text().splitlines()[-40:])
        why = f"timed out after {timeout} s" if proc.returncode == -signal.SIGKILL else f"failed ({proc.returncode})"
        raise AssertionError(f"dvc repro {SMOKE} {why}:\n{tail}")
    return root / "pipelines" / "smoke"
