"""Build an IVF index from sharded embedding files on one machine, in bounded memory.

    python -m leanclip.build_ivf OUT emb/00000.npy emb/00001.npy ... --nlist 4096 --dtype f16 --pq 32
    python -m leanclip.build_ivf OUT emb/          # every *.npy in the folder, sorted

Each ``.npy`` file ((n, dim) float32 or float16) becomes one IVF file in OUT sharing one
quantizer trained on a seeded sample across all files; keys are global row numbers (file order).
Serve it with ``leanclip.shards.ShardedIndex.load(OUT, mmap=True)``. On several machines,
``python -m training.scale build-ivf`` runs the same build under torchrun (docs/scale.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from leanclip.errors import LeanclipError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m leanclip.build_ivf", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output folder (IVF shard files and manifest.json)")
    p.add_argument("embeddings", nargs="+", help=".npy embedding files, or folders of them")
    p.add_argument("--nlist", type=int, default=1024, help="k-means lists (default 1024)")
    p.add_argument("--metric", default="ip", choices=("ip", "cos", "l2"))
    p.add_argument("--dtype", default="f16", choices=("f32", "f16", "i8"), help="list storage (default f16)")
    p.add_argument("--pq", type=int, default=0, help="4-bit PQ sub-quantizers per vector (0: no codes)")
    p.add_argument("--rerank", type=int, default=0, help="keep float32 copies and re-score this many")
    p.add_argument(
        "--scan-dims",
        type=int,
        default=0,
        help="batches rank by this many principal directions, trained on the sample (0: all dimensions)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sample", type=int, default=None, help="training rows drawn across files (default 64 * nlist)"
    )
    p.add_argument("--chunk", type=int, default=65536, help="rows added at a time (bounds memory)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    from leanclip.shards import EmbeddingShards, build_ivf, embedding_files

    try:
        shards = EmbeddingShards(embedding_files(args.embeddings))
        if args.quiet:
            summary = build_ivf(
                shards, args.out, nlist=args.nlist, metric=args.metric, dtype=args.dtype, pq=args.pq,
                rerank=args.rerank, scan_dims=args.scan_dims, seed=args.seed, sample=args.sample, chunk=args.chunk,
            )  # fmt: skip
        else:
            from rich.progress import Progress

            with Progress(transient=True) as bar:
                task = bar.add_task("building IVF shards", total=len(shards.paths))
                summary = build_ivf(
                    shards, args.out, nlist=args.nlist, metric=args.metric, dtype=args.dtype, pq=args.pq,
                    rerank=args.rerank, scan_dims=args.scan_dims, seed=args.seed, sample=args.sample, chunk=args.chunk,
                    progress=lambda done, total: bar.update(task, completed=done),
                )  # fmt: skip
    except (LeanclipError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
