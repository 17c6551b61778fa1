"""report: one Markdown report and PNG plots for every transferred model of the pipeline.

outs: reports/report.md, reports/curves.png, reports/tradeoff.png, reports/curves.csv (all PGD curves
in one table, a DVC plot), metrics/summary.json (one object per model, the keys in SUMMARY_KEYS),
metrics/claims.json (the papers' claims C1-C7 judged on these models: robust_transfer.claims)
Reads metrics/evaluate/<m>.json (the evaluate stage's) for every key of transfer.models.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from robust_transfer import claims
from robust_transfer.config import ConfigError, ReportConfig, load_section, pretrain_entries, transfer_entries
from robust_transfer.data import atomic_path, write_json
from stages._common import run

SAID = {True: "holds", False: "does not hold", None: "not judged"}  # a claim's verdict, in words

SUMMARY_KEYS = ("method", "source", "shots", "clean_acc", "pgd_acc", "autoattack_acc", "transfer_asr",
                "checks_passed", "train_seconds", "train_passes")


def load_evaluations(names: list[str]) -> dict[str, dict]:
    out = {}
    for name in names:
        path = Path("metrics") / "evaluate" / f"{name}.json"
        if not path.is_file():
            raise ConfigError(f"missing {path}; run the evaluate stage ('{name}' is in transfer.models)")
        try:
            out[name] = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise ConfigError(f"{path} is not valid JSON; re-run the evaluate stage for '{name}'") from None
    return out


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Names of the points no other point beats on both coordinates (higher is better on both)."""
    front = []
    for name, (a, b) in points.items():
        dominated = any(a2 >= a and b2 >= b and (a2 > a or b2 > b) for other, (a2, b2) in points.items()
                        if other != name)
        if not dominated:
            front.append(name)
    return sorted(front, key=lambda n: points[n][0])


def summary_row(ev: dict) -> dict:
    return {k: ev.get(k) for k in SUMMARY_KEYS}


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _write_text(text: str, path: Path) -> None:
    tmp = atomic_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def claim_records(params: dict, evals: dict[str, dict]) -> dict[str, dict]:
    """What robust_transfer.claims needs of each model, from its evaluate metrics and its params entry."""
    sources, entries = pretrain_entries(params), transfer_entries(params)
    records = {}
    for name, ev in evals.items():
        method, _, options = entries[name]
        check = ev.get("transfer_check") or {}
        if check.get("pgd_acc") is None:
            raise ConfigError(f"metrics/evaluate/{name}.json has no transfer_check (an older evaluate stage's); "
                              f"re-run the evaluate stage")
        records[name] = {
            "method": method, "init": options.get("init"),
            "natural_source": sources.get(ev["source"], ("",))[0] == "natural",
            "teacher": options["source"] if options["source"] in entries else None,
            "clean_acc": check["clean_acc"], "clean_n": ev.get("test_images"),
            "pgd_acc": check["pgd_acc"], "pgd_n": check["pgd_images"], "passes": ev.get("train_passes"),
            "transfer_asr": ev.get("transfer_asr"), "asr_n": (ev.get("transfer_attack") or {}).get("images"),
        }
    return records


def claims_markdown(verdicts: list[dict], notes: dict, evals: dict[str, dict]) -> list[str]:
    any_ev = next(iter(evals.values()))
    pgd_n = any_ev.get("transfer_check", {}).get("pgd_images")
    lines = ["## The papers' claims", "",
             f"Judged on the transfer stage's checks (clean accuracy on {any_ev.get('test_images')} test images, "
             f"PGD-{any_ev.get('pgd_steps')} on {pgd_n}), C6 on the transfer attack above. +-: the 95 % sampling "
             f"interval of each number or difference; *close*: a difference inside it, so another draw of test "
             f"images could turn the verdict.", "",
             "| claim | verdict | numbers | note |", "|---|---|---|---|"]
    for v in verdicts:
        verdict = f"**{SAID[False]}**" if v["holds"] is False else SAID[v["holds"]]
        if v["close"]:
            verdict += " (close)"
        lines.append(f"| {v['id']}: {v['claim']} | {verdict} | {v['numbers']} | {notes.get(v['id'], '')} |")
    return lines + [""]


