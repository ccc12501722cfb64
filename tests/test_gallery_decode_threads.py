"""The gallery update decodes photos on a bounded pool of threads (``decode_threads``): the
store it writes is the one the serial path writes, failures included; the pool holds a bounded
number of photos ahead, and an interrupt stops it and loses nothing."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import pytest
from click.testing import CliRunner

from leanclip._pool import default_decode_threads, ordered_map
from leanclip.gallery import Gallery, GalleryError
from tests._fixtures_gallery import COLORS, ColorEncoder, make_photo, use_color_encoder


def _mixed_folder(root: Path) -> None:
    """Good photos (JPEG, PNG) with unreadable files among them, in several batches of 3."""
    colors = list(COLORS.values())
    for i in range(14):
        fmt = "PNG" if i % 4 == 3 else None
        make_photo(root / f"p{i:02d}.{'png' if fmt else 'jpg'}", colors[i % len(colors)], seed=i, fmt=fmt)
    (root / "p03b_empty.jpg").write_bytes(b"")
    (root / "p05b_text.jpg").write_text("not an image")
    data = make_photo(root / "src.jpg", COLORS["orange"], seed=99, size=(256, 256)).read_bytes()
    (root / "src.jpg").unlink()
    (root / "p08b_truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "p13b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)


def _stored(g: Gallery) -> Dict[str, Any]:
    """Everything the update wrote that the decoding could change: rows, failures, vectors and
    looks by name."""
    g._forget_snapshot()
    _, index, _ = g._snapshot()
    rows = g.files()
    keys = [k for _, status, k in rows if status == "ok" and k is not None]
    vecs = np.asarray(index.get(np.asarray(keys, dtype=np.uint64)), dtype=np.float32)
    conn = sqlite3.connect(g.db_path)
    try:
        looks = dict(conn.execute("SELECT key, look FROM looks").fetchall())
    finally:
        conn.close()
    return {
        "rows": rows,
        "failures": sorted(g.failures()),
        "vectors": dict(zip(keys, vecs)),
        "looks": {k: looks.get(k) for k in keys},
    }


def test_threads_store_what_the_serial_path_stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import leanclip.gallery.encoding as encoding

    root = tmp_path / "photos"
    _mixed_folder(root)
    decoded_on: List[str] = []
    real_load = encoding.load_image

    def load(*a: Any, **k: Any) -> Any:
        decoded_on.append(threading.current_thread().name)
        return real_load(*a, **k)

    monkeypatch.setattr(encoding, "load_image", load)
    got = {}
    for threads in (1, 4):
        decoded_on.clear()
        g = Gallery(
            root,
            store=tmp_path / f"store{threads}",
            model=ColorEncoder(),
            batch_size=3,
            decode_threads=threads,
        )
        s = g.update()
        assert (s.added, s.failed, s.encoded) == (14, 4, 14)
        got[threads] = _stored(g)
        on_pool = [n.startswith("leanclip-decode") for n in decoded_on]
        assert len(decoded_on) == 18 and (all(on_pool) if threads > 1 else not any(on_pool))
        g.close()
    serial, pooled = got[1], got[4]
    assert pooled["rows"] == serial["rows"]  # same names, statuses and keys
    assert pooled["failures"] == serial["failures"]
    reasons = dict(serial["failures"])
    assert set(reasons) == {"p03b_empty.jpg", "p05b_text.jpg", "p08b_truncated.jpg", "p13b_corrupt.png"}
    assert "empty" in reasons["p03b_empty.jpg"] and "truncated" in reasons["p08b_truncated.jpg"]
    assert serial["vectors"].keys() == pooled["vectors"].keys() and len(serial["vectors"]) == 14
    for k, v in serial["vectors"].items():
        np.testing.assert_array_equal(pooled["vectors"][k], v)
    assert all(v is not None for v in serial["looks"].values())
    assert pooled["looks"] == serial["looks"]


def test_ordered_map_keeps_order_and_a_bounded_number_ahead() -> None:
    started: List[int] = []
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.001 * (7 - i % 7))  # later items often finish first
        return i * i

    out = []
    gen = ordered_map(work, range(40), threads=4, ahead=5)
    for n, got in enumerate(gen, start=1):
        out.append(got)
        if n == 10:
            deadline = time.monotonic() + 10
            while len(started) < n + 5 and time.monotonic() < deadline:
                time.sleep(0.005)  # the pool works ahead while the caller holds item 10 ...
            time.sleep(0.05)
            assert len(started) == n + 5  # ... and no further
        assert len(started) <= n + 5
    assert out == [i * i for i in range(40)]
    # one thread: each item is computed when asked for, in the caller's thread
    seen: List[str] = []
    serial = ordered_map(lambda i: seen.append(threading.current_thread().name) or i, range(3), 1, 5)
    assert next(serial) == 0 and len(seen) == 1 and seen[0] == threading.current_thread().name


def test_ordered_map_raises_in_place_and_close_stops_the_threads() -> None:
    def work(i: int) -> int:
        if i == 6:
            raise ValueError("six")
        time.sleep(0.01)
        return i

    gen = ordered_map(work, range(100), threads=3, ahead=4)
    assert [next(gen) for _ in range(6)] == list(range(6))
    with pytest.raises(ValueError, match="six"):
        next(gen)
    assert not [t for t in threading.enumerate() if t.name.startswith("leanclip-decode")]
    gen2 = ordered_map(work, range(100), threads=3, ahead=4)
    next(gen2)
    gen2.close()  # cancels what has not started, waits for the rest
    assert not [t for t in threading.enumerate() if t.name.startswith("leanclip-decode")]


class _Interrupting(ColorEncoder):
    """Raises KeyboardInterrupt (Ctrl-C) in its ``at``-th call."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.calls = at, 0

    def encode_images(self, images: Sequence[Any], batch_size: int = 32) -> np.ndarray:
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return super().encode_images(images)


