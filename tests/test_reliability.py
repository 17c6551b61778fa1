"""Reliability (issue 7): resume after a kill, restarts within a run, no lost or half-written outputs,
and one clear line for every kind of bad input. docs/reliability.md maps each case to its test here.

The bad-input tests run the real stages as DVC would (`python -m stages.<stage>`) in a copy of a
prepared project (digits), and check: exit code 2, exactly one `error:` line naming the problem, no
traceback, and every output that existed before byte-for-byte unchanged. None of them needs Ray to
start. The fault tests run real Ray Train jobs: in-process ones share one Ray runtime; the kill test
runs the pretrain stage three times (marked slow).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rt_testlib import (copy_prepared, error_lines, prepared_project, run_stage, smoke_params, snapshot, stage_env,
                        write_params)
from robust_transfer import engine, features
from robust_transfer.config import ConfigError, RayConfig, ThreatConfig, TrainConfig
from robust_transfer.data import atomic_write, read_image_table, to_table, verify_card, write_json, write_table
from robust_transfer.nets import build_net, net_spec, save_model

OUTPUTS = ("data", "models", "metrics", "plots")


# ============================================================================= bad input
@pytest.fixture(scope="module")
def base_project(tmp_path_factory) -> Path:
    """A prepared project (smoke params, digits tables, data card) with untrained source checkpoints
    and their metrics where the pretrain stage would put them: outputs a bad run must not touch."""
    root = copy_prepared(tmp_path_factory.mktemp("bad-input") / "project")
    spec = net_spec("small_cnn", (8, 8, 1), 5, 1)
    for name in ("natural", "robust", "cartl"):
        torch.manual_seed(0)
        save_model(build_net("small_cnn", 1, 5, 8), spec, root / "models" / f"{name}.pt",
                   extra={"run_id": "test", "source": name})
        write_json({"clean_acc": 0.5}, root / "metrics" / f"pretrain_{name}.json")
    return root


@pytest.fixture
def project(base_project, tmp_path) -> Path:
    """A private copy of `base_project` for one test to damage."""
    return Path(shutil.copytree(base_project, tmp_path / "project"))


def _outputs(root: Path) -> dict:
    return {d: snapshot(root / d) for d in OUTPUTS}


def refuse(root: Path, *stage_args, fragment: str, params: dict | None = None, **env) -> str:
    """Run a stage that must refuse: exit code 2, one `error:` line holding `fragment`, no traceback,
    no output changed. Returns the error line."""
    if params is not None:
        write_params(root, params, "bad.yaml")
    before = _outputs(root)
    # the prepared project's MLflow store, already created: each copy would otherwise create its own
    env.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{prepared_project() / 'mlflow.db'}")
    start = time.monotonic()
    proc = run_stage(root, *stage_args, params="bad.yaml" if params is not None else "params.yaml",
                     timeout=180, **env)
    elapsed = time.monotonic() - start
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2, f"exit code {proc.returncode}\n{proc.stderr[-3000:]}"
    assert len(lines) == 1 and fragment in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert _outputs(root) == before, "a refused run changed an output"
    assert not list(root.rglob(".*.tmp-*")), "a refused run left a temporary file"
    print(f"{stage_args}: {elapsed:.1f}s: {lines[0]}")
    return lines[0]


PARAM_CASES = [  # (case, stage, overrides of the smoke params, what the line must name)
    ("misspelt key", "prepare", {"data": {"shot": 5}}, "data.shot (did you mean 'shots'?)"),
    ("wrong type", "pretrain", {"threat": {"eps": "0.1"}}, "threat.eps must be a number"),
    ("negative eps", "pretrain", {"threat": {"eps": -0.1}}, "threat.eps must be in (0, 1.0]"),
    ("absurd eps", "pretrain", {"threat": {"eps": 8.0}}, "threat.eps must be in (0, 1.0]"),
    ("too many shots", "prepare", {"data": {"shots": 500, "val_shots": 2}}, "data.shots=500 is larger than"),
    ("overlapping classes", "prepare", {"data": {"target_classes": [4, 5, 6]}}, "data.target_classes overlap"),
    ("unknown dataset", "prepare", {"data": {"dataset": "imagenet"}}, "data.dataset: unknown value 'imagenet'"),
    ("unknown architecture", "pretrain", {"pretrain": {**smoke_params()["pretrain"],
                                                       "train": {"arch": "resnet50"}}},
     "pretrain.train.arch: unknown value 'resnet50'"),
]


@pytest.mark.parametrize("case,stage,overrides,fragment", PARAM_CASES, ids=[c[0] for c in PARAM_CASES])
def test_bad_params_stop_the_stage_and_keep_outputs(project, case, stage, overrides, fragment):
    args = ("pretrain", "robust") if stage == "pretrain" else (stage,)
    refuse(project, *args, params=smoke_params(**overrides), fragment=fragment)


def test_unknown_source_name(project):
    refuse(project, "pretrain", "robsut", fragment="no source 'robsut' in pretrain.sources")


def test_missing_data_files(project):
    (project / "data" / "source_train.parquet").unlink()
    refuse(project, "pretrain", "robust", fragment="missing data file data/source_train.parquet")
    (project / "data" / "card.json").unlink()
    refuse(project, "extract", "robust", fragment="missing data card data/card.json")
    user = dict(smoke_params(), data={**smoke_params()["data"], "dataset": "parquet",
                                      "root": str(project / "nope.parquet")})
    refuse(project, "prepare", params=user, fragment=f"missing data file {project / 'nope.parquet'}")


def test_truncated_table_is_caught_by_its_data_card(project):
    path = project / "data" / "source_train.parquet"
    path.write_bytes(path.read_bytes()[:2000])
    refuse(project, "pretrain", "robust", fragment="data/source_train.parquet does not match its data card")


def test_data_card_hash_mismatch(project):
    card = json.loads((project / "data" / "card.json").read_text())
    card["tables"]["target_test"]["sha256"] = "0" * 64
    (project / "data" / "card.json").write_text(json.dumps(card))
    refuse(project, "extract", "robust", fragment="data/target_test.parquet does not match its data card")


def test_corrupt_user_parquet_table(project):
    user = project / "mine.parquet"
    pq.write_table(pa.table({"image": [b"x" * 50] * 200, "label": [0, 1] * 100, "split": ["train"] * 200}), user)
    user.write_bytes(user.read_bytes()[:-300])
    params = dict(smoke_params(), data={**smoke_params()["data"], "dataset": "parquet", "root": str(user)})
    refuse(project, "prepare", params=params, fragment=f"{user} is not a readable Parquet table")


def test_checkpoint_of_another_architecture(project):
    ckpt = project / "models" / "robust.pt"
    save_model(build_net("preact_resnet18", 1, 5, 8), net_spec("preact_resnet18", (8, 8, 1), 5, 1), ckpt)
    refuse(project, "extract", "robust", fragment="holds a 'preact_resnet18' checkpoint, expected 'small_cnn'")
    save_model(build_net("small_cnn", 3, 5, 32), net_spec("small_cnn", (32, 32, 3), 5, 1), ckpt)
    refuse(project, "extract", "robust", fragment="holds a model for {'in_channels': 3, 'image_size': 32}")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this creates the marker file
        return (open, (self.marker, "w"))


def test_checkpoint_that_is_not_a_state_dict_is_never_unpickled(project):
    marker = project / "code-ran"
    (project / "models" / "robust.pt").write_bytes(pickle.dumps({"spec": _Payload(str(marker))}))
    refuse(project, "extract", "robust", fragment="is not a state-dict checkpoint")
    assert not marker.exists(), "loading the checkpoint ran its code"


def test_use_gpu_without_a_gpu(project):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    params = dict(smoke_params(), ray={**smoke_params()["ray"], "use_gpu": True})
    # before Ray starts: a training stage, and a stage whose own model work would go to the cluster's GPU
    for stage in ("pretrain", "extract"):
        refuse(project, stage, "robust", params=params, fragment="ray.use_gpu is true but this machine has 0 CUDA GPU")


def test_more_workers_than_the_machine_has(project):
    params = dict(smoke_params(), ray={**smoke_params()["ray"], "num_workers": 4 * (os.cpu_count() or 1)})
    refuse(project, "pretrain", "robust", params=params, fragment="ray.num_workers x ray.cpus_per_worker")


def _listening_nowhere() -> str:
    import socket

    with socket.socket() as s:  # a port nothing listens on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_unreachable_ray_address(project):
    start = time.monotonic()
    refuse(project, "pretrain", "robust", fragment="is not reachable", RAY_ADDRESS=_listening_nowhere())
    assert time.monotonic() - start < 90  # imports included; the check itself takes milliseconds


def test_unreachable_mlflow_tracking_uri(project):
    start = time.monotonic()
    refuse(project, "pretrain", "robust", fragment="is not reachable",
           MLFLOW_TRACKING_URI=f"http://{_listening_nowhere()}")
    assert time.monotonic() - start < 90


# ============================================================================= atomic outputs
def _temporaries(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def _old_table(path):
    write_table(to_table(torch.zeros(10, 4, 4, 1, dtype=torch.uint8).numpy(), [0, 1] * 5, [0, 1] * 5, ["a", "b"]),
                path)
    return path.read_bytes()


def test_failed_writes_keep_the_old_file_and_leave_no_temporary(tmp_path, monkeypatch):
    table = tmp_path / "t.parquet"
    old = _old_table(table)

    def half_then_fail(tbl, where, **kw):
        Path(where).write_bytes(b"PAR1 half a table")
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", half_then_fail)
    with pytest.raises(OSError):
        write_table(to_table(torch.ones(3, 4, 4, 1, dtype=torch.uint8).numpy(), [0, 1, 0], [0, 1, 0], ["a", "b"]),
                    table)
    monkeypatch.undo()
    assert table.read_bytes() == old and read_image_table(table).labels.tolist() == [0, 1] * 5
    assert _temporaries(tmp_path) == []

    ckpt = tmp_path / "m.pt"
    save_model(build_net("small_cnn", 1, 2, 8), net_spec("small_cnn", (8, 8, 1), 2, 1), ckpt)
    old_ckpt = ckpt.read_bytes()

    def torch_save_fails(obj, where, *a, **kw):
        Path(where).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise RuntimeError("killed")

    monkeypatch.setattr(torch, "save", torch_save_fails)
    with pytest.raises(RuntimeError):
        save_model(build_net("small_cnn", 1, 2, 8), net_spec("small_cnn", (8, 8, 1), 2, 1), ckpt)
    monkeypatch.undo()
    assert ckpt.read_bytes() == old_ckpt and _temporaries(tmp_path) == []

    write_json({"clean_acc": 0.9}, tmp_path / "m.json")
    with pytest.raises(TypeError):
        write_json({"clean_acc": object()}, tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text()) == {"clean_acc": 0.9}
    assert _temporaries(tmp_path) == []


def test_failed_feature_extraction_keeps_the_old_table(tmp_path):
    images = tmp_path / "images.parquet"
    write_table(to_table(torch.randint(0, 255, (40, 8, 8, 1), dtype=torch.uint8).numpy(), [0, 1] * 20,
                         [0, 1] * 20, ["a", "b"]), images)
    net = build_net("small_cnn", 1, 2, 8)
    out = tmp_path / "features.parquet"
    assert features.extract(net, images, out, [2], {"source": "s"}, batch_size=8) == 40
    old = out.read_bytes()
    calls = {"n": 0}
    original = net.features

    def fails_on_the_third_batch(x):
        calls["n"] += 1
        if calls["n"] == 3:  # two batches are already written to the temporary table
            raise RuntimeError("worker lost")
        return original(x)

    net.features = fails_on_the_third_batch
    with pytest.raises(RuntimeError):
        features.extract(net, images, out, [2], {"source": "s"}, batch_size=8)
    assert out.read_bytes() == old and _temporaries(tmp_path) == []


KILLED_WRITER = """
import sys, time
from robust_transfer.data import atomic_write
with atomic_write(sys.argv[1]) as tmp:
    with open(tmp, "wb") as f:
        f.write(b"half of the new content")
        f.flush()
        print("writing", flush=True)
        time.sleep(120)  # killed here, in the middle of the write
        f.write(b" and the rest")
