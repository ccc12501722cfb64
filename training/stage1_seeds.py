"""Stage 1 with seeds (issue 30): is intra-modal InfoNCE better than MSE for a 2-layer MiniLM student?

    nice -n 10 python -m training.stage1_seeds --config training/configs/stage1_minilm_seeds.yaml

The grid (rows x seeds, steps, data) is fixed in the config before any run. Each finished run is
written into ``results_md`` at once (a per-run table, the summary of means and spreads, and how
many runs remain), so the grid can be finished over several sessions: running the command again
skips the runs the file already holds and resumes an interrupted run from its checkpoint.

Everything else is :mod:`training.minilm_stage1`'s: the corpus and its held-out split, the 2-layer
student cut from the teacher, the teacher's embeddings of the training split (computed once and
cached on disk), the metrics. Per run the seed sets the batch order and the dropout; the
student's initialisation (the teacher's layers) is the same for every seed.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from leanclip.minilm import (
    MiniLMTextTower,
    embed_texts,
    load_minilm,
    load_minilm_tokenizer_json,
    make_tokenizer,
)
from training import minilm_stage1 as s1
from training.report import cpu_model, markdown_table

log = logging.getLogger("stage1_seeds")

BEGIN = "<!-- stage1-seeds:begin (written by training/stage1_seeds.py; edits inside are overwritten) -->"
END = "<!-- stage1-seeds:end -->"
RUNS_TAG = "<!-- stage1-seeds:runs "

METRICS = ("agreement@10", "heldout_r1", "heldout_r5", "tuning_r1", "tuning_r5")


def resolve(config: Dict[str, Any]) -> Dict[str, Any]:
    known = {
        "corpus_file",
        "recipe",
        "out_dir",
        "cache_dir",
        "threads",
        "student_layers",
        "rows",
        "seeds",
        "data",
        "train",
        "results_md",
        "command",
        "data_seed",
        "captions",
    }
    unknown = set(config) - known
    if unknown:
        raise ValueError(f"unknown stage1_seeds config keys: {sorted(unknown)} (known: {sorted(known)})")
    cfg = dict(config)
    cfg["data"] = s1._merge(s1.DEFAULTS["data"], config.get("data", {}))
    cfg["train"] = s1._merge(s1.DEFAULTS["train"], config.get("train", {}))
    cfg.setdefault("data_seed", 0)
    cfg.setdefault("threads", 1)
    cfg.setdefault("student_layers", 2)
    cfg.setdefault("captions", True)
    for key in ("rows", "seeds", "out_dir", "results_md"):
        if not cfg.get(key):
            raise ValueError(f"stage1_seeds config needs {key!r}")
    names = [r["name"] for r in cfg["rows"]]
    if len(set(names)) != len(names):
        raise ValueError(f"row names must be unique: {names}")
    for r in cfg["rows"]:
        if r.get("loss") not in ("mse", "infonce"):
            raise ValueError(f"row {r.get('name')!r}: loss must be mse or infonce, got {r.get('loss')!r}")
        if r.get("learn_temperature") and r["loss"] != "infonce":
            raise ValueError(f"row {r['name']!r}: learn_temperature needs loss infonce")
    return cfg


# ---------------------------------------------------------------------------------------------
# The results file: the runner's record of finished runs (and how it resumes)


def read_runs(path: Path) -> List[Dict[str, Any]]:
    """The finished runs recorded in ``path`` (one JSON list in an HTML comment of the section)."""
    if not path.is_file():
        return []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith(RUNS_TAG):
            return list(json.loads(line[len(RUNS_TAG) : -len("-->")].strip()))
    return []


def _mean_spread(values: Sequence[float], fmt: str = ".3f") -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def verdict(cfg: Dict[str, Any], runs: Sequence[Dict[str, Any]]) -> str:
    """One sentence: does each InfoNCE row beat MSE by more than the spread (sample std) of either?"""
    by_row = {r["name"]: [x for x in runs if x["row"] == r["name"]] for r in cfg["rows"]}
    mse = [r["name"] for r in cfg["rows"] if r["loss"] == "mse"]
    nce = [r["name"] for r in cfg["rows"] if r["loss"] == "infonce"]
    if not mse or any(len(by_row[n]) < len(cfg["seeds"]) for n in by_row):
        return "No verdict yet: the grid is not complete."
    base = mse[0]
    parts = []
    for name in nce:
        clauses = []
        for metric in [m for m in ("agreement@10", "heldout_r1") if all(m in x for x in runs)]:
            a = [x[metric] for x in by_row[name]]
            b = [x[metric] for x in by_row[base]]
            diff = statistics.mean(a) - statistics.mean(b)
            spread = max(statistics.stdev(a), statistics.stdev(b))
            word = "beats" if diff > spread else "loses to" if -diff > spread else "is within the spread of"
            clauses.append(f"{word} {base} on {metric} ({diff:+.3f} against a spread of {spread:.3f})")
        parts.append(f"{name} " + " and ".join(clauses))
    return "; ".join(parts) + "."


def _method_lines(cfg: Dict[str, Any], n_done: int, context: Dict[str, Any]) -> List[str]:
    """The section's title and how the grid is run and measured."""
    tr = cfg["train"]
    total = len(cfg["rows"]) * len(cfg["seeds"])
    return [
        BEGIN,
        "## Stage 1 with seeds (issue 30): 2-layer student, MSE vs InfoNCE, 3 seeds",
        "",
        f"- command: `{cfg.get('command') or 'python -m training.stage1_seeds'}` (skips finished runs, "
        "resumes an interrupted one from its checkpoint)",
        "- grid (fixed in `training/configs/stage1_minilm_seeds.yaml` before the first run): rows "
        + ", ".join(f"`{r['name']}`" for r in cfg["rows"])
        + f" x seeds {list(cfg['seeds'])} = {total} runs; **{n_done} done, {total - n_done} remaining**",
        f"- student: {cfg['student_layers']} layers {context.get('layers', '')} of MiniLM-L6 (embeddings + those "
        "teacher layers, all trained; the same initialisation for every seed; the seed sets batch order and dropout)",
        f"- training: {tr['steps']} steps x batch {tr['batch_size']} = {tr['steps'] * tr['batch_size']:,} sentences "
        f"drawn from the whole training split ({context.get('train', 0):,} sentences, reshuffled per seed), "
        f"AdamW lr {tr['lr']} wd {tr['weight_decay']}, cosine with warm-up (10% of steps), max {tr['max_tokens']} "
        "tokens; the teacher's embeddings of the split computed once and cached; learned temperature = "
        "log(1/tau) trained with the student (no weight decay, 1/tau <= 100), as in CLIP",
        f"- data: {context.get('corpus', '')}",
        f"- machine: {cpu_model()} ({context.get('cores', '?')} cores shared with other sessions), torch "
        f"{torch.__version__}, {cfg['threads']} thread(s), `nice -n 10`",
        "- agreement@10: mean recall of each held-out sentence's teacher top-10 neighbours among the student's top-10 "
        f"({context.get('heldout', '?')} held-out sentences, never trained on)",
        "- held-out R@1/R@5: text-to-image on the sample photos with the starter's image tower (teacher space), the "
        "48 queries of `benchmarks/data/heldout_queries.json` encoded by the student (one query = 0.021); "
        "tuning R@1/R@5: the same on the 36 captions of `benchmarks/data/sample_captions.json` (0.028 each)",
        "- spread = sample standard deviation over the seeds",
        "",
        "### Summary (mean ± spread over seeds)",
        "",
    ]


