"""Load the registry's champion with plain MLflow and classify the target test set.

Run from the project root (or a pipeline folder such as pipelines/smoke) after `dvc repro`:
    python examples/load_champion.py
It honours $MLFLOW_TRACKING_URI (a tracking server); without it, it reads the project's SQLite store.
The registered name comes from params.yaml (`register.name`, else derived from the task). The last
line printed is one JSON object: name, version, method, clean_acc_tagged, clean_acc_now,
autoattack_acc_tagged.

The model is what `mlflow.pytorch.load_model` returns: a torch.export graph of the whole network,
normalisation included, taking float32 (N, C, H, W) images with raw pixel values in [0, 1]. It is
already in eval mode (do not call .eval() or .train() on it: exported graphs refuse).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import urllib.request

import mlflow
import numpy as np
import pyarrow.parquet as pq
import torch
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException


def registered_name(params: dict) -> str:
    from robust_transfer.config import DataConfig, load_section, register_config
    from robust_transfer.tracking import default_model_name

    return register_config(params).name or default_model_name(load_section(DataConfig, params, "data"))


def tracking_uri(params: dict) -> str:
    from robust_transfer.config import MlflowConfig, load_section
    from robust_transfer.tracking import tracking_uri as uri

    return uri(load_section(MlflowConfig, params, "mlflow"))  # $MLFLOW_TRACKING_URI first


def read_images(path: str) -> tuple[np.ndarray, np.ndarray]:
    """The prepare stage's Parquet table -> (float32 NCHW in [0, 1], int64 labels)."""
    table = pq.read_table(path)
    shape = json.loads(table.schema.metadata[b"shape"])  # (H, W, C)
    raw = b"".join(v.as_py() for v in table.column("image"))
    images = np.frombuffer(raw, dtype=np.uint8).reshape([-1, *shape])
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    return np.ascontiguousarray(x), table.column("label").to_numpy()


def main() -> None:
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its INFO lines about creating a new store
    with open("params.yaml") as f:
        params = yaml.safe_load(f)
    name = registered_name(params)
    uri = tracking_uri(params)
    if uri.startswith(("http://", "https://")):  # fail in seconds, not after MLflow's retries
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
        except OSError as exc:
            sys.exit(f"error: MLFLOW_TRACKING_URI={uri} is not reachable ({type(exc).__name__})")
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        sys.exit(f"error: no model '{name}@champion' in {os.environ.get('MLFLOW_TRACKING_URI') or mlflow.get_tracking_uri()}"
                 f"; run `dvc repro` (its register stage) first")
    model = mlflow.pytorch.load_model(f"models:/{name}@champion")

    x, y = read_images("data/target_test.parquet")
    with torch.no_grad():
        pred = torch.cat([model(torch.from_numpy(x[i:i + 500])).argmax(1) for i in range(0, len(x), 500)])
    clean_acc_now = (pred.numpy() == y).mean().item()
    tags = version.tags
    print(f"{name} v{version.version} ({tags.get('method')} from {tags.get('source')}): "
          f"clean accuracy {clean_acc_now:.4f} now, {tags.get('clean_acc')} tagged; "
          f"AutoAttack {tags.get('autoattack_acc')} at {tags.get('threat_model')}; gate {tags.get('gate')}")
    print(json.dumps({"name": name, "version": int(version.version), "method": tags.get("method"),
                      "clean_acc_tagged": json.loads(tags.get("clean_acc", "null")),
                      "clean_acc_now": clean_acc_now,
                      "autoattack_acc_tagged": json.loads(tags.get("autoattack_acc", "null"))}))


if __name__ == "__main__":
    main()
