"""Stage 1 of the paper on real weights: intra-modal contrastive KD of MiniLM-L6 into 2/3 layers.

    python -m training.stage1 --config training/configs/stage1_minilm_ablation.yaml

(``training.stage1`` hands configs with ``recipe: minilm_text`` to :func:`main`; ``python -m
training.minilm_stage1 --config ...`` does the same.)

* Teacher: all-MiniLM-L6-v2 (:mod:`leanclip.minilm`), frozen. Students: ``k`` of its layers
  (embeddings copied, layers picked evenly from first to last, e.g. 2 -> [0, 5], 3 -> [0, 2, 5]),
  as the paper initialises its shallower text students from the teacher's layers.
* Losses (Table 2's stage-1 ablation): ``infonce`` = eq. 3, ``training.losses.intra_modal_infonce``
  (student embedding i must pick the teacher's embedding of sentence i among the batch's);
  ``mse`` = ``training.losses.embedding_mse`` between normalised embeddings; ``none`` = the
  truncated student as initialised. The teacher's embeddings of the training sentences are
  computed once and cached (it is frozen), which halves the CPU cost per step.
* Data: unpaired real English text available offline. Debian package descriptions (short
  descriptions of the whole archive from ``apt-cache dumpavail``; short and long descriptions of
  the installed packages from ``/var/lib/dpkg/status``) and the docstrings of Python's standard
  library (parsed with ``ast``, nothing imported), split into sentences, de-duplicated
  (case-insensitive). Held-out split: a sentence is held out when the first bytes of
  sha1(lower-cased sentence) fall under ``heldout_fraction``, so the split does not depend on
  order or on which sources were available, and no held-out sentence is trained on.
* Metrics on held-out sentences: agreement with the teacher = mean recall@10 of each sentence's
  teacher top-10 neighbours (itself excluded) among the student's top-10; and the starter
  bundle's text-to-image R@1/R@5 on the captioned sample photos when the student encodes the
  captions while the images keep the starter's (teacher-space) image tower. Size and text QPS of
  each student relative to the teacher (one run, same process).
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from leanclip.minilm import (
    DEFAULT_CONTEXT_LENGTH,
    MiniLMTextTower,
    embed_texts,
    load_minilm,
    load_minilm_tokenizer_json,
    make_tokenizer,
    student_layers,
    tokenize,
    truncate_layers,
)
from training.report import cpu_model, markdown_table

log = logging.getLogger("minilm_stage1")

ROOT = Path(__file__).resolve().parents[1]
LOSSES = ("infonce", "mse", "none")

DEFAULTS: Dict[str, Any] = {
    "out_dir": "runs/stage1_minilm",
    "cache_dir": "runs/stage1_minilm/cache",  # teacher embeddings, shared by the configs
    "seed": 0,
    "threads": 2,
    "students": [2, 3],  # numbers of teacher layers kept
    "losses": ["infonce"],  # any of infonce / mse / none
    "data": {
        "sources": ["apt", "dpkg", "pydoc"],  # and/or "files"
        "files": [],  # plain-text files (one or more sentences per line) for the "files" source
        "heldout_fraction": 0.05,
        "max_train": 60000,
        "max_heldout": 2000,
        "min_words": 4,
        "max_words": 40,
    },
    "train": {
        "steps": 600,
        "batch_size": 84,  # the paper's stage-1 batch size
        "lr": 3.0e-4,  # the paper's
        "weight_decay": 0.1,  # the paper's
        "warmup_steps": 10000,  # the paper's; scaled down to 10% of a short run
        "temperature": 0.05,  # tau of eq. 3 (not given in the paper)
        "max_tokens": DEFAULT_CONTEXT_LENGTH,
        "log_every": 50,
    },
    "eval": {"k": 10, "qps_sentences": 512, "qps_batch": 64, "captions": True},
    "results_md": None,  # e.g. benchmarks/results/stage1_minilm.md
    "merge_results": [],  # results.json of earlier runs whose rows the table shows first
    "command": None,  # recorded in the results table
}


# ---------------------------------------------------------------------------------------------
# Corpus


_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z(\"'])")
_BAD = re.compile(r">>>|::|\$ |\\\\|[{}<>|=_#@]|https?://|\.\.\.")


def split_sentences(text: str) -> List[str]:
    text = " ".join(text.split())
    return [s.strip() for s in _SENTENCE_SPLIT.split(text) if s.strip()]


def is_prose(sentence: str, min_words: int, max_words: int) -> bool:
    """Plain English prose: a word count in range, mostly letters, no code or markup."""
    words = sentence.split()
    if not min_words <= len(words) <= max_words or _BAD.search(sentence):
        return False
    letters = sum(c.isalpha() for c in sentence)
    if letters < 0.7 * len(sentence.replace(" ", "")):
        return False
    return sum(w.isalpha() and len(w) > 2 for w in words) >= 0.5 * len(words)


def _deb822_descriptions(text: str, long: bool) -> Iterable[str]:
    """Descriptions of a Packages/status file: the synopsis, and with ``long`` the body."""
    for stanza in text.split("\n\n"):
        lines = stanza.split("\n")
        for i, line in enumerate(lines):
            if line.startswith("Description:"):
                yield line[len("Description:") :].strip()
                if long:
                    body = []
                    for cont in lines[i + 1 :]:
                        if not cont.startswith(" "):
                            break
                        cont = cont[1:]
                        body.append("" if cont.strip() == "." else cont)
                    for para in "\n".join(body).split("\n\n"):
                        # list items and indented blocks are not prose
                        if para.strip() and not para.lstrip().startswith(("*", "-", "+", "o ")):
                            yield para
                break


def apt_descriptions() -> List[str]:
    """Synopses of every package apt knows (Debian keeps long descriptions in Translation files)."""
    if shutil.which("apt-cache") is None:
        return []
    try:
        text = subprocess.run(
            ["apt-cache", "dumpavail"], capture_output=True, text=True, check=True, timeout=300
        ).stdout
    except (subprocess.SubprocessError, OSError) as exc:
        log.warning("apt-cache dumpavail failed (%s); skipping the apt source", exc)
        return []
    return list(_deb822_descriptions(text, long=False))


def dpkg_descriptions(path: Path = Path("/var/lib/dpkg/status")) -> List[str]:
    if not path.is_file():
        return []
    return list(_deb822_descriptions(path.read_text(encoding="utf-8", errors="replace"), long=True))


def stdlib_docstrings(max_files: Optional[int] = None) -> List[str]:
    """First paragraphs of module/class/function docstrings of the stdlib (parsed, not imported)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo"}
    files = sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))
    out: List[str] = []
    for path in files[:max_files]:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    out.append(doc.split("\n\n")[0])
    return out


