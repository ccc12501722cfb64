"""The parts of ``leanclip serve``'s page for the photo features: the date and order filters,
a hit's date and matched text, and the near-duplicates view. Everything a file or its text
puts on the page is HTML-escaped."""

from __future__ import annotations

import html
import os
import urllib.parse
from typing import Any, Dict, List, Tuple

from leanclip.errors import LeanclipError
from leanclip.gallery.texts import MARK_END, MARK_START

__all__ = ["filter_inputs", "hit_details", "duplicates_page", "marked"]

e = html.escape


def filter_inputs(params: Dict[str, List[str]]) -> str:
    """The form's date range and order controls, keeping the request's values."""
    after = (params.get("after") or [""])[0][:32]
    before = (params.get("before") or [""])[0][:32]
    by_date = (params.get("sort") or [""])[0] == "date"
    kind = (params.get("kind") or [""])[0]
    return (
        f"<input name=after value='{e(after, quote=True)}' placeholder='after 2024-07' size=10 aria-label='taken after'>"
        f"<input name=before value='{e(before, quote=True)}' placeholder='before 2025' size=10 aria-label='taken before'>"
        "<select name=sort aria-label='order'>"
        f"<option value=score{'' if by_date else ' selected'}>best match</option>"
        f"<option value=date{' selected' if by_date else ''}>newest first</option></select>"
        "<select name=kind aria-label='kind'>"
        + "".join(
            f"<option value='{v}'{' selected' if kind == v else ''}>{label}</option>"
            for v, label in (("", "photos and videos"), ("photo", "photos"), ("video", "videos"))
        )
        + "</select>"
    )


def marked(text: str) -> str:
    """Escaped ``text`` with its MARK_START / MARK_END spans as <mark>."""
    return e(text).replace(MARK_START, "<mark>").replace(MARK_END, "</mark>")


def hit_details(hit: Dict[str, Any]) -> str:
    """A hit's capture date and the text matched in it, for its caption."""
    out = ""
    if hit.get("t") is not None:
        from leanclip.video import format_time

        at = f"{hit['file']}#t={hit['t']:.1f}"
        out += f" <a class=at href='{e(at, quote=True)}'>&#9654; {format_time(hit['t'])}</a>"
    if hit.get("taken"):
        out += f" <time class=taken>{e(hit['taken'])}</time>"
    if hit.get("text"):
        out += f"<q class=text>{marked(hit['text'])}</q>"
    return out


def duplicates_page(gallery: Any, info: Dict[str, Any]) -> Tuple[int, bytes, str, Dict[str, str]]:
    """(status, body, content type, headers) of the near-duplicates view: each group side by
    side, with each photo's score and a link to the file. Nothing can be deleted from it."""
    head = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width,initial-scale=1'>"
        "<title>near-duplicates - leanclip</title><link rel=stylesheet href='/static/style.css'></head><body>"
        "<header><h1><a href='/'>leanclip</a></h1>"
        f"<span class=note>{info['ok']} photos &middot; near-duplicates</span></header><main>"
    )
    try:
        _, groups = gallery.duplicates()
    except LeanclipError as exc:
        body = head + f"<p class=error id=error>{e(str(exc))}</p></main></body></html>"
        return 400, body.encode(), "text/html; charset=utf-8", {"Cache-Control": "no-store"}
    parts = [
        head,
        f"<p class=note id=summary>{len(groups)} groups of near-duplicates (nothing is deleted)</p>",
    ]
    for i, grp in enumerate(groups, 1):
        parts.append(f"<section class=dups id=group-{i}><h2>group {i}: {len(grp)} photos</h2><div class=row>")
        for h in grp:
            rel = os.path.relpath(os.fsencode(h.path), os.fsencode(gallery.root))
            name = e(h.name)
            parts.append(
                f"<figure><a href='/?similar={h.key}' title='{name}'>"
                f"<img src='/thumb/{h.key}' alt='{name}' loading=lazy></a>"
                f"<figcaption><a href='{e('/file/' + urllib.parse.quote(rel), quote=True)}'>{name}</a> "
                f"<span class=score>{h.score:.3f}</span></figcaption></figure>"
            )
        parts.append("</div></section>")
    parts.append("</main><script src='/static/keys.js'></script></body></html>")
    return 200, "".join(parts).encode(), "text/html; charset=utf-8", {"Cache-Control": "no-store"}
