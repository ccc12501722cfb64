"""The paper's Table 3 (encoder efficiency) on this CPU, through leanclip's ONNX bundles.

    OMP_NUM_THREADS=2 python -m benchmarks.bench_encoders [--work DIR] [--quick]

Models (full-size architectures, RANDOM weights: no model hub here; speed, size and memory do
not depend on the weight values, retrieval agreement does somewhat):
  teacher   open_clip ViT-B-32 image + 12-layer text
  s16-s6    timm vit_small_patch16_224 + first 6 teacher text layers (the paper's student)
  s16-s4    timm vit_small_patch16_224 + first 4 layers (the paper's S4)
  s32-s4    timm vit_small_patch32_224 + first 4 layers (the CPU-fast student)
each exported once (fp32, and int8 from the same export) and reused from --work on a rerun.

Measured, all in one run so ratios to the teacher are comparable: file sizes, image and text
throughput at batch 1 and 32 with 2 onnxruntime threads (texts are real captions, padded to the
longest in the batch, as the Encoder does), eager-torch image throughput at batch 32 (what ONNX
changes), and, in a fresh subprocess per bundle, load time, peak RSS and query latency of a
process that loads both encoders and answers one text query over a 1,000-image index; finally
int8-vs-fp32 top-10 agreement of text-to-image retrieval over crops of real sample photos.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
from benchmarks import _harness as H  # noqa: E402

THREADS = 2
CAPTIONS = [
    "a dog playing in the snow",
    "a man riding a motorcycle on a dirt road",
    "two cats sleeping on a couch",
    "a plate of food with broccoli and rice",
    "an astronaut in a white space suit",
    "a cup of coffee on a wooden table",
    "a rocket launching into a clear blue sky",
    "a close up photo of a colourful flower",
    "a city skyline at night with many lights",
    "children playing football in a park on a sunny afternoon",
    "an old black and white portrait of a woman in uniform",
    "a bowl of fruit",
    "coins on a dark background",
    "a traditional chinese temple with trees around it",
    "a red sports car parked in front of a modern building",
    "people walking on a beach at sunset",
]

MODELS = [  # name, image backbone (None: teacher), text layers
    ("teacher", None, 12),
    ("s16-s6", "vit_small_patch16_224", 6),
    ("s16-s4", "vit_small_patch16_224", 4),
    ("s32-s4", "vit_small_patch32_224", 4),
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------ export


def build_models(quick: bool) -> Dict[str, Any]:
    import torch

    from training import models as M

    torch.manual_seed(0)
    teacher = M.build_teacher("ViT-B-32", pretrained=None, tiny=quick).eval()
    out = {"teacher": teacher}
    for name, backbone, layers in MODELS[1:]:
        out[name] = M.build_student(
            str(backbone), text_layers=layers if not quick else min(layers, 4), teacher=teacher, tiny=quick
        ).eval()
    return out


def export_all(work: Path, quick: bool) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Export every model (fp32 + int8) unless already in ``work``; returns eager-torch image
    throughput at batch 32 and export seconds per model."""
    import torch

    from leanclip.export import export_model
    from leanclip.quantize import quantize_bundle

    eager: Dict[str, float] = {}
    export_s: Dict[str, float] = {}
    for name, _, _ in MODELS:  # an fp32 bundle without its int8 twin: quantize it (no torch export)
        if (work / name / "leanclip.json").is_file() and not (
            work / f"{name}-int8" / "leanclip.json"
        ).is_file():
            t0 = time.perf_counter()
            quantize_bundle(work / name, work / f"{name}-int8")
            log(f"quantized {name} in {time.perf_counter() - t0:.0f} s")
    todo = [
        m
        for m in MODELS
        if not (
            (work / m[0] / "leanclip.json").is_file() and (work / f"{m[0]}-int8" / "leanclip.json").is_file()
        )
    ]
    eager_file = work / "eager_torch.json"
    if not todo and eager_file.is_file():
        log("all bundles present in --work: reusing them")
        return json.loads(eager_file.read_text()), {}  # measured when the bundles were exported
    torch.set_num_threads(THREADS)
    models = build_models(quick)
    for name, backbone, _ in MODELS:
        model = models[name]
        if (
            backbone in (None, "vit_small_patch16_224", "vit_small_patch32_224")
            and (backbone or "teacher") not in eager
        ):
            size = model.image_size
            px = torch.randn(32, 3, size, size)
            with torch.no_grad():
                t = H.timeit(lambda: model.encode_image(px), repeat=2, warmup=1)
            eager[backbone or "teacher"] = 32 / t
            log(f"eager torch {backbone or 'teacher'} image b32: {32 / t:.1f} img/s")
    for name, backbone, layers in MODELS:
        if (name, backbone, layers) not in todo:
            continue
        t0 = time.perf_counter()
        src = f"RANDOM weights: {'open_clip ViT-B-32' if backbone is None else f'timm {backbone} + {layers}-layer CLIP text'}"
        export_model(models[name], work / name, name=name, source=src, int8_out_dir=work / f"{name}-int8")
        export_s[name] = time.perf_counter() - t0
        log(f"exported {name} (fp32 + int8) in {export_s[name]:.0f} s")
    eager_file.write_text(json.dumps(eager))
    del models
    gc.collect()
    return eager, export_s


