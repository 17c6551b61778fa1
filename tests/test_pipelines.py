"""Every pipeline reuses the root dvc.yaml's stages (pipelines/sync.py writes them)."""
import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sync", REPO / "pipelines" / "sync.py")
sync = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sync)


@pytest.mark.parametrize("pipeline", sync.pipelines(), ids=lambda p: p.name)
def test_pipeline_stages_match_the_root(pipeline):
    assert (pipeline / "dvc.yaml").read_text() == sync.render(pipeline), \
        f"{pipeline.name}/dvc.yaml differs from the root dvc.yaml: run `python pipelines/sync.py`"


def test_every_pipeline_has_params_for_every_section_the_stages_read():
    import yaml

    root = set(yaml.safe_load((REPO / "params.yaml").read_text()))
    for p in sync.pipelines():
        missing = root - set(yaml.safe_load((p / "params.yaml").read_text()))
        assert not missing, f"{p.name}/params.yaml lacks sections {sorted(missing)}"
