"""leanclip serve: pages, thumbnails, path traversal, escaping, bounds, read-only by default."""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import pytest

from leanclip.gallery import Gallery
from leanclip.server import is_loopback, make_server
from tests._fixtures_gallery import COLORS, ColorEncoder, make_folder, make_photo

XSS_NAME = "<script>alert(1)</script> & 'q\".jpg"


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[Tuple[object, Gallery, Path, Path]]:
    root = tmp_path / "photos"
    make_folder(root, n_per_color=2)
    make_photo(root / XSS_NAME, COLORS["purple"], seed=42)
    outside = tmp_path / "outside"
    make_photo(outside / "secret.jpg", COLORS["black"], seed=43)
    (outside / "secret.txt").write_text("secret")
    os.symlink(outside / "secret.jpg", root / "link_outside.jpg")
    os.symlink(outside, root / "outdir")
    (root / "notes.txt").write_text("not a photo")
    g = Gallery(root, model=ColorEncoder())
    g.update()
    yield from _serve(g, root, outside)


def _serve(g: Gallery, root: Path, outside: Path, allow_updates: bool = False):
    server = make_server(g, port=0, allow_updates=allow_updates)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server, g, root, outside
    finally:
        server.shutdown()
        server.server_close()


def _req(
    server, method: str, path: str, body: Optional[bytes] = None, headers: Optional[Dict[str, str]] = None
) -> Tuple[int, Dict[str, str], bytes]:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    # putrequest with skip_host so the raw, unnormalised target and our Host header go out as is
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    hdrs = {"Host": f"127.0.0.1:{port}", **(headers or {})}
    if body is not None:
        hdrs.setdefault("Content-Length", str(len(body)))
    for k, v in hdrs.items():
        conn.putheader(k, v)
    conn.endheaders(body)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def test_loopback_by_default(served) -> None:
    server = served[0]
    assert server.server_address[0] == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("192.168.1.5")


def test_search_page_and_thumbnails(served) -> None:
    server, g, root, _ = served
    status, headers, body = _req(server, "GET", "/?q=red&k=2")
    assert status == 200 and headers["content-type"].startswith("text/html")
    # the one script is the page's own keyboard navigation: same origin, nothing inline
    assert "script-src 'self';" in headers["content-security-policy"]
    assert "unsafe" not in headers["content-security-policy"]
    assert "default-src 'none'" in headers["content-security-policy"]
    page = body.decode()
    assert page.count("<figure>") == 2 and "red/red_0.jpg" in page and "red/red_1.jpg" in page
    key = g.search("red", k=1)[0].key
    status, headers, thumb = _req(server, "GET", f"/thumb/{key}")
    assert status == 200 and headers["content-type"] == "image/jpeg" and thumb[:2] == b"\xff\xd8"
    # click on a thumbnail -> similar photos
    status, _, body = _req(server, "GET", f"/?similar={key}&k=3")
    assert status == 200 and "Photos similar to" in body.decode()
    status, _, body = _req(server, "GET", f"/api/search?similar={key}&k=3")
    res = json.loads(body)
    assert res["results"][0]["name"].startswith("red/") and key not in [r["key"] for r in res["results"]]
    status, _, body = _req(server, "GET", "/api/search?q=blue&k=3")
    assert status == 200 and [r["name"].split("/")[0] for r in json.loads(body)["results"]][:2] == [
        "blue",
        "blue",
    ]
    assert _req(server, "GET", "/thumb/999999")[0] == 404
    assert _req(server, "GET", "/thumb/abc")[0] == 404


