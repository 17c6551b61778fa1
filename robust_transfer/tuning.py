"""Ray Tune over the regularisation weights of transfer methods; Pareto front of clean vs robust.

The weight of a method's regulariser (LwF's `lam`, CARTL's spectral-norm bound `beta`) sets the
accuracy-robustness trade-off, and a bad one wrecks the model, so the tune stage searches it.
Any numeric option of a transfer method can be searched (`tune.models`). CARTL's feature-distance
weight is not among them: it belongs to the source's pre-training (`pretrain.sources.cartl.lam`),
so searching it would pre-train a source model per trial; the tune stage searches the fine-tuning
bound `beta` on a fixed CARTL source instead.

Each trial runs the transfer stage's own trainer (`engine.make_trainer`: the same job, objective and
Ray Train loop) with the trial's options, trained on `target_fit` (the target shots minus the
validation split) and scored every epoch on `target_val` (never the test set). In Ray Train V2 a
Tune trial is a trainable that builds the Ray Train trainer and calls `fit()` (`Tuner(trainer)` is
deprecated); a Train callback relays each epoch's metrics to the trial, which returns them to Tune
(`trial_class`). The trainer's workers run wherever the cluster has room.

Score (what ASHA compares at its rungs): PGD accuracy on the validation split when the clean accuracy
reaches `clean_floor`, else clean - 1. Every trial under the floor thus ranks below every trial over
it, and among those under it the more accurate one ranks higher (it is nearer to being usable).

Choice (`choose`): among trials that ran every epoch, the highest validation PGD accuracy whose clean
accuracy is at least `clean_floor` and at most `max_clean_drop` below the reference: the trial of the
params' own value (always the first trial, and never stopped by ASHA), or, when that one failed, the
most accurate trial.
Ties go to the higher clean accuracy, then to the value nearest the params' own. When no trial
qualifies, the params' own value stays. A qualifying params' value also stays unless the best trial beats it by `min_gain`:
on a validation split of a few dozen images most differences are noise (25 images: one image is 4
points), and a weight chosen on noise does no better on the test set than the one the user wrote.
By default `min_gain` is what a one-sided 95% test asks of the difference of two accuracies p on n
images: 1.645 * sqrt(2 p (1 - p) / n) (25 images, p = 0.5: 0.23; 500 images: 0.05).

Reproducibility: a trial's scores repeat bit for bit on one machine, but ASHA is asynchronous: a trial reaching
a rung is compared with the trials recorded there before it, so with several trials at once which
ones it stops (and so which complete and can be chosen) can depend on the order in which they got
there, that is on the machine and its load. `max_concurrent_trials: 1` runs the trials one after the
other in their fixed order, and the choice then depends on the scores alone. Either way tuned.yaml is a DVC
output: a repro re-tunes only when tune's inputs change, and the transfer stages use what it recorded.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from .config import ConfigError, RayConfig, TuneConfig

SCORE_FAILED = -2.0  # a trial whose loss went non-finite ranks below every other
METRIC_COLUMNS = ("val_clean_acc", "val_pgd_acc", "score", "epochs_done", "train_loss", "train_acc")


# ----------------------------------------------------------------------------- search space
def score(clean: float, pgd: float, clean_floor: float) -> float:
    """What ASHA maximises: PGD accuracy above the clean-accuracy floor, clean - 1 below it."""
    return float(pgd) if clean >= clean_floor else float(clean) - 1.0


def search_points(space: dict[str, tuple[float, float]], baseline: dict[str, float], n: int,
                  seed: int) -> list[dict[str, float]]:
    """`n` option settings, the params' own values first. One option: an even log grid over [low, high]
    (the grid point nearest the params' value gives way to it when that value lies inside the range,
    so the ends stay covered); several: seeded log-uniform draws. Values rounded to 3 digits."""
    names = sorted(space)
    base = {k: float(baseline[k]) for k in names}
    if len(names) == 1:
        (name,) = names
        low, high = space[name]
        inside = low <= base[name] <= high
        k = n if inside else n - 1
        values = [_round(v) for v in (np.geomspace(low, high, k) if k > 1 else [math.sqrt(low * high)] * max(k, 0))]
        if inside and values:
            values.remove(min(values, key=lambda v: abs(math.log(v / base[name]))))
        draws = [{name: v} for v in values]
    else:
        rng = np.random.default_rng(seed)
        draws = [{k: _round(math.exp(rng.uniform(math.log(space[k][0]), math.log(space[k][1])))) for k in names}
                 for _ in range(n - 1)]
    points = [base]
    for p in draws:
        if p not in points:
            points.append(p)
    return points[:n]


def _round(v: float, digits: int = 3) -> float:
    return float(f"{v:.{digits}g}")


def grace_epochs(method: str, options: dict, epochs: int, frac: float) -> int:
    """ASHA's first rung. LwF trains the head alone for its first `head_only_frac` of the epochs, where
    every weight gives the same model: comparing trials there would stop them at random."""
    grace = math.ceil(frac * epochs)
    if method == "lwf":
        grace = max(grace, int(round(options.get("head_only_frac", 0.5) * epochs)) + 1)
    return max(1, min(grace, epochs))


def rung_epochs(grace: int, reduction_factor: float, epochs: int) -> list[int]:
    """The epochs (done) at which a trial reports: ASHA's rungs, grace x rf^k, and the last epoch.
    ASHA compares a trial at the first result at or past each rung, so reporting there alone gives
    the decisions of reporting every epoch, without a wait for the Train controller's poll per epoch
    (or a validation per epoch: the engine validates when it reports)."""
    out, t = [], float(grace)
    while t < epochs:
        out.append(math.ceil(t))
        t *= reduction_factor
    return sorted(set(out)) + [epochs]


# ----------------------------------------------------------------------------- one trial
def scored(metrics: dict, clean_floor: float) -> dict:
    """One epoch's worker metrics as Tune sees them: with the score and an epoch count ASHA can use
    (Tune's own iteration count restarts when a trial's Train run resumes from a checkpoint)."""
    m = {k: v for k, v in metrics.items() if k != "done"}  # the trial ends when its Train run does
    if "failed" in m:  # non-finite loss: no metrics this epoch
        m.update(val_clean_acc=0.0, val_pgd_acc=0.0, score=SCORE_FAILED, epochs_done=0)
    else:
        m["score"] = score(m["val_clean_acc"], m["val_pgd_acc"], clean_floor)
        m["epochs_done"] = int(m["epoch"]) + 1
    return m


class Mailbox:
    """A one-way channel from a Train run's controller to the trial that started it: each message a
    file in a folder of the trial's, written whole (temporary name, then rename) and named by the
    system-wide monotonic clock, so the trial reads them in the order they were sent. Ray Train places
    the controller on the node of the process that started the run (here the trial), so the folder is
    local to both. It replaced a `ray.util.queue.Queue`, whose actor was one more process per trial
    (~2.6 s of CPU to start, 8 trials per tune stage, on 2 cores)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def put(self, item) -> None:
        import uuid

        import ray.cloudpickle as pickle

        name = f"{time.monotonic_ns():020d}-{uuid.uuid4().hex[:8]}"
        tmp = self.folder / f"{name}.part"  # not a message until renamed: `_next` lists *.msg only
        tmp.write_bytes(pickle.dumps(item))  # an actor handle pickles as in any Ray task argument
        os.replace(tmp, self.folder / f"{name}.msg")

    def _messages(self) -> list[Path]:
        # (A hidden temporary name is not enough: pathlib's glob matches names that start with a dot,
        # and a trial read a half-written ".<name>.msg" once: EOFError, its trial lost.)
        return sorted(self.folder.glob("*.msg"))

    def _next(self) -> Optional[Path]:
        names = self._messages()
        return names[0] if names else None

    def pending(self) -> int:
        """How many messages are sent and not yet read."""
        return len(self._messages())

    def get(self, timeout: float):
        """The oldest unread message; raises queue.Empty after `timeout` seconds without one."""
        import queue

        import ray.cloudpickle as pickle

        deadline = time.monotonic() + timeout
        while (path := self._next()) is None:
            if time.monotonic() > deadline:
                raise queue.Empty
            time.sleep(0.05)
        data = path.read_bytes()
        path.unlink()  # read once, even if it cannot be unpickled
        return pickle.loads(data)

    def empty(self) -> bool:
        return self._next() is None


