"""The evaluation: real attacks on small models trained here on scikit-learn digits (classes 5-9, 8x8),
the gradient-masking checks failing on a model with masked gradients and passing on an honest one,
and the evaluate/report stages' outputs on the smoke pipeline."""
from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from robust_transfer import attacks, evaluation
from robust_transfer.config import ConfigError, EvaluateConfig, ThreatConfig, evaluate_config, load_all
from rt_testlib import digits, smoke_params, write_params

THREAT = ThreatConfig(norm="Linf", eps=0.1, step_size=0.025, eval_steps=20)


@functools.cache
def task():
    """Digits 5-9 relabelled 0-4: (train x, y), (test x, y)."""
    out = []
    for split in ("train", "test"):
        x, y = digits()[split]
        keep = y >= 5
        out.append((x[keep], y[keep] - 5))
    return out


def _train(adversarial: bool, epochs: int, seed: int = 0):
    from robust_transfer.nets import build_net

    torch.manual_seed(seed)
    (x, y), _ = task()
    net = build_net("small_cnn", 1, 5, 8)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            xb, yb = x[perm[i:i + 64]], y[perm[i:i + 64]]
            if adversarial:  # FGSM-RS (Wong et al.): cheap and, at this eps, not catastrophically overfit
                net.eval()
                xb = attacks.fgsm(net, xb, yb, THREAT.eps, "Linf", rand_init=True, step_size=1.25 * THREAT.eps)
            net.train()
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


@functools.cache
def natural_net():
    return _train(False, 6)


@functools.cache
def robust_net():
    return _train(True, 10)


class Quantised(nn.Module):
    """An input quantisation in front of a trained model: torch.round has zero gradient, so gradient
    attacks see a flat loss (masked gradients) while the model is no more robust to a real attack."""

    def __init__(self, net, levels: int = 4):
        super().__init__()
        self.net, self.levels = net, levels

    def forward(self, x):
        return self.net(torch.round(x * self.levels) / self.levels)


def _eval_images(n: int):
    _, (x, y) = task()
    idx = evaluation.eval_indices(y, n, 0)
    return x[idx], y[idx]


FAST = EvaluateConfig(images=None, check_images=60, check_restarts=2, autoattack_images=40, autoattack_queries=500)


def test_honest_robust_model_passes_every_check_and_its_curve_falls():
    x, y = _eval_images(150)
    net = robust_net()
    out = evaluation.evaluate_model(net, x, y, THREAT, FAST, 5, source=natural_net())
    curve = [p["acc"] for p in out["pgd_curve"]]
    assert [p["eps"] for p in out["pgd_curve"]] == evaluation.LINF_GRID
    assert curve[0] > 0.9, "the trained model should classify digits"
    assert out["pgd_acc"] > 0.5, f"adversarial training should buy robustness at eps 0.1: {curve}"
    assert all(b <= a for a, b in zip(curve, curve[1:])), f"PGD curve rises with eps: {curve}"
    assert curve[-1] <= 0.05, curve
    assert out["checks_passed"], out["checks"]
    assert set(out["checks"]) == {"monotone", "large_eps", "more_steps", "blackbox_transfer"}
    assert out["autoattack_acc"] is None and out["autoattack_breakdown"] is None
    assert 0 <= out["transfer_asr"] <= out["whitebox_asr"] + FAST.blackbox_tolerance


def test_checks_fail_on_a_model_with_masked_gradients():
    x, y = _eval_images(150)
    base = natural_net()
    masked = Quantised(base).eval()
    honest = evaluation.evaluate_model(base, x, y, THREAT, FAST, 5, source=robust_net())
    out = evaluation.evaluate_model(masked, x, y, THREAT, FAST, 5, source=base)
    checks = out["checks"]
    assert honest["checks_passed"], honest["checks"]
    assert not out["checks_passed"]
    # PGD cannot move (zero gradients): accuracy at eps 0.3 stays far above zero ...
    assert not checks["large_eps"]["passed"] and checks["large_eps"]["acc"] > 0.3, checks["large_eps"]
    # ... and the model looks more robust than the honest model it wraps, while examples crafted on that
    # model (black-box for the masked one) break it more often than the white-box attack does.
    assert out["pgd_acc"] > honest["pgd_acc"] + 0.1
    assert not checks["blackbox_transfer"]["passed"], checks["blackbox_transfer"]


