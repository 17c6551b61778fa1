"""prepare: the dataset -> Parquet tables for the source and the few-shot target task, plus a data card.

outs: data/{source_train,source_test,target_train,target_fit,target_val,target_test}.parquet, data/card.json
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from robust_transfer import tracking
from robust_transfer.config import DataConfig, MlflowConfig, load_section
from robust_transfer.data import atomic_write, make_task_split, sha256_file, write_image_table, write_json
from stages._common import run

OUT = Path("data")


def main(args, params) -> None:
    cfg = load_section(DataConfig, params, "data")
    split = make_task_split(cfg)
    card = {"dataset": cfg.dataset, "target_dataset": cfg.target_dataset or cfg.dataset,
            "source_classes": cfg.source_classes, "target_classes": cfg.target_classes,
            "shots": cfg.shots, "val_shots": cfg.val_shots, "seed": cfg.seed, "tables": {}}
    # Every table goes to a temporary file and all replace the old ones together at the end: images
    # are decoded as they are written, so a bad one can stop the stage after some tables are done.
    with contextlib.ExitStack() as replace_all:
        for name, (images, labels, orig, names) in split.items():
            tmp = replace_all.enter_context(atomic_write(OUT / f"{name}.parquet"))
            write_image_table(images, labels, orig, names, tmp)
            card["tables"][name] = {
                "rows": int(len(labels)), "class_names": names, "image_shape": list(images.shape[1:]),
                "counts": {names[c]: int(n) for c, n in zip(*np.unique(labels, return_counts=True))},
                "sha256": sha256_file(tmp),
            }
            print(f"prepare: {name}: {len(labels)} images of shape {tuple(images.shape[1:])}, {len(names)} classes")
    card["data_hash"] = hashlib.sha256("".join(t["sha256"] for t in card["tables"].values()).encode()).hexdigest()
    write_json(card, OUT / "card.json")
    with tracking.stage_run(load_section(MlflowConfig, params, "mlflow"), "prepare", dataclasses.asdict(cfg),
                            card["data_hash"]):
        import mlflow

        mlflow.log_artifact(str(OUT / "card.json"))
        mlflow.log_metrics({f"rows_{name}": t["rows"] for name, t in card["tables"].items()})


if __name__ == "__main__":
    run(main)