def _relay_callbacks(mailbox: Mailbox, clean_floor: float) -> list:
    """Ray Train callbacks (they run in the Train controller) that send the trial, through `mailbox`,
    first the controller's own handle (so the trial can abort the run), then rank 0's
    metrics of every epoch.

    Why not Ray's TuneReportCallback: it hands results to Tune from the trial actor's main thread
    through one-slot queues, and when the Train run ends before Tune has fetched the last epoch (a
    busy machine, a slow result callback) the driver's own end-of-function report takes the slot and
    the trial hangs. Here the trial reports every epoch itself, in order."""
    import ray
    from ray.train.v2._internal.execution.callback import ControllerCallback
    from ray.train.v2.api.callback import UserCallback

    class Relay(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            mailbox.put(("metrics", scored(metrics[0], clean_floor)))

    class Handle(ControllerCallback):
        def after_controller_start(self, train_run_context):
            mailbox.put(("controller", ray.get_runtime_context().current_actor))

    return [Relay(), Handle()]


def trial_class():
    """The Tune trainable of one trial (a class, built on first use: Ray Tune is imported lazily)."""
    import shutil
    import tempfile
    import threading
    from queue import Empty

    import ray
    from ray import tune

    from . import engine

    class TransferTrial(tune.Trainable):
        """One trial: the transfer job with this trial's options, fitted by Ray Train in a thread;
        each `step` returns one epoch's metrics.

        Why a class trainable: Tune ends a trial by ending its actor (ASHA stopped it, or its last
        epoch is in), and a Train run ended with the actor that started it leaves its placement
        group behind, holding the CPUs of its workers for as long as the stage runs: the next trials
        then wait forever. (Ray Train's own guard, its placement-group cleaner, needs the dashboard's
        state API.) So `cleanup` aborts the run through its controller, which removes the group, and
        the last epoch is returned only once the run has finished and freed its workers."""

        def setup(self, config, job, ray_cfg, storage, clean_floor):
            job = copy.deepcopy(job)
            job["options"].update(config["options"])
            self.epochs = job["train"]["epochs"]
            self.mailbox = Mailbox(tempfile.mkdtemp(prefix="rt-trial-"))
            # Test hook (RT_FAIL_TRIAL_ONCE, set where the search starts): each trial fails once, in its
            # first step while its run trains, as a lost trial actor would; Tune must run it again.
            self.fault = (Path(job["fail_trial_once"]) / engine.job_hash(config["options"])
                          if job.get("fail_trial_once") else None)
            trainer = engine.make_trainer(job, ray_cfg, storage, job["name"],
                                          callbacks=_relay_callbacks(self.mailbox, clean_floor))
            self.controller, self.outcome = None, {}

            def fit():
                try:
                    trainer.fit()
                except BaseException as exc:  # re-raised by step(), so Tune records the error
                    self.outcome["error"] = exc

            self.runner = threading.Thread(target=fit, daemon=True)
            self.runner.start()

        def step(self):
            if self.fault is not None and not self.fault.exists():
                # once the run is under way (its handle and a first report sent, neither read yet)
                while self.mailbox.pending() < 2 and self.runner.is_alive():
                    time.sleep(0.05)
                self.fault.write_text("failed once\n")
                raise RuntimeError("injected trial failure (RT_FAIL_TRIAL_ONCE)")
            while True:
                try:
                    kind, item = self.mailbox.get(timeout=0.5)
                except Empty:
                    if not self.runner.is_alive() and self.mailbox.empty():  # every put came before fit() returned
                        raise self.outcome.get("error") or RuntimeError("the Train run ended before its last epoch")
                    continue
                if kind == "controller":
                    self.controller = item
                elif item["epochs_done"] >= self.epochs:
                    self.runner.join()
                    if "error" in self.outcome:
                        raise self.outcome["error"]
                    return {**item, "done": True}
                else:
                    return item

        def save_checkpoint(self, checkpoint_dir):  # Tune saves at a trial's end; the Train run keeps its own
            return None

        def load_checkpoint(self, checkpoint):
            pass

        def cleanup(self):
            # A trial that failed before it read its run's controller handle must still end that run,
            # or the run's placement group holds its workers' CPUs for the rest of the stage and the
            # trial's retry (and every later trial) may wait for them forever.
            deadline = time.monotonic() + 60
            while self.runner.is_alive() and self.controller is None and time.monotonic() < deadline:
                try:
                    kind, item = self.mailbox.get(timeout=0.5)
                except Exception:  # none yet (queue.Empty), or one that cannot be read: the handle may follow
                    continue
                if kind == "controller":
                    self.controller = item
            if self.runner.is_alive() and self.controller is not None:
                try:
                    ray.get(self.controller.abort.remote(), timeout=120)
                except Exception:  # abort ends the controller's process: its reply is that error
                    pass
                self.runner.join(timeout=120)
            shutil.rmtree(self.mailbox.folder, ignore_errors=True)

    return TransferTrial


# ----------------------------------------------------------------------------- the search
def search(model: str, job: dict, space: dict[str, tuple[float, float]], cfg: TuneConfig, ray_cfg: RayConfig,
           storage: str, callbacks: list = (), progress: bool = True) -> list[dict]:
    """Run every trial of one model; return one row per trial (options, last metrics, status, node)."""
    from ray import tune

    from . import engine

    method, options, epochs = job["method"], job["options"], job["train"]["epochs"]
    baseline = {k: options[k] for k in space}
    points = search_points(space, baseline, cfg.num_samples, cfg.seed)
    trial_ray = dataclasses.replace(ray_cfg, num_workers=cfg.workers_per_trial, cpus_per_worker=cfg.cpus_per_worker)
    grace = grace_epochs(method, options, epochs, cfg.grace_frac)
    job = dict(job, name=f"tune-{model}", report_epochs=rung_epochs(grace, cfg.reduction_factor, epochs))
    if os.environ.get("RT_FAIL_TRIAL_ONCE"):  # test hook: see TransferTrial.setup
        import tempfile

        job["fail_trial_once"] = tempfile.mkdtemp(prefix="rt-trial-faults-")
    trainable = tune.with_parameters(trial_class(), job=job, ray_cfg=trial_ray, storage=storage,
                                     clean_floor=cfg.clean_floor)
    # The driver only launches its workers and waits: it holds `driver_cpus` (0 by default) and a
    # little logical memory, so that `max_concurrent_trials` alone decides how many run at once.
    trainable = tune.with_resources(trainable, {"cpu": cfg.driver_cpus, "memory": 256 * 2**20})
    scheduler = asha_keeping_baseline(points[0], time_attr="epochs_done", max_t=epochs, grace_period=grace,
                                      reduction_factor=cfg.reduction_factor)
    name = f"search-{model}-{engine.job_hash({'job': job, 'points': points, 'cfg': dataclasses.asdict(cfg)})}"
    tuner = tune.Tuner(
        trainable,
        param_space={"options": tune.grid_search(points)},
        tune_config=tune.TuneConfig(metric="score", mode="max", scheduler=scheduler, num_samples=1,
                                    max_concurrent_trials=cfg.max_concurrent_trials,
                                    trial_name_creator=lambda t: f"{model}_{t.trial_id}",
                                    trial_dirname_creator=lambda t: f"{model}_{t.trial_id}"),
        # A trial whose actor fails (a lost node, a crash) runs again, up to ray.max_failures times, as
        # a Train run's workers do: otherwise one failure silently takes its point out of the choice.
        # Its Train run resumes from that run's own checkpoints (the run is named by its job).
        run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=list(callbacks),
                                  failure_config=tune.FailureConfig(max_failures=ray_cfg.max_failures),
                                  verbose=1 if progress else 0),
    )
    print(f"tune {model}: {len(points)} trials of {method} over {', '.join(space)} "
          f"({', '.join(f'{k} in [{lo:g}, {hi:g}]' for k, (lo, hi) in space.items())}), "
          f"ASHA from epoch {grace} of {epochs}, {cfg.max_concurrent_trials} at once")
    grid = tuner.fit()
    rows = []
    for result in grid:
        m = result.metrics or {}
        row: dict[str, Any] = {"model": model, "method": method, "trial_id": m.get("trial_id") or "",
                               "options": dict(result.config["options"])}
        for k, v in result.config["options"].items():
            row[k] = v
        for k in METRIC_COLUMNS:
            row[k] = m.get(k)
        row.update(epochs=epochs, node_id=m.get("node_id"), hostname=m.get("hostname"),
                   seconds=m.get("time_total_s"), baseline=row["options"] == points[0],
                   error=error_line(result.error))
        row["status"] = ("error" if result.error or row["score"] == SCORE_FAILED or row["epochs_done"] is None
                         else "completed" if row["epochs_done"] >= epochs else "stopped")
        rows.append(row)
    rows.sort(key=lambda r: points.index(r["options"]) if r["options"] in points else len(points))
    if rows and all(r["status"] == "error" for r in rows):
        first = next((r["error"] for r in rows if r["error"]), "no metrics reported")
        lines = [ln for ln in first.split("ConfigError: ")[1:]] if "ConfigError: " in first else []
        raise ConfigError(f"tune {model}: every trial failed: {lines[-1] if lines else first}")
    return rows


