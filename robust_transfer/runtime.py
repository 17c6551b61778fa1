"""One local Ray runtime shared by every stage of a `dvc repro`, started on first use.

Starting Ray costs seconds per process (GCS, raylet, worker pool), and a `dvc repro` runs dozens of
short stage processes. Without `RAY_ADDRESS`, the first stage starts a local head in the background
(`ray start --head --block`, loopback only, under a small watchdog) and every later stage joins it
in well under a second. The watchdog stops the head once no stage has held a lease on it for
`RT_RAY_IDLE_S` seconds (default 300), so nothing lingers after the pipeline.

The head is keyed by the Python environment (`sys.prefix`): Ray's workers run the interpreter that
started the head, so two virtual environments never share one. `RT_LOCAL_RAY=off` falls back to a
private `ray.init()` per process; `RAY_ADDRESS` always wins (a real cluster, see docs/scale-out.md).

    python -m robust_transfer.runtime status|stop
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
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

from .config import ConfigError

# Ray Train V2's controller polls its workers every 2 s by default: short jobs would spend most of
# their start-up and tear-down waiting. At 0.2 s the controller uses ~2% of a core (top, during a
# pretrain epoch). A `ray.train.report` made before the controller has read the one before waits for
# the next poll, so the engine reports with its checkpoints, not every epoch (engine.train_loop_per_worker),
# and no report waits. The head passes these defaults to everything it runs.
RAY_ENV_DEFAULTS = {
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_DEDUP_LOGS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def state_dir() -> Path:
    key = hashlib.sha256(sys.prefix.encode()).hexdigest()[:10]
    d = Path(tempfile.gettempdir()) / f"robust-transfer-ray-{os.getuid()}-{key}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _port_open(address: str, timeout: float = 1.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def _read_head(d: Path) -> dict | None:
    try:
        head = json.loads((d / "head.json").read_text())
    except (OSError, ValueError):
        return None
    if _alive(head.get("pid", -1)) and _port_open(head["address"]):
        return head
    return None


def take_lease(d: Path) -> None:
    """Mark this process as a user of the head; the watchdog ignores leases of dead processes."""
    (d / f"lease-{os.getpid()}").touch()


def local_address(timeout_s: float = 90.0) -> str:
    """Address of this environment's shared local head, starting it when none is running."""
    d = state_dir()
    with open(d / "start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two stages starting at once must not start two heads
        head = _read_head(d)
        if head is None:
            log = open(d / "head.log", "ab")
            subprocess.Popen([sys.executable, "-m", "robust_transfer.runtime", "serve"], stdout=log, stderr=log,
                             stdin=subprocess.DEVNULL, start_new_session=True, cwd=d)
            deadline = time.monotonic() + timeout_s
            while head is None:
                if time.monotonic() > deadline:
                    raise ConfigError(f"the local Ray runtime did not start within {timeout_s:.0f}s; "
                                      f"see {d / 'head.log'}, or set RT_LOCAL_RAY=off")
                time.sleep(0.2)
                head = _read_head(d)
        take_lease(d)
    return head["address"]


def release_orphaned_placement_groups() -> int:
    """Remove the placement groups that outlived the job that made them; return how many.

    A placement group made by an actor (a Train controller inside a Tune trial) can outlive its
    stage when that stage is killed: it then holds its CPUs for good, and every later stage on the
    shared runtime waits for them. A placement group's id ends with its job's id, so those of dead
    jobs are found without the dashboard's state API. Called by each stage that joins the runtime."""
    import ray
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

    dead = {j["JobID"] for j in ray._private.state.jobs() if j.get("IsDead")}
    removed = 0
    for pg_hex, info in placement_group_table().items():
        if info.get("state") in ("CREATED", "PENDING", "RESCHEDULING") and pg_hex[-8:] in dead:
            remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_hex))))
            removed += 1
    return removed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(idle_s: float) -> None:
    """The watchdog: run `ray start --head --block` and stop it after `idle_s` without leases."""
    d = state_dir()
    address = f"127.0.0.1:{_free_port()}"
    env = {**RAY_ENV_DEFAULTS, **os.environ}
    ray_bin = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", "--port", address.split(":")[1],
                             "--node-ip-address", "127.0.0.1", "--num-cpus", str(os.cpu_count()),
                             "--include-dashboard", "false", "--disable-usage-stats"], env=env)

    def stop(*_):
        with contextlib.suppress(OSError):
            (d / "head.json").unlink()  # first: no stage may join a head that is draining
        head.terminate()  # --block: the head takes its GCS, raylet and workers down with it
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(30)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    while not _port_open(address):
        if head.poll() is not None:
            sys.exit(f"ray start exited with {head.returncode}")
        time.sleep(0.2)
    (d / "head.json").write_text(json.dumps({"address": address, "pid": os.getpid(), "ray_pid": head.pid}))
    last_used = time.monotonic()
    while head.poll() is None:
        time.sleep(1.0)
        if _leased(d):
            last_used = time.monotonic()
        if time.monotonic() - last_used > idle_s and _retire(d):
            stop()
    stop()


def _leased(d: Path) -> bool:
    """Whether a live process holds a lease; leases of dead ones are removed."""
    held = False
    for lease in d.glob("lease-*"):
        if _alive(int(lease.name.split("-")[1])):
            held = True
        else:
            with contextlib.suppress(OSError):
                lease.unlink()
    return held


def _retire(d: Path) -> bool:
    """Withdraw head.json unless a stage took a lease meanwhile, under the lock `local_address` holds
    while it reads head.json and takes its lease: a stage either joins a head that stays up, or finds
    none and starts another. (Without this, a stage starting while an idle head drained for its 30 s
    joined it and failed: "the node ... doesn't exist any more".)"""
    with open(d / "start.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _leased(d):
            return False
        with contextlib.suppress(OSError):
            (d / "head.json").unlink()
        return True


def stop_local() -> bool:
    head = _read_head(state_dir())
    if head is None:
        return False
    os.kill(head["pid"], signal.SIGTERM)
    for _ in range(150):
        if not _alive(head["pid"]):
            break
        time.sleep(0.2)
    return True


if __name__ == "__main__":
    cmd = sys.argv[1] if len(sys.argv) > 1 else "status"
    if cmd == "serve":
        serve(float(os.environ.get("RT_RAY_IDLE_S", "300")))
    elif cmd == "stop":
        print("stopped the local Ray runtime" if stop_local() else "no local Ray runtime is running")
    else:
        head = _read_head(state_dir())
        print(f"local Ray runtime at {head['address']} (watchdog pid {head['pid']})" if head
              else "no local Ray runtime is running")
