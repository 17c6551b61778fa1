"""MLflow runs: the single record of every stage.

Default store, no server needed: `mlflow.db` (SQLite) and `mlartifacts/` at the project root
(git-ignored). `$MLFLOW_TRACKING_URI` (or `mlflow.tracking_uri` in params) points it at a server.
Every run carries the tags `pipeline` (the dvc.yaml it came from), `stage`, `data_hash` and
`git_commit`, so the runs of one `dvc repro` can be found together.

The registry half (below `registry`): models are logged with `mlflow.pytorch.log_model` in the
`pt2` format (torch.export: loading it unpickles no code, and the consumer needs only torch and
mlflow), registered with their numbers as version tags, and the alias `champion` moves only to a
version that passes the robustness gate. A version is identified by its checkpoint's sha256 (a
tag), so registering the same checkpoint twice adds nothing.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Optional

from .config import ConfigError, DataConfig, MlflowConfig, RegisterConfig, parse_model_uri


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


def check_store(cfg: MlflowConfig) -> str:
    """The store's URI, exported for Ray workers and child processes; a server must answer within seconds."""
    uri = tracking_uri(cfg)
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as r:
                r.read()
        except Exception as exc:
            raise ConfigError(f"MLFLOW_TRACKING_URI={uri} is not reachable ({type(exc).__name__}); "
                              f"start the server or unset MLFLOW_TRACKING_URI for the local SQLite store") from None
    os.environ["MLFLOW_TRACKING_URI"] = uri  # Ray workers and child processes inherit the same store
    return uri


def setup(cfg: MlflowConfig) -> str:
    """Point MLflow at the store and the experiment; fail within seconds if a server is unreachable."""
    import mlflow

    uri = check_store(cfg)
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
    with mlflow.start_run(run_name=stage, tags=_standard_tags(stage, data_hash, tags)) as run:
        _log_params(params)
        yield run


class DeferredRun:
    """A stage's MLflow run, opened once the stage's Ray Train job is done (`open()`), while MLflow's
    import and store set-up (~3 s: SQLAlchemy, schema checks) run in a thread started by `warm()`
    when the driver begins to wait for its workers: it then holds the GIL no more, so the set-up costs
    the stage nothing (started earlier, it only slowed the driver's own imports). The run still starts
    when the stage did, and a job that fails is recorded as a FAILED run."""

    def __init__(self, cfg: MlflowConfig, stage: str, params: dict, data_hash: str, tags: Optional[dict]):
        import time

        check_store(cfg)  # an unreachable server stops the stage now, not after its training
        self._args = (cfg, stage, params, data_hash, tags)
        self._start_ms = int(time.time() * 1000)
        self._error: Optional[BaseException] = None
        self._run = None
        self._thread = None

    def warm(self) -> None:
        """Set MLflow up in a thread (call it just before blocking on the job)."""
        import threading

        if self._thread is None:
            self._thread = threading.Thread(target=self._setup, daemon=True, name="mlflow-setup")
            self._thread.start()

    def _setup(self) -> None:
        try:
            setup(self._args[0])
        except BaseException as exc:  # re-raised in the stage's own thread by open()
            self._error = exc

    def open(self):
        """Create the run (start time: the stage's start), log its params, make it the active run."""
        import mlflow

        self.warm()
        self._thread.join()
        if self._error is not None:
            raise self._error
        cfg, stage, params, data_hash, tags = self._args
        client = mlflow.MlflowClient()
        experiment = mlflow.get_experiment_by_name(cfg.experiment)
        created = client.create_run(experiment.experiment_id, start_time=self._start_ms, run_name=stage,
                                    tags=_standard_tags(stage, data_hash, tags))
        self._run = mlflow.start_run(run_id=created.info.run_id)
        _log_params(params)
        return self._run

    def close(self, failed: bool) -> None:
        import mlflow

        if self._run is None and failed:
            with contextlib.suppress(Exception):  # the job's own error is the one to report
                self.open()
        if self._run is not None:
            mlflow.end_run("FAILED" if failed else "FINISHED")


@contextlib.contextmanager
def deferred_stage_run(cfg: MlflowConfig, stage: str, params: dict, data_hash: str = "",
                       tags: Optional[dict] = None) -> Iterator[DeferredRun]:
    """`stage_run` for a stage that runs a Ray Train job first: call `.open()` after the job."""
    run = DeferredRun(cfg, stage, params, data_hash, tags)
    try:
        yield run
    except BaseException:
        run.close(failed=True)
        raise
    run.close(failed=False)


def _standard_tags(stage: str, data_hash: str, tags: Optional[dict]) -> dict:
    all_tags = {"pipeline": pipeline_name(), "stage": stage, "data_hash": data_hash, "git_commit": git_commit()}
    all_tags.update(tags or {})
    return all_tags


def _log_params(params: dict) -> None:
    import mlflow

    items = list(_flatten(params).items())
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params a call
        mlflow.log_params(dict(items[i:i + 100]))


