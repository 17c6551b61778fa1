"""evaluate: the honest robustness numbers of every transferred model (the keys of `transfer.models`).

outs: metrics/evaluate/<name>.json, plots/evaluate/<name>.csv and <name>.png, for each model
Clean accuracy on the whole target test set; on `evaluate.images` of its images a PGD curve over an
eps grid, PGD at the nominal eps, the transfer attack from the public source model and the
gradient-masking checks; AutoAttack on the models the rule below selects. One MLflow run per model,
tagged with the checks' verdict.

Which models get AutoAttack: the best `evaluate.autoattack_top` of all transferred models by the
PGD accuracy their transfer stage measured (metrics/transfer_<m>.json, on transfer.eval_size
images; ties by name), plus every model in `evaluate.autoattack_models`. Every model's evaluation
thus depends on all models, so one stage evaluates them all, one after the other in one process:
it depends on models/ (written with those metrics by the transfer stages), and one process pays the
start-up (Python, torch, MLflow, matplotlib: ~3-4 s on 2 cores) once rather than once per model.
`python -m stages.evaluate lwf finetune` evaluates only the models named (by hand; DVC runs all).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from robust_transfer import engine, evaluation, tracking
from robust_transfer.config import (ConfigError, DataConfig, MlflowConfig, RayConfig, ThreatConfig, evaluate_config,
                                    load_section, transfer_entries)
from robust_transfer.data import read_image_table, verify_card, write_json
from robust_transfer.nets import load_model
from stages._common import run

METRICS = Path("metrics") / "evaluate"  # <model>.json
PLOTS = Path("plots") / "evaluate"  # <model>.csv (a DVC plot) and <model>.png


def transfer_metrics(name: str) -> dict:
    path = Path("metrics") / f"transfer_{name}.json"
    if not path.is_file():
        raise ConfigError(f"missing {path}; run the transfer stage for '{name}' first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"{path} is not valid JSON; re-run the transfer stage for '{name}'") from None


def main(args, params) -> None:
    import torch

    models = transfer_entries(params)
    names = args.models or list(models)
    unknown = [m for m in names if m not in models]
    if unknown:
        raise ConfigError(f"evaluate: no model '{unknown[0]}' in transfer.models ({', '.join(models)})")
    setup = {"cfg": evaluate_config(params), "data_cfg": load_section(DataConfig, params, "data"),
             "threat": load_section(ThreatConfig, params, "threat"),
             "ml_cfg": load_section(MlflowConfig, params, "mlflow"),
             "ray_cfg": load_section(RayConfig, params, "ray"),
             "card": verify_card("data/card.json", {"target_test": "data/target_test.parquet"})}
    cfg = setup["cfg"]
    # Every input is checked before the first attack: a missing model or metrics file stops the stage
    # at once, not after the models before it have been evaluated.
    checkpoints = {m: load_model(Path("models") / f"{m}.pt") for m in names}
    trained = {m: transfer_metrics(m) for m in models}
    ranking = {m: float(trained[m].get("pgd_acc", float("nan"))) for m in models}
    ranking = {m: (v if v == v else -1.0) for m, v in ranking.items()}  # NaN ranks last
    selected = evaluation.autoattack_selection(ranking, cfg.autoattack_top, cfg.autoattack_models)
    torch.set_grad_enabled(True)
    x_all, y_all = read_image_table("data/target_test.parquet").tensors()
    idx = evaluation.eval_indices(y_all, cfg.images, cfg.seed)
    test = {"x_all": x_all, "y_all": y_all, "x": x_all[idx], "y": y_all[idx]}
    sources = {}  # the public source models, each loaded once for all the models transferred from it
    for i, name in enumerate(names, 1):
        print(f"evaluate: model {i} of {len(names)}: {name}", flush=True)
        net, extra = checkpoints.pop(name)  # each model is freed once evaluated
        evaluate_one(name, models[name][0], net, extra, trained[name], test, selected, sources, **setup)


def evaluate_one(name: str, method: str, net, extra: dict, own: dict, test: dict, selected: list[str],
                 sources: dict, cfg, data_cfg, threat, ml_cfg, ray_cfg, card: dict) -> None:
    """One model (`own`: its transfer stage's metrics): its numbers, curve, checks and MLflow run.
    `sources` caches the source models by name across calls."""
    run_autoattack = name in selected
    # The public model the attacker holds: the root source (rrm's teacher is itself a transfer model).
    source_name = extra.get("source") or own.get("source")
    if source_name not in sources:
        sources[source_name] = load_model(Path("models") / f"{source_name}.pt")[0]
    source = sources[source_name]
    x_all, y_all, x, y = test["x_all"], test["y_all"], test["x"], test["y"]
    n_classes = len(data_cfg.target_classes)
    logits = evaluation.labels_match(data_cfg)

    run_params = {"evaluate": dataclasses.asdict(cfg), "threat": dataclasses.asdict(threat),
                  "autoattack_selected": selected, "source_model": source_name}
    tags = {"model": name, "method": method, "source": source_name,
            "model_run_id": extra.get("run_id", ""), "autoattack": str(run_autoattack).lower()}
    with tracking.deferred_stage_run(ml_cfg, f"evaluate-{name}", run_params, card["data_hash"], tags) as deferred:
        deferred.warm()  # MLflow's set-up runs while the attacks do (PyTorch releases the GIL in its kernels)
        clean_acc, result = engine.on_device(
            evaluation.evaluate_with_clean_accuracy, ray_cfg, net, x_all, y_all, x, y, threat, cfg, n_classes,
            source=source, source_logits=logits, run_autoattack=run_autoattack, desc=f"evaluate-{name}")
        mlrun = deferred.open()
        import mlflow
        checks_passed = result["checks_passed"]
        metrics = {
            "model": name, "method": method, "source": source_name, "shots": own.get("shots", data_cfg.shots),
            "clean_acc": clean_acc, "clean_acc_pgd_images": result.pop("clean_acc"),
            **result,
            "autoattack_selected": selected,
            "train_seconds": own.get("train_seconds", extra.get("train_seconds")),
            "train_passes": own.get("train_passes", extra.get("train_passes")),
            # the transfer stage's checks (PGD on more images than `evaluate.images`): the report's claims
            "transfer_check": {k: own.get(k) for k in ("clean_acc", "pgd_acc", "pgd_images")},
            "eps": threat.eps, "norm": threat.norm, "test_images": len(y_all),
            "model_run_id": extra.get("run_id"), "run_id": mlrun.info.run_id, "data_hash": card["data_hash"],
        }
        failed = [c for c, check in metrics["checks"].items() if not check["passed"]]
        mlflow.set_tag("checks_passed", str(checks_passed).lower())
        if failed:
            mlflow.set_tag("checks_failed", ",".join(failed))
        mlflow.log_metrics({k: float(metrics[k]) for k in ("clean_acc", "pgd_acc", "autoattack_acc", "transfer_asr",
                                                          "whitebox_asr") if metrics[k] is not None})
        for i, point in enumerate(metrics["pgd_curve"]):
            mlflow.log_metric("pgd_curve_acc", point["acc"], step=i)

        curve_csv = PLOTS / f"{name}.csv"
        curve_png = PLOTS / f"{name}.png"
        write_curve_csv(metrics["pgd_curve"], curve_csv)
        plot_curve(metrics, curve_png)
        out = METRICS / f"{name}.json"
        write_json(metrics, out)
        for path in (out, curve_csv, curve_png):
            mlflow.log_artifact(str(path), artifact_path="evaluate")
    aa = "not run" if metrics["autoattack_acc"] is None else f"{metrics['autoattack_acc']:.3f}"
    print(f"evaluate {name}: clean {clean_acc:.3f}, PGD-{cfg.steps} {metrics['pgd_acc']:.3f} "
          f"(eps {threat.eps}, {len(y)} images), AutoAttack {aa}, transfer ASR {metrics['transfer_asr']:.3f}, "
          f"checks {'passed' if checks_passed else 'FAILED: ' + ', '.join(failed)}; {metrics['seconds']}")


def write_curve_csv(curve: list[dict], path: Path) -> None:
    from robust_transfer.data import atomic_path
    import os

    tmp = atomic_path(path)
    tmp.write_text("eps,acc\n" + "".join(f"{p['eps']},{p['acc']:.6f}\n" for p in curve))
    os.replace(tmp, path)


def plot_curve(metrics: dict, path: Path) -> None:
    """The model's PGD curve; the title carries its headline numbers (so the PNG changes when they do:
    the report stage depends on plots/)."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from robust_transfer.data import atomic_path

    curve = metrics["pgd_curve"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p["eps"] for p in curve], [p["acc"] for p in curve], marker="o", label=f"PGD-{metrics['pgd_steps']}")
    if metrics["autoattack_acc"] is not None:
        ax.scatter([metrics["eps"]], [metrics["autoattack_acc"]], color="red", marker="x", zorder=3,
                   label=f"AutoAttack ({metrics['autoattack_images']} images)")
    ax.axvline(metrics["eps"], color="grey", lw=0.8, ls=":")
    ax.set_xlabel(f"eps ({metrics['norm']})")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    aa = "-" if metrics["autoattack_acc"] is None else f"{metrics['autoattack_acc']:.3f}"
    ax.set_title(f"{metrics['model']}: clean {metrics['clean_acc']:.3f}, PGD {metrics['pgd_acc']:.3f}, AA {aa}\n"
                 f"transfer ASR {metrics['transfer_asr']:.3f}, checks "
                 f"{'passed' if metrics['checks_passed'] else 'FAILED'}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = atomic_path(path)
    fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)


if __name__ == "__main__":
    run(main, lambda p: p.add_argument("models", nargs="*", help="keys of transfer.models (default: all)"))
