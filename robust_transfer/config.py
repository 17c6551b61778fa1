"""Typed parameters, validated once, with one-line errors that name the offending key.

The stages read `params.yaml` and hand its sections to `load_section`; the library itself never
reads params.yaml. Every section is a dataclass: an unknown key, a wrong type or an absurd value
raises `ConfigError` naming the full key (`pretrain.epochs`), before any work starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A bad parameter or input file; its message is one line naming the culprit."""


DATASETS = ("fashion_mnist", "digits", "cifar10", "cifar100", "svhn", "imagefolder", "parquet")
ARCHS = ("small_cnn", "preact_resnet18", "wide_resnet")
NORMS = ("Linf", "L2")
SOURCE_OBJECTIVES = ("natural", "pgd_at", "trades", "fgsm_rs", "cartl")
TRANSFER_METHODS = ("linear", "last_k", "finetune", "lwf", "cartl", "nfd", "rrm", "target_at")


@dataclass
class DataConfig:
    dataset: str = "fashion_mnist"
    root: Optional[str] = None  # None: the dataset's usual place (Debian package, torchvision cache)
    source_classes: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    target_classes: list[int] = field(default_factory=lambda: [5, 6, 7, 8, 9])
    target_dataset: Optional[str] = None  # a different dataset as the target, resized to the source's shape
    target_root: Optional[str] = None
    disjoint: bool = True  # source and target classes must not overlap (same dataset)
    shots: int = 20  # target training images per class
    val_shots: int = 5  # of those, per class, held out as tune's validation split
    source_train_size: Optional[int] = None  # cap on source training images (stratified); None: all
    source_test_size: Optional[int] = None
    target_test_size: Optional[int] = None
    seed: int = 0

    def validate(self, key: str) -> None:
        _choice(f"{key}.dataset", self.dataset, DATASETS)
        if self.target_dataset is not None:
            _choice(f"{key}.target_dataset", self.target_dataset, DATASETS)
        _positive(f"{key}.shots", self.shots)
        if not 0 <= self.val_shots < self.shots:
            raise ConfigError(f"{key}.val_shots must be in [0, shots={self.shots}), got {self.val_shots}")
        for name in ("source_classes", "target_classes"):
            classes = getattr(self, name)
            if not classes or len(set(classes)) != len(classes) or min(classes) < 0:
                raise ConfigError(f"{key}.{name} must be distinct non-negative class ids, got {classes}")
        if len(self.source_classes) < 2 or len(self.target_classes) < 2:
            raise ConfigError(f"{key}: source_classes and target_classes need at least 2 classes each")
        same = self.target_dataset in (None, self.dataset)
        overlap = sorted(set(self.source_classes) & set(self.target_classes))
        if same and self.disjoint and overlap:
            raise ConfigError(f"{key}.target_classes overlap source_classes {overlap} while {key}.disjoint is true")
        for name in ("source_train_size", "source_test_size", "target_test_size"):
            if getattr(self, name) is not None:
                _positive(f"{key}.{name}", getattr(self, name))


@dataclass
class ThreatConfig:
    norm: str = "Linf"
    eps: float = 0.1  # on the [0, 1] pixel scale, as RobustBench names it
    step_size: float = 0.025  # eps / 4
    train_steps: int = 7  # PGD steps while training (PGD-AT, TRADES, CARTL, target AT)
    eval_steps: int = 20
    restarts: int = 1

    def validate(self, key: str) -> None:
        _choice(f"{key}.norm", self.norm, NORMS)
        limit = 1.0 if self.norm == "Linf" else 50.0
        if not (0 < self.eps <= limit) or not math.isfinite(self.eps):
            raise ConfigError(f"{key}.eps must be in (0, {limit}] for {self.norm}, got {self.eps}")
        if not (0 < self.step_size <= self.eps * 4):
            raise ConfigError(f"{key}.step_size must be in (0, 4*eps], got {self.step_size}")
        _positive(f"{key}.train_steps", self.train_steps)
        _positive(f"{key}.eval_steps", self.eval_steps)
        _positive(f"{key}.restarts", self.restarts)


