"""register: every transferred model (and source) into the MLflow model registry, behind a robustness gate.

deps: models/ (checkpoints), metrics/ (evaluate/<model>.json, pretrain_<source>.json)
outs: registry/register.json (what was registered, each gate verdict, the champion)

Each transferred model becomes a version of `register.name` (default "<dataset>-<target classes>-robust"),
logged with `mlflow.pytorch.log_model` (signature, input example, normalisation inside: consumers feed
raw [0, 1] NCHW float32 images) and tagged with its evaluate numbers. The alias `champion` moves to
the best version of this run that passes the gate (robust floor, clean floor, sanity checks); a
version that fails keeps its tags and gets no alias. When none passes the previous champion stays,
the stage says so in one line and exits 1, or 0 if `register.allow_gate_failure` says so.
Each trained source becomes a version of its own name ("<dataset>-<source classes>-<source>-source"),
with `champion` when its PGD and clean accuracy pass the source floors.
A checkpoint already registered (same sha256 tag) is not registered again: its tags are refreshed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from robust_transfer import tracking
from robust_transfer.config import (REGISTRY_SOURCE, ConfigError, DataConfig, MlflowConfig, load_section,
                                    pretrain_entries, register_config, transfer_entries)
from robust_transfer.data import read_image_table, sha256_file, verify_card, write_json
from robust_transfer.nets import load_model
from stages._common import run

OUT = Path("registry") / "register.json"
EXAMPLE_IMAGES = 2  # > 1: the exported graph keeps a dynamic batch dimension


def read_metrics(path: Path, stage: str) -> dict:
    """A stage's metrics JSON; `stage` names what writes it ("evaluate stage for 'lwf'")."""
    if not path.is_file():
        raise ConfigError(f"missing {path}; run the {stage} first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"{path} is not valid JSON; re-run the {stage}") from None


def main(args, params) -> None:
    import numpy as np
    from mlflow import MlflowClient

    cfg = register_config(params)
    data_cfg = load_section(DataConfig, params, "data")
    ml_cfg = load_section(MlflowConfig, params, "mlflow")
    models = transfer_entries(params)
    sources = [s for s, (objective, _, _) in pretrain_entries(params).items() if objective != REGISTRY_SOURCE]
    card = verify_card("data/card.json", {"target_test": "data/target_test.parquet"})
    name = cfg.name or tracking.default_model_name(data_cfg)

    # Every input is read and checked before the registry is touched.
    jobs = []
    for model in models:
        measured = Path("metrics") / "evaluate" / f"{model}.json"
        metrics = read_metrics(measured, f"evaluate stage ('{model}' is in transfer.models)")
        if metrics.get("model", model) != model:
            raise ConfigError(f"{measured} is about model '{metrics.get('model')}', not '{model}'")
        if metrics.get("data_hash") not in (None, card["data_hash"]):
            raise ConfigError(f"{measured} was measured on other data (data_hash differs from "
                              f"data/card.json); re-run the evaluate stage")
        path = Path("models") / f"{model}.pt"
        net, extra = load_model(path)
        metrics = {**metrics, "source_run_id": extra.get("source_run_id")}
        jobs.append((model, net, path, metrics))
    source_jobs = []
    if cfg.sources:
        for source in sources:
            metrics = read_metrics(Path("metrics") / f"pretrain_{source}.json", f"pretrain stage for '{source}'")
            path = Path("models") / f"{source}.pt"
            net, extra = load_model(path)
            source_jobs.append((source, net, path, metrics, extra))
    table = read_image_table("data/target_test.parquet")
    example = table.tensors()[0][:EXAMPLE_IMAGES].numpy().astype(np.float32)
    source_table = read_image_table("data/source_test.parquet") if source_jobs else None

    summary = {"name": name, "gate": {"robust_metric": cfg.robust_metric, "min_robust_acc": cfg.min_robust_acc,
                                      "min_clean_acc": cfg.min_clean_acc, "require_checks": cfg.require_checks},
               "versions": {}, "champion": None, "sources": {}}
    run_params = {"register": {k: v for k, v in vars(cfg).items() if k != "source_names"}, "name": name}
    with tracking.stage_run(ml_cfg, "register", run_params, card["data_hash"], tags={"registered_model": name}):
        client = MlflowClient()
        tracking.ensure_registered_model(client, name, f"Robust models for {name}: transferred by robust_transfer, "
                                                       f"input {tracking.INPUT_DOC}. Alias '{tracking.CHAMPION}': "
                                                       f"the best version passing the robustness gate.")
        candidates = []
        for model, net, path, metrics in jobs:
            reasons = tracking.gate(metrics, cfg)
            version, status = register_one(client, name, model, net, path,
                                           tracking.transfer_tags(metrics, reasons, cfg, sha256_file(path)),
                                           example, table.class_names)
            candidates.append((version, metrics, reasons))
            verdict = "gate passed" if not reasons else "gate failed: " + "; ".join(reasons)
            print(f"register {name} v{version.version} {model}: {status}, {verdict}")
            summary["versions"][model] = {"version": int(version.version), "status": status,
                                          "gate_passed": not reasons, "reasons": reasons}
        best = tracking.best_passing(candidates, cfg.robust_metric)
        previous = tracking.champion_version(client, name)
        if best is not None:
            client.set_registered_model_alias(name, tracking.CHAMPION, best.version)
            model = best.tags["model"]
            summary["champion"] = {"version": int(best.version), "model": model,
                                   **{k: json.loads(best.tags[k]) for k in ("clean_acc", cfg.robust_metric)}}
            moved = "stays at" if previous is not None and previous.version == best.version else "->"
            print(f"register: {name}@{tracking.CHAMPION} {moved} v{best.version} ({model}: "
                  f"{cfg.robust_metric} {summary['champion'][cfg.robust_metric]:.4f}, "
                  f"clean_acc {summary['champion']['clean_acc']:.4f})")
        for source, net, path, metrics, extra in source_jobs:
            summary["sources"][source] = register_source(client, cfg, data_cfg, source, net, path, metrics, extra,
                                                         source_table)

    if best is None:
        kept = "there is no champion"
        if previous is not None:
            kept = f"the champion stays v{previous.version}"
            if previous.tags.get("gate", "").startswith("failed"):
                kept += " (which fails the current gate too)"
        summary["champion"] = ({"version": int(previous.version), "model": previous.tags.get("model"), "kept": True}
                               if previous is not None else None)
        write_json(summary, OUT)
        line = f"register: no version of {name} passes the gate ({cfg.robust_metric} >= {cfg.min_robust_acc}, " \
               f"clean_acc >= {cfg.min_clean_acc}{', sanity checks' if cfg.require_checks else ''}); {kept}"
        if not cfg.allow_gate_failure:
            print(f"error: {line} (register.allow_gate_failure is false)", file=sys.stderr)
            sys.exit(1)
        print(line)
        return
    write_json(summary, OUT)


def register_one(client, name: str, artifact: str, net, path: Path, tags: dict, example, class_names) -> tuple:
    """(version, status): a new version for a new checkpoint, else the existing one with its tags refreshed."""
    existing = tracking.version_with_sha(tracking.registered_versions(client, name), tags["checkpoint_sha256"])
    if existing is None:
        return tracking.log_and_register(net, name, artifact, tags, path, example, class_names), "new"
    changed = tracking.update_tags(client, existing, tags)
    return existing, "already registered, tags updated" if changed else "already registered"


def register_source(client, cfg, data_cfg, source, net, path, metrics, extra, table) -> dict:
    import numpy as np

    name = cfg.source_names.get(source) or tracking.default_source_name(data_cfg, source)
    tracking.ensure_registered_model(client, name, f"Source model '{source}' of robust_transfer, input "
                                                   f"{tracking.INPUT_DOC}. Alias '{tracking.CHAMPION}': the latest "
                                                   f"version passing the source gate (PGD and clean accuracy floors).")
    reasons = tracking.source_gate(metrics, cfg)
    tags = tracking.source_tags(source, metrics, extra, reasons, sha256_file(path))
    example = table.tensors()[0][:EXAMPLE_IMAGES].numpy().astype(np.float32)
    version, status = register_one(client, name, source, net, path, tags, example, table.class_names)
    if not reasons:
        client.set_registered_model_alias(name, tracking.CHAMPION, version.version)
    verdict = f"gate passed, {name}@{tracking.CHAMPION}" if not reasons else "gate failed: " + "; ".join(reasons)
    print(f"register {name} v{version.version} (source {source}): {status}, {verdict}")
    return {"name": name, "version": int(version.version), "status": status, "gate_passed": not reasons,
            "reasons": reasons}


if __name__ == "__main__":
    run(main)
