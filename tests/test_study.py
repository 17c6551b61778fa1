"""The data-efficiency study (stages/study.py): its pipeline is the default task, every level's params
pass the stages' validation, and the summary reads DVC experiments' commits into the table, the
crossover and the plots. (Running the study itself is minutes per level: docs/data-efficiency.md.)"""
from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import BIN, REPO
from robust_transfer.config import ConfigError, load_all
from stages import study

ROOT_PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
STUDY_PARAMS = yaml.safe_load((REPO / study.PIPELINE / "params.yaml").read_text())


def test_the_study_pipeline_is_the_default_task():
    """Same data (but the swept shots), threat model, sources, features and transfer models as the root
    params.yaml: the study must measure the default pipeline, not a look-alike."""
    for section in ("threat", "ray", "pretrain", "extract"):
        assert STUDY_PARAMS[section] == ROOT_PARAMS[section], section
    strip = lambda d: {k: v for k, v in d.items() if k not in ("shots", "val_shots")}
    assert strip(STUDY_PARAMS["data"]) == strip(ROOT_PARAMS["data"])
    for key in ("train", "models"):  # the study sets the epochs per level; eval_size may differ (a quick check)
        assert STUDY_PARAMS["transfer"][key] == ROOT_PARAMS["transfer"][key], key
    assert STUDY_PARAMS["tune"]["models"] == ROOT_PARAMS["tune"]["models"]
    load_all(REPO / study.PIPELINE / "params.yaml")