def _summary_table(cfg: Dict[str, Any], runs: Sequence[Dict[str, Any]], context: Dict[str, Any]) -> str:
    """The references, then each row's mean ± spread over its finished seeds."""
    tr = cfg["train"]
    header = [
        "row",
        "runs",
        "agreement@10",
        "held-out R@1",
        "held-out R@5",
        "tuning R@1",
        "tuning R@5",
        "final loss",
        "final tau",
    ]
    rows: List[List[Any]] = []
    for ref in context.get("references", []):
        rows.append(
            [
                ref["name"],
                "-",
                f"{ref['agreement@10']:.3f}",
                f"{ref.get('heldout_r1', float('nan')):.3f}",
                f"{ref.get('heldout_r5', float('nan')):.3f}",
                f"{ref.get('tuning_r1', float('nan')):.3f}",
                f"{ref.get('tuning_r5', float('nan')):.3f}",
                "-",
                "-",
            ]
        )
    for r in cfg["rows"]:
        mine = [x for x in runs if x["row"] == r["name"]]
        taus = [x["final_temperature"] for x in mine if x.get("final_temperature") is not None]
        rows.append(
            [r["name"], f"{len(mine)}/{len(cfg['seeds'])}"]
            + [_mean_spread([x[m] for x in mine if m in x]) for m in METRICS]
            + [
                _mean_spread([x["final_loss"] for x in mine], ".3g") if mine else "-",
                _mean_spread(taus)
                if taus
                else (
                    "-"
                    if r["loss"] != "infonce"
                    else f"learned from {r.get('temperature', tr['temperature'])}"
                    if r.get("learn_temperature")
                    else f"{r.get('temperature', tr['temperature'])} (fixed)"
                ),
            ]
        )
    return markdown_table(header, rows)


