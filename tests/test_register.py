"""The register stage, the robustness gate and the registry's consumers, on small real models.

The fixture builds a register stage's inputs in a temp project without the whole pipeline: the
prepare stage on scikit-learn's digits, a source and two target models trained here for seconds,
and metrics/evaluate/<model>.json as the evaluate stage writes it, every number measured on those
models (clean and PGD accuracy, a PGD curve and its checks, the feature-space transfer attack). The
one stand-in: `autoattack_acc` is PGD-40 with 2 restarts (an upper bound of AutoAttack's number);
the smoke pipeline's own evaluate stage measures the real one (see the slow test at the end).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from robust_transfer import attacks, evaluation
from rt_testlib import run_group
from robust_transfer.config import ConfigError, ThreatConfig, load_all, register_config
from robust_transfer.data import read_image_table
from robust_transfer.nets import build_net, load_model, net_spec, save_model

REPO = Path(__file__).resolve().parents[1]
NAME = "digits-5-9-robust"  # the default name of the fixture's task
SOURCE_NAME = "digits-0-4-plain-source"
THREAT = {"norm": "Linf", "eps": 0.1, "step_size": 0.025, "train_steps": 3, "eval_steps": 10, "restarts": 1}
PARAMS = {
    "data": {"dataset": "digits", "source_classes": [0, 1, 2, 3, 4], "target_classes": [5, 6, 7, 8, 9],
             "shots": 40, "val_shots": 5, "target_test_size": 200, "seed": 0},
    "threat": THREAT,
    "mlflow": {"experiment": "register-test"},
    "pretrain": {"train": {"epochs": 1}, "sources": {"plain": {"objective": "natural"}}},
    "transfer": {"models": {"good": {"method": "finetune", "source": "plain"},
                            "weak": {"method": "linear", "source": "plain"}}},
    "register": {"require_checks": True},  # floors: set by the fixture between its two models' numbers
}


def python(*args, cwd, uri=None, code=REPO, timeout=600):
    """Run `python *args` in a fresh process with `code` importable: the project's store unless
    `uri` names another."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    env["PYTHONPATH"] = str(code)
    env["OMP_NUM_THREADS"] = "1"  # tiny models: more threads only spin on a shared CPU
    return run_group([sys.executable, *args], timeout, cwd=cwd, env=env)


def train(net, x, y, epochs: int, params=None, lr: float = 0.05, seed: int = 0):
    torch.manual_seed(seed)
    opt = torch.optim.SGD(params or net.parameters(), lr=lr, momentum=0.9)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 32):
            idx = perm[i:i + 32]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def measure(model: str, method: str, net, source, x, y, data_hash: str, extra: dict, autoattack: bool) -> dict:
    """metrics/evaluate/<model>.json with the evaluate stage's keys, every number measured on `net`."""
    threat = ThreatConfig(**THREAT)
    torch.manual_seed(0)
    curve = [{"eps": e, "acc": evaluation.pgd_accuracy(net, x, y, threat, eps=e)} for e in (0.0, 0.05, 0.1, 0.5)]
    clean_ok = evaluation.predict(net, x) == y
    x_feat = attacks.feature_pgd(source.features, x[clean_ok], 0.1, 0.025, 10, "Linf")
    transfer_asr = (evaluation.predict(net, x_feat) != y[clean_ok]).float().mean().item()
    checks = {
        "monotone": {"passed": all(b["acc"] <= a["acc"] + 0.02 for a, b in zip(curve, curve[1:])),
                     "accs": [p["acc"] for p in curve]},
        "large_eps": {"passed": curve[-1]["acc"] <= 0.05, "acc": curve[-1]["acc"]},
    }
    return {
        "model": model, "method": method, "source": "plain", "shots": 40,
        "clean_acc": evaluation.accuracy(net, x, y), "pgd_acc": curve[2]["acc"],
        "autoattack_acc": evaluation.pgd_accuracy(net, x, y, threat, steps=40, restarts=2) if autoattack else None,
        "transfer_asr": transfer_asr, "checks_passed": all(c["passed"] for c in checks.values()), "checks": checks,
        "pgd_curve": curve, "train_seconds": extra["train_seconds"], "train_passes": extra["train_passes"],
        "eps": 0.1, "norm": "Linf", "model_run_id": extra["run_id"], "run_id": None, "data_hash": data_hash,
    }