# ------------------------------------------------------------------------------------- timing


def mb(path: Path) -> float:
    return path.stat().st_size / 1e6


TOWER = r"""
import json, sys, time
import numpy as np
from leanclip.encoder import Encoder
enc = Encoder({bundle!r}, threads={threads})
captions = {captions!r}
rnd = {rnd}
def median_time(fn, n, warm=1):
    for i in range(warm):  # warm-up: first-run allocations, per input shape
        fn(i)
    t = []
    for i in range(n):
        t0 = time.perf_counter(); fn(i); t.append(time.perf_counter() - t0)
    return float(np.median(t))
if {which!r} == "image":
    sess, spec = enc._session("image"), enc.manifest.image
    px = np.random.default_rng(rnd).standard_normal((32, 3, spec.size, spec.size)).astype(np.float32)
    run = lambda x: sess.run([spec.output], {{spec.input: x}})
    out = dict(b1=median_time(lambda i: run(px[i % 32:i % 32 + 1]), 8), b32=median_time(lambda i: run(px), 3))
else:
    enc._session("text")
    qs = captions[rnd % len(captions):] + captions[:rnd % len(captions)]
    batch = (captions * 2)[:32]
    # a warm session has seen every caption length, as a search server's has
    out = dict(b1=median_time(lambda i: enc.encode_text([qs[i % len(qs)]]), 3 * len(qs), warm=len(qs)),
               b32=median_time(lambda i: enc.encode_text(batch, batch_size=32), 3))
print(json.dumps(out))
"""


def time_tower(bundle: Path, which: str, rnd: int) -> Dict[str, float]:
    """Seconds per call at batch 1 and 32 of one tower (image.onnx on preprocessed pixels, or
    Encoder.encode_text on real captions), in a fresh process with the Encoder's defaults."""
    code = TOWER.format(
        bundle=str(bundle),
        threads=THREADS,
        captions=CAPTIONS,
        rnd=rnd,
        which=which,
    )
    return run_script(code, f"timing {which} of {bundle}")


