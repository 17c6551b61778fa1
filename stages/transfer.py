"""transfer: one target model (a `transfer.models` entry) trained by its method as a Ray Train job.

outs: models/<name>.pt, metrics/transfer_<name>.json, plots/transfer_<name>.csv
The metrics are clean accuracy on the whole target test set and PGD accuracy (eval_steps, nominal
eps) on its first `transfer.eval_size` images; the evaluate stage measures robustness in full.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from robust_transfer import engine, evaluation, tracking, tuning
from robust_transfer.config import (ConfigError, DataConfig, MlflowConfig, RayConfig, ThreatConfig, load_section,
                                    transfer_entries)
from robust_transfer.data import read_image_table, verify_card, write_json
from robust_transfer.nets import from_spec, load_model, save_model
from stages._common import run, write_history

TABLES = ("target_train", "target_val", "target_test")
TUNED = "tuned.yaml"  # the tune stage's chosen options, applied over transfer.models


def main(args, params) -> None:
    params = tuning.apply_tuned(params, read_tuned(params, args.model))
    job, info = transfer_job(args.model, params)
    method, cfg, options = info["method"], info["cfg"], info["options"]
    data_cfg, threat, card = info["data_cfg"], info["threat"], info["card"]
    source_extra, root_source = info["source_extra"], info["root_source"]
    ray_cfg = load_section(RayConfig, params, "ray")
    ml_cfg = load_section(MlflowConfig, params, "mlflow")
    run_params = {"method": method, "train": dataclasses.asdict(cfg), "options": options,
                  "threat": dataclasses.asdict(threat), "ray": dataclasses.asdict(ray_cfg)}
    tags = {"model": args.model, "method": method, "source": root_source,
            "source_run_id": source_extra.get("run_id", "")}
    with tracking.deferred_stage_run(ml_cfg, f"transfer-{args.model}", run_params, card["data_hash"], tags) as deferred:
        result = engine.fit(job, ray_cfg, Path(".checkpoints").resolve(), job["name"], while_waiting=deferred.warm)
        mlrun = deferred.open()
        net = from_spec(result.spec)
        net.load_state_dict(result.state)
        x, y = read_image_table("data/target_test.parquet").tensors()
        n = params.get("transfer", {}).get("eval_size", 1000)
        checks = engine.on_device(evaluation.stage_checks, ray_cfg, net, x, y, threat, pgd_images=n, seed=cfg.seed)
        metrics = {
            "method": method, "source": root_source, "shots": data_cfg.shots, **checks,
            "pgd_images": min(n, len(y)), "eps": threat.eps, "norm": threat.norm, "pgd_steps": threat.eval_steps,
            "train_seconds": result.seconds, "train_passes": result.passes,
            "stopped_early": result.stopped_early,
        }
        print(f"transfer {args.model} ({method} from {options['source']}): clean {metrics['clean_acc']:.3f}, "
              f"PGD-{threat.eval_steps} {metrics['pgd_acc']:.3f} in {result.seconds:.1f}s, {result.passes:.0f} passes"
              + (f"; stopped early: {result.stopped_early}" if result.stopped_early else ""))
        import mlflow

        if result.stopped_early:
            mlflow.set_tag("stopped_early", result.stopped_early)

        tracking.log_history(result.history)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        out = Path("models") / f"{args.model}.pt"
        save_model(net, result.spec, out, extra={
            "run_id": mlrun.info.run_id, "method": method, "source": root_source,
            "source_run_id": source_extra.get("run_id"), "data_hash": card["data_hash"],
            "train_seconds": result.seconds, "train_passes": result.passes})
        mlflow.log_artifact(str(out), artifact_path="checkpoint")
        write_json(metrics, Path("metrics") / f"transfer_{args.model}.json")
        write_history(result.history, Path("plots") / f"transfer_{args.model}.csv")


def transfer_job(model: str, params: dict, train_table: str = "target_train") -> tuple[dict, dict]:
    """The Ray Train job of one transfer.models entry, and what the stage records about it. The tune
    stage runs the same job with train_table="target_fit" (the shots minus the validation split)."""
    models = transfer_entries(params)
    if model not in models:
        raise ConfigError(f"transfer: no model '{model}' in transfer.models ({', '.join(models)})")
    method, cfg, options = models[model]
    data_cfg = load_section(DataConfig, params, "data")
    threat = load_section(ThreatConfig, params, "threat")
    card = verify_card("data/card.json", {t: f"data/{t}.parquet" for t in TABLES + (train_table,)})
    source_path = Path("models") / f"{options['source']}.pt"
    _, source_extra = load_model(source_path)  # also checks the checkpoint before any work
    root_source = source_extra.get("source", options["source"])  # rrm's teacher came from a source itself
    features = Path("data/features") / options["source"] / f"{train_table}.parquet"
    job = {
        "name": f"transfer-{model}", "kind": "transfer", "method": method, "options": options,
        "train": dataclasses.asdict(cfg), "threat": dataclasses.asdict(threat),
        "paths": {"train": str(Path(f"data/{train_table}.parquet").resolve()),
                  "val": str(Path("data/target_val.parquet").resolve()),
                  "source": str(source_path.resolve()),
                  "features": str(features.resolve()) if features.is_file() else None},
        "num_classes": len(data_cfg.target_classes), "source_spec": load_spec(source_path),
        "data_hash": card["data_hash"],
    }
    info = {"method": method, "cfg": cfg, "options": options, "data_cfg": data_cfg, "threat": threat,
            "card": card, "source_extra": source_extra, "root_source": root_source}
    return job, info


def read_tuned(params: dict, model: str, path: Path = Path(TUNED)) -> dict:
    """The tune stage's choices (tuned.yaml); none when the file is absent (a stage run by hand)."""
    if not path.is_file():
        tuned_models = (params.get("tune") or {}).get("models") or {}
        if model in tuned_models:
            print(f"transfer: no {path} (the tune stage's output); {model} keeps its options from params")
        return {}
    return tuning.read_tuned(path)


def load_spec(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)["spec"]


if __name__ == "__main__":
    run(main, lambda p: p.add_argument("model", help="a key of transfer.models"))
