"""``leanclip demo``: index real sample photos and answer a few queries, offline.

The photos come from packages installed with ``pip install -e '.[demo]'`` (scikit-image,
scikit-learn, matplotlib); their credits are written next to them in ``CREDITS.md``. The demo
also makes a phone photo (HEIC, with a capture date) and a receipt, and shows a text query
(``--ocr``), the near-duplicate groups and a date filter on them.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

TEXT_QUERIES: Sequence[str] = (
    "a cat",
    "a cup of coffee",
    "a rocket on the launch pad",
    "a motorcycle",
    "a flower",
    "coins",
    "a woman in uniform",
    "stars and galaxies in space",
)
IMAGE_QUERY = "chelsea.png"  # the cat


def run_demo(
    directory: Union[str, "os.PathLike[str]", None] = None,
    *,
    model: Any = None,
    echo: Optional[Callable[[str], Any]] = print,
    k: int = 3,
) -> Dict[str, Any]:
    """Collect the sample photos into ``directory``, index them, run the demo queries.

    Returns ``{"folder", "model_id", "index": summary, "queries": [{"query", "results"}]}``.
    """
    from leanclip._deps import missing
    from leanclip.gallery import Gallery
    from leanclip.registry import leanclip_home
    from leanclip.samples import collect_sample_photos, make_generated_samples

    say = echo or (lambda _msg: None)
    dest = Path(directory) if directory else leanclip_home() / "demo-photos"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        photos = collect_sample_photos(dest)
        photos += make_generated_samples(dest)
    for w in caught:
        say(f"note: {w.message}")
    say(f"{len(photos)} sample photos in {dest} (credits: {dest / 'CREDITS.md'})")

    t0 = time.perf_counter()
    ocr = not missing(["rapidocr_onnxruntime"])
    if not ocr:
        say("note: rapidocr-onnxruntime is not installed (pip install 'leanclip[ocr]'): no text query")
    video = not missing(["av"])
    gallery = Gallery(dest, model=model, ocr=ocr, video=video)
    say("loading the model (the first run builds the offline starter model; this takes a while) ...")
    enc = gallery.encoder
    say(f"model {enc.model_id} loaded in {time.perf_counter() - t0:.1f} s")
    summary = gallery.update()
    say(
        f"indexed: added {summary.added}, updated {summary.updated}, removed {summary.removed}, "
        f"renamed {summary.renamed}, failed {summary.failed} ({summary.total_ok} photos, {summary.seconds:.1f} s)"
    )

    queries = _queries(gallery, dest, k)
    features = _features(gallery, k, ocr=ocr, video=video)
    _show(say, queries, features, dest)
    return {
        "folder": str(dest),
        "model_id": enc.model_id,
        "index": summary.to_dict(),
        "queries": queries,
        "features": features,
    }


def _timed(query: str, search: Callable[..., Any], *args: Any) -> Dict[str, Any]:
    """``search(*args)``, timed, as the demo's query entry named ``query``."""
    t = time.perf_counter()
    hits = search(*args)
    return {
        "query": query,
        "ms": round((time.perf_counter() - t) * 1000, 1),
        "results": [h.to_dict() for h in hits],
    }


def _queries(gallery: Any, dest: Path, k: int) -> List[Dict[str, Any]]:
    """The text queries, then the image query when its photo is there, each timed."""
    queries = [_timed(q, gallery.search, q, k) for q in TEXT_QUERIES]
    image = dest / IMAGE_QUERY
    if image.is_file():
        queries.append(_timed(f"similar to {IMAGE_QUERY}", gallery.similar, image, k))
    return queries


def _features(gallery: Any, k: int, *, ocr: bool, video: bool) -> Dict[str, Any]:
    """Text in photos (with OCR), the cat in the clip (with video), near-duplicates, a date filter."""
    features: Dict[str, Any] = {}
    if ocr:
        hits = gallery.search('text:"total 42.50"', k)
        features["text"] = {"query": 'text:"total 42.50"', "results": [h.to_dict() for h in hits]}
    if video:
        hits = [h for h in gallery.search("a cat", 10) if h.t is not None][:1]
        features["video"] = {"query": "a cat (in the clip)", "results": [h.to_dict() for h in hits]}
    _, groups = gallery.duplicates()
    features["duplicates"] = [[h.name for h in g] for g in groups]
    hits = gallery.search("a cup of coffee", k, after="2024", before="2025")
    features["dates"] = {
        "query": "a cup of coffee --after 2024 --before 2025",
        "results": [h.to_dict() for h in hits],
    }
    return features


def _show(
    say: Callable[[str], Any], queries: List[Dict[str, Any]], features: Dict[str, Any], dest: Path
) -> None:
    for entry in queries:
        say("")
        say(f"{entry['query']!r}  ({entry['ms']} ms)")
        for i, r in enumerate(entry["results"], 1):
            say(f"  {i}. {r['name']:<26} {r['score']:.3f}")
    if "text" in features:
        say("")
        say(
            f"text in photos, {features['text']['query']}: {[r['name'] for r in features['text']['results']]}"
        )
    if features.get("video", {}).get("results"):
        r = features["video"]["results"][0]
        say(f"video: 'a cat' in {r['name']} at {r['t']:.1f} s")
    say(f"near-duplicates (leanclip duplicates): {features['duplicates']}")
    say(f"taken in 2024 (--after 2024 --before 2025): {[r['name'] for r in features['dates']['results']]}")
    say("")
    say(f"try: leanclip search 'a cat' -d {dest}    or    leanclip serve {dest}")
