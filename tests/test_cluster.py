"""A real Ray cluster: `ray start --head` plus a second node (`ray start --address=...`) on loopback,
the smoke pipeline's tune and transfer stages run against it with RAY_ADDRESS, and the tune trials
must have trained on both nodes; the stages' drivers must be jobs of that cluster (nothing started a
local Ray). The cluster is stopped by terminating the two `ray start --block` processes, which take
their own Ray processes down with them (no `ray stop`: it would kill every Ray on the machine)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import BIN, project_env

pytestmark = pytest.mark.slow

PROBE = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_config=ray.LoggingConfig(log_level="ERROR"))
nodes = [n for n in ray.nodes() if n["Alive"]]
jobs = [j for j in ray._private.state.jobs()]
print(json.dumps({"nodes": [n["NodeID"] for n in nodes],
                  "cpus": ray.cluster_resources().get("CPU", 0),
                  "driver_pids": [int(j["DriverPid"]) for j in jobs if j.get("DriverPid")]}))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _probe(address: str, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, address], env=env, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _stop(proc: subprocess.Popen, temp_dir: Path) -> None:
    """Terminate one `ray start --block` (it kills the processes it started), then any straggler whose
    command line names this node's own temp dir (by pid: nothing else on the machine is touched)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    time.sleep(1)
    left = subprocess.run(["pgrep", "-f", str(temp_dir)], capture_output=True, text=True).stdout.split()
    for pid in left:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


@pytest.fixture
def two_node_cluster():
    """A head and a worker node, one CPU each, on 127.0.0.1; yields (address, node ids, env)."""
    # Unix socket paths must stay short: a temp dir of our own directly under /tmp.
    temp = Path(tempfile.mkdtemp(prefix="rtc-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats", "--block"]
    procs = []
    try:
        head_log = open(temp / "head.log", "w")
        procs.append((subprocess.Popen([str(BIN / "ray"), "start", "--head", "--port", str(port),
                                        "--include-dashboard", "false", "--temp-dir", str(temp / "head"), *common],
                                       env=env, stdout=head_log, stderr=subprocess.STDOUT), temp / "head"))
        deadline = time.time() + 180
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert procs[0][0].poll() is None, (temp / "head.log").read_text()[-2000:]
            time.sleep(1)
        worker_log = open(temp / "worker.log", "w")
        procs.append((subprocess.Popen([str(BIN / "ray"), "start", "--address", address,
                                        "--temp-dir", str(temp / "worker"), *common],
                                       env=env, stdout=worker_log, stderr=subprocess.STDOUT), temp / "worker"))
        while time.time() < deadline:
            info = _probe(address, env)
            if len(info["nodes"]) == 2:
                break
            assert procs[1][0].poll() is None, (temp / "worker.log").read_text()[-2000:]
            time.sleep(2)
        assert len(info["nodes"]) == 2 and info["cpus"] == 2, info
        yield address, set(info["nodes"]), env
    finally:
        for proc, node_temp in reversed(procs):
            _stop(proc, node_temp)
        shutil.rmtree(temp, ignore_errors=True)


def _project_copy(smoke_project: Path, dest: Path) -> Path:
    """The smoke project after its repro (data, sources, features), without its checkpoints and
    MLflow store, with tune cut to 2 lwf trials: with 2 at once and 1 CPU per node, one per node."""
    root = smoke_project.parents[1]
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns(".checkpoints", "mlflow.db", "mlartifacts"),
                    symlinks=True)
    pipeline = dest / "pipelines" / "smoke"
    params = yaml.safe_load((pipeline / "params.yaml").read_text())
    params["tune"].update(models={"lwf": params["tune"]["models"]["lwf"]}, num_samples=2,
                          max_concurrent_trials=2, workers_per_trial=1, cpus_per_worker=1)
    params["ray"].update(num_workers=1, cpus_per_worker=1)
    (pipeline / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return pipeline


def test_tune_and_transfer_run_on_a_two_node_cluster(smoke_project, two_node_cluster, tmp_path):
    import pyarrow.parquet as pq

    address, nodes, _ = two_node_cluster
    pipeline = _project_copy(smoke_project, tmp_path / "project")
    env = project_env(pipeline.parents[1], RAY_ADDRESS=address)
    pids = {}
    for stage in (["stages.tune"], ["stages.transfer", "lwf"]):
        proc = subprocess.Popen([sys.executable, "-m", *stage], cwd=pipeline, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-3000:]
        pids[stage[0]] = proc.pid

    trials = pq.read_table(pipeline / "tune/trials.parquet").to_pylist()
    # ASHA may stop the worse trial at a rung (trials report at the rungs, so both reach it together)
    assert len(trials) == 2 and all(t["status"] in ("completed", "stopped") and t["error"] is None
                                    for t in trials), trials
    assert {t["node_id"] for t in trials} == nodes  # one trial on each node
    tuned = yaml.safe_load((pipeline / "tuned.yaml").read_text())
    assert tuned["lwf"]["lam"] in {t["lam"] for t in trials}
    metrics = json.loads((pipeline / "metrics/transfer_lwf.json").read_text())
    assert 0 <= metrics["pgd_acc"] <= metrics["clean_acc"] <= 1
    # both stages' drivers were jobs of this cluster: RAY_ADDRESS was joined, no local Ray started
    info = _probe(address, two_node_cluster[2])
    assert set(pids.values()) <= set(info["driver_pids"]), (pids, info["driver_pids"])