"""


def test_sigkill_mid_write_leaves_the_old_file_and_the_next_write_cleans_up(tmp_path):
    target = tmp_path / "t.parquet"
    old = _old_table(target)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)], stdout=subprocess.PIPE, text=True,
                            env=stage_env())
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert target.read_bytes() == old
    assert _temporaries(tmp_path) == [f".t.parquet.tmp-{proc.pid}"]  # a SIGKILL cannot clean up ...
    _old_table(target)
    assert _temporaries(tmp_path) == []  # ... the next write of the same file does


def test_no_stage_of_the_smoke_pipeline_leaves_temporaries(smoke_project):
    project = smoke_project.parents[1]
    left = [str(p.relative_to(project)) for p in project.rglob("*.tmp-*")]
    assert left == []


# ============================================================================= DVC's lock
HOLD_STAGE = """\
stages:
  prepare:
    cmd: python -m stages.prepare && while [ ! -e release ]; do sleep 0.1; done
    params:
      - data
    outs:
      - data/source_train.parquet
      - data/card.json:
          cache: false
"""


def test_second_dvc_repro_stops_on_the_lock_and_the_first_finishes(tmp_path):
    """The stage holds DVC's lock (it waits for `release` after preparing the data) while a second
    `dvc repro` starts in the same project: the second stops with DVC's message naming the first."""
    env = stage_env()
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, env=env, check=True)
    write_params(tmp_path, smoke_params())
    (tmp_path / "dvc.yaml").write_text(HOLD_STAGE)
    first = subprocess.Popen([dvc, "repro"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "data" / "card.json").exists():
            assert first.poll() is None, first.stdout.read()
            assert time.monotonic() < deadline, "the first dvc repro did not get to its stage"
            time.sleep(0.2)
        card = (tmp_path / "data" / "card.json").read_bytes()
        second = subprocess.run([dvc, "repro"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode != 0
        # DVC 3 locks each stage's outputs (.dvc/tmp/rwlock) for the run; the whole repo only briefly
        said = second.stdout + second.stderr
        assert re.search(rf"is busy, it is being blocked by:\s+\(PID {first.pid}\)", said) or \
            "Unable to acquire lock" in said, said
        assert first.poll() is None, "the second dvc repro disturbed the first"
        assert (tmp_path / "data" / "card.json").read_bytes() == card
    finally:
        (tmp_path / "release").touch()
        out = first.communicate(timeout=300)[0]
    assert first.returncode == 0, out
    assert (tmp_path / "dvc.lock").is_file()
    verify_card(tmp_path / "data" / "card.json", {"source_train": tmp_path / "data" / "source_train.parquet"})


# ============================================================================= Ray Train faults
@pytest.fixture(scope="module")
def ray_runtime():
    """One private Ray runtime for the in-process fault tests: not the local runtime every stage
    shares (runtime.py), whose CPUs another pipeline on this machine may hold for minutes."""
    import ray

    was = os.environ.get("RT_LOCAL_RAY")
    os.environ["RT_LOCAL_RAY"] = "off"
    try:
        engine.connect(RayConfig(num_workers=1, cpus_per_worker=1))
    finally:
        os.environ.pop("RT_LOCAL_RAY") if was is None else os.environ.__setitem__("RT_LOCAL_RAY", was)
    yield
    ray.shutdown()


ORPHAN_MAKER = """
import sys, ray
ray.init(address=sys.argv[1], logging_config=ray.LoggingConfig(log_level="ERROR"))

@ray.remote(num_cpus=0)
class Maker:  # detached: its placement group outlives this job, as a killed stage's can
    def make(self):
        from ray.util.placement_group import placement_group
        pg = placement_group([{"CPU": 1}])
        ray.get(pg.ready())
        return pg.id.hex()

maker = Maker.options(lifetime="detached", name="rt-orphan-maker", namespace="rt-test").remote()
print(ray.get(maker.make.remote()))
"""


def test_placement_groups_of_dead_jobs_are_released(ray_runtime):
    """A placement group left behind by a finished job holds its CPUs until someone removes it;
    every stage joining the shared runtime removes those (and only those) first."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from robust_transfer import runtime

    address = ray.get_runtime_context().gcs_address
    out = subprocess.run([sys.executable, "-c", ORPHAN_MAKER, address], capture_output=True, text=True,
                         timeout=120, env=stage_env())
    assert out.returncode == 0, out.stderr[-2000:]
    orphan = out.stdout.split()[-1]
    ours = placement_group([{"CPU": 0.5}])  # this live job's own group stays
    ray.get(ours.ready(), timeout=60)
    try:
        assert placement_group_table()[orphan]["state"] == "CREATED"  # Ray keeps it: the leak is real
        assert runtime.release_orphaned_placement_groups() == 1
        assert placement_group_table()[orphan]["state"] == "REMOVED"
        assert placement_group_table(ours)["state"] == "CREATED"
    finally:
        remove_placement_group(ours)
        ray.kill(ray.get_actor("rt-orphan-maker", namespace="rt-test"))


def _job(name: str, epochs: int = 3, batch_size: int = 64) -> dict:
    data = prepared_project() / "data"
    return {"name": name, "kind": "pretrain", "method": "natural", "options": {},
            "train": dataclasses.asdict(TrainConfig(epochs=epochs, batch_size=batch_size, lr=0.05)),
            "threat": dataclasses.asdict(ThreatConfig(train_steps=1, eval_steps=1)),
            "paths": {"train": str(data / "source_train.parquet"), "val": str(data / "source_test.parquet")},
            "num_classes": 5, "data_hash": "test"}


def _steps_per_epoch(batch_size: int = 64) -> int:
    n = pq.ParquetFile(prepared_project() / "data" / "source_train.parquet").metadata.num_rows
    return math.ceil(n / batch_size)


def test_an_idle_runtime_is_withdrawn_before_it_stops_unless_a_stage_took_a_lease(tmp_path):
    """The watchdog withdraws head.json (under the lock stages take their lease under) before it stops
    an idle head: a stage starting meanwhile starts a new head rather than joining a draining one."""
    from robust_transfer import runtime

    (tmp_path / "head.json").write_text("{}")
    (tmp_path / f"lease-{os.getpid()}").touch()  # a live stage
    assert not runtime._retire(tmp_path) and (tmp_path / "head.json").exists()
    (tmp_path / f"lease-{os.getpid()}").unlink()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / f"lease-{dead.pid}").touch()  # a stage that has exited: its lease is swept
    assert runtime._retire(tmp_path)
    assert not (tmp_path / "head.json").exists() and not list(tmp_path.glob("lease-*"))


def test_a_job_builds_the_same_initial_weights_whatever_the_process_drew_before():
    """build_plan seeds from the job: every rank of a DDP run, and every rerun, starts from the same
    network and new head, even where the process has used the random generator before."""
    from robust_transfer.methods import build_plan

    job = _job("init", epochs=1)
    torch.rand(3)
    first = {k: v.clone() for k, v in build_plan(job).net.state_dict().items()}
    torch.rand(1000)
    second = build_plan(job).net.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = build_plan(dict(job, train=dict(job["train"], seed=1))).net.state_dict()
    assert not all(torch.equal(first[k], other[k]) for k in first)  # the seed is what decides


def test_two_workers_train_with_ddp_and_one_worker_without_a_process_group(ray_runtime, tmp_path):
    """num_workers > 1 is DDP (TorchTrainer: a gloo group, gradients all-reduced, each rank a half of
    every epoch); a single worker runs under Ray Train's plain trainer, whose controller does not import
    torch. The same job trains either way: all the images, one optimiser step per batch per rank."""
    from ray.train.torch import TorchTrainer

    job = _job("ddp", epochs=4, batch_size=32)
    two = RayConfig(num_workers=2, cpus_per_worker=1, checkpoint_every_s=3600)
    assert isinstance(engine.make_trainer(job, two, tmp_path, "ddp"), TorchTrainer)
    assert not isinstance(engine.make_trainer(job, RayConfig(num_workers=1, cpus_per_worker=1), tmp_path, "one"),
                          TorchTrainer)
    result = engine.fit(job, two, tmp_path, job["name"])
    n = pq.ParquetFile(prepared_project() / "data" / "source_train.parquet").metadata.num_rows
    assert result.passes == 4 * n  # natural training: each image once per epoch, over both ranks
    assert [row["epoch"] for row in result.history] == [0, 1, 2, 3]
    assert result.history[-1]["val_clean_acc"] > 0.6  # it learned (that the ranks' gradients are averaged is DDP's, not checked here)


def test_a_stages_own_model_work_runs_as_a_ray_task_where_this_process_has_not_the_device(ray_runtime, tmp_path,
                                                                                         monkeypatch):
    """With ray.use_gpu and no GPU in the stage's process (the cluster's CPU head node), the checks
    after training, the feature extraction and the evaluation run as a Ray task on a GPU node: the
    same function, its arguments and result through Ray's object store, its files by absolute path.
    Forced here on the CPU (remote=True): the task's numbers and table equal the in-process ones."""
    from robust_transfer import evaluation

    gpu, cpu = RayConfig(use_gpu=True), RayConfig(use_gpu=False)
    monkeypatch.setattr(engine.torch.cuda, "is_available", lambda: False)
    assert engine.lacks_the_device(gpu) and not engine.lacks_the_device(cpu)
    monkeypatch.setattr(engine.torch.cuda, "is_available", lambda: True)
    assert not engine.lacks_the_device(gpu)
    monkeypatch.undo()

    def pid(fn, args, kwargs, device, threads):  # in place of the task's body: where did it run?
        import os
        return os.getpid(), device, threads

    with monkeypatch.context() as mp:
        mp.setattr(engine, "_run_on_device", pid)
        ran = engine.on_device(evaluation.stage_checks, RayConfig(num_workers=1, cpus_per_worker=1), remote=True)
        assert ran[0] != os.getpid() and ran[1:] == ("cpu", 1)

    net = build_net("small_cnn", 1, 5, 28)
    x, y = read_image_table(prepared_project() / "data" / "target_test.parquet").tensors()
    threat = ThreatConfig(eps=0.1, step_size=0.025, eval_steps=5)
    ray_cfg = RayConfig(num_workers=1, cpus_per_worker=1)
    here = engine.on_device(evaluation.stage_checks, ray_cfg, net, x[:300], y[:300], threat, pgd_images=50, seed=3)
    there = engine.on_device(evaluation.stage_checks, ray_cfg, net, x[:300], y[:300], threat, pgd_images=50, seed=3,
                             remote=True)
    assert there == here and set(here) == {"clean_acc", "pgd_acc"}
    table = str(prepared_project() / "data" / "target_val.parquet")
    meta = {"source": "test"}
    local_rows = engine.on_device(features.extract, ray_cfg, net, table, str(tmp_path / "here.parquet"), [2], meta)
    task_rows = engine.on_device(features.extract, ray_cfg, net, table, str(tmp_path / "there.parquet"), [2], meta,
                                 remote=True)
    assert task_rows == local_rows > 0
    assert pq.read_table(tmp_path / "there.parquet").equals(pq.read_table(tmp_path / "here.parquet"))
    # a table the task cannot read (not on the filesystem its node mounts) is one line naming it, as in process
    missing = str(tmp_path / "not-there.parquet")
    with pytest.raises(ConfigError) as here_err:
        engine.on_device(features.extract, ray_cfg, net, missing, str(tmp_path / "x.parquet"), [2], meta)
    with pytest.raises(ConfigError) as there_err:
        engine.on_device(features.extract, ray_cfg, net, missing, str(tmp_path / "x.parquet"), [2], meta, remote=True)
    assert str(there_err.value) == str(here_err.value) and "not-there.parquet" in str(there_err.value)


def test_on_device_tasks_get_a_large_input_through_the_object_store_once(ray_runtime, monkeypatch):
    """The evaluate stage hands every model's task the same test set and source model: sent to a GPU
    node, each large one goes into Ray's object store once (and leaves the cache when it dies), not
    once per model; the task computes what it computes in process."""
    import gc

    import ray

    from robust_transfer import evaluation

    net = build_net("small_cnn", 1, 5, 28)
    x, y = read_image_table(prepared_project() / "data" / "target_test.parquet").tensors()
    threat = ThreatConfig(eps=0.1, step_size=0.025, eval_steps=5)
    ray_cfg = RayConfig(num_workers=1, cpus_per_worker=1)
    puts = []
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda obj: puts.append(id(obj)) or real_put(obj))
    monkeypatch.setattr(engine, "STORE_ONCE_BYTES", x.numel() * x.element_size())  # (the digits are small)
    here = engine.on_device(evaluation.stage_checks, ray_cfg, net, x, y, threat, pgd_images=40, seed=3)
    runs = [engine.on_device(evaluation.stage_checks, ray_cfg, net, x, y, threat, pgd_images=40, seed=3, remote=True)
            for _ in range(3)]
    assert runs == [here] * 3
    assert puts.count(id(x)) == 1 and id(y) not in puts  # y is smaller: it travels with each task
    assert len(puts) == len(set(puts))  # whatever else was large (the net), once too
    assert id(x) in engine._STORED
    key = id(x)
    del x
    gc.collect()
    assert key not in engine._STORED


def test_a_failed_tune_trial_runs_again_and_its_first_run_frees_the_cpus(ray_runtime, tmp_path, monkeypatch):
    """A Tune trial whose actor fails (RT_FAIL_TRIAL_ONCE: every trial raises once, in its first step,
    while its Train run trains and before it has read that run's handle) runs again (ray.max_failures)
    and completes, so the choice still sees it. Each trial's workers take every CPU of the runtime:
    had the failed attempt's Train run kept its placement group, the retry could not start."""
    import ray

    from robust_transfer import tuning
    from robust_transfer.config import TuneConfig

    monkeypatch.setenv("RT_FAIL_TRIAL_ONCE", "1")
    job = dict(_job("retry", epochs=4, batch_size=256), method="trades", options={"beta": 6.0})
    cpus = int(ray.cluster_resources()["CPU"])
    cfg = TuneConfig(num_samples=2, max_concurrent_trials=1, cpus_per_worker=cpus, grace_frac=0.5)
    rows = tuning.search("retry", job, {"beta": (1.0, 6.0)}, cfg, RayConfig(num_workers=1, max_failures=1),
                         str(tmp_path), progress=False)
    assert [(r["status"], r["error"]) for r in rows] == [("completed", None)] * 2, rows
    assert all(r["epochs_done"] == 4 and 0 <= r["val_pgd_acc"] <= r["val_clean_acc"] for r in rows)


def test_validation_runs_every_val_every_epochs_with_each_report_and_at_the_end(ray_runtime, tmp_path):
    """train.val_every spaces the per-epoch PGD check; a Tune trial's report epochs (ASHA's rungs)
    and the last epoch are always validated, since what reads them needs the val_* metrics. How often
    a job validates does not change what it trains (FGSM-RS draws its random start from the same
    generator as the validation's PGD)."""
    ray_cfg = RayConfig(num_workers=1, cpus_per_worker=1, checkpoint_every_s=3600)
    job = dict(_job("val-every", epochs=5), method="fgsm_rs", options={"guard_every": 1000})
    job["train"]["val_every"] = 2
    job["report_epochs"] = [1]  # epochs done: a report after the first epoch
    sparse = engine.fit(job, ray_cfg, tmp_path, job["name"])
    assert [row["epoch"] for row in sparse.history] == [0, 1, 2, 3, 4]
    assert [row["epoch"] for row in sparse.history if "val_pgd_acc" in row] == [0, 1, 3, 4]
    every = dict(job, name="val-every-1", report_epochs=[], train=dict(job["train"], val_every=1))
    dense = engine.fit(every, ray_cfg, tmp_path, every["name"])
    assert all("val_pgd_acc" in row for row in dense.history)
    assert all(torch.allclose(sparse.state[k].float(), dense.state[k].float(), rtol=1e-5, atol=1e-6) for k in dense.state)


@pytest.mark.parametrize("mode", ["raise", "sigkill"])
def test_failed_worker_is_restarted_within_the_run_from_its_checkpoint(ray_runtime, tmp_path, monkeypatch, capsys,
                                                                      mode):
    """FailureConfig(max_failures): rank 0 fails once at the last step of epoch 2 (an exception, or
    SIGKILL of the worker process); Ray Train restarts the worker group within the same run and it
    resumes from the latest checkpoint. A checkpoint counts once Ray Train's controller has collected
    its report (it polls every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 0.2 s here): a worker SIGKILLed
    within that window after a report loses that checkpoint too and resumes from the one before."""
    steps = _steps_per_epoch(32)
    step = 3 * steps - 1  # the last step of epoch 2: a whole epoch after epoch 1's checkpoint
    monkeypatch.setenv("RT_FAIL_ONCE_AT_STEP", str(step))
    monkeypatch.setenv("RT_FAIL_MODE", mode)
    job = _job(f"fail-{mode}", epochs=4, batch_size=32)
    result = engine.fit(job, RayConfig(num_workers=1, cpus_per_worker=1, max_failures=1, checkpoint_every_s=0), tmp_path, job["name"])
    assert result.resumed_from == [1] if mode == "raise" else result.resumed_from in ([1], [0])
    assert [row["epoch"] for row in result.history] == [0, 1, 2, 3]
    assert f"resumed from the checkpoint of epoch {result.resumed_from[0]}" in capsys.readouterr().out
    assert result.history[-1]["val_clean_acc"] > 0.8  # the restarted run trained on
    markers = list(Path("/tmp").glob(f"rt-fault-{job['name']}-{os.getpid()}-*"))
    assert markers and markers[0].read_text() == f"failed at step {step}\n"
    for m in markers:
        m.unlink()


def test_without_failure_budget_the_run_fails(ray_runtime, tmp_path, monkeypatch):
    """The counterpart: with max_failures 0 the same failure ends the run (so the test above can fail)."""
    monkeypatch.setenv("RT_FAIL_ONCE_AT_STEP", "1")
    with pytest.raises(Exception, match="injected failure at step 1"):
        engine.fit(_job("fail-nobudget", epochs=1), RayConfig(num_workers=1, cpus_per_worker=1, max_failures=0),
                   tmp_path, "fail-nobudget")
    for m in Path("/tmp").glob(f"rt-fault-fail-nobudget-{os.getpid()}-*"):
        m.unlink()


def test_nan_loss_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(ray_runtime, tmp_path,
                                                                                monkeypatch):
    step = _steps_per_epoch() + 3  # epoch 1, step 3
    monkeypatch.setenv("RT_NAN_AT_STEP", str(step))
    with pytest.raises(ConfigError) as err:
        engine.fit(_job("nan"), RayConfig(num_workers=1, cpus_per_worker=1, max_failures=1, checkpoint_every_s=0), tmp_path, "nan")
    message = str(err.value)
    assert "loss became nan at epoch 1 step 3" in message and "last good checkpoint (epoch 0)" in message
    assert "\n" not in message
    [run] = list(tmp_path.glob("nan-*"))
    snapshot_ = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    latest = run / snapshot_["latest_checkpoint_result"]["checkpoint_dir_name"]
    state = torch.load(latest / "state.pt", weights_only=True)
    assert state["epoch"] == 0 and all(torch.isfinite(v).all() for v in state["net"].values()
                                       if v.dtype.is_floating_point)


def test_nan_loss_with_rollback_ends_on_the_weights_of_the_last_validated_epoch(ray_runtime, tmp_path,
                                                                                   monkeypatch):
    """on_nonfinite: rollback (a sweep's setting): the same NaN at epoch 2 ends the job as stopped early on
    epoch 1's weights, exactly those of epoch 1's checkpoint; before any validated epoch it still fails."""
    monkeypatch.setenv("RT_NAN_AT_STEP", str(2 * _steps_per_epoch() + 1))  # epoch 2, step 1
    job = _job("nan-rollback")
    job["train"]["on_nonfinite"] = "rollback"
    cfg = RayConfig(num_workers=1, cpus_per_worker=1, max_failures=1, checkpoint_every_s=0)
    result = engine.fit(job, cfg, tmp_path, "nan-rollback")
    assert result.stopped_early == ("loss became nan at epoch 2 step 1; rolled back to the weights of epoch 1 "
                                    "(the last validated)")
    assert [row["epoch"] for row in result.history] == [0, 1] and "val_pgd_acc" in result.history[-1]
    [run] = list(tmp_path.glob("nan-rollback-*"))
    states = [torch.load(c / "state.pt", weights_only=True) for c in sorted(run.glob("checkpoint_*")) if c.is_dir()]
    assert [s_["epoch"] for s_ in states] == [1, 1]  # epoch 1's own checkpoint, and the rolled-back end
    for key, value in states[0]["net"].items():
        assert torch.equal(value, result.state[key]), key

    monkeypatch.setenv("RT_NAN_AT_STEP", "1")  # epoch 0, step 1: nothing validated yet to roll back to
    with pytest.raises(ConfigError, match="no epoch had been validated to roll back to"):
        engine.fit(job, cfg, tmp_path, "nan-rollback-early")


# ============================================================================= a killed stage resumes
def _history(root: Path) -> list[dict]:
    with open(root / "plots" / "pretrain_robust.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_killed_stage_resumes_from_its_latest_checkpoint(tmp_path):
    """SIGKILL of the whole pretrain stage (its process group, as when `dvc repro` is killed) at a
    random point after its first checkpoint; the rerun resumes from the latest checkpoint, loses at
    most the epoch in progress, and ends where an uninterrupted run with the same seed ends."""
    params = smoke_params()
    params["pretrain"]["sources"]["robust"]["epochs"] = 4
    params["ray"]["checkpoint_every_s"] = 0  # a checkpoint every epoch
    killed, reference = copy_prepared(tmp_path / "killed"), copy_prepared(tmp_path / "reference")
    for root in (killed, reference):
        write_params(root, params)

    proc = subprocess.Popen([sys.executable, "-m", "stages.pretrain", "robust"], cwd=killed, env=stage_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 600
    while not list((killed / ".checkpoints").glob("*/checkpoint_manager_snapshot.json")):
        assert proc.poll() is None, "the stage ended before its first checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 2.0))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert not (killed / "models" / "robust.pt").exists(), "killed too late: the stage had finished"
    [snap] = list((killed / ".checkpoints").glob("*/checkpoint_manager_snapshot.json"))
    latest = json.loads(snap.read_text())["latest_checkpoint_result"]["metrics"]

    rerun = run_stage(killed, "pretrain", "robust", timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from the checkpoint of epoch {latest['epoch']}" in rerun.stdout
    history = _history(killed)
    assert [int(row["epoch"]) for row in history] == [0, 1, 2, 3]
    # the epochs before the kill were carried over from the checkpoint, not trained again
    assert float(history[latest["epoch"]]["epoch_seconds"]) == latest["epoch_seconds"]

    clean = run_stage(reference, "pretrain", "robust", timeout=900)
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert "resumed" not in clean.stdout
    got = json.loads((killed / "metrics" / "pretrain_robust.json").read_text())
    want = json.loads((reference / "metrics" / "pretrain_robust.json").read_text())
    for key in ("clean_acc", "pgd_acc"):
        assert abs(got[key] - want[key]) <= 0.08, (key, got[key], want[key])
    assert len(_history(reference)) == 4
