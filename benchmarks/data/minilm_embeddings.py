"""Real sentence embeddings for the IVF benchmark: MiniLM-L6 (all-MiniLM-L6-v2, dim 384) of
English sentences found on this machine.

Sources (all local, nothing is downloaded): apt package synopses, dpkg long descriptions, the
stdlib docstrings (the stage-1 corpus readers of training/minilm_stage1.py), plus docstrings of
installed site-packages modules and prose lines of their shipped .txt/.md/.rst files. Sentences
are split and filtered for prose with the stage-1 rules, de-duplicated, shuffled with a fixed
seed and capped at --n.

The result is cached outside git (default ~/.cache/leanclip-bench/minilm/): ``sentences.txt``
and ``emb_<start>.npy`` chunks of float32 unit vectors written as encoding progresses, so an
interrupted run resumes and a partial cache is usable (``load(n)`` returns what exists). A
larger ``--n`` later encodes nothing more: the sentences are those of ``sentences.txt``. Gathering
again (without it) shuffles everything this machine holds now (installed packages change; the
scans have time budgets), so the first 200,000 would not stay the same: a benchmark that needs
more held-out sentences stores fewer (``bench_ivf.py``'s ``minilm:n`` split: the first n
stored, the next 5,000 held-out queries, the next 1,000 ``tune_queries``; n = 194,000 of the
200,000 cached).

    python -m benchmarks.data.minilm_embeddings --n 200000 --threads 2

Encoding speed (onnxruntime, ``--threads 2 --batch 64``, 2-core Intel Xeon intel-f6-m167,
2026-12-07): ~330 sentences/s while the other jobs left the cores free (a chunk of 10,000 in
30 s), 100-200/s while they ran; the 180,000 not cached before took 18 minutes (168/s).
"""

from __future__ import annotations

import argparse
import ast
import random
import re
import sys
import time
from pathlib import Path
from typing import Iterable, List, Optional

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


_ROFF_BREAK = re.compile(
    r"^\.(?:SH|SS|PP|LP|P|TP|IP|HP|sp|br|RS|RE|TH|nf|fi|Sh|Ss|Pp|Bl|El|It|Bd|Ed|EX|EE)\b"
)
_ROFF_TEXT = re.compile(r"^\.(?:B|I|BR|RB|IR|RI|BI|IB|SM|SB|Nm|Ar|Fl|Em|Sy|Pa|Xr|Dq|Sq|Ql)\s+(.*)$")
_ROFF_ESC = re.compile(
    r"\\f(?:\[[^\]]*\]|\(..|.)|\\s[+-]?\d+|\\\(..|\\\[[^\]]*\]|\\[&|^~0:%/,]|\\\*(?:\(..|\[[^\]]*\]|.)"
)


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def roff_paragraphs(text: str) -> Iterable[str]:
    """Paragraphs of a man page's roff source: macro lines end paragraphs, font and character
    escapes are dropped, the text arguments of font macros (.B, .I, .BR, ...) are kept."""
    para: List[str] = []
    for line in text.split("\n"):
        if line.startswith((".", "'")):
            m = _ROFF_TEXT.match(line)
            if m:
                para.append(m.group(1).replace('"', ""))
                continue
            if _ROFF_BREAK.match(line) or line.startswith(('.\\"', "'\\\"")):
                if para:
                    yield " ".join(para)
                    para = []
            continue
        if not line.strip():
            if para:
                yield " ".join(para)
                para = []
            continue
        line = _ROFF_ESC.sub("", line).replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ")
        para.append(line)
    if para:
        yield " ".join(para)


def man_pages(root: Path = Path("/usr/share/man"), budget_s: float = 300.0) -> Iterable[str]:
    """Paragraphs of the English man pages (sections 1-9 directly under ``root``; gzip or plain)."""
    import gzip

    t0 = time.perf_counter()
    for path in sorted(root.glob("man*/*")):
        if time.perf_counter() - t0 > budget_s:
            return
        if not path.is_file():
            continue
        try:
            raw = path.read_bytes()
            if path.suffix == ".gz":
                raw = gzip.decompress(raw)
        except (OSError, EOFError, ValueError):
            continue
        text = raw.decode("utf-8", errors="replace")
        if text.startswith(".so "):  # a link to another page
            continue
        yield from roff_paragraphs(text)


