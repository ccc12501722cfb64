"""The served page's photo features over HTTP: date filters and order, matched text, the
near-duplicates view, HEIC files and thumbnails, and the keyboard script under the CSP."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import threading
import urllib.parse
from pathlib import Path

import pytest
from PIL import Image

from leanclip.gallery import Gallery
from leanclip.server import make_server
from tests._fixtures_gallery import COLORS, ColorEncoder, make_photo
from tests.test_gallery_text import text_image


def _exif(date: str) -> bytes:
    ex = Image.Exif()
    ex.get_ifd(0x8769)[0x9003] = date
    return ex.tobytes()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from leanclip.images import register_formats

    register_formats()
    root = tmp_path_factory.mktemp("web")
    for i, (c, date) in enumerate([("red", "2020:05:01 10:00:00"), ("blue", "2023:08:09 10:00:00")]):
        p = make_photo(root / f"{c}.jpg", COLORS[c], seed=i, size=(64, 48))
        Image.open(p).save(p, exif=_exif(date))
    Image.open(root / "red.jpg").save(root / "red_copy.heic")
    text_image(root / "receipt.png", ["TOTAL 42.50 <b>EUR</b>"])
    g = Gallery(root, model=ColorEncoder(), ocr=True)
    g.update()
    server = make_server(g, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def get(server, path):
    host, port = server.server_address[:2]
    c = http.client.HTTPConnection(host, port, timeout=30)
    c.request("GET", path)
    r = c.getresponse()
    return r.status, r.read(), dict(r.getheaders())


def test_dates_filter_and_order_on_the_page_and_api(served):
    status, body, _ = get(served, "/api/search?q=red&k=10&after=2021&sort=date")
    names = [r["name"] for r in json.loads(body)["results"]]
    assert status == 200 and "red.jpg" not in names and "blue.jpg" in names
    status, body, _ = get(served, "/api/search?q=red&k=2&before=2021")
    # the HEIC copy keeps the JPEG's EXIF date
    assert sorted(r["name"] for r in json.loads(body)["results"]) == ["red.jpg", "red_copy.heic"]
    status, body, _ = get(served, "/?q=red&after=2021&before=2024&sort=date")
    page = body.decode()
    assert status == 200 and "<time class=taken>2023-08-09 10:00</time>" in page
    assert "value='2021'" in page and "<option value=date selected>" in page
    status, body, _ = get(served, "/?q=red&after=yesterday")
    assert status == 400 and "not a date" in body.decode()


def test_matched_text_is_shown_escaped_and_marked(served):
    q = urllib.parse.quote('text:"total 42.50"')
    status, body, _ = get(served, f"/?q={q}")
    page = body.decode()
    assert status == 200 and "receipt.png" in page
    assert "<mark>" in page and "<b>EUR</b>" not in page  # read text is escaped like a name


def test_duplicates_view_and_heic_served(served):
    status, body, _ = get(served, "/?view=duplicates")
    page = body.decode()
    assert status == 200 and "1 groups of near-duplicates" in page
    assert "red.jpg" in page and "red_copy.heic" in page
    g = served.gallery
    key = next(h.key for h in g.search("red", k=5) if h.name == "red_copy.heic")
    status, thumb, headers = get(served, f"/thumb/{key}")
    assert status == 200 and headers["Content-Type"] == "image/jpeg" and thumb[:2] == b"\xff\xd8"
    status, data, headers = get(served, "/file/red_copy.heic")
    assert status == 200 and headers["Content-Type"] == "image/heic"
    assert data == (Path(g.root) / "red_copy.heic").read_bytes()


def test_keyboard_script_is_the_only_script_allowed(served):
    status, body, headers = get(served, "/?q=red")
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert "<script src='/static/keys.js'></script>" in body.decode()
    status, js, headers = get(served, "/static/keys.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript") and b"ArrowRight" in js


CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)"
)
def test_keyboard_filters_and_duplicates_view_in_chromium(served):
    from playwright.sync_api import sync_playwright

    artifacts = Path(os.environ.get("LEANCLIP_ARTIFACTS", "test-artifacts")).absolute()
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "web-duplicates.png"
    errors: list = []
    loaded = "() => [...document.querySelectorAll('img')].every(i => i.complete && i.naturalWidth > 0)"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
        )
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(served.url)
        page.locator("main").click()  # leave the search box: "/" comes back to it
        page.keyboard.press("/")
        assert page.evaluate("document.activeElement.name") == "q"
        page.keyboard.type("red")
        page.select_option("select[name=sort]", "date")
        page.keyboard.press("Enter")
        page.wait_for_selector("#results figure img")
        page.wait_for_function(loaded)
        dates = page.locator("#results time.taken").all_inner_texts()
        assert dates == sorted(dates, reverse=True) and len(dates) >= 2  # newest first
        # arrows move between photos, Enter opens the similar-photos page
        page.keyboard.press("Escape")
        page.keyboard.press("ArrowRight")
        first = page.evaluate("document.activeElement.getAttribute('href')")
        page.keyboard.press("ArrowRight")
        second = page.evaluate("document.activeElement.getAttribute('href')")
        assert first.startswith("/?similar=") and second.startswith("/?similar=") and first != second
        page.keyboard.press("Enter")
        page.wait_for_selector("#similar-to")
        # the near-duplicates view: the group side by side, thumbnails (the HEIC one too) loaded
        page.goto(served.url + "?view=duplicates")
        page.wait_for_selector("#group-1 figure img")
        page.wait_for_function(loaded)
        names = page.locator("#group-1 figcaption a").all_inner_texts()
        assert sorted(names) == ["red.jpg", "red_copy.heic"]
        tops = page.evaluate(
            "[...document.querySelectorAll('#group-1 figure')].map(f => f.getBoundingClientRect().top)"
        )
        assert len(set(tops)) == 1  # side by side
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 5_000
    assert not errors, errors
    print(f"\nscreenshot: {shot}")
