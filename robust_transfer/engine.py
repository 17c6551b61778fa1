"""The Ray Train loop: the trainer (DDP for several workers), checkpoints, resume, metrics.

A stage describes a training job as a plain dict (`job`); every worker rebuilds the job's `Plan`
(network, objective, data) from it with `methods.build_plan`, so nothing unpicklable crosses
process boundaries and the same job runs on a laptop CPU or a multi-GPU cluster.

Fault tolerance: the Ray Train run is named after a hash of the job, so the same job started again
(after a crash, a kill or a Ctrl-C of `dvc repro`) restores from its latest checkpoint, while a
changed job starts afresh. `FailureConfig(max_failures)` restarts dead workers within a run.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlparse

import torch
import torch.nn as nn

from .config import ConfigError, RayConfig, TrainConfig
from .objectives import Context, Step


@dataclass
class Plan:
    """Everything one training job needs, built inside each worker by `methods.build_plan`."""

    net: nn.Module  # what is trained and saved
    objective: Callable[..., Step]
    ctx: Context
    train: dict[str, torch.Tensor]  # x, y and any cached per-image teacher outputs
    val: tuple[torch.Tensor, torch.Tensor]  # a held split for per-epoch clean/PGD accuracy
    params: list  # trainable parameters (or param groups)
    train_cfg: TrainConfig
    spec: dict  # nets.net_spec: rebuilds `net`
    after_step: Optional[Callable[[], None]] = None  # e.g. CARTL's spectral normalisation
    on_epoch: Optional[Callable[[int], None]] = None  # e.g. LwF's head-only first half
    frozen_bn: list = field(default_factory=list)  # BatchNorm modules kept in eval mode
    swa_epochs: int = 0  # last epochs averaged (SWA), BN statistics recomputed at the end
    guard: bool = False  # stop and roll back when a PGD check collapses (fast AT)


class TrainModule(nn.Module):
    """Net + learnable extras; `forward(batch)` is the objective, so DDP syncs exactly what it uses."""

    def __init__(self, plan: Plan):
        super().__init__()
        self.net, self.aux = plan.net, plan.ctx.aux
        self.objective, self.ctx = plan.objective, plan.ctx

    def forward(self, batch):
        step = self.objective(self.net, batch, self.ctx)
        return step.loss, step.logits, step.passes


# ----------------------------------------------------------------------------- Ray runtime
def connect(ray_cfg: RayConfig, timeout_s: float = 15.0) -> None:
    """Join the cluster at $RAY_ADDRESS, or the shared local runtime (runtime.py); check that the job fits."""
    import ray

    from . import runtime

    for key, value in runtime.RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
        _check_fits_this_machine(ray_cfg)  # before paying for a Ray start that could only end in this error
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        if address and address != "auto" and not address.startswith("ray://"):
            _check_reachable(address, timeout_s)
        shared = not address and os.environ.get("RT_LOCAL_RAY", "shared") != "off"
        if not address:  # join (or start) the runtime shared by all stages; "local": a private one
            address = runtime.local_address() if shared else "local"
            # One machine, no spot instances: nothing to watch for (on a cluster the default stays on).
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
            # Stages of concurrent pipelines queue for the shared cores: waiting is not a failure
            # (connect() has already checked that the job fits the cluster at all).
            os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "7200")
            os.environ["RT_RAY_DASHBOARD"] = "0"  # a local runtime runs without one (see _trainer_class)
        # The workers of a shared or remote cluster do not inherit this process's environment:
        # hand them what they need (MLflow's store, Ray Train's settings) with the job.
        # PYTHONPATH too, so a checkout that is not the installed one trains with its own code.
        env_vars = {k: v for k, v in os.environ.items()
                    if k.startswith(("MLFLOW_", "RAY_TRAIN_", "RT_")) or k == "PYTHONPATH"}
        try:
            ray.init(address=address or None, include_dashboard=False, log_to_driver=True,
                     logging_config=ray.LoggingConfig(log_level="WARNING"),
                     runtime_env={"env_vars": env_vars} if env_vars else None)
        except Exception as exc:
            where = f"RAY_ADDRESS={address}" if os.environ.get("RAY_ADDRESS") else f"local Ray at {address}"
            raise ConfigError(f"{where}: cannot connect to a Ray cluster "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
        if shared:
            runtime.release_orphaned_placement_groups()
    res = ray.cluster_resources()
    if ray_cfg.use_gpu and res.get("GPU", 0) < ray_cfg.num_workers:
        raise ConfigError(f"ray.use_gpu is true but the cluster has {int(res.get('GPU', 0))} GPU(s) for "
                          f"ray.num_workers={ray_cfg.num_workers}; set ray.use_gpu: false or add GPUs")
    need = ray_cfg.num_workers * ray_cfg.cpus_per_worker
    if res.get("CPU", 0) < need:
        raise ConfigError(f"ray.num_workers x ray.cpus_per_worker = {need} CPUs, but the cluster has "
                          f"{int(res.get('CPU', 0))}; lower ray.num_workers or ray.cpus_per_worker")


def _check_fits_this_machine(ray_cfg: RayConfig) -> None:
    """Without RAY_ADDRESS the cluster is this machine: its GPUs and cores bound what a job can ask."""
    gpus = torch.cuda.device_count()
    if ray_cfg.use_gpu and gpus < ray_cfg.num_workers:
        raise ConfigError(f"ray.use_gpu is true but this machine has {gpus} CUDA GPU(s) for ray.num_workers="
                          f"{ray_cfg.num_workers}; set ray.use_gpu: false, or RAY_ADDRESS to a cluster with GPUs")
    need, have = ray_cfg.num_workers * ray_cfg.cpus_per_worker, os.cpu_count() or 1
    if need > have:
        raise ConfigError(f"ray.num_workers x ray.cpus_per_worker = {need} CPUs, but this machine has {have}; "
                          f"lower ray.num_workers or ray.cpus_per_worker, or set RAY_ADDRESS to a larger cluster")


def _check_reachable(address: str, timeout_s: float) -> None:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError):
        raise ConfigError(f"RAY_ADDRESS={address} is not reachable (no Ray head answers there); "
                          f"start one with `ray start --head` or unset RAY_ADDRESS") from None


def job_hash(job: dict) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- a stage's own model work
def on_device(fn: Callable, ray_cfg: RayConfig, *args, remote: Optional[bool] = None, **kwargs):
    """`fn(*args, device=..., **kwargs)`: a stage's own model work (the checks after training, feature
    extraction, evaluation) on the device the params ask for. In this process on the CPU, or on a GPU
    this process sees; else as a Ray task holding one of the cluster's GPUs: the documented cluster
    runs `dvc repro` and the stage drivers on a CPU head node (docs/scale-out.md). Such a task reads
    and writes the project's files by their absolute paths, as Ray Train's workers do. `fn` is a
    module-level function; its arguments and result travel through Ray's object store. `remote`
    forces the choice (tests)."""
    if remote is None:
        remote = lacks_the_device(ray_cfg)
    device = "cuda" if ray_cfg.use_gpu else "cpu"
    if not remote:
        return fn(*args, device=device, **kwargs)
    import ray

    connect(ray_cfg)  # one line, before any work, if neither this machine nor the cluster has the GPUs
    task = ray.remote(_run_on_device).options(num_gpus=1 if ray_cfg.use_gpu else 0,
                                              num_cpus=ray_cfg.cpus_per_worker, max_retries=ray_cfg.max_failures)
    args = tuple(_stored(a) for a in args)
    kwargs = {k: _stored(v) for k, v in kwargs.items()}
    try:
        return ray.get(task.remote(fn, args, kwargs, device, ray_cfg.cpus_per_worker))
    except Exception as exc:
        _reraise_config_error(exc)
        raise


# Large tensors and models handed to on_device tasks, each put in Ray's object store once for as long
# as it lives: the evaluate stage passes the same test set (CIFAR-10's: 123 MB) and source model with
# every model it evaluates. Keyed by id() and dropped when the object dies, so an id is never reused
# for another object. What is stored is a snapshot: callers treat these objects as read-only.
_STORED: dict[int, Any] = {}
STORE_ONCE_BYTES = 1 << 20


def _stored(obj):
    import weakref

    import ray

    if isinstance(obj, torch.Tensor):
        size = obj.numel() * obj.element_size()
    elif isinstance(obj, nn.Module):
        size = sum(t.numel() * t.element_size() for t in obj.state_dict().values())
    else:
        return obj
    if size < STORE_ONCE_BYTES:
        return obj
    key, job = id(obj), ray.get_runtime_context().get_job_id()  # a ref lives as long as its job
    if key not in _STORED:
        weakref.finalize(obj, _STORED.pop, key, None)
    if _STORED.get(key, (None,))[0] != job:
        _STORED[key] = (job, ray.put(obj))
    return _STORED[key][1]


def _reraise_config_error(exc: Exception) -> None:
    """A ConfigError raised in a Ray worker or task (a bad checkpoint, a table it cannot read) reaches
    the stage inside Ray's error text: raise it again as the one line it was."""
    lines = [ln for ln in str(exc).splitlines() if "ConfigError: " in ln]
    if lines:
        raise ConfigError(lines[-1].split("ConfigError: ", 1)[1]) from None


