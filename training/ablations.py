"""Paper tables in one command each. Table 2: ablations of both stages on the image encoder
(text encoder fixed to T'); Table 1 (a config with ``steps`` and ``evaluate``): the whole
pipeline and its evaluation.

    python -m training.ablations --config training/configs/table1.yaml
    python -m training.ablations --config training/configs/table2.yaml
    torchrun --nproc_per_node 8 -m training.ablations --config training/configs/table2.yaml

The config lists the rows; each row names a stage-1 config (or ``stage1: null`` with
``stage1_loss: none``) and a stage-2 config plus overrides. Stage-1 runs shared by several rows
run once. Finished runs (their final.pt exists) are not repeated and interrupted ones resume from
their latest.pt (stage 1 and stage 2 alike), so an interrupted table resumes where it stopped;
``--eval-only`` only evaluates. Each row's best checkpoint is evaluated on the
COCO 5K test split (text-to-image R@1/5/10) and printed in the paper's Table 2 layout with the
R@1 difference from the first row.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

from training.train_utils import apply_overrides, load_config

log = logging.getLogger("training.ablations")


def format_table2(rows: Sequence[tuple[str, Mapping[str, float] | None]]) -> str:
    """rows: (label, recalls or None when not run yet). The paper's Table 2 layout."""
    lines = [
        f"{'Image':<18}| {'MSCOCO (5K)':^23} | {'Δ':^6}",
        f"{'':<18}| {'R@1':<7}{'R@5':<7}{'R@10':<9}| {'R@1':^6}",
        "-" * 52,
    ]
    reference = rows[0][1]["t2i_R@1"] if rows and rows[0][1] else None
    for i, (label, r) in enumerate(rows):
        if r is None:
            lines.append(f"{label:<18}| {'(not run)':<23} |")
            continue
        delta = "-" if i == 0 or reference is None else f"{r['t2i_R@1'] - reference:+.1f}"
        lines.append(
            f"{label:<18}| {r['t2i_R@1']:<7.1f}{r['t2i_R@5']:<7.1f}{r['t2i_R@10']:<9.1f}| {delta:^6}"
        )
    return "\n".join(lines)


def _resolve(base: Path, path: str | None) -> Path:
    """A config path as given, or relative to the table config's folder."""
    if path is None:
        raise ValueError("a table row names no config and the table has no default")
    p = Path(path)
    return p if p.is_absolute() or p.exists() else base / p


def run_table(
    config: Mapping[str, Any], config_dir: Path, eval_only: bool = False, only: Sequence[str] | None = None
) -> list[tuple[str, dict[str, float] | None]]:
    from training import stage1, stage2
    from training.data import load_paired
    from training.distributed import init_distributed
    from training.evaluate import evaluate_model
    from training.models import load_model

    info = init_distributed(config.get("device"))
    out_dir = Path(config["out_dir"])
    common1 = config.get("stage1_overrides", [])
    common2 = config.get("stage2_overrides", [])
    stage1_runs: dict[str, Path] = {}
    results: list[tuple[str, dict[str, float] | None]] = []
    pending = []  # the runs still to do, checked for their inputs before the first starts
    for row in config["rows"]:
        if eval_only or (only and row["label"] not in only):
            continue
        s1_loss = row.get("stage1_loss", "infonce")
        if not (out_dir / f"stage1_{s1_loss}" / "final.pt").is_file():
            cfg1 = load_config(_resolve(config_dir, row.get("stage1") or config["default_stage1"]), common1)
            pending.append((f"stage 1 ({s1_loss})", apply_overrides(cfg1, [f"train.loss={s1_loss}"])))
        if not (
            out_dir / (row.get("name") or row["label"].replace(" ", "_").replace("/", "_")) / "final.pt"
        ).is_file():
            pending.append(
                (
                    row["label"],
                    load_config(_resolve(config_dir, row.get("stage2") or config["default_stage2"]), common2),
                )
            )
    _fail_on_missing_inputs(pending, config)
    test = load_paired(config["test"])
    for row in config["rows"]:
        label = row["label"]
        if only and label not in only:
            continue
        run_name = row.get("name") or label.replace(" ", "_").replace("/", "_")
        # stage 1 (shared between rows with the same config and loss)
        s1_loss = row.get("stage1_loss", "infonce")
        s1_key = f"{row.get('stage1')}:{s1_loss}"
        if s1_key not in stage1_runs:
            s1_dir = out_dir / f"stage1_{s1_loss}"
            stage1_runs[s1_key] = s1_dir
            if not eval_only and not (s1_dir / "final.pt").is_file():
                cfg1 = load_config(
                    _resolve(config_dir, row.get("stage1") or config["default_stage1"]), common1
                )
                cfg1 = apply_overrides(
                    cfg1, [f"run_dir={s1_dir}", f"train.loss={s1_loss}"] + row.get("stage1_overrides", [])
                )
                latest1 = s1_dir / "latest.pt"  # an interrupted stage 1 resumes
                stage1.Stage1Trainer(cfg1, info).run(resume=latest1 if latest1.is_file() else None)
        s2_dir = out_dir / run_name
        if not eval_only and not (s2_dir / "final.pt").is_file():
            cfg2 = load_config(_resolve(config_dir, row.get("stage2") or config["default_stage2"]), common2)
            cfg2 = apply_overrides(
                cfg2,
                [f"run_dir={s2_dir}", f"model.init={stage1_runs[s1_key] / 'final.pt'}"]
                + row.get("stage2_overrides", []),
            )
            resume = s2_dir / "latest.pt"
            stage2.Stage2Trainer(cfg2, info).run(resume=resume if resume.is_file() else None)
        best = s2_dir / "best.pt"
        if not best.is_file():
            best = s2_dir / "final.pt"
        if not best.is_file():
            results.append((label, None))
            continue
        model = load_model(best).to(info.device)
        results.append(
            (
                label,
                evaluate_model(
                    model,
                    test,
                    info=info,
                    batch_size=int(config.get("eval_batch_size", 256)),
                    num_workers=int(config.get("num_workers", 4)),
                    amp=info.device.type == "cuda",
                ),
            )
        )
        if info.is_main:
            log.info(json.dumps({"row": label, **(results[-1][1] or {})}))
    return results