@dataclass
class RayConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 2
    max_failures: int = 2  # Ray Train restarts a dead worker group this often, from the last checkpoint
    checkpoint_every_s: float = 30.0  # a checkpoint at most this often, and after the last epoch (0: every epoch)
    # Where Ray Train keeps checkpoints: a folder every node mounts or a cloud URI (s3://, gs://), needed
    # once workers run on other machines; null: .checkpoints/ in the project (one machine).
    storage_path: Optional[str] = None

    def validate(self, key: str) -> None:
        _positive(f"{key}.num_workers", self.num_workers)
        _positive(f"{key}.cpus_per_worker", self.cpus_per_worker)
        if self.checkpoint_every_s < 0:
            raise ConfigError(f"{key}.checkpoint_every_s must be >= 0, got {self.checkpoint_every_s}")
        if self.max_failures < -1:
            raise ConfigError(f"{key}.max_failures must be >= -1 (-1: unlimited), got {self.max_failures}")
        if self.storage_path is not None and "://" not in self.storage_path \
                and not Path(self.storage_path).is_absolute():
            raise ConfigError(f"{key}.storage_path must be an absolute path or a URI (s3://...), "
                              f"got {self.storage_path!r}")


@dataclass
class MlflowConfig:
    experiment: str = "robust-transfer"
    tracking_uri: Optional[str] = None  # None: $MLFLOW_TRACKING_URI, else a SQLite file in the project

    def validate(self, key: str) -> None:
        if not self.experiment:
            raise ConfigError(f"{key}.experiment must not be empty")


@dataclass
class TrainConfig:
    """How one model is trained; every objective and method section may override these."""

    arch: str = "small_cnn"
    width: int = 1
    epochs: int = 4
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # onecycle | cosine | constant
    augment: bool = False  # random crop + flip (CIFAR-like data only)
    amp: bool = False  # bf16 autocast of each training step where the device computes in bf16 (engine.native_bf16)
    val_every: int = 1  # epochs between validations (the history's val_* columns); the last epoch always
    # A NaN/inf loss: `stop` fails the job (nothing is handed on); `rollback` ends it on the weights of
    # the last validated epoch, as stopped early with the reason (a sweep goes on without that model's end).
    on_nonfinite: str = "stop"
    seed: int = 0

    def validate(self, key: str) -> None:
        _choice(f"{key}.arch", self.arch, ARCHS)
        _choice(f"{key}.optimizer", self.optimizer, ("sgd", "adam"))
        _choice(f"{key}.schedule", self.schedule, ("onecycle", "cosine", "constant"))
        _choice(f"{key}.on_nonfinite", self.on_nonfinite, ("stop", "rollback"))
        _positive(f"{key}.width", self.width)
        _positive(f"{key}.epochs", self.epochs)
        _positive(f"{key}.batch_size", self.batch_size)
        _positive(f"{key}.val_every", self.val_every)
        if not (0 < self.lr < 10):
            raise ConfigError(f"{key}.lr must be in (0, 10), got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"{key}.weight_decay must be >= 0, got {self.weight_decay}")


# Method-specific options: name -> default (the default's type is the type checked).
# Defaults are those of the papers' public code (see shared/DESIGN.md, Methods).
OBJECTIVE_OPTIONS: dict[str, dict[str, Any]] = {
    "natural": {},
    "pgd_at": {},
    "trades": {"beta": 6.0},
    "fgsm_rs": {"alpha_ratio": 1.25, "guard_every": 20, "guard_drop": 0.2},
    "cartl": {"lam": 0.005, "k": 1, "attack": "pgd"},
    "linear": {"source": "robust", "on_features": True},
    "last_k": {"source": "robust", "k": 1},
    "finetune": {"source": "robust", "freeze_bn": False},
    "lwf": {"source": "robust", "lam": 0.005, "head_only_frac": 0.5, "freeze_bn": True},
    "nfd": {"source": "robust", "lam": 1.0, "dropout": 0.1, "swa_frac": 0.25, "head_weight_decay": 5e-3},
    "rrm": {"source": "target_at_source", "student_arch": "small_cnn", "student_width": 2, "w_ce": 0.005},
    "target_at": {"source": "robust", "init": "source"},  # init: scratch | source
}
# CARTL fine-tuning reuses the name of its pre-training objective; its own options:
OBJECTIVE_OPTIONS["cartl_transfer"] = {"source": "cartl", "k": 1, "beta": 0.4, "power_iters": 1, "freeze_bn": True}


# Options that take one of a few words: (method, option) -> the words.
OPTION_CHOICES: dict[tuple[str, str], tuple[str, ...]] = {
    ("cartl", "attack"): ("pgd", "fgsm_rs"),
    ("target_at", "init"): ("scratch", "source"),
}


def method_options(method: str, overrides: dict[str, Any], key: str) -> dict[str, Any]:
    """The method's options with `overrides` applied, each checked for name and type."""
    defaults = OBJECTIVE_OPTIONS[method]
    out = dict(defaults)
    for name, value in overrides.items():
        if name not in defaults:
            raise ConfigError(_unknown(f"{key}.{name}", name, defaults))
        out[name] = _coerce(f"{key}.{name}", value, type(defaults[name]))
        if (method, name) in OPTION_CHOICES:
            _choice(f"{key}.{name}", out[name], OPTION_CHOICES[(method, name)])
    return out


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path}")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path} must hold a mapping of sections")
    return params


