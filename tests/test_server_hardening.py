"""Issue 25 (hardening, round 3) for ``leanclip serve``: each test failed on the code before it.

Files are streamed, never read whole; thumbnails are decoded small, within a pixel budget
shared by concurrent requests, once per photo however many ask, and cached within a byte cap;
a client leaving mid-body prints nothing; a GET body is never read as a next request; an
absolute-form target and a second Host header get the Host check.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
import tracemalloc
import weakref
from pathlib import Path
from typing import Any, Iterator, List, Tuple

import pytest
from PIL import Image

from leanclip.gallery import Gallery
from leanclip.images import decode_thumbnail, decoded_bytes
from leanclip.server import DecodeBudget, ThumbCache
from tests._fixtures_gallery import COLORS, ColorEncoder, make_folder, make_photo
from tests.test_server import _req, _serve


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[Tuple[Any, Gallery, Path, Path]]:
    root = tmp_path / "photos"
    make_folder(root, n_per_color=2)
    big = make_photo(root / "big.jpg", COLORS["orange"], seed=9)
    with open(big, "ab") as fh:  # a valid JPEG with a long trailer: 48 MB on disk
        for _ in range(48):
            fh.write(b"\0" * (1 << 20))
    g = Gallery(root, model=ColorEncoder())
    g.update()
    yield from _serve(g, root, tmp_path)


def _raw(server: Any, data: bytes, linger_reset: bool = False, read: bool = True) -> bytes:
    """Send raw bytes on one connection; return everything the server sent until it closed."""
    host, port = server.server_address[:2]
    s = socket.create_connection((host, port), timeout=10)
    try:
        s.sendall(data)
        if linger_reset:  # close with a reset, as a client killed mid-upload does
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
            return b""
        out = b""
        while read:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        return out
    finally:
        s.close()


def _statuses(raw: bytes) -> List[int]:
    """The status of each response in ``raw`` (bodies end without a line break)."""
    return [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", raw)]


def test_files_are_streamed_not_read_whole(served) -> None:
    server, g, root, _ = served
    path = root / "big.jpg"
    tracemalloc.start()
    try:
        status, headers, body = _req(server, "GET", "/file/big.jpg")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 200 and headers["content-type"] == "image/jpeg"
    assert int(headers["content-length"]) == path.stat().st_size == len(body)
    assert hashlib.sha256(body).digest() == hashlib.sha256(path.read_bytes()).digest()
    # the client's copy of the body is the one large allocation: the server adds none
    assert peak < len(body) + (8 << 20), peak
    status, headers, body = _req(server, "HEAD", "/file/big.jpg")
    assert status == 200 and body == b"" and int(headers["content-length"]) == path.stat().st_size


def test_a_file_that_shrinks_while_sent_ends_the_connection(served, monkeypatch) -> None:
    import leanclip.server

    server, g, root, _ = served
    path = root / "big.jpg"
    size = path.stat().st_size
    real = leanclip.server._image_type

    def identify_then_truncate(fh: Any) -> Any:
        # opened, checked and measured at full size; now another program truncates it
        with open(path, "r+b") as w:
            w.truncate(size // 2)
        return real(fh)

    monkeypatch.setattr(leanclip.server, "_image_type", identify_then_truncate)
    port = server.server_address[1]
    raw = _raw(server, f"GET /file/big.jpg HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    head, _, body = raw.partition(b"\r\n\r\n")
    # the response declared the full size and the file had half: the server closed the
    # connection (the client sees a short body) rather than waiting for a next request
    assert _statuses(head) == [200] and f"content-length: {size}".encode() in head.lower()
    assert len(body) == size // 2


def test_thumbnails_decode_small_and_free_the_full_size_pixels_inside_the_reservation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = tmp_path / "big.png"
    Image.new("RGB", (3000, 2000), (200, 30, 30)).save(big)
    opened: List[Any] = []
    real_open = Image.open

    def spy_open(*a: Any, **k: Any) -> Any:
        im = real_open(*a, **k)
        opened.append(weakref.ref(im))
        return im

    monkeypatch.setattr(Image, "open", spy_open)
    reserved: List[int] = []
    freed_inside: List[bool] = []

    class Reserve:
        def __init__(self, n: int) -> None:
            reserved.append(n)

        def __enter__(self) -> None:
            return None

        def __exit__(self, *exc: Any) -> None:
            freed_inside.append(all(r() is None for r in opened))

    with open(big, "rb") as fh:
        thumb = decode_thumbnail(fh, "big.png", 256, reserve=Reserve)
    assert thumb.size == (256, 171) and thumb.mode == "RGB"
    assert thumb.getpixel((100, 100)) == (200, 30, 30)
    assert reserved == [3000 * 2000 * 4] and freed_inside == [True]


def test_thumbnail_rotation_palette_and_jpeg_draft(tmp_path: Path) -> None:
    # EXIF orientation 6 (rotate 90): a 600 x 300 JPEG shows as 300 x 600
    im = Image.new("RGB", (600, 300), (10, 200, 10))
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert decode_thumbnail(tmp_path / "rot.jpg", "rot.jpg", 256).size == (128, 256)
    # a large palette PNG with transparency (reduce takes no P mode): RGB, small
    p = Image.new("P", (4000, 1000), 1)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.save(tmp_path / "p.png", transparency=0)
    out = decode_thumbnail(tmp_path / "p.png", "p.png", 256)
    assert out.size == (256, 64) and out.mode == "RGB" and out.getpixel((10, 10)) == (255, 0, 0)
    # a JPEG is decoded at reduced scale: its reservation is 1/8 a side of the full size
    Image.new("RGB", (4096, 4096), (1, 2, 3)).save(tmp_path / "big.jpg")
    sizes: List[int] = []

    class Reserve:
        def __init__(self, n: int) -> None:
            sizes.append(n)

        def __enter__(self) -> None:
            return None

        def __exit__(self, *exc: Any) -> None:
            return None

    decode_thumbnail(tmp_path / "big.jpg", "big.jpg", 256, reserve=Reserve)
    assert sizes == [512 * 512 * 4]
    # Pillow's storage: 1 byte a pixel for L/P, 2 for 16-bit, 4 for RGB (kept as 32-bit)
    assert [decoded_bytes(Image.new(m, (10, 10))) for m in ("L", "P", "I;16", "RGB", "F")] == [
        100,
        100,
        200,
        400,
        400,
    ]


def test_decode_budget_bounds_bytes_and_count_and_times_out() -> None:
    budget = DecodeBudget(max_bytes=100, max_count=3, timeout=5.0)
    state = {"bytes": 0, "count": 0, "max_bytes": 0, "max_count": 0}
    lock = threading.Lock()

    def work(n: int) -> None:
        with budget.reserve(n):
            with lock:
                state["bytes"] += min(n, 100)
                state["count"] += 1
                state["max_bytes"] = max(state["max_bytes"], state["bytes"])
                state["max_count"] = max(state["max_count"], state["count"])
            time.sleep(0.02)
            with lock:
                state["bytes"] -= min(n, 100)
                state["count"] -= 1

    sizes = [30, 30, 30, 30, 60, 10, 10, 10, 500, 10, 40, 40] * 3
    threads = [threading.Thread(target=work, args=(n,)) for n in sizes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert state["max_bytes"] <= 100 and state["max_count"] <= 3 and budget.used == budget.count == 0
    assert state["max_count"] >= 2  # it does run decodes side by side
    short = DecodeBudget(max_bytes=100, max_count=1, timeout=0.05)
    with short.reserve(10):
        with pytest.raises(TimeoutError):
            with short.reserve(10):
                pass
    assert short.count == 0 and short.used == 0


def test_thumb_cache_is_bounded_in_bytes() -> None:
    cache = ThumbCache(max_bytes=1000)
    for i in range(50):
        cache.put((i, "p"), b"x" * 100)
        assert cache.bytes <= 1000
    assert len(cache) == 10 and cache.get((49, "p")) is not None and cache.get((0, "p")) is None
    cache.put((49, "p"), b"y" * 300)
    assert cache.bytes == sum(len(v) for v in cache.items.values()) <= 1000
    cache.clear()
    assert len(cache) == 0 and cache.bytes == 0


def test_concurrent_requests_for_one_thumbnail_share_one_decode(served, monkeypatch) -> None:
    server, g, root, _ = served
    key = g.key_of_name("red/red_0.jpg")
    calls: List[bytes] = []
    real = server.make_thumbnail

    def slow_make(rel: bytes) -> Any:
        calls.append(rel)
        time.sleep(0.3)
        return real(rel)

    monkeypatch.setattr(server, "make_thumbnail", slow_make)
    results: List[Tuple[int, bytes]] = []

    def get() -> None:
        status, _, body = _req(server, "GET", f"/thumb/{key}")
        results.append((status, body))

    threads = [threading.Thread(target=get) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 12 and {s for s, _ in results} == {200}
    assert len({b for _, b in results}) == 1 and calls == [b"red/red_0.jpg"]
    assert _req(server, "GET", f"/thumb/{key}")[0] == 200 and len(calls) == 1  # cached


def test_thumbnail_decodes_share_the_budget(served) -> None:
    server, g, root, _ = served
    peak = {"count": 0, "now": 0}
    lock = threading.Lock()
    real = server.thumb_budget.reserve

    class Watched:
        def __init__(self, n: int) -> None:
            self.cm = real(n)

        def __enter__(self) -> None:
            self.cm.__enter__()
            with lock:
                peak["now"] += 1
                peak["count"] = max(peak["count"], peak["now"])
            time.sleep(0.1)

        def __exit__(self, *exc: Any) -> None:
            with lock:
                peak["now"] -= 1
            self.cm.__exit__(*exc)

    server.thumb_budget = DecodeBudget(max_bytes=1 << 30, max_count=2, timeout=30)
    real = server.thumb_budget.reserve
    server.thumb_budget.reserve = Watched  # type: ignore[method-assign]
    keys = [g.key_of_name(n) for n, st, _ in g.files() if st == "ok" and n != "big.jpg"]
    statuses: List[int] = []

    def get(k: int) -> None:
        statuses.append(_req(server, "GET", f"/thumb/{k}")[0])

    threads = [threading.Thread(target=get, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * len(keys) and len(keys) == 8
    assert peak["count"] == 2


def test_a_client_leaving_mid_body_prints_nothing(served, capfd) -> None:
    server = served[0]
    port = server.server_address[1]
    head = f"POST /api/update HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 4000\r\n\r\n".encode()
    for reset in (True, False):
        _raw(server, head + b"x" * 10, linger_reset=reset, read=False)
    time.sleep(0.3)
    assert _req(server, "GET", "/api/info")[0] == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Error" not in err, err


def test_a_get_body_is_not_read_as_a_next_request(served) -> None:
    server = served[0]
    host = f"127.0.0.1:{server.server_address[1]}"
    smuggled = f"GET /favicon.ico HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    raw = _raw(
        server,
        f"GET /api/info HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(smuggled)}\r\n\r\n".encode()
        + smuggled
        + f"GET /api/info HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode(),
    )
    assert _statuses(raw) == [200, 200]  # not [200, 204, 200]
    # two Content-Length headers: refused, the connection closed
    raw = _raw(
        server,
        f"GET /api/info HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nContent-Length: 5\r\n\r\nhello".encode(),
    )
    assert _statuses(raw) == [400]


def test_absolute_form_targets_and_repeated_host_headers_are_checked(served) -> None:
    server = served[0]
    port = server.server_address[1]
    ours = f"127.0.0.1:{port}"

    def get(target: str, *hosts: str) -> List[int]:
        lines = [f"GET {target} HTTP/1.1", *(f"Host: {h}" for h in hosts), "Connection: close", "", ""]
        return _statuses(_raw(server, "\r\n".join(lines).encode()))

    assert get("/api/info", ours) == [200]
    assert get("http://evil.example/file/red/red_0.jpg", ours) == [421]
    assert get("http://evil.example/api/info", ours) == [421]
    assert get(f"http://{ours}/api/info", ours) == [200]  # absolute form naming us: served
    assert get(f"http://{ours}/api/info", "evil.example") == [200]  # the target's host counts
    assert get("ftp://x/api/info", ours) == [400]
    assert get("/api/info", ours, "evil.example") == [400]
    assert get("/api/info", "evil.example", ours) == [400]
    assert get("/api/info") == [421]
