"""training.table1 (issue 30): a whole Table 1 row from one command. The CPU dry run of the S6 row
goes from generated archives through ``training.prepare`` and fake weights from
``training.weights`` (LEANCLIP_WEIGHTS, no network) to the row's JSON: five configs (teacher SF
on COCO and Flickr30k, stage 1, stage 2 on both) and the evaluation, with tiny models and one
epoch of one to three steps per job; a second run resumes (runs nothing) and a row with a missing input fails before
any job starts."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from tests._fixtures_prepare import make_archives
from tests._fixtures_training import require_engine
from tests._fixtures_weights import make_fake_weights

require_engine()

from training import prepare, table1, weights  # noqa: E402

TINY = [
    "--set", "model.tiny=true",
    "--set", "device=cpu",
    "--set", "train.epochs=1",
    "--set", "train.num_workers=0",
    "--set", "train.amp=false",
    "--set", "train.checkpoint_every=0",
    "--set", "train.warmup_steps=1",
    "--set1", "model.text_layers=2",
    "--set1", "train.batch_size=8",
    "--set1", "train.embed_batch_size=16",
    "--set2", "train.batch_size=60",
    "--set2", "train.eval_batch_size=16",
    "--set2", "train.hn_k=3",
]  # fmt: skip


@pytest.fixture()
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory holding data/ (prepared from generated archives) and a weights folder."""
    archives = make_archives(tmp_path / "archives")
    monkeypatch.chdir(tmp_path)
    k = str(archives["karpathy"])
    assert (
        prepare.main(["coco", "--karpathy", k, "--images", str(archives["coco"])]) == 1
    )  # 2 images left out
    assert prepare.main(["flickr30k", "--karpathy", k, "--images", str(archives["flickr"])]) == 0
    assert prepare.main(["cc3m", "--shards", str(archives["shards"])]) == 1  # a damaged shard left out
    make_fake_weights(tmp_path / "weights", monkeypatch)
    monkeypatch.setenv(weights.ENV, str(tmp_path / "weights"))

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return tmp_path


