"""Every training job as one function: what is trained, from what, with which objective.

`build_plan(job, device)` runs inside each Ray Train worker and dispatches on `job["method"]`:
`pretrain` for the source objectives, and one function per transfer method of the papers.
The job is a plain dict written by a stage (see stages/pretrain.py and stages/transfer.py).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from . import features as feature_tables
from .config import ConfigError, ThreatConfig, TrainConfig, build
from .data import read_image_table
from .engine import Plan
from .nets import Net, build_net, load_model
from .objectives import OBJECTIVES, Context, spectral_normalize_


def build_plan(job: dict, device=None) -> Plan:
    builders = {"pretrain": pretrain, "linear": linear, "last_k": last_k, "finetune": finetune, "lwf": lwf,
                "cartl": cartl, "nfd": nfd, "rrm": rrm, "target_at": target_at}
    kind = job["method"] if job["kind"] == "transfer" else "pretrain"
    if kind not in builders:
        raise ConfigError(f"unknown method '{kind}', expected one of {', '.join(builders)}")
    # New networks and heads start from the job's seed, whatever the process drew before: the same
    # job builds the same initial weights on every rank, in every process.
    torch.manual_seed(int(job["train"].get("seed", 0)))
    return builders[kind](job)


# ----------------------------------------------------------------------------- helpers
def _common(job: dict):
    train_cfg = build(TrainConfig, job["train"], job["name"])
    threat = build(ThreatConfig, job["threat"], "threat")
    x, y = read_image_table(job["paths"]["train"]).tensors()
    vx, vy = read_image_table(job["paths"]["val"]).tensors()
    return train_cfg, threat, {"x": x, "y": y}, (vx, vy)


def _with_new_head(net: Net, num_classes: int) -> Net:
    net = copy.deepcopy(net)
    net.head = nn.Linear(net.feature_dim, num_classes)
    return net


def _freeze(modules) -> list:
    """Freeze parameters; return the BatchNorm layers among them (kept in eval mode: frozen statistics)."""
    bns = []
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)
        bns += [b for b in m.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)]
    return bns


def _all_bn(net: Net) -> list:
    """Every BatchNorm of the transferred network, statistics and affine parameters frozen (CARTL's
    finding, offered to every method as `freeze_bn`)."""
    bns = [b for b in net.blocks.modules() if isinstance(b, nn.modules.batchnorm._BatchNorm)]
    for b in bns:
        for p in b.parameters():
            p.requires_grad_(False)
    return bns


def _trainable(net: nn.Module) -> list:
    return [p for p in net.parameters() if p.requires_grad]


def _source(job: dict) -> Net:
    net, _ = load_model(job["paths"]["source"])
    return net


def _teacher(path: str) -> Net:
    net, _ = load_model(path)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


# ----------------------------------------------------------------------------- source pretraining
def pretrain(job: dict) -> Plan:
    """A source model from scratch with one of the source objectives (natural, PGD-AT, TRADES,
    FGSM-RS, CARTL's feature-distance minimisation)."""
    cfg, threat, data, val = _common(job)
    h, w, c = data["x"].shape[2], data["x"].shape[3], data["x"].shape[1]
    net = build_net(cfg.arch, c, job["num_classes"], h, cfg.width)
    spec = {"arch": cfg.arch, "in_channels": c, "num_classes": job["num_classes"], "image_size": h, "width": cfg.width}
    ctx = Context(threat, job["options"])
    objective = job["options"].get("objective", job["method"])
    return Plan(net, OBJECTIVES[objective], ctx, data, val, _trainable(net), cfg, spec,
                guard=objective == "fgsm_rs" or job["options"].get("attack") == "fgsm_rs")  # fast AT's guard


# ----------------------------------------------------------------------------- transfer methods
def linear(job: dict) -> Plan:
    """Shafahi et al.'s linear probe: a new head on the frozen source's penultimate features, trained
    on the cached feature table (no backbone pass)."""
    cfg, threat, data, val = _common(job)
    net = _with_new_head(_source(job), job["num_classes"])
    frozen = _freeze([net.normalize, net.blocks])
    opts = dict(job["options"])
    if opts.get("on_features", True):
        cached = feature_tables.read(job["paths"]["features"], columns=["label", "z"])
        _check_rows(cached["y"], data["y"], job)
        data = {"z": cached["z"], "y": data["y"], "x": data["x"]}
        objective = OBJECTIVES["probe"]
    else:
        objective = OBJECTIVES["natural"]
    return Plan(net, objective, Context(threat, opts), data, val, list(net.head.parameters()), cfg,
                _spec_of(net, job), frozen_bn=frozen)


def last_k(job: dict) -> Plan:
    """Retrain the last k blocks and a new head; the rest frozen (statistics too). Trains on the
    cached input of the last k blocks when the extract stage wrote it."""
    cfg, threat, data, val = _common(job)
    k = job["options"]["k"]
    net = _with_new_head(_source(job), job["num_classes"])
    cut = len(net.blocks) - net._check_k(k)
    frozen = _freeze([net.normalize] + list(net.blocks)[: len(net.blocks) - cut])
    opts = dict(job["options"])
    objective = OBJECTIVES["natural"]
    path = job["paths"].get("features")
    if path and f"h{k}" in feature_tables.metadata(path).get("shapes", {}):
        cached = feature_tables.read(path, columns=["label", f"h{k}"])
        _check_rows(cached["y"], data["y"], job)
        data = {"h": cached[f"h{k}"], "y": data["y"], "x": data["x"]}
        objective = OBJECTIVES["probe"]
    return Plan(net, objective, Context(threat, opts), data, val, _trainable(net), cfg, _spec_of(net, job),
                frozen_bn=frozen)


def finetune(job: dict) -> Plan:
    """Plain fine-tuning: every weight trained with cross-entropy on the target (the baseline that
    loses the source's robustness)."""
    cfg, threat, data, val = _common(job)
    net = _with_new_head(_source(job), job["num_classes"])
    frozen = _all_bn(net) if job["options"].get("freeze_bn") else []
    return Plan(net, OBJECTIVES["natural"], Context(threat, job["options"]), data, val, _trainable(net), cfg,
                _spec_of(net, job), frozen_bn=frozen)


def lwf(job: dict) -> Plan:
    """Shafahi et al.'s LwF-style fine-tuning: CE plus lam * L1 distance of the penultimate features to
    the frozen robust source's (cached z0); the head alone trains for the first `head_only_frac` of
    the epochs, then all weights; BN keeps the source's statistics."""
    cfg, threat, data, val = _common(job)
    opts = job["options"]
    net = _with_new_head(_source(job), job["num_classes"])
    cached = feature_tables.read(job["paths"]["features"], columns=["label", "z"])
    _check_rows(cached["y"], data["y"], job)
    data["z0"] = cached["z"]
    frozen = _all_bn(net) if opts.get("freeze_bn", True) else []
    ctx = Context(threat, opts)
    head_epochs = int(round(opts.get("head_only_frac", 0.5) * cfg.epochs))

    def on_epoch(epoch: int) -> None:
        ctx.head_only = epoch < head_epochs

    return Plan(net, OBJECTIVES["lwf"], ctx, data, val, _trainable(net), cfg, _spec_of(net, job),
                on_epoch=on_epoch, frozen_bn=frozen)


def cartl(job: dict) -> Plan:
    """CARTL's non-expansive fine-tuning (Chen et al.): only the last k blocks and a new head train, on
    clean target data; after every step each of their Conv/Linear weights is rescaled to spectral
    norm beta (power iteration); the frozen part's BN keeps its statistics and affine parameters."""
    cfg, threat, data, val = _common(job)
    opts = job["options"]
    net = _with_new_head(_source(job), job["num_classes"])
    k = opts["k"]
    cut = len(net.blocks) - net._check_k(k)
    frozen_part = list(net.blocks)[: len(net.blocks) - cut]
    frozen = _freeze([net.normalize] + frozen_part)
    if opts.get("freeze_bn", True):
        frozen += _all_bn(net) if k == 0 else []
    tuned = list(net.blocks)[len(net.blocks) - cut:] + [net.head]
    sn_modules = [m for part in tuned for m in part.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    state: dict = {}
    beta, iters = opts.get("beta", 0.4), opts.get("power_iters", 1)
    spectral_normalize_(sn_modules, beta, state, iters)
    return Plan(net, OBJECTIVES["natural"], Context(threat, opts), data, val, _trainable(net), cfg,
                _spec_of(net, job), after_step=lambda: spectral_normalize_(sn_modules, beta, state, iters),
                frozen_bn=frozen)


def nfd(job: dict) -> Plan:
    """Renofeation (Chin et al.): the teacher's architecture re-initialised, trained with CE plus the
    distance of its (dropout-noised, 1x1-projected) stage outputs to the frozen pretrained model's;
    stochastic weight averaging over the last `swa_frac` of the epochs, BN recomputed."""
    cfg, threat, data, val = _common(job)
    opts = job["options"]
    teacher = _teacher(job["paths"]["source"])
    spec = dict(job["source_spec"], num_classes=job["num_classes"])
    torch.manual_seed(cfg.seed)
    net = build_net(spec["arch"], spec["in_channels"], spec["num_classes"], spec["image_size"], spec["width"])
    aux = nn.ModuleDict()
    with torch.no_grad():
        outs = teacher.stages(data["x"][:2])
    for i, o in enumerate(outs):
        aux[str(i)] = nn.Conv2d(o.shape[1], o.shape[1], 1) if o.dim() == 4 else nn.Linear(o.shape[1], o.shape[1])
    ctx = Context(threat, opts, teacher=teacher, aux=aux)
    head_ids = {id(p) for p in net.head.parameters()}
    params = [{"params": [p for p in net.parameters() if id(p) not in head_ids]},
              {"params": list(net.head.parameters()), "weight_decay": opts.get("head_weight_decay", 5e-3)}]
    swa = max(1, int(round(opts.get("swa_frac", 0.25) * cfg.epochs))) if opts.get("swa_frac", 0.25) > 0 else 0
    return Plan(net, OBJECTIVES["nfd"], ctx, data, val, params, cfg, spec, swa_epochs=swa)


def rrm(job: dict) -> Plan:
    """Robust representation matching (Vaishnavi et al.): a student of any architecture trained on clean
    target images with w_ce * CE - cos(z_student, z_teacher), the teacher adversarially trained on the
    same task (its `source`: by default the `target_at_source` model)."""
    cfg, threat, data, val = _common(job)
    opts = job["options"]
    teacher = _teacher(job["paths"]["source"])
    c, h = data["x"].shape[1], data["x"].shape[2]
    torch.manual_seed(cfg.seed)
    net = build_net(opts["student_arch"], c, job["num_classes"], h, opts["student_width"])
    spec = {"arch": opts["student_arch"], "in_channels": c, "num_classes": job["num_classes"], "image_size": h,
            "width": opts["student_width"]}
    aux = nn.ModuleDict()
    if net.feature_dim != teacher.feature_dim:
        aux["proj"] = nn.Linear(net.feature_dim, teacher.feature_dim, bias=False)
    return Plan(net, OBJECTIVES["rrm"], Context(threat, opts, teacher=teacher, aux=aux), data, val,
                _trainable(net), cfg, spec)


def target_at(job: dict) -> Plan:
    """PGD adversarial training on the target itself, from scratch or from the source weights: the
    costly reference the cheap methods are measured against."""
    cfg, threat, data, val = _common(job)
    opts = job["options"]
    if opts.get("init", "source") == "source":
        net = _with_new_head(_source(job), job["num_classes"])
        spec = _spec_of(net, job)
    else:
        spec = dict(job["source_spec"], num_classes=job["num_classes"])
        torch.manual_seed(cfg.seed)
        net = build_net(spec["arch"], spec["in_channels"], spec["num_classes"], spec["image_size"], spec["width"])
    return Plan(net, OBJECTIVES["pgd_at"], Context(threat, opts), data, val, _trainable(net), cfg, spec)


def _spec_of(net: Net, job: dict) -> dict:
    return dict(job["source_spec"], num_classes=job["num_classes"])


def _check_rows(cached_y: torch.Tensor, y: torch.Tensor, job: dict) -> None:
    if len(cached_y) != len(y) or not torch.equal(cached_y, y):
        raise ConfigError(f"{job['paths']['features']} does not match {job['paths']['train']} row for row; "
                          f"re-run the extract stage")