def lacks_the_device(ray_cfg: RayConfig) -> bool:
    """Whether this process cannot run model work on the device the params ask for (no visible GPU)."""
    return ray_cfg.use_gpu and not torch.cuda.is_available()


def _run_on_device(fn: Callable, args: tuple, kwargs: dict, device: str, threads: int):
    import ray

    torch.set_num_threads(threads)  # Ray gives a task one thread unless told otherwise
    args = tuple(ray.get(a) if isinstance(a, ray.ObjectRef) else a for a in args)  # (see _stored)
    kwargs = {k: ray.get(v) if isinstance(v, ray.ObjectRef) else v for k, v in kwargs.items()}
    return fn(*args, device=device, **kwargs)


# ----------------------------------------------------------------------------- driver side
@dataclass
class TrainResult:
    state: dict  # final weights of the trained net
    spec: dict
    history: list[dict]  # one row of metrics per epoch
    seconds: float  # wall time of the training loop itself (workers)
    passes: float  # forward+backward image passes
    stopped_early: Optional[str] = None
    resumed_from: list = field(default_factory=list)  # epochs of the checkpoints a (re)started run resumed from


def fit(job: dict, ray_cfg: RayConfig, storage: Path, name: str,
        while_waiting: Optional[Callable[[], None]] = None) -> TrainResult:
    """Run `job` as a Ray Train job (see _trainer_class) and return the trained weights and metrics.
    `while_waiting` is called just before the driver blocks on the job (to start background work)."""
    connect(ray_cfg)
    trainer = make_trainer(job, ray_cfg, storage, name)
    if while_waiting is not None:
        while_waiting()
    try:
        result = trainer.fit()
    except Exception as exc:
        _reraise_config_error(exc)
        raise
    # Ray Train V2's result carries the metrics of the latest checkpoint only, so a worker that stops
    # without one (non-finite loss) leaves its reason in a file beside the checkpoints.
    failure = _read_failure(result)
    if failure:
        raise ConfigError(f"{name}: {failure}")
    if result.checkpoint is None:
        raise RuntimeError(f"{name}: training ended without a checkpoint")
    if not (result.metrics or {}).get("done"):  # never hand on a half-trained model as if complete
        raise RuntimeError(f"{name}: training ended before its last epoch (latest checkpoint: epoch "
                           f"{(result.metrics or {}).get('epoch')})")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
    resumed = state.get("resumed_from") or []
    if resumed:
        print(f"{name}: resumed from the checkpoint of epoch {resumed[-1]}"
              + (f" (resumes: {len(resumed)}, from epochs {resumed})" if len(resumed) > 1 else ""))
    return TrainResult(state["final"] or state["net"], state["spec"], state["history"], state["seconds"],
                       state["passes"], state.get("stopped_early"), resumed)