def error_line(error: Optional[BaseException]) -> Optional[str]:
    """The line of a trial's error that says what went wrong: Ray's text of an error raised in an
    actor begins with the actor's name and ends with the exception (`EOFError: Ran out of input`)."""
    if error is None:
        return None
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


def asha_keeping_baseline(baseline: dict, **asha):
    """ASHA that never stops the trial of the params' own value: the choice compares every trial with
    it, so it must have run every epoch (an early-stopped reference was compared at another epoch
    than the trials it was measured against, on a score that at 25 images is mostly noise)."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class ASHAKeepingBaseline(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            decision = super().on_trial_result(tune_controller, trial, result)
            if (decision == TrialScheduler.STOP and trial.config.get("options") == baseline
                    and result.get(asha["time_attr"], 0) < asha["max_t"]):
                return TrialScheduler.CONTINUE
            return decision

    return ASHAKeepingBaseline(**asha)


# ----------------------------------------------------------------------------- the choice
def required_gain(cfg: TuneConfig, base_pgd: float, n_val: Optional[int]) -> float:
    """How much a trial must beat the params' value by in validation PGD accuracy (module docstring)."""
    if cfg.min_gain is not None:
        return cfg.min_gain
    if not n_val:
        return 0.0
    p = min(max(base_pgd, 0.1), 0.9)  # a floor on the variance: 0 or 1 of a few images is no certainty
    return 1.645 * math.sqrt(2 * p * (1 - p) / n_val)


