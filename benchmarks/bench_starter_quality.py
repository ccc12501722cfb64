"""Quality of the offline starter bundle: text-to-image on the tuning and held-out sets, and
image-to-image under augmentations.

    python -m benchmarks.bench_starter_quality [--cache DIR] [--work DIR] [--cache-only]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "python") not in sys.path:
    sys.path.insert(0, str(ROOT / "python"))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATA = ROOT / "benchmarks" / "data"
TUNING = DATA / "sample_captions.json"
HELDOUT = DATA / "heldout_queries.json"
DEFAULT_CACHE = ROOT / ".cache" / "starter-quality"


def prompt_templates() -> List[str]:
    """All prompt templates measured, in the order they are cached: the current default, the bare
    class name, open_clip's 7 'simple' ImageNet templates, then the rest of its 80."""
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    order = ["a photo of a {}.", "{}"] + [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES]
    order += [t("{}") for t in OPENAI_IMAGENET_TEMPLATES]
    seen: Dict[str, None] = {}
    for t in order:
        seen.setdefault(t, None)
    return list(seen)


def _template_file(cache: Path, template: str) -> Path:
    import hashlib

    return cache / "class_embeds" / f"{hashlib.sha256(template.encode()).hexdigest()[:16]}.npy"


def cached_class_embeddings(cache: Path, templates: Sequence[str], *, compute: bool = True,
                            text_tower: Any = None, tokenizer: Any = None) -> Dict[str, np.ndarray]:
    """template -> (1000, 384) float32 MiniLM embeddings of the ImageNet class names (normalised),
    computed once per template and kept as .npy under ``cache``."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    out: Dict[str, np.ndarray] = {}
    for t in templates:
        f = _template_file(cache, t)
        if f.is_file():
            out[t] = np.load(f).astype(np.float32)
            continue
        if not compute:
            continue
        if text_tower is None:
            from training.minilm import DEFAULT_CONTEXT_LENGTH, load_minilm, load_minilm_tokenizer_json, make_tokenizer

            text_tower = load_minilm().eval()
            tokenizer = make_tokenizer(load_minilm_tokenizer_json(), DEFAULT_CONTEXT_LENGTH)
        from training.minilm import embed_texts
        import torch

        with torch.no_grad():
            e = embed_texts(text_tower, tokenizer, [t.format(c) for c in IMAGENET_CLASSNAMES], batch_size=250)
        f.parent.mkdir(parents=True, exist_ok=True)
        np.save(f.with_suffix(".tmp.npy"), e.numpy().astype(np.float16))
        os.replace(f.with_suffix(".tmp.npy"), f)
        out[t] = e.numpy().astype(np.float32)
        print(f"cached class embeddings for {t!r} ({len(out)}/{len(templates)})", flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# photos, queries and augmentations


def load_query_sets() -> Dict[str, Dict[str, List[str]]]:
    """``{"tuning": {photo: [query, ...]}, "held-out": {...}}`` from benchmarks/data."""
    tuning = json.loads(TUNING.read_text(encoding="utf-8"))["captions"]
    heldout = json.loads(HELDOUT.read_text(encoding="utf-8"))["queries"]
    return {"tuning": tuning, "held-out": heldout}


def flatten(queries: Dict[str, List[str]], names: Sequence[str]) -> Tuple[List[str], List[int]]:
    index = {n: i for i, n in enumerate(names)}
    missing = sorted(set(queries) - set(index))
    if missing:
        raise FileNotFoundError(f"queried photos not among the sample photos: {missing}")
    texts = [q for name, qs in queries.items() for q in qs]
    targets = [index[name] for name, qs in queries.items() for _ in qs]
    return texts, targets


def _crop(box: Tuple[float, float, float, float]) -> Callable[[Any], Any]:
    def f(img: Any) -> Any:
        w, h = img.size
        return img.crop((int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h)))
    return f


def _jpeg(quality: int) -> Callable[[Any], Any]:
    def f(img: Any) -> Any:
        import io

        from PIL import Image

        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        return Image.open(buf).convert("RGB")
    return f


def _enhance(kind: str, factor: float) -> Callable[[Any], Any]:
    def f(img: Any) -> Any:
        from PIL import ImageEnhance

        return getattr(ImageEnhance, kind)(img).enhance(factor)
    return f


def _hue(shift: int) -> Callable[[Any], Any]:
    def f(img: Any) -> Any:
        from PIL import Image

        h, s, v = img.convert("HSV").split()
        h = h.point(lambda x: (x + shift) % 256)
        return Image.merge("HSV", (h, s, v)).convert("RGB")
    return f


def _flip(img: Any) -> Any:
    from PIL import ImageOps

    return ImageOps.mirror(img)


def _chain(*fs: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def f(img: Any) -> Any:
        for g in fs:
            img = g(img)
        return img
    return f


# Fixed before measuring: each must find its original photo first (R@1) among the sample photos.
AUGMENTATIONS: Tuple[Tuple[str, Callable[[Any], Any]], ...] = (
    ("crop 80% top-left", _crop((0.0, 0.0, 0.8, 0.8))),
    ("crop 70% bottom-right", _crop((0.3, 0.3, 1.0, 1.0))),
    ("crop 60% centre", _crop((0.2, 0.2, 0.8, 0.8))),
    ("horizontal flip", _flip),
    ("brightness 1.4 + contrast 0.7", _chain(_enhance("Brightness", 1.4), _enhance("Contrast", 0.7))),
    ("saturation 0.3", _enhance("Color", 0.3)),
    ("hue +20", _hue(20)),
    ("JPEG q=15", _jpeg(15)),
    ("crop 75% + flip + darker + JPEG q=40",
     _chain(_crop((0.1, 0.15, 0.85, 0.9)), _flip, _enhance("Brightness", 0.7), _jpeg(40))),
)


def sample_photos(dest: Path) -> List[Path]:
    """The sample photos that the query sets name, copied under ``dest``."""
    from leanclip.samples import collect_sample_photos

    names = set(load_query_sets()["held-out"])
    return sorted((p for p in collect_sample_photos(dest) if p.name in names), key=lambda p: p.name)


# Other real photographs scikit-image ships (textures, microscopy, the moon, scanned text), used
# only as extra distractors for image-to-image retrieval. motorcycle_right is left out: it is the
# other view of a stereo pair, a near-duplicate of motorcycle.png rather than a distractor.
DISTRACTORS = ("brick.png", "grass.png", "gravel.png", "cell.png", "ihc.png", "microaneurysms.png",
               "moon.png", "page.png", "text.png")


def distractor_images() -> List[Any]:
    import importlib.util

    from leanclip.encoder import Encoder

    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return []
    root = Path(list(spec.submodule_search_locations)[0]) / "data"
    return [Encoder.load_image(root / n) for n in DISTRACTORS if (root / n).is_file()]


def augmented_images(photos: Sequence[Path]) -> Tuple[List[Any], List[int], List[str]]:
    """(PIL images, index of the original photo, augmentation name) for every photo x augmentation."""
    from leanclip.encoder import Encoder

    images, targets, kinds = [], [], []
    for i, p in enumerate(photos):
        img = Encoder.load_image(p)
        for name, f in AUGMENTATIONS:
            images.append(f(img))
            targets.append(i)
            kinds.append(name)
    return images, targets, kinds


def cache_photo_features(cache: Path) -> Dict[str, np.ndarray]:
    """EfficientNet-Lite0 logits and pooled features of the photos and their augmentations
    (torch, the Encoder's preprocessing), and MiniLM embeddings of both query sets."""
    f = cache / "photo_features_v2.npz"
    if f.is_file():
        return dict(np.load(f))
    import torch

    from leanclip.encoder import Encoder, preprocess_image
    from training.starter import EFFICIENTNET_MEAN, EFFICIENTNET_STD, IMAGE_SIZE, load_efficientnet_lite0

    photos = sample_photos(cache / "photos")
    aug, aug_t, _ = augmented_images(photos)
    imgs = [Encoder.load_image(p) for p in photos] + aug + distractor_images()
    px = torch.from_numpy(np.stack([preprocess_image(im, IMAGE_SIZE, EFFICIENTNET_MEAN, EFFICIENTNET_STD) for im in imgs]))
    clf = load_efficientnet_lite0()
    with torch.no_grad():
        pooled = torch.cat([clf._avg_pooling(clf.extract_features(px[i:i + 16])).flatten(1) for i in range(0, len(px), 16)])
        logits = clf._fc(pooled)
    from training.minilm import DEFAULT_CONTEXT_LENGTH, embed_texts, load_minilm, load_minilm_tokenizer_json, make_tokenizer

    names = [p.name for p in photos]
    old = cache / "photo_features.npz"  # an earlier cache without distractors: reuse its text side
    if old.is_file():
        prev = dict(np.load(old))
        if list(prev["names"]) == names and all(f"q_{k}" in prev for k in load_query_sets()):
            out0 = {k: v for k, v in prev.items() if k.startswith(("q_", "t_"))}
            out0.update({"names": np.array(names), "aug_targets": np.array(aug_t), "n_aug": np.array(len(aug)),
                         "logits": logits.numpy(), "pooled": pooled.numpy()})
            np.savez(f, **out0)
            return out0
    tower = load_minilm().eval()
    tok = make_tokenizer(load_minilm_tokenizer_json(), DEFAULT_CONTEXT_LENGTH)
    out: Dict[str, np.ndarray] = {"names": np.array(names), "aug_targets": np.array(aug_t), "n_aug": np.array(len(aug)),
                                  "logits": logits.numpy(), "pooled": pooled.numpy()}
    for key, qs in load_query_sets().items():
        texts, targets = flatten(qs, names)
        with torch.no_grad():
            out[f"q_{key}"] = embed_texts(tower, tok, texts).numpy()
        out[f"t_{key}"] = np.array(targets)
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(f, **out)
    return out


# ---------------------------------------------------------------------------------------------
# metrics


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def ranks_of_targets(queries: np.ndarray, gallery: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """0-based rank of each query's target among the gallery rows (ties count against it)."""
    scores = _unit(queries) @ _unit(gallery).T
    t = scores[np.arange(len(targets)), np.asarray(targets)]
    return (scores >= t[:, None]).sum(axis=1) - 1


def recall_at(ranks: np.ndarray, k: int) -> float:
    return float((np.asarray(ranks) < k).mean())


def most_similar(vectors: np.ndarray, names: Sequence[str], query: str, k: int = 3) -> List[Tuple[str, float]]:
    """The ``k`` other photos most similar to ``query`` (cosine), best first."""
    v = _unit(vectors)
    i = list(names).index(query)
    scores = v @ v[i]
    order = [j for j in np.argsort(-scores, kind="stable") if j != i][:k]
    return [(names[j], float(scores[j])) for j in order]


# photos that must not be among the cat's nearest neighbours (astronomy, microscopy-like imagery)
NOT_LIKE_A_CAT = ("hubble_deep_field.jpg", "retina.jpg", "coins.png")


# ---------------------------------------------------------------------------------------------
# ablation on cached torch features (numpy mirror of training.starter's image head)


def joint_head(logits: np.ndarray, class_embeds: np.ndarray, temperature: float = 1.0,
               top_k: Optional[int] = None, shared: Optional[np.ndarray] = None) -> np.ndarray:
    z = logits / temperature
    if top_k is not None:
        thr = np.sort(z, axis=1)[:, -top_k][:, None]
        z = np.where(z >= thr, z, -np.inf)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    v = p @ class_embeds
    if shared is not None:
        v = v - shared
    return _unit(v)


def text_head(q: np.ndarray, shared: Optional[np.ndarray] = None) -> np.ndarray:
    return _unit(q - shared) if shared is not None else _unit(q)


def class_matrix(per_template: Dict[str, np.ndarray], templates: Sequence[str]) -> np.ndarray:
    return _unit(np.mean([_unit(per_template[t]) for t in templates], axis=0))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--cache-templates", action="store_true")
    parser.add_argument("--cache-photos", action="store_true")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if args.cache_photos:
        cache_photo_features(args.cache)
    if args.cache_templates:
        cached_class_embeddings(args.cache, prompt_templates())
    return 0


if __name__ == "__main__":
    sys.exit(main())
