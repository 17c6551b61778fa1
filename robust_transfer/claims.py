"""The papers' claims (C1-C7), judged on a pipeline's own numbers.

Each claim compares models by their method (not their names), on the transfer stage's checks: clean
accuracy on the whole target test set, PGD accuracy on its first `transfer.eval_size` images; C6 on
the evaluate stage's transfer attack. A verdict is a plain comparison of the measured numbers: no
claim is bent to hold. Beside it, the 95 % sampling interval of each compared difference (binomial,
unpaired, so wide for clean accuracies measured on the same images) says whether the verdict could
flip on another draw of test images: `close` marks such a claim.

`models` maps a model's name to a record:
  method, natural_source (its root source trained without attacks), init (target_at), teacher
  (rrm: the name of the model it matched, when that is a transferred model), clean_acc, clean_n,
  pgd_acc, pgd_n, passes (forward+backward image passes of its training), transfer_asr, asr_n.
When several models share a method the first (in transfer.models order) stands for it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

Z95 = 1.96


@dataclass(frozen=True)
class Bars:
    """The claims' numeric bars (the issue's, for the default Fashion-MNIST pipeline)."""

    linear_gain: float = 0.30  # C1: robust minus natural features, PGD accuracy
    lwf_pgd: float = 0.60  # C3
    lwf_clean: float = 0.83  # C3
    rrm_gap: float = 0.05  # C7: at most this below its teacher's PGD accuracy


def _half(p: float, n: Optional[int]) -> float:
    """Half-width of the 95 % interval of an accuracy p measured on n images."""
    if not n or p is None:
        return 0.0
    return Z95 * math.sqrt(max(p * (1 - p), 0.0) / n)


def _diff_half(a: float, na, b: float, nb) -> float:
    return math.hypot(_half(a, na), _half(b, nb))


def _pct(v: float) -> str:
    return f"{100 * v:.1f}"


class _Claim:
    """Conditions of one claim: each a measured margin (>0 holds) and its sampling half-width."""

    def __init__(self, cid: str, text: str):
        self.cid, self.text, self.conds, self.missing = cid, text, [], None

    def need(self, models: dict, method: str, **match) -> Optional[tuple[str, dict]]:
        for name, rec in models.items():
            if rec["method"] == method and all(rec.get(k) == v for k, v in match.items()):
                return name, rec
        if self.missing is None:
            what = method + "".join(f" ({k}: {v})" for k, v in match.items())
            self.missing = f"no {what} model in transfer.models"
        return None

    def cond(self, text: str, margin: float, half: float = 0.0, ties: bool = False) -> None:
        """`margin` > 0 (or == 0 with `ties`) where the condition holds; `half` its sampling half-width."""
        self.conds.append((text, margin, half, ties))

    def verdict(self) -> dict:
        if self.missing:
            return {"id": self.cid, "claim": self.text, "holds": None, "close": False, "numbers": self.missing}
        holds = all(m > 0 or (ties and m >= -1e-9) for _, m, _, ties in self.conds)  # (float rounding of a tie)
        close = any(abs(m) < h for _, m, h, _ in self.conds)
        return {"id": self.cid, "claim": self.text, "holds": holds, "close": close,
                "numbers": "; ".join(text for text, *_ in self.conds)}


def paper_claims(models: dict[str, dict], bars: Bars = Bars()) -> list[dict]:
    """[{id, claim, holds (None: the models it needs are not in the pipeline), close, numbers}] for C1-C7."""
    out = []

    c = _Claim("C1", f"linear on robust features beats linear on natural features in PGD accuracy by "
                     f">= {100 * bars.linear_gain:.0f} points")
    rob, nat = c.need(models, "linear", natural_source=False), c.need(models, "linear", natural_source=True)
    if rob and nat:
        (rn, r), (nn, n) = rob, nat
        gain = r["pgd_acc"] - n["pgd_acc"]
        c.cond(f"{rn} {_pct(r['pgd_acc'])} vs {nn} {_pct(n['pgd_acc'])} PGD: +{_pct(gain)} points "
               f"(+-{_pct(_diff_half(r['pgd_acc'], r['pgd_n'], n['pgd_acc'], n['pgd_n']))})",
               gain - bars.linear_gain, _diff_half(r["pgd_acc"], r["pgd_n"], n["pgd_acc"], n["pgd_n"]), ties=True)
    out.append(c.verdict())

    c = _Claim("C2", "finetune is more accurate than lwf but ends below it in PGD accuracy")
    ft, lwf = c.need(models, "finetune"), c.need(models, "lwf")
    if ft and lwf:
        (fn, f), (ln, l) = ft, lwf
        _compare(c, fn, f, ln, l, "clean_acc", "clean", higher=True)
        _compare(c, fn, f, ln, l, "pgd_acc", "PGD", higher=False)
    out.append(c.verdict())

    c = _Claim("C3", f"lwf reaches >= {100 * bars.lwf_pgd:.0f} % PGD accuracy with >= "
                     f"{100 * bars.lwf_clean:.0f} % clean accuracy")
    lwf = c.need(models, "lwf")
    if lwf:
        ln, l = lwf
        c.cond(f"{ln} PGD {_pct(l['pgd_acc'])} (+-{_pct(_half(l['pgd_acc'], l['pgd_n']))})",
               l["pgd_acc"] - bars.lwf_pgd, _half(l["pgd_acc"], l["pgd_n"]), ties=True)
        c.cond(f"clean {_pct(l['clean_acc'])} (+-{_pct(_half(l['clean_acc'], l['clean_n']))})",
               l["clean_acc"] - bars.lwf_clean, _half(l["clean_acc"], l["clean_n"]), ties=True)
    out.append(c.verdict())

    c = _Claim("C4", "the best transfer method beats target_at from scratch in PGD accuracy, with less compute")
    scratch = c.need(models, "target_at", init="scratch")
    # rrm whose teacher is a transferred model leaves the teacher's training out of its compute
    cheap = {n: r for n, r in models.items() if r["method"] != "target_at" and not r.get("teacher")}
    if scratch and cheap:
        sn, s = scratch
        bn = max(cheap, key=lambda n: cheap[n]["pgd_acc"])
        b = cheap[bn]
        _compare(c, bn, b, sn, s, "pgd_acc", "PGD", higher=True)
        c.cond(f"{b['passes']:,.0f} vs {s['passes']:,.0f} training passes", s["passes"] - b["passes"])
    elif scratch:
        c.missing = "no transfer model besides target_at"
    out.append(c.verdict())

    c = _Claim("C5", "cartl is at least as robust as lwf at equal or higher clean accuracy")
    cartl, lwf = c.need(models, "cartl"), c.need(models, "lwf")
    if cartl and lwf:
        (cn, cr), (ln, l) = cartl, lwf
        _compare(c, cn, cr, ln, l, "pgd_acc", "PGD", higher=True, ties=True)
        _compare(c, cn, cr, ln, l, "clean_acc", "clean", higher=True, ties=True)
    out.append(c.verdict())

    c = _Claim("C6", "nfd has a lower transfer-attack success rate (crafted on the source model) than finetune")
    nfd, ft = c.need(models, "nfd"), c.need(models, "finetune")
    if nfd and ft and None in (nfd[1]["transfer_asr"], ft[1]["transfer_asr"]):
        c.missing = "the evaluate stage measured no transfer attack"
    elif nfd and ft:
        (dn, d), (fn, f) = nfd, ft
        half = _diff_half(d["transfer_asr"], d["asr_n"], f["transfer_asr"], f["asr_n"])
        c.cond(f"{dn} {_pct(d['transfer_asr'])} vs {fn} {_pct(f['transfer_asr'])} % transfer ASR "
               f"(difference +-{_pct(half)})", f["transfer_asr"] - d["transfer_asr"], half)
    out.append(c.verdict())

    c = _Claim("C7", f"rrm's PGD accuracy is within {100 * bars.rrm_gap:.0f} points of its teacher's on the "
                     f"teacher's task, with less compute than adversarial training of the same student")
    rrm, at = c.need(models, "rrm"), c.need(models, "target_at")
    if rrm and at:
        (rn, r), (an, a) = rrm, at
        teacher = models.get(r.get("teacher") or "")
        if teacher is None:
            c.missing = f"{rn}'s teacher is a source model, trained on another task"
        else:
            half = _diff_half(r["pgd_acc"], r["pgd_n"], teacher["pgd_acc"], teacher["pgd_n"])
            c.cond(f"{rn} {_pct(r['pgd_acc'])} vs its teacher {r['teacher']} {_pct(teacher['pgd_acc'])} PGD "
                   f"(difference +-{_pct(half)})", r["pgd_acc"] - (teacher["pgd_acc"] - bars.rrm_gap), half,
                   ties=True)
            # A pass is a pass whatever the network: adversarial training of the student on the same
            # data and epochs costs what target_at's did (PGD-K: K+1 passes an image).
            c.cond(f"{r['passes']:,.0f} training passes vs adversarial training's {a['passes']:,.0f} ({an})",
                   a["passes"] - r["passes"])
    out.append(c.verdict())
    return out


def _compare(c: _Claim, an: str, a: dict, bn: str, b: dict, key: str, label: str, higher: bool,
             ties: bool = False) -> None:
    n = "pgd_n" if key == "pgd_acc" else "clean_n"
    half = _diff_half(a[key], a[n], b[key], b[n])
    margin = (a[key] - b[key]) if higher else (b[key] - a[key])
    c.cond(f"{label} {an} {_pct(a[key])} vs {bn} {_pct(b[key])} (difference +-{_pct(half)})", margin, half, ties)
