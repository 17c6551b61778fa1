"""MLflow runs: the single record of every stage.

Default store, no server needed: `mlflow.db` (SQLite) and `mlartifacts/` at the project root
(git-ignored). `$MLFLOW_TRACKING_URI` (or `mlflow.tracking_uri` in params) points it at a server.
Every run carries the tags `pipeline` (the dvc.yaml it came from), `stage`, `data_hash` and
`git_commit`, so the runs of one `dvc repro` can be found together.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Optional

from .config import ConfigError, MlflowConfig


def project_root(start: Optional[Path] = None) -> Path:
    """The DVC project root (the folder holding .dvc/), or the current folder outside one."""
    here = (start or Path.cwd()).resolve()
    for p in [here, *here.parents]:
        if (p / ".dvc").is_dir():
            return p
    return here


def tracking_uri(cfg: MlflowConfig) -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri
    if uri:
        return uri
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def setup(cfg: MlflowConfig) -> str:
    """Point MLflow at the store and the experiment; fail within seconds if a server is unreachable."""
    import mlflow

    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
                r.read()
        except Exception as exc:
            raise ConfigError(f"MLFLOW_TRACKING_URI={uri} is not reachable ({type(exc).__name__}); "
                              f"start the server or unset MLFLOW_TRACKING_URI for the local SQLite store") from None
    os.environ["MLFLOW_TRACKING_URI"] = uri  # Ray workers and child processes inherit the same store
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(cfg.experiment) is None:
        artifacts = None
        if uri.startswith("sqlite:"):
            artifacts = (project_root() / "mlartifacts").as_uri()
        mlflow.create_experiment(cfg.experiment, artifact_location=artifacts)
    mlflow.set_experiment(cfg.experiment)
    return uri


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=project_root()).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def pipeline_name() -> str:
    root = project_root()
    try:
        return str(Path.cwd().resolve().relative_to(root) / "dvc.yaml")
    except ValueError:
        return "dvc.yaml"


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


@contextlib.contextmanager
def stage_run(cfg: MlflowConfig, stage: str, params: dict, data_hash: str = "",
              tags: Optional[dict] = None) -> Iterator[Any]:
    """One MLflow run for one stage (or one matrix item of it), with its params and standard tags."""
    import mlflow

    setup(cfg)
    all_tags = {"pipeline": pipeline_name(), "stage": stage, "data_hash": data_hash, "git_commit": git_commit()}
    all_tags.update(tags or {})
    with mlflow.start_run(run_name=stage, tags=all_tags) as run:
        flat = _flatten(params)
        items = list(flat.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a call
            mlflow.log_params(dict(items[i:i + 100]))
        yield run


def log_history(history: list[dict], prefix: str = "") -> None:
    import mlflow

    for row in history:
        step = int(row.get("epoch", 0))
        mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in row.items()
                            if k != "epoch" and isinstance(v, (int, float))}, step=step)