def test_autoattack_is_not_above_pgd_on_the_same_images():
    x, y = _eval_images(40)
    net = robust_net()
    torch.manual_seed(0)
    pgd = evaluation.pgd_correct(net, x, y, THREAT.eps, THREAT.step_size, 20, "Linf").float().mean().item()
    aa = evaluation.autoattack(net, x, y, "Linf", THREAT.eps, 5, steps=100, queries=500)
    after = aa["breakdown"]
    assert aa["acc"] <= pgd, (aa, pgd)
    assert aa["acc"] == after["square"] and after["clean"] >= after["apgd-ce"] >= after["apgd-t"] >= after["fab-t"]
    assert abs(sum(aa["broken_by"].values()) - (after["clean"] - aa["acc"])) < 1e-6
    assert 0 < aa["acc"], "a robust model keeps some accuracy at eps 0.1 on digits"


def test_a_seeded_pgd_accuracy_repeats_and_leaves_the_callers_generator_alone():
    """The stages' own PGD checks pass a seed: the same model gets the same metric on a re-run (unseeded,
    the random starts differ and so may the number), and the caller's random stream is not consumed."""
    net = natural_net()
    x, y = _eval_images(200)
    weak = ThreatConfig(norm="Linf", eps=0.1, step_size=0.025, eval_steps=2)  # few steps: the start matters
    torch.manual_seed(123)
    first = evaluation.pgd_accuracy(net, x, y, weak, eps=0.05, seed=7)
    after = torch.rand(1)
    torch.manual_seed(123)
    assert evaluation.pgd_accuracy(net, x, y, weak, eps=0.05, seed=7) == first
    assert torch.equal(torch.rand(1), after)  # as if the seeded check had not run
    unseeded = {evaluation.pgd_accuracy(net, x, y, weak, eps=0.05) for _ in range(5)}
    assert len(unseeded) > 1  # so the seed is what makes the first two equal


def test_autoattack_selection_takes_the_best_by_pgd_and_the_named_ones():
    ranking = {"a": 0.3, "b": 0.5, "c": 0.5, "d": 0.1}
    assert evaluation.autoattack_selection(ranking, 2, []) == ["b", "c"]
    assert evaluation.autoattack_selection(ranking, 1, ["d"]) == ["b", "d"]
    assert evaluation.autoattack_selection(ranking, 0, []) == []


def test_eps_grid_defaults_and_always_holds_zero_and_the_nominal_eps():
    assert evaluation.eps_grid(THREAT) == evaluation.LINF_GRID
    l2 = ThreatConfig(norm="L2", eps=0.5, step_size=0.125)
    assert evaluation.eps_grid(l2) == [0.0, 0.125, 0.25, 0.5, 0.75, 1.0, 1.5]
    assert evaluation.eps_grid(THREAT, [0.2, 0.3]) == [0.0, 0.1, 0.2, 0.3]


def test_eval_indices_are_balanced_over_classes_and_seeded():
    y = torch.arange(5).repeat_interleave(40)  # a test table sorted by class
    idx = evaluation.eval_indices(y, 50, seed=1)
    assert torch.bincount(y[idx], minlength=5).tolist() == [10] * 5
    assert torch.bincount(y[idx[:20]], minlength=5).tolist() == [4] * 5  # prefixes too (AutoAttack's subset)
    assert torch.equal(idx, evaluation.eval_indices(y, 50, seed=1))
    assert len(evaluation.eval_indices(y, None, 0)) == 200


