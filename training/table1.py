"""One command per row of the paper's Table 1 and Table 2: the chain of configs, then the evaluation.

    python -m training.table1 --list                          # the rows and the jobs of each
    python -m training.table1 --row s6                        # every GPU, one job after another
    python -m training.table1 --row s6 --gpus 0,1,2,3         # these GPUs
    python -m training.table1 --row s6 --row s4 --parallel    # independent jobs on separate GPUs
    python -m training.table1 --row all                       # every row of both tables
    python -m training.table1 --collect                       # the tables from the rows' JSON

A row runs the jobs it needs (stage-1 and stage-2 configs; a job's dependencies are read from its
config: ``model.init`` and ``teacher`` name another job's checkpoint) in dependency order, skips
the jobs already finished (their ``final.pt`` exists), resumes an interrupted one from its
``latest.pt``, evaluates the row's model(s) and writes ``OUT/rows/ROW.json``. Before the first job
starts, every input of every pending job (data files, shards, and with ``LEANCLIP_WEIGHTS`` the
weights) is checked, so a missing file fails in seconds, not after hours of earlier jobs.

How jobs use the GPUs: without ``--parallel`` each job runs on all the GPUs given (its own
process; torchrun with one process per GPU when there are several; on the CPU, in this process);
with ``--parallel`` every job whose dependencies are done starts at once on a GPU of its own, as
GPUs free up. The global batch is the paper's either way (docs/training.md): a job on one GPU
takes longer, not a different batch. ``--set``, ``--set1`` and ``--set2`` override config entries of every job, of stage-1 jobs,
of stage-2 jobs (the CPU dry run of the tests shrinks the models and the steps that way).

Table 1 rows are the ``rows:`` of ``configs/table1.yaml`` (evaluated on COCO 5K, COCO 1K 5-fold and
Flickr30k 1K); Table 2 rows are ``t2-NAME`` for the rows of ``configs/table2.yaml`` (COCO 5K).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from training.train_utils import load_config

log = logging.getLogger("training.table1")

CONFIGS = Path(__file__).resolve().parent / "configs"


@dataclass
class Job:
    name: str  # the config's stem (Table 2: its run name)
    stage: int
    config_path: Path
    overrides: List[str]
    config: Dict[str, Any]
    needs: List[str] = field(default_factory=list)

    @property
    def run_dir(self) -> Path:
        return Path(self.config["run_dir"])

    @property
    def finished(self) -> bool:
        return (self.run_dir / "final.pt").is_file()

    def references(self) -> List[str]:
        """Checkpoints this job reads: a stage-1 student (``model.init``), a teacher (``teacher``)."""
        m = self.config.get("model") or {}
        refs = [m.get("init"), self.config.get("teacher"), m.get("teacher_pretrained")]
        return [str(r) for r in refs if r and (os.sep in str(r) or str(r).endswith(".pt"))]


@dataclass
class Row:
    name: str
    table: int
    label: str
    jobs: List[Job]  # in dependency order, dependencies included
    evaluate: Dict[
        str, Any
    ]  # Table 1: {"coco": spec, "flickr": spec, "models": {label: {coco: ckpt}}}; Table 2: {"test": spec, "checkpoint": dir}


# --------------------------------------------------------------------------------------------
# Rows


def _stage(config: Mapping[str, Any]) -> int:
    return 2 if "teacher" in config else 1


def _job(path: Path, overrides: Sequence[str], name: Optional[str] = None) -> Job:
    config = load_config(path, overrides)
    return Job(name or path.stem, _stage(config), path, list(overrides), config)


def _with_dependencies(wanted: Sequence[Job], universe: Sequence[Job]) -> List[Job]:
    """``wanted`` and every job of ``universe`` they need (transitively), dependencies first."""
    by_dir = {j.run_dir.resolve(): j for j in universe}

    def producer(ref: str) -> Optional[Job]:
        path = Path(ref).resolve()
        return next((by_dir[d] for d in (path.parent, *path.parents) if d in by_dir), None)

    ordered: List[Job] = []

    def visit(job: Job, trail: tuple = ()) -> None:
        if job.name in trail:
            raise ValueError(f"jobs depend on each other in a cycle: {' -> '.join(trail + (job.name,))}")
        if any(j.name == job.name for j in ordered):
            return
        job.needs = []
        for ref in job.references():
            dep = producer(ref)
            if dep is not None and dep is not job:
                visit(dep, trail + (job.name,))
                job.needs.append(dep.name)
        ordered.append(job)

    for job in wanted:
        visit(job)
    return ordered


def table1_rows(config_path: Path = CONFIGS / "table1.yaml", overrides: Sequence[str] = ()) -> Dict[str, Row]:
    config = load_config(config_path)
    steps = {Path(s["config"]).stem: s for s in config["steps"]}

    def job(stem: str) -> Job:
        step = steps[stem]
        return _job(config_path.parent / step["config"], list(step.get("overrides", [])) + list(overrides))

    universe = [job(stem) for stem in steps]
    by_name = {j.name: j for j in universe}
    rows = {}
    for name, row in config["rows"].items():
        label = row["model"]
        unknown = [s for s in row["steps"] if Path(s).stem not in by_name]
        if unknown:
            raise ValueError(f"table1.yaml row {name!r}: steps {unknown} are not in the table's steps")
        jobs = _with_dependencies([by_name[Path(s).stem] for s in row["steps"]], universe)
        ev = config["evaluate"]
        evaluate = {k: ev[k] for k in ("coco", "flickr") if ev.get(k)}
        evaluate["models"] = {label: ev["models"][label]}
        rows[name] = Row(name, 1, label, jobs, evaluate)
    return rows


def table2_rows(
    config_path: Path = CONFIGS / "table2.yaml",
    overrides: Sequence[str] = (),
    universe: Sequence[Job] = (),
) -> Dict[str, Row]:
    """Table 2's rows: a stage-1 run per stage-1 loss (shared by the rows), a stage-2 run per row;
    ``universe``: other jobs a row may need (the teacher T' of Table 1)."""
    config = load_config(config_path)
    out_dir = Path(config["out_dir"])
    common1 = list(config.get("stage1_overrides", []))
    common2 = list(config.get("stage2_overrides", []))
    rows = {}
    for row in config["rows"]:
        loss = row.get("stage1_loss", "infonce")
        run = row.get("name") or row["label"].replace(" ", "_").replace("/", "_")
        s1 = _job(
            config_path.parent / (row.get("stage1") or config["default_stage1"]),
            common1
            + [f"run_dir={out_dir / f'stage1_{loss}'}", f"train.loss={loss}"]
            + list(row.get("stage1_overrides", []))
            + list(overrides),
            name=f"t2-s1_{loss}",
        )
        s2 = _job(
            config_path.parent / (row.get("stage2") or config["default_stage2"]),
            common2
            + [f"run_dir={out_dir / run}", f"model.init={s1.run_dir / 'final.pt'}"]
            + list(row.get("stage2_overrides", []))
            + list(overrides),
            name=f"t2-{run}",
        )
        jobs = _with_dependencies([s2], [s1, s2, *universe])
        rows[f"t2-{run}"] = Row(
            f"t2-{run}", 2, row["label"], jobs, {"test": config["test"], "checkpoint": str(s2.run_dir)}
        )
    return rows


def all_rows(
    table1: Path = CONFIGS / "table1.yaml",
    table2: Path = CONFIGS / "table2.yaml",
    set_all: Sequence[str] = (),
    set1: Sequence[str] = (),
    set2: Sequence[str] = (),
) -> Dict[str, Row]:
    def overrides(job_stage: int) -> List[str]:
        return list(set_all) + list(set1 if job_stage == 1 else set2)

    # overrides depend on the stage, which is known once a config is loaded: load, then reload
    rows = table1_rows(table1)
    rows.update(table2_rows(table2, universe=[j for r in rows.values() for j in r.jobs]))
    unique = {id(j): j for row in rows.values() for j in row.jobs}  # rows share jobs (T')
    for job in unique.values():
        job.overrides = job.overrides + overrides(job.stage)
        job.config = load_config(job.config_path, job.overrides)
    return rows


# --------------------------------------------------------------------------------------------
# Before the first job: every input there?


def _data_specs(config: Mapping[str, Any]) -> List[Mapping[str, Any]]:
    data = config.get("data") or {}
    return [spec for spec in data.values() if isinstance(spec, Mapping)]


def missing_inputs(rows: Sequence[Row]) -> List[str]:
    """Inputs of the pending jobs and of the evaluations that are not there, each with who needs it."""
    from training.data import spec_missing_files
    from training.weights import WeightsError, ids_in_config, local_weight

    needed_by: Dict[str, List[str]] = {}
    for row in rows:
        pending = [j for j in row.jobs if not j.finished]
        specs = [(j.config_path.name, s) for j in pending for s in _data_specs(j.config)]
        specs += [
            (f"the evaluation of {row.name}", s)
            for k, s in row.evaluate.items()
            if k in ("coco", "flickr", "test")
        ]
        for who, spec in specs:
            for path in spec_missing_files(spec):
                needed_by.setdefault(path, [])
                if who not in needed_by[path]:
                    needed_by[path].append(who)
        for job in pending:
            for wid in ids_in_config(job.config):
                kind, name = wid.split(":", 1)
                try:
                    local_weight(kind, name)
                except WeightsError as exc:  # names the weight and the fetch command
                    needed_by.setdefault(str(exc), []).append(job.config_path.name)
    return [f"{what} (needed by {', '.join(who)})" for what, who in needed_by.items()]


# --------------------------------------------------------------------------------------------
# Running jobs


def _job_command(job: Job, gpus: Sequence[str]) -> List[str]:
    module = "training.stage1" if job.stage == 1 else "training.stage2"
    args = ["-m", module, "--config", str(job.config_path)]
    for item in job.overrides:
        args += ["--set", item]
    latest = job.run_dir / "latest.pt"
    if latest.is_file():
        args += ["--resume", str(latest)]
    if len(gpus) > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={len(gpus)}",
            *args,
        ]
    return [sys.executable, *args]


