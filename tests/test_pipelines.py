"""Every pipeline reuses the root dvc.yaml's stages (pipelines/sync.py writes them)."""
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sync", REPO / "pipelines" / "sync.py")
sync = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sync)


@pytest.mark.parametrize("pipeline", sync.pipelines(), ids=lambda p: p.name)
def test_pipeline_stages_match_the_root(pipeline):
    assert (pipeline / "dvc.yaml").read_text() == sync.render(pipeline), \
        f"{pipeline.name}/dvc.yaml differs from the root dvc.yaml: run `python pipelines/sync.py`"


def test_every_pipeline_has_params_for_every_section_the_stages_read():
    import yaml

    root = set(yaml.safe_load((REPO / "params.yaml").read_text()))
    for p in sync.pipelines():
        missing = root - set(yaml.safe_load((p / "params.yaml").read_text()))
        assert not missing, f"{p.name}/params.yaml lacks sections {sorted(missing)}"


def _lookup(params: dict, dotted: str):
    node = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(dotted)
        node = node[part]
    return node


@pytest.mark.parametrize("pipeline", [REPO, *sync.pipelines()], ids=lambda p: p.name if p != REPO else "default")
def test_every_param_a_stage_names_is_in_the_pipelines_params(pipeline):
    """DVC stops `dvc repro` at the first stage naming a missing param ("Parameters 'x' are missing
    from 'params.yaml'"), after the stages before it have run: check every pipeline up front."""
    import yaml

    params = yaml.safe_load((pipeline / "params.yaml").read_text())
    stages = yaml.safe_load((pipeline / "dvc.yaml").read_text())["stages"]
    missing = []
    for name, stage in stages.items():
        body = stage.get("do", stage)
        names = [p for p in body.get("params", []) if isinstance(p, str)]
        keys = [None]
        if "foreach" in stage:
            keys = list(_lookup(params, stage["foreach"].strip("${}")))
        for key in keys:
            for dotted in names:
                dotted = dotted.replace("${key}", str(key))
                try:
                    _lookup(params, dotted)
                except KeyError:
                    missing.append(f"{name}: {dotted}")
    assert not missing, f"{pipeline.name}/params.yaml lacks {missing}"


def test_the_sources_do_not_depend_on_the_target_split():
    """Changing the target shots must not retrain the sources: pretrain depends on the source tables,
    code and params only, so `dvc repro` after a change of data.shots keeps them."""
    import yaml

    pretrain = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["pretrain"]["do"]
    deps = [d for d in pretrain["deps"] if isinstance(d, str)]
    assert "data/source_train.parquet" in deps and "data/source_test.parquet" in deps
    assert not [d for d in deps if "target" in d or d.endswith("card.json")], deps
    assert not [p for p in pretrain["params"] if isinstance(p, str) and p.startswith("data")], pretrain["params"]


def test_bytecode_caches_are_not_part_of_the_code_dependencies():
    """The stages depend on the robust_transfer/ and stages/ folders: the .pyc files Python writes there
    (absent from a fresh clone or an experiment's copy) must not change their hash, or each new one
    would make every stage after them re-run."""
    import subprocess

    from conftest import BIN

    paths = ["robust_transfer/__pycache__/engine.cpython-311.pyc", "stages/__pycache__/transfer.cpython-311.pyc",
             "robust_transfer/engine.py"]
    proc = subprocess.run([str(BIN / "dvc"), "check-ignore", "--non-matching", "--details", *paths], cwd=REPO,
                          capture_output=True, text=True)
    ignored = {line.split("\t")[-1] for line in proc.stdout.splitlines() if not line.startswith("::")}
    assert ignored == set(paths[:2]), proc.stdout + proc.stderr


def test_a_stage_ends_after_its_threads_and_exit_hooks_with_its_output_flushed(tmp_path):
    """Stages leave through `_common._exit_now` (no interpreter teardown): what a normal exit does for
    them must still happen: non-daemon threads finish (an idle thread pool left open is told to stop),
    then the exit hooks run, and stdout is flushed."""
    import subprocess
    import sys

    script = (
        "import atexit, concurrent.futures, threading, time\n"
        "from pathlib import Path\n"
        "from stages._common import run\n"
        "def main(args, params):\n"
        "    out = Path(args.out)\n"
        "    atexit.register(lambda: out.write_text(out.read_text() + 'hook;'))\n"
        "    threading.Thread(target=lambda: (time.sleep(0.3), out.write_text('thread;'))).start()\n"
        "    main.pool = concurrent.futures.ThreadPoolExecutor(1)  # an idle pool left open, as MLflow's are\n"
        "    main.pool.submit(int)\n"
        "    print('done', end='')\n"
        "run(main, lambda p: p.add_argument('out'))\n")
    out = tmp_path / "order.txt"
    proc = subprocess.run([sys.executable, "-c", script, "--params", str(REPO / "pipelines" / "smoke" / "params.yaml"),
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "done" and out.read_text() == "thread;hook;"
