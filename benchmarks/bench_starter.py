"""Text-to-image recall of the offline starter bundle on the captioned sample photos.

    python -m benchmarks.bench_starter [--work DIR] [--no-ablation]

Builds the starter bundle (fp32 and int8) with ``leanclip.starter.build_starter``, copies the
sample photos with ``leanclip.samples.collect_sample_photos``, encodes them and the captions of
``benchmarks/data/sample_captions.json`` with the torch-free ``leanclip.Encoder``, and reports
R@1 / R@5 (a caption's photo ranked first / in the top 5 among all sample photos), bundle sizes
and fp32-vs-int8 speed ratios. The set is tiny (a dozen photos): it shows that the starter
matches text to images, not how well it would do on a real benchmark. The defaults (one
template, temperature 1) were fixed before measuring; the ablation rows are reported, not used
to pick them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from benchmarks import _harness as H

ROOT = Path(__file__).resolve().parents[1]

CAPTIONS = ROOT / "benchmarks" / "data" / "sample_captions.json"


def load_captions(path: Path = CAPTIONS) -> Dict[str, List[str]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    captions = data["captions"]
    if not captions or any(not v for v in captions.values()):
        raise ValueError(f"{path}: every photo needs at least one caption")
    return captions


def text_to_image_ranks(text_emb: np.ndarray, image_emb: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """0-based rank of each query's target image (ties count against the target)."""
    scores = text_emb @ image_emb.T
    target_scores = scores[np.arange(len(targets)), np.asarray(targets)]
    return (scores >= target_scores[:, None]).sum(axis=1) - 1


def recall(ranks: np.ndarray, k: int) -> float:
    return float((ranks < k).mean())


def queries(captions: Dict[str, List[str]], photo_names: Sequence[str]) -> Tuple[List[str], List[int]]:
    index = {name: i for i, name in enumerate(photo_names)}
    missing = sorted(set(captions) - set(index))
    if missing:
        raise FileNotFoundError(f"captioned photos not among the sample photos: {missing}")
    texts, targets = [], []
    for name, caps in captions.items():
        for c in caps:
            texts.append(c)
            targets.append(index[name])
    return texts, targets


def evaluate_bundle(bundle: Path, photos: Sequence[Path], captions: Dict[str, List[str]]) -> Dict[str, Any]:
    from leanclip.encoder import Encoder

    enc = Encoder(bundle, threads=int(os.environ.get("OMP_NUM_THREADS", "2")))
    names = [p.name for p in photos]
    texts, targets = queries(captions, names)
    img = enc.encode_images([str(p) for p in photos])
    txt = enc.encode_text(texts)
    ranks = text_to_image_ranks(txt, img, targets)
    text_s = H.timeit(lambda: enc.encode_text(texts), repeat=5)
    image_s = H.timeit(lambda: enc.encode_images([str(p) for p in photos]), repeat=3)
    size = sum(f.stat().st_size for f in bundle.iterdir() if f.is_file())
    return {
        "r1": recall(ranks, 1),
        "r5": recall(ranks, 5),
        "ranks": ranks,
        "texts": texts,
        "targets": targets,
        "names": names,
        "text_qps": len(texts) / text_s,
        "images_per_s": len(photos) / image_s,
        "size_mb": size / 2**20,
    }


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="where to build (default: a temp dir)")
    parser.add_argument("--no-ablation", action="store_true", help="skip the template/temperature rows")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES

    from leanclip.samples import collect_sample_photos
    from leanclip.starter import DEFAULT_TEMPLATES, build_starter

    SIMPLE_TEMPLATES = tuple(t("{}") for t in SIMPLE_IMAGENET_TEMPLATES)  # open_clip's seven, as str.format

    captions = load_captions()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        photos = [p for p in collect_sample_photos(work / "photos") if p.name in captions]
        fp32 = build_starter(work / "starter-fp32")
        int8 = build_starter(work / "starter-int8", int8=True)
        res = {
            "fp32": evaluate_bundle(fp32, photos, captions),
            "int8": evaluate_bundle(int8, photos, captions),
        }
        ablation: List[Tuple[str, float, float]] = []
        if not args.no_ablation:
            settings = [
                (f"{len(SIMPLE_TEMPLATES)} simple templates, T=1", tuple(SIMPLE_TEMPLATES), 1.0),
                ("1 template, T=0.5", DEFAULT_TEMPLATES, 0.5),
                ("1 template, T=2", DEFAULT_TEMPLATES, 2.0),
            ]
            for label, templates, temp in settings:
                b = build_starter(work / f"abl-{len(ablation)}", templates=templates, temperature=temp)
                r = evaluate_bundle(b, photos, captions)
                ablation.append((label, r["r1"], r["r5"]))

    n_q = len(res["fp32"]["texts"])
    n_img = len(photos)
    rows = [
        (
            p,
            f"{r['r1']:.3f}",
            f"{r['r5']:.3f}",
            f"{r['size_mb']:.1f}",
            f"{r['text_qps']:.0f}",
            f"{r['images_per_s']:.1f}",
        )
        for p, r in res.items()
    ]
    text = H.header(
        "Starter bundle: text-to-image recall on the captioned sample photos",
        ["torch", "onnxruntime", "tokenizers"],
        note=(
            f"{n_q} captions (benchmarks/data/sample_captions.json) over {n_img} sample photos "
            f"(leanclip.samples); chance R@1 = {1 / n_img:.3f}, R@5 = {min(1.0, 5 / n_img):.3f}. "
            "Encoded with the torch-free leanclip.Encoder. Defaults (template 'a photo of a {}.', "
            "temperature 1) were fixed before measuring. Tiny set: read as a sanity check, not a benchmark. "
            f"Throughputs are single runs on a shared machine (load average {os.getloadavg()[0]:.1f} at the "
            "end): compare the int8/fp32 ratios, not the absolute numbers."
        ),
    )
    text += (
        "\n"
        + H.markdown_table(["precision", "R@1", "R@5", "bundle MiB", "text queries/s", "images/s"], rows)
        + "\n"
    )
    f, q = res["fp32"], res["int8"]
    text += (
        f"\nint8 / fp32 (same run): size {q['size_mb'] / f['size_mb']:.2f}x, "
        f"text throughput {q['text_qps'] / f['text_qps']:.2f}x, image throughput "
        f"{q['images_per_s'] / f['images_per_s']:.2f}x. int8 = onnxruntime dynamic quantization of the "
        "token-embedding Gather (text) and the classifier / class-embedding MatMuls (image); see "
        "python/leanclip/starter.py for why MiniLM's MatMuls stay fp32.\n"
    )
    if ablation:
        text += "\nAblation (fp32; reported only, not used to choose the defaults):\n\n"
        text += (
            H.markdown_table(["setting", "R@1", "R@5"], [(a, f"{b:.3f}", f"{c:.3f}") for a, b, c in ablation])
            + "\n"
        )
    text += "\nPer-caption rank of the right photo (fp32 / int8; 0 = first):\n\n"
    text += (
        H.markdown_table(
            ["photo", "caption", "fp32", "int8"],
            [
                (f["names"][t], c, int(a), int(b))
                for c, t, a, b in zip(f["texts"], f["targets"], f["ranks"], q["ranks"])
            ],
        )
        + "\n"
    )
    H.write_result("starter", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