def doc_files(root: Path = Path("/usr/share/doc"), budget_s: float = 120.0) -> Iterable[str]:
    """Paragraphs of the text files packages ship under /usr/share/doc (README, NEWS, *.txt,
    *.md, *.rst, gzip or plain; changelogs and copyright files are skipped)."""
    import gzip

    t0 = time.perf_counter()
    for path in sorted(root.rglob("*")):
        if time.perf_counter() - t0 > budget_s:
            return
        name = path.name.lower()
        base = name[:-3] if name.endswith(".gz") else name
        if base.startswith(("changelog", "copyright")) or not path.is_file():
            continue
        if not (base.endswith((".txt", ".md", ".rst")) or base.startswith(("readme", "news", "faq"))):
            continue
        try:
            raw = path.read_bytes()
            if name.endswith(".gz"):
                raw = gzip.decompress(raw)
        except (OSError, EOFError, ValueError):
            continue
        if len(raw) > 4_000_000:
            continue
        text = _ANSI.sub("", raw.decode("utf-8", errors="replace"))
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
        ("site-packages", lambda: _site_packages_text(limit_files=200_000, budget_s=300.0)),
        ("man", man_pages),
        ("doc", doc_files),
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


def _reuse_table(reuse: Path) -> dict:
    """sentence -> embedding from an earlier cache (its sentences.txt and emb_*.npy chunks)."""
    table: dict = {}
    sentences_file = reuse / "sentences.txt"
    if not sentences_file.exists():
        return table
    sentences = sentences_file.read_text(encoding="utf-8").split("\n")
    for start in range(0, len(sentences), CHUNK):
        path = reuse / f"emb_{start:07d}.npy"
        if not path.exists():
            break
        emb = np.load(path)
        for s, e in zip(sentences[start : start + CHUNK], emb):
            table[s] = e
    return table


class _OrtTower:
    """The same MiniLM tower exported to ONNX (fp32) and run by onnxruntime: on this 2-core Zen 4
    it encodes ~2x faster than torch eager; outputs agree to ~2e-7."""

    def __init__(self, tower, tok, cache: Path, threads: int):
        import onnxruntime as ort
        import torch

        from leanclip.minilm import tokenize

        path = cache / "minilm-l6.onnx"
        if not path.exists():
            ids, mask = tokenize(tok, ["an example sentence", "a second, longer example sentence"])
            tmp = cache / "minilm-l6.tmp.onnx"
            torch.onnx.export(
                tower,
                (ids, mask),
                str(tmp),
                input_names=["ids", "mask"],
                output_names=["emb"],
                dynamic_axes={"ids": {0: "b", 1: "s"}, "mask": {0: "b", 1: "s"}, "emb": {0: "b"}},
                opset_version=17,
                dynamo=False,
            )
            tmp.rename(path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    def __call__(self, ids, mask) -> np.ndarray:
        e = self.sess.run(None, {"ids": ids.numpy(), "mask": mask.numpy()})[0]
        return e / np.linalg.norm(e, axis=1, keepdims=True)


def encode(
    cache: Path, n: int, threads: int, batch: int, backend: str = "ort", reuse: Optional[Path] = None
) -> None:
    import torch

    from leanclip.minilm import load_minilm, load_minilm_tokenizer_json, make_tokenizer, tokenize

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
    table = _reuse_table(reuse) if reuse is not None else {}
    if table:
        print(f"{len(table)} embeddings to reuse from {reuse}", file=sys.stderr)
    tower = load_minilm()
    tok = make_tokenizer(load_minilm_tokenizer_json(), context_length=64)
    if backend == "ort":
        run = _OrtTower(tower, tok, cache, threads)
    else:

        def run(ids, mask):
            with torch.inference_mode():
                return torch.nn.functional.normalize(tower(ids, mask), dim=-1).numpy()

    t0 = time.perf_counter()
    encoded = 0
    for start in range(0, len(sentences), CHUNK):
        path = cache / f"emb_{start:07d}.npy"
        if path.exists():
            continue
        texts = sentences[start : start + CHUNK]
        out = np.zeros((len(texts), 384), dtype=np.float32)
        todo = []
        for i, t in enumerate(texts):
            if t in table:
                out[i] = table[t]
            else:
                todo.append(i)
        # length-sorted batches pad little; results go back to sentence order
        order = sorted(todo, key=lambda i: len(texts[i]))
        for b in range(0, len(order), batch):
            idx = order[b : b + batch]
            ids, mask = tokenize(tok, [texts[i] for i in idx])
            out[idx] = run(ids, mask)
        encoded += len(order)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, out)
        tmp.rename(path)
        done = start + len(texts)
        rate = encoded / (time.perf_counter() - t0)
        print(f"{done}/{len(sentences)} done, {encoded} encoded ({rate:.0f}/s this run)", file=sys.stderr)


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
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--backend", choices=["ort", "torch"], default="ort")
    ap.add_argument(
        "--reuse", type=Path, default=None, help="an earlier cache whose embeddings are reused by sentence"
    )
    args = ap.parse_args()
    encode(args.cache, args.n, args.threads, args.batch, args.backend, args.reuse)


if __name__ == "__main__":
    main()