def is_heldout(sentence: str, fraction: float) -> bool:
    digest = hashlib.sha1(sentence.lower().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


@dataclass
class Corpus:
    train: List[str]
    heldout: List[str]
    info: Dict[str, Any] = field(default_factory=dict)


def build_corpus(data: Dict[str, Any], seed: int) -> Corpus:
    def files() -> List[str]:
        out: List[str] = []
        for f in data.get("files") or []:
            out += Path(f).read_text(encoding="utf-8").splitlines()
        return out

    readers = {"apt": apt_descriptions, "dpkg": dpkg_descriptions, "pydoc": stdlib_docstrings, "files": files}
    unknown = set(data["sources"]) - set(readers)
    if unknown:
        raise ValueError(f"unknown data sources {sorted(unknown)} (known: {sorted(readers)})")
    seen: set = set()
    sentences: List[str] = []
    counts: Dict[str, int] = {}
    for source in data["sources"]:
        n = 0
        for text in readers[source]():
            for s in split_sentences(text):
                key = s.lower()
                if key in seen or not is_prose(s, data["min_words"], data["max_words"]):
                    continue
                seen.add(key)
                sentences.append(s)
                n += 1
        counts[source] = n
    if not sentences:
        raise RuntimeError(f"no sentences from sources {data['sources']}")
    frac = float(data["heldout_fraction"])
    train = [s for s in sentences if not is_heldout(s, frac)]
    heldout = [s for s in sentences if is_heldout(s, frac)]
    rng = np.random.default_rng(seed)
    train = [train[i] for i in rng.permutation(len(train))][: data["max_train"]]
    heldout = [heldout[i] for i in rng.permutation(len(heldout))][: data["max_heldout"]]
    info = {
        "sentences_per_source": counts,
        "total_unique": len(sentences),
        "train": len(train),
        "heldout": len(heldout),
        "heldout_rule": f"sha1(lower(sentence))[:8] / 2^64 < {frac}",
    }
    return Corpus(train, heldout, info)


# ---------------------------------------------------------------------------------------------
# Students, training


def _texts_digest(texts: Sequence[str], extra: str) -> str:
    h = hashlib.sha256(extra.encode())
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def teacher_embeddings(
    teacher: nn.Module, tokenizer: Any, texts: Sequence[str], cache_dir: Optional[Path], tag: str
) -> torch.Tensor:
    """The frozen teacher's normalised embeddings of ``texts``, cached on disk under ``cache_dir``."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"teacher-{_texts_digest(texts, tag)}.pt"
        if path.is_file():
            return torch.load(path, weights_only=True)
    t0 = time.perf_counter()
    emb = embed_texts(teacher, tokenizer, list(texts), batch_size=128)
    log.info("teacher embedded %d sentences in %.0fs", len(texts), time.perf_counter() - t0)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(emb, path)
    return emb


@dataclass
class _DistillState:
    """Everything a distillation run carries from step to step: what its checkpoint holds."""

    student: MiniLMTextTower
    optimizer: torch.optim.Optimizer
    scheduler: Any
    gen: torch.Generator  # draws the batch order
    order: torch.Tensor  # this epoch's order of the texts
    logit_scale: Optional[nn.Parameter]  # log(1/tau) when the temperature is learned
    batch: int  # texts per step
    pos: int = 0  # next position in order
    step: int = 0  # steps done
    history: List[Dict[str, float]] = field(default_factory=list)

    def save(self, checkpoint: Path) -> None:
        state = {
            "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "gen": self.gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "order": self.order,
            "pos": self.pos,
            "step": self.step,
            "history": self.history,
            "logit_scale": None if self.logit_scale is None else self.logit_scale.detach().clone(),
        }
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = checkpoint.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, checkpoint)  # a kill mid-save leaves the previous checkpoint

    def restore(self, checkpoint: Path) -> None:
        state = torch.load(checkpoint, weights_only=False)
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.gen.set_state(state["gen"])
        torch.set_rng_state(state["torch_rng"])
        self.order, self.pos, self.step, self.history = (
            state["order"],
            state["pos"],
            state["step"],
            state["history"],
        )
        if self.logit_scale is not None:
            with torch.no_grad():
                self.logit_scale.copy_(state["logit_scale"])

    def next_batch(self) -> torch.Tensor:
        """The indices of the next batch, reshuffled at the start of each epoch."""
        if self.pos + self.batch > len(self.order):  # next epoch
            self.order, self.pos = torch.randperm(len(self.order), generator=self.gen), 0
        idx = self.order[self.pos : self.pos + self.batch]
        self.pos += self.batch
        return idx


def _start_distill(
    student: MiniLMTextTower, n_texts: int, train: Dict[str, Any], seed: int, learn_temperature: bool
) -> _DistillState:
    """A fresh run's state: optimizer, warm-up + cosine schedule, seeded batch order."""
    from training.train_utils import cosine_with_warmup, make_optimizer, scaled_warmup

    steps = int(train["steps"])
    params = list(student.named_parameters())
    logit_scale = None
    if learn_temperature:
        logit_scale = nn.Parameter(torch.tensor(float(np.log(1.0 / float(train["temperature"])))))
        params.append(("logit_scale", logit_scale))
    optimizer = make_optimizer(params, float(train["lr"]), float(train["weight_decay"]))
    scheduler = cosine_with_warmup(optimizer, scaled_warmup(int(train["warmup_steps"]), steps), steps)
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_texts, generator=gen)
    return _DistillState(student, optimizer, scheduler, gen, order, logit_scale, int(train["batch_size"]))