def write_project(root: Path, params: dict) -> None:
    (root / ".dvc").mkdir(parents=True, exist_ok=True)  # marks the project root (the SQLite store lives there)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def train_target(name: str, method: str, source, root: Path, card: dict, seed: int = 0) -> tuple:
    """A target model trained from `source` (finetune: all weights, 8 epochs; linear: head, 1 epoch)."""
    x, y = read_image_table(root / "data/target_train.parquet").tensors()
    net = build_net("small_cnn", 1, 5, 8)
    net.blocks.load_state_dict(source.blocks.state_dict())
    t0 = time.perf_counter()
    if method == "finetune":
        train(net, x, y, 8, seed=seed)
    else:
        train(net, x, y, 1, params=net.head.parameters(), lr=0.005, seed=seed)
    extra = {"run_id": f"stand-in-{name}-{seed}", "method": method, "source": "plain", "source_run_id": "stand-in-plain",
             "data_hash": card["data_hash"], "train_seconds": time.perf_counter() - t0,
             "train_passes": float(len(y) * (8 if method == "finetune" else 1))}
    save_model(net, net_spec("small_cnn", (8, 8, 1), 5, 1), root / "models" / f"{name}.pt", extra)
    return net, extra


def write_evaluate(root: Path, name: str, method: str, net, source, extra: dict, autoattack: bool) -> dict:
    card = json.loads((root / "data/card.json").read_text())
    x, y = read_image_table(root / "data/target_test.parquet").tensors()
    metrics = measure(name, method, net, source, x, y, card["data_hash"], extra, autoattack)
    (root / "metrics" / "evaluate").mkdir(parents=True, exist_ok=True)
    (root / "metrics" / "evaluate" / f"{name}.json").write_text(json.dumps(metrics, indent=2))
    return metrics


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: more threads only spin on a shared CPU
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project holding exactly what the register stage reads; returns (root, {model: metrics})."""
    root = tmp_path_factory.mktemp("register") / "project"
    write_project(root, PARAMS)
    prep = python("-m", "stages.prepare", cwd=root)
    assert prep.returncode == 0, prep.stderr
    card = json.loads((root / "data/card.json").read_text())

    xs, ys = read_image_table(root / "data/source_train.parquet").tensors()
    source = train(build_net("small_cnn", 1, 5, 8), xs, ys, 6)
    save_model(source, net_spec("small_cnn", (8, 8, 1), 5, 1), root / "models/plain.pt",
               {"run_id": "stand-in-plain", "objective": "natural", "data_hash": card["data_hash"], "source": "plain"})
    xt, yt = read_image_table(root / "data/source_test.parquet").tensors()
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics/pretrain_plain.json").write_text(json.dumps({
        "clean_acc": evaluation.accuracy(source, xt, yt), "pgd_acc": evaluation.pgd_accuracy(source, xt, yt, ThreatConfig(**THREAT)),
        "eps": 0.1, "norm": "Linf", "pgd_steps": 10, "train_seconds": 1.0, "train_passes": 6.0 * len(ys)}))

    metrics = {}
    for name, method, aa in (("good", "finetune", True), ("weak", "linear", False)):
        net, extra = train_target(name, method, source, root, card)
        metrics[name] = write_evaluate(root, name, method, net, source, extra, aa)
    good, weak = metrics["good"], metrics["weak"]
    assert good["checks_passed"], good["checks"]
    assert good["clean_acc"] > weak["clean_acc"] + 0.1, (good["clean_acc"], weak["clean_acc"])
    assert 0 < good["autoattack_acc"] < 1
    params = {**PARAMS, "register": {**PARAMS["register"], "min_clean_acc": round((good["clean_acc"] + weak["clean_acc"]) / 2, 3),
                                      "min_robust_acc": round(good["autoattack_acc"] / 2, 3)}}
    write_project(root, params)
    return root, metrics


@pytest.fixture(scope="module")
def registered(project):
    """The register stage run twice on the project's own SQLite store: (root, metrics, first, second)."""
    root, metrics = project
    first = python("-m", "stages.register", cwd=root)
    assert first.returncode == 0, first.stdout + first.stderr
    second = python("-m", "stages.register", cwd=root)
    assert second.returncode == 0, second.stdout + second.stderr
    return root, metrics, first, second