def test_s6_row_dry_run_on_cpu_offline(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--row", "s6", "--gpus", "", "--workers", "0", "--eval-batch-size", "16", *TINY]
    assert table1.main(argv) == 0
    record = json.loads((workspace / "runs/tables/rows/s6.json").read_text())
    assert record["label"] == "f_v^S   f_t^S6"
    jobs = {j["name"]: j for j in record["jobs"]}
    assert set(jobs) == {
        "teacher_sf_coco",
        "teacher_sf_flickr",
        "s6_stage1",
        "s6_stage2_coco",
        "s6_stage2_flickr",
    }
    assert all(j["ran_s"] is not None for j in jobs.values())
    names = [j["name"] for j in record["jobs"]]  # dependencies first
    assert names.index("s6_stage1") < names.index("s6_stage2_coco") > names.index("teacher_sf_coco")
    for run in (
        "runs/cc3m/s6_stage1",
        "runs/coco/s6_stage2",
        "runs/flickr/s6_stage2",
        "runs/coco/teacher_sf",
    ):
        assert (workspace / run / "final.pt").is_file(), run
    results = record["results"]
    assert set(results) == {"coco5k", "coco1k", "flickr1k"}
    for bench in results.values():
        assert 0 <= bench["t2i_R@1"] <= bench["t2i_R@5"] <= bench["t2i_R@10"] <= 100
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["row"] == "s6"
    # stage 1 read the real sample count of the prepared shards (13), not a hard-coded one
    stage1_log = json.loads((workspace / "data/cc3m/shards.json").read_text())
    assert stage1_log["num_samples"] == 13
    # run again: every job is finished, so only the evaluation runs (same numbers)
    assert table1.main(argv) == 0
    again = json.loads((workspace / "runs/tables/rows/s6.json").read_text())
    assert all(j["ran_s"] is None for j in again["jobs"]) and again["results"] == results
    # the collected table shows the row
    capsys.readouterr()
    assert table1.main(["--collect"]) == 0
    assert any(
        line.startswith("f_v^S   f_t^S6") and "-" not in line.split("|")[1]
        for line in capsys.readouterr().out.splitlines()
    )


def test_a_missing_input_fails_before_any_job(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the TinyBERT row needs cc3m_local.tsv (prepare cc3m --pairs), which this workspace lacks
    assert table1.main(["--row", "s6", "--row", "tinybert", "--gpus", "", *TINY]) == 2
    err = capsys.readouterr().err
    assert "data/cc3m/cc3m_local.tsv (needed by tinybert_stage1.yaml)" in err and "nothing was run" in err
    assert not (workspace / "runs").exists()
    # a weight the folder lacks is named the same way, before anything runs
    manifest = json.loads((workspace / "weights/manifest.json").read_text())
    del manifest["weights"]["timm:vit_small_patch16_224.augreg_in21k"]
    (workspace / "weights/manifest.json").write_text(json.dumps(manifest))
    assert table1.main(["--row", "s6", "--gpus", "", *TINY]) == 2
    assert "timm:vit_small_patch16_224.augreg_in21k" in capsys.readouterr().err
    assert not (workspace / "runs").exists()


class _FakeJobProcess:
    """Stands in for a job's process: finishes (writes final.pt) on its second poll."""

    running: list = []
    log: list = []
    run_dirs: dict = {}  # job name (its config's stem) -> run_dir

    def __init__(self, cmd: list, env: dict, **kwargs: Any) -> None:
        self.config = Path(cmd[cmd.index("--config") + 1]).stem
        self.run_dir = _FakeJobProcess.run_dirs[self.config]
        self.polls = 0
        _FakeJobProcess.running.append(self.config)
        _FakeJobProcess.log.append(
            ("start", self.config, env["CUDA_VISIBLE_DEVICES"], len(_FakeJobProcess.running))
        )

    def poll(self) -> int | None:
        self.polls += 1
        if self.polls < 2:
            return None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "final.pt").write_bytes(b"done")
        if self.config in _FakeJobProcess.running:
            _FakeJobProcess.running.remove(self.config)
            _FakeJobProcess.log.append(("end", self.config, "", 0))
        return 0

    def terminate(self) -> None:
        pass


def test_parallel_runs_ready_jobs_on_a_gpu_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--parallel: each job gets one GPU of its own, no job starts before the jobs it reads, and at
    most one job per GPU runs at a time; without it, a job on several GPUs goes through torchrun."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(table1.time, "sleep", lambda s: None)
    monkeypatch.setattr(table1.subprocess, "Popen", _FakeJobProcess)
    _FakeJobProcess.running, _FakeJobProcess.log = [], []
    row = table1.all_rows()["s6"]
    _FakeJobProcess.run_dirs = {j.name: j.run_dir for j in row.jobs}
    seconds = table1.run_jobs(row.jobs, ["0", "1"], parallel=True, log_dir=tmp_path / "logs")
    assert set(seconds) == {j.name for j in row.jobs}
    starts = [e for e in _FakeJobProcess.log if e[0] == "start"]
    assert all(gpu in ("0", "1") for _, _, gpu, _ in starts) and max(n for *_, n in starts) <= 2
    order = [e[1] for e in _FakeJobProcess.log]
    for job in row.jobs:
        for dep in job.needs:  # started only after each job it reads had ended
            assert order.index(job.name) > len(order) - 1 - order[::-1].index(dep), (job.name, dep)
    # sequential on two GPUs: torchrun with one process per GPU, resuming from latest.pt
    job = row.jobs[0]
    (job.run_dir / "latest.pt").write_bytes(b"x")
    cmd = table1._job_command(job, ["0", "1"])
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"] and "--nproc_per_node=2" in cmd
    assert cmd[cmd.index("--resume") + 1] == str(job.run_dir / "latest.pt")
