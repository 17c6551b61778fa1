"""Bad params stop a stage with one line naming the key, before any work starts (issues 2 and 7)."""
from __future__ import annotations

import pytest

from rt_testlib import error_lines, run_stage, smoke_params, write_params
from robust_transfer.config import ConfigError, DataConfig, ThreatConfig, build, load_all, transfer_entries

# (name, overrides of the smoke params, the key the message must name, another fragment it must hold)
BAD_PARAMS = [
    ("misspelt key", {"data": {"shot": 5}}, "data.shot", "did you mean 'shots'"),
    ("unknown section", {"datta": {}}, "datta", "did you mean 'data'"),
    ("wrong type", {"data": {"shots": "ten"}}, "data.shots", "must be an integer"),
    ("wrong list item type", {"data": {"source_classes": [0, 1, "two"]}}, "data.source_classes[2]", "integer"),
    ("negative eps", {"threat": {"eps": -0.1}}, "threat.eps", "-0.1"),
    ("absurd Linf eps", {"threat": {"eps": 8}}, "threat.eps", "(0, 1.0]"),
    ("overlapping classes", {"data": {"target_classes": [4, 5, 6]}}, "data.target_classes", "[4]"),
    ("misspelt dataset", {"data": {"dataset": "fashion-mnist"}}, "data.dataset", "did you mean 'fashion_mnist'"),
    ("unknown dataset", {"data": {"dataset": "imagenet"}}, "data.dataset", "expected one of"),
    ("unknown architecture", {"pretrain": {"train": {"arch": "resnet18"}, "sources": {"natural": {}}}},
     "pretrain.train.arch", "resnet18"),
    ("unknown architecture of one source", {"pretrain": {"sources": {"natural": {"arch": "vgg"}}}},
     "pretrain.sources.natural.arch", "vgg"),
    ("unknown objective option", {"pretrain": {"sources": {"natural": {"objective": "trades", "betta": 3.0}}}},
     "pretrain.sources.natural.betta", "did you mean 'beta'"),
    ("unknown transfer method", {"transfer": {"models": {"x": {"method": "lwff", "source": "natural"}}}},
     "transfer.models.x.method", "did you mean 'lwf'"),
    ("transfer source missing", {"transfer": {"models": {"x": {"method": "lwf", "source": "nope"}}}},
     "transfer.models.x.source", "'nope'"),
    ("bool for int", {"ray": {"num_workers": True}}, "ray.num_workers", "integer"),
    ("unknown CARTL attack", {"pretrain": {"sources": {"natural": {"objective": "cartl", "attack": "fgsm"}}}},
     "pretrain.sources.natural.attack", "did you mean 'fgsm_rs'"),
    ("unknown target_at init", {"transfer": {"models": {"x": {"method": "target_at", "source": "natural",
                                                              "init": "scrach"}}}},
     "transfer.models.x.init", "did you mean 'scratch'"),
]


@pytest.mark.parametrize("name,overrides,key,fragment", BAD_PARAMS, ids=[b[0] for b in BAD_PARAMS])
def test_load_all_names_the_bad_key(tmp_path, name, overrides, key, fragment):
    path = write_params(tmp_path, smoke_params(**overrides))
    with pytest.raises(ConfigError) as err:
        load_all(path)
    message = str(err.value)
    assert key in message and fragment in message, message
    assert "\n" not in message


def test_smoke_and_default_params_are_valid():
    from rt_testlib import REPO

    for path in (REPO / "params.yaml", REPO / "pipelines" / "smoke" / "params.yaml"):
        params = load_all(path)
        assert transfer_entries(params)


def test_typed_values_are_coerced_and_defaults_fill_in():
    cfg = build(DataConfig, {"dataset": "digits", "shots": 3, "val_shots": 1}, "data")
    assert (cfg.dataset, cfg.shots, cfg.val_shots, cfg.disjoint) == ("digits", 3, 1, True)
    threat = build(ThreatConfig, {"eps": 1, "norm": "L2", "step_size": 0.25}, "threat")
    assert isinstance(threat.eps, float) and threat.eps == 1.0


def test_l2_allows_larger_eps_than_linf():
    build(ThreatConfig, {"norm": "L2", "eps": 2.0, "step_size": 0.5}, "threat")
    with pytest.raises(ConfigError, match="threat.eps"):
        build(ThreatConfig, {"norm": "Linf", "eps": 2.0, "step_size": 0.5}, "threat")


def test_overlap_is_allowed_when_not_disjoint(tmp_path):
    path = write_params(tmp_path, smoke_params(data={"target_classes": [4, 5, 6], "disjoint": False}))
    load_all(path)


# Through the real stage: exit code 2, a single line on stderr naming the key, no outputs written.
STAGE_CASES = [
    ("misspelt key", {"data": {"shot": 5}}, "data.shot"),
    ("wrong type", {"data": {"shots": "ten"}}, "data.shots"),
    ("unknown dataset", {"data": {"dataset": "mnist"}}, "data.dataset"),
    ("negative eps", {"threat": {"eps": -0.1}}, "threat.eps"),
    ("overlapping classes", {"data": {"target_classes": [4, 5, 6]}}, "data.target_classes"),
    # only known once the data is read: still before anything is written
    ("shots larger than available", {"data": {"shots": 500, "val_shots": 2}}, "data.shots"),
]


@pytest.mark.parametrize("name,overrides,key", STAGE_CASES, ids=[c[0] for c in STAGE_CASES])
def test_prepare_stage_stops_with_one_line(tmp_path, name, overrides, key):
    write_params(tmp_path, smoke_params(**overrides), "bad.yaml")
    proc = run_stage(tmp_path, "prepare", params="bad.yaml", timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines == error_lines(proc.stderr), proc.stderr
    assert key in lines[0]
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"], "the stage wrote something"
