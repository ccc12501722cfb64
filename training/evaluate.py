"""Text-image retrieval evaluation: R@1/5/10 for text-to-image and image-to-text, with the
search done by the leanclip Index (exact inner product over L2-normalized embeddings).

    python -m training.evaluate --model S6=runs/s6/best.pt --model "T'=runs/teacher_sf/best.pt" \
        --coco-json dataset_coco.json --coco-root coco/ \
        --flickr-json dataset_flickr30k.json --flickr-root flickr30k-images/

prints the paper's Table 1 layout (COCO 1K = mean over five 1,000-image folds of the 5K test
split, COCO 5K, Flickr30k 1K test) for each model, text-to-image first, then image-to-text.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from torch import nn

from training.data import PairedCorpus, load_karpathy
from training.distributed import DistInfo, init_distributed
from training.train_utils import encode_image_files, encode_token_rows, load_size_for

KS = (1, 5, 10)


def _index_search(corpus: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    import leanclip

    index = leanclip.Index(corpus.shape[1], metric="ip", dtype="f32")
    index.add(np.arange(len(corpus), dtype=np.uint64), np.ascontiguousarray(corpus, np.float32))
    keys, _ = index.search(np.ascontiguousarray(queries, np.float32), k=min(k, len(corpus)))
    return keys.astype(np.int64)


def retrieval_recalls(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    caption_image: np.ndarray,
    ks: Sequence[int] = KS,
    image_valid: np.ndarray | None = None,
) -> dict[str, float]:
    """Recall@K in percent. t2i: the caption's image is among the top K images. i2t: at least one
    of the image's captions is among the top K captions. Embeddings should be L2-normalized.
    Unreadable images (image_valid False) still count as queries/targets that always miss, so a
    broken file lowers the score rather than silently shrinking the test set."""
    caption_image = np.asarray(caption_image, dtype=np.int64)
    kmax = max(ks)
    image_emb = np.asarray(image_emb, np.float32)
    if image_valid is not None:
        image_emb = image_emb.copy()
        image_emb[~image_valid] = 0.0
    t2i = _index_search(image_emb, text_emb, kmax)
    hits_t2i = t2i == caption_image[:, None]
    i2t = _index_search(text_emb, image_emb, kmax)
    hits_i2t = caption_image[i2t] == np.arange(len(image_emb))[:, None]
    if image_valid is not None:
        hits_t2i[~image_valid[caption_image]] = False
        hits_i2t[~image_valid] = False
    out: dict[str, float] = {}
    for k in ks:
        out[f"t2i_R@{k}"] = 100.0 * float(hits_t2i[:, :k].any(axis=1).mean())
        out[f"i2t_R@{k}"] = 100.0 * float(hits_i2t[:, :k].any(axis=1).mean())
    out["mean_recall"] = float(np.mean([out[f"{d}_R@{k}"] for d in ("t2i", "i2t") for k in ks]))
    return out


def fold_recalls(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    corpus: PairedCorpus,
    folds: int = 5,
    image_valid: np.ndarray | None = None,
) -> dict[str, float]:
    """COCO 1K protocol: the 5K test images in ``folds`` consecutive folds, recalls averaged."""
    n = len(corpus)
    if n % folds:
        raise ValueError(f"{n} images cannot be split into {folds} equal folds")
    size = n // folds
    results = []
    for f in range(folds):
        images = np.arange(f * size, (f + 1) * size)
        captions = np.flatnonzero(
            (corpus.caption_image >= f * size) & (corpus.caption_image < (f + 1) * size)
        )
        results.append(
            retrieval_recalls(
                image_emb[images],
                text_emb[captions],
                corpus.caption_image[captions] - f * size,
                image_valid=None if image_valid is None else image_valid[images],
            )
        )
    return {key: float(np.mean([r[key] for r in results])) for key in results[0]}


def embed_corpus(
    model: nn.Module,
    corpus: PairedCorpus,
    info: DistInfo | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    amp: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image embeddings, text embeddings, image_valid) of a paired corpus."""
    from training.models import tokenize_for

    info = info or DistInfo(0, 1, 0, next(model.parameters()).device)
    images, valid = encode_image_files(
        model, corpus.images, load_size_for(model), batch_size, info, num_workers, amp
    )
    tokens = tokenize_for(model, corpus.captions)
    texts = encode_token_rows(model, tokens, batch_size, info, amp)
    return images, texts, valid