def _runs_table(runs: Sequence[Dict[str, Any]]) -> str:
    """One row per finished run."""
    run_header = [
        "row",
        "seed",
        "agreement@10",
        "held-out R@1",
        "held-out R@5",
        "tuning R@1",
        "tuning R@5",
        "final loss",
        "final tau",
        "train s",
        "finished (UTC)",
    ]
    run_rows = [
        [x["row"], x["seed"]]
        + [f"{x[m]:.3f}" if m in x else "-" for m in METRICS]
        + [
            f"{x['final_loss']:.3g}",
            f"{x['final_temperature']:.4f}" if x.get("final_temperature") else "-",
            f"{x['train_s']:.0f}",
            x["finished"],
        ]
        for x in runs
    ]
    return markdown_table(run_header, run_rows)


def render(cfg: Dict[str, Any], runs: Sequence[Dict[str, Any]], context: Dict[str, Any]) -> str:
    total = len(cfg["rows"]) * len(cfg["seeds"])
    remaining = total - len(runs)
    lines = _method_lines(cfg, len(runs), context)
    lines.append(_summary_table(cfg, runs, context))
    lines += ["", f"**Verdict:** {verdict(cfg, runs)}", "", "### Runs", ""]
    lines.append(_runs_table(runs))
    if remaining:
        lines += ["", f"{remaining} of {total} runs remain; running the command again finishes them."]
    lines += ["", RUNS_TAG + json.dumps(list(runs), sort_keys=True) + " -->", END]
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    """Replace the runner's section of ``path`` (or put it first, keeping what was there below)."""
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        title = "# Stage 1 on real weights: MiniLM-L6 teacher, text students\n\n"
        body = text[text.index("\n") + 1 :].lstrip("\n") if text.startswith("# ") else text
        if body:
            body = "\n\n## Earlier: one seed, 120 steps (issue 18)\n\n" + body.replace("\n# ", "\n## ")
        text = title + section + "\n" + body
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------
# The grid


def corpus_digest(corpus: s1.Corpus) -> str:
    h = hashlib.sha256()
    for part in (corpus.train, corpus.heldout):
        for t in part:
            h.update(t.encode("utf-8") + b"\0")
        h.update(b"\1")
    return h.hexdigest()[:12]


def frozen_corpus(cfg: Dict[str, Any]) -> s1.Corpus:
    """The corpus of the grid: read from ``corpus_file`` when it exists, else built (from this
    machine's apt / dpkg / stdlib text, which changes as packages are installed) and written there,
    so every run of the grid, in any session, trains and tests on the same sentences."""
    path = s1._path(cfg["corpus_file"]) if cfg.get("corpus_file") else None
    if path is not None and path.is_file():
        with gzip.open(path, "rt", encoding="utf-8") as f:
            doc = json.load(f)
        return s1.Corpus(doc["train"], doc["heldout"], doc["info"])
    corpus = s1.build_corpus(cfg["data"], int(cfg["data_seed"]))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(path, "wt", encoding="utf-8") as f:
            json.dump({"train": corpus.train, "heldout": corpus.heldout, "info": corpus.info}, f)
    return corpus


@dataclass
class _Grid:
    """What every run of the grid shares: the frozen teacher, the data and its teacher targets."""

    cfg: Dict[str, Any]
    out_dir: Path
    teacher: MiniLMTextTower
    tokenizer: Any
    corpus: s1.Corpus
    digest: str  # corpus_digest(corpus), recorded with each run
    targets: torch.Tensor  # the teacher's embeddings of corpus.train
    layers: List[int]  # the teacher layers the student keeps
    evaluate: Callable[[nn.Module], Dict[str, float]]


def _prepare(
    cfg: Dict[str, Any],
    runs: Sequence[Dict[str, Any]],
    md: Path,
    teacher: Optional[MiniLMTextTower],
    tokenizer_json: Optional[str],
) -> _Grid:
    """Freeze the teacher, read the grid's corpus (refusing one the finished runs did not use),
    and compute what training and evaluation need from the teacher."""
    out_dir = s1._path(cfg["out_dir"])
    teacher = (teacher if teacher is not None else load_minilm()).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    tokenizer = make_tokenizer(
        tokenizer_json if tokenizer_json is not None else load_minilm_tokenizer_json(),
        int(cfg["train"]["max_tokens"]),
    )
    corpus = frozen_corpus(cfg)
    digest = corpus_digest(corpus)
    mixed = sorted({x.get("corpus") for x in runs} - {digest})
    if mixed:
        raise ValueError(
            f"{md} holds runs on another corpus ({mixed}) than this one ({digest}): the grid cannot mix "
            "them; restore its corpus_file, or move the file aside to start a new grid"
        )
    log.info("corpus %s (%s)", corpus.info, digest)
    tag = f"{teacher.config.to_dict()}|{cfg['train']['max_tokens']}|{s1.param_count(teacher)}"
    cache_dir = s1._path(cfg["cache_dir"]) if cfg.get("cache_dir") else None
    targets = s1.teacher_embeddings(teacher, tokenizer, corpus.train, cache_dir, tag)
    held_teacher = embed_texts(teacher, tokenizer, corpus.heldout)
    layers = s1.student_layers(teacher.config.num_hidden_layers, int(cfg["student_layers"]))
    captions = (
        s1.caption_eval_sets(teacher, tokenizer, out_dir / "photos", s1.CAPTION_SETS)
        if cfg["captions"]
        else {}
    )

    def evaluate(tower: nn.Module) -> Dict[str, float]:
        res = {
            "agreement@10": s1.neighbour_agreement(
                embed_texts(tower, tokenizer, corpus.heldout), held_teacher, 10
            )
        }
        for name, ev in captions.items():
            res[f"{name}_r1"], res[f"{name}_r5"] = s1.caption_recall(tower, tokenizer, ev)
        return res

    return _Grid(cfg, out_dir, teacher, tokenizer, corpus, digest, targets, layers, evaluate)