def run_script(code: str, what: str) -> Dict[str, Any]:
    """Runs ``code`` in a fresh Python process and returns the JSON object it prints last."""
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    if res.returncode != 0:
        raise RuntimeError(f"{what} failed: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


PROBE = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import numpy as np
from leanclip.encoder import Encoder
t_import = time.perf_counter() - t0
t1 = time.perf_counter()
enc = Encoder({bundle!r}, threads={threads}).load()
t_load = time.perf_counter() - t1
rng = np.random.default_rng(0)
vecs = rng.standard_normal((1000, enc.dim)).astype(np.float32)
vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
try:
    from leanclip import Index
    index = Index(enc.dim, metric="cos")
    index.add(np.arange(1000, dtype=np.uint64), vecs)
    search = lambda q: index.search(q, k=10)
    backend = "leanclip.Index"
except Exception as exc:  # the compiled engine is not built in this checkout
    search = lambda q: np.argsort(-(vecs @ q[0]))[:10]
    backend = "numpy (leanclip.Index unavailable: " + type(exc).__name__ + ")"
t2 = time.perf_counter()
search(enc.encode_text(["a dog playing in the snow"]))
first = time.perf_counter() - t2
warm = []
for q in ["two cats on a couch", "a red car", "people on a beach at sunset"]:
    t3 = time.perf_counter(); search(enc.encode_text([q])); warm.append(time.perf_counter() - t3)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec from the (large) parent
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
peak = int(hwm[0].split()[1]) / 1024.0 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
print(json.dumps(dict(import_s=t_import, load_s=t_load, first_query_s=first, warm_query_s=sorted(warm)[1],
                      peak_rss_mb=peak, backend=backend)))
"""


def probe(bundle: Path) -> Dict[str, Any]:
    code = PROBE.format(bundle=str(bundle), threads=THREADS)
    return run_script(code, f"probe of {bundle}")


# -------------------------------------------------------------------------------- agreement


def photo_crops(n: int, size: int = 256) -> List[Any]:
    """n images: random crops of the real sample photos shipped in installed packages."""
    from PIL import Image

    from leanclip.samples import collect_sample_photos

    tmp = Path(tempfile.mkdtemp(prefix="leanclip-bench-photos-"))
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            paths = collect_sample_photos(tmp)
        photos = []
        for p in paths:
            try:
                with Image.open(p) as im:
                    photos.append(im.convert("RGB"))
            except OSError:
                pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rng = random.Random(0)
    out = []
    if not photos:  # no sample packages: smooth random colour fields
        for i in range(n):
            a = np.random.default_rng(i).integers(0, 255, (8, 8, 3), dtype=np.uint8)
            out.append(Image.fromarray(a).resize((size, size), Image.Resampling.BICUBIC))
        return out
    for i in range(n):
        ph = photos[i % len(photos)]
        w, h = ph.size
        s = rng.uniform(0.35, 1.0) * min(w, h)
        x, y = rng.uniform(0, w - s), rng.uniform(0, h - s)
        crop = ph.crop((int(x), int(y), int(x + s), int(y + s))).resize(
            (size, size), Image.Resampling.BICUBIC
        )
        out.append(crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop)
    return out


def topk_agreement(
    img32: np.ndarray, img8: np.ndarray, q32: np.ndarray, q8: np.ndarray, k: int = 10
) -> float:
    a = np.argsort(-(q32 @ img32.T), axis=1)[:, :k]
    b = np.argsort(-(q8 @ img8.T), axis=1)[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))


# ------------------------------------------------------------------------------- quant variants


def quant_variants(work: Path, reps: int) -> List[List[Any]]:
    """Which onnxruntime dynamic quantization suits this AVX2 CPU: the teacher image tower."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = work / "teacher" / "image.onnx"
    rows = []
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the Encoder
    so.log_severity_level = 3
    px1 = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    px8 = np.random.default_rng(2).standard_normal((8, 3, 224, 224)).astype(np.float32)
    ref_s = ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    ref = ref_s.run(None, {"pixel_values": px8})[0]
    t_ref = H.timeit(lambda: ref_s.run(None, {"pixel_values": px1}), repeat=reps, warmup=1)
    variants = [
        (
            "QInt8 weights, per-channel, MatMul/Gemm (shipped)",
            dict(weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul", "Gemm"]),
        ),
        (
            "QInt8 weights, per-tensor",
            dict(weight_type=QuantType.QInt8, per_channel=False, op_types_to_quantize=["MatMul", "Gemm"]),
        ),
        (
            "QUInt8 weights, per-tensor",
            dict(weight_type=QuantType.QUInt8, per_channel=False, op_types_to_quantize=["MatMul", "Gemm"]),
        ),
        (
            "QInt8 per-channel, + Conv (ConvInteger)",
            dict(
                weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul", "Gemm", "Conv"]
            ),
        ),
    ]
    import logging

    logging.getLogger().setLevel(logging.ERROR)
    for label, kw in variants:
        dst = work / "quant-variant.onnx"
        try:
            quantize_dynamic(str(src), str(dst), **kw)
            s = ort.InferenceSession(str(dst), so, providers=["CPUExecutionProvider"])
            got = s.run(None, {"pixel_values": px8})[0]
            cos = float(
                (np.sum(got * ref, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)).min()
            )
            t = H.timeit(lambda: s.run(None, {"pixel_values": px1}), repeat=reps, warmup=1)
            rows.append([label, mb(dst), t_ref / t, f"{cos:.5f}"])
        except Exception as exc:  # a variant onnxruntime cannot build or run is reported as such
            rows.append([label, float("nan"), float("nan"), f"failed: {type(exc).__name__}"])
        finally:
            if dst.exists():
                dst.unlink()
    return rows


# ------------------------------------------------------------------------------------------ main


# Which unique tower each model's image and text halves are (models share towers: one timing each).
IMAGE_TOWER = {"teacher": "teacher", "s16-s6": "s16", "s16-s4": "s16", "s32-s4": "s32"}
TEXT_TOWER = {"teacher": "12L", "s16-s6": "6L", "s16-s4": "4L", "s32-s4": "4L"}
TEACHER = ("teacher", "fp32")
Rates = Dict[Tuple[str, str], Dict[str, float]]


@dataclass
class Measured:
    """Everything one run measures, keyed by (model or tower, precision)."""

    img_rows: Rates  # (image tower, prec) -> {"b1", "b32"} images/s
    txt_rows: Rates  # (text tower, prec) -> {"b1", "b32"} texts/s
    sizes: Rates  # (model, prec) -> {"image", "text", "bundle"} MB
    probes: Dict[Tuple[str, str], Dict[str, Any]]  # (model, prec) -> fresh-process probe
    agreement: Dict[str, float]  # model -> int8 vs fp32 top-10 agreement
    n_queries: int  # captions in the agreement test


def bundle_dir(work: Path, name: str, prec: str) -> Path:
    return work / (name if prec == "fp32" else f"{name}-int8")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--work",
        default=str(Path(tempfile.gettempdir()) / "leanclip-bench-encoders"),
        help="where bundles are exported (and reused on a rerun)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny models: a smoke test of this script")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--images", type=int, default=200, help="photos in the agreement index")
    ap.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/encoders.md")
    return ap.parse_args(argv)


def measure_throughput(work: Path, reps: int) -> Tuple[Rates, Rates, Rates]:
    """Image and text rates per unique tower and precision, and each bundle's file sizes."""
    from leanclip.encoder import Encoder

    img_rows: Rates = {}
    txt_rows: Rates = {}
    sizes: Rates = {}
    # Each tower is timed in a fresh process of its own, as in a user's app: several onnxruntime
    # sessions in one process disturb each other's timings (a tower ran just before leaves its
    # threads busy). Rounds go over every tower in turn, so that the load of this shared machine
    # drifting during the run hits every model alike; each figure is the median over rounds.
    towers: Dict[Tuple[str, Tuple[str, str]], Path] = {}
    for name, _, _ in MODELS:
        for prec in ("fp32", "int8"):
            bdir = bundle_dir(work, name, prec)
            enc = Encoder(bdir, threads=THREADS)
            sizes[(name, prec)] = {
                "image": mb(bdir / "image.onnx"),
                "text": mb(bdir / "text.onnx"),
                "bundle": sum(mb(bdir / f) for f in enc.manifest.files),
            }
            towers.setdefault(("image", (IMAGE_TOWER[name], prec)), bdir)
            towers.setdefault(("text", (TEXT_TOWER[name], prec)), bdir)
    samples: Dict[Tuple[str, Tuple[str, str]], Dict[str, List[float]]] = {}
    for rnd in range(reps):
        log(f"timing round {rnd + 1}/{reps} ({len(towers)} towers, one process each)")
        for (which, key), bdir in towers.items():
            got = time_tower(bdir, which, rnd)
            for b, secs in got.items():
                samples.setdefault((which, key), {}).setdefault(b, []).append(secs)
    for (which, key), per in samples.items():
        rates = {"b1": 1 / float(np.median(per["b1"])), "b32": 32 / float(np.median(per["b32"]))}
        (img_rows if which == "image" else txt_rows)[key] = rates
    return img_rows, txt_rows, sizes


def measure_probes(work: Path) -> Dict[Tuple[str, str], Dict[str, Any]]:
    """The iPhone test, one fresh process per bundle."""
    probes: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for name, _, _ in MODELS:
        for prec in ("fp32", "int8"):
            log(f"probe {name} {prec}")
            probes[(name, prec)] = probe(bundle_dir(work, name, prec))
    return probes


def measure_agreement(work: Path, n_images: int) -> Tuple[Dict[str, float], int]:
    """int8 vs fp32 retrieval agreement per model, and the number of captions asked."""
    from leanclip.encoder import Encoder

    log("agreement")
    photos = photo_crops(n_images)
    queries = CAPTIONS * 3
    queries = [
        q if i < len(CAPTIONS) else f"{q} {['in the morning', 'seen from above'][i // len(CAPTIONS) - 1]}"
        for i, q in enumerate(queries)
    ]
    img_emb: Dict[Tuple[str, str], np.ndarray] = {}
    agreement: Dict[str, float] = {}
    for name, _, _ in MODELS:
        embs = {}
        for prec in ("fp32", "int8"):
            enc = Encoder(bundle_dir(work, name, prec), threads=THREADS)
            key = (IMAGE_TOWER[name], prec)
            if key not in img_emb:
                img_emb[key] = enc.encode_images(photos)
            embs[prec] = (img_emb[key], enc.encode_text(queries))
        agreement[name] = topk_agreement(embs["fp32"][0], embs["int8"][0], embs["fp32"][1], embs["int8"][1])
    return agreement, len(queries)


def main_table(m: Measured) -> str:
    """One row per bundle: sizes, throughput, the fresh-process probe and agreement."""
    sizes = m.sizes
    ti, tt = m.img_rows[TEACHER], m.txt_rows[("12L", "fp32")]
    rows = []
    for name, _backbone, _layers in MODELS:
        for prec in ("fp32", "int8"):
            i, t = m.img_rows[(IMAGE_TOWER[name], prec)], m.txt_rows[(TEXT_TOWER[name], prec)]
            s, p = sizes[(name, prec)], m.probes[(name, prec)]
            rows.append(
                [
                    f"{name} {prec}",
                    s["image"],
                    s["text"],
                    f"{s['bundle']:.0f} ({s['bundle'] / sizes[TEACHER]['bundle']:.0%})",
                    f"{i['b1']:.1f} ({i['b1'] / ti['b1']:.2f}x)",
                    f"{i['b32']:.1f} ({i['b32'] / ti['b32']:.2f}x)",
                    f"{t['b1']:.0f} ({t['b1'] / tt['b1']:.2f}x)",
                    f"{t['b32']:.0f} ({t['b32'] / tt['b32']:.2f}x)",
                    p["load_s"],
                    p["peak_rss_mb"],
                    p["first_query_s"] * 1000,
                    p["warm_query_s"] * 1000,
                    "–" if prec == "fp32" else f"{m.agreement[name]:.2f}",
                ]
            )
    return H.markdown_table(
        [
            "model",
            "image.onnx MB",
            "text.onnx MB",
            "bundle MB (vs teacher)",
            "QPS_v b1",
            "QPS_v b32",
            "QPS_t b1",
            "QPS_t b32",
            "load s",
            "peak RSS MB",
            "1st query ms",
            "warm query ms",
            "int8 top-10 agreement",
        ],
        rows,
    )


def eager_table(eager: Dict[str, float], export_s: Dict[str, float], img_rows: Rates, work: Path) -> str:
    """Eager torch against ONNX for each image tower at batch 32."""
    ti = img_rows[TEACHER]
    eager_rows = []
    for ekey, label in (
        ("teacher", "teacher ViT-B/32"),
        ("vit_small_patch16_224", "ViT-S/16"),
        ("vit_small_patch32_224", "ViT-S/32"),
    ):
        tower = {"teacher": "teacher", "vit_small_patch16_224": "s16", "vit_small_patch32_224": "s32"}[ekey]
        if ekey in eager:
            eager_rows.append(
                [
                    label,
                    f"{eager[ekey]:.1f} ({eager[ekey] / eager['teacher']:.2f}x)",
                    f"{img_rows[(tower, 'fp32')]['b32']:.1f} ({img_rows[(tower, 'fp32')]['b32'] / ti['b32']:.2f}x)",
                    f"{img_rows[(tower, 'int8')]['b32']:.1f} ({img_rows[(tower, 'int8')]['b32'] / ti['b32']:.2f}x)",
                ]
            )
    table = H.markdown_table(
        ["image tower", "eager torch b32 img/s", "ONNX fp32 b32", "ONNX int8 b32"], eager_rows
    )
    if not export_s:
        table += (
            "\n\nThe eager-torch column was measured when the bundles were exported (an earlier run, "
            f"{time.ctime((work / 'eager_torch.json').stat().st_mtime)}), not in this run: compare its "
            "ratios, not its figures, with the ONNX columns."
        )
    return table


def target_table(m: Measured) -> str:
    """Issue 8's targets, each measured against its goal."""
    img_rows, txt_rows, sizes = m.img_rows, m.txt_rows, m.sizes
    ti, tt = img_rows[TEACHER], txt_rows[("12L", "fp32")]

    def ratio(a: float, b: float) -> float:
        return a / b

    s32 = ("s32", "fp32")
    checks = []

    def target(label: str, value: float, goal: str, ok: bool) -> None:
        checks.append([label, f"{value:.2f}", goal, "met" if ok else "NOT met"])

    r = ratio(img_rows[s32]["b1"], ti["b1"])
    target("CPU-fast student (S/32) image QPS vs teacher, b1", r, ">= 2x", r >= 2)
    r = ratio(img_rows[s32]["b32"], ti["b32"])
    target("CPU-fast student (S/32) image QPS vs teacher, b32", r, ">= 2x", r >= 2)
    for b in ("b1", "b32"):
        r = ratio(txt_rows[("4L", "fp32")][b], tt[b])
        target(f"S4 text QPS vs teacher, {b}", r, ">= 2.7x", r >= 2.7)
    r = sizes[("s32-s4", "fp32")]["image"] + sizes[("s32-s4", "fp32")]["text"]
    r /= sizes[TEACHER]["image"] + sizes[TEACHER]["text"]
    target("fp32 student (S/32+S4) ONNX size / teacher", r, "<= 0.45", r <= 0.45)
    r = ratio(
        sizes[("s16-s6", "fp32")]["image"] + sizes[("s16-s6", "fp32")]["text"],
        sizes[TEACHER]["image"] + sizes[TEACHER]["text"],
    )
    target("fp32 paper student (S/16+S6) ONNX size / teacher", r, "<= 0.45", r <= 0.45)
    for name in ("teacher", "s32-s4"):
        it, tx = IMAGE_TOWER[name], TEXT_TOWER[name]
        for b in ("b1", "b32"):
            r = img_rows[(it, "int8")][b] / img_rows[(it, "fp32")][b]
            target(f"int8/fp32 image speed, {name} {b}", r, ">= 1.5x", r >= 1.5)
            r = txt_rows[(tx, "int8")][b] / txt_rows[(tx, "fp32")][b]
            target(f"int8/fp32 text speed, {name} {b}", r, ">= 1.5x", r >= 1.5)
        r = (sizes[(name, "int8")]["image"] + sizes[(name, "int8")]["text"]) / (
            sizes[(name, "fp32")]["image"] + sizes[(name, "fp32")]["text"]
        )
        target(f"int8/fp32 ONNX size, {name}", r, "<= 0.30", r <= 0.30)
    for name, _, _ in MODELS:
        agree = m.agreement[name]
        target(f"int8 top-10 agreement with fp32, {name}", agree, ">= 0.9", agree >= 0.9)
    return H.markdown_table(["target", "measured", "goal", ""], checks)


def method_note(args: argparse.Namespace, m: Measured, total_s: float, load_start: float) -> str:
    """How it was measured (read at the end of the run: it quotes the load average now)."""
    backend = m.probes[TEACHER]["backend"]
    return (
        "All models have **random weights** (no model hub on this machine): the architectures are "
        "full size, so sizes, speeds and memory are representative; retrieval agreement on random "
        "weights is a stress test of quantization, not a quality measure.\n"
        f"onnxruntime, {THREADS} intra-op threads, the Encoder's defaults (no thread spinning); each tower "
        f"timed in a fresh process of its own, {args.reps} rounds over all towers in turn (per process: batch 1, "
        f"8 images or 3 x {len(CAPTIONS)} captions, after one warm-up call or one pass over the captions; batch 32, 3 calls "
        "after one warm-up), medians. "
        "QPS_v: images/s of image.onnx on preprocessed pixels; QPS_t: texts/s of Encoder.encode_text on real "
        "captions (tokenization included, padded to the longest in the batch, as the Encoder does). "
        "Ratios in parentheses are to the fp32 teacher in this run.\n"
        f"load / RSS / query: a fresh process imports leanclip.encoder, loads both encoders "
        f"(Encoder(...).load()), builds a 1,000-vector index ({backend}) and answers text queries; "
        f"peak RSS is that process's maximum resident set. Agreement: text-to-image top-10 overlap, int8 vs fp32 "
        f"end to end ({m.n_queries} captions over {args.images} crops of the sample photos). "
        f"Whole benchmark: {total_s / 60:.1f} min; 1-minute load average {load_start:.1f} at the start and "
        f"{os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} cores (a shared machine: absolute figures "
        "drop with the load, ratios measured in one run hold better)."
        + (" QUICK MODE: tiny models, numbers meaningless." if args.quick else "")
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
    work = Path(args.work) / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    load_start = os.getloadavg()[0]

    eager, export_s = export_all(work, args.quick)
    img_rows, txt_rows, sizes = measure_throughput(work, args.reps)
    probes = measure_probes(work)
    agreement, n_queries = measure_agreement(work, args.images)
    m = Measured(img_rows, txt_rows, sizes, probes, agreement, n_queries)
    log("quantization variants")
    variants = quant_variants(work, max(args.reps * 3, 5)) if not args.quick else []
    total_s = time.perf_counter() - started

    table = main_table(m)
    eager_text = eager_table(eager, export_s, img_rows, work)
    targets = target_table(m)
    note = method_note(args, m, total_s, load_start)
    text = H.header(
        "Encoder efficiency (paper Table 3) on this CPU",
        ["onnxruntime", "torch", "open_clip_torch", "timm"],
        note,
    )
    text += "\n" + table + "\n\n## Targets (issue 8)\n\n" + targets + "\n"
    text += "\n## Eager torch vs ONNX, image towers at batch 32\n\n" + eager_text + "\n"
    text += (
        "\nThe paper's ViT-S/16 has 196 tokens to ViT-B/32's 49, so its FLOPs match the teacher's: "
        "on a CPU it is not faster than the teacher at batch 32, in eager torch or in ONNX.\n"
    )
    if variants:
        text += (
            "\n## Dynamic int8 variants (teacher image tower, batch 1, speed-up over fp32, min cosine to fp32)\n\n"
            + H.markdown_table(["variant", "MB", "speed-up b1", "min cos"], variants)
            + "\n"
        )
    if export_s:
        text += (
            "\nExport (fp32 + int8, with self-checks) took "
            + ", ".join(f"{k} {v:.0f} s" for k, v in export_s.items())
            + ".\n"
        )
    if args.no_write:
        print(text)
    else:
        H.write_result("encoders" if not args.quick else "encoders-quick", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
