"""Fixtures for the gallery, CLI and server tests: a deterministic stand-in encoder and
generated photo folders.

ColorEncoder embeds an image as its 4x4 grid of mean colours (48 numbers, centred) and a text
by the colour words it names, so "red" finds red photos: search results can be predicted.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
from PIL import Image

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
    "white": (245, 245, 245),
    "black": (10, 10, 10),
    "purple": (140, 30, 160),
    "orange": (240, 140, 20),
}


class ColorEncoder:
    """A tiny deterministic encoder with the Encoder interface the gallery uses."""

    dim = 48
    image_size = 32

    def __init__(self, model_id: str = "color-v1") -> None:
        self.model_id = model_id
        self.images_encoded = 0
        self.texts_encoded = 0

    def _image(self, im: Any) -> np.ndarray:
        if not isinstance(im, Image.Image):
            from leanclip.images import load_image

            im = load_image(im, reduce_for=self.image_size)
        small = np.asarray(im.convert("RGB").resize((4, 4), Image.BILINEAR), dtype=np.float32)
        v = small.reshape(-1) / 255.0 - 0.5
        if self.model_id != "color-v1":  # another "model": a fixed rotation of the space
            v = v[::-1].copy()
        return v

    def encode_images(self, images: Sequence[Any], batch_size: int = 32) -> np.ndarray:
        out = np.stack([self._image(im) for im in images]).astype(np.float32)
        self.images_encoded += len(images)
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)

    def encode_text(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        out = []
        for t in texts:
            words = [w for w in t.lower().split() if w in COLORS]
            if words:
                rgb = np.mean([COLORS[w] for w in words], axis=0)
                v = np.tile(rgb / 255.0 - 0.5, 16).astype(np.float32)
            else:
                seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:4], "little")
                v = np.random.default_rng(seed).standard_normal(48).astype(np.float32)
            if self.model_id != "color-v1":
                v = v[::-1].copy()
            out.append(v)
        self.texts_encoded += len(texts)
        arr = np.stack(out)
        return arr / np.maximum(np.linalg.norm(arr, axis=1, keepdims=True), 1e-12)


def make_photo(
    path: Path,
    color: Tuple[int, int, int],
    seed: int = 0,
    size: Tuple[int, int] = (64, 48),
    fmt: str | None = None,
) -> Path:
    """A JPEG/PNG of one main colour with a little seeded noise (so every file is unique)."""
    rng = np.random.default_rng(seed)
    arr = np.clip(np.array(color, dtype=np.float32) + rng.normal(0, 12, (size[1], size[0], 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path, format=fmt)
    return path


def make_folder(
    root: Path, n_per_color: int = 2, colors: Sequence[str] = ("red", "green", "blue", "yellow")
) -> List[Path]:
    """``root/<color>/<color>_<i>.jpg`` for each colour."""
    out = []
    seed = 0
    for c in colors:
        for i in range(n_per_color):
            seed += 1
            out.append(make_photo(root / c / f"{c}_{i}.jpg", COLORS[c], seed=seed))
    return out


def set_mtime_later(path: Path, seconds: float = 5.0) -> None:
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + int(seconds * 1e9)))


# ----------------------------------------------------------------------- crash-test worker
#
# The kill tests (test_gallery.py, test_gallery_ivf.py, test_gallery_crash.py) run update() in a
# child process and SIGKILL it: `python -m tests._fixtures_gallery '<json config>'`, started
# with the repository root as the working directory (see update_worker_command).


def update_worker_command(root: Path, **config: Any) -> List[str]:
    """The argv of a child running ``Gallery(root, ...).update()`` under ``config``:

    * ``mode`` / ``at``: SIGKILL itself at the ``at``-th ``encode`` (inside a batch, before its
      vectors are applied), ``save`` (a checkpoint's files are saved, the rows not yet
      committed) or ``unlink`` (after a commit, removing the old generation's files); other
      modes (``time``, ``none``) never kill themselves;
    * ``delay``: seconds each encoder call sleeps; ``ivf_small``: an IVF index that lays itself
      out (trains) at 16 vectors;
    * the rest are Gallery keywords (``store``, ``batch_size``, ``checkpoint_every``, ...).

    The child prints ``start`` once the gallery is open, and ``done`` when update() returns.
    """
    import json
    import sys

    return [sys.executable, "-m", "tests._fixtures_gallery", json.dumps({"root": str(root), **config})]


def _update_worker(config: Dict[str, Any]) -> None:
    import signal
    import time

    import leanclip.gallery.store as store
    from leanclip.gallery import Gallery

    mode, at, delay = config.pop("mode", "none"), config.pop("at", 0), config.pop("delay", 0.0)
    counts = {"encode": 0, "save": 0, "unlink": 0}

    def tick(what: str) -> None:
        counts[what] += 1
        if mode == what and counts[what] == at:
            os.kill(os.getpid(), signal.SIGKILL)

    class Slow(ColorEncoder):
        def encode_images(self, images: Sequence[Any], batch_size: int = 32) -> np.ndarray:
            if delay:
                time.sleep(delay)
            tick("encode")
            return super().encode_images(images)

    real_set_meta = store.set_meta

    def set_meta(conn: Any, key: str, value: object) -> None:
        if key == "generation":  # a checkpoint: the new files are saved, the commit comes next
            tick("save")
        real_set_meta(conn, key, value)

    store.set_meta = set_meta
    real_unlink = os.unlink

    def unlink(path: Any, *a: Any, **k: Any) -> None:
        real_unlink(path, *a, **k)
        if str(path).endswith(".lci"):
            tick("unlink")

    os.unlink = unlink  # type: ignore[assignment]
    if config.pop("ivf_small", False):
        config["ivf_train_at"] = 16  # trains (lays itself out) on a few dozen photos
    g = Gallery(config.pop("root"), model=Slow(), **config)
    print("start", flush=True)
    g.update()
    print("done", flush=True)


if __name__ == "__main__":
    import json
    import sys

    _update_worker(json.loads(sys.argv[1]))


def use_color_encoder(monkeypatch: Any) -> None:
    """Make every ``leanclip.gallery.Gallery`` the CLI opens encode with ColorEncoder (no bundle)."""
    import leanclip.gallery as G

    real = G.Gallery

    class ColorGallery(real):  # type: ignore[misc,valid-type]
        def __init__(self, root: Any, store: Any = None, model: Any = None, **kw: Any) -> None:
            super().__init__(root, store=store, model=ColorEncoder(), **kw)

    monkeypatch.setattr(G, "Gallery", ColorGallery)
