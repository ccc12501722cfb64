"""The served page in a real browser: Debian's headless Chromium driven by Playwright.

Type a query, see thumbnails, click one, see similar photos. The screenshot goes to
``$LEANCLIP_ARTIFACTS`` (default ``test-artifacts/``) and its path is printed.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import pytest

from leanclip.gallery import Gallery
from leanclip.server import make_server
from tests._fixtures_gallery import COLORS, ColorEncoder, make_folder, make_photo

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)"
)
def test_search_click_similar_in_chromium(tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    root = tmp_path / "photos"
    make_folder(root, n_per_color=3)
    make_photo(root / "<b>bold</b>.jpg", COLORS["purple"], seed=11)
    g = Gallery(root, model=ColorEncoder())
    g.update()
    server = make_server(g, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    artifacts = Path(os.environ.get("LEANCLIP_ARTIFACTS", "test-artifacts")).absolute()
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "web-similar.png"
    errors: list[str] = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
            )
            page = browser.new_page(viewport={"width": 1100, "height": 800})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(server.url)
            box = page.locator("input[name=q]")
            box.fill("blue")
            box.press("Enter")
            page.wait_for_selector("#results figure img")
            imgs = page.locator("#results figure img")
            # every thumbnail really loaded (a broken image has naturalWidth 0)
            page.wait_for_function(
                "() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
            )
            names = page.locator("#results figcaption a").all_inner_texts()
            assert imgs.count() == len(names) == 13  # the whole gallery, best first
            assert all(n.startswith("blue/") for n in names[:3])
            assert page.locator("input[name=q]").input_value() == "blue"
            # click the first thumbnail: the page shows photos similar to it
            first = names[0]
            imgs.first.click()
            page.wait_for_selector("#similar-to")
            assert first in page.locator("#similar-to").inner_text()
            page.wait_for_function(
                "() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
            )
            similar = page.locator("#results figcaption a").all_inner_texts()
            assert first not in similar and similar[0].startswith("blue/")
            # the file name with markup is shown as text, not interpreted
            page.goto(server.url + "?q=purple&k=1")
            assert page.locator("#results figcaption a").inner_text() == "<b>bold</b>.jpg"
            assert page.locator("#results b").count() == 0
            # back to the similar page for the screenshot
            page.goto(server.url + "?q=blue")
            page.locator("#results figure img").first.click()
            page.wait_for_selector("#similar-to")
            page.wait_for_function(
                "() => [...document.querySelectorAll('img')].every(i => i.complete && i.naturalWidth > 0)"
            )
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    assert shot.stat().st_size > 10_000
    assert not errors, errors
    print(f"\nscreenshot: {shot}")