def choose(rows: list[dict], cfg: TuneConfig, n_val: Optional[int] = None) -> tuple[Optional[dict], str]:
    """The chosen trial among one model's rows (n_val: images in the validation split), and why
    (see the module docstring)."""
    done = [r for r in rows if r["status"] == "completed"]
    base = next((r for r in rows if r["baseline"]), None)
    if not done:
        return base, "no trial ran every epoch: kept the params' value"
    ref_row = base if base is not None and base["status"] == "completed" else max(done, key=lambda r: r["val_clean_acc"])
    floor = cfg.clean_floor
    if cfg.max_clean_drop is not None:
        floor = max(floor, ref_row["val_clean_acc"] - cfg.max_clean_drop - 1e-9)
    ok = [r for r in done if r["val_clean_acc"] >= floor]
    if not ok:
        return base, f"no completed trial reached clean accuracy {floor:.3f}: kept the params' value"

    def distance(r):  # log distance to the params' value: ties keep what the user wrote
        b = base["options"] if base else r["options"]
        return sum(abs(math.log(r["options"][k] / b[k])) if b[k] > 0 else 0.0 for k in r["options"])

    best = max(ok, key=lambda r: (r["val_pgd_acc"], r["val_clean_acc"], -distance(r)))
    if ref_row is base and best is not base and base in ok:  # a params' value under the clean floor is no reference
        need = required_gain(cfg, base["val_pgd_acc"], n_val)
        gain = best["val_pgd_acc"] - base["val_pgd_acc"]
        if gain < need - 1e-9:
            return base, (f"kept the params' value: the best trial's validation PGD accuracy "
                          f"({best['val_pgd_acc']:.3f}, {_options_text(best)}) beats it ({base['val_pgd_acc']:.3f}) "
                          f"by {gain:.3f}, under min_gain {need:.3f}"
                          + (f" (one-sided 95% on {n_val} validation images)" if cfg.min_gain is None else ""))
    ref = "the params' value" if ref_row is base else "the most accurate trial"
    return best, (f"highest validation PGD accuracy among {len(ok)} of {len(done)} completed trials with clean "
                  f"accuracy >= {floor:.3f} (floor {cfg.clean_floor:g}, at most {cfg.max_clean_drop} below {ref})"
                  if cfg.max_clean_drop is not None else
                  f"highest validation PGD accuracy among {len(ok)} of {len(done)} completed trials with clean "
                  f"accuracy >= {floor:.3f}")