def test_epochs_give_the_same_optimiser_steps_at_every_level():
    assert study.epochs_for(20, 5, 32, 120) == ROOT_PARAMS["transfer"]["train"]["epochs"] == 30  # the default
    assert study.epochs_for(5, 5, 32, 120) == 120  # 25 images: one batch per epoch
    assert study.epochs_for(500, 5, 32, 120) == 2  # 2500 images: 79 batches per epoch
    for shots in (5, 10, 20, 50, 100, 200, 500, 1000):
        batches = -(-shots * 5 // 32)
        steps = study.epochs_for(shots, 5, 32, 120) * batches
        assert 120 <= steps < 120 + batches


@pytest.mark.parametrize("shots", study.SHOTS)
def test_every_level_of_every_method_passes_the_stages_validation(shots):
    lv = study.level(STUDY_PARAMS, shots, study.STEPS)
    params = study.check_level(STUDY_PARAMS, lv)  # load_all, as every stage runs it
    assert params["data"]["shots"] == shots and 1 <= params["data"]["val_shots"] < shots
    assert params["transfer"]["models"] == STUDY_PARAMS["transfer"]["models"]  # every method
    assert params["transfer"]["train"]["on_nonfinite"] == "rollback"  # a diverged model does not stop its level
    assert not lv.deletes


def test_a_method_subset_keeps_what_it_needs_and_drops_the_rest():
    base = json.loads(json.dumps(STUDY_PARAMS))
    base["evaluate"]["autoattack_models"] = ["lwf", "target_at_scratch"]
    lv = study.level(base, 50, 120, ["rrm", "lwf"])
    params = study.check_level(base, lv)
    # rrm's teacher is target_at_source, itself transferred from the robust source
    assert list(params["transfer"]["models"]) == ["lwf", "target_at_source", "rrm"]
    assert list(params["pretrain"]["sources"]) == ["robust"]
    assert list(params["tune"]["models"]) == ["lwf"]
    assert params["evaluate"]["autoattack_models"] == ["lwf"]
    args = lv.hydra("p.yaml")
    assert "p.yaml:~transfer.models.cartl_ft" in args and "p.yaml:~pretrain.sources.cartl" in args
    assert "p.yaml:data.shots=50" in args and "p.yaml:evaluate.autoattack_models=[lwf]" in args
    with pytest.raises(ConfigError, match="typo"):
        study.level(STUDY_PARAMS, 50, 120, ["typo"])


def test_extra_settings_reach_every_level_and_typos_stop_the_run():
    extra = study.parse_sets(["evaluate.autoattack_top=1", "evaluate.autoattack_models=[lwf]"])
    assert extra == {"evaluate.autoattack_top": 1, "evaluate.autoattack_models": ["lwf"]}
    params = study.check_level(STUDY_PARAMS, study.level(STUDY_PARAMS, 10, 120, None, extra))
    assert params["evaluate"]["autoattack_top"] == 1 and params["evaluate"]["autoattack_models"] == ["lwf"]
    with pytest.raises(ConfigError, match="did you mean 'autoattack_top'"):
        study.check_level(STUDY_PARAMS, study.level(STUDY_PARAMS, 10, 120, None, {"evaluate.autoattack_tpo": 1}))
    with pytest.raises(ConfigError, match="key=value"):
        study.parse_sets(["evaluate.autoattack_top"])


def test_the_dry_run_prints_one_dvc_experiment_per_level(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    study.main(["run", "--dry-run", "--shots", "10", "5", "--models", "lwf"])
    cmds = [ln for ln in capsys.readouterr().out.splitlines() if " exp run --temp " in ln]
    assert len(cmds) == 2 and "-n de-shots-5 " in cmds[0] and "-n de-shots-10 " in cmds[1]
    assert all("pipelines/data-efficiency/dvc.yaml:report" in c for c in cmds)


def test_the_sources_train_once_for_every_level_unless_a_setting_changes_them(capsys, monkeypatch):
    applied = [study.check_level(STUDY_PARAMS, study.level(STUDY_PARAMS, s, 120, ["lwf", "cartl_ft"])) for s in (5, 50)]
    assert study.shared_sources(STUDY_PARAMS, applied) == (["robust", "cartl"], "")
    changed = [study.check_level(STUDY_PARAMS, study.level(STUDY_PARAMS, 5, 120, ["lwf"], {"pretrain.train.epochs": 1}))]
    names, why = study.shared_sources(STUDY_PARAMS, changed)
    assert names == [] and "pretrain.train" in why
    bigger = [study.check_level(STUDY_PARAMS, study.level(STUDY_PARAMS, 5, 120, ["lwf"], {"data.source_train_size": 500}))]
    assert "data.source_train_size" in study.shared_sources(STUDY_PARAMS, bigger)[1]
    monkeypatch.chdir(REPO)
    study.main(["run", "--dry-run", "--shots", "10", "5", "--models", "lwf"])
    out = capsys.readouterr().out.splitlines()
    first = next(i for i, ln in enumerate(out) if " exp run --temp " in ln)
    assert any(ln.endswith("repro pipelines/data-efficiency/dvc.yaml:pretrain@robust") for ln in out[:first])


def test_an_experiment_copy_reuses_a_stage_run_in_the_workspace(tmp_path):
    """What shared_sources relies on: `dvc exp run --temp` copies the workspace's (untracked) dvc.lock and
    `cache: false` outputs, and checks the stage's cached outputs out instead of running it again."""
    dvc = str(BIN / "dvc")

    def sh(*cmd):
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
        assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stderr[-2000:]}"
        return proc
    sh("git", "init", "-q")
    sh("git", "config", "user.email", "t@t")
    sh("git", "config", "user.name", "t")
    sh(dvc, "init", "-q")
    runs = tmp_path.parent / f"{tmp_path.name}-source-runs.log"  # outside the repo: the copies write it too
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "dvc.yaml").write_text(
        "stages:\n"
        "  source:\n"
        f"    cmd: pwd >> {runs} && echo weights > model.txt && " + "echo '{\"acc\":1}' > m.json\n"
        "    params: [a]\n    outs: [model.txt]\n    metrics:\n      - m.json:\n          cache: false\n"
        "  target:\n    cmd: cat model.txt > t.txt\n    deps: [model.txt]\n    params: [b]\n    outs: [t.txt]\n")
    (tmp_path / "p" / "params.yaml").write_text("a: 1\nb: 1\n")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "init")
    sh(dvc, "repro", "p/dvc.yaml:source")
    sh(dvc, "exp", "run", "--temp", "p/dvc.yaml:target", "-n", "level", "-S", "p/params.yaml:b=2")
    assert runs.read_text().split() == [str(tmp_path / "p")]  # the workspace's run only, not the copy's