def test_file_serving_stays_inside_the_gallery(served) -> None:
    server, g, root, outside = served
    ok = _req(server, "GET", "/file/red/red_0.jpg")
    assert ok[0] == 200 and ok[2] == (root / "red" / "red_0.jpg").read_bytes()
    secret = outside / "secret.txt"
    rel_up = os.path.relpath(secret, root)  # ../outside/secret.txt
    attempts = [
        "/file/../outside/secret.jpg",
        f"/file/{rel_up}",
        "/file/red/../../outside/secret.jpg",
        "/file/%2e%2e/outside/secret.jpg",
        "/file/%2E%2E%2Foutside%2Fsecret.jpg",
        "/file/red%2F..%2F..%2Foutside%2Fsecret.jpg",
        "/file/%252e%252e/outside/secret.jpg",
        f"/file/{secret}",  # absolute path: /file//tmp/...
        f"/file/%2F{str(secret)[1:]}",
        "/file//etc/passwd",
        "/file/link_outside.jpg",  # a symlink leading outside
        "/file/outdir/secret.jpg",  # a symlinked folder leading outside
        "/file/.leanclip/gallery.db",  # the store is not a photo
        "/file/notes.txt",  # inside, but not an indexed photo
        "/file/red/red_0.jpg%00.txt",
        "/file/red\\..\\..\\outside\\secret.jpg",
        "/file/./red/red_0.jpg",
        "/../../etc/passwd",
        "/static/../gallery.py",
    ]
    for path in attempts:
        status, _, body = _req(server, "GET", path)
        assert status == 404, (path, status)
        assert b"secret" not in body


def test_file_names_are_html_escaped(served) -> None:
    server, g, root, _ = served
    status, _, body = _req(server, "GET", "/?q=purple&k=3")
    page = body.decode()
    assert status == 200
    assert "<script>" not in page and "alert(1)</script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; &#x27;q&quot;.jpg" in page
    # the query itself is echoed escaped
    status, _, body = _req(server, "GET", "/?q=%3Cscript%3Ealert(2)%3C/script%3E")
    assert "<script>alert(2)" not in body.decode() and "&lt;script&gt;alert(2)" in body.decode()
    # JSON never contains a raw '<'
    status, headers, body = _req(server, "GET", "/api/search?q=purple&k=3")
    assert b"<" not in body and json.loads(body)["results"][0]["name"] == XSS_NAME
    # and the escaped link serves the file
    link = json.loads(body)["results"][0]["file"]
    assert _req(server, "GET", link)[0] == 200


def test_bounds_and_methods(served) -> None:
    server, g, root, _ = served
    assert _req(server, "GET", "/?q=" + "a" * 600)[0] == 400
    assert _req(server, "GET", "/api/search?q=red&k=100000")[0] == 400
    assert _req(server, "GET", "/?q=" + "a" * 3000)[0] == 414
    assert _req(server, "GET", "/api/search?" + "&".join(f"x{i}=1" for i in range(40)))[0] == 400
    assert _req(server, "POST", "/api/update", body=b"x" * 10_000)[0] == 413
    assert _req(server, "PUT", "/file/red/red_0.jpg", body=b"x")[0] == 405
    assert _req(server, "DELETE", "/file/red/red_0.jpg")[0] == 405
    assert _req(server, "POST", "/", body=b"")[0] == 405
    # DNS rebinding: a foreign Host header is refused on a loopback server
    assert _req(server, "GET", "/?q=red", headers={"Host": "evil.example:80"})[0] == 421
    assert (root / "red" / "red_0.jpg").exists()


def test_updates_disabled_by_default(served) -> None:
    server, g, root, _ = served
    make_photo(root / "new.jpg", COLORS["orange"], seed=77)
    before = g.info()
    status, _, body = _req(server, "POST", "/api/update", body=b"", headers={"X-Leanclip": "update"})
    assert status == 403 and b"--allow-updates" in body
    time.sleep(0.2)
    assert g.info() == before