def _options_text(row: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in row["options"].items())


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For each (clean, robust) point: is it on the Pareto front (no other point at least as good in
    both and better in one)?"""
    out = []
    for i, (c, r) in enumerate(points):
        dominated = any((c2 >= c and r2 >= r) and (c2 > c or r2 > r) for j, (c2, r2) in enumerate(points) if j != i)
        out.append(not dominated)
    return out


# ----------------------------------------------------------------------------- tuned.yaml
def read_tuned(path: str | Path) -> dict[str, dict]:
    """tuned.yaml: {model: {option: value}}, one entry per transfer model (empty when not tuned)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) or v is None for v in data.values()):
        raise ConfigError(f"{path} must map transfer model names to option mappings; re-run the tune stage")
    return {k: dict(v or {}) for k, v in data.items()}


def apply_tuned(params: dict, tuned: dict[str, dict]) -> dict:
    """A copy of params with tuned options over the transfer.models entries (checked like params)."""
    if not any(tuned.values()):
        return params
    params = copy.deepcopy(params)
    models = (params.get("transfer") or {}).get("models") or {}
    for name, options in tuned.items():
        if options and name not in models:
            raise ConfigError(f"tuned.yaml names '{name}', which is not in transfer.models; re-run the tune stage")
        if options:
            models[name] = {**(models[name] or {}), **options}
    return params