def test_label_spaces_match_only_for_the_same_classes_of_the_same_dataset():
    from robust_transfer.config import DataConfig

    assert not evaluation.labels_match(DataConfig())
    assert evaluation.labels_match(DataConfig(target_classes=[0, 1, 2, 3, 4], disjoint=False))
    assert not evaluation.labels_match(DataConfig(target_classes=[0, 1, 2, 3, 4], disjoint=False,
                                                  target_dataset="svhn"))


def test_pareto_front():
    from stages.report import pareto_front

    pts = {"a": (0.9, 0.1), "b": (0.8, 0.5), "c": (0.7, 0.4), "d": (0.6, 0.6)}
    assert pareto_front(pts) == ["d", "b", "a"]


@pytest.mark.parametrize("section, message", [
    ({"autoattack_models": ["nope"]}, "evaluate.autoattack_models: 'nope' is not a key of transfer.models"),
    ({"imagez": 10}, "unknown parameter evaluate.imagez (did you mean 'images'?)"),
    ({"eps_grid": [0.1, 0.05]}, "evaluate.eps_grid must be strictly increasing"),
    ({"large_eps_max_acc": 2}, "evaluate.large_eps_max_acc must be in [0, 1]"),
])
def test_bad_evaluate_params_name_the_key(tmp_path, section, message):
    params = smoke_params(evaluate=section)
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        load_all(write_params(tmp_path, params))
    assert evaluate_config(smoke_params()).autoattack_top >= 0


# ----------------------------------------------------------------------------- the stages, end to end
SUMMARY_KEYS = {"method", "source", "shots", "clean_acc", "pgd_acc", "autoattack_acc", "transfer_asr",
                "checks_passed", "train_seconds", "train_passes"}


def test_evaluate_and_report_outputs_follow_the_contract(smoke_project):
    import yaml

    params = yaml.safe_load((smoke_project / "params.yaml").read_text())
    models = params["transfer"]["models"]
    cfg = evaluate_config(params)
    ranking = {m: json.loads((smoke_project / f"metrics/transfer_{m}.json").read_text())["pgd_acc"] for m in models}
    selected = evaluation.autoattack_selection(ranking, cfg.autoattack_top, cfg.autoattack_models)
    for name, entry in models.items():
        ev = json.loads((smoke_project / f"metrics/evaluate/{name}.json").read_text())
        assert ev["model"] == name and ev["method"] == entry["method"]
        for key in ("clean_acc", "pgd_acc", "transfer_asr"):
            assert 0 <= ev[key] <= 1, (name, key, ev[key])
        assert ev["pgd_acc"] <= ev["clean_acc_pgd_images"] + 1e-9
        assert (ev["autoattack_acc"] is not None) == (name in selected), (name, selected)
        if ev["autoattack_acc"] is not None:
            assert ev["autoattack_acc"] <= ev["autoattack_pgd_acc"] + 1e-9
            assert set(ev["autoattack_breakdown"]["robust_acc_after"]) == {"clean", *evaluation.AUTOATTACK_STANDARD}
        assert isinstance(ev["checks_passed"], bool)
        assert ev["checks_passed"] == all(c["passed"] for c in ev["checks"].values())
        assert [p["eps"] for p in ev["pgd_curve"]] == evaluation.eps_grid(ThreatConfig(**params["threat"]),
                                                                          cfg.eps_grid)
        assert ev["run_id"] and ev["model_run_id"] and ev["data_hash"]
        assert ev["train_seconds"] > 0 and ev["train_passes"] > 0
        assert (smoke_project / f"plots/evaluate/{name}.png").stat().st_size > 0
        rows = (smoke_project / f"plots/evaluate/{name}.csv").read_text().splitlines()
        assert rows[0] == "eps,acc" and len(rows) == len(ev["pgd_curve"]) + 1
    summary = json.loads((smoke_project / "metrics/summary.json").read_text())
    assert isinstance(summary, list) and len(summary) == len(models)
    assert all(set(row) == SUMMARY_KEYS for row in summary)
    report = (smoke_project / "reports/report.md").read_text()
    assert all(f"| {name}" in report for name in models)
    # The papers' claims, judged on the transfer stage's checks (which the evaluate stage carries)
    transfer = {m: json.loads((smoke_project / f"metrics/transfer_{m}.json").read_text()) for m in models}
    for name in models:
        ev = json.loads((smoke_project / f"metrics/evaluate/{name}.json").read_text())
        assert ev["transfer_check"] == {k: transfer[name][k] for k in ("clean_acc", "pgd_acc", "pgd_images")}
    claims = json.loads((smoke_project / "metrics/claims.json").read_text())
    assert list(claims) == ["C1", "C2", "C3", "C4", "C5", "C6", "C7"]
    gain = transfer["linear_robust"]["pgd_acc"] - transfer["linear_natural"]["pgd_acc"]
    assert claims["C1"]["holds"] is (gain >= 0.30)
    assert claims["C3"]["holds"] is (transfer["lwf"]["pgd_acc"] >= 0.60 and transfer["lwf"]["clean_acc"] >= 0.83)
    assert claims["C4"] == {"holds": None, "close": False,  # the smoke pipeline has no target AT from scratch
                            "numbers": "no target_at (init: scratch) model in transfer.models"}
    assert "## The papers' claims" in report and "| C7: rrm's PGD accuracy" in report
    for png in ("curves.png", "tradeoff.png"):
        assert (smoke_project / "reports" / png).read_bytes()[:4] == b"\x89PNG"