def run_steps_and_table1(
    config: Mapping[str, Any], config_dir: Path, eval_only: bool = False
) -> dict[str, dict[str, dict[str, float]]]:
    """Table 1: run each ``steps`` entry (stage 1 or 2 config) unless its final.pt exists, then
    evaluate every model of ``evaluate.models`` on COCO (1K 5-fold and 5K) and Flickr30k 1K.
    Every input of the steps still to run is checked before the first starts."""
    from training import stage1, stage2
    from training.distributed import init_distributed

    info = init_distributed(config.get("device"))
    pending = []
    for step in config.get("steps", []):
        cfg = load_config(_resolve(config_dir, step["config"]), step.get("overrides", []))
        if not eval_only and not (Path(cfg["run_dir"]) / "final.pt").is_file():
            pending.append((step, cfg))
    _fail_on_missing_inputs([(_resolve(config_dir, s["config"]).name, c) for s, c in pending], config)
    for step, cfg in pending:
        latest = Path(cfg["run_dir"]) / "latest.pt"
        resume = latest if latest.is_file() else None
        if int(step["stage"]) == 1:
            stage1.Stage1Trainer(cfg, info).run(resume=resume)
        else:
            stage2.Stage2Trainer(cfg, info).run(resume=resume)
    return evaluate_table1_models(
        config["evaluate"], info, int(config.get("eval_batch_size", 256)), int(config.get("num_workers", 4))
    )


def _fail_on_missing_inputs(jobs: Sequence[tuple[str, Mapping[str, Any]]], table: Mapping[str, Any]) -> None:
    """Raise before anything runs when a data file of a job still to run is missing (a missing
    CC3M tsv used to kill the Table 1 runner after hours of earlier rows)."""
    from training.data import spec_missing_files

    problems = []
    for name, cfg in jobs:
        for spec in (cfg.get("data") or {}).values():
            if isinstance(spec, Mapping):
                problems += [f"{path} (needed by {name})" for path in spec_missing_files(spec)]
    for key in ("coco", "flickr"):
        spec = (table.get("evaluate") or {}).get(key)
        if spec:
            problems += [f"{path} (needed by the {key} evaluation)" for path in spec_missing_files(spec)]
    if table.get("test"):
        problems += [f"{path} (needed by the evaluation)" for path in spec_missing_files(table["test"])]
    if problems:
        raise FileNotFoundError(
            "missing inputs, nothing was run (see docs/training.md, python -m training.prepare):\n  "
            + "\n  ".join(dict.fromkeys(problems))
        )


def evaluate_table1_models(
    ev: Mapping[str, Any], info: Any, batch_size: int = 256, num_workers: int = 4
) -> dict[str, dict[str, dict[str, float]]]:
    """Every model of ``ev["models"]`` (label -> {coco|flickr: checkpoint or open_clip:NAME:TAG})
    on COCO (5K and 1K 5-fold) and Flickr30k 1K; a checkpoint not there leaves its cells empty."""
    from training.data import load_paired
    from training.evaluate import _load_for_eval, embed_corpus, fold_recalls, retrieval_recalls

    corpora = {name: load_paired(ev[name]) for name in ("coco", "flickr") if ev.get(name)}
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for label, sources in ev["models"].items():
        rows[label] = {}
        for name, corpus in corpora.items():
            if name not in sources:
                continue
            source = str(sources[name])
            if not source.startswith("open_clip:") and not Path(source).is_file():
                log.warning("%s: %s not found, row left empty", label, source)
                continue
            model = _load_for_eval(f"{label}={source}")[1].to(info.device).eval()
            images, texts, valid = embed_corpus(
                model, corpus, info, batch_size, num_workers, amp=info.device.type == "cuda"
            )
            if name == "coco":
                rows[label]["coco5k"] = retrieval_recalls(
                    images, texts, corpus.caption_image, image_valid=valid
                )
                rows[label]["coco1k"] = fold_recalls(images, texts, corpus, 5, valid)
            else:
                rows[label]["flickr1k"] = retrieval_recalls(
                    images, texts, corpus.caption_image, image_valid=valid
                )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--eval-only", action="store_true")
    parser.add_argument("--row", action="append", help="run only these row labels")
    parser.add_argument("--json-out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = load_config(args.config, args.overrides)
    from training.distributed import init_distributed

    is_main = init_distributed(config.get("device")).is_main  # under torchrun: print and write once
    if "steps" in config or "evaluate" in config:  # Table 1 pipeline
        from training.evaluate import format_table1

        table1 = run_steps_and_table1(config, Path(args.config).parent, args.eval_only)
        if is_main:
            print(format_table1(table1, "t2i"))
            print()
            print(format_table1(table1, "i2t"))
            if args.json_out:
                Path(args.json_out).write_text(json.dumps(table1, indent=2))
        return 0
    results = run_table(config, Path(args.config).parent, args.eval_only, args.row)
    if is_main:
        print(format_table2(results))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(dict(results), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