def evaluate_model(
    model: nn.Module,
    corpus: PairedCorpus,
    folds: int = 1,
    info: DistInfo | None = None,
    batch_size: int = 128,
    num_workers: int = 0,
    amp: bool = False,
) -> dict[str, float]:
    image_emb, text_emb, valid = embed_corpus(model, corpus, info, batch_size, num_workers, amp)
    if folds > 1:
        return fold_recalls(image_emb, text_emb, corpus, folds, valid)
    return retrieval_recalls(image_emb, text_emb, corpus.caption_image, image_valid=valid)


# --------------------------------------------------------------------------------------------
# Table layouts


BENCHMARKS = (("MSCOCO (1K)", "coco1k"), ("MSCOCO (5K)", "coco5k"), ("Flickr 30K", "flickr1k"))


def format_table1(rows: Mapping[str, Mapping[str, Mapping[str, float]]], direction: str = "t2i") -> str:
    """rows: model label -> benchmark key -> recalls. The paper's Table 1 layout."""
    present = [(title, key) for title, key in BENCHMARKS if any(key in r for r in rows.values())]
    head1 = f"{'model':<24}" + "".join(f"| {title:^22} " for title, _ in present)
    head2 = f"{'':<24}" + "".join("| " + " ".join(f"R@{k:<5}" for k in KS) + "  " for _ in present)
    lines = [
        f"{'text-to-image' if direction == 't2i' else 'image-to-text'} retrieval",
        head1,
        head2,
        "-" * len(head1),
    ]
    for label, results in rows.items():
        cells = []
        for _, key in present:
            r = results.get(key)
            cells.append(
                "| "
                + (
                    " ".join(f"{r[f'{direction}_R@{k}']:<7.1f}" for k in KS)
                    if r
                    else " ".join(f"{'-':<7}" for _ in KS)
                )
                + ""
            )
        lines.append(f"{label:<24}" + "".join(cells))
    return "\n".join(lines)


def _load_for_eval(spec: str) -> tuple[str, nn.Module]:
    from training.models import build_teacher, load_model

    label, sep, source = spec.partition("=")
    if not sep:
        label, source = Path(spec).stem, spec
    if source.startswith("open_clip:"):
        # open_clip:ViT-B-32:openai -> the zero-shot teacher (Table 1's first row)
        _, name, pretrained = source.split(":", 2)
        return label, build_teacher(name, pretrained)
    return label, load_model(source)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model",
        action="append",
        required=True,
        help="LABEL=CHECKPOINT (leanclip checkpoint) or LABEL=open_clip:ViT-B-32:openai; repeatable",
    )
    parser.add_argument("--coco-json"), parser.add_argument("--coco-root")
    parser.add_argument("--flickr-json"), parser.add_argument("--flickr-root")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json-out", help="also write all numbers to this JSON file")
    args = parser.parse_args(argv)
    if not (args.coco_json or args.flickr_json):
        parser.error("give --coco-json/--coco-root and/or --flickr-json/--flickr-root")
    info = init_distributed(args.device)
    corpora: dict[str, tuple[PairedCorpus, int]] = {}
    if args.coco_json:
        coco = load_karpathy(args.coco_json, args.coco_root, args.split)
        corpora["coco5k"] = (coco, 1)
        corpora["coco1k"] = (coco, 5)
    if args.flickr_json:
        corpora["flickr1k"] = (load_karpathy(args.flickr_json, args.flickr_root, args.split), 1)
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for spec in args.model:
        label, model = _load_for_eval(spec)
        model.to(info.device).eval()
        embedded: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        rows[label] = {}
        for key, (corpus, folds) in corpora.items():
            if id(corpus) not in embedded:
                embedded[id(corpus)] = embed_corpus(
                    model, corpus, info, args.batch_size, args.workers, amp=info.device.type == "cuda"
                )
            images, texts, valid = embedded[id(corpus)]
            rows[label][key] = (
                fold_recalls(images, texts, corpus, folds, valid)
                if folds > 1
                else retrieval_recalls(images, texts, corpus.caption_image, image_valid=valid)
            )
    if info.is_main:
        print(format_table1(rows, "t2i"))
        print()
        print(format_table1(rows, "i2t"))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