def distill(
    student: MiniLMTextTower,
    tokenizer: Any,
    texts: Sequence[str],
    targets: torch.Tensor,
    loss_name: str,
    train: Dict[str, Any],
    seed: int,
    learn_temperature: bool = False,
    checkpoint: Optional[Path] = None,
    checkpoint_every: int = 100,
) -> List[Dict[str, float]]:
    """Train ``student`` towards the teacher embeddings ``targets`` of ``texts``; returns the log.

    ``learn_temperature`` (InfoNCE only) trains tau as CLIP does: a log(1/tau) scalar starting at
    ``train["temperature"]``, no weight decay, 1/tau clamped at 100. With ``checkpoint`` the run
    saves its whole state there every ``checkpoint_every`` steps and picks up from it when
    started again (batch order, dropout RNG and optimizer included), then deletes it."""
    from training.losses import embedding_mse, intra_modal_infonce, intra_modal_infonce_learned, temperature

    if loss_name not in ("infonce", "mse"):
        raise ValueError(f"loss must be infonce or mse to train, got {loss_name!r}")
    if learn_temperature and loss_name != "infonce":
        raise ValueError("a learned temperature needs the infonce loss")
    steps = int(train["steps"])
    run = _start_distill(student, len(texts), train, seed, learn_temperature)
    if checkpoint is not None and checkpoint.is_file():
        run.restore(checkpoint)
        log.info("%s resumed at step %d/%d from %s", loss_name, run.step, steps, checkpoint)
    student.train()
    t0 = time.perf_counter()
    for step in range(run.step, steps):
        idx = run.next_batch()
        ids, mask = tokenize(tokenizer, [texts[i] for i in idx.tolist()])
        out = student(ids, mask)
        if run.logit_scale is not None:
            loss = intra_modal_infonce_learned(out, targets[idx], run.logit_scale)
        elif loss_name == "infonce":
            loss = intra_modal_infonce(out, targets[idx], float(train["temperature"]))
        else:
            loss = embedding_mse(out, targets[idx])
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        run.scheduler.step()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{loss_name} loss became {loss.item()} at step {step}")
        with torch.no_grad():
            cos = F.cosine_similarity(out.detach(), targets[idx]).mean().item()
        entry = {"step": step + 1, "loss": float(loss.item()), "cos_to_teacher": cos}
        if run.logit_scale is not None:
            entry["temperature"] = temperature(run.logit_scale)
        run.history.append(entry)
        run.step = step + 1
        if (step + 1) % int(train["log_every"]) == 0 or step + 1 == steps:
            log.info(
                "%s step %d/%d loss %.4f cos %.3f (%.1fs)",
                loss_name,
                step + 1,
                steps,
                loss.item(),
                cos,
                time.perf_counter() - t0,
            )
        if checkpoint is not None and (step + 1) % checkpoint_every == 0 and step + 1 < steps:
            run.save(checkpoint)
    if checkpoint is not None and checkpoint.is_file():
        checkpoint.unlink()
    student.eval()
    return run.history


