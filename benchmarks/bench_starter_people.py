"""Issue 30, item 5, third round: a person signal for the starter, from MTCNN's packaged weights.

    python -m benchmarks.bench_starter_people [--cache DIR] [--results PATH]

Recipe 3 misses, on the held-out queries, concepts ImageNet has no class for, most of them a
person (the astronaut, Grace Hopper). ``facenet-pytorch`` ships MTCNN's face-detection weights
in its wheel (2 MB, MIT); :class:`leanclip.starter_faces.FaceConfidence` runs the cascade on the
image tower's own 224 x 224 input in one ONNX-exportable graph and gives each photo its highest
face probability ``s``. The image vector then moves toward a "person" row ``P`` in proportion:

    image = unit((1 - w s) unit(p E) + w s P)

where ``p E`` is recipe 3's (T=3, top-10 classes, gloss weight 0.2) and ``P`` the normalised
mean of the normalised MiniLM embeddings of a fixed set of person captions.

Everything below was fixed (and committed) before the first measurement; no detector had been
run on the sample photos then. Variants (24):

* detector stage: P-Net alone (``stage=1``), up to R-Net (2), the full cascade to O-Net (3);
  pyramid from 24-pixel faces (7 levels, 112 .. 14 px), the 4 best P-Net windows per level to
  R-Net, the 4 best R-Net windows to O-Net;
* person captions: "a person" = ("a photo of a person.",); "people" = ("a photo of a person.",
  "a portrait of a person.", "a photo of a man.", "a photo of a woman.");
* weight ``w`` in {0.2, 0.4, 0.6, 0.8}.

A second idea of the brief, another small model with packaged weights whose classes cover
scenes or people, was looked for and not found (no Places365 or person classifier with weights
in a PyPI wheel); nothing is measured for it.

Choice (round 2's rule): the tuning captions alone pick one candidate among all variants and
recipe 3 (tuning R@1, then tuning MRR; a tie keeps recipe 3, listed first). It is kept only if
it is not recipe 3, does not lower tuning R@1 or R@5, and raises held-out R@1. The held-out
queries are only reported. If one is kept, its int8 figures, size and latency come from bundles
built the repo's way and measured through leanclip.Encoder against recipe 3's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from benchmarks import bench_starter_heldout as H
from benchmarks import bench_starter_ideas as I
from benchmarks import bench_starter_quality as Q

RESULTS = Q.ROOT / "benchmarks" / "results" / "starter.md"
BEGIN = "<!-- bench_starter_people: begin (written by benchmarks/bench_starter_people.py) -->"
END = "<!-- bench_starter_people: end -->"
STAGES = {1: "P-Net", 2: "P+R-Net", 3: "P+R+O-Net"}
PERSON_CAPTIONS: Dict[str, tuple] = {
    "a person": ("a photo of a person.",),
    "people": ("a photo of a person.", "a portrait of a person.", "a photo of a man.", "a photo of a woman."),
}
WEIGHTS = (0.2, 0.4, 0.6, 0.8)
RECIPE3_GLOSS = 0.2


def face_scores(cache: Path, names: Sequence[str]) -> Dict[int, np.ndarray]:
    """Per stage, each sample photo's face confidence (the Encoder's preprocessing, torch; cached)."""
    f = cache / "face_scores.npz"
    if f.is_file():
        got = dict(np.load(f))
        if list(got["names"]) == list(names):
            return {s: got[f"stage{s}"] for s in STAGES}
    import torch

    from leanclip.encoder import Encoder, preprocess_image
    from leanclip.starter import EFFICIENTNET_MEAN, EFFICIENTNET_STD, IMAGE_SIZE
    from leanclip.starter_faces import FaceConfidence, load_mtcnn

    photos = {p.name: p for p in Q.sample_photos(cache / "photos")}
    px = torch.from_numpy(
        np.stack(
            [
                preprocess_image(
                    Encoder.load_image(photos[n]), IMAGE_SIZE, EFFICIENTNET_MEAN, EFFICIENTNET_STD
                )
                for n in names
            ]
        )
    )
    nets = load_mtcnn()
    out = {}
    for s in STAGES:
        det = FaceConfidence(
            *nets, image_size=IMAGE_SIZE, mean=EFFICIENTNET_MEAN, std=EFFICIENTNET_STD, stage=s
        )
        with torch.no_grad():
            out[s] = det(px).numpy().astype(np.float64)
    np.savez(f, names=np.array(list(names)), **{f"stage{s}": v for s, v in out.items()})
    return out


def with_person(img: np.ndarray, s: np.ndarray, person: np.ndarray, weight: float) -> np.ndarray:
    """unit((1 - w s) img + w s P) per row (``img`` unit rows, ``s`` in [0, 1])."""
    a = (weight * s)[:, None]
    return Q._unit((1.0 - a) * Q._unit(img) + a * Q._unit(person)[None, :])


def measure(f: I.Features) -> tuple:
    """Recipe 3 and every variant (docstring), recipe 3 first; and the face scores."""
    E = I.class_matrices(f)
    q = f.queries()
    base = Q.joint_head(f.logits, I.weighted_rows(E["name"], E["gloss"], RECIPE3_GLOSS), 3.0, 10)

    def cosine(img: np.ndarray) -> I.Metrics:
        return f.evaluate(lambda k: H.scores_of(q[k], img))

    scores = face_scores(f.cache, f.names)
    people = {k: Q._unit(Q._unit(f.embed(list(v))).mean(0)) for k, v in PERSON_CAPTIONS.items()}
    rows: List[I.Row] = [("baseline", "recipe 3: T=3, top-10, gloss weight 0.2", cosine(base))]
    for s, stage in STAGES.items():
        for label, P in people.items():
            for w in WEIGHTS:
                rows.append(
                    (
                        f"person signal, {stage}",
                        f"'{label}', w = {w}",
                        cosine(with_person(base, scores[s], P, w)),
                    )
                )
    return rows, scores


def report(rows: Sequence[I.Row], scores: Dict[int, np.ndarray], names: Sequence[str]) -> str:
    from benchmarks import _harness as Hh

    base = rows[0][2]
    picks = H.chosen(rows[1:])
    top = I.overall_pick(rows)
    table = []
    for idea, variant, m in rows:
        pick = idea in picks and picks[idea][0] == variant
        overall = (idea, variant) == top[:2]
        table.append(
            [
                idea,
                variant,
                *H._cells(m),
                f"{m['tuning']['mrr']:.3f}",
                "yes" if pick else "",
                "**yes**" if overall else "",
                ("**yes**" if overall and idea != "baseline" and H.kept(base, m) else "no")
                if overall
                else "",
            ]
        )
    text = "## Issue 30, round 3: a person signal from MTCNN's packaged weights\n\n"
    text += Hh.header("Starter people", ["torch", "onnxruntime", "facenet-pytorch"]).replace(
        "# Starter people\n\n", ""
    )
    text += (
        "\nTorch features of the 12 sample photos, cosine ranking; 36 tuning captions (one = 0.028), 48 "
        "held-out queries (one = 0.021). The variants and the rule were fixed and committed before the first "
        "measurement (`benchmarks/bench_starter_people.py`). The tuning set alone picks one candidate among all "
        "rows, recipe 3 included (R@1, then MRR; a tie keeps recipe 3). It is kept only if it is not recipe 3, "
        "does not lower tuning R@1 or R@5 and raises held-out R@1. The issue's target: held-out R@1 >= 0.85, "
        "R@5 >= 0.97.\n\n"
    )
    text += Hh.markdown_table(
        [
            "idea",
            "variant",
            "tuning R@1",
            "tuning R@5",
            "held-out R@1",
            "held-out R@5",
            "tuning MRR",
            "best in idea",
            "overall pick",
            "kept",
        ],
        table,
    )
    text += f"\n\nOverall pick on the tuning set: {top[0]}, {top[1]}.\n\nFace confidence per photo:\n\n"
    text += Hh.markdown_table(
        ["photo", *STAGES.values()],
        [[n, *[f"{scores[s][i]:.3f}" for s in STAGES]] for i, n in enumerate(names)],
    )
    return text + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=Q.DEFAULT_CACHE)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    f = I.Features(args.cache)
    rows, scores = measure(f)
    text = report(rows, scores, f.names)
    H.write_section(text, args.results, begin=BEGIN, end=END)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
