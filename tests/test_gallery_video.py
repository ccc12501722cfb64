"""Video clips (``--video``, PyAV): frames sampled at an interval and encoded like photos; a hit
is a clip and a time; incremental, renames and removals follow the clip; a corrupt clip is
recorded as failed with its reason; the page shows the frame and links the clip at that time;
SIGKILL never leaves frames without their clip."""

from __future__ import annotations

import http.client
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from leanclip.gallery import Gallery
from leanclip.video import VideoError, sample_frames
from tests._fixtures_gallery import COLORS, ColorEncoder, make_photo, update_worker_command

REPO = Path(__file__).resolve().parent.parent


def make_clip(path: Path, seconds: float, color, fps: int = 10, size=(160, 120)) -> Path:
    """An MPEG-4 clip (a keyframe a second) whose colour is ``color(t)``."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    out = av.open(str(path), "w")
    stream = out.add_stream("mpeg4", rate=fps)
    stream.width, stream.height = size
    stream.pix_fmt = "yuv420p"
    stream.codec_context.gop_size = fps
    for i in range(int(seconds * fps)):
        arr = np.zeros((size[1], size[0], 3), np.uint8)
        arr[:] = color(i / fps)
        for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
            out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    return path


def red_then_blue(t: float):
    return COLORS["red"] if t < 6 else COLORS["blue"]


def test_sample_frames_every_interval_and_corrupt_clips(tmp_path):
    clip = make_clip(tmp_path / "c.mp4", 12, red_then_blue)
    got = [(round(t), im.size) for t, im in sample_frames(clip, 2.0)]
    assert [t for t, _ in got] == [0, 2, 4, 6, 8, 10] and all(s == (160, 120) for _, s in got)
    assert len(list(sample_frames(clip, 4.0))) == 3
    for name, blob in {"cut.mp4": clip.read_bytes()[:1500], "junk.mp4": b"not a video" * 50}.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(VideoError) as info:
            list(sample_frames(tmp_path / name))
        assert info.value.reason and "\n" not in info.value.reason


def test_clips_index_search_and_follow_changes(tmp_path):
    root = tmp_path / "p"
    make_clip(root / "clip.mp4", 12, red_then_blue)
    make_photo(root / "green.jpg", COLORS["green"])
    (root / "broken.mp4").write_bytes((root / "clip.mp4").read_bytes()[:1500])
    s = Gallery(root, model=ColorEncoder(), video=True).update()
    assert (s.added, s.frames, s.failed) == (2, 6, 1)
    assert "not a readable video" in dict(s.failures)["broken.mp4"]
    g = Gallery(root, model=ColorEncoder())
    assert [(h.name, h.t) for h in g.search("blue", k=3)] == [
        ("clip.mp4", 6.0),
        ("clip.mp4", 8.0),
        ("clip.mp4", 10.0),
    ]
    assert {h.t for h in g.search("red", k=3)} == {0.0, 2.0, 4.0}
    assert g.search("green", k=1)[0].t is None and g.check() == ([], [])
    assert g.search("blue", k=1)[0].to_dict()["t"] == 6.0
    # the kind filter: photos only, or frames of clips only
    assert [h.name for h in g.search("blue", k=10, kind="photo")] == ["green.jpg"]
    assert {h.name for h in g.search("green", k=10, kind="video")} == {"clip.mp4"}
    # nothing changed: nothing decoded; the choice is kept without --video
    s = Gallery(root, model=ColorEncoder()).update()
    assert s.frames == 0 and s.unchanged == 3
    # a renamed clip keeps its frames; a rewritten one is re-read; a removed one takes them away
    os.rename(root / "clip.mp4", root / "moved.mp4")
    s = Gallery(root, model=ColorEncoder()).update()
    assert s.renamed == 1 and s.frames == 0
    assert Gallery(root, model=ColorEncoder()).search("blue", k=1)[0].name == "moved.mp4"
    make_clip(root / "moved.mp4", 4, lambda t: COLORS["yellow"])
    s = Gallery(root, model=ColorEncoder()).update()
    assert s.updated == 1 and s.frames == 2
    g = Gallery(root, model=ColorEncoder())
    assert g.check() == ([], []) and len(g.search("red", k=100)) == 3  # 2 frames + the photo
    (root / "moved.mp4").unlink()
    Gallery(root, model=ColorEncoder()).update()
    g = Gallery(root, model=ColorEncoder())
    assert g.check() == ([], []) and [h.name for h in g.search("red", k=100)] == ["green.jpg"]
    conn = sqlite3.connect(g.db_path)
    assert conn.execute("SELECT count(*) FROM frames").fetchone()[0] == 0
    conn.close()


def test_missing_av_names_the_video_extra(tmp_path):
    root = tmp_path / "p"
    make_photo(root / "a.jpg", COLORS["red"])
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["av"] = None  # as if not installed
        from leanclip.gallery import Gallery
        from tests._fixtures_gallery import ColorEncoder
        try:
            Gallery({str(root)!r}, model=ColorEncoder(), video=True).update()
        except Exception as exc:
            print(type(exc).__name__, exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.stdout.strip() == (
        "MissingDependency indexing video clips (--video) needs av (not installed): pip install 'leanclip[video]'"
    ), out


def test_page_shows_the_frame_and_links_the_clip_at_its_time(tmp_path):
    from leanclip.server import make_server

    root = tmp_path / "p"
    make_clip(root / "clip.mp4", 12, red_then_blue)
    g = Gallery(root, model=ColorEncoder(), video=True)
    g.update()
    server = make_server(g, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host, port = server.server_address[:2]

        def get(path):
            c = http.client.HTTPConnection(host, port, timeout=30)
            c.request("GET", path)
            r = c.getresponse()
            return r.status, r.read(), dict(r.getheaders())

        status, body, _ = get("/?q=blue&k=5&kind=photo")
        assert status == 200 and "clip.mp4" not in body.decode()
        status, body, _ = get("/?q=blue&k=1")
        page = body.decode()
        assert status == 200 and "href='/file/clip.mp4#t=6.0'" in page and "&#9654; 0:06" in page
        key = g.search("blue", k=1)[0].key
        status, thumb, headers = get(f"/thumb/{key}")
        assert status == 200 and headers["Content-Type"] == "image/jpeg"
        from io import BytesIO

        from PIL import Image

        px = np.asarray(Image.open(BytesIO(thumb)).convert("RGB"), dtype=float).mean(axis=(0, 1))
        assert px[2] > 150 and px[0] < 100  # the blue frame at 6 s, not the red start
        status, data, headers = get("/file/clip.mp4")
        assert status == 200 and headers["Content-Type"] == "video/mp4"
        assert data == (root / "clip.mp4").read_bytes()
    finally:
        server.shutdown()
        server.server_close()


def test_sigkill_while_indexing_clips_never_leaves_frames_without_their_clip(tmp_path):
    root = tmp_path / "p"
    for i in range(6):
        make_clip(root / f"c{i}.mp4", 8, (lambda k: lambda t: list(COLORS.values())[(k + int(t)) % 8])(i))
    rng = random.Random(5)
    killed = 0
    for r in range(5):
        if r:  # three clips change: every run has clips to re-read
            for i in rng.sample(range(6), 3):
                make_clip(
                    root / f"c{i}.mp4",
                    8,
                    (lambda k: lambda t: list(COLORS.values())[(k + int(t)) % 8])(i + r),
                )
        argv = update_worker_command(
            root, video=True, delay=0.2, batch_size=2, checkpoint_every=1, checkpoint_overhead=1.0
        )
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "start"
        time.sleep(rng.uniform(0.1, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        killed += proc.returncode == -signal.SIGKILL
        db = root / ".leanclip" / "gallery.db"
        if db.exists() and sqlite3.connect(db).execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            g = Gallery(root, model=ColorEncoder())  # (a kill before the first commit leaves no tables)
            if g.info()["generation"]:
                assert g.check() == ([], [])
                conn = sqlite3.connect(g.db_path)
                orphans = conn.execute(
                    "SELECT count(*) FROM frames WHERE path NOT IN (SELECT path FROM files WHERE status='ok')"
                ).fetchone()[0]
                conn.close()
                assert orphans == 0
            g.close()
    assert killed >= 3
    s = Gallery(root, model=ColorEncoder()).update()
    g = Gallery(root, model=ColorEncoder())
    assert g.check() == ([], []) and g.info()["ok"] == 6
    conn = sqlite3.connect(g.db_path)
    assert conn.execute("SELECT count(*) FROM frames").fetchone()[0] == 6 * 4
    conn.close()
    assert s.failed == 0