# ---------------------------------------------------------------------------------------------
# Metrics


def neighbour_agreement(student: torch.Tensor, teacher: torch.Tensor, k: int = 10) -> float:
    """Mean recall@k of each item's teacher top-k neighbours (itself excluded) in the student's top-k."""
    n = teacher.shape[0]
    if n <= k:
        raise ValueError(f"need more than k={k} items, got {n}")
    eye = torch.eye(n, dtype=torch.bool)
    t = (teacher @ teacher.T).masked_fill(eye, float("-inf")).topk(k, dim=1).indices
    s = (student @ student.T).masked_fill(eye, float("-inf")).topk(k, dim=1).indices
    hits = (t.unsqueeze(2) == s.unsqueeze(1)).any(dim=2).float().sum(dim=1)
    return float((hits / k).mean())


@dataclass
class CaptionEval:
    image_embeds: torch.Tensor  # (photos, d), the starter image tower's
    texts: List[str]
    targets: torch.Tensor


CAPTION_SETS = {
    "tuning": ROOT / "benchmarks/data/sample_captions.json",  # 36 captions, used to tune the starter
    "heldout": ROOT / "benchmarks/data/heldout_queries.json",  # 48 queries, never tuned on
}


def caption_eval_sets(
    teacher: nn.Module, tokenizer: Any, photo_dir: Path, files: Dict[str, Path]
) -> Dict[str, CaptionEval]:
    """Per named json file of captions (``{"captions"|"queries": {photo: [text, ...]}}``): the
    starter image tower's embeddings of the sample photos (teacher text space) and the targets."""
    from leanclip.encoder import preprocess_image
    from leanclip.images import load_image
    from leanclip.samples import collect_sample_photos
    from leanclip.starter import (
        DEFAULT_TEMPERATURE,
        DEFAULT_TEMPLATES,
        EFFICIENTNET_MEAN,
        EFFICIENTNET_STD,
        IMAGE_SIZE,
        class_text_embeddings,
        imagenet_classnames,
        load_efficientnet_lite0,
    )
    from leanclip.towers import ZeroShotImageTower

    photos = collect_sample_photos(photo_dir)
    class_embeds = class_text_embeddings(teacher, tokenizer, list(imagenet_classnames()), DEFAULT_TEMPLATES)
    tower = ZeroShotImageTower(load_efficientnet_lite0(), class_embeds, DEFAULT_TEMPERATURE).eval()
    pixels = np.stack(
        [
            preprocess_image(load_image(p), IMAGE_SIZE, EFFICIENTNET_MEAN, EFFICIENTNET_STD, "bicubic")
            for p in photos
        ]
    )
    with torch.no_grad():
        all_embeds = tower(torch.from_numpy(pixels))
    out: Dict[str, CaptionEval] = {}
    for name, path in files.items():
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        captions = doc.get("captions", doc.get("queries"))
        keep = [i for i, p in enumerate(photos) if p.name in captions]
        index = {photos[i].name: j for j, i in enumerate(keep)}
        missing = sorted(set(captions) - set(index))
        if missing:
            raise FileNotFoundError(f"{path}: sample photos not available: {missing}")
        texts, targets = [], []
        for photo, caps in captions.items():
            for c in caps:
                texts.append(c)
                targets.append(index[photo])
        out[name] = CaptionEval(all_embeds[keep], texts, torch.tensor(targets))
    return out