def client_for(uri: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(uri)


def sqlite_uri(root: Path) -> str:
    return f"sqlite:///{root / 'mlflow.db'}"


def test_versions_carry_evaluate_numbers_and_the_gate_picks_the_champion(registered):
    root, metrics, first, _ = registered
    client = client_for(sqlite_uri(root))
    versions = {v.tags["model"]: v for v in client.search_model_versions(f"name='{NAME}'")}
    assert set(versions) == {"good", "weak"}
    for model, v in versions.items():
        m = metrics[model]
        for key in ("clean_acc", "pgd_acc", "autoattack_acc", "transfer_asr", "checks_passed", "eps",
                    "train_seconds", "train_passes", "shots"):
            assert json.loads(v.tags[key]) == m[key], (model, key)  # exactly the evaluate stage's numbers
        for key in ("method", "source", "data_hash", "norm", "model_run_id"):
            assert v.tags[key] == m[key], (model, key)
        assert v.tags["source_run_id"] == "stand-in-plain"
        assert v.tags["threat_model"] == "Linf eps=0.1"
        assert v.tags["checkpoint_sha256"] and v.tags["git_commit"]
    assert versions["good"].tags["gate"] == "passed"
    assert versions["weak"].tags["gate"].startswith("failed: autoattack_acc not measured; clean_acc")
    champion = client.get_model_version_by_alias(NAME, "champion")
    assert champion.version == versions["good"].version
    assert not versions["weak"].aliases  # a failing version keeps its tags and gets no alias
    summary = json.loads((root / "registry/register.json").read_text())
    assert summary["champion"]["model"] == "good" and summary["champion"]["clean_acc"] == metrics["good"]["clean_acc"]
    assert "champion -> v" in first.stdout
    source = client.get_model_version_by_alias(SOURCE_NAME, "champion")  # sources too, under their own name
    assert json.loads(source.tags["clean_acc"]) == json.loads((root / "metrics/pretrain_plain.json").read_text())["clean_acc"]


def test_second_run_registers_nothing_new(registered):
    root, _, first, second = registered
    client = client_for(sqlite_uri(root))
    assert len(client.search_model_versions(f"name='{NAME}'")) == 2
    assert len(client.search_model_versions(f"name='{SOURCE_NAME}'")) == 1
    assert first.stdout.count(": new,") == 3
    assert ": new," not in second.stdout and second.stdout.count("already registered,") == 3


def test_champion_loads_in_a_fresh_process_with_its_tagged_accuracy(registered):
    root, metrics, _, _ = registered
    out = python(str(REPO / "examples/load_champion.py"), cwd=root)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    n = len(read_image_table(root / "data/target_test.parquet").labels)
    assert result["name"] == NAME and result["method"] == "finetune"
    assert result["clean_acc_tagged"] == metrics["good"]["clean_acc"]
    assert round(result["clean_acc_now"] * n) == round(result["clean_acc_tagged"] * n)  # the same images right
    assert result["autoattack_acc_tagged"] == metrics["good"]["autoattack_acc"]


def test_pyfunc_takes_numpy_and_pandas_batches(registered):
    import mlflow
    import pandas as pd

    root, _, _, _ = registered
    client_for(sqlite_uri(root))
    x, y = read_image_table(root / "data/target_test.parquet").tensors()
    net, _ = load_model(root / "models/good.pt")
    want = evaluation.predict(net, x[:50]).numpy()
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    batch = x[:50].numpy()
    assert (np.asarray(model.predict(batch)).argmax(1) == want).all()
    frame = pd.DataFrame({"image": list(batch)})  # one column, one (C, H, W) image per row
    assert (np.asarray(model.predict(frame)).argmax(1) == want).all()
    frame = pd.DataFrame({"image": [img.ravel().tolist() for img in batch]})  # or its C*H*W pixels, flat (JSON-able)
    assert (np.asarray(model.predict(frame)).argmax(1) == want).all()
    with pytest.raises(Exception):
        model.predict(pd.DataFrame(batch.reshape(50, -1)))  # one column per pixel does not match the signature
    assert list(mlflow.models.get_model_info(f"models:/{NAME}@champion").signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, 8, 8]


def test_gate_failure_keeps_the_previous_champion(project, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(project[0], root, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    uri = f"sqlite:///{tmp_path / 'gate.db'}"
    assert python("-m", "stages.register", cwd=root, uri=uri).returncode == 0
    client = client_for(uri)
    before = client.get_model_version_by_alias(NAME, "champion")

    # A new checkpoint of `good` (another seed) that cannot pass a floor above its own numbers.
    source, _ = load_model(root / "models/plain.pt")
    card = json.loads((root / "data/card.json").read_text())
    net, extra = train_target("good", "finetune", source, root, card, seed=1)
    metrics = write_evaluate(root, "good", "finetune", net, source, extra, True)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["register"]["min_robust_acc"] = min(1.0, round(metrics["autoattack_acc"] + 0.01, 3))
    assert metrics["autoattack_acc"] < params["register"]["min_robust_acc"]
    write_project(root, params)
    failed = python("-m", "stages.register", cwd=root, uri=uri)
    assert failed.returncode == 1
    line = failed.stderr.strip().splitlines()[-1]  # (MLflow logs its registrations on stderr before it)
    assert line.startswith("error: register: no version of digits-5-9-robust passes the gate") and "Traceback" not in failed.stderr
    assert f"the champion stays v{before.version}" in line
    assert client.get_model_version_by_alias(NAME, "champion").version == before.version
    new = [v for v in client.search_model_versions(f"name='{NAME}'") if v.tags["model_run_id"] == extra["run_id"]]
    assert len(new) == 1 and not new[0].aliases and new[0].tags["gate"].startswith("failed: autoattack_acc")

    params["register"]["allow_gate_failure"] = True
    write_project(root, params)
    allowed = python("-m", "stages.register", cwd=root, uri=uri)
    assert allowed.returncode == 0, allowed.stderr
    assert "no version of digits-5-9-robust passes the gate" in allowed.stdout
    assert client.get_model_version_by_alias(NAME, "champion").version == before.version
    assert len(client.search_model_versions(f"name='{NAME}'")) == 3  # nothing new the second time


def test_pretrain_can_start_from_a_registered_source(registered):
    root, _, _, _ = registered
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["pretrain"]["sources"]["pulled"] = {"registry": f"models:/{SOURCE_NAME}@champion"}
    (root / "params_pulled.yaml").write_text(yaml.safe_dump(params))
    out = python("-m", "stages.pretrain", "pulled", "--params", "params_pulled.yaml", cwd=root)
    assert out.returncode == 0, out.stderr
    pulled = torch.load(root / "models/pulled.pt", weights_only=True)
    original = torch.load(root / "models/plain.pt", weights_only=True)
    assert pulled["spec"] == original["spec"]
    assert all(torch.equal(pulled["state_dict"][k], v) for k, v in original["state_dict"].items())
    assert pulled["extra"]["source"] == "pulled" and pulled["extra"]["run_id"] == "stand-in-plain"
    got = json.loads((root / "metrics/pretrain_pulled.json").read_text())
    want = json.loads((root / "metrics/pretrain_plain.json").read_text())
    assert got["clean_acc"] == want["clean_acc"] and got["registry_version"] == 1 and got["same_data"] is True

    params["pretrain"]["sources"]["pulled"] = {"registry": "models:/no-such-model@champion"}
    (root / "params_pulled.yaml").write_text(yaml.safe_dump(params))
    bad = python("-m", "stages.pretrain", "pulled", "--params", "params_pulled.yaml", cwd=root)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]
    assert bad.stderr.startswith("error: pretrain.sources.pulled.registry: registered model 'no-such-model' not found")


def test_unknown_registered_name_is_one_line(project, tmp_path):
    root = project[0]
    out = python(str(REPO / "examples/load_champion.py"), cwd=root, uri=f"sqlite:///{tmp_path / 'empty.db'}")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1:] == [f"error: no model '{NAME}@champion' in sqlite:///{tmp_path / 'empty.db'}; "
                                               f"run `dvc repro` (its register stage) first"]


def test_register_params_are_checked():
    base = {"pretrain": {"sources": {"robust": {}}}}
    with pytest.raises(ConfigError, match=r"register.min_robust_acc must be in \[0, 1\]"):
        register_config({**base, "register": {"min_robust_acc": 30}})
    with pytest.raises(ConfigError, match="register.robust_metric: unknown value 'aa'"):
        register_config({**base, "register": {"robust_metric": "aa"}})
    with pytest.raises(ConfigError, match="unknown parameter register.alow_gate_failure"):
        register_config({**base, "register": {"alow_gate_failure": True}})
    with pytest.raises(ConfigError, match="register.source_names.nope: not a key of pretrain.sources"):
        register_config({**base, "register": {"source_names": {"nope": "x"}}})
    with pytest.raises(ConfigError, match="register.name must be"):
        register_config({**base, "register": {"name": "a/b"}})
    for path in (REPO / "params.yaml", REPO / "pipelines/smoke/params.yaml"):
        load_all(path)


# ----------------------------------------------------------------------------- a real tracking server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on a SQLite backend and a loopback port; yields its URI."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
                             f"sqlite:///{tmp_path / 'server.db'}", "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
                time.sleep(1)
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_register_and_load_through_a_tracking_server(project, mlflow_server, tmp_path):
    root = tmp_path / "project"
    shutil.copytree(project[0], root, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    reg = python("-m", "stages.register", cwd=root, uri=mlflow_server)
    assert reg.returncode == 0, reg.stdout + reg.stderr
    assert not (root / "mlflow.db").exists()  # everything went to the server
    out = python(str(REPO / "examples/load_champion.py"), cwd=root, uri=mlflow_server)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["name"] == NAME and result["clean_acc_tagged"] == project[1]["good"]["clean_acc"]
    n = len(read_image_table(root / "data/target_test.parquet").labels)
    assert round(result["clean_acc_now"] * n) == round(result["clean_acc_tagged"] * n)


def test_smoke_pipeline_champion_through_a_tracking_server(smoke_project, mlflow_server):
    """The smoke pipeline's own outputs (real evaluate numbers, AutoAttack included) registered on a
    server and the champion loaded from a separate process."""
    wdir = Path(smoke_project)  # pipelines/smoke in the copy
    code = wdir.parents[1]
    reg = python("-m", "stages.register", cwd=wdir, uri=mlflow_server, code=code)
    assert reg.returncode == 0, reg.stdout + reg.stderr
    out = python(str(code / "examples/load_champion.py"), cwd=wdir, uri=mlflow_server, code=code)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    metrics = json.loads((wdir / "metrics" / "evaluate" / f"{json.loads((wdir / 'registry/register.json').read_text())['champion']['model']}.json").read_text())
    assert result["clean_acc_tagged"] == metrics["clean_acc"]
    assert result["autoattack_acc_tagged"] == metrics["autoattack_acc"] is not None
    n = len(read_image_table(wdir / "data/target_test.parquet").labels)
    assert round(result["clean_acc_now"] * n) == round(result["clean_acc_tagged"] * n)
