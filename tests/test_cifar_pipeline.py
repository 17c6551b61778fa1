"""pipelines/cifar100-to-cifar10/ end to end on the CPU: its own params.yaml with only the sizes shrunk
(width, images, epochs, attack steps, one CPU worker), CIFAR-100 and CIFAR-10 written in their own
python-pickle formats, and a real `dvc repro` of the pipeline in a temporary copy of the project.
The paper-scale settings themselves are checked against the papers' (see the pipeline's README)."""
from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, copy_project, dvc_repro, project_env

PIPELINE = "pipelines/cifar100-to-cifar10"
PARAMS = REPO / PIPELINE / "params.yaml"


def _flat(images: np.ndarray) -> np.ndarray:  # CIFAR's 3072 bytes per image: the R plane, then G, then B
    return images.transpose(0, 3, 1, 2).reshape(len(images), -1)


def _images(labels: np.ndarray, classes: int, rng) -> np.ndarray:
    """Noise around a colour per class, so that the classes are (barely) learnable."""
    hue = rng.integers(0, 256, size=(classes, 3))
    noise = rng.integers(-40, 41, size=(len(labels), 32, 32, 3))
    return np.clip(hue[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)


def write_cifar(root: Path, per_class_100=(2, 1), per_class_10=(5, 3), seed=0) -> Path:
    """cifar-100-python/{train,test,meta} and cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta},
    pickled as the originals are (protocol 2, str keys; the loaders read them with encoding latin1)."""
    rng = np.random.default_rng(seed)
    c100 = root / "cifar-100-python"
    c100.mkdir(parents=True)
    with open(c100 / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"fine{i}" for i in range(100)],
                     "coarse_label_names": [f"coarse{i}" for i in range(20)]}, f, protocol=2)
    for split, n in (("train", per_class_100[0]), ("test", per_class_100[1])):
        labels = rng.permutation(np.repeat(np.arange(100), n))
        with open(c100 / split, "wb") as f:
            pickle.dump({"batch_label": f"{split} batch", "filenames": [f"{i}.png" for i in range(len(labels))],
                         "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist(),
                         "data": _flat(_images(labels, 100, rng))}, f, protocol=2)
    c10 = root / "cifar-10-batches-py"
    c10.mkdir(parents=True)
    with open(c10 / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"], "num_cases_per_batch": 10 * per_class_10[0] // 5,
                     "num_vis": 3072}, f, protocol=2)
    # the training images spread over five batches, as in the original
    train_labels = rng.permutation(np.repeat(np.arange(10), per_class_10[0]))
    for i, labels in enumerate(np.array_split(train_labels, 5), start=1):
        with open(c10 / f"data_batch_{i}", "wb") as f:
            pickle.dump({"batch_label": f"training batch {i} of 5", "labels": labels.tolist(),
                         "data": _flat(_images(labels, 10, rng)),
                         "filenames": [f"{i}_{j}.png" for j in range(len(labels))]}, f, protocol=2)
    test_labels = rng.permutation(np.repeat(np.arange(10), per_class_10[1]))
    with open(c10 / "test_batch", "wb") as f:
        pickle.dump({"batch_label": "testing batch 1 of 1", "labels": test_labels.tolist(),
                     "data": _flat(_images(test_labels, 10, rng)),
                     "filenames": [f"t{j}.png" for j in range(len(test_labels))]}, f, protocol=2)
    return root


def one_model_per_method(params: dict) -> dict:
    """Every method once: each stage is seconds of fixed cost on a CPU, so variants of a method already
    covered (linear on the natural source, target AT from scratch) and sources then unused are left out.
    A model another one starts from (rrm's teacher) is kept first."""
    models = params["transfer"]["models"]
    keep = [m["source"] for m in models.values() if m["source"] in models]
    covered = {models[k]["method"] for k in keep}
    for name, entry in models.items():
        if entry["method"] not in covered:
            keep.append(name)
            covered.add(entry["method"])
    params["transfer"]["models"] = {k: v for k, v in models.items() if k in keep}
    used = {v["source"] for v in params["transfer"]["models"].values()}
    params["pretrain"]["sources"] = {k: v for k, v in params["pretrain"]["sources"].items() if k in used}
    params["tune"]["models"] = {k: v for k, v in params["tune"]["models"].items() if k in keep}
    params["evaluate"]["autoattack_models"] = [m for m in params["evaluate"]["autoattack_models"] if m in keep]
    return params