def load_section(cls: type, params: dict[str, Any], key: str, extra: tuple[str, ...] = ()) -> Any:
    """Build dataclass `cls` from params[key]; keys listed in `extra` are left to the caller."""
    raw = params.get(key, {}) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{key} must be a mapping, got {type(raw).__name__}")
    return build(cls, {k: v for k, v in raw.items() if k not in extra}, key)


def build(cls: type, raw: dict[str, Any], key: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in raw.items():
        if name not in names:
            raise ConfigError(_unknown(f"{key}.{name}", name, names))
        kwargs[name] = _coerce(f"{key}.{name}", value, hints[name])
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate(key)
    return obj


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be finite, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if hint is dict or typing.get_origin(hint) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return value
    return value


def _unknown(key: str, name: str, known) -> str:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(known))})"
    return f"unknown parameter {key}{hint}"


def _choice(key: str, value: str, choices) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{key}: unknown value '{value}', expected one of {', '.join(choices)}{hint}")


def _positive(key: str, value) -> None:
    if value is None or value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


# ----------------------------------------------------------------------------- pipeline sections
SECTIONS = ("data", "threat", "ray", "mlflow", "pretrain", "extract", "tune", "transfer", "evaluate", "report",
            "register")
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def check_sections(params: dict[str, Any]) -> None:
    for name in params:
        if name not in SECTIONS:
            raise ConfigError(_unknown(name, name, SECTIONS))


def job_config(base: dict[str, Any], entry: dict[str, Any], method: str, key: str) -> tuple[TrainConfig, dict]:
    """Split one pretrain/transfer entry into its training settings (over `base`) and method options."""
    if not isinstance(entry, dict):
        raise ConfigError(f"{key} must be a mapping, got {entry!r}")
    train = {k: v for k, v in entry.items() if k in TRAIN_FIELDS}
    rest = {k: v for k, v in entry.items() if k not in TRAIN_FIELDS}
    if base:  # a bad shared setting is named where it is written (pretrain.train.arch), not per entry
        build(TrainConfig, {k: v for k, v in base.items() if k not in train}, f"{key.split('.')[0]}.train")
    cfg = build(TrainConfig, {**(base or {}), **train}, key)
    return cfg, method_options(method, rest, key)


def pretrain_entries(params: dict[str, Any]) -> dict[str, tuple[str, TrainConfig, dict]]:
    """{source name: (objective, train config, options)} from the `pretrain` section."""
    sec = params.get("pretrain") or {}
    unknown = set(sec) - {"train", "sources"}
    if unknown:
        raise ConfigError(_unknown(f"pretrain.{sorted(unknown)[0]}", sorted(unknown)[0], ("train", "sources")))
    sources = sec.get("sources") or {}
    if not sources:
        raise ConfigError("pretrain.sources must name at least one source model")
    out = {}
    for name, entry in sources.items():
        entry = dict(entry or {})
        if "registry" in entry:  # a registered source model is downloaded, not trained
            out[name] = (REGISTRY_SOURCE, build(TrainConfig, sec.get("train") or {}, "pretrain.train"),
                         {"registry": registry_uri(entry, f"pretrain.sources.{name}")})
            continue
        objective = entry.pop("objective", name)
        _choice(f"pretrain.sources.{name}.objective", objective, SOURCE_OBJECTIVES)
        cfg, opts = job_config(sec.get("train"), entry, objective, f"pretrain.sources.{name}")
        out[name] = (objective, cfg, opts)
    return out


