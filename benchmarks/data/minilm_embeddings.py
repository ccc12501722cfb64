"""Real sentence embeddings for the IVF benchmark: MiniLM-L6 (all-MiniLM-L6-v2, dim 384) of
English sentences found on this machine.

Sources (all local, nothing is downloaded): apt package synopses, dpkg long descriptions, the
stdlib docstrings (the stage-1 corpus readers of training/minilm_stage1.py), plus docstrings of
installed site-packages modules and prose lines of their shipped .txt/.md/.rst files. Sentences
are split and filtered for prose with the stage-1 rules, de-duplicated, shuffled with a fixed
seed and capped at --n.

The result is cached outside git (default ~/.cache/leanclip-bench/minilm/): ``sentences.txt``
and ``emb_<start>.npy`` chunks of float32 unit vectors written as encoding progresses, so an
interrupted run resumes and a partial cache is usable (``load(n)`` returns what exists).

    python -m benchmarks.data.minilm_embeddings --n 200000 --threads 2
"""

from __future__ import annotations

import argparse
import ast
import random
import sys
import time
from pathlib import Path
from typing import Iterable, List

import numpy as np

CACHE = Path.home() / ".cache" / "leanclip-bench" / "minilm"
CHUNK = 10_000
SEED = 1234


def _site_packages_text(limit_files: int = 20_000, budget_s: float = 120.0) -> Iterable[str]:
    """Docstring paragraphs of installed modules and paragraphs of their shipped docs (files in
    path order, at most ``limit_files`` or ``budget_s`` seconds of scanning)."""
    import site
    import sysconfig

    t0 = time.perf_counter()

    roots = {Path(p) for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]]}
    seen = 0
    for root in sorted(roots):
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            if seen >= limit_files or time.perf_counter() - t0 > budget_s:
                return
            suffix = path.suffix
            if suffix not in {".py", ".txt", ".md", ".rst"} or not path.is_file():
                continue
            try:
                if path.stat().st_size > 2_000_000:
                    continue
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            seen += 1
            if suffix == ".py":
                try:
                    tree = ast.parse(text)
                except (SyntaxError, ValueError):
                    continue
                for node in ast.walk(tree):
                    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                        doc = ast.get_docstring(node)
                        if doc:
                            yield from doc.split("\n\n")
            else:
                yield from text.split("\n\n")


def gather(n: int) -> List[str]:
    from training.minilm_stage1 import (
        apt_descriptions,
        dpkg_descriptions,
        is_prose,
        split_sentences,
        stdlib_docstrings,
    )

    seen = set()
    out: List[str] = []
    counts = {}
    sources = [
        ("apt", apt_descriptions),
        ("dpkg", dpkg_descriptions),
        ("stdlib", stdlib_docstrings),
        ("site-packages", lambda: _site_packages_text()),
    ]
    for name, read in sources:
        before = len(out)
        for text in read():
            for s in split_sentences(text):
                key = s.lower()
                if key not in seen and is_prose(s, 4, 60):
                    seen.add(key)
                    out.append(s)
        counts[name] = len(out) - before
        print(f"source {name}: {counts[name]} sentences", file=sys.stderr)
    random.Random(SEED).shuffle(out)
    return out[:n]


def encode(cache: Path, n: int, threads: int, batch: int) -> None:
    import torch

    from training.minilm import load_minilm, load_minilm_tokenizer_json, make_tokenizer, tokenize

    torch.set_num_threads(threads)
    cache.mkdir(parents=True, exist_ok=True)
    sentences_file = cache / "sentences.txt"
    if sentences_file.exists():
        sentences = sentences_file.read_text(encoding="utf-8").split("\n")
    else:
        sentences = gather(n)
        sentences_file.write_text("\n".join(sentences), encoding="utf-8")
    sentences = sentences[:n]
    print(f"{len(sentences)} sentences", file=sys.stderr)
    tower = load_minilm()
    tok = make_tokenizer(load_minilm_tokenizer_json(), context_length=64)
    t0 = time.perf_counter()
    for start in range(0, len(sentences), CHUNK):
        path = cache / f"emb_{start:07d}.npy"
        if path.exists():
            continue
        texts = sentences[start : start + CHUNK]
        # length-sorted batches pad little; results go back to sentence order
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.zeros((len(texts), 384), dtype=np.float32)
        with torch.inference_mode():
            for b in range(0, len(order), batch):
                idx = order[b : b + batch]
                ids, mask = tokenize(tok, [texts[i] for i in idx])
                emb = torch.nn.functional.normalize(tower(ids, mask), dim=-1)
                out[idx] = emb.numpy()
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, out)
        tmp.rename(path)
        done = start + len(texts)
        rate = (done - 0) / (time.perf_counter() - t0)
        print(f"{done}/{len(sentences)} encoded ({rate:.0f}/s this run)", file=sys.stderr)


def load(n: int, cache: Path = CACHE) -> np.ndarray:
    """Up to ``n`` cached embeddings (float32, unit rows), in sentence order."""
    parts = []
    total = 0
    start = 0
    while total < n:
        path = cache / f"emb_{start:07d}.npy"
        if not path.exists():
            break
        a = np.load(path)
        parts.append(a)
        total += len(a)
        start += CHUNK
    if not parts:
        raise FileNotFoundError(
            f"no embeddings cached under {cache}: run python -m benchmarks.data.minilm_embeddings"
        )
    return np.concatenate(parts)[:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--cache", type=Path, default=CACHE)
    args = ap.parse_args()
    encode(args.cache, args.n, args.threads, args.batch)


if __name__ == "__main__":
    main()