def test_crossover_finds_where_target_at_overtakes_transfer():
    rows = [{"shots": s, "model": m, "method": meth, "pgd_acc": acc}
            for s, m, meth, acc in [(20, "lwf", "lwf", 0.629), (20, "target_at_scratch", "target_at", 0.349),
                                    (50, "lwf", "lwf", 0.5), (50, "target_at_scratch", "target_at", 0.55),
                                    (200, "lwf", "lwf", 0.259), (200, "target_at_scratch", "target_at", 0.746)]]
    cross = study.crossover(rows)
    assert cross["target_at_from_shots"] == 50
    assert [lv["target_at_wins"] for lv in cross["levels"]] == [False, True, True]
    rows.append({"shots": 100, "model": "lwf", "method": "lwf", "pgd_acc": 0.8})
    rows.append({"shots": 100, "model": "target_at_scratch", "method": "target_at", "pgd_acc": 0.7})
    assert study.crossover(rows)["target_at_from_shots"] == 200  # a transfer win at 100 moves it on


def test_a_difference_within_the_noise_of_the_images_attacked_is_a_tie():
    """2 points on 500 images is noise (95 % margin ~6 points); 20 points is not; without the image
    count every difference counts, as before."""
    pair = lambda s, tr, at, n: [{"shots": s, "model": "cartl_ft", "method": "cartl", "pgd_acc": tr, "pgd_images": n},
                                 {"shots": s, "model": "target_at_scratch", "method": "target_at", "pgd_acc": at,
                                  "pgd_images": n}]
    cross = study.crossover(pair(5, 0.67, 0.47, 500) + pair(20, 0.67, 0.65, 500) + pair(50, 0.69, 0.674, None))
    assert [lv["verdict"] for lv in cross["levels"]] == ["transfer", "tie", "transfer"]
    assert 0.05 < cross["levels"][1]["margin"] < 0.07 and cross["levels"][2]["margin"] == 0
    assert study.crossover(pair(5, 0.67, 0.47, 500) + pair(20, 0.67, 0.65, 500))["target_at_from_shots"] == 20
    text = study.markdown(pair(20, 0.67, 0.65, 500), study.crossover(pair(20, 0.67, 0.65, 500)), [])
    assert "a tie within the noise" in text and "No level run separates them" in text


def _git(root: Path, *args: str, stdin: str = None) -> str:
    return subprocess.run(["git", *args], cwd=root, input=stdin, capture_output=True, text=True, check=True).stdout


def _commit(root: Path, files: dict[str, str], parent: str, message: str) -> str:
    """A commit with `files` on top of `parent`'s tree, not on any branch (as DVC stores experiments)."""
    _git(root, "read-tree", parent)
    for path, text in files.items():
        blob = _git(root, "hash-object", "-w", "--stdin", stdin=text).strip()
        _git(root, "update-index", "--add", "--cacheinfo", f"100644,{blob},{path}")
    tree = _git(root, "write-tree").strip()
    return _git(root, "commit-tree", tree, "-p", parent, "-m", message).strip()