# `pretrain.sources.<name>: {registry: "models:/<registered name>@<alias>"}` (or `.../<version>`):
# the pretrain stage downloads that model version's checkpoint instead of training one.
REGISTRY_SOURCE = "registry"


def registry_uri(entry: dict[str, Any], key: str) -> str:
    """The `models:/` URI of a registry source entry, checked for shape (its existence is checked on download)."""
    extra = sorted(set(entry) - {"registry"})
    if extra:
        raise ConfigError(f"{key}.{extra[0]}: a registry source takes no other settings (it is downloaded, not trained)")
    uri = entry["registry"]
    if not isinstance(uri, str) or parse_model_uri(uri) is None:
        raise ConfigError(f"{key}.registry must look like models:/<name>@<alias> or models:/<name>/<version>, got {uri!r}")
    return uri


def parse_model_uri(uri: str) -> Optional[tuple[str, Optional[str], Optional[str]]]:
    """models:/name@alias -> (name, alias, None); models:/name/3 -> (name, None, "3"); anything else -> None."""
    if not uri.startswith("models:/"):
        return None
    rest = uri[len("models:/"):]
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        return (name, alias, None) if REGISTERED_NAME.fullmatch(name) and REGISTERED_NAME.fullmatch(alias) else None
    name, _, version = rest.rpartition("/")
    return (name, None, version) if REGISTERED_NAME.fullmatch(name) and version.isdigit() else None


def transfer_entries(params: dict[str, Any]) -> dict[str, tuple[str, TrainConfig, dict]]:
    """{model name: (method, train config, options)} from the `transfer` section."""
    sec = params.get("transfer") or {}
    unknown = set(sec) - {"train", "models", "eval_size"}
    if unknown:
        raise ConfigError(_unknown(f"transfer.{sorted(unknown)[0]}", sorted(unknown)[0], ("train", "models", "eval_size")))
    _coerce("transfer.eval_size", sec.get("eval_size", 1000), int)
    sources = pretrain_entries(params)
    out = {}
    for name, entry in (sec.get("models") or {}).items():
        entry = dict(entry or {})
        method = entry.pop("method", name)
        _choice(f"transfer.models.{name}.method", method, TRANSFER_METHODS)
        options_key = "cartl_transfer" if method == "cartl" else method
        cfg, opts = job_config(sec.get("train"), entry, options_key, f"transfer.models.{name}")
        if name in sources:
            raise ConfigError(f"transfer.models.{name}: the name is taken by a source in pretrain.sources")
        # Every entry names its `source` (the DVC template's dependency): a source model, or for rrm
        # the adversarially trained teacher, which may be another transfer model.
        models = sec.get("models") or {}
        known = set(sources) | (set(models) - {name} if method == "rrm" else set())
        if "source" not in entry:
            raise ConfigError(f"transfer.models.{name}.source is required (one of {', '.join(sorted(known))})")
        if opts["source"] not in known:
            raise ConfigError(f"transfer.models.{name}.source: '{opts['source']}' is not one of {', '.join(sorted(known))}")
        if method == "rrm":
            _choice(f"transfer.models.{name}.student_arch", opts["student_arch"], ARCHS)
        out[name] = (method, cfg, opts)
    return out


