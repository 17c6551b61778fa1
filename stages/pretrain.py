"""pretrain: one source model (a `pretrain.sources` entry) trained on the source task as a Ray Train job.

outs: models/<name>.pt, metrics/pretrain_<name>.json, plots/pretrain_<name>.csv
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from robust_transfer import engine, evaluation, tracking
from robust_transfer.config import (REGISTRY_SOURCE, ConfigError, DataConfig, MlflowConfig, RayConfig, ThreatConfig,
                                    load_section,
                                    pretrain_entries)
from robust_transfer.data import read_image_table, verify_card, write_json
from robust_transfer.nets import from_spec, save_model
from stages._common import run, write_history


def main(args, params) -> None:
    sources = pretrain_entries(params)
    if args.source not in sources:
        raise ConfigError(f"pretrain: no source '{args.source}' in pretrain.sources ({', '.join(sources)})")
    objective, cfg, options = sources[args.source]
    if objective == REGISTRY_SOURCE:
        return from_registry(args.source, options["registry"], params)
    data_cfg = load_section(DataConfig, params, "data")
    threat = load_section(ThreatConfig, params, "threat")
    ray_cfg = load_section(RayConfig, params, "ray")
    ml_cfg = load_section(MlflowConfig, params, "mlflow")
    tables = {t: Path("data") / f"{t}.parquet" for t in ("source_train", "source_test")}
    card = verify_card("data/card.json", tables)
    job = {
        "name": f"pretrain-{args.source}", "kind": "pretrain", "method": objective, "options": options,
        "train": dataclasses.asdict(cfg), "threat": dataclasses.asdict(threat),
        "paths": {"train": str(tables["source_train"].resolve()), "val": str(tables["source_test"].resolve())},
        "num_classes": len(data_cfg.source_classes), "data_hash": card["data_hash"],
    }
    run_params = {"objective": objective, "train": dataclasses.asdict(cfg), "options": options,
                  "threat": dataclasses.asdict(threat), "ray": dataclasses.asdict(ray_cfg)}
    with tracking.deferred_stage_run(ml_cfg, f"pretrain-{args.source}", run_params, card["data_hash"],
                                     tags={"source": args.source, "objective": objective}) as deferred:
        result = engine.fit(job, ray_cfg, Path(".checkpoints").resolve(), job["name"], while_waiting=deferred.warm)
        mlrun = deferred.open()
        net = from_spec(result.spec)
        net.load_state_dict(result.state)
        x, y = read_image_table(tables["source_test"]).tensors()
        metrics = {
            **engine.on_device(evaluation.stage_checks, ray_cfg, net, x, y, threat, seed=cfg.seed),
            "eps": threat.eps, "norm": threat.norm, "pgd_steps": threat.eval_steps,
            "train_seconds": result.seconds, "train_passes": result.passes,
            "stopped_early": result.stopped_early,
        }
        print(f"pretrain {args.source}: clean {metrics['clean_acc']:.3f}, "
              f"PGD-{threat.eval_steps} {metrics['pgd_acc']:.3f} (eps {threat.eps}) in {result.seconds:.0f}s")
        tracking.log_history(result.history)
        import mlflow

        mlflow.log_metrics({f"source_test_{k}": v for k, v in metrics.items() if isinstance(v, float)})
        out = Path("models") / f"{args.source}.pt"
        save_model(net, result.spec, out, extra={"run_id": mlrun.info.run_id, "objective": objective,
                                                  "data_hash": card["data_hash"], "source": args.source})
        mlflow.log_artifact(str(out), artifact_path="checkpoint")
        write_json(metrics, Path("metrics") / f"pretrain_{args.source}.json")
        write_history(result.history, Path("plots") / f"pretrain_{args.source}.csv")


def from_registry(source: str, uri: str, params: dict) -> None:
    """A `registry:` source (`pretrain.sources.<source>: {registry: models:/<name>@champion}`): the
    registered version's state-dict checkpoint is downloaded instead of training one, and measured
    again on this pipeline's source test set. The same outs as training, so the DAG is unchanged;
    DVC cannot see an alias move: pin `models:/<name>/<version>` or `dvc repro -f pretrain@<source>`."""
    import tempfile

    import mlflow
    import torch
    from mlflow import MlflowClient

    from robust_transfer.nets import load_model

    key = f"pretrain.sources.{source}.registry"
    data_cfg = load_section(DataConfig, params, "data")
    threat = load_section(ThreatConfig, params, "threat")
    ray_cfg = load_section(RayConfig, params, "ray")
    ml_cfg = load_section(MlflowConfig, params, "mlflow")
    tables = {t: Path("data") / f"{t}.parquet" for t in ("source_train", "source_test")}
    card = verify_card("data/card.json", tables)
    x, y = read_image_table(tables["source_test"]).tensors()
    with tracking.stage_run(ml_cfg, f"pretrain-{source}", {"registry": uri}, card["data_hash"],
                            tags={"source": source, "objective": REGISTRY_SOURCE, "registry_uri": uri}) as mlrun:
        with tempfile.TemporaryDirectory() as tmp:
            path, version = tracking.download_checkpoint(MlflowClient(), uri, key, Path(tmp))
            net, extra = load_model(path)
            spec = torch.load(path, map_location="cpu", weights_only=True)["spec"]
        want = {"in_channels": x.shape[1], "image_size": x.shape[2], "num_classes": len(data_cfg.source_classes)}
        got = {k: spec.get(k) for k in want}
        if got != want:
            raise ConfigError(f"{key}: {uri} (version {version.version}) is a model for {got}, but this pipeline's "
                              f"source task has {want}")
        tags = version.tags
        metrics = {
            **engine.on_device(evaluation.stage_checks, ray_cfg, net, x, y, threat, seed=data_cfg.seed),
            "eps": threat.eps, "norm": threat.norm, "pgd_steps": threat.eval_steps,
            "train_seconds": json.loads(tags.get("train_seconds", "null")),
            "train_passes": json.loads(tags.get("train_passes", "null")),
            "registry_uri": uri, "registry_name": version.name, "registry_version": int(version.version),
            "same_data": extra.get("data_hash") == card["data_hash"],
        }
        print(f"pretrain {source}: from the registry, {version.name} v{version.version} ({uri}): clean "
              f"{metrics['clean_acc']:.3f}, PGD-{threat.eval_steps} {metrics['pgd_acc']:.3f} (eps {threat.eps})"
              + ("" if metrics["same_data"] else "; it was trained on other data than data/card.json's"))
        mlflow.log_metrics({f"source_test_{k}": metrics[k] for k in ("clean_acc", "pgd_acc")})
        out = Path("models") / f"{source}.pt"
        # `source` is this pipeline's name for it (evaluate finds the attacker's model by it); the
        # original training run stays the lineage (run_id).
        save_model(net, spec, out, extra={**extra, "source": source, "objective": extra.get("objective", REGISTRY_SOURCE),
                                          "registry_uri": f"models:/{version.name}/{version.version}",
                                          "download_run_id": mlrun.info.run_id})
        write_json(metrics, Path("metrics") / f"pretrain_{source}.json")
        write_history([{"epoch": 0, "val_clean_acc": metrics["clean_acc"], "val_pgd_acc": metrics["pgd_acc"]}],
                      Path("plots") / f"pretrain_{source}.csv")


if __name__ == "__main__":
    run(main, lambda p: p.add_argument("source", help="a key of pretrain.sources"))