# What may change between a run and its resumption without making it another job.
NOT_HASHED = ("fault_marker", "checkpoint_every_s")


def make_trainer(job: dict, ray_cfg: RayConfig, storage, name: str, callbacks=()):
    """The Ray Train trainer that runs `job` (not started): what `fit` runs, and what every Ray Tune trial
    of the tune stage runs (with Tune's report callback), so a tuned weight means the same in both."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    job = dict(job, cpus_per_worker=ray_cfg.cpus_per_worker, checkpoint_every_s=ray_cfg.checkpoint_every_s)
    job = _with_test_faults(job, name)
    return _trainer_class(ray_cfg.num_workers)(
        train_loop_per_worker,
        train_loop_config=job,
        scaling_config=ScalingConfig(num_workers=ray_cfg.num_workers, use_gpu=ray_cfg.use_gpu,
                                     resources_per_worker={"CPU": ray_cfg.cpus_per_worker}),
        run_config=RunConfig(name=f"{name}-{job_hash({k: v for k, v in job.items() if k not in NOT_HASHED})}", storage_path=storage_path(ray_cfg, storage),
                             failure_config=FailureConfig(max_failures=ray_cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=list(callbacks)),
    )


def _trainer_class(num_workers: int):
    """Ray Train's trainer for `num_workers` (below), less two helper actors that a job of ours does
    not use, each a process to start per run: the datasets manager (we pass no Ray Datasets; workers
    read Parquet themselves), and, where the cluster has no dashboard, the placement-group cleaner (it polls the dashboard's state
    API every second and, without one, only logs a warning each time; it guards against a controller
    dying uncleanly, and Ray frees a dead job's placement groups when its driver exits anyway).
    Our local runtime runs without a dashboard: on 2 cores it costs more than the jobs.

    A single worker needs no torch process group: it runs under Ray Train's plain data-parallel
    trainer (the same controller, worker, checkpoints and restarts), whose controller then does not
    import torch (to unpickle TorchConfig: ~1.5 s of CPU) and does not make the worker set up a gloo
    group; train_loop_per_worker sets the CUDA device itself. Several workers train with DDP."""
    import ray
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    base = TorchTrainer if num_workers > 1 else DataParallelTrainer

    unused = {"DatasetsCallback"}
    # (inside an actor, e.g. a Tune trial, get_dashboard_url() names a default even where none runs:
    # the stage's driver then says so with RT_RAY_DASHBOARD=0, forwarded to every worker)
    if os.environ.get("RT_RAY_DASHBOARD") == "0" or not ray._private.worker.get_dashboard_url():
        unused.add("PlacementGroupCleanerCallback")

    class Trainer(base):
        def _create_default_callbacks(self):
            drop = unused - ({"DatasetsCallback"} if getattr(self, "datasets", None) else set())
            return [c for c in super()._create_default_callbacks() if type(c).__name__ not in drop]

    return Trainer


def storage_path(ray_cfg: RayConfig, default) -> str:
    """Where Ray Train keeps checkpoints: `ray.storage_path` when set (a folder every node mounts, or a
    cloud URI: needed once workers run on other machines), else the stage's local `default` folder."""
    if getattr(ray_cfg, "storage_path", None):
        return ray_cfg.storage_path
    path = Path(default).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


# ----------------------------------------------------------------------------- worker side
def train_loop_per_worker(job: dict) -> None:
    import ray.train
    import ray.train.torch as rtt

    from .methods import build_plan

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # progress comes from our own bar
    _quiet_report_log()
    torch.set_num_threads(int(job["cpus_per_worker"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = rtt.get_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # what TorchTrainer does, also for a single worker (see _trainer_class)
    plan = build_plan(job, device)  # seeded by the job: every rank starts from the same weights
    cfg = plan.train_cfg
    torch.manual_seed(cfg.seed + rank)  # then one seed per rank for the attacks' noise
    # Convolution weights (and so activations) in NHWC: oneDNN on the CPU and cuDNN under AMP run
    # convolutions faster on it (the default small CNN's fp32 steps 1.1-1.3x on 2 CPU cores, and bf16
    # needs it for its full 2x); the same function up to float rounding. Checkpoints hold the weights;
    # nets load them in either layout.
    module = TrainModule(plan).to(device, memory_format=torch.channels_last)
    if plan.ctx.teacher is not None:
        plan.ctx.teacher.to(device, memory_format=torch.channels_last).eval()
    model = module
    if world > 1:
        model = rtt.prepare_model(module, move_to_device=False,
                                  parallel_strategy_kwargs={"find_unused_parameters": True})
    params = list(plan.params)
    aux_params = list(plan.ctx.aux.parameters())
    if aux_params:  # plans may give plain params or param groups; aux (e.g. NFD's 1x1 convs) joins as its own
        params = params + ([{"params": aux_params}] if isinstance(params[0], dict) else aux_params)
    opt = _optimizer(params, cfg)
    n = len(plan.train["y"])
    per_rank = max(1, math.ceil(n / world))
    steps_per_epoch = max(1, math.ceil(per_rank / cfg.batch_size))
    sched = _schedule(opt, cfg, steps_per_epoch)
    swa_net = None
    state = dict(epoch=-1, history=[], seconds=0.0, passes=0.0, best_guard=None, stopped_early=None, resumed_from=[],
                 checkpoint_epoch=None)
    # Checkpoints at most every `checkpoint_every_s` seconds and after the last epoch: with small jobs an
    # epoch-by-epoch checkpoint (save, persist, the controller's bookkeeping) cost more than the epoch.
    every_s = float(job.get("checkpoint_every_s", 0.0))
    report_epochs = set(job.get("report_epochs") or ())  # epochs done at which a Tune trial reports
    last_checkpoint = time.monotonic()
    good = None  # with on_nonfinite: rollback, the weights of the last validated epoch

    if rank == 0:
        _write_failure(None)  # a new attempt: an earlier attempt's failure no longer stands
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resume: weights, optimiser, schedule and counters from the latest epoch
        with checkpoint.as_directory() as d:
            saved = torch.load(Path(d) / "state.pt", map_location=device, weights_only=True)
        module.load_state_dict(saved["module"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        for key in ("epoch", "history", "seconds", "passes", "stopped_early"):
            state[key] = saved[key]
        state["checkpoint_epoch"] = saved["epoch"]
        state["resumed_from"] = saved.get("resumed_from", []) + [saved["epoch"]]
        if saved.get("swa"):
            swa_net = _swa_init(plan.net)
            swa_net.load_state_dict(saved["swa"])
        good = _snapshot(module, swa_net, state) if cfg.on_nonfinite == "rollback" else None
        if state["stopped_early"] or state["epoch"] >= cfg.epochs - 1:
            # Nothing left to train: report the end again, so this run too ends with metrics and a
            # final checkpoint (a Tune trial restarted after its job finished would see none).
            data = {k: v.to(device) for k, v in plan.train.items()}  # SWA's BN statistics need it
            _report(module, opt, sched, swa_net, plan, state, rank, final=True, data=data)
            return

    data = {k: _nhwc(v.to(device)) for k, v in plan.train.items()}
    val_x, val_y = _nhwc(plan.val[0].to(device)), plan.val[1].to(device)
    guard_x, guard_y = data["x"][:256], data["y"][:256]
    autocast = training_autocast(cfg.amp, device)
    bar = _progress(rank, cfg.epochs, state["epoch"] + 1, job.get("name", "train"))
    for epoch in range(state["epoch"] + 1, cfg.epochs):
        t0 = time.perf_counter()
        if plan.on_epoch:
            plan.on_epoch(epoch)
        module.train()
        for bn in plan.frozen_bn:
            bn.eval()
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        order = torch.randperm(n, generator=g)[rank::world].to(device)
        tot_loss, tot_correct, seen, passes = 0.0, 0, 0, 0.0
        for step_i in range(steps_per_epoch):
            idx = order[step_i * cfg.batch_size:(step_i + 1) * cfg.batch_size]
            if len(idx) == 0:
                idx = order[:cfg.batch_size]  # keep every rank stepping in lockstep
            batch = {k: v[idx] for k, v in data.items()}
            if cfg.augment:
                batch["x"] = _augment(batch["x"])
            with autocast:
                loss, logits, step_passes = model(batch)
            if job.get("test_faults"):
                loss = _inject_fault(job, epoch * steps_per_epoch + step_i, rank, loss)
            if not _all_finite(loss, world):  # every rank stops at the same step (no rank left in an all-reduce)
                value = loss.item() if not torch.isfinite(loss) else "non-finite on another worker"
                where = f"loss became {value} at epoch {epoch} step {step_i}"
                if good is not None:  # on_nonfinite: rollback
                    swa_net = _restore(good, module, swa_net, state)
                    state["stopped_early"] = (f"{where}; rolled back to the weights of epoch {good['epoch']} "
                                              f"(the last validated)")
                    _report(module, opt, sched, swa_net, plan, state, rank, final=True, data=data)
                    if bar is not None:
                        bar.close()
                    return
                kept = (f"kept the last good checkpoint (epoch {state['checkpoint_epoch']})"
                        if state["checkpoint_epoch"] is not None else
                        "no checkpoint had been written yet (one every ray.checkpoint_every_s and at the end)")
                if cfg.on_nonfinite == "rollback":
                    kept += ", and no epoch had been validated to roll back to"
                state["stopped_early"] = f"{where}; {kept}"
                if rank == 0:
                    _write_failure(state["stopped_early"])
                _report_failure(state, plan)
                return
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if swa_net is None:
                sched.step()
            if plan.after_step:
                plan.after_step()
            tot_loss += loss.item() * len(idx)
            tot_correct += (logits.argmax(1) == batch["y"]).sum().item()
            seen += len(idx)
            passes += step_passes * len(idx)
            if plan.guard and (step_i + 1) % max(1, plan.ctx.options.get("guard_every", 20)) == 0:
                if _guard_tripped(plan, state, guard_x, guard_y, module):
                    break
        if swa_net is None and plan.swa_epochs and epoch >= cfg.epochs - plan.swa_epochs:
            swa_net = _swa_init(plan.net)
        if swa_net is not None:
            swa_net.update_parameters(plan.net)
        state["seconds"] += time.perf_counter() - t0
        state["passes"] += passes * world
        row = {"epoch": epoch, "train_loss": tot_loss / max(seen, 1), "train_acc": tot_correct / max(seen, 1)}
        final = bool(epoch == cfg.epochs - 1 or state["stopped_early"])
        due = final or every_s <= 0 or time.monotonic() - last_checkpoint >= every_s
        # Metrics go to Ray Train with the checkpoints (the history travels in each one), and in a
        # Tune trial also at the epochs its scheduler compares trials (`report_epochs`): each report
        # waits for the controller's next poll when the one before is still unread.
        report = due or (epoch + 1) in report_epochs
        # Validation (a PGD check) every `val_every` epochs and with every report: on a few-shot
        # task an epoch is a handful of steps, and validating each one cost more than training.
        validated = report or (epoch + 1) % cfg.val_every == 0
        if validated:
            row.update(_validate(plan, val_x, val_y))
        row.update(epoch_seconds=time.perf_counter() - t0, passes=state["passes"])
        state["history"].append(row)
        state["epoch"] = epoch
        if validated and cfg.on_nonfinite == "rollback":
            good = _snapshot(module, swa_net, state)
        if bar is not None:
            bar.set_description(f"{job.get('name', 'train')} " + " ".join(
                f"{k}={v:.3f}" for k, v in row.items() if k not in ("epoch", "passes", "epoch_seconds")))
            bar.update(1)
        if report:
            _report(module, opt, sched, swa_net, plan, state, rank, final=final, data=data, checkpoint=due)
        if due:
            last_checkpoint = time.monotonic()
        if state["stopped_early"]:
            break
    if bar is not None:
        bar.close()


def native_bf16(device: torch.device) -> bool:
    """Does this device compute in bf16 itself? CUDA GPUs, and CPUs with AVX512-BF16 or AMX (oneDNN
    uses them); elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return True
    cpu = getattr(torch, "cpu", None)
    return device.type == "cpu" and any(getattr(cpu, name, lambda: False)() for name in
                                        ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def training_autocast(amp: bool, device: torch.device):
    """`train.amp`: bf16 autocast of each training step (the attack and the loss) where the device
    computes in bf16 (native_bf16), fp32 elsewhere; bf16 needs no loss scaling. Validation, the
    guard and the stages' evaluations stay in fp32, so no robustness number is measured in bf16."""
    if amp and native_bf16(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """Image batches in the layout of the weights (see train_loop_per_worker); other tensors as they are."""
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def _snapshot(module, swa_net, state: dict) -> dict:
    """The weights (and SWA average) of the epoch just validated, for on_nonfinite: rollback."""
    def copied(state_dict):
        return {k: v.detach().clone() for k, v in state_dict.items()}

    return {"epoch": state["epoch"], "rows": len(state["history"]), "module": copied(module.state_dict()),
            "swa": copied(swa_net.state_dict()) if swa_net is not None else None}


def _restore(good: dict, module, swa_net, state: dict):
    """Back to a snapshot: its weights, SWA average and history (the passes spent since stay counted)."""
    module.load_state_dict(good["module"])
    if good["swa"] is None:
        swa_net = None
    else:
        swa_net.load_state_dict(good["swa"])
    state["history"] = state["history"][:good["rows"]]
    state["epoch"] = good["epoch"]
    return swa_net


def _quiet_report_log() -> None:
    """Ray Train logs every `report` at INFO with its whole metrics dict (a log line per epoch per
    worker, longer than the progress bar) under a logger named after its file, outside "ray.train"."""
    try:
        from ray.train.v2._internal.execution import context

        logging.getLogger(context.__file__).setLevel(logging.WARNING)
    except ImportError:  # Ray Train V1, or a Ray that moved it: only noisier
        pass


def _progress(rank: int, total: int, start: int, name: str):
    if rank != 0:
        return None
    try:  # Ray's tqdm forwards one clean bar per worker to the driver
        from ray.experimental.tqdm_ray import tqdm
    except ImportError:
        from tqdm import tqdm
    bar = tqdm(total=total, desc=name, unit="epoch")
    if start:
        bar.update(start)
    return bar


def _optimizer(params, cfg: TrainConfig):
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)


def _schedule(opt, cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups],
                                                   total_steps=total, pct_start=0.25)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


def _augment(x: torch.Tensor) -> torch.Tensor:
    """Random crop (pad 4) and horizontal flip, batched on the device."""
    n, _, h, w = x.shape
    flip = torch.rand(n, device=x.device) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    i, j = torch.randint(0, 9, (2,)).tolist()
    return padded[:, :, i:i + h, j:j + w].contiguous()


def _swa_init(net):
    from torch.optim.swa_utils import AveragedModel

    return AveragedModel(net)


@torch.no_grad()
def _clean_acc(net, x, y, bs=500) -> float:
    return sum((net(x[i:i + bs]).argmax(1) == y[i:i + bs]).sum().item() for i in range(0, len(y), bs)) / max(len(y), 1)


VAL_PGD_IMAGES = 200  # the per-epoch PGD check attacks at most this many validation images


def _validate(plan: Plan, x, y) -> dict:
    from . import attacks

    net, t = plan.net, plan.ctx.threat
    was = net.training
    net.eval()
    out = {"val_clean_acc": _clean_acc(net, x, y)}
    xs, ys = x[:VAL_PGD_IMAGES], y[:VAL_PGD_IMAGES]  # a quick PGD check on a fixed slice: the trend, not the final number
    # PGD's random start on a stream of its own: how often a job validates (val_every, a Tune trial's
    # rungs) leaves its training, and its weights, unchanged.
    with attacks.own_random_stream(x.device):
        x_adv = attacks.pgd_until_fooled(net, xs, ys, t.eps, t.step_size, t.train_steps, t.norm)
    with torch.no_grad():  # robust = right on the clean image and on its attack (a weak attack can
        # land a misclassified image on the right side, which must not count)
        robust = (net(xs).argmax(1) == ys) & (net(x_adv).argmax(1) == ys)
    out["val_pgd_acc"] = robust.sum().item() / max(len(ys), 1)  # as _clean_acc counts: equal counts compare equal
    net.train(was)
    return out


def _guard_tripped(plan: Plan, state: dict, x, y, module) -> bool:
    """Fast AT's guard (Wong et al.): PGD accuracy on a held training batch; a collapse below the best
    by more than `guard_drop` means catastrophic overfitting: roll back to the best weights and stop."""
    from . import attacks

    net, t = plan.net, plan.ctx.threat
    net.eval()
    acc = _clean_acc(net, attacks.pgd_until_fooled(net, x, y, t.eps, t.step_size, 5, t.norm), y)
    net.train()
    for bn in plan.frozen_bn:
        bn.eval()
    best = state["best_guard"]
    if best is None or acc >= best[0]:
        state["best_guard"] = (acc, copy.deepcopy(module.state_dict()))
        return False
    if acc < best[0] - plan.ctx.options.get("guard_drop", 0.2):
        module.load_state_dict(best[1])
        state["stopped_early"] = f"catastrophic overfitting: PGD check fell to {acc:.3f} from {best[0]:.3f}; rolled back"
        return True
    return False


def _report(module, opt, sched, swa_net, plan: Plan, state: dict, rank: int, final: bool, data=None,
            checkpoint: bool = True) -> None:
    """This epoch's metrics to Ray Train, with a checkpoint (rank 0) when `checkpoint`."""
    import ray.train
    from ray.train import Checkpoint

    metrics = dict(state["history"][-1]) if state["history"] else {}
    metrics["done"] = final
    metrics.update(_where())
    if checkpoint:
        state["checkpoint_epoch"] = state["epoch"]  # on every rank: each may word the NaN stop
    if rank != 0 or not checkpoint:
        ray.train.report(metrics)
        return
    final_state = None
    if final and swa_net is not None:
        from torch.optim.swa_utils import update_bn

        # SWA's averaged weights need BN statistics of their own: one pass over the training data.
        loader = [data["x"][i:i + 256] for i in range(0, len(data["x"]), 256)] if data else []
        update_bn(loader, swa_net)
        final_state = {k: v.cpu() for k, v in swa_net.module.state_dict().items()}
    with tempfile.TemporaryDirectory() as d:
        torch.save({
            "module": module.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
            "swa": swa_net.state_dict() if swa_net is not None else None,
            "net": {k: v.cpu() for k, v in plan.net.state_dict().items()}, "final": final_state,
            "spec": plan.spec, "epoch": state["epoch"], "history": state["history"],
            "seconds": state["seconds"], "passes": state["passes"], "stopped_early": state["stopped_early"],
            "resumed_from": state["resumed_from"],
        }, Path(d) / "state.pt")
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))


def _where() -> dict:
    """The node and host this worker runs on, reported with every epoch's metrics (the tune stage
    records them per trial; on a cluster they show where the work went)."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "hostname": socket.gethostname()}


# ----------------------------------------------------------------------------- test-only fault injection
# tests/test_reliability.py proves the fault tolerance on real runs with these (see docs/reliability.md):
#   RT_FAIL_ONCE_AT_STEP=n  rank 0 fails once at global step n (epoch * steps_per_epoch + step), then never
#                           again in this run: a marker file records it (FailureConfig must restart it)
#   RT_FAIL_MODE=raise      how it fails: raise an exception (default), or `sigkill` its own process
#   RT_NAN_AT_STEP=n        the loss at global step n becomes NaN (the NaN guard must stop the run)
# They are part of the job (and its hash), so a faulty run never shares checkpoints with a clean one.
def _with_test_faults(job: dict, name: str) -> dict:
    faults = {}
    for key, env in (("fail_once_at_step", "RT_FAIL_ONCE_AT_STEP"), ("nan_at_step", "RT_NAN_AT_STEP")):
        if os.environ.get(env):
            faults[key] = int(os.environ[env])
    if not faults:
        return job
    faults["fail_mode"] = os.environ.get("RT_FAIL_MODE", "raise")
    marker = Path(tempfile.gettempdir()) / f"rt-fault-{name}-{os.getpid()}-{time.time_ns()}"
    return dict(job, test_faults=faults, fault_marker=str(marker))


def _inject_fault(job: dict, step: int, rank: int, loss: torch.Tensor) -> torch.Tensor:
    faults = job["test_faults"]
    if step == faults.get("nan_at_step"):
        return loss * float("nan")
    marker = Path(job["fault_marker"])
    if step == faults.get("fail_once_at_step") and rank == 0 and not marker.exists():
        marker.write_text(f"failed at step {step}\n")
        if faults["fail_mode"] == "sigkill":
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure at step {step} (RT_FAIL_ONCE_AT_STEP)")
    return loss


def _all_finite(loss: torch.Tensor, world: int) -> bool:
    finite = bool(torch.isfinite(loss.detach()))
    if world > 1:
        flag = torch.tensor([1.0 if finite else 0.0], device=loss.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        finite = flag.item() > 0
    return finite


FAILURE_FILE = "failure.txt"


def _write_failure(message: Optional[str]) -> None:
    """Record (or with None, clear) why this run stopped, in the run's folder on its storage."""
    import ray.train

    storage = ray.train.get_context().get_storage()
    path = f"{storage.experiment_fs_path}/{FAILURE_FILE}"
    if message is None:
        if storage.storage_filesystem.get_file_info(path).type.name != "NotFound":
            storage.storage_filesystem.delete_file(path)
        return
    with storage.storage_filesystem.open_output_stream(path) as f:
        f.write(message.encode())


def _read_failure(result) -> Optional[str]:
    try:
        with result.filesystem.open_input_stream(f"{result.path}/{FAILURE_FILE}") as f:
            return f.read().decode().strip() or None
    except (FileNotFoundError, OSError):
        return None


def _report_failure(state: dict, plan: Plan) -> None:
    """NaN/inf loss: report the reason without a checkpoint, so the last good one stays the latest.
    Callbacks that see every report (the tune stage's relay) read it here; `fit` reads FAILURE_FILE."""
    import ray.train

    ray.train.report({"failed": state["stopped_early"]})
