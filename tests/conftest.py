"""Session fixtures: one real end-to-end `dvc repro` of pipelines/smoke/, shared by every test that
needs a whole pipeline's outputs (it takes minutes; everything else uses tiny in-process models)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    its own MLflow store unless a test points them elsewhere."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(root), **extra)
    return env


def dvc_repro(root: Path, target: str, env: dict, timeout: int = 1500) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "dvc"), "repro", target], cwd=root, env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
        raise AssertionError(f"dvc repro {target} failed ({proc.returncode}):\n{tail}")
    return proc


@pytest.fixture(scope="session")
def smoke_project(tmp_path_factory) -> Path:
    """A temporary copy of the project after `dvc repro pipelines/smoke/dvc.yaml`; returns the
    pipeline folder (its data/, models/, metrics/ ...). The MLflow store is the copy's mlflow.db."""
    root = copy_project(tmp_path_factory.mktemp("smoke") / "project")
    proc = dvc_repro(root, "pipelines/smoke/dvc.yaml", project_env(root))
    (root / "repro.log").write_text(proc.stdout + proc.stderr)
    return root / "pipelines" / "smoke"