def tiny(params: dict, data_root: Path) -> dict:
    """The pipeline's own params with only the sizes shrunk, so one CPU core runs it in minutes.
    Methods, sources, objectives, schedules, eps and the evaluation's structure stay as they are."""
    p = one_model_per_method(json.loads(json.dumps(params)))  # on a deep copy
    p["data"].update(root=str(data_root), target_root=str(data_root), shots=4, val_shots=1)
    p["threat"].update(train_steps=1, eval_steps=2)
    p["ray"].update(num_workers=1, use_gpu=False, cpus_per_worker=2, max_failures=0)
    p["pretrain"]["train"].update(width=1, epochs=1, batch_size=100)
    for entry in p["pretrain"]["sources"].values():
        entry.pop("epochs", None)
    p["transfer"]["train"].update(epochs=2, batch_size=20)  # 2: LwF's head-only half, then all weights
    p["transfer"]["eval_size"] = 10
    for entry in p["transfer"]["models"].values():
        entry.pop("epochs", None)
    p["tune"].update(num_samples=2, max_concurrent_trials=1, workers_per_trial=1, cpus_per_worker=1,
                     clean_floor=0.0, max_clean_drop=None)
    p["evaluate"].update(images=20, steps=2, check_images=10, check_steps=3, check_restarts=1, transfer_steps=2,
                         autoattack_images=4, autoattack_steps=2, autoattack_queries=10, autoattack_top=1,
                         autoattack_models=["lwf"], batch_size=100)
    p["register"].update(min_robust_acc=0.0, min_clean_acc=0.0, require_checks=False, source_min_pgd_acc=0.0,
                         source_min_clean_acc=0.0)
    p["mlflow"]["experiment"] = "cifar-pipeline-test"
    return p


def test_the_params_are_the_papers_setting():
    """What the shrunken run cannot show: the real params keep the papers' threat model and scale."""
    p = yaml.safe_load(PARAMS.read_text())
    assert p["data"]["dataset"] == "cifar100" and p["data"]["source_classes"] == list(range(100))
    assert p["data"]["target_dataset"] == "cifar10" and p["data"]["target_classes"] == list(range(10))
    assert p["data"]["shots"] == 5000  # all of CIFAR-10's training set
    t = p["threat"]
    assert t["norm"] == "Linf" and math.isclose(t["eps"], 8 / 255) and math.isclose(t["step_size"], 2 / 255)
    assert (t["train_steps"], t["eval_steps"]) == (7, 20)
    assert p["ray"]["use_gpu"] is True and p["ray"]["num_workers"] >= 2
    train = p["pretrain"]["train"]
    assert (train["arch"], train["width"], train["amp"]) == ("wide_resnet", 10, True)
    # the papers' batch of 128 is the workers' batches together (each worker's batch_size is its own)
    assert train["batch_size"] * p["ray"]["num_workers"] == 128
    assert p["transfer"]["train"]["batch_size"] * p["ray"]["num_workers"] == 128
    assert p["pretrain"]["sources"]["robust"]["objective"] == "pgd_at"
    methods = {m["method"] for m in p["transfer"]["models"].values()}
    from robust_transfer.config import TRANSFER_METHODS, load_all

    assert methods == set(TRANSFER_METHODS)  # every method
    load_all(PARAMS)  # and every key valid


@pytest.mark.slow
def test_cifar100_to_cifar10_pipeline_runs_end_to_end_on_the_cpu(tmp_path):
    root = copy_project(tmp_path / "project")
    data_root = write_cifar(tmp_path / "datasets")
    real = yaml.safe_load(PARAMS.read_text())
    (root / PIPELINE / "params.yaml").write_text(yaml.safe_dump(tiny(real, data_root), sort_keys=False))
    proc = dvc_repro(root, f"{PIPELINE}/dvc.yaml", project_env(root), timeout=1200)
    (tmp_path / "repro.log").write_text(proc.stdout + proc.stderr)
    out = root / PIPELINE

    card = json.loads((out / "data/card.json").read_text())
    assert (card["dataset"], card["target_dataset"]) == ("cifar100", "cifar10")
    assert card["tables"]["source_train"]["rows"] == 200 and len(card["tables"]["source_train"]["counts"]) == 100
    assert card["tables"]["target_train"]["class_names"][:2] == ["airplane", "automobile"]
    assert set(card["tables"]["target_train"]["counts"].values()) == {4}
    assert card["tables"]["target_test"]["rows"] == 30

    from robust_transfer.nets import load_model

    source, _ = load_model(out / "models/robust.pt")
    assert source.head.out_features == 100 and "group3_3" in source.block_names  # a WRN-28 of CIFAR-100
    summary = json.loads((out / "metrics/summary.json").read_text())
    assert {row["method"] for row in summary} == {m["method"] for m in real["transfer"]["models"].values()}
    for name in one_model_per_method(json.loads(json.dumps(real)))["transfer"]["models"]:
        ev = json.loads((out / f"metrics/evaluate/{name}.json").read_text())
        assert 0.0 <= ev["pgd_acc"] <= 1.0 and 0.0 <= ev["clean_acc"] <= 1.0
        assert math.isclose(ev["eps"], 8 / 255) and ev["train_passes"] > 0
        net, _ = load_model(out / f"models/{name}.pt")
        assert net.head.out_features == 10
    lwf = json.loads((out / "metrics/evaluate/lwf.json").read_text())
    assert lwf["autoattack_acc"] is not None