def test_evaluate_refuses_an_unknown_model_in_one_line_and_keeps_the_outputs(smoke_project):
    """The evaluate stage evaluates every model in one process; by hand it takes model names, and a
    wrong one stops it before any work, naming it, with the earlier outputs left as they were."""
    import subprocess

    from conftest import BIN, project_env

    outputs = sorted((smoke_project / "metrics/evaluate").iterdir()) + sorted((smoke_project / "plots/evaluate").iterdir())
    before = {p: p.read_bytes() for p in outputs}
    proc = subprocess.run([str(BIN / "python"), "-m", "stages.evaluate", "lwf", "nosuch"], cwd=smoke_project,
                          env=project_env(smoke_project.parents[1]), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: evaluate: no model 'nosuch' in transfer.models (")
    assert {p: p.read_bytes() for p in outputs} == before


def test_evaluate_runs_are_tagged_with_the_checks_verdict(smoke_project):
    import mlflow
    import yaml

    params = yaml.safe_load((smoke_project / "params.yaml").read_text())
    client = mlflow.MlflowClient(f"sqlite:///{smoke_project.parents[1] / 'mlflow.db'}")
    for name in params["transfer"]["models"]:
        ev = json.loads((smoke_project / f"metrics/evaluate/{name}.json").read_text())
        run = client.get_run(ev["run_id"])
        assert run.data.tags["stage"] == f"evaluate-{name}" and run.info.status == "FINISHED"
        assert run.data.tags["model"] == name
        assert run.data.tags["checks_passed"] == str(ev["checks_passed"]).lower()
        assert run.data.tags["model_run_id"] == ev["model_run_id"]
        assert run.data.metrics["pgd_acc"] == pytest.approx(ev["pgd_acc"])



def test_dvc_plots_show_renders_every_curve_on_one_plot(smoke_project):
    import subprocess

    import yaml

    from conftest import BIN, project_env

    root = smoke_project.parents[1]
    target = "pipelines/smoke/reports/curves.csv"
    proc = subprocess.run([str(BIN / "dvc"), "plots", "show", "--json", target], cwd=root, env=project_env(root),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (plot,) = json.loads(proc.stdout)["data"][target]
    content = plot["content"]
    assert plot["type"] == "vega" and content["encoding"]["color"]["field"] == "model"
    models = yaml.safe_load((smoke_project / "params.yaml").read_text())["transfer"]["models"]
    assert {row["model"] for row in content["data"]["values"]} == set(models)
