"""What every stage does the same way: parse arguments, load params, turn errors into one line."""
from __future__ import annotations

import argparse
import atexit
import os
import sys
import threading
from typing import Callable

from robust_transfer.config import ConfigError, load_all


def run(main: Callable[[argparse.Namespace, dict], None], add_args: Callable[[argparse.ArgumentParser], None] = None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", default="params.yaml", help="the pipeline's params file")
    if add_args:
        add_args(parser)
    args = parser.parse_args()
    try:
        params = load_all(args.params)
        main(args, params)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    _exit_now()


def _exit_now() -> None:
    """End a stage whose outputs are all written: its exit hooks run, the interpreter's teardown does not.
    Ray's exit hook sleeps 0.5 s for late worker logs (a stage's Ray Train job has ended and been read
    by now), and freeing torch's, Ray's and MLflow's modules took ~1.5 s more: ~2 s of each of the ~30
    stages of a `dvc repro` spent after its work was done."""
    # What the interpreter does first at exit: the threading module's exit callbacks (they tell idle
    # ThreadPoolExecutor workers to stop, as MLflow's leave them), then it joins the non-daemon threads.
    threading._shutdown()
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()  # called here rather than from Ray's exit hook, it does not sleep
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def write_history(history: list[dict], path) -> None:
    """Per-epoch metrics as a CSV (a DVC plot), written atomically."""
    import csv
    import io

    from robust_transfer.data import atomic_write

    buf = io.StringIO()
    keys = list(dict.fromkeys(k for row in history for k in row))
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(history)
    with atomic_write(path) as tmp:
        tmp.write_text(buf.getvalue())
