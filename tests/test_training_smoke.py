"""scripts/gpu_smoke.sh parses, and its CPU dry run (tiny models, 2 gloo processes, 2 steps per
run) drives the real trainers end to end and reports throughput and the Table 1/2 projections."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests._fixtures_training import require_engine

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_smoke.sh"


def test_gpu_smoke_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    assert '--nproc_per_node="$NGPU"' in text and "nvidia-smi -L | wc -l" in text


def test_gpu_smoke_dry_run(tmp_path: Path) -> None:
    require_engine()
    from training.step_timing import TABLE_RUNS

    out = tmp_path / "smoke.json"
    env = {**os.environ, "OUT": str(out), "WORKDIR": str(tmp_path / "work"), "STEPS_DRY": "2"}
    result = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["world_size"] == 2
    assert set(report["runs"]) == {
        "stage1 vit_small_patch16_224 S6",
        "stage1 vit_small_patch16_224 S4",
        "stage1 vit_small_patch32_224 S6",
        "stage2 teacher SF",
        "stage2 student S6 KD+HN",
    }
    for run in report["runs"].values():
        assert run["steps"] == 2 and run["images_per_s"] > 0 and run["seconds_per_step"] > 0
    assert [p["row"] for p in report["projections"]] == [r[0] for r in TABLE_RUNS]
    assert all(p["projected_hours"] > 0 for p in report["projections"])
    assert "stage 2 S6 (COCO)" in result.stdout