def run_in_process(job: Job) -> None:
    from training import stage1, stage2

    latest = job.run_dir / "latest.pt"
    resume = latest if latest.is_file() else None
    if job.stage == 1:
        stage1.Stage1Trainer(job.config).run(resume=resume)
    else:
        stage2.Stage2Trainer(job.config).run(resume=resume)


def _env(gpus: Sequence[str]) -> Dict[str, str]:
    env = dict(os.environ)
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    return env


def _check_finished(job: Job) -> None:
    if not job.finished:  # e.g. train.max_steps stopped it mid-epoch: later jobs would lack its checkpoint
        raise RuntimeError(f"job {job.name} ended without {job.run_dir / 'final.pt'} (train.max_steps set?)")


def run_jobs(jobs: Sequence[Job], gpus: Sequence[str], parallel: bool, log_dir: Path) -> Dict[str, float]:
    """Run the unfinished ``jobs`` (dependency order); returns seconds per job run."""
    pending = [j for j in jobs if not j.finished]
    seconds: Dict[str, float] = {}
    if not pending:
        return seconds
    log_dir.mkdir(parents=True, exist_ok=True)
    if not parallel:
        for job in pending:
            t0 = time.perf_counter()
            log.info("job %s (stage %d) on %s", job.name, job.stage, ",".join(gpus) or "cpu")
            if not gpus:  # the CPU: in this process
                run_in_process(job)
            else:  # a process per GPU, each seeing only the GPUs given (CUDA_VISIBLE_DEVICES)
                with (log_dir / f"{job.name}.log").open("a") as out:
                    rc = subprocess.call(
                        _job_command(job, gpus), env=_env(gpus), stdout=out, stderr=subprocess.STDOUT
                    )
                if rc != 0:
                    raise RuntimeError(
                        f"job {job.name} failed (exit {rc}); see {log_dir / (job.name + '.log')}"
                    )
            _check_finished(job)
            seconds[job.name] = time.perf_counter() - t0
        return seconds
    # --parallel: each ready job on a GPU of its own (CPU: one job at a time)
    slots = list(gpus) or [""]
    done = {j.name for j in jobs if j.finished}
    running: Dict[str, tuple] = {}
    waiting = list(pending)
    while waiting or running:
        for job in list(waiting):
            free = [g for g in slots if g not in {r[1] for r in running.values()}]
            if not free or not all(n in done for n in job.needs):
                continue
            gpu = free[0]
            out = (log_dir / f"{job.name}.log").open("a")
            cmd = _job_command(job, [gpu] if gpu else [])
            log.info("job %s (stage %d) on GPU %s: %s", job.name, job.stage, gpu or "-", " ".join(cmd))
            proc = subprocess.Popen(cmd, env=_env([gpu] if gpu else []), stdout=out, stderr=subprocess.STDOUT)
            running[job.name] = (proc, gpu, out, time.perf_counter())
            waiting.remove(job)
        if waiting and not running:
            raise RuntimeError(f"jobs {[j.name for j in waiting]} wait for jobs that did not finish")
        time.sleep(1.0)
        for name, (proc, _gpu, out, t0) in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            out.close()
            del running[name]
            if rc != 0:
                for other in running.values():
                    other[0].terminate()
                raise RuntimeError(f"job {name} failed (exit {rc}); see {log_dir / (name + '.log')}")
            _check_finished(next(j for j in pending if j.name == name))
            done.add(name)
            seconds[name] = time.perf_counter() - t0
    return seconds


