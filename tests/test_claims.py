"""The papers' claims C1-C7 (robust_transfer.claims): verdicts from the models' numbers, on records
shaped like the report stage's (the smoke pipeline's end-to-end test checks the stage's own)."""
import copy

import pytest

from robust_transfer.claims import Bars, paper_claims
from robust_transfer.config import ConfigError, ReportConfig, build


def rec(method, clean, pgd, passes=3000, asr=0.05, **extra):
    return {"method": method, "natural_source": False, "init": None, "teacher": None, "clean_acc": clean,
            "clean_n": 5000, "pgd_acc": pgd, "pgd_n": 500, "passes": passes, "transfer_asr": asr, "asr_n": 500,
            **extra}


# Every claim holds on these numbers, each by a margin well outside its sampling interval.
HOLDING = {
    "linear_robust": rec("linear", 0.80, 0.48),
    "linear_natural": rec("linear", 0.80, 0.03, natural_source=True),
    "finetune": rec("finetune", 0.90, 0.30, asr=0.40),
    "lwf": rec("lwf", 0.85, 0.68),
    "cartl_ft": rec("cartl", 0.87, 0.75),
    "nfd": rec("nfd", 0.88, 0.20, asr=0.05),
    "target_at_scratch": rec("target_at", 0.84, 0.40, passes=24000, init="scratch"),
    "target_at_source": rec("target_at", 0.88, 0.72, passes=24000, init="source"),
    "rrm": rec("rrm", 0.86, 0.74, teacher="target_at_source"),
}


def verdicts(models, bars=Bars()):
    return {v["id"]: v for v in paper_claims(models, bars)}


def test_every_claim_holds_on_numbers_that_show_it():
    v = verdicts(HOLDING)
    assert list(v) == ["C1", "C2", "C3", "C4", "C5", "C6", "C7"]
    assert all(c["holds"] is True and not c["close"] for c in v.values()), v
    assert "linear_robust 48.0 vs linear_natural 3.0 PGD: +45.0 points" in v["C1"]["numbers"]
    assert "cartl_ft" in v["C4"]["numbers"]  # the best transfer method by PGD, target AT left out


@pytest.mark.parametrize("model, change, claim", [
    ("linear_natural", {"pgd_acc": 0.20}, "C1"),       # a gain of 28 points, below the bar of 30
    ("finetune", {"clean_acc": 0.84}, "C2"),           # finetune less accurate than lwf
    ("finetune", {"pgd_acc": 0.70}, "C2"),             # finetune more robust than lwf
    ("lwf", {"pgd_acc": 0.50}, "C3"),                  # below C3's PGD bar (C2 and C5 still hold)
    ("target_at_scratch", {"pgd_acc": 0.80}, "C4"),    # target AT from scratch more robust than every method
    ("cartl_ft", {"passes": 30000}, "C4"),             # the best method costs more than target AT
    ("cartl_ft", {"clean_acc": 0.80}, "C5"),           # cartl less accurate than lwf
    ("nfd", {"transfer_asr": 0.60}, "C6"),
    ("rrm", {"pgd_acc": 0.60}, "C7"),                  # 12 points below its teacher
    ("rrm", {"passes": 25000}, "C7"),                  # more passes than adversarial training
])
def test_a_claim_fails_when_its_numbers_do_not_show_it_and_only_that_claim(model, change, claim):
    models = copy.deepcopy(HOLDING)
    models[model].update(change)
    v = verdicts(models)
    assert v[claim]["holds"] is False, v[claim]
    assert [c for c, x in v.items() if x["holds"] is not True] == [claim]


def test_bars_are_parameters():
    assert verdicts(HOLDING, Bars(lwf_pgd=0.70))["C3"]["holds"] is False
    assert verdicts(HOLDING, Bars(linear_gain=0.50))["C1"]["holds"] is False
    assert verdicts(HOLDING, Bars(linear_gain=0.45))["C1"]["holds"] is True  # 0.48 - 0.03 is 0.44999...
    models = copy.deepcopy(HOLDING)
    models["rrm"]["pgd_acc"] = 0.70  # 2 points below its teacher
    assert verdicts(models, Bars(rrm_gap=0.05))["C7"]["holds"] is True
    assert verdicts(models, Bars(rrm_gap=0.01))["C7"]["holds"] is False


def test_a_difference_inside_its_sampling_interval_is_marked_close():
    models = copy.deepcopy(HOLDING)
    models["cartl_ft"].update(pgd_acc=0.69)  # 1 point above lwf, on 500 images each: +-5.8 points
    v = verdicts(models)
    assert v["C5"]["holds"] is True and v["C5"]["close"] is True
    assert "PGD cartl_ft 69.0 vs lwf 68.0 (difference +-5.8)" in v["C5"]["numbers"]
    models["cartl_ft"].update(pgd_acc=0.68, clean_acc=0.85)  # equal numbers: "at least as robust" holds
    assert verdicts(models)["C5"]["holds"] is True


def test_a_claim_without_its_models_is_not_judged_and_says_what_is_missing():
    models = {k: v for k, v in HOLDING.items() if k not in ("target_at_scratch", "nfd")}
    v = verdicts(models)
    assert v["C4"]["holds"] is None and v["C4"]["numbers"] == "no target_at (init: scratch) model in transfer.models"
    assert v["C6"]["holds"] is None and "no nfd model" in v["C6"]["numbers"]
    assert v["C1"]["holds"] is True
    models = copy.deepcopy(HOLDING)
    models["rrm"]["teacher"] = None  # matched a source model: trained on the source task
    assert "trained on another task" in verdicts(models)["C7"]["numbers"]
    models["nfd"]["transfer_asr"] = None
    assert verdicts(models)["C6"]["holds"] is None


@pytest.mark.parametrize("raw, message", [
    ({"claim_notes": {"C9": "x"}}, "report.claim_notes.C9: not a claim (one of C1, C2"),
    ({"claim_notes": {"C3": 3}}, "report.claim_notes.C3 must be a string"),
    ({"claim_lwf_pgd": 60}, "report.claim_lwf_pgd must be an accuracy between 0 and 1, got 60"),
    ({"claim_notez": {}}, "unknown parameter report.claim_notez (did you mean 'claim_notes'?)"),
])
def test_bad_claim_params_name_the_key(raw, message):
    with pytest.raises(ConfigError, match=__import__("re").escape(message)):
        build(ReportConfig, raw, "report")