def test_interrupt_with_threads_stops_them_and_the_next_update_resumes(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    _mixed_folder(root)
    g = Gallery(root, model=_Interrupting(at=3), batch_size=3, decode_threads=4)
    with pytest.raises(KeyboardInterrupt):
        g.update()
    assert not [t for t in threading.enumerate() if t.name.startswith("leanclip-decode")]
    g.close()
    g = Gallery(root, model=ColorEncoder(), batch_size=3, decode_threads=4)
    s = g.update()
    assert s.encoded + s.failed < 18  # the batches applied before the interrupt were kept
    assert len([r for r in g.files() if r[1] == "ok"]) == 14 and len(g.failures()) == 4
    missing, extra = g.check()
    assert missing == [] and extra == []


def test_decode_threads_option(tmp_path: Path) -> None:
    assert Gallery(tmp_path, model=ColorEncoder()).update_options().decode_threads == default_decode_threads()
    assert 1 <= default_decode_threads() <= 4
    assert Gallery(tmp_path, model=ColorEncoder(), decode_threads=2).update_options().decode_threads == 2
    for bad in (0, -1, 1.5, True):
        with pytest.raises(GalleryError, match="decode_threads"):
            Gallery(tmp_path, model=ColorEncoder(), decode_threads=bad)  # type: ignore[arg-type]


def test_cli_decode_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from leanclip.cli import EXIT_FAILED_FILES, main

    use_color_encoder(monkeypatch)
    root = tmp_path / "photos"
    _mixed_folder(root)
    ok = CliRunner().invoke(
        main, ["index", str(root), "--decode-threads", "2", "--json", "--batch-size", "3"]
    )
    assert ok.exit_code == EXIT_FAILED_FILES, ok.output  # the four unreadable files
    assert '"encoded": 14' in ok.output and '"failed": 4' in ok.output
    bad = CliRunner().invoke(main, ["index", str(root), "--decode-threads", "0"])
    assert bad.exit_code == 2 and "--decode-threads" in bad.output
