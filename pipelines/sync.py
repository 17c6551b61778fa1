"""Write pipelines/<name>/dvc.yaml from the root dvc.yaml: the same stages, with `code` pointing back.

Every pipeline reuses the root's stages; only its params.yaml differs. Run after editing dvc.yaml:
    python pipelines/sync.py          (tests/test_pipelines.py fails while they differ)
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARK = "  - code: .\n"


def render(pipeline_dir: Path) -> str:
    text = (ROOT / "dvc.yaml").read_text()
    if MARK not in text:
        sys.exit(f"error: dvc.yaml has no '{MARK.strip()}' var to rewrite")
    rel = Path(*[".."] * len(pipeline_dir.relative_to(ROOT).parts)).as_posix()
    return text.replace(MARK, f"  - code: {rel}\n", 1)


def pipelines() -> list[Path]:
    return sorted(p.parent for p in (ROOT / "pipelines").glob("*/params.yaml"))


if __name__ == "__main__":
    for d in pipelines():
        (d / "dvc.yaml").write_text(render(d))
        print(f"wrote {(d / 'dvc.yaml').relative_to(ROOT)}")