def markdown(title: str, evals: dict[str, dict], front: list[str], claim_lines: list[str] = ()) -> str:
    any_ev = next(iter(evals.values()))
    eps, norm = any_ev["eps"], any_ev["norm"]
    lines = [f"# {title}", "",
             f"Threat model {norm}, eps {eps}. Accuracies in %. Clean: the whole target test set "
             f"({any_ev.get('test_images', '?')} images). PGD: PGD-{any_ev.get('pgd_steps')} with random start at the "
             f"nominal eps on {any_ev.get('pgd_images')} test images. AutoAttack: standard version on the models "
             f"selected ({', '.join(any_ev.get('autoattack_selected', [])) or 'none'}), '-' where not run. "
             f"Transfer ASR: success rate, over clean-correct images, of PGD examples crafted on the public source "
             f"model's features (and logits when label spaces match). Compute: wall seconds and forward-backward "
             f"image passes of training, from the transfer stage.", "",
             "| model | method | source | clean | PGD | AutoAttack | transfer ASR | checks | train s | train passes |",
             "|---|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for name, ev in evals.items():
        failed = [c for c, v in ev["checks"].items() if not v["passed"]]
        checks = "pass" if ev["checks_passed"] else "FAIL: " + ", ".join(failed)
        star = " *" if name in front else ""
        passes = ev.get("train_passes")
        lines.append(f"| {name}{star} | {ev['method']} | {ev['source']} | {_pct(ev['clean_acc'])} | "
                     f"{_pct(ev['pgd_acc'])} | {_pct(ev['autoattack_acc'])} | {_pct(ev['transfer_asr'])} | {checks} | "
                     f"{ev.get('train_seconds') or 0:.1f} | {passes or 0:.0f} |")
    lines += ["", "\\* on the Pareto front of clean vs PGD accuracy.", "",
              "![PGD accuracy vs eps](curves.png)", "", "![clean vs robust accuracy](tradeoff.png)", ""]
    gaps = [(n, ev) for n, ev in evals.items() if ev.get("autoattack_acc") is not None]
    if gaps:
        lines += ["## AutoAttack vs PGD on the same images", "",
                  "| model | images | PGD | AutoAttack | gap | after APGD-CE | after APGD-T | after FAB-T | after Square |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for n, ev in gaps:
            after = ev["autoattack_breakdown"]["robust_acc_after"]
            gap = ev["autoattack_pgd_acc"] - ev["autoattack_acc"]
            lines.append(f"| {n} | {ev['autoattack_images']} | {_pct(ev['autoattack_pgd_acc'])} | "
                         f"{_pct(ev['autoattack_acc'])} | {100 * gap:+.1f} | {_pct(after['apgd-ce'])} | "
                         f"{_pct(after['apgd-t'])} | {_pct(after['fab-t'])} | {_pct(after['square'])} |")
        lines.append("")
    lines += list(claim_lines)
    lines += ["## Sanity checks (Carlini et al. 2019)", ""]
    for name, ev in evals.items():
        parts = []
        for check, v in ev["checks"].items():
            nums = ", ".join(f"{k} {_fmt(x)}" for k, x in v.items() if k != "passed")
            parts.append(f"{check} {'pass' if v['passed'] else '**FAIL**'} ({nums})")
        lines.append(f"- **{name}**: " + "; ".join(parts))
    lines.append("")
    return "\n".join(lines)


def _fmt(x) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def plot_curves(evals: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, ev in evals.items():
        curve = ev["pgd_curve"]
        ax.plot([p["eps"] for p in curve], [p["acc"] for p in curve], marker="o", ms=3,
                ls="-" if ev["checks_passed"] else "--", label=name + ("" if ev["checks_passed"] else " (checks failed)"))
    any_ev = next(iter(evals.values()))
    ax.axvline(any_ev["eps"], color="grey", lw=0.8, ls=":")
    ax.set_xlabel(f"eps ({any_ev['norm']})")
    ax.set_ylabel(f"PGD-{any_ev.get('pgd_steps')} accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Robustness curves")
    _save(fig, path)


def plot_tradeoff(evals: dict[str, dict], front: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, ev in evals.items():
        on = name in front
        ax.scatter(ev["clean_acc"], ev["pgd_acc"], color="C3" if on else "C0", zorder=3)
        ax.annotate(name, (ev["clean_acc"], ev["pgd_acc"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    xs = [evals[n]["clean_acc"] for n in front]
    ys = [evals[n]["pgd_acc"] for n in front]
    ax.step(xs, ys, where="pre", color="C3", lw=1, label="Pareto front")  # the boundary of what the front attains
    any_ev = next(iter(evals.values()))
    ax.set_xlabel("clean accuracy")
    ax.set_ylabel(f"PGD accuracy ({any_ev['norm']}, eps {any_ev['eps']})")
    ax.legend(fontsize=8)
    ax.set_title("Clean vs robust accuracy")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = atomic_path(path)
    fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)


def main(args, params) -> None:
    cfg = load_section(ReportConfig, params, "report")
    names = list(transfer_entries(params))
    if not names:
        raise ConfigError("transfer.models is empty: nothing to report")
    evals = load_evaluations(names)
    points = {n: (ev["clean_acc"], ev["pgd_acc"]) for n, ev in evals.items()}
    front = pareto_front(points)
    out = Path("reports")
    out.mkdir(exist_ok=True)
    rows = ["model,eps,acc\n"] + [f"{n},{p['eps']},{p['acc']:.6f}\n" for n, ev in evals.items() for p in ev["pgd_curve"]]
    _write_text("".join(rows), out / "curves.csv")
    plot_curves(evals, out / "curves.png")
    plot_tradeoff(evals, front, out / "tradeoff.png")
    bars = claims.Bars(cfg.claim_linear_gain, cfg.claim_lwf_pgd, cfg.claim_lwf_clean, cfg.claim_rrm_gap)
    verdicts = claims.paper_claims(claim_records(params, evals), bars)
    _write_text(markdown(cfg.title, evals, front, claims_markdown(verdicts, cfg.claim_notes, evals)),
                out / "report.md")
    write_json([summary_row(ev) for ev in evals.values()], Path("metrics") / "summary.json")
    write_json({v["id"]: {k: v[k] for k in ("holds", "close", "numbers")} for v in verdicts},
               Path("metrics") / "claims.json")
    failed = [n for n, ev in evals.items() if not ev["checks_passed"]]
    print(f"report: {len(evals)} models, Pareto front {front}; checks failed: {failed or 'none'}; claims: "
          + ", ".join(f"{v['id']} {SAID[v['holds']]}" for v in verdicts) + "; see reports/report.md")


if __name__ == "__main__":
    run(main)