# --------------------------------------------------------------------------------------------
# Evaluation and the row's JSON


def evaluate_row(row: Row, gpus: Sequence[str], batch_size: int, num_workers: int) -> Dict[str, Any]:
    import torch

    from training.distributed import DistInfo

    device = torch.device("cuda", int(gpus[0])) if gpus and torch.cuda.is_available() else torch.device("cpu")
    info = DistInfo(0, 1, 0, device)
    if row.table == 1:
        from training.ablations import evaluate_table1_models

        return evaluate_table1_models(row.evaluate, info, batch_size, num_workers).get(row.label, {})
    from training.data import load_paired
    from training.evaluate import evaluate_model
    from training.models import load_model

    run = Path(row.evaluate["checkpoint"])
    best = run / "best.pt" if (run / "best.pt").is_file() else run / "final.pt"
    model = load_model(best).to(device)
    recalls = evaluate_model(
        model,
        load_paired(row.evaluate["test"]),
        info=info,
        batch_size=batch_size,
        num_workers=num_workers,
        amp=device.type == "cuda",
    )
    return {"coco5k": recalls}


def run_row(
    row: Row,
    out_dir: Path,
    gpus: Sequence[str],
    parallel: bool = False,
    eval_batch_size: int = 256,
    num_workers: int = 4,
) -> Dict[str, Any]:
    t0 = time.perf_counter()
    seconds = run_jobs(row.jobs, gpus, parallel, out_dir / "logs")
    results = evaluate_row(row, gpus, eval_batch_size, num_workers)
    record = {
        "row": row.name,
        "table": row.table,
        "label": row.label,
        "results": results,
        "jobs": [
            {
                "name": j.name,
                "stage": j.stage,
                "config": j.config_path.name,
                "run_dir": str(j.run_dir),
                "ran_s": round(seconds[j.name], 1) if j.name in seconds else None,
            }
            for j in row.jobs
        ],
        "gpus": list(gpus),
        "parallel": parallel,
        "wall_s": round(time.perf_counter() - t0, 1),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    path = out_dir / "rows" / f"{row.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
    tmp.replace(path)
    log.info("row %s written to %s", row.name, path)
    return record


def collect(out_dir: Path, rows: Mapping[str, Row]) -> str:
    """Table 1 and Table 2 from the rows' JSON (rows not run yet show as empty)."""
    from training.ablations import format_table2
    from training.evaluate import format_table1

    records = {}
    for path in sorted((out_dir / "rows").glob("*.json")):
        rec = json.loads(path.read_text(encoding="utf-8"))
        records[rec["row"]] = rec
    t1 = {r.label: records[n]["results"] if n in records else {} for n, r in rows.items() if r.table == 1}
    t2 = [
        (r.label, records[n]["results"].get("coco5k") if n in records else None)
        for n, r in rows.items()
        if r.table == 2
    ]
    text = "\n\n".join([format_table1(t1, "t2i"), format_table1(t1, "i2t"), "Table 2", format_table2(t2)])
    (out_dir / "tables.json").write_text(
        json.dumps({"table1": t1, "table2": dict(t2)}, indent=2), encoding="utf-8"
    )
    return text


def visible_gpus() -> List[str]:
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except Exception:
        return []


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--row", action="append", default=[], help="a row name (see --list), or all; repeatable"
    )
    parser.add_argument("--list", action="store_true", help="print the rows and their jobs")
    parser.add_argument(
        "--collect", action="store_true", help="print Table 1 and Table 2 from the rows' JSON"
    )
    parser.add_argument("--gpus", help="comma-separated GPU ids (default: every visible GPU; none: the CPU)")
    parser.add_argument("--parallel", action="store_true", help="independent jobs on separate GPUs")
    parser.add_argument("--out", type=Path, default=Path("runs/tables"), help="rows' JSON and job logs")
    parser.add_argument(
        "--weights", help="a weights folder (training.weights fetch); same as LEANCLIP_WEIGHTS"
    )
    parser.add_argument("--set", dest="set_all", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--set1", action="append", default=[], metavar="KEY=VALUE", help="stage-1 jobs only")
    parser.add_argument("--set2", action="append", default=[], metavar="KEY=VALUE", help="stage-2 jobs only")
    parser.add_argument("--eval-batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--check", action="store_true", help="only check that every input is there")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if os.environ.get("WORLD_SIZE", "1") != "1":
        parser.error("run training.table1 itself as one process: it starts torchrun for the jobs")
    if args.weights:
        from training.weights import use_weights_dir

        use_weights_dir(args.weights)
    rows = all_rows(set_all=args.set_all, set1=args.set1, set2=args.set2)
    if args.list:
        for r in rows.values():
            jobs = ", ".join(f"{j.name}{' (done)' if j.finished else ''}" for j in r.jobs)
            print(f"{r.name:<18} Table {r.table}  {r.label:<42} {jobs}")
        return 0
    if args.collect:
        print(collect(args.out, rows))
        return 0
    if not args.row:
        parser.error("give --row NAME (see --list), --row all, --list or --collect")
    names = list(rows) if "all" in args.row else args.row
    unknown = [n for n in names if n not in rows]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {', '.join(rows)}")
    chosen = [rows[n] for n in names]
    problems = missing_inputs(chosen)
    if problems:
        print(f"training.table1: {len(problems)} input(s) missing; nothing was run:", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        print(
            "(docs/training.md: python -m training.prepare, python -m training.weights fetch)",
            file=sys.stderr,
        )
        return 2
    if args.check:
        print(f"every input of {', '.join(names)} is there")
        return 0
    gpus = visible_gpus() if args.gpus is None else [g for g in args.gpus.split(",") if g.strip()]
    if args.parallel and len(chosen) > 1:  # the rows' jobs together, each job once
        seen: Dict[str, Job] = {}
        for r in chosen:
            for j in r.jobs:
                seen.setdefault(j.name, j)
        run_jobs(list(seen.values()), gpus, True, args.out / "logs")
    for r in chosen:
        record = run_row(r, args.out, gpus, args.parallel, args.eval_batch_size, args.workers)
        print(json.dumps({"row": r.name, "label": r.label, "results": record["results"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