def write_tuned(choices: dict[str, dict], models: list[str], path: str | Path) -> None:
    """Write tuned.yaml atomically: every transfer model as a key (DVC tracks each entry as a param of
    its own transfer stage), the chosen options for the tuned ones."""
    from .data import atomic_path

    path = Path(path)
    body = {m: dict(choices.get(m) or {}) for m in models}
    tmp = atomic_path(path)
    tmp.write_text("# Written by the tune stage (stages/tune.py): options chosen on the validation split,\n"
                   "# applied by the transfer stage over transfer.models in params.yaml. Do not edit.\n"
                   + yaml.safe_dump(body, sort_keys=False, default_flow_style=None))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- the plot
def plot_trials(rows: list[dict], chosen: dict[str, Optional[dict]], clean_floor: float, path: str | Path) -> None:
    """Clean vs PGD accuracy on the validation split, one panel per model: every trial (hollow when ASHA
    stopped it early, at its last epoch), the Pareto front of the completed ones, the params' value and
    the choice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data import atomic_path

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, max(len(models), 1), figsize=(5.2 * max(len(models), 1), 4.4), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model and r["val_clean_acc"] is not None]
        done = [r for r in mine if r["status"] == "completed"]
        stopped = [r for r in mine if r["status"] != "completed"]
        option = next(iter(mine[0]["options"])) if mine else ""
        values = [math.log10(r["options"][option]) for r in mine] or [0.0]
        norm = matplotlib.colors.Normalize(min(values), max(values) if max(values) > min(values) else min(values) + 1)
        color = lambda r: plt.cm.viridis(norm(math.log10(r["options"][option])))  # noqa: E731
        for r in done:
            ax.scatter(r["val_clean_acc"], r["val_pgd_acc"], s=46, color=color(r), zorder=3)
        for r in stopped:
            ax.scatter(r["val_clean_acc"], r["val_pgd_acc"], s=46, facecolors="none", edgecolors=color(r), zorder=3)
        front = [r for r, on in zip(done, pareto_front([(r["val_clean_acc"], r["val_pgd_acc"]) for r in done])) if on]
        front.sort(key=lambda r: r["val_clean_acc"])
        if front:
            ax.plot([r["val_clean_acc"] for r in front], [r["val_pgd_acc"] for r in front], "-", color="tab:red",
                    lw=1.2, zorder=2, label="Pareto front")
            ax.scatter([r["val_clean_acc"] for r in front], [r["val_pgd_acc"] for r in front], s=110,
                       facecolors="none", edgecolors="tab:red", zorder=4)
        base = next((r for r in mine if r["baseline"]), None)
        if base:
            ax.scatter(base["val_clean_acc"], base["val_pgd_acc"], marker="s", s=120, facecolors="none",
                       edgecolors="black", zorder=5, label=f"params: {option}={base['options'][option]:g}")
        pick = chosen.get(model)
        if pick:
            ax.scatter(pick["val_clean_acc"], pick["val_pgd_acc"], marker="*", s=260, color="gold",
                       edgecolors="black", zorder=6, label=f"chosen: {option}={pick['options'][option]:g}")
        for r in mine:
            ax.annotate(f"{r['options'][option]:.3g}", (r["val_clean_acc"], r["val_pgd_acc"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
        if clean_floor > 0:
            ax.axvline(clean_floor, color="gray", ls="--", lw=1, label=f"clean floor {clean_floor:g}")
        sm = plt.cm.ScalarMappable(norm=norm, cmap="viridis")
        fig.colorbar(sm, ax=ax, label=f"log10 {option}")
        ax.set_xlabel("clean accuracy (validation split)")
        ax.set_ylabel("PGD accuracy (validation split)")
        ax.set_title(f"{model}: {len(done)} completed, {len(stopped)} stopped by ASHA or failed", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    tmp = atomic_path(path)
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def trial_table(rows: list[dict]):
    """The trial table as an Arrow table (options as one column per option name, nulls elsewhere)."""
    import pyarrow as pa

    flat = [{k: v for k, v in r.items() if k != "options"} for r in rows]
    keys = list(dict.fromkeys(k for r in flat for k in r))
    return pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in flat])


def mlflow_callback(tracking_uri: str, experiment: str, parent_run_id: str, tags: dict):
    """Ray's MLflow logger on the Tune driver: every trial its own run, nested under the stage's run."""
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return MLflowLoggerCallback(tracking_uri=tracking_uri, experiment_name=experiment,
                                tags={**tags, "mlflow.parentRunId": parent_run_id}, save_artifact=False)