def test_collect_reads_the_experiments_commits(tmp_path, monkeypatch):
    """Experiments are commits under refs/exps/<baseline>/<name> holding the level's params and metrics
    (cache: false outputs are committed): summary.json where the report ran, transfer_<m>.json otherwise."""
    root = tmp_path
    for key in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        monkeypatch.setenv(key, "t")
    for key in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(key, "t@t")
    _git(root, "init", "-q")
    _git(root, "commit", "-q", "--allow-empty", "-m", "base")
    head = _git(root, "rev-parse", "HEAD").strip()
    pipe = study.PIPELINE.as_posix()
    models = ["lwf", "target_at_scratch"]

    def level_files(shots, lwf, at, with_summary):
        params = study.level(STUDY_PARAMS, shots, 120, models).apply(STUDY_PARAMS)
        files = {f"{pipe}/params.yaml": yaml.safe_dump(params)}
        rows = [{"method": "lwf", "source": "robust", "shots": shots, "clean_acc": 0.8, "pgd_acc": lwf,
                 "autoattack_acc": lwf - 0.05, "transfer_asr": 0.1, "checks_passed": True, "train_seconds": 3.0,
                 "train_passes": 100.0},
                {"method": "target_at", "source": "robust", "shots": shots, "clean_acc": 0.8, "pgd_acc": at,
                 "autoattack_acc": None, "transfer_asr": 0.1, "checks_passed": True, "train_seconds": 30.0,
                 "train_passes": 800.0}]
        if with_summary:
            files[f"{pipe}/metrics/summary.json"] = json.dumps(rows)
        else:  # the level's LwF diverged and was rolled back (transfer.train.on_nonfinite: rollback)
            rows[0]["stopped_early"] = "loss became nan at epoch 3 step 0; rolled back to the weights of epoch 1"
        for name, row in zip(models, rows):
            files[f"{pipe}/metrics/transfer_{name}.json"] = json.dumps(row)
        return files

    for shots, lwf, at, summary in ((20, 0.629, 0.349, True), (200, 0.259, 0.746, False)):
        rev = _commit(root, level_files(shots, lwf, at, summary), head, f"exp {shots}")
        _git(root, "update-ref", f"refs/exps/{head[:2]}/{head[2:]}/de-shots-{shots}", rev)
    stale = _commit(root, level_files(20, 0.1, 0.1, True), head, "another baseline")
    _git(root, "update-ref", f"refs/exps/ab/{'c' * 38}/de-shots-20", stale)  # not this commit's: ignored

    rows = study.collect(root, study.PIPELINE)
    got = {(r["shots"], r["model"]): r for r in rows}
    assert set(got) == {(20, "lwf"), (20, "target_at_scratch"), (200, "lwf"), (200, "target_at_scratch")}
    assert got[(20, "lwf")]["pgd_acc"] == 0.629 and got[(20, "lwf")]["autoattack_acc"] == pytest.approx(0.579)
    assert got[(200, "lwf")]["autoattack_acc"] is None  # from transfer_lwf.json: no AutoAttack there
    assert got[(200, "lwf")]["epochs"] == study.epochs_for(200, 5, 32, 120) == 4
    assert got[(200, "lwf")]["stopped_early"].startswith("loss became nan")
    assert got[(20, "lwf")]["stopped_early"] is None and got[(200, "target_at_scratch")]["stopped_early"] is None

    study.summarise(root, study.PIPELINE, False, [{"shots": 20, "experiment": "de-shots-20", "seconds": 60.0,
                                                   "returncode": 0}])
    out = root / study.PIPELINE / study.OUT
    assert (out / "efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = list(csv.DictReader((out / "efficiency.csv").open()))
    assert len(table) == 4 and {r["model"] for r in table} == set(models)
    assert json.loads((out / "crossover.json").read_text())["target_at_from_shots"] == 200
    md = (out / "efficiency.md").read_text()
    assert "from **200 shots per class** on" in md
    assert "| lwf | lwf | 62.9 (57.9) | 25.9 * |" in md
    assert "lwf at 200 shots: loss became nan at epoch 3 step 0; rolled back to the weights of epoch 1" in md
    # a later run's levels join the wall-time table; a level run again replaces its row
    study.summarise(root, study.PIPELINE, False, [{"shots": 200, "experiment": "de-shots-200", "seconds": 90.0,
                                                   "returncode": 0},
                                                  {"shots": 20, "experiment": "de-shots-20", "seconds": 70.0,
                                                   "returncode": 0}])
    runs = json.loads((out / "run.json").read_text())
    assert [(r["shots"], r["seconds"]) for r in runs] == [(20, 70.0), (200, 90.0)]
    assert "| all | | 160 (2.7 min) |" in (out / "efficiency.md").read_text()