def log_history(history: list[dict], prefix: str = "") -> None:
    import mlflow

    for row in history:
        step = int(row.get("epoch", 0))
        mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in row.items()
                            if k != "epoch" and isinstance(v, (int, float))}, step=step)



# ----------------------------------------------------------------------------- registry
CHAMPION = "champion"
CHECKPOINT_FILE = "checkpoint.pt"  # the state-dict checkpoint, stored in each model as extra_files/checkpoint.pt
INPUT_DOC = "float32 images (N, C, H, W) with raw pixel values in [0, 1]; normalisation is inside the model"
# Tags written when a version is created and never rewritten: where it came from, not what it measures.
ORIGIN_TAGS = ("git_commit", "pipeline", "checkpoint_sha256")


def classes_label(classes: list[int]) -> str:
    """[5, 6, 7, 8, 9] -> "5-9"; [1, 3, 5] -> "1_3_5"."""
    if len(classes) > 2 and list(classes) == list(range(classes[0], classes[0] + len(classes))):
        return f"{classes[0]}-{classes[-1]}"
    return "_".join(str(c) for c in classes)


def default_model_name(data: DataConfig) -> str:
    return f"{data.target_dataset or data.dataset}-{classes_label(data.target_classes)}-robust"


def default_source_name(data: DataConfig, source: str) -> str:
    return f"{data.dataset}-{classes_label(data.source_classes)}-{source}-source"


def gate(metrics: dict, cfg: RegisterConfig) -> list[str]:
    """Why a transferred model fails the gate; [] when it passes."""
    reasons = []
    robust = metrics.get(cfg.robust_metric)
    if robust is None:
        reasons.append(f"{cfg.robust_metric} not measured")
    elif not robust >= cfg.min_robust_acc:  # NaN fails too
        reasons.append(f"{cfg.robust_metric} {robust:.4f} < {cfg.min_robust_acc}")
    clean = metrics.get("clean_acc")
    if clean is None or not clean >= cfg.min_clean_acc:
        reasons.append(f"clean_acc {clean} < {cfg.min_clean_acc}")
    if cfg.require_checks and metrics.get("checks_passed") is not True:
        failed = failed_checks(metrics)
        reasons.append(f"sanity checks failed ({', '.join(failed) or 'no verdict'})")
    return reasons


def source_gate(metrics: dict, cfg: RegisterConfig) -> list[str]:
    """Why a source model fails its gate (PGD and clean accuracy on the source test set); [] when it passes."""
    reasons = []
    for name, floor in (("pgd_acc", cfg.source_min_pgd_acc), ("clean_acc", cfg.source_min_clean_acc)):
        value = metrics.get(name)
        if value is None or not value >= floor:
            reasons.append(f"{name} {value} < {floor}")
    return reasons


def failed_checks(metrics: dict) -> list[str]:
    return [name for name, check in (metrics.get("checks") or {}).items() if not check.get("passed")]


def tag_value(value: Any) -> str:
    """A version tag: strings as they are, everything else as JSON, so `json.loads(tag)` gives the
    metric back exactly (floats round-trip through their repr; None is "null")."""
    return value if isinstance(value, str) else json.dumps(value)


def transfer_tags(metrics: dict, reasons: list[str], cfg: RegisterConfig, sha: str) -> dict[str, str]:
    """The tags of a transferred model's version: what it is, what it measured, and the gate's verdict."""
    failed = failed_checks(metrics)
    tags = {
        "kind": "transfer", "model": metrics.get("model"), "method": metrics.get("method"),
        "source": metrics.get("source"), "source_run_id": metrics.get("source_run_id") or "",
        "model_run_id": metrics.get("model_run_id") or "", "evaluate_run_id": metrics.get("run_id") or "",
        "data_hash": metrics.get("data_hash") or "", "shots": metrics.get("shots"),
        "threat_model": f"{metrics.get('norm')} eps={metrics.get('eps')}", "norm": metrics.get("norm"),
        "eps": metrics.get("eps"),
        "clean_acc": metrics.get("clean_acc"), "pgd_acc": metrics.get("pgd_acc"),
        "autoattack_acc": metrics.get("autoattack_acc"), "transfer_asr": metrics.get("transfer_asr"),
        "checks_passed": metrics.get("checks_passed"),
        "sanity_checks": "passed" if metrics.get("checks_passed") is True else f"failed: {', '.join(failed) or 'no verdict'}",
        "train_seconds": metrics.get("train_seconds"), "train_passes": metrics.get("train_passes"),
        "robust_metric": cfg.robust_metric,
        "gate": "passed" if not reasons else "failed: " + "; ".join(reasons),
        "checkpoint_sha256": sha, "git_commit": git_commit(), "pipeline": pipeline_name(),
    }
    return {k: tag_value(v) for k, v in tags.items()}