def load_all(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Load params.yaml and validate every section, so a bad key stops any stage before work starts."""
    params = load_params(path)
    check_sections(params)
    load_section(DataConfig, params, "data")
    load_section(ThreatConfig, params, "threat")
    load_section(RayConfig, params, "ray")
    load_section(MlflowConfig, params, "mlflow")
    load_section(ExtractConfig, params, "extract")
    pretrain_entries(params)
    transfer_entries(params)
    tune_entries(params)
    evaluate_config(params)
    load_section(ReportConfig, params, "report")
    register_config(params)
    return params


@dataclass
class ExtractConfig:
    ks: list[int] = field(default_factory=lambda: [2])  # also store the input of the last k blocks
    batch_size: int = 512

    def validate(self, key: str) -> None:
        _positive(f"{key}.batch_size", self.batch_size)
        if any(k < 1 for k in self.ks):
            raise ConfigError(f"{key}.ks must be >= 1, got {self.ks}")


# Registered model names and aliases: what is safe inside a `models:/<name>@<alias>` URI on every store.
REGISTERED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
ROBUST_METRICS = ("autoattack_acc", "pgd_acc")


@dataclass
class RegisterConfig:
    """The register stage: registered names and the robustness gate that the alias `champion` must pass.

    A transferred model passes when its `robust_metric` was measured and is >= `min_robust_acc`, its
    clean accuracy is >= `min_clean_acc`, and (with `require_checks`) every sanity check passed.
    A model without AutoAttack (evaluate ran it only on the best few) cannot pass under autoattack_acc.
    """

    name: Optional[str] = None  # None: "<dataset>-<target classes>-robust", e.g. fashion_mnist-5-9-robust
    robust_metric: str = "autoattack_acc"  # the number the robust floor applies to
    min_robust_acc: float = 0.0
    min_clean_acc: float = 0.0
    require_checks: bool = True
    allow_gate_failure: bool = False  # exit 0 even when no model passes (the previous champion stays)
    sources: bool = True  # also register every trained pretrain source, each under its own name
    source_names: dict = field(default_factory=dict)  # {source: name}; default "<dataset>-<source classes>-<source>-source"
    source_min_clean_acc: float = 0.0  # sources have no AutoAttack or sanity checks: PGD accuracy is their gate
    source_min_pgd_acc: float = 0.0

    def validate(self, key: str) -> None:
        if self.name is not None and not REGISTERED_NAME.fullmatch(self.name):
            raise ConfigError(f"{key}.name must be letters, digits, '_', '.' or '-', got {self.name!r}")
        _choice(f"{key}.robust_metric", self.robust_metric, ROBUST_METRICS)
        for name in ("min_robust_acc", "min_clean_acc", "source_min_clean_acc", "source_min_pgd_acc"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{key}.{name} must be in [0, 1], got {getattr(self, name)}")
        for source, name in self.source_names.items():
            if not isinstance(name, str) or not REGISTERED_NAME.fullmatch(name):
                raise ConfigError(f"{key}.source_names.{source} must be letters, digits, '_', '.' or '-', got {name!r}")


def register_config(params: dict[str, Any]) -> RegisterConfig:
    """The `register` section, with `source_names` checked against `pretrain.sources`."""
    cfg = load_section(RegisterConfig, params, "register")
    sources = (params.get("pretrain") or {}).get("sources") or {}
    for source in cfg.source_names:
        if source not in sources:
            raise ConfigError(f"register.source_names.{source}: not a key of pretrain.sources ({', '.join(sources)})")
    return cfg


@dataclass
class TuneConfig:
    """The tune stage: Ray Tune over the regularisation weights of some transfer models (tuning.py).

    `models` maps a transfer.models entry to the options searched, each a [low, high] range sampled on
    a log scale (one option: an even log grid; more: seeded log-uniform draws). The entry's own value
    in params is always the first trial: the reference the choice must beat.
    """

    models: dict = field(default_factory=dict)  # e.g. {lwf: {lam: [0.0005, 0.5]}, cartl_ft: {beta: [0.2, 2.0]}}
    num_samples: int = 8  # trials per model, the params' own value included
    max_concurrent_trials: int = 2  # trials at once (each one Ray Train run of workers_per_trial workers)
    workers_per_trial: int = 1
    cpus_per_worker: int = 1
    driver_cpus: float = 0.0  # CPUs held by each trial's driver (it only launches and waits for its workers)
    clean_floor: float = 0.0  # validation clean accuracy a trial must reach to be scored by its PGD accuracy
    max_clean_drop: Optional[float] = 0.02  # and at most this below the reference's (null: no such limit)
    # A trial replaces the params' value only when its validation PGD accuracy is higher by at least
    # this; null: what a one-sided 95% test asks of two accuracies on the validation images (tuning.py).
    min_gain: Optional[float] = None
    grace_frac: float = 0.5  # ASHA's first rung, as a fraction of the epochs (never inside LwF's head-only phase)
    reduction_factor: int = 2  # ASHA keeps the best 1/reduction_factor of the trials at each rung
    seed: int = 0

    def validate(self, key: str) -> None:
        for name in ("num_samples", "max_concurrent_trials", "workers_per_trial", "cpus_per_worker"):
            _positive(f"{key}.{name}", getattr(self, name))
        if self.driver_cpus < 0:
            raise ConfigError(f"{key}.driver_cpus must be >= 0, got {self.driver_cpus}")
        if not 0 <= self.clean_floor <= 1:
            raise ConfigError(f"{key}.clean_floor must be in [0, 1], got {self.clean_floor}")
        if self.max_clean_drop is not None and not 0 <= self.max_clean_drop <= 1:
            raise ConfigError(f"{key}.max_clean_drop must be in [0, 1] or null, got {self.max_clean_drop}")
        if self.min_gain is not None and not 0 <= self.min_gain <= 1:
            raise ConfigError(f"{key}.min_gain must be in [0, 1] or null, got {self.min_gain}")
        if not 0 < self.grace_frac <= 1:
            raise ConfigError(f"{key}.grace_frac must be in (0, 1], got {self.grace_frac}")
        if self.reduction_factor < 2:
            raise ConfigError(f"{key}.reduction_factor must be >= 2, got {self.reduction_factor}")


def tune_entries(params: dict[str, Any]) -> tuple[TuneConfig, dict[str, dict[str, tuple[float, float]]]]:
    """The `tune` section and its search space {model: {option: (low, high)}}, each model checked
    against transfer.models and each option against its method's numeric options."""
    cfg = load_section(TuneConfig, params, "tune")
    models = transfer_entries(params)
    space = {}
    for name, options in cfg.models.items():
        key = f"tune.models.{name}"
        if name not in models:
            raise ConfigError(f"{key}: '{name}' is not a key of transfer.models ({', '.join(models)})")
        method, _, opts = models[name]
        if opts["source"] not in (params.get("pretrain") or {}).get("sources", {}):
            # its source would be another transfer model, itself downstream of tune: a cycle
            raise ConfigError(f"{key}: '{name}' starts from '{opts['source']}', not from a pretrain source; "
                              f"only models transferred from pretrain.sources can be tuned")
        defaults = OBJECTIVE_OPTIONS["cartl_transfer" if method == "cartl" else method]
        numeric = [o for o, v in defaults.items() if isinstance(v, float)]
        if not isinstance(options, dict) or not options:
            raise ConfigError(f"{key} must map options of {method} to [low, high] ranges "
                              f"(searchable: {', '.join(numeric) or 'none'})")
        space[name] = {}
        for option, bounds in options.items():
            if option not in numeric:
                raise ConfigError(_unknown(f"{key}.{option}", option, numeric) if numeric else
                                  f"{key}: method {method} has no numeric option to tune")
            if not isinstance(bounds, list) or len(bounds) != 2:
                raise ConfigError(f"{key}.{option} must be a [low, high] range, got {bounds!r}")
            low, high = _coerce(f"{key}.{option}", bounds, list[float])
            if not 0 < low <= high:
                raise ConfigError(f"{key}.{option} must be [low, high] with 0 < low <= high, got {bounds!r}")
            space[name][option] = (low, high)
    return cfg, space


@dataclass
class EvaluateConfig:
    """The evaluate stage: how hard and on how many target test images each model is attacked.

    `images` test images (a seeded, class-stratified subset; null: the whole test set) carry the PGD
    curve, the nominal-eps PGD accuracy and the transfer attack; the PGD-100 check and AutoAttack run
    on the first `check_images` / `autoattack_images` of them.
    """

    images: Optional[int] = 100
    eps_grid: Optional[list[float]] = None  # null: Linf [0, .025, .05, .1, .15, .2, .3]; L2: eps * [0, .25, .5, 1, 1.5, 2, 3]
    steps: int = 20  # PGD steps of the curve and of pgd_acc (random start)
    restarts: int = 1
    check_images: int = 30  # PGD-100 with restarts, compared with PGD-20 on the same images
    check_steps: int = 100
    check_restarts: int = 2
    transfer_steps: int = 20  # PGD on the public source model's features (and logits when labels match)
    autoattack_images: int = 40
    autoattack_top: int = 1  # AutoAttack runs on the best `top` transferred models by PGD accuracy ...
    autoattack_models: list[str] = field(default_factory=list)  # ... and on every model named here
    autoattack_steps: int = 100  # AutoAttack's standard version: 100 iterations of APGD-CE, APGD-T and FAB-T
    autoattack_queries: int = 5000  # and 5000 queries of Square
    monotone_tolerance: float = 0.02  # accuracy may rise this much from one eps to the next (attack noise)
    large_eps_max_acc: float = 0.05  # accuracy at the grid's largest eps must be at most this
    steps_tolerance: float = 0.02  # PGD-100 with restarts may exceed PGD-20 by at most this
    blackbox_tolerance: float = 0.02  # black-box success may exceed white-box success by at most this
    batch_size: int = 500
    seed: int = 0

    def validate(self, key: str) -> None:
        if self.images is not None:
            _positive(f"{key}.images", self.images)
        if self.eps_grid is not None:
            if not self.eps_grid or any(e < 0 or not math.isfinite(e) for e in self.eps_grid):
                raise ConfigError(f"{key}.eps_grid must be a non-empty list of eps >= 0, got {self.eps_grid}")
            if sorted(set(self.eps_grid)) != self.eps_grid:
                raise ConfigError(f"{key}.eps_grid must be strictly increasing, got {self.eps_grid}")
        for name in ("steps", "restarts", "check_images", "check_steps", "check_restarts", "transfer_steps",
                     "autoattack_images", "autoattack_steps", "autoattack_queries", "batch_size"):
            _positive(f"{key}.{name}", getattr(self, name))
        if self.autoattack_top < 0:
            raise ConfigError(f"{key}.autoattack_top must be >= 0, got {self.autoattack_top}")
        for name in ("monotone_tolerance", "large_eps_max_acc", "steps_tolerance", "blackbox_tolerance"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{key}.{name} must be in [0, 1], got {getattr(self, name)}")


@dataclass
class ReportConfig:
    title: str = "Robustness transfer report"
    # The papers' claims (robust_transfer.claims): their numeric bars, and per claim id (C1-C7) a
    # note the report prints beside the verdict (what was tried where a claim does not hold).
    claim_linear_gain: float = 0.30
    claim_lwf_pgd: float = 0.60
    claim_lwf_clean: float = 0.83
    claim_rrm_gap: float = 0.05
    claim_notes: dict = field(default_factory=dict)

    def validate(self, key: str) -> None:
        if not self.title:
            raise ConfigError(f"{key}.title must not be empty")
        for name in ("claim_linear_gain", "claim_lwf_pgd", "claim_lwf_clean", "claim_rrm_gap"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{key}.{name} must be an accuracy between 0 and 1, got {getattr(self, name)}")
        for cid, note in self.claim_notes.items():
            if cid not in CLAIM_IDS:
                raise ConfigError(f"{key}.claim_notes.{cid}: not a claim (one of {', '.join(CLAIM_IDS)})")
            if not isinstance(note, str):
                raise ConfigError(f"{key}.claim_notes.{cid} must be a string, got {note!r}")


CLAIM_IDS = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")


def evaluate_config(params: dict[str, Any]) -> EvaluateConfig:
    """The `evaluate` section, with the models it names checked against `transfer.models`."""
    cfg = load_section(EvaluateConfig, params, "evaluate")
    models = (params.get("transfer") or {}).get("models") or {}
    for name in cfg.autoattack_models:
        if name not in models:
            raise ConfigError(f"evaluate.autoattack_models: '{name}' is not a key of transfer.models "
                              f"({', '.join(models)})")
    return cfg
