"""Photo features of the gallery (issue 29): near-duplicate groups, text in photos, video.

* **Near-duplicates, quality.** A generated set: distinct photos (the real sample photos of
  scikit-image, scikit-learn and matplotlib, tiles of them, and procedural scenes), and for most
  of them 1-3 altered copies: crops, JPEG re-encodes, small edits (brightness, contrast, a date
  stamp), bursts (the frame shifted, new sensor noise), downscaled PNGs. It is indexed with the
  starter model; ``Gallery.duplicates`` groups it at several thresholds and at the calibrated
  one. Precision and recall count pairs of photos: a pair is true when both come from the same
  original.
* **Near-duplicates, speed.** 100,000 given vectors of the starter's image-to-image width
  (clusters of scenes, 10% of them in bursts of near-duplicates): the pairs (the self-join of
  ``gallery.duplicates.neighbour_pairs``) and the groups, timed.
* **Phone formats** (HEIC, AVIF against JPEG), their decoders, and the gallery's decoding
  threads (``decode_threads`` 1 against 2: part ``threads``).
* **Text in photos** and **video**: see their sections.

Results: ``benchmarks/results/photos.md``, and the same section in ``gallery.md``.

    python -m benchmarks photos
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from benchmarks._harness import RESULTS, header, write_result

try:
    from benchmarks._harness import markdown_table
except ImportError:  # its home moved to training.report
    from training.report import markdown_table

SECTION = "\n## Photo features (issue 29)"
W, H = 384, 288


def _sample_sources() -> List[Path]:
    import importlib.util

    out = []
    for pkg, rels in {
        "skimage": [
            "data/astronaut.png",
            "data/camera.png",
            "data/chelsea.png",
            "data/coffee.png",
            "data/rocket.jpg",
            "data/motorcycle_left.png",
            "data/coins.png",
            "data/hubble_deep_field.jpg",
            "data/retina.jpg",
            "data/horse.png",
            "data/moon.png",
            "data/brick.png",
            "data/grass.png",
            "data/gravel.png",
            "data/page.png",
            "data/text.png",
            "data/cell.png",
            "data/color.png",
        ],
        "sklearn": ["datasets/images/china.jpg", "datasets/images/flower.jpg"],
        "matplotlib": ["mpl-data/sample_data/grace_hopper.jpg"],
    }.items():
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            continue
        base = Path(list(spec.submodule_search_locations)[0])
        out += [base / r for r in rels if (base / r).is_file()]
    return out


def _procedural(rng: np.random.Generator) -> Image.Image:
    """A scene: a two-colour gradient, 3-9 shapes, blurred a little, with noise."""
    w, h = int(W * 1.1), int(H * 1.1)
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, h)[:, None, None]
    arr = (c0 * (1 - t) + c1 * t) * np.ones((1, w, 1))
    im = Image.fromarray(arr.astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 10))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        [d.ellipse, d.rectangle][int(rng.integers(2))]((x0, y0, x1, y1), fill=fill)
    im = im.filter(ImageFilter.GaussianBlur(1.5))
    noisy = np.asarray(im, np.float32) + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _canvases(n_procedural: int, seed: int) -> List[Image.Image]:
    """Distinct originals, each 10% larger than W x H (room for crops and bursts)."""
    rng = np.random.default_rng(seed)
    out = []
    for src in _sample_sources():
        with Image.open(src) as im:
            im = im.convert("RGB")
        big = im.resize((int(W * 1.1), int(H * 1.1)))
        out.append(big)
        # two tiles of each real photo: other views of the same scene, not duplicates
        for box in (
            (0, 0, im.width // 2, im.height // 2),
            (im.width // 2, im.height // 2, im.width, im.height),
        ):
            out.append(im.crop(box).resize((int(W * 1.1), int(H * 1.1))))
    out += [_procedural(rng) for _ in range(n_procedural)]
    return out


def _window(c: Image.Image, dx: int = 0, dy: int = 0) -> Image.Image:
    x0, y0 = (c.width - W) // 2 + dx, (c.height - H) // 2 + dy
    return c.crop((x0, y0, x0 + W, y0 + H))


def _variant(c: Image.Image, kind: str, rng: np.random.Generator) -> Tuple[Image.Image, str]:
    """An altered copy of the original and the format to save it in."""
    base = _window(c)
    if kind == "crop":  # keep 82-92% of each side, resized back
        f = float(rng.uniform(0.82, 0.92))
        cw, ch = int(W * f), int(H * f)
        x0, y0 = int(rng.integers(0, W - cw + 1)), int(rng.integers(0, H - ch + 1))
        return base.crop((x0, y0, x0 + cw, y0 + ch)).resize((W, H)), "JPEG"
    if kind == "reencode":
        return base, f"JPEG:{int(rng.integers(15, 45))}"
    if kind == "edit":
        im = ImageEnhance.Brightness(base).enhance(float(rng.uniform(0.85, 1.15)))
        im = ImageEnhance.Contrast(im).enhance(float(rng.uniform(0.9, 1.1)))
        ImageDraw.Draw(im).text((W - 90, H - 16), "2024-07-14", fill=(255, 160, 0))
        return im, "JPEG"
    if kind == "burst":  # the camera moved 2-5%, new noise
        dx = int(rng.integers(-int(0.05 * W), int(0.05 * W) + 1)) or 3
        dy = int(rng.integers(-int(0.04 * H), int(0.04 * H) + 1))
        arr = np.asarray(_window(c, dx, dy), np.float32) + rng.normal(0, 4, (H, W, 3))
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), "JPEG"
    if kind == "resize":
        f = float(rng.uniform(0.4, 0.6))
        return base.resize((int(W * f), int(H * f))), "PNG"
    raise ValueError(kind)


KINDS = ("crop", "reencode", "edit", "burst", "resize")


def make_duplicate_set(dest: Path, n_procedural: int = 200, seed: int = 0) -> Dict[str, int]:
    """Write the generated set into ``dest``; returns name -> id of its original."""
    rng = np.random.default_rng(seed + 1)
    truth: Dict[str, int] = {}
    dest.mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(_canvases(n_procedural, seed)):
        name = f"o{i:04d}.jpg"
        _window(c).save(dest / name, quality=92)
        truth[name] = i
        if rng.random() < 0.35:
            continue  # a photo without copies
        for j, kind in enumerate(rng.choice(KINDS, size=int(rng.integers(1, 4)), replace=False)):
            im, fmt = _variant(c, str(kind), rng)
            ext = "png" if fmt == "PNG" else "jpg"
            vname = f"o{i:04d}_{j}_{kind}.{ext}"
            if fmt.startswith("JPEG:"):
                im.save(dest / vname, quality=int(fmt.split(":")[1]))
            else:
                im.save(dest / vname, **({"quality": 90} if ext == "jpg" else {}))
            truth[vname] = i
    return truth


def pair_scores(groups: Sequence[Sequence[str]], truth: Dict[str, int]) -> Tuple[float, float, int, int]:
    """(precision, recall, predicted pairs, true pairs) of grouped names against the originals."""
    predicted = set()
    for g in groups:
        names = sorted(g)
        predicted |= {(a, b) for i, a in enumerate(names) for b in names[i + 1 :]}
    by_orig: Dict[int, List[str]] = {}
    for name, o in truth.items():
        by_orig.setdefault(o, []).append(name)
    true = set()
    for names in by_orig.values():
        names = sorted(names)
        true |= {(a, b) for i, a in enumerate(names) for b in names[i + 1 :]}
    hit = len(predicted & true)
    precision = hit / len(predicted) if predicted else 1.0
    recall = hit / len(true) if true else 1.0
    return precision, recall, len(predicted), len(true)


SEED_ROLES = {
    0: "the set the rule's values were chosen on",
    1: "a second seed, seen during the choice (its scores were printed next to seed 0's; not used to choose)",
    2: "a third seed, held out: first scored after the rule's values were fixed",
}


def duplicate_quality(tmp: Path, encoder: object, seed: int = 0) -> Tuple[str, Dict[str, float]]:
    from leanclip.gallery import Gallery

    folder = tmp / f"dups{seed}"
    t0 = time.perf_counter()
    truth = make_duplicate_set(folder, seed=seed)
    gen_s = time.perf_counter() - t0
    g = Gallery(folder, model=encoder)
    s = g.update()
    rows = []
    summary: Dict[str, float] = {}
    auto_t, auto_groups = g.duplicates()
    for t in (0.85, 0.88, 0.90, 0.92, 0.94, 0.96, 0.98, None):
        used, groups = (auto_t, auto_groups) if t is None else g.duplicates(t)
        p, r, npred, ntrue = pair_scores([[h.name for h in grp] for grp in groups], truth)
        label = "**calibrated (--auto)**" if t is None else f"{used:.2f}"
        rows.append([label, len(groups), npred, ntrue, f"{p:.3f}", f"{r:.3f}"])
        if t is None:
            summary = {"precision": p, "recall": r}
    n_orig = len(set(truth.values()))
    text = (
        f"\n### Near-duplicates: precision and recall, seed {seed}\n\n"
        f"Seed {seed}: {SEED_ROLES.get(seed, 'another seed')}. "
        f"Generated set: {len(truth)} photos = {n_orig} distinct originals ({len(_sample_sources())} real "
        f"sample photos, two tiles of each, and procedural scenes) + {len(truth) - n_orig} altered copies "
        f"({', '.join(KINDS)}; 1-3 per original for 65% of them), {W}x{H}; generated in {gen_s:.1f} s. "
        f"Indexed with the starter model ({s.encoded} photos encoded in {s.seconds:.1f} s), grouped by "
        "`Gallery.duplicates`: the thresholds are fixed cut-offs on the model's image-to-image score, "
        "the calibrated rule adds each photo's background and the look (`gallery.duplicates`). "
        "Pairs of photos counted.\n\n"
        + markdown_table(
            ["threshold", "groups", "predicted pairs", "true pairs", "precision", "recall"], rows
        )
        + f"\nTarget: precision >= 0.95 at recall >= 0.9 -- calibrated threshold: precision "
        f"{summary['precision']:.3f}, recall {summary['recall']:.3f} "
        f"(**{'met' if summary['precision'] >= 0.95 and summary['recall'] >= 0.9 else 'not met'}**).\n"
    )
    g.close()
    return text, summary


def synthetic_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors: scenes around n/50 centres (noise ~ the centre's norm), 10% of them
    followed by a burst of 1-4 near-duplicates (cosine ~0.97)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // 50), dim)).astype(np.float32)
    n_scenes = int(n / 1.25)  # 10% of scenes bring 2.5 copies on average
    scenes = centres[rng.integers(len(centres), size=n_scenes)] + rng.standard_normal((n_scenes, dim)).astype(
        np.float32
    )
    scenes /= np.linalg.norm(scenes, axis=1, keepdims=True)
    bursty = np.flatnonzero(rng.random(n_scenes) < 0.1)
    copies = np.repeat(bursty, rng.integers(1, 5, size=len(bursty)))
    dups = scenes[copies] + rng.standard_normal((len(copies), dim)).astype(np.float32) * (0.25 / np.sqrt(dim))
    out = np.concatenate([scenes, dups / np.linalg.norm(dups, axis=1, keepdims=True)])[:n]
    if len(out) < n:  # fewer copies than expected: more distinct scenes
        more = centres[rng.integers(len(centres), size=n - len(out))]
        more = more + rng.standard_normal(more.shape).astype(np.float32)
        out = np.concatenate([out, more / np.linalg.norm(more, axis=1, keepdims=True)])
    return np.ascontiguousarray(out, dtype=np.float32)


def synthetic_looks(x: np.ndarray, seed: int = 0) -> Dict[int, np.ndarray]:
    """Looks (``gallery.duplicates.look``'s shape, float16) for the keys 1..n of ``x``: a seeded
    random projection of the vectors, so near-duplicate vectors look alike too."""
    from leanclip.gallery import duplicates as dup

    r = np.random.default_rng(seed).standard_normal((x.shape[1], dup.LOOK_SIDE**2 * 3)).astype(np.float32)
    y = x @ r
    y = (y / np.linalg.norm(y, axis=1, keepdims=True)).astype(np.float16)
    return dict(zip(range(1, len(x) + 1), y))


def duplicate_speed(n: int, dim: int) -> str:
    from leanclip import Index
    from leanclip.gallery import duplicates as dup

    x = synthetic_vectors(n, dim)
    keys = np.arange(1, n + 1, dtype=np.uint64)
    index = Index(dim, dtype="f16")
    index.add(keys, x)
    looks = synthetic_looks(x)
    del x
    load0 = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    pairs = dup.neighbour_pairs(index, keys, floor=dup.LOOK_FLOOR)  # as the gallery's update
    t1 = time.perf_counter()
    look = dup.look_scores(pairs.a, pairs.b, looks)
    stored = dup.worth_storing(pairs.score, look)
    a, b, score, look = pairs.a[stored], pairs.b[stored], pairs.score[stored], look[stored]
    bg = np.full(n + 1, -1.0)
    bg[np.fromiter(pairs.background.keys(), np.int64)] = np.fromiter(pairs.background.values(), np.float64)
    keep = dup.calibrated(score, bg[a.astype(np.int64)], bg[b.astype(np.int64)], look)
    groups = dup.components(a[keep], b[keep])
    t2, c2 = time.perf_counter(), time.process_time()
    load = f"{load0:.1f} / {os.getloadavg()[0]:.1f}"
    row = [f"{n:,}", dim, f"{int(stored.sum()):,}", f"{int(keep.sum()):,}", len(groups)]
    row += [f"{t1 - t0:.2f}", f"{t2 - t1:.3f}", f"**{t2 - t0:.2f}**", f"{c2 - c0:.2f}", load]
    total = t2 - t0
    return (
        "\n### Near-duplicates: grouping speed (vectors given)\n\n"
        f"{n:,} unit vectors of the starter's image-to-image width ({dim}), stored f16 as the gallery "
        "stores them: scenes around n/50 centres, 10% of them followed by bursts of 1-4 near-duplicates "
        "(cosine ~0.97), with looks (a seeded random projection of the vectors to the look's 192 numbers). "
        "Pairs: `neighbour_pairs` over all of them at the gallery's floor "
        f"({dup.LOOK_FLOOR}; a first index: the IVF self-join, f16 lists, nlist = 2 sqrt(n), nprobe "
        f"{dup.SELF_JOIN_NPROBE}, batches of {dup._BLOCK} queries); groups: the look "
        "scores, the pairs worth storing, the calibrated rule and the connected components. "
        "CPU s is the process's CPU time (both cores' threads), which the machine's load does not "
        "inflate as it does the wall time.\n\n"
        + markdown_table(
            [
                "vectors",
                "dim",
                "pairs stored",
                "pairs kept",
                "groups",
                "pairs s",
                "groups s",
                "total s",
                "CPU s",
                "load 1 min (start / end)",
            ],
            [row],
        )
        + f"\nTarget: 100k vectors grouped in <= 10 s: **{total:.1f} s** wall "
        f"({'met' if total <= 10 else 'not met'} at the load shown, on this shared 2-core machine; "
        f"{c2 - c0:.1f} CPU s).\n"
    )


WORDS = (
    "receipt total amount paid change cash card grocery market bakery coffee station platform "
    "train london berlin paris museum ticket entry adult child exit open closed monday friday "
    "invoice number date order quantity price discount welcome parking street avenue north south "
    "results quarterly revenue growth meeting agenda slide summary notes warning danger stop"
).split()
FONTS = ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSans-Bold.ttf")


def make_text_set(dest: Path, n: int = 40, seed: int = 0) -> Dict[str, List[str]]:
    """``n`` images of rendered text (2-4 lines of 2-4 words or numbers, DejaVu fonts 18-40 px,
    on plain or procedural backgrounds, some turned up to 3 degrees); name -> words drawn."""
    from PIL import ImageFont

    rng = np.random.default_rng(seed)
    dest.mkdir(parents=True, exist_ok=True)
    truth: Dict[str, List[str]] = {}
    for i in range(n):
        size = int(rng.integers(18, 41))
        path = Path("/usr/share/fonts/truetype/dejavu") / FONTS[i % len(FONTS)]
        font = ImageFont.truetype(str(path), size) if path.is_file() else ImageFont.load_default(size=size)
        if i % 3 == 2:
            im = _procedural(rng).resize((800, 480))
            im = Image.blend(im, Image.new("RGB", im.size, (255, 255, 255)), 0.7)
        else:
            shade = int(rng.integers(200, 256))
            im = Image.new("RGB", (800, 480), (shade, shade, int(rng.integers(180, 256))))
        d = ImageDraw.Draw(im)
        words: List[str] = []
        for line in range(int(rng.integers(2, 5))):
            parts = [
                str(WORDS[int(rng.integers(len(WORDS)))])
                if rng.random() < 0.75
                else f"{rng.integers(1, 999)}.{rng.integers(0, 99):02d}"
                for _ in range(int(rng.integers(2, 5)))
            ]
            if rng.random() < 0.3:
                parts = [w.upper() for w in parts]
            d.text((30, 30 + line * (size + 28)), " ".join(parts), fill=(20, 20, 20), font=font)
            words += parts
        if i % 4 == 3:
            im = im.rotate(float(rng.uniform(-3, 3)), expand=False, fillcolor=(255, 255, 255))
        name = f"text{i:03d}.{'jpg' if i % 2 else 'png'}"
        im.save(dest / name, **({"quality": 85} if i % 2 else {}))
        truth[name] = words
    return truth


def text_quality(tmp: Path, encoder: object) -> str:
    import sqlite3

    from leanclip.gallery import Gallery
    from leanclip.gallery.texts import compact

    folder = tmp / "texts"
    truth = make_text_set(folder)
    plain = Gallery(folder, store=tmp / "store-plain", model=encoder).update()
    with_ocr = Gallery(folder, store=tmp / "store-ocr", model=encoder, ocr=True).update()
    conn = sqlite3.connect(tmp / "store-ocr" / "gallery.db")
    read = {
        bytes(p).decode(): compact(b)
        for p, b in conn.execute("SELECT f.path, t.body FROM files f JOIN texts t ON t.rowid = f.key")
    }
    conn.close()
    found = sum(compact(w) in read.get(name, "") for name, words in truth.items() for w in words)
    total = sum(len(w) for w in truth.values())
    recall = found / total
    n = len(truth)
    rows = [
        ["without --ocr", n, f"{plain.seconds:.1f}", f"{1000 * plain.seconds / n:.0f}"],
        ["with --ocr", n, f"{with_ocr.seconds:.1f}", f"{1000 * with_ocr.seconds / n:.0f}"],
    ]
    return (
        "\n### Text in photos (--ocr)\n\n"
        f"{n} generated 800x480 images of rendered text ({total} words and numbers; DejaVu Sans, Serif, "
        "Mono and Sans Bold at 18-40 px; plain or photo backgrounds; a quarter turned up to 3 degrees). "
        "A word counts as recalled when a `text:` term of it finds its image (the casefolded, "
        "space-free match `leanclip.gallery.texts` uses).\n\n"
        f"Word recall: **{recall:.3f}** ({found}/{total}; target >= 0.9: "
        f"**{'met' if recall >= 0.9 else 'not met'}**).\n\n"
        + markdown_table(["index run", "photos", "seconds", "ms per photo"], rows)
        + "\nBoth are first indexes of the same folder with the starter model (OCR: rapidocr-onnxruntime, "
        "PP-OCRv4 on onnxruntime, images up to 1280 px read at twice the size).\n"
    )


_PHONE_CHILD = """
import json, sys, time
from pathlib import Path
import pillow_heif
from leanclip import registry
from leanclip.gallery import Gallery
from leanclip.gallery.sync import model_image_size
from leanclip.images import load_image, register_formats
register_formats()
folder, store, thumbnails = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
pillow_heif.options.THUMBNAILS = thumbnails  # off: HEIC files decode in full, as without draft
enc = registry.load_encoder(registry.resolve(None))
size = model_image_size(enc)
files = sorted(folder.iterdir())
w, c = time.perf_counter(), time.process_time()
shapes = set()
for p in files:
    with load_image(p, reduce_for=size) as im:
        shapes.add(im.size)
decode = (time.perf_counter() - w, time.process_time() - c)
w, c = time.perf_counter(), time.process_time()
g = Gallery(folder, store=store, model=enc)
s = g.update()
index = (time.perf_counter() - w, time.process_time() - c)
w, c = time.perf_counter(), time.process_time()
for q in ("a cat", "a rocket", "a person in a space suit", "coffee", "a motorcycle") * 4:
    g.search(q, k=5)
search = (time.perf_counter() - w, time.process_time() - c)
print(json.dumps({"n": s.encoded, "decode": decode, "index": index, "search": search, "shapes": sorted(shapes)}))
"""

PHONE_SOURCES = ("astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field", "camera", "coins")


def make_phone_photos(dest: Path, size: Tuple[int, int] = (4032, 3024)) -> Dict[str, Path]:
    """The same photos (scikit-image's samples, scaled to a phone's 12 Mpx with a little noise)
    as JPEG (quality 90), HEIC as iPhones write it (a grid of 512 px tiles, with a 320 px
    thumbnail; quality 80, x265 preset ultrafast to keep generation short; and at quality 60,
    ``heic60``: files of the JPEG's size, as a phone's HEICs are) and AVIF (quality 80, Pillow's
    plugin): one folder per format. Made once into ``dest`` (kept when there)."""
    import skimage.data

    folders = {fmt: dest / fmt for fmt in ("jpeg", "heic", "heic60", "avif")}
    if all(f.is_dir() and len(list(f.iterdir())) == len(PHONE_SOURCES) for f in folders.values()):
        return folders  # made by an earlier part of this run
    for f in folders.values():
        f.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in PHONE_SOURCES:
        arr = getattr(skimage.data, name)()
        im = Image.fromarray(arr).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        noisy = np.asarray(im, np.float32) + rng.normal(0, 3, (size[1], size[0], 3))
        im = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        im.save(folders["jpeg"] / f"{name}.jpg", quality=90)
        for fmt, quality in (("heic", 80), ("heic60", 60)):
            heic = folders[fmt] / f"{name}.heic"
            im.save(
                heic, quality=quality, thumbnails=[320], tile_size=512, enc_params={"preset": "ultrafast"}
            )
        im.save(folders["avif"] / f"{name}.avif", quality=80, speed=10)
    return folders


def phone_formats(tmp: Path, rounds: int = 2) -> str:
    """Index (and search) the same photos as JPEG, HEIC and AVIF, each format in a fresh
    process, the formats alternating, ``rounds`` times; photos/s and CPU time against JPEG."""
    import json
    import subprocess
    import sys

    from leanclip.images import register_formats

    register_formats()
    t0 = time.perf_counter()
    folders = make_phone_photos(tmp / "phone")
    gen_s = time.perf_counter() - t0
    runs = [
        ("JPEG", "jpeg", "1"),
        ("HEIC (its thumbnail)", "heic", "1"),
        ("HEIC (decoded in full)", "heic", "0"),
        ("HEIC at quality 60 (decoded in full)", "heic60", "0"),
    ]
    runs.append(("AVIF", "avif", "1"))
    got: Dict[str, List[dict]] = {label: [] for label, _, _ in runs}
    loads = []
    for r in range(rounds):
        for i, (label, fmt, thumbs) in enumerate(runs):
            store = tmp / f"store-{r}-{i}"
            loads.append(os.getloadavg()[0])
            out = subprocess.run(
                [sys.executable, "-c", _PHONE_CHILD, str(folders[fmt]), str(store), thumbs],
                capture_output=True,
                text=True,
            )
            if out.returncode != 0:
                raise RuntimeError(f"{label}: {out.stderr[-2000:]}")
            got[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
            shutil.rmtree(store, ignore_errors=True)
    n = len(PHONE_SOURCES)

    def med(label: str, part: str, j: int) -> float:
        return float(np.median([g[part][j] for g in got[label]]))

    rows = []
    searches = [1000 * med(label, "search", 0) / 20 for label, _, _ in runs]
    base_w, base_c = med("JPEG", "index", 0), med("JPEG", "index", 1)
    for label, fmt, _ in runs:
        w, c = med(label, "index", 0), med(label, "index", 1)
        shapes = sorted({tuple(s) for g in got[label] for s in g["shapes"]})
        rows.append(
            [
                label,
                f"{sum(p.stat().st_size for p in folders[fmt].iterdir()) / n / 1e6:.1f} MB",
                "x".join(map(str, shapes[0])),
                f"{1000 * med(label, 'decode', 1) / n:.0f}",
                f"{n / w:.2f}",
                f"{1000 * c / n:.0f}",
                f"**{base_w / w:.2f}**",
                f"**{base_c / c:.2f}**",
                f"{1000 * med(label, 'search', 0) / 20:.1f}",
            ]
        )
    return (
        "\n### Phone formats: HEIC and AVIF against JPEG\n\n"
        f"{n} photos (scikit-image's samples scaled to 4032x3024, a phone's 12 Mpx) saved as JPEG "
        "(quality 90), HEIC as iPhones write it (pillow-heif: a grid of 512 px tiles with a 320 px "
        "thumbnail; quality 80, x265's ultrafast preset to keep generation short) and "
        f"AVIF (Pillow's plugin, quality 80); generated in {gen_s:.0f} s. Each format is indexed by a "
        f"fresh process (`Gallery.update` with the starter model), the formats alternating, {rounds} "
        "rounds; medians shown. 'HEIC (decoded in full)' is the same files read with pillow-heif's "
        "thumbnails off: what the loader did before it asked for them; 'HEIC at quality 60' the same "
        "photos at quality 60 (files of about the JPEG's size, as a phone's HEICs are), read in full too. "
        "Decode: `load_image` at the "
        "model's size alone, CPU ms per photo. Search: 20 text queries on the indexed gallery. "
        f"The machine's 1-minute load at each start: {min(loads):.0f}-{max(loads):.0f}, so the CPU "
        "columns are the ones to compare.\n\n"
        + markdown_table(
            [
                "format",
                "file",
                "decoded at",
                "decode CPU ms",
                "index photos/s",
                "index CPU ms/photo",
                "speed vs JPEG (wall)",
                "speed vs JPEG (CPU)",
                "search ms/query",
            ],
            rows,
        )
        + "\nTarget: HEIC/AVIF index and search as JPEGs do within 20% (a ratio of at least 0.8): "
        + "; ".join(
            f"{label} {'met' if base_w / med(label, 'index', 0) >= 0.8 else 'not met'}"
            for label, _, _ in runs[1:]
        )
        + " (wall). Where a photo is decoded in full it cannot be: no HEVC or AV1 decoder here decodes "
        "at reduced scale (the decoder table below). Search does not depend on the format "
        f"({min(searches):.1f}-{max(searches):.1f} ms a query at this load).\n"
    )


_THREADS_CHILD = """
import json, sys, time
import pillow_heif
from leanclip import registry
from leanclip.gallery import Gallery
from leanclip.images import register_formats
register_formats()
folder, store, threads, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
pillow_heif.options.THUMBNAILS = False  # HEIC decoded in full, as a HEIC without a thumbnail is
enc = registry.load_encoder(registry.resolve(None))
enc.encode_images([])  # the model loaded before the clock starts
w, c = time.perf_counter(), time.process_time()
s = Gallery(folder, store=store, model=enc, batch_size=batch, decode_threads=threads).update()
print(json.dumps({"n": s.encoded, "wall": time.perf_counter() - w, "cpu": time.process_time() - c}))
"""


def phone_threads(tmp: Path, rounds: int = 5, batch: int = 4) -> str:
    """Index the phone photos of each format with ``decode_threads`` 1 and 2 (this machine's
    cores), each run a fresh process, the settings alternating, ``rounds`` times: the wall-clock
    rate of each and their ratio, per round (the machine is shared: a round's two runs are
    neighbours in time) and the median."""
    import json
    import subprocess
    import sys

    folders = make_phone_photos(tmp / "phone")
    runs = [("JPEG", "jpeg"), ("HEIC (decoded in full)", "heic"), ("AVIF", "avif")]
    threads = (1, 2)
    rate: Dict[Tuple[str, int], List[float]] = {(label, t): [] for label, _ in runs for t in threads}
    loads = []
    for r in range(rounds):
        for label, fmt in runs:
            for t in threads if r % 2 == 0 else threads[::-1]:
                store = tmp / f"store-threads-{r}-{fmt}-{t}"
                loads.append(os.getloadavg()[0])
                out = subprocess.run(
                    [sys.executable, "-c", _THREADS_CHILD, str(folders[fmt]), str(store), str(t), str(batch)],
                    capture_output=True,
                    text=True,
                )
                if out.returncode != 0:
                    raise RuntimeError(f"{label}: {out.stderr[-2000:]}")
                got = json.loads(out.stdout.strip().splitlines()[-1])
                rate[(label, t)].append(got["n"] / got["wall"])
                shutil.rmtree(store, ignore_errors=True)
    rows = []
    for label, _ in runs:
        one, two = rate[(label, 1)], rate[(label, 2)]
        ratios = [b / a for a, b in zip(one, two)]
        rows.append(
            [
                label,
                f"{np.median(one):.2f}",
                f"{np.median(two):.2f}",
                ", ".join(f"{x:.2f}" for x in ratios),
                f"**{np.median(ratios):.2f}**",
            ]
        )
    return (
        "\n### Phone formats: decoding threads (`decode_threads`)\n\n"
        f"The {len(PHONE_SOURCES)} photos of the other phone-format tables (4032x3024) in each format, indexed by a "
        f"fresh process (`Gallery.update`, starter model, batches of {batch} so that a batch is decoded "
        "while the one before is encoded; the model loaded before the clock starts), with "
        "`decode_threads` 1 (one photo at a time, as before) and 2 (this machine's cores), the two "
        f"taking turns, {rounds} rounds. HEIC is read in full (no thumbnail). The machine is shared "
        f"(1-minute load at each start: {min(loads):.0f}-{max(loads):.0f}): compare the ratios of "
        "neighbouring runs.\n\n"
        + markdown_table(
            ["format", "photos/s, 1 thread", "photos/s, 2 threads", "2 vs 1, each round", "2 vs 1, median"],
            rows,
        )
        + "\n\nThreads spread the decoding over the cores; they do not make a photo cheaper to decode. "
        "The spread of a row's ratios across rounds is the shared machine's noise.\n"
    )


_DECODER_CHILD = """
import json, sys, time
from pathlib import Path
import pillow_heif
from PIL import Image
import PIL.AvifImagePlugin as avif_plugin
from leanclip.images import load_image, register_formats
register_formats()
how, folder, threads, size = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
pillow_heif.options.THUMBNAILS = how == "load_image"
pillow_heif.options.DECODE_THREADS = threads or pillow_heif.options.DECODE_THREADS
avif_plugin.DEFAULT_MAX_THREADS = threads  # 0: libavif's default (the machine's cores)

def pyav(path):  # every video stream (a HEIC grid's tiles are streams), FFmpeg asked for 1/8 scale
    import av
    from collections import Counter
    with av.open(str(path)) as c:
        for st in c.streams.video:
            st.codec_context.thread_count = threads
            st.codec_context.options = {"lowres": "3"}
        out, seen = Counter(), set()
        for pk in c.demux(*c.streams.video):
            if pk.stream.index in seen:
                continue
            for fr in pk.decode():  # to RGB at the size decoded, as the Pillow rows give
                fr.to_ndarray(format="rgb24")
                out[f"{fr.width}x{fr.height}"] += 1; seen.add(pk.stream.index)
    return " + ".join(f"{n} x {wh}" if n > 1 else wh for wh, n in out.most_common())

def decode(path):
    if how == "load_image":
        with load_image(path, reduce_for=size) as im:
            return f"{im.width}x{im.height}"
    if how == "pillow":
        with Image.open(path) as im:
            im.load()
            return f"{im.width}x{im.height}"
    return pyav(path)

files = sorted(folder.iterdir())
decode(files[0])  # libraries loaded before timing
w, c = time.perf_counter(), time.process_time()
sizes = sorted({decode(p) for p in files})
print(json.dumps({"wall": time.perf_counter() - w, "cpu": time.process_time() - c, "sizes": sizes}))
"""

# (label, format folder, how, threads): each a fresh process per round, the rows taking turns
DECODERS = (
    ("JPEG: Pillow at 1/8 scale (`load_image`, draft)", "jpeg", "load_image", 1),
    ("JPEG: Pillow in full", "jpeg", "pillow", 1),
    ("JPEG: FFmpeg mjpeg (PyAV), lowres=3", "jpeg", "pyav", 1),
    ("HEIC: its thumbnail (`load_image`)", "heic", "load_image", 0),
    ("HEIC: pillow-heif (libheif + libde265) in full, 1 thread", "heic", "pillow", 1),
    ("HEIC: pillow-heif in full, 4 threads (its default)", "heic", "pillow", 4),
    ("HEIC: FFmpeg hevc (PyAV), lowres=3, each tile (not joined)", "heic", "pyav", 1),
    ("HEIC at quality 60: pillow-heif in full, 1 thread", "heic60", "pillow", 1),
    ("HEIC at quality 60: FFmpeg hevc (PyAV), each tile", "heic60", "pyav", 1),
    ("AVIF: Pillow (libavif + dav1d), 1 thread", "avif", "pillow", 1),
    ("AVIF: Pillow, libavif's default threads", "avif", "pillow", 0),
    ("AVIF: `load_image` (Pillow, default threads)", "avif", "load_image", 0),
    ("AVIF: FFmpeg libdav1d (PyAV), lowres=3", "avif", "pyav", 1),
)


def phone_decoders(tmp: Path, rounds: int = 3) -> str:
    """Decode cost per 12 Mpx photo, by decoder and its knobs: what any reduced-resolution
    decode (JPEG's draft; FFmpeg's lowres, asked of every codec) buys, and what is left
    when a decoder has none. CPU time is the column to compare on a loaded machine."""
    import json
    import subprocess
    import sys

    folders = make_phone_photos(tmp / "phone")
    got: Dict[str, List[dict]] = {label: [] for label, *_ in DECODERS}
    loads = []
    for _ in range(rounds):
        for label, fmt, how, threads in DECODERS:
            loads.append(os.getloadavg()[0])
            args = [how, str(folders[fmt]), str(threads), "224"]
            out = subprocess.run(
                [sys.executable, "-c", _DECODER_CHILD, *args], capture_output=True, text=True
            )
            if out.returncode != 0:
                raise RuntimeError(f"{label}: {out.stderr[-2000:]}")
            got[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
    n = len(PHONE_SOURCES)
    base = float(np.median([g["cpu"] for g in got[DECODERS[0][0]]]))
    rows = []
    for label, fmt, _, _ in DECODERS:
        cpu = float(np.median([g["cpu"] for g in got[label]]))
        wall = float(np.median([g["wall"] for g in got[label]]))
        mb = sum(p.stat().st_size for p in folders[fmt].iterdir()) / n / 1e6
        sizes = ", ".join(got[label][0]["sizes"])
        rows.append(
            [
                label,
                f"{mb:.1f} MB",
                sizes,
                f"{1000 * cpu / n:.0f}",
                f"{1000 * wall / n:.0f}",
                f"{cpu / base:.1f}x",
            ]
        )
    return (
        "\n### Phone formats: decode cost per 12 Mpx photo, by decoder\n\n"
        f"The {n} photos of the table below (4032x3024), each decoder and knob in a fresh process, "
        f"the rows taking turns, {rounds} rounds; medians per photo. `load_image` rows are the "
        "loader as the gallery calls it (`reduce_for` = the model's 224): decode, EXIF turn, "
        "integer reduce. 'lowres=3' asks FFmpeg for 1/8 scale: its mjpeg decoder honours it, "
        "hevc and libdav1d ignore it and decode every pixel (the size decoded is shown). "
        f"The machine's 1-minute load at each start: {min(loads):.0f}-{max(loads):.0f}.\n\n"
        + markdown_table(
            ["decoder", "file", "decoded at", "CPU ms/photo", "wall ms/photo", "CPU vs JPEG draft"], rows
        )
        + "\n\nOnly JPEG decodes at reduced scale (Pillow's draft, FFmpeg's lowres). A HEIC without a "
        "thumbnail and an AVIF are decoded in full by every decoder here: the 'CPU vs JPEG draft' of "
        "their rows is the cost the index pays per photo, against JPEG's.\n"
    )


_SAMPLE_CHILD = """
import resource, sys, time
from leanclip.video import sample_frames
t = time.perf_counter(); n = 0; last = 0.0
for last, im in sample_frames(sys.argv[1], 2.0, reduce_for=224):
    n += 1
print(n, round(last, 1), round(time.perf_counter() - t, 1), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def make_long_clip(path: Path, seconds: int, size: Tuple[int, int] = (1920, 1080)) -> None:
    """A 1080p MPEG-4 clip of ``seconds``, one frame (a keyframe) every 2 s: what sampling at
    2 s decodes of any clip (a real one also has the frames between, which the decoder skips)."""
    import fractions

    import av

    out = av.open(str(path), "w")
    stream = out.add_stream("mpeg4", rate=fractions.Fraction(1, 2))
    stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
    stream.codec_context.gop_size = 1
    stream.bit_rate = 1_000_000
    ramp = np.linspace(0, 255, size[0], dtype=np.float32)[None, :, None]
    for i in range(seconds // 2):
        arr = np.empty((size[1], size[0], 3), np.uint8)
        arr[:] = ((ramp + 7 * i) % 256).astype(np.uint8)
        arr[:, :, 1] = (i * 13) % 256
        for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()


def video_memory(tmp: Path, durations: Sequence[int] = (60, 600, 3600)) -> str:
    """Peak RSS of sampling 1080p clips of growing length (``leanclip.video.sample_frames`` at
    2 s, each in a fresh process)."""
    import subprocess
    import sys

    rows = []
    for seconds in durations:
        clip = tmp / f"clip_{seconds}.mp4"
        make_long_clip(clip, seconds)
        out = subprocess.run([sys.executable, "-c", _SAMPLE_CHILD, str(clip)], capture_output=True, text=True)
        n, last, took, rss = out.stdout.split()
        rows.append([f"{seconds // 60} min", f"{clip.stat().st_size / 1e6:.1f} MB", n, last, took, rss])
        clip.unlink()
    return (
        "\n### Video: memory on long clips\n\n"
        "1080p MPEG-4 clips with a keyframe every 2 s, sampled at 2 s by `leanclip.video.sample_frames` "
        "(keyframes only, each frame scaled to a 448 px short side as it is decoded), each in a fresh "
        "process; peak RSS is the process's maximum resident set (Python, numpy, PyAV and Pillow "
        "included).\n\n"
        + markdown_table(["clip", "file", "frames", "last frame s", "seconds", "peak RSS MB"], rows)
        + "\nMemory does not grow with the clip's length: the frames are streamed.\n"
    )


def pick_encoder() -> object:
    from leanclip import registry

    return registry.load_encoder(registry.resolve(None))


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vectors", type=int, default=100_000)
    ap.add_argument("--dup-seeds", default="0,1,2", help="seeds of the generated near-duplicate sets")
    ap.add_argument(
        "--parts",
        default="quality,text,speed,phone,decoders,threads,video",
        help="comma-separated: quality, text, speed, phone, decoders, threads, video",
    )
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="leanclip-bench-photos-"))
    earlier = _earlier_sections()
    head = header("Photo features: near-duplicates, text, phone formats, video", ["pillow", "pillow-heif"])
    sections: List[str] = []
    try:
        enc = pick_encoder()
        if "quality" in parts:
            for seed in (int(x) for x in args.dup_seeds.split(",")):
                sections.append(duplicate_quality(tmp, enc, seed)[0])
                _write(head, sections, earlier)  # each part is kept as soon as it is measured
        if "text" in parts:
            sections.append(text_quality(tmp, enc))
            _write(head, sections, earlier)
        if "phone" in parts:
            sections.append(phone_formats(tmp))
            _write(head, sections, earlier)
        if "decoders" in parts:
            sections.append(phone_decoders(tmp))
            _write(head, sections, earlier)
        if "threads" in parts:
            sections.append(phone_threads(tmp))
            _write(head, sections, earlier)
        if "video" in parts:
            sections.append(video_memory(tmp))
            _write(head, sections, earlier)
        if "speed" in parts:
            dim = int(getattr(enc, "similarity_dim", 0) or enc.dim)  # type: ignore[attr-defined]
            sections.append(duplicate_speed(args.vectors, dim))
            _write(head, sections, earlier)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _earlier_sections() -> Dict[str, str]:
    """The sections of the last photos.md (title -> text, marked with that run's date): each
    part can run alone (``--parts``), and the parts not run again are kept."""
    path = RESULTS / "photos.md"
    if not path.exists():
        return {}
    old = path.read_text(encoding="utf-8")
    date = next((line.split(": ", 1)[1] for line in old.splitlines() if line.startswith("- date: ")), "?")
    out = {}
    for part in old.split("\n### ")[1:]:
        title, text = part.split("\n", 1)
        note = (
            ""
            if text.lstrip().startswith("(Measured by the run of")
            else f"\n(Measured by the run of {date}.)\n"
        )
        out[title] = f"\n### {title}\n{note}{text}"
    return out


def _write(head: str, sections: List[str], earlier: Dict[str, str]) -> None:
    titles = {part.split("\n", 1)[0] for part in "".join(sections).split("\n### ")[1:]}
    body = "".join(sections) + "".join(
        text for title, text in earlier.items() if not any(t.startswith(title) for t in titles)
    )
    write_result("photos", head + body)
    gallery = RESULTS / "gallery.md"
    old = gallery.read_text() if gallery.exists() else ""
    old = old.split(SECTION)[0].rstrip("\n") + "\n"
    gallery.write_text(
        old + SECTION + "\n\n" + "\n".join(head.splitlines()[2:]) + "\n" + body, encoding="utf-8"
    )


if __name__ == "__main__":
    main()