def source_tags(source: str, metrics: dict, extra: dict, reasons: list[str], sha: str) -> dict[str, str]:
    tags = {
        "kind": "source", "source": source, "objective": extra.get("objective"),
        "model_run_id": extra.get("run_id") or "", "data_hash": extra.get("data_hash") or "",
        "threat_model": f"{metrics.get('norm')} eps={metrics.get('eps')}", "norm": metrics.get("norm"),
        "eps": metrics.get("eps"), "clean_acc": metrics.get("clean_acc"), "pgd_acc": metrics.get("pgd_acc"),
        "pgd_steps": metrics.get("pgd_steps"), "train_seconds": metrics.get("train_seconds"),
        "train_passes": metrics.get("train_passes"), "robust_metric": "pgd_acc",
        "gate": "passed" if not reasons else "failed: " + "; ".join(reasons),
        "checkpoint_sha256": sha, "git_commit": git_commit(), "pipeline": pipeline_name(),
    }
    return {k: tag_value(v) for k, v in tags.items()}


def log_and_register(net, name: str, artifact_name: str, tags: dict[str, str], checkpoint: Path,
                     example, class_names: list[str]):
    """Log `net` (eval mode) as an MLflow pytorch model in the active run and register it as a new
    version of `name` with `tags`. `example` is a float32 NCHW numpy batch (> 1 image: the batch
    dimension stays dynamic in the exported graph). The checkpoint rides along as
    extra_files/checkpoint.pt, so a later pipeline can start from this version (pretrain's
    `registry:` sources) and load it with torch.load(weights_only=True)."""
    import shutil
    import tempfile

    import mlflow
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    net = net.cpu().eval()
    with torch.no_grad():
        n_out = net(torch.from_numpy(example[:1])).shape[1]
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *example.shape[1:]))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, n_out))]))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / CHECKPOINT_FILE
        shutil.copyfile(checkpoint, ckpt)
        info = mlflow.pytorch.log_model(
            net, name=artifact_name, signature=signature, input_example=example, serialization_format="pt2",
            extra_files=[str(ckpt)], metadata={"input": INPUT_DOC, "class_names": class_names},
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"])
    return mlflow.register_model(info.model_uri, name, tags=tags)


def ensure_registered_model(client, name: str, description: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=description)


def registered_versions(client, name: str) -> list:
    return list(client.search_model_versions(f"name='{name}'"))


def version_with_sha(versions: list, sha: str):
    """The version already holding this exact checkpoint, or None (newest first, should there be several)."""
    same = [v for v in versions if v.tags.get("checkpoint_sha256") == sha]
    return max(same, key=lambda v: int(v.version)) if same else None


def update_tags(client, version, tags: dict[str, str]) -> bool:
    """Bring an existing version's measured tags up to date (evaluate may have re-run on the same
    checkpoint); its origin tags stay as they were written. True if anything changed."""
    changed = False
    for key, value in tags.items():
        if key not in ORIGIN_TAGS and version.tags.get(key) != value:
            client.set_model_version_tag(version.name, version.version, key, value)
            changed = True
    return changed


def champion_version(client, name: str):
    """The version holding the alias `champion`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def best_passing(candidates: list[tuple[Any, dict, list[str]]], robust_metric: str):
    """From (version, metrics, gate reasons) triples: the passing version with the highest robust
    metric, then clean accuracy, then the newest; None when none passes."""
    passing = [(v, m) for v, m, reasons in candidates if not reasons]
    if not passing:
        return None
    return max(passing, key=lambda vm: (vm[1][robust_metric], vm[1]["clean_acc"], int(vm[0].version)))[0]


def resolve_version(client, uri: str, key: str):
    """The model version a `models:/name@alias` or `models:/name/<n>` URI names; a one-line
    ConfigError (naming `key`) when the name, alias or version is not in the registry."""
    from mlflow.exceptions import MlflowException

    name, alias, number = parse_model_uri(uri)
    store = redact(os.environ.get("MLFLOW_TRACKING_URI", ""))
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise ConfigError(f"{key}: registered model '{name}' not found in {store}") from None
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    except MlflowException:
        what = f"alias '{alias}'" if alias else f"version {number}"
        raise ConfigError(f"{key}: registered model '{name}' has no {what} in {store}") from None


def download_checkpoint(client, uri: str, key: str, dest: Path) -> tuple[Path, Any]:
    """Download the version `uri` names into `dest`; (its state-dict checkpoint, the version)."""
    import mlflow

    version = resolve_version(client, uri, key)
    local = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{version.name}/{version.version}",
                                                dst_path=str(dest))
    path = Path(local) / "extra_files" / CHECKPOINT_FILE
    if not path.is_file():
        raise ConfigError(f"{key}: {uri} (version {version.version}) holds no extra_files/{CHECKPOINT_FILE}; "
                          f"only models registered by this pipeline's register stage can be a source")
    return path, version


def redact(uri: str) -> str:
    """A tracking URI without any user:password part, fit for a log line."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{rest.split('@', 1)[1]}"
    return uri
