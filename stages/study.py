"""study: the data-efficiency study -- robust accuracy and compute against target shots per class.

Not a DVC stage but a driver of DVC experiments: one experiment of pipelines/data-efficiency/ (the
default task, every method) per shots level, each `dvc exp run --temp` up to the report stage, so
every level is an ordinary, cached, reproducible DVC experiment (`dvc exp show` lists them), and a
summary that reads their committed metrics and draws robust accuracy (PGD, and AutoAttack where the
evaluate stage ran it) against shots, one line per model, with the training compute beside it.

    python -m stages.study run [--shots 5 10 20 50 100 500] [--models lwf target_at_scratch ...] [--steps 120]
                               [--set evaluate.autoattack_top=1 ...]
    python -m stages.study collect          # re-draw from the experiments already run
    python -m stages.study run --dry-run    # print the `dvc exp run` commands, run nothing

Every level trains each model for the same number of optimiser steps (`--steps`): epochs = steps /
batches per epoch, rounded up (at 20 shots and 120 steps that is the default pipeline's 30 epochs).
A model therefore costs about the same at every level, and more shots means fewer passes over more
images. See docs/data-efficiency.md for the protocol, the timings and the results.
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from robust_transfer.config import ConfigError, load_all, transfer_entries

PIPELINE = Path("pipelines/data-efficiency")
SHOTS = [5, 10, 20, 50, 100, 500]
STEPS = 120  # the default pipeline's budget: 30 epochs of ceil(100 / 32) = 4 batches at 20 shots
NAME = "de-shots-{shots}"  # experiment names; a level run again replaces its experiment
OUT = Path("study")  # under the pipeline: efficiency.csv, efficiency.png, efficiency.md, run.json
TARGET_AT = "target_at"  # the method the transfer methods are measured against


# ----------------------------------------------------------------------------- one level's overrides
@dataclass
class Level:
    """The parameter changes of one shots level: `sets` (dotted key -> value) and `deletes` (dotted keys)."""

    shots: int
    sets: dict[str, Any] = field(default_factory=dict)
    deletes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return NAME.format(shots=self.shots)

    def hydra(self, params_file: str) -> list[str]:
        """`dvc exp run -S` arguments (Hydra's override grammar: `key=value`, `~key` deletes)."""
        return ([f"{params_file}:{k}={_hydra_value(v)}" for k, v in self.sets.items()]
                + [f"{params_file}:~{k}" for k in self.deletes])

    def apply(self, params: dict) -> dict:
        """The params this level's experiment runs with (what DVC writes into its params.yaml)."""
        out = copy.deepcopy(params)
        for key in self.deletes:
            *parents, last = key.split(".")
            node = out
            for p in parents:
                node = node[p]
            del node[last]
        for key, value in self.sets.items():
            *parents, last = key.split(".")
            node = out
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
        return out


def _hydra_value(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ",".join(_hydra_value(x) for x in v) + "]"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def needed_models(params: dict, models: Optional[list[str]]) -> list[str]:
    """The models asked for plus what they start from (rrm's teacher is a transfer model), in params order."""
    entries = (params.get("transfer") or {}).get("models") or {}
    if not models:
        return list(entries)
    unknown = [m for m in models if m not in entries]
    if unknown:
        raise ConfigError(f"--models: {', '.join(unknown)} not in transfer.models ({', '.join(entries)})")
    keep = set(models)
    todo = list(models)
    while todo:
        source = (entries[todo.pop()] or {}).get("source")
        if source in entries and source not in keep:
            keep.add(source)
            todo.append(source)
    return [m for m in entries if m in keep]


def epochs_for(shots: int, n_classes: int, batch_size: int, steps: int) -> int:
    """Epochs that give at least `steps` optimiser steps on shots x classes images (at least 1)."""
    batches = math.ceil(shots * n_classes / batch_size)
    return max(1, math.ceil(steps / batches))


def level(params: dict, shots: int, steps: int, models: Optional[list[str]] = None,
          extra: Optional[dict[str, Any]] = None) -> Level:
    """One shots level: data.shots (val_shots kept below it), the epochs that give `steps` optimiser
    steps, the models (and the sources, tune entries and AutoAttack picks) outside `models` removed,
    and any `extra` settings (dotted key -> value) for every level."""
    data, transfer = params["data"], params["transfer"]
    n_classes = len(data["target_classes"])
    keep = needed_models(params, models)
    lv = Level(shots)
    lv.sets["data.shots"] = shots
    # tune's validation split comes out of the shots: a quarter of them at most, at least one
    lv.sets["data.val_shots"] = max(1, min(int(data.get("val_shots", 1)), shots // 4))
    base = transfer.get("train") or {}
    epochs = epochs_for(shots, n_classes, int(base.get("batch_size", 128)), steps)
    lv.sets["transfer.train.epochs"] = epochs
    if "val_every" in base:  # as many validations per model as at the params' epochs (not 4 times as many at 5 shots)
        lv.sets["transfer.train.val_every"] = max(1, round(int(base["val_every"]) * epochs / int(base.get("epochs", 4))))
    # A model whose loss diverges (seen: LwF at 5 shots) ends on its last validated weights, marked in the
    # table, rather than failing its stage and with it the level's other models (and the tune trials too).
    lv.sets["transfer.train.on_nonfinite"] = "rollback"
    for name, entry in transfer["models"].items():
        entry = entry or {}
        if name not in keep:
            lv.deletes.append(f"transfer.models.{name}")
        elif "epochs" in entry or "batch_size" in entry:  # an entry's own schedule gets its own epochs
            bs = int(entry.get("batch_size", base.get("batch_size", 128)))
            lv.sets[f"transfer.models.{name}.epochs"] = epochs_for(shots, n_classes, bs, steps)
    for name in (params.get("tune") or {}).get("models") or {}:
        if name not in keep:
            lv.deletes.append(f"tune.models.{name}")
    sources = {(transfer["models"][m] or {}).get("source") for m in keep}
    for name in (params.get("pretrain") or {}).get("sources") or {}:
        if name not in sources:
            lv.deletes.append(f"pretrain.sources.{name}")
    picks = (params.get("evaluate") or {}).get("autoattack_models")
    if picks and any(m not in keep for m in picks):
        lv.sets["evaluate.autoattack_models"] = [m for m in picks if m in keep]
    lv.sets.update(extra or {})
    return lv


def parse_sets(items: list[str]) -> dict[str, Any]:
    """`--set evaluate.autoattack_top=1` -> {"evaluate.autoattack_top": 1} (values parsed as YAML)."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key or key.startswith("~"):
            raise ConfigError(f"--set {item!r}: expected key=value (a dotted params key)")
        out[key.strip()] = yaml.safe_load(value)
    return out


def check_level(params: dict, lv: Level) -> dict:
    """Validate the level's params exactly as every stage will (load_all), before anything runs."""
    applied = lv.apply(params)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(applied, f, sort_keys=False)
    try:
        load_all(f.name)
    except ConfigError as exc:
        raise ConfigError(f"shots {lv.shots}: {exc}") from None
    finally:
        os.unlink(f.name)
    return applied


# ----------------------------------------------------------------------------- running the experiments
def git(*args: str, root: Path, check: bool = True) -> str:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ConfigError(f"git {' '.join(args)}: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return proc.stdout


def dvc_bin() -> str:
    here = Path(sys.executable).parent / "dvc"
    return str(here) if here.exists() else "dvc"


# What the sources' training depends on (pretrain's params, and prepare's for the source tables).
# A level changes data.shots and data.val_shots only: the source tables stay byte for byte the same.
SOURCE_KEYS = ("threat", "ray", "pretrain.train")
LEVEL_DATA_KEYS = ("shots", "val_shots")


def _dotted(params: dict, key: str) -> Any:
    node = params
    for part in key.split("."):
        node = (node or {}).get(part)
    return node


def shared_sources(params: dict, applied: list[dict]) -> tuple[list[str], str]:
    """The sources every level trains exactly as the workspace would, so one `dvc repro` of their
    pretrain stages in the workspace serves every level; and, when there are none, why.

    Each level is a DVC experiment in a fresh temporary copy of the workspace. DVC's run cache does
    not restore the pretrain stage there (it has `cache: false` outputs), but the copy does carry the
    workspace's dvc.lock and untracked metrics: a source trained in the workspace first is checked
    out from the cache in every copy, instead of trained again at every level (~2 min each)."""
    data = {k: v for k, v in params["data"].items() if k not in LEVEL_DATA_KEYS}
    for lv in applied:
        changed = [k for k in SOURCE_KEYS if _dotted(lv, k) != _dotted(params, k)]
        changed += [f"data.{k}" for k, v in lv["data"].items() if k not in LEVEL_DATA_KEYS and data.get(k) != v]
        if changed:
            return [], f"--set changes {', '.join(changed)}, so every level trains its own sources"
    names = [n for n in (params.get("pretrain") or {}).get("sources") or {}
             if any(n in ((lv.get("pretrain") or {}).get("sources") or {}) and
                    lv["pretrain"]["sources"][n] == params["pretrain"]["sources"][n] for lv in applied)]
    return names, "" if names else "no level keeps a source of the params"


def train_sources(root: Path, pipeline: Path, names: list[str], env: dict, dry_run: bool) -> Optional[dict]:
    """`dvc repro <pipeline>/dvc.yaml:pretrain@<name> ...` in the workspace (see shared_sources)."""
    if not names:
        return None
    cmd = [dvc_bin(), "repro", *[f"{pipeline.as_posix()}/dvc.yaml:pretrain@{n}" for n in names]]
    print("study: the sources, once for every level: " + " ".join(cmd), flush=True)
    if dry_run:
        return None
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise ConfigError(f"training the sources failed (dvc repro exit {proc.returncode}); see its output above")
    print(f"study: sources {', '.join(names)} ready in {seconds:.0f}s", flush=True)
    return {"shots": None, "experiment": "sources: " + ", ".join(names), "seconds": round(seconds, 1),
            "returncode": 0}


def run_levels(root: Path, pipeline: Path, levels: list[Level], dry_run: bool,
               sources: Optional[list[str]] = None) -> list[dict]:
    """`dvc exp run --temp <pipeline>/dvc.yaml:report -n de-shots-<n> -S ...`, one level after the other
    (in the foreground: each finishes before the next starts, and its wall time is recorded)."""
    params_file = (pipeline / "params.yaml").as_posix()
    env = dict(os.environ)
    # The experiments run in temporary copies under .dvc/tmp/exps: keep their MLflow runs (and, by
    # creating the MLflow experiment here first, their artifacts) in this project, not in the copies.
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    if not dry_run:
        ensure_mlflow_experiment(env["MLFLOW_TRACKING_URI"], mlflow_experiment_name(root, pipeline), root)
    if not dry_run and git("rev-parse", "--verify", "HEAD", root=root, check=False) == "":
        raise ConfigError("the project has no commit: DVC experiments start from one (git commit first)")
    # No warning about uncommitted or untracked files: `dvc exp run` copies the workspace as it is
    # (shared_sources relies on it, tests/test_study.py checks it).
    done = []
    trained = train_sources(root, pipeline, sources or [], env, dry_run)
    if trained:
        done.append(trained)
    for lv in levels:
        cmd = [dvc_bin(), "exp", "run", "--temp", f"{pipeline.as_posix()}/dvc.yaml:report", "-n", lv.name]
        for arg in lv.hydra(params_file):
            cmd += ["-S", arg]
        print("study: " + " ".join(_quote(c) for c in cmd), flush=True)
        if dry_run:
            continue
        subprocess.run([dvc_bin(), "exp", "remove", lv.name], cwd=root, env=env, capture_output=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=root, env=env)
        seconds = time.perf_counter() - start
        done.append({"shots": lv.shots, "experiment": lv.name, "seconds": round(seconds, 1),
                     "returncode": proc.returncode})
        print(f"study: shots {lv.shots}: {'done' if proc.returncode == 0 else 'FAILED'} in {seconds:.0f}s", flush=True)
        if proc.returncode != 0:
            raise ConfigError(f"the experiment of shots {lv.shots} failed (dvc exp run exit {proc.returncode}); "
                              f"see its output above")
    return done


def mlflow_experiment_name(root: Path, pipeline: Path) -> str:
    params = yaml.safe_load((root / pipeline / "params.yaml").read_text())
    return ((params.get("mlflow") or {}).get("experiment")) or "robust-transfer"


def ensure_mlflow_experiment(uri: str, name: str, root: Path) -> None:
    """Create the MLflow experiment with its artifacts in <project>/mlartifacts (a local store), as the
    stages would from the project itself; from inside a temporary experiment copy they would put them there."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(name) is None:
        location = (root / "mlartifacts").as_uri() if uri.startswith("sqlite:") else None
        mlflow.create_experiment(name, artifact_location=location)


def _quote(s: str) -> str:
    return f"'{s}'" if any(c in s for c in " []~") else s


# ----------------------------------------------------------------------------- collecting the results
@dataclass
class Experiment:
    name: str
    rev: str
    time: int  # commit time (unix)


def experiments(root: Path, all_baselines: bool = False) -> list[Experiment]:
    """The study's experiments (refs/exps/<baseline>/de-shots-<n>), of the current commit by default."""
    head = git("rev-parse", "HEAD", root=root, check=False).strip()
    out = git("for-each-ref", "--format=%(refname)%09%(objectname)%09%(committerdate:unix)", "refs/exps/",
              root=root, check=False)
    found = []
    for line in out.splitlines():
        ref, rev, when = line.split("\t")
        parts = ref.split("/")  # refs exps <sha[:2]> <sha[2:]> <name>
        if len(parts) < 5 or not parts[-1].startswith(NAME.split("{")[0]):
            continue
        if not all_baselines and parts[2] + parts[3] != head:
            continue
        found.append(Experiment(parts[-1], rev, int(when)))
    return found


def read_at(root: Path, rev: str, path: Path) -> Optional[str]:
    proc = subprocess.run(["git", "show", f"{rev}:{path.as_posix()}"], cwd=root, capture_output=True, text=True)
    return proc.stdout if proc.returncode == 0 else None


def level_rows(params: dict, read) -> list[dict]:
    """One row per transfer model of one experiment. `read(relative path)` returns a file's text or None.
    From metrics/summary.json (the report stage's, one entry per transfer.models key in order), else
    from each model's metrics/transfer_<m>.json (no AutoAttack there)."""
    models = transfer_entries(params)
    epochs = {m: cfg.epochs for m, (_, cfg, _) in models.items()}
    summary = read("metrics/summary.json")
    pgd_images = ((params.get("evaluate") or {}).get("images"))  # the evaluate stage's PGD images (null: all)
    rows = []
    if summary:
        entries = json.loads(summary)
        if isinstance(entries, dict):  # keyed by model, should the report stage write it that way
            entries = [dict(v, model=k) for k, v in entries.items()]
        for name, entry in zip(models, entries):
            if entry.get("model", name) != name or entry.get("method") != models[name][0]:
                raise ConfigError(f"metrics/summary.json does not list transfer.models in order ({name})")
            rows.append(dict(entry, model=name, epochs=epochs[name], pgd_images=pgd_images, from_file="summary.json",
                             stopped_early=_stopped_early(read, name)))
        if len(rows) == len(models):
            return rows
    rows = []
    for name, (method, _, _) in models.items():
        text = read(f"metrics/transfer_{name}.json")
        if text is None:
            continue
        m = json.loads(text)
        rows.append({"model": name, "method": method, "source": m.get("source"), "shots": m.get("shots"),
                     "clean_acc": m.get("clean_acc"), "pgd_acc": m.get("pgd_acc"), "autoattack_acc": None,
                     "transfer_asr": None, "checks_passed": None, "train_seconds": m.get("train_seconds"),
                     "train_passes": m.get("train_passes"), "epochs": epochs[name], "pgd_images": m.get("pgd_images"),
                     "stopped_early": m.get("stopped_early"), "from_file": f"transfer_{name}.json"})
    return rows


def _stopped_early(read, name: str) -> Optional[str]:
    """Why the model's training ended early (its transfer metrics say: a rolled-back divergence), or None."""
    text = read(f"metrics/transfer_{name}.json")
    return json.loads(text).get("stopped_early") if text else None


COLUMNS = ["shots", "model", "method", "source", "epochs", "clean_acc", "pgd_acc", "pgd_images", "autoattack_acc", "transfer_asr",
           "checks_passed", "train_seconds", "train_passes", "stopped_early", "experiment", "rev", "from_file"]


def collect(root: Path, pipeline: Path, all_baselines: bool = False) -> list[dict]:
    """Every row of the newest experiment of each shots level."""
    newest: dict[int, tuple[Experiment, dict]] = {}
    for exp in experiments(root, all_baselines):
        text = read_at(root, exp.rev, pipeline / "params.yaml")
        if text is None:
            continue
        params = yaml.safe_load(text)
        shots = int(params["data"]["shots"])
        if shots not in newest or exp.time > newest[shots][0].time:
            newest[shots] = (exp, params)
    rows = []
    for shots in sorted(newest):
        exp, params = newest[shots]
        for row in level_rows(params, lambda rel: read_at(root, exp.rev, pipeline / rel)):
            rows.append(dict(row, shots=shots, experiment=exp.name, rev=exp.rev[:12]))
    return rows


def noise_margin(p1: float, n1: Optional[int], p2: float, n2: Optional[int], z: float = 1.96) -> float:
    """Half-width of a 95 % interval for the difference of two accuracies measured on n1 and n2 images
    (0 when a count is unknown): two models closer than this are a tie, not a win."""
    if not n1 or not n2:
        return 0.0
    return z * math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)


def crossover(rows: list[dict], metric: str = "pgd_acc") -> dict:
    """Per level, the best transfer model and the best target adversarial training by `metric`, the
    verdict (a tie when they are within the noise of the images attacked, `pgd_images`), and the
    first level from which target AT is at least as robust as every transfer method (no transfer win
    beyond the noise there or at any later level)."""
    by_shots: dict[int, list[dict]] = {}
    for r in rows:
        if r.get(metric) is not None:
            by_shots.setdefault(r["shots"], []).append(r)
    levels, first = [], None
    for shots in sorted(by_shots):
        group = by_shots[shots]
        at = [r for r in group if r["method"] == TARGET_AT]
        tr = [r for r in group if r["method"] != TARGET_AT]
        if not at or not tr:
            continue
        best_at = max(at, key=lambda r: r[metric])
        best_tr = max(tr, key=lambda r: r[metric])
        margin = noise_margin(best_at[metric], best_at.get("pgd_images"), best_tr[metric], best_tr.get("pgd_images"))
        diff = best_at[metric] - best_tr[metric]
        verdict = "tie" if abs(diff) <= margin and margin > 0 else "target AT" if diff >= 0 else "transfer"
        levels.append({"shots": shots, "best_transfer": best_tr["model"], "transfer": best_tr[metric],
                       "best_target_at": best_at["model"], "target_at": best_at[metric],
                       "margin": round(margin, 4), "verdict": verdict, "target_at_wins": verdict == "target AT"})
        if verdict != "transfer" and first is None:
            first = shots
        if verdict == "transfer":
            first = None  # "from which on": a later transfer win resets it
    return {"metric": metric, "levels": levels, "target_at_from_shots": first}


# ----------------------------------------------------------------------------- outputs
def write_csv(rows: list[dict], path: Path) -> None:
    from robust_transfer.data import atomic_write

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    with atomic_write(path) as tmp:
        tmp.write_text(buf.getvalue())


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Left: robust accuracy against shots per class (PGD solid; AutoAttack crosses, dashed, where run).
    Right: training seconds against shots. One colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from robust_transfer.data import atomic_write

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8))
    for i, model in enumerate(models):
        mine = sorted((r for r in rows if r["model"] == model), key=lambda r: r["shots"])
        colour = f"C{i % 10}"
        style = "-" if mine[0]["method"] != TARGET_AT else "-."
        lw = 2.2 if mine[0]["method"] == TARGET_AT else 1.4
        xs = [r["shots"] for r in mine if r["pgd_acc"] is not None]
        ax.plot(xs, [r["pgd_acc"] for r in mine if r["pgd_acc"] is not None], style, marker="o", ms=4,
                color=colour, lw=lw, label=model)
        aa = [r for r in mine if r.get("autoattack_acc") is not None]
        if aa:
            ax.plot([r["shots"] for r in aa], [r["autoattack_acc"] for r in aa], ":", marker="x", ms=7,
                    color=colour, lw=1)
        # Passes, not seconds: the physical cost, the same on any machine and under any load
        # (the seconds are in efficiency.csv and efficiency.md).
        costed = [r for r in mine if r.get("train_passes")]
        bx.plot([r["shots"] for r in costed], [r["train_passes"] for r in costed], style, marker="o", ms=4,
                color=colour, lw=lw, label=model)
    eps = rows[0].get("eps") if rows else None
    ax.set_xscale("log")
    ax.set_xlabel("target training images per class (log)")
    ax.set_ylabel("robust accuracy" + (f" at eps {eps}" if eps else ""))
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Robust accuracy: PGD (o, solid) and AutoAttack (x, dotted)", fontsize=10)
    ax.grid(alpha=0.3)
    bx.set_xscale("log")
    bx.set_yscale("log")
    shots = sorted({r["shots"] for r in rows})
    for a in (ax, bx):
        a.set_xticks(shots)
        a.set_xticklabels([str(s) for s in shots])
        a.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    bx.set_xlabel("target training images per class (log)")
    bx.set_ylabel("training passes: image forward+backward (log)")
    bx.set_title("Compute of the transfer stage's training", fontsize=10)
    bx.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)


def markdown(rows: list[dict], cross: dict, runs: list[dict]) -> str:
    shots = sorted({r["shots"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    cell = {(r["model"], r["shots"]): r for r in rows}

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}"

    lines = ["# Data-efficiency study", "",
             "Robust accuracy (%) on the target test set against target training images per class: PGD, and "
             "AutoAttack in brackets where the evaluate stage ran it. Training seconds per model at the end.", "",
             "| model | method | " + " | ".join(f"{s} shots" for s in shots) + " | train s (per level) |",
             "|---|---|" + "---:|" * len(shots) + "---|"]
    for m in models:
        first = next(r for r in rows if r["model"] == m)
        vals = []
        for s in shots:
            r = cell.get((m, s))
            if r is None:
                vals.append("")
                continue
            aa = f" ({pct(r['autoattack_acc'])})" if r.get("autoattack_acc") is not None else ""
            vals.append(pct(r["pgd_acc"]) + aa + (" *" if r.get("stopped_early") else ""))
        secs = ", ".join("-" if cell.get((m, s)) is None or cell[(m, s)].get("train_seconds") is None
                         else f"{cell[(m, s)]['train_seconds']:.0f}" for s in shots)
        lines.append(f"| {m} | {first['method']} | " + " | ".join(vals) + f" | {secs} |")
    stopped = [r for r in rows if r.get("stopped_early")]
    if stopped:
        lines += ["", "\\* stopped early, evaluated on the weights it stopped with: "
                  + "; ".join(f"{r['model']} at {r['shots']} shots: {r['stopped_early']}" for r in stopped)]
    lines += ["", "## Where transfer stops beating target adversarial training (PGD)", ""]
    for lv in cross["levels"]:
        verdict = {"tie": f"a tie within the noise (+-{pct(lv['margin'])} points)", "transfer": "transfer wins",
                   "target AT": "target AT wins"}[lv["verdict"]]
        lines.append(f"- {lv['shots']} shots: best transfer {lv['best_transfer']} {pct(lv['transfer'])}%, best target "
                     f"AT {lv['best_target_at']} {pct(lv['target_at'])}%: {verdict}")
    first = cross["target_at_from_shots"]
    if cross["levels"] and all(lv["verdict"] == "tie" for lv in cross["levels"]):
        lines += ["", "No level run separates them: the best transfer method and target adversarial training are "
                      "within the noise of each other at every level (attack more images, `evaluate.images`, to "
                      "separate them).", ""]
    else:
        lines += ["", f"Target adversarial training is at least as robust as every transfer method (within the "
                      f"noise) from **{first} shots per class** on." if first is not None else
                  "Transfer beats target adversarial training beyond the noise at the last level run.", ""]
    if runs:
        total = sum(r["seconds"] for r in runs)
        lines += ["## Wall time", "", "| shots | experiment | seconds |", "|---:|---|---:|"]
        lines += [f"| {'-' if r['shots'] is None else r['shots']} | {r['experiment']} | {r['seconds']:.0f} |"
                  for r in runs]
        lines += [f"| all | | {total:.0f} ({total / 60:.1f} min) |", ""]
    return "\n".join(lines)


def summarise(root: Path, pipeline: Path, all_baselines: bool, runs: list[dict]) -> list[dict]:
    from robust_transfer.data import atomic_write, write_json

    rows = collect(root, pipeline, all_baselines)
    if not rows:
        raise ConfigError(f"no experiments named {NAME.format(shots='<n>')} of {pipeline} found for this commit "
                          f"(run `python -m stages.study run`, or pass --all-baselines)")
    out = root / pipeline / OUT
    out.mkdir(parents=True, exist_ok=True)
    earlier = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else []
    if runs:  # this run's levels replace the same experiments of earlier runs; the others stay listed
        merged = {r["experiment"]: r for r in earlier}
        merged.update({r["experiment"]: r for r in runs})
        runs = sorted(merged.values(), key=lambda r: -1 if r["shots"] is None else r["shots"])
        write_json(runs, out / "run.json")
    else:
        runs = earlier
    cross = crossover(rows)
    write_csv(rows, out / "efficiency.csv")
    plot(rows, out / "efficiency.png", f"Data efficiency on the default task ({pipeline.as_posix()})")
    with atomic_write(out / "efficiency.md") as tmp:
        tmp.write_text(markdown(rows, cross, runs))
    write_json(cross, out / "crossover.json")
    levels = sorted({r["shots"] for r in rows})
    print(f"study: {len(rows)} results over shots {levels}; wrote {(pipeline / OUT).as_posix()}/efficiency.png, "
          f".csv, .md")
    for lv in cross["levels"]:
        print(f"  {lv['shots']:>4} shots: transfer {lv['best_transfer']} {lv['transfer']:.3f} vs target AT "
              f"{lv['best_target_at']} {lv['target_at']:.3f} -> {lv['verdict']} (noise +-{lv['margin']:.3f})")
    return rows


# ----------------------------------------------------------------------------- command line
def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.study", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_p = sub.add_parser("run", help="run one DVC experiment per shots level, then collect")
    run_p.add_argument("--shots", type=int, nargs="+", default=SHOTS)
    run_p.add_argument("--models", nargs="+", default=None, help="keys of transfer.models (default: all)")
    run_p.add_argument("--steps", type=int, default=STEPS, help="optimiser steps per model at every level")
    run_p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="another setting for every level, e.g. evaluate.autoattack_top=1 (repeatable)")
    run_p.add_argument("--dry-run", action="store_true", help="print the commands only")
    col_p = sub.add_parser("collect", help="summarise the experiments already run")
    for p in (run_p, col_p):
        p.add_argument("--pipeline", default=PIPELINE.as_posix(), help="the pipeline folder (default %(default)s)")
        p.add_argument("--all-baselines", action="store_true", help="also experiments of earlier commits")
    args = parser.parse_args(argv)
    try:
        from robust_transfer.tracking import project_root

        root = project_root()
        pipeline = Path(args.pipeline)
        if not (root / pipeline / "params.yaml").is_file():
            raise ConfigError(f"--pipeline: no params.yaml in {root / pipeline}")
        runs = []
        if args.command == "run":
            if any(s <= 0 for s in args.shots) or args.steps <= 0:
                raise ConfigError("--shots and --steps must be positive")
            params = load_all(root / pipeline / "params.yaml")
            extra = parse_sets(args.set)
            levels = [level(params, s, args.steps, args.models, extra) for s in sorted(set(args.shots))]
            applied = [check_level(params, lv) for lv in levels]
            sources, why_not = shared_sources(params, applied)
            if why_not:
                print(f"study: {why_not}")
            runs = run_levels(root, pipeline, levels, args.dry_run, sources)
            if args.dry_run:
                return
        summarise(root, pipeline, args.all_baselines, runs)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
