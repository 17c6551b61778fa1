"""Transfer methods as the engine builds them (`methods.build_plan` on a stage's job dict), on a
source CNN trained on real digits: cached features, frozen parts, spectral norms, SWA, RRM students
of another architecture (issue 3). No Ray: `_steps` runs the engine's per-step logic in-process."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn as nn

from rt_testlib import digits, trained_digits_net
from robust_transfer import engine, features
from robust_transfer.config import ConfigError, ThreatConfig, TrainConfig, method_options
from robust_transfer.data import to_table, write_table
from robust_transfer.methods import build_plan
from robust_transfer.nets import net_spec, save_model

THREAT = ThreatConfig(norm="Linf", eps=0.1, step_size=0.025, train_steps=2, eval_steps=3)
TARGET = [5, 6, 7, 8, 9]  # digits 5-9 are the target task; the source saw all ten digits


def _target_table(x, y, per_class, offset=0):
    keep = torch.cat([torch.nonzero(y == c).flatten()[offset:offset + per_class] for c in TARGET])
    images = (x[keep] * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    orig = y[keep].numpy()
    return to_table(images, orig - 5, orig, [str(c) for c in TARGET])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """What the stages hand a transfer job: source checkpoint, target tables, cached feature table."""
    root = tmp_path_factory.mktemp("methods")
    source = trained_digits_net()
    spec = net_spec("small_cnn", (8, 8, 1), 10, 1)
    save_model(source, spec, root / "source.pt", extra={"run_id": "r0"})
    x, y = digits()["train"]
    write_table(_target_table(x, y, 8), root / "train.parquet")
    write_table(_target_table(x, y, 4, offset=8), root / "val.parquet")
    features.extract(source, root / "train.parquet", root / "features.parquet", [2], {"source": "source"})
    return {"root": root, "spec": spec}


def _job(files, method, epochs=2, **options):
    key = "cartl_transfer" if method == "cartl" else method
    opts = method_options(key, {"source": "source", **options}, f"transfer.models.{method}")
    train = dataclasses.asdict(TrainConfig(epochs=epochs, batch_size=10, lr=0.01, schedule="constant"))
    root = files["root"]
    return {"name": f"transfer-{method}", "kind": "transfer", "method": method, "options": opts, "train": train,
            "threat": dataclasses.asdict(THREAT),
            "paths": {"train": str(root / "train.parquet"), "val": str(root / "val.parquet"),
                      "source": str(root / "source.pt"), "features": str(root / "features.parquet")},
            "num_classes": len(TARGET), "source_spec": files["spec"], "data_hash": "test"}


def _steps(plan, epochs: int, batch_size: int = 10) -> None:
    """The engine's inner loop (engine.train_loop_per_worker) without Ray: train mode with frozen BN
    in eval mode, the plan's objective through TrainModule, optimiser step, then `after_step`; weights
    and image batches channels-last, as the engine keeps them."""
    module = engine.TrainModule(plan).to(memory_format=torch.channels_last)
    params = list(plan.params)
    aux = list(plan.ctx.aux.parameters())
    if aux:
        params += [{"params": aux}] if isinstance(params[0], dict) else aux
    opt = engine._optimizer(params, plan.train_cfg)
    n = len(plan.train["y"])
    for epoch in range(epochs):
        if plan.on_epoch:
            plan.on_epoch(epoch)
        module.train()
        for bn in plan.frozen_bn:
            bn.eval()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for i in range(0, n, batch_size):
            batch = {k: engine._nhwc(v[order[i:i + batch_size]]) for k, v in plan.train.items()}
            loss, _, _ = module(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if plan.after_step:
                plan.after_step()


def _bn_state(modules):
    return {f"{i}.{k}": v.clone() for i, m in enumerate(modules) for k, v in m.state_dict().items()}


def _count_block_calls(net):
    calls = {name: 0 for name in net.block_names}
    for name, block in net.blocks.named_children():
        block.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


# ----------------------------------------------------------------------------- probes on cached features
def test_linear_probe_trains_on_the_feature_table_and_predicts_like_the_composed_model(files):
    plan = build_plan(_job(files, "linear", epochs=3), "cpu")
    assert "z" in plan.train and plan.objective.__name__ == "probe"
    calls = _count_block_calls(plan.net)
    head_before = plan.net.head.weight.clone()
    blocks_before = copy.deepcopy(plan.net.blocks.state_dict())
    _steps(plan, 3)
    assert sum(calls.values()) == 0, f"the probe ran the backbone: {calls}"
    assert not torch.equal(plan.net.head.weight, head_before)
    assert all(torch.equal(v, plan.net.blocks.state_dict()[k]) for k, v in blocks_before.items())

    net = plan.net.eval()
    x = plan.train["x"]
    with torch.no_grad():
        probe_logits = net.head(plan.train["z"])
        model_logits = net(x)
    assert torch.allclose(probe_logits, model_logits, atol=1e-4)
    assert torch.equal(probe_logits.argmax(1), model_logits.argmax(1))
    assert (model_logits.argmax(1) == plan.train["y"]).float().mean() > 0.5  # it did learn the target


def test_last_k_probe_runs_only_the_last_k_blocks_and_matches_the_composed_model(files):
    plan = build_plan(_job(files, "last_k", epochs=3, k=2), "cpu")
    assert "h" in plan.train and plan.train["h"].dim() == 4  # the input of conv4: a feature map
    calls = _count_block_calls(plan.net)
    _steps(plan, 3)
    trained = plan.net.block_names[-2:]
    assert all(calls[n] > 0 for n in trained) and all(calls[n] == 0 for n in plan.net.block_names[:-2]), calls
    net = plan.net.eval()
    with torch.no_grad():
        probe_logits = net.head(net.tail(plan.train["h"], 2))
        model_logits = net(plan.train["x"])
    assert torch.allclose(probe_logits, model_logits, atol=1e-4)


def test_feature_table_that_does_not_match_the_images_is_refused(files, tmp_path):
    x, y = digits()["train"]
    write_table(_target_table(x, y, 8, offset=20), tmp_path / "other.parquet")
    features.extract(trained_digits_net(), tmp_path / "other.parquet", tmp_path / "f.parquet", [], {})
    job = _job(files, "linear")
    job["paths"]["features"] = str(tmp_path / "f.parquet")
    write_table(_target_table(x, y, 7), tmp_path / "short.parquet")
    job["paths"]["train"] = str(tmp_path / "short.parquet")  # 35 rows against 40 cached
    with pytest.raises(ConfigError, match="does not match .* row for row"):
        build_plan(job, "cpu")


# ----------------------------------------------------------------------------- LwF
def test_lwf_starts_at_zero_penalty_and_the_penalty_grows(files):
    job = _job(files, "lwf", epochs=4, lam=0.005, head_only_frac=0.5)
    job["train"]["lr"] = 0.05  # large enough that four short epochs move the features
    plan = build_plan(job, "cpu")
    source = trained_digits_net()
    with torch.no_grad():
        assert torch.allclose(plan.train["z0"], source.features(plan.train["x"]), atol=1e-5)

    def penalty():
        plan.net.eval()
        with torch.no_grad():
            return (plan.net.features(plan.train["x"]) - plan.train["z0"]).abs().sum(1).mean().item()

    assert penalty() < 1e-4
    blocks0 = copy.deepcopy(plan.net.blocks.state_dict())
    _steps(plan, 2)  # the head-only half: the features have not moved
    assert all(torch.equal(v, plan.net.blocks.state_dict()[k]) for k, v in blocks0.items())
    assert penalty() < 1e-4
    _steps_from(plan, 2, 4)
    assert penalty() > 0.01


def _steps_from(plan, start, stop):
    """Epochs start..stop-1 (LwF switches from head-only to all weights by epoch number)."""
    on_epoch = plan.on_epoch
    plan.on_epoch = lambda e: on_epoch(e + start)
    try:
        _steps(plan, stop - start)
    finally:
        plan.on_epoch = on_epoch


# ----------------------------------------------------------------------------- frozen BN
@pytest.mark.parametrize("method,options", [("lwf", {"head_only_frac": 0.0}), ("finetune", {"freeze_bn": True}),
                                            ("cartl", {"k": 2})])
def test_frozen_batch_norm_keeps_statistics_and_affine_parameters(files, method, options):
    plan = build_plan(_job(files, method, **options), "cpu")
    bns = [m for m in plan.net.blocks.modules() if isinstance(m, nn.BatchNorm2d)]
    frozen = [m for m in bns if any(m is f for f in plan.frozen_bn)]
    assert frozen, "the method froze no BN layer"
    before = _bn_state(frozen)
    blocks_before = copy.deepcopy(plan.net.blocks.state_dict())
    _steps(plan, 2)
    after = _bn_state(frozen)
    assert all(torch.equal(before[k], after[k]) for k in before), \
        [k for k in before if not torch.equal(before[k], after[k])]
    changed = [k for k, v in plan.net.blocks.state_dict().items() if not torch.equal(v, blocks_before[k])]
    assert changed, "nothing trained: the test could not see BN statistics move"


def test_unfrozen_batch_norm_does_move(files):
    """The counterpart of the test above: without freeze_bn, fine-tuning updates BN statistics."""
    plan = build_plan(_job(files, "finetune", freeze_bn=False), "cpu")
    bns = [m for m in plan.net.blocks.modules() if isinstance(m, nn.BatchNorm2d)]
    before = _bn_state(bns)
    _steps(plan, 1)
    after = _bn_state(bns)
    assert any(not torch.equal(before[k], after[k]) for k in before if "running_mean" in k)


# ----------------------------------------------------------------------------- CARTL
@pytest.mark.parametrize("beta", [0.4, 1.0])
def test_cartl_keeps_spectral_norms_at_beta_and_the_frozen_part_fixed(files, beta):
    job = _job(files, "cartl", epochs=3, k=2, beta=beta)
    job["train"]["lr"] = 0.05
    plan = build_plan(job, "cpu")
    net = plan.net
    frozen_names = net.block_names[:-2]
    frozen_before = {k: v.clone() for k, v in net.blocks.state_dict().items() if k.split(".")[0] in frozen_names}
    _steps(plan, 3)
    tuned = [m for part in list(net.blocks)[-2:] + [net.head] for m in part.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(tuned) == 3  # conv4's conv, fc's linear, the head
    for m in tuned:
        sigma = torch.linalg.matrix_norm(m.weight.detach().reshape(m.weight.shape[0], -1), ord=2).item()
        # power iteration run to convergence after every step: the bound holds to within 1 %
        assert sigma <= beta * 1.01, (m, sigma)
        if beta < 1:
            assert sigma <= 1.0
    state = net.blocks.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in frozen_before.items())


# ----------------------------------------------------------------------------- NFD and SWA
def test_swa_averages_the_snapshots():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    swa = engine._swa_init(net)
    snapshots = []
    for _ in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        snapshots.append({k: v.clone() for k, v in net.named_parameters()})
        swa.update_parameters(net)
    for name, p in swa.module.named_parameters():
        mean = torch.stack([s[name] for s in snapshots]).mean(0)
        assert torch.allclose(p, mean, atol=1e-6), name
    assert int(swa.n_averaged) == 4


def test_nfd_student_is_reinitialised_with_stage_projections_and_swa(files):
    plan = build_plan(_job(files, "nfd", epochs=4, swa_frac=0.5), "cpu")
    teacher = plan.ctx.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert plan.swa_epochs == 2
    assert len(plan.ctx.aux) == len(plan.net.block_names)  # one 1x1 projection per stage
    for name, m in plan.net.blocks.named_modules():  # every layer re-initialised, none copied from the teacher
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert not torch.equal(m.weight, teacher.blocks.get_submodule(name).weight), name
    head_group = [g for g in plan.params if isinstance(g, dict) and "weight_decay" in g]
    assert head_group and head_group[0]["weight_decay"] == pytest.approx(5e-3)
    _steps(plan, 1)


# ----------------------------------------------------------------------------- RRM
@pytest.mark.parametrize("arch,width", [("small_cnn", 2), ("preact_resnet18", 1)])
def test_rrm_student_of_another_architecture_learns_the_teachers_representation(files, arch, width):
    plan = build_plan(_job(files, "rrm", epochs=3, student_arch=arch, student_width=width), "cpu")
    teacher = plan.ctx.teacher
    assert plan.spec["arch"] == arch and plan.spec["width"] == width and teacher.blocks[0].__class__ is nn.Sequential
    assert plan.net.feature_dim != teacher.feature_dim and "proj" in plan.ctx.aux

    def cosine():
        with torch.no_grad():
            plan.net.eval()
            z_s = plan.ctx.aux["proj"](plan.net.features(plan.train["x"]))
            return nn.functional.cosine_similarity(z_s, teacher.features(plan.train["x"]), dim=1).mean().item()

    start = cosine()
    plan.train_cfg = dataclasses.replace(plan.train_cfg, optimizer="adam", lr=3e-3)
    _steps(plan, 3)
    assert cosine() > start + 0.1, (start, cosine())


# ----------------------------------------------------------------------------- target AT
def test_target_at_from_scratch_or_from_the_source(files):
    source = trained_digits_net()
    from_source = build_plan(_job(files, "target_at", init="source"), "cpu").net
    scratch = build_plan(_job(files, "target_at", init="scratch"), "cpu").net
    conv = "conv1.0.weight"
    assert torch.equal(from_source.blocks.state_dict()[conv], source.blocks.state_dict()[conv])
    assert not torch.equal(scratch.blocks.state_dict()[conv], source.blocks.state_dict()[conv])
    assert from_source.head.out_features == scratch.head.out_features == len(TARGET)


def test_unknown_method_is_refused(files):
    job = _job(files, "linear")
    job["method"] = "magic"
    with pytest.raises(ConfigError, match="unknown method 'magic'"):
        build_plan(job, "cpu")


# ----------------------------------------------------------------------------- amp
def test_amp_runs_the_training_step_in_bf16_only_where_the_device_computes_in_bf16(files, monkeypatch):
    """`train.amp` on the CPU: bf16 where the CPU has bf16 units (this machine's AMX), fp32 elsewhere
    (emulated bf16 is slower than fp32); the step still trains, in either case, with fp32 weights."""
    plan = build_plan(_job(files, "target_at", init="source"), "cpu")
    module = engine.TrainModule(plan).to(memory_format=torch.channels_last)
    batch = {k: engine._nhwc(v[:10]) for k, v in plan.train.items()}
    cpu = torch.device("cpu")
    dtypes = []
    plan.net.head.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    for native in (True, False):
        monkeypatch.setattr(engine, "native_bf16", lambda device, native=native: native)
        with engine.training_autocast(True, cpu):
            loss, _, _ = module(batch)
        loss.backward()
        assert torch.isfinite(loss) and all(p.grad.dtype == torch.float32 for p in plan.net.parameters() if p.grad is not None)
        with engine.training_autocast(False, cpu):
            module(batch)
    # each call: the attack's train_steps forwards and the training forward; in bf16 only with amp on
    # bf16 units (the first of the four calls), fp32 without them or without amp
    per_call = THREAT.train_steps + 1
    assert dtypes == [torch.bfloat16] * per_call + [torch.float32] * 3 * per_call