def test_updates_when_enabled(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    make_folder(root, n_per_color=1)
    g = Gallery(root, model=ColorEncoder())
    g.update()
    for server, g, root, _ in _serve(g, root, tmp_path, allow_updates=True):  # noqa: B007, B020
        make_photo(root / "new.jpg", COLORS["orange"], seed=77)
        # a cross-site form cannot add the custom header
        assert _req(server, "POST", "/api/update", body=b"")[0] == 403
        status, _, body = _req(server, "POST", "/api/update", body=b"", headers={"X-Leanclip": "update"})
        assert status == 202
        for _ in range(100):
            state = json.loads(_req(server, "GET", "/api/update")[2])
            if not state["running"] and state["last"]:
                break
            time.sleep(0.05)
        assert state["last"]["added"] == 1
        names = [r["name"] for r in json.loads(_req(server, "GET", "/api/search?q=orange&k=1")[2])["results"]]
        assert names == ["new.jpg"]


def test_concurrent_requests_are_batched_and_correct(served) -> None:
    server, g, root, _ = served
    enc = g.encoder
    calls = []
    real = enc.encode_text

    def counting(texts, batch_size=64):
        calls.append(len(texts))
        time.sleep(0.1)  # a slow encoder: requests pile up behind it and go out as one batch
        return real(texts)

    enc.encode_text = counting  # type: ignore[method-assign]
    queries = ["red", "green", "blue", "yellow"] * 8
    expected = {q: [h.key for h in g.search(q, k=2)] for q in set(queries)}
    calls.clear()
    out: dict = {}

    def worker(i: int, q: str) -> None:
        status, _, body = _req(server, "GET", f"/api/search?q={q}&k=2")
        out[i] = (status, [r["key"] for r in json.loads(body)["results"]])

    threads = [threading.Thread(target=worker, args=(i, q)) for i, q in enumerate(queries)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(out[i] == (200, expected[q]) for i, q in enumerate(queries))
    assert len(calls) <= len(queries) // 2, calls  # batched: far fewer encoder calls than requests
    # a bad query in the mix is refused alone, the others still answered
    status, _, body = _req(server, "GET", "/api/search?q=%22unclosed")
    assert status == 400 and "cannot parse" in json.loads(body)["error"]


# --------------------------------------------------------------- issue 14: img: terms, huge ids


def test_img_terms_name_indexed_photos_only(served) -> None:
    """`img:` in a query from the page used to open any file on the machine (and its errors told
    whether a path existed or was a folder). Now it names an indexed photo by its path in the
    gallery; every other name gets the same refusal, and no file is decoded for it."""
    server, g, root, outside = served
    enc = g.encoder
    status, _, body = _req(server, "GET", "/api/search?q=img:red/red_0.jpg&k=3")
    assert status == 200, body
    names = [r["name"] for r in json.loads(body)["results"]]
    assert names and names[0] == "red/red_1.jpg" and "red/red_0.jpg" not in names
    before = enc.images_encoded
    hostile = [
        str(outside / "secret.jpg"),  # a real image outside the gallery
        str(outside / "nope.jpg"),  # missing
        str(outside),  # a folder
        "/etc/passwd",
        "../outside/secret.jpg",
        "link_outside.jpg",  # symlink in the root to a file outside
        "outdir/secret.jpg",  # through a symlinked folder
        "notes.txt",  # a file in the gallery that is not an indexed photo
        "red",  # a folder in the gallery
        "red/../red/red_0.jpg",
        "./red/red_0.jpg",
        str(root / "red" / "red_0.jpg"),  # absolute: refused too (names are relative)
    ]
    bodies = set()
    for name in hostile:
        for q in (f"img:{name}", f"red +img:{name}", f"red -img:{name}"):
            status, _, body = _req(server, "GET", "/api/search?q=" + urllib.parse.quote(q))
            assert status == 400, (q, body)
            bodies.add(body)
            status, _, page = _req(server, "GET", "/?q=" + urllib.parse.quote(q))
            assert status == 400 and b"img: terms on this page" in page
    assert len(bodies) == 1, bodies  # every refusal looks the same
    assert enc.images_encoded == before  # nothing was decoded


def test_huge_photo_ids_are_404(served) -> None:
    server, g, root, outside = served
    for key in (
        "99999999999999999999999",
        "9223372036854775808",
        "18446744073709551615",
        "1" * 400,
        "-1",
        "+1",
        "1_0",
        "１",
    ):
        status, _, _ = _req(server, "GET", "/thumb/" + urllib.parse.quote(key))
        assert status == 404, key
        status, _, body = _req(server, "GET", "/api/search?similar=" + urllib.parse.quote(key))
        assert status == 404, (key, body)
    # the server is still up and answering
    assert _req(server, "GET", "/api/info")[0] == 200


def test_a_swapped_file_is_not_served(served) -> None:
    """An indexed photo replaced by a hard link to another file (or by another file of the same
    size and mtime) is no longer the indexed file: neither it nor its thumbnail is served."""
    server, g, root, outside = served
    target = root / "red" / "red_0.jpg"
    assert _req(server, "GET", "/file/red/red_0.jpg")[0] == 200
    secret = outside / "secret.jpg"
    st = target.stat()
    target.unlink()
    os.link(secret, target)  # a hard link: a regular file inside the root, not a symlink
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    status, _, body = _req(server, "GET", "/file/red/red_0.jpg")
    assert status == 404 and body == b"not found\n"
    key = g.key_of_name("red/red_0.jpg")
    server.thumbs.clear()
    assert _req(server, "GET", f"/thumb/{key}")[0] == 404
    # same size and mtime, another inode: a copy of another photo renamed over it
    other = root / "red" / "red_1.jpg"
    st1 = other.stat()
    data = other.read_bytes()
    tmp = root / "red" / ".swap"
    tmp.write_bytes(data)
    os.utime(tmp, ns=(st1.st_atime_ns, st1.st_mtime_ns))
    os.replace(tmp, other)
    assert _req(server, "GET", "/file/red/red_1.jpg")[0] == 404
    # after an update the new files are indexed and served again
    g.update()
    server.thumbs.clear()
    assert _req(server, "GET", "/file/red/red_1.jpg")[0] == 200


def test_only_image_content_is_served(served, monkeypatch) -> None:
    """The content type comes from the bytes, not the name: were an indexed file's content
    replaced undetected by text or HTML, it is not served at all."""
    from leanclip.gallery.store import FileRow

    server, g, root, outside = served
    status, headers, _ = _req(server, "GET", "/file/red/red_0.jpg")
    assert status == 200 and headers.get("content-type") == "image/jpeg"
    monkeypatch.setattr(FileRow, "same_file", lambda self, st: True)  # defeat the identity check
    (root / "red" / "red_0.jpg").write_bytes(b"<html><script>alert(1)</script></html>")
    status, headers, body = _req(server, "GET", "/file/red/red_0.jpg")
    assert status == 404 and b"script" not in body
    png = root / "blue" / "blue_0.jpg"
    make_photo(png, COLORS["blue"], seed=7, fmt="PNG")  # a PNG named .jpg: served as what it is
    status, headers, _ = _req(server, "GET", "/file/blue/blue_0.jpg")
    assert status == 200 and headers.get("content-type") == "image/png"


def test_img_term_names_fuzz(served) -> None:
    """Fuzz: any name in an img: term either is an indexed photo (and maps to its key) or gets
    the one refusal message."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from leanclip.gallery import GalleryError, Term
    from leanclip.server import IMG_REFUSED

    server, g, root, outside = served
    indexed = {n: k for n, s, k in g.files() if s == "ok"}
    parts = st.sampled_from(
        [
            "red",
            "red_0.jpg",
            "..",
            ".",
            "",
            "outdir",
            "secret.jpg",
            str(outside),
            "/",
            "\0",
            "link_outside.jpg",
            "notes.txt",
            "%2e%2e",
            "\\",
            "red_1.jpg",
        ]
    )

    @settings(max_examples=1500, deadline=None, derandomize=True)
    @given(
        st.one_of(
            st.lists(parts, min_size=1, max_size=5).map("/".join),
            st.text(max_size=40),
            st.sampled_from(sorted(indexed)),
        )
    )
    def check(name: str) -> None:
        try:
            [t] = server.indexed_terms([Term(1, "image", name)])
        except GalleryError as exc:
            assert str(exc) == IMG_REFUSED
            assert name not in indexed
            return
        assert t.kind == "photo" and int(t.value) == indexed[name]

    check()