def caption_eval_set(teacher: nn.Module, tokenizer: Any, photo_dir: Path) -> CaptionEval:
    """The tuning captions' evaluation set (see :func:`caption_eval_sets`)."""
    return caption_eval_sets(teacher, tokenizer, photo_dir, {"tuning": CAPTION_SETS["tuning"]})["tuning"]


def caption_recall(tower: nn.Module, tokenizer: Any, ev: CaptionEval) -> Tuple[float, float]:
    text = embed_texts(tower, tokenizer, ev.texts)
    scores = text @ ev.image_embeds.T
    target = scores[torch.arange(len(ev.targets)), ev.targets]
    ranks = (scores >= target[:, None]).sum(dim=1) - 1
    return float((ranks < 1).float().mean()), float((ranks < 5).float().mean())


def text_qps(tower: nn.Module, tokenizer: Any, texts: Sequence[str], batch: int) -> float:
    with torch.no_grad():
        embed_texts(tower, tokenizer, list(texts[:batch]), batch_size=batch)  # warm-up
        t0 = time.perf_counter()
        embed_texts(tower, tokenizer, list(texts), batch_size=batch)
        return len(texts) / (time.perf_counter() - t0)


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# Driver


def _merge(base: Dict[str, Any], top: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def _path(p: Any) -> Path:
    path = Path(p)
    return path if path.is_absolute() else ROOT / path


def resolve_config(config: Dict[str, Any]) -> Dict[str, Any]:
    cfg = _merge(DEFAULTS, {k: v for k, v in config.items() if k != "recipe"})
    unknown = set(config) - set(DEFAULTS) - {"recipe"}
    if unknown:
        raise ValueError(f"unknown minilm_text config keys: {sorted(unknown)}")
    bad = [x for x in cfg["losses"] if x not in LOSSES]
    if bad:
        raise ValueError(f"unknown losses {bad} (known: {list(LOSSES)})")
    return cfg


@dataclass
class _Setup:
    """What every student of a run shares: the frozen teacher, the data and the evaluation."""

    teacher: MiniLMTextTower
    tokenizer: Any
    corpus: Corpus
    train_texts: List[str]  # the part of corpus.train the run will see
    train_targets: torch.Tensor  # the teacher's embeddings of train_texts
    evaluate: Callable[[nn.Module], Dict[str, Any]]


def _set_up(
    cfg: Dict[str, Any], out_dir: Path, teacher: Optional[MiniLMTextTower], tokenizer_json: Optional[str]
) -> _Setup:
    """Freeze the teacher, build the corpus, embed what training and evaluation need with it."""
    train_cfg, eval_cfg = cfg["train"], cfg["eval"]
    teacher = (teacher if teacher is not None else load_minilm()).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    tok_json = tokenizer_json if tokenizer_json is not None else load_minilm_tokenizer_json()
    tokenizer = make_tokenizer(tok_json, int(train_cfg["max_tokens"]))

    t0 = time.perf_counter()
    corpus = build_corpus(cfg["data"], cfg["seed"])
    log.info("corpus %s (%.0fs)", corpus.info, time.perf_counter() - t0)
    needed = min(len(corpus.train), int(train_cfg["steps"]) * int(train_cfg["batch_size"]))
    train_texts = corpus.train[:needed]  # only what the run will see: the teacher pass is the cost
    tag = f"{teacher.config.to_dict()}|{train_cfg['max_tokens']}|{param_count(teacher)}"
    cache_dir = Path(cfg["cache_dir"]) if cfg.get("cache_dir") else None
    if cache_dir is not None and not cache_dir.is_absolute():
        cache_dir = ROOT / cache_dir
    train_targets = teacher_embeddings(teacher, tokenizer, train_texts, cache_dir, tag)
    held_teacher = embed_texts(teacher, tokenizer, corpus.heldout)

    caption_ev = None
    if eval_cfg["captions"]:
        caption_ev = caption_eval_set(teacher, tokenizer, out_dir / "photos")

    def evaluate(tower: nn.Module) -> Dict[str, Any]:
        res: Dict[str, Any] = {
            "agreement@10": neighbour_agreement(
                embed_texts(tower, tokenizer, corpus.heldout), held_teacher, int(eval_cfg["k"])
            ),
            "params": param_count(tower),
        }
        if caption_ev is not None:
            res["caption_r1"], res["caption_r5"] = caption_recall(tower, tokenizer, caption_ev)
        return res

    return _Setup(teacher, tokenizer, corpus, train_texts, train_targets, evaluate)


def _train_student(
    cfg: Dict[str, Any], s: _Setup, layers: List[int], loss_name: str, out_dir: Path
) -> Tuple[Dict[str, Any], nn.Module]:
    """One student (the teacher's ``layers``) trained with one loss, evaluated and saved:
    (its results row, the student)."""
    student = truncate_layers(s.teacher, layers)
    for p in student.parameters():
        p.requires_grad_(True)
    history: List[Dict[str, float]] = []
    t1 = time.perf_counter()
    if loss_name != "none":
        history = distill(
            student, s.tokenizer, s.train_texts, s.train_targets, loss_name, cfg["train"], cfg["seed"]
        )
    row = {
        "model": f"student {len(layers)} layers {layers}",
        "loss": loss_name,
        "train_s": round(time.perf_counter() - t1, 1),
        "final_loss": history[-1]["loss"] if history else None,
        **s.evaluate(student),
    }
    log.info("%s", row)
    torch.save(
        {
            "config": student.config.to_dict(),
            "layers": layers,
            "loss": loss_name,
            "state_dict": student.state_dict(),
            "history": history,
        },
        out_dir / f"student_L{len(layers)}_{loss_name}.pt",
    )
    return row, student


def run(
    config: Dict[str, Any], teacher: Optional[MiniLMTextTower] = None, tokenizer_json: Optional[str] = None
) -> Dict[str, Any]:
    """Run the configured students x losses; returns the results (and writes them to out_dir).

    ``teacher``/``tokenizer_json`` default to the packaged MiniLM; tests pass tiny stand-ins.
    """
    cfg = resolve_config(config)
    torch.manual_seed(cfg["seed"])
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    out_dir = Path(cfg["out_dir"])
    if not out_dir.is_absolute():
        out_dir = ROOT / out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    eval_cfg = cfg["eval"]
    s = _set_up(cfg, out_dir, teacher, tokenizer_json)

    results: Dict[str, Any] = {"config": cfg, "corpus": s.corpus.info, "rows": []}
    teacher_row = {
        "model": f"teacher ({s.teacher.config.num_hidden_layers} layers)",
        "loss": "-",
        **s.evaluate(s.teacher),
    }
    results["rows"].append(teacher_row)
    towers: List[nn.Module] = []  # parallel to results["rows"][1:]
    for keep in cfg["students"]:
        layers = student_layers(s.teacher.config.num_hidden_layers, int(keep))
        for loss_name in cfg["losses"]:
            row, student = _train_student(cfg, s, layers, loss_name, out_dir)
            results["rows"].append(row)
            towers.append(student)
    # size and speed in one pass at the end, so all towers are timed under the same load
    qps_texts = s.corpus.heldout[: int(eval_cfg["qps_sentences"])]
    t_qps = text_qps(s.teacher, s.tokenizer, qps_texts, int(eval_cfg["qps_batch"]))
    teacher_row["qps"] = t_qps
    for row, tower in zip(results["rows"][1:], towers):
        row["qps"] = text_qps(tower, s.tokenizer, qps_texts, int(eval_cfg["qps_batch"]))
    for row in results["rows"]:
        row["size_ratio"] = row["params"] / teacher_row["params"]
        row["qps_ratio"] = row["qps"] / t_qps
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    if cfg["results_md"]:
        path = Path(cfg["results_md"])
        earlier = [json.loads(_path(p).read_text(encoding="utf-8")) for p in cfg["merge_results"]]
        write_table(earlier + [results], _path(path))
    return results


def _stage1_label(row: Dict[str, Any], cfg: Dict[str, Any]) -> str:
    if row["loss"] == "infonce":
        return f"infonce (tau {cfg['train']['temperature']})"
    return str(row["loss"])


def write_table(runs: Sequence[Dict[str, Any]], path: Path) -> None:
    """The markdown table of one or more runs' results (later runs add only rows not yet shown)."""
    if not runs:
        raise ValueError("no results to tabulate")
    first = runs[0]
    cfg = first["config"]
    tr = cfg["train"]
    commands = [r["config"].get("command") or "(command not recorded)" for r in runs]
    lines = [
        "# Stage 1 on real weights: MiniLM-L6 -> 2/3-layer students (Table 2's stage-1 ablation)",
        "",
        *[f"- command: `{c}`" for c in commands],
        f"- machine: {cpu_model()} ({os.cpu_count()} cores, shared), torch {torch.__version__}, "
        f"{cfg['threads']} thread(s)",
        f"- data: {first['corpus']}. Sources: apt = package synopses of the Debian archive known to apt on "
        "this machine (`apt-cache dumpavail`), dpkg = synopses and long descriptions of the installed packages "
        "(/var/lib/dpkg/status), pydoc = first paragraphs of Python standard-library docstrings (parsed with ast); "
        "split into sentences, filtered to prose, de-duplicated; the first "
        f"{min(first['corpus']['train'], tr['steps'] * tr['batch_size'])} sentences of a seeded shuffle of the "
        "training split are used",
        f"- training: {tr['steps']} steps x batch {tr['batch_size']} (one pass over {tr['steps'] * tr['batch_size']} "
        f"sentences), AdamW lr {tr['lr']} wd {tr['weight_decay']}, cosine with warm-up (10% of steps), "
        f"max {tr['max_tokens']} tokens; teacher frozen, student = embeddings + the listed teacher layers, "
        "all parameters trained",
        "- agreement@10: mean recall of each held-out sentence's teacher top-10 neighbours among the student's "
        "top-10 (held-out set only, itself excluded)",
        "- caption R@1/R@5: the starter's image tower (teacher space) on the captioned sample photos, captions encoded "
        "by the row's text tower (36 captions, 12 photos: small, so differences of 1/36 = 0.028 are one caption)",
        "- size = parameters / teacher's; QPS = torch fp32 sentences/s on held-out text relative to the teacher "
        "(one run, same process as that row's teacher)",
        "",
    ]
    header = [
        "text tower",
        "stage 1",
        "agreement@10",
        "caption R@1",
        "caption R@5",
        "final loss",
        "params (M)",
        "size ratio",
        "QPS ratio",
    ]
    rows = []
    shown = set()
    for res in runs:
        for r in res["rows"]:
            label = _stage1_label(r, res["config"])
            if (r["model"], label) in shown:
                continue
            shown.add((r["model"], label))
            rows.append(
                [
                    r["model"],
                    label,
                    f"{r['agreement@10']:.3f}",
                    f"{r['caption_r1']:.3f}" if "caption_r1" in r else "-",
                    f"{r['caption_r5']:.3f}" if "caption_r5" in r else "-",
                    f"{r['final_loss']:.2e}" if r.get("final_loss") is not None else "-",
                    f"{r['params'] / 1e6:.1f}",
                    f"{r['size_ratio']:.2f}",
                    f"{r['qps_ratio']:.2f}",
                ]
            )
    lines.append(markdown_table(header, rows))
    lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    print(f"[written to {path}]")


def main(config: Dict[str, Any]) -> int:
    """Entry point for ``training.stage1`` (configs with ``recipe: minilm_text``)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = run(config)
    print(json.dumps({r["model"] + " / " + r["loss"]: round(r["agreement@10"], 4) for r in results["rows"]}))
    return 0


if __name__ == "__main__":
    from training.train_utils import config_arg_parser, load_config

    parser = config_arg_parser("Stage 1 on real weights: MiniLM-L6 text students")
    args = parser.parse_args()
    sys.exit(main(load_config(args.config, args.overrides)))