def _context(g: _Grid) -> Dict[str, Any]:
    """What render() says about the grid beyond its config, with the teacher and the untrained
    student as references."""
    import os

    return {
        "layers": g.layers,
        "train": len(g.corpus.train),
        "heldout": len(g.corpus.heldout),
        "corpus": g.corpus.info,
        "cores": os.cpu_count(),
        "references": [
            {"name": f"teacher ({g.teacher.config.num_hidden_layers} layers)", **g.evaluate(g.teacher)},
            {
                "name": f"student {len(g.layers)} layers {g.layers}, no stage 1",
                **g.evaluate(s1.truncate_layers(g.teacher, g.layers)),
            },
        ],
    }


def _train_one(g: _Grid, row: Dict[str, Any], seed: int) -> Dict[str, Any]:
    """Train one (row, seed) of the grid (resuming from its checkpoint) and evaluate it."""
    torch.manual_seed(seed)
    student = s1.truncate_layers(g.teacher, g.layers)
    for p in student.parameters():
        p.requires_grad_(True)
    train = dict(g.cfg["train"])
    if "temperature" in row:
        train["temperature"] = row["temperature"]
    slug = "".join(c if c.isalnum() else "_" for c in row["name"])
    t0 = time.perf_counter()
    history = s1.distill(
        student,
        g.tokenizer,
        g.corpus.train,
        g.targets,
        row["loss"],
        train,
        seed,
        learn_temperature=bool(row.get("learn_temperature")),
        checkpoint=g.out_dir / f"ckpt_{slug}_seed{seed}.pt",
    )
    return {
        "row": row["name"],
        "seed": seed,
        "steps": int(train["steps"]),
        "train_s": round(time.perf_counter() - t0, 1),
        "final_loss": history[-1]["loss"],
        "final_temperature": history[-1].get("temperature"),
        "finished": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "corpus": g.digest,
        **g.evaluate(student),
    }


def run_grid(
    config: Dict[str, Any],
    teacher: Optional[MiniLMTextTower] = None,
    tokenizer_json: Optional[str] = None,
    max_runs: Optional[int] = None,
) -> List[Dict[str, Any]]:
    """Run the grid's missing runs (at most ``max_runs``); returns every finished run.

    ``teacher``/``tokenizer_json`` default to the packaged MiniLM; tests pass tiny stand-ins."""
    cfg = resolve(config)
    torch.set_num_threads(int(cfg["threads"]))
    out_dir = s1._path(cfg["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    md = s1._path(cfg["results_md"])
    runs = read_runs(md)
    done = {(x["row"], x["seed"]) for x in runs}
    todo = [(r, seed) for seed in cfg["seeds"] for r in cfg["rows"] if (r["name"], seed) not in done]
    log.info("%d runs finished, %d to do", len(runs), len(todo))
    if not todo:
        return runs

    g = _prepare(cfg, runs, md, teacher, tokenizer_json)
    context = _context(g)
    write_section(md, render(cfg, runs, context))
    for n, (row, seed) in enumerate(todo):
        if max_runs is not None and n >= max_runs:
            break
        result = _train_one(g, row, seed)
        log.info("finished %s", result)
        runs.append(result)
        write_section(md, render(cfg, runs, context))
    return runs


def main(argv: Optional[Sequence[str]] = None) -> int:
    from training.train_utils import load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(s1.ROOT / "training/configs/stage1_minilm_seeds.yaml"))
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    parser.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    runs = run_grid(load_config(args.config, args.overrides), max_runs=args.max_runs)
    print(f"{len(runs)} runs finished")
    return 0


if __name__ == "__main__":
    sys.exit(main())
