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


def _fake_interpreter(path: Path, log: Path) -> Path:
    path.write_text(f'#!/bin/sh\necho "$0 $*" >> "{log}"\n')
    path.chmod(0o755)
    return path


def test_gpu_smoke_runs_the_interpreter_it_is_given(tmp_path: Path) -> None:
    """PYTHON picks the interpreter; without it the script runs python3, never a bare python."""
    log = tmp_path / "calls.log"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_interpreter(bin_dir / "python3", log)
    (bin_dir / "python").write_text("#!/bin/sh\nexit 97\n")  # a stray `python` must not be run
    (bin_dir / "python").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin", "OUT": str(tmp_path / "o.json")}
    env.pop("PYTHON", None)
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert log.read_text().startswith(f"{bin_dir / 'python3'} -m torch.distributed.run")

    chosen = _fake_interpreter(tmp_path / "venv-python", log)
    log.unlink()
    result = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"], env={**env, "PYTHON": str(chosen)}, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    calls = log.read_text()
    assert calls.startswith(f"{chosen} -m torch.distributed.run") and "training.step_timing" in calls
