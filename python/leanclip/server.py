"""``leanclip serve``: a local search page for a gallery (standard library HTTP server).

Pages are rendered on the server with every file name HTML-escaped; the only script is the
page's own keyboard navigation (web/keys.js; its Content-Security-Policy allows no other), and
the page works without it. Routes::

    GET  /                       search form; ?q=QUERY&k=N&path=GLOB shows a thumbnail grid;
                                 &after=DATE&before=DATE&sort=date filter and order by capture
                                 date (leanclip.pages)
    GET  /?similar=KEY           photos similar to the indexed photo KEY (click a thumbnail)
    GET  /?view=duplicates       the groups of near-duplicate photos, side by side
    GET  /thumb/KEY              JPEG thumbnail of an indexed photo
    GET  /file/REL/PATH          the original file, by its path relative to the gallery
    GET  /api/search?q=..        JSON results (also ?similar=KEY); ``img:`` terms name indexed
                                 photos by their path in the gallery, never other files
    GET  /api/info               JSON gallery counts
    POST /api/update             re-index the folder; only with --allow-updates, and only with
                                 the header ``X-Leanclip: update`` (a cross-site form cannot send it)

Safety: binds 127.0.0.1 unless told otherwise; answers 404 for anything that is not an indexed,
regular file inside the gallery root (``..``, encoded ``%2e%2e``, absolute paths, symlinks);
checks the Host header on loopback (DNS rebinding: exactly one Host, and an absolute-form
target's host is checked the same way); bounds request lines, query strings and bodies (a GET's
body is read and dropped, never parsed as a next request); nothing changes the gallery unless
the server was started with ``allow_updates``.

Memory: files are streamed from the checked descriptor (``sendfile``), never read whole.
Thumbnails are decoded small (JPEG at reduced scale, other formats shrunk before any copy:
``leanclip.images.decode_thumbnail``); decodes running at once hold at most
``THUMB_DECODE_BYTES`` of pixels (one larger image runs alone) and ``THUMB_DECODES`` threads;
concurrent requests for the same thumbnail share one decode; made thumbnails are kept in an LRU
of ``THUMB_CACHE_BYTES``. ``benchmarks/bench_server_load.py --memory`` measures the server's RSS
under concurrent large-file and thumbnail requests.
"""

from __future__ import annotations

import contextlib
import html
import io
import ipaddress
import json
import os
import queue
import socket
import stat
import sys
import threading
import urllib.parse
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any, BinaryIO, Dict, Iterator, List, Optional, Tuple, Union

from leanclip import pages
from leanclip.errors import LeanclipError
from leanclip.gallery import Gallery, GalleryError, Hit, Term, parse_query
from leanclip.gallery.store import FileRow, ok_row

Query = Union[str, List[Term]]  # a query string or parsed terms (the server sends terms)

MAX_URL = 2048  # bytes of request target
MAX_QUERY = 512  # characters of a search query
MAX_BODY = 4096  # bytes of a request body
MAX_K = 200
THUMB_SIZE = 256
THUMB_CACHE_BYTES = 32 << 20  # made thumbnails kept in memory (~2,000 at ~15 KB)
THUMB_DECODE_BYTES = 256 << 20  # pixels decoded at once, all thumbnail requests together
THUMB_DECODES = 2  # threads decoding thumbnails (the CPU is the limit beyond)
THUMB_WAIT = 120.0  # seconds a thumbnail request waits for its thumbnail before a 503
# Pillow allocates a large image in blocks. Blocks larger than glibc's highest mmap threshold
# (32 MB) are each mapped and unmapped, so a decoded image's memory goes back to the system
# when it is freed; Pillow's default 16 MB blocks stay in malloc's per-thread arenas, and the
# server's RSS kept the peak of every thread that ever decoded a large image.
PILLOW_BLOCK_SIZE = 64 << 20

IMG_REFUSED = (
    "img: terms on this page must name a photo of this gallery by its path in the gallery "
    "(as shown under each result)"
)

CSP = (
    "default-src 'none'; img-src 'self'; style-src 'self'; script-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach ("" means every interface)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Batcher:
    """Runs concurrent text searches together: one encoder call and one index search per batch.

    One worker thread takes every request waiting in the queue (up to ``max_batch``) and
    answers them with ``Gallery.search_batch``; a lone request is answered at once, so batching
    adds no delay at low load and multiplies throughput under load.
    """

    def __init__(self, gallery: Gallery, max_batch: int = 64) -> None:
        self.gallery = gallery
        self.max_batch = max_batch
        self.queue: "queue.Queue[Tuple[Query, int, Optional[List[str]], Future]]" = queue.Queue()
        threading.Thread(target=self._run, name="leanclip-batcher", daemon=True).start()

    def search(self, query: "Query", k: int, paths: Optional[List[str]], timeout: float = 60.0) -> List[Hit]:
        fut: Future = Future()
        self.queue.put((query, k, paths, fut))
        return fut.result(timeout=timeout)

    def _run(self) -> None:
        while True:
            batch = [self.queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            groups: Dict[Tuple[int, Tuple[str, ...]], List[Any]] = {}
            for item in batch:
                groups.setdefault((item[1], tuple(item[2] or ())), []).append(item)
            for (k, paths), items in groups.items():
                try:
                    results = self.gallery.search_batch([it[0] for it in items], k, paths=list(paths) or None)
                    for it, res in zip(items, results):
                        it[3].set_result(res)
                except Exception:
                    # one bad request must not fail the others: answer each on its own
                    for it in items:
                        try:
                            it[3].set_result(self.gallery.search(it[0], k, paths=list(paths) or None))
                        except Exception as exc:
                            it[3].set_exception(exc)


class DecodeBudget:
    """A weighted semaphore over decoded pixels: ``reserve(nbytes)`` waits until at most
    ``max_count - 1`` decodes run and ``nbytes`` fit in ``max_bytes`` beside them (a single
    decode larger than the budget runs alone), so the pixels of all decodes together stay
    within ``max(max_bytes, the largest one)``. Waiting longer than ``timeout`` raises
    ``TimeoutError`` (the server answers 503)."""

    def __init__(self, max_bytes: int, max_count: int, timeout: float) -> None:
        self.max_bytes, self.max_count, self.timeout = max_bytes, max_count, timeout
        self.used = self.count = 0
        self.cond = threading.Condition()

    @contextlib.contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        n = min(int(nbytes), self.max_bytes)
        with self.cond:
            if not self.cond.wait_for(
                lambda: self.count < self.max_count and self.used + n <= self.max_bytes, self.timeout
            ):
                raise TimeoutError("too many thumbnails are being made; try again")
            self.used += n
            self.count += 1
        try:
            yield
        finally:
            with self.cond:
                self.used -= n
                self.count -= 1
                self.cond.notify_all()


class ThumbCache:
    """Made thumbnails, least recently used dropped first, at most ``max_bytes`` in all."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.items: "OrderedDict[Tuple[int, str], bytes]" = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()

    def get(self, key: Tuple[int, str]) -> Optional[bytes]:
        with self.lock:
            data = self.items.get(key)
            if data is not None:
                self.items.move_to_end(key)
            return data

    def put(self, key: Tuple[int, str], data: bytes) -> None:
        with self.lock:
            old = self.items.pop(key, None)
            self.bytes += len(data) - (len(old) if old is not None else 0)
            self.items[key] = data
            while self.bytes > self.max_bytes and self.items:
                self.bytes -= len(self.items.popitem(last=False)[1])

    def clear(self) -> None:
        with self.lock:
            self.items.clear()
            self.bytes = 0

    def __len__(self) -> int:
        return len(self.items)


class GalleryServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(
        self, gallery: Gallery, host: str, port: int, allow_updates: bool, max_batch: int = 64
    ) -> None:
        self.gallery = gallery
        self.allow_updates = allow_updates
        self.loopback_only = is_loopback(host)
        self.real_root = os.path.realpath(gallery.root)
        from PIL import Image

        Image.core.set_block_size(PILLOW_BLOCK_SIZE)
        self.thumbs = ThumbCache(THUMB_CACHE_BYTES)
        self.thumb_budget = DecodeBudget(THUMB_DECODE_BYTES, THUMB_DECODES, THUMB_WAIT)
        # thumbnails are made by a few threads of their own (few malloc arenas ever hold pixels);
        # a request for one being made waits for that one's result
        self.thumb_pool = ThreadPoolExecutor(THUMB_DECODES, thread_name_prefix="leanclip-thumb")
        self.thumbs_making: Dict[Tuple[int, str], Future] = {}
        self.thumbs_lock = threading.Lock()
        self.update_lock = threading.Lock()
        self.update_state: Dict[str, Any] = {"running": False, "last": None, "error": None}
        self._info: Tuple[int, Dict[str, Any]] = (-1, {})
        self.batcher = Batcher(gallery, max_batch=max(1, max_batch))
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), Handler)

    def server_close(self) -> None:
        super().server_close()
        self.thumb_pool.shutdown(wait=False, cancel_futures=True)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went away (reset, broken pipe) is no error of ours: no traceback."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            return
        super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        host, port = str(self.server_address[0]), self.server_address[1]
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def allowed_hosts(self) -> set:
        port = self.server_address[1]
        names = {"127.0.0.1", "localhost", "[::1]", str(self.server_address[0])}
        return {f"{n}:{port}" for n in names} | (names if port == 80 else set())

    def info(self) -> Dict[str, Any]:
        """Gallery counts, recomputed only when a new generation is committed (counting rows
        of a large gallery on every page view would cost more than the search)."""
        g = self.gallery
        with g._lock:
            row = g._reader().execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        gen = int(row[0]) if row else 0
        if self._info[0] != gen:
            self._info = (gen, g.info())
        return self._info[1]

    # -- file access -----------------------------------------------------------------------

    def safe_path(self, rel: bytes) -> Optional[str]:
        """The absolute path of an indexed regular file at ``rel`` inside the root, else None."""
        if not rel or b"\0" in rel or rel.startswith(b"/") or b"\\" in rel:
            return None
        parts = rel.split(b"/")
        if any(p in (b"", b".", b"..") for p in parts):
            return None
        full = os.path.join(os.fsencode(self.gallery.root), rel)
        real = os.path.realpath(full)
        root = os.fsencode(self.real_root)
        if not real.startswith(root + b"/"):
            return None  # a symlinked folder or file leads outside the root
        try:
            st = os.lstat(full)
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode) or real != os.path.join(root, rel):
            return None  # a symlink somewhere on the way (even one pointing inside): not served
        row = self.indexed_row(rel)
        if row is None or not row.same_file(st):
            return None  # not indexed, or no longer the file that was (swapped, hard-linked, edited)
        return os.fsdecode(full)

    def open_indexed(self, rel: bytes) -> Optional[BinaryIO]:
        """The indexed photo at ``rel``, opened, from a descriptor whose file was checked to be
        the one indexed (a swap after the path checks is caught here), else None. The caller
        closes it; its size is ``os.fstat(fh.fileno()).st_size``."""
        full = self.safe_path(rel)
        row = self.indexed_row(rel) if full is not None else None
        if full is None or row is None:
            return None
        try:
            # O_NONBLOCK: a FIFO swapped in after the checks must not hang the thread
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        fh = os.fdopen(fd, "rb")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not row.same_file(st):
            fh.close()
            return None
        return fh

    def indexed_row(self, rel: bytes) -> Optional[FileRow]:
        with self.gallery._lock:
            return ok_row(self.gallery._reader(), rel)

    def indexed_terms(self, terms: List[Term]) -> List[Term]:
        """The terms with every ``img:`` term replaced by the indexed photo it names (its path
        relative to the gallery, as the page shows it). The server never opens a file for a
        query: a name that is not an indexed photo is refused, with one message whatever the
        reason (outside the root, missing, a folder, not indexed), so refusals reveal nothing."""
        out = []
        for t in terms:
            if t.kind == "image":
                key = self.gallery.key_of_name(t.value)
                if key is None:
                    raise GalleryError(IMG_REFUSED)
                t = Term(t.sign, "photo", str(key))
            elif t.kind not in ("text", "ocr"):  # ocr: a text: term, matched in the store
                raise GalleryError(IMG_REFUSED)
            out.append(t)
        return out

    def path_of_key(self, key: int) -> Optional[bytes]:
        """The path of the indexed photo, or video clip whose frame, has ``key``."""
        hit = self.hit_row(key)
        return hit[0] if hit is not None else None

    def hit_row(self, key: int) -> Optional[Tuple[bytes, Optional[int], Optional[int]]]:
        from leanclip.gallery.store import hit_rows

        with self.gallery._lock:
            return hit_rows(self.gallery._reader(), [key]).get(key)

    def frame_thumbnail(self, key: int, rel: bytes, ms: int) -> Optional[bytes]:
        """The JPEG thumbnail of a video frame (leanclip.video), cached like a photo's."""
        from leanclip.video import VideoError, frame_at

        path = self.safe_path(rel)
        if path is None:
            return None
        data = self.thumbs.get((key, path))
        if data is None:
            try:
                im = frame_at(path, ms / 1000.0, THUMB_SIZE)
            except (VideoError, ImportError):
                return None
            im.thumbnail((THUMB_SIZE, THUMB_SIZE))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=82)
            data = buf.getvalue()
            self.thumbs.put((key, path), data)
        return data

    def thumbnail(self, key: int) -> Optional[bytes]:
        """The JPEG thumbnail of the photo (or video frame) with ``key``, else None. Raises
        ``TimeoutError`` when the decode budget stays full (see :class:`DecodeBudget`)."""
        hit = self.hit_row(key)
        if hit is not None and hit[2] is not None:
            return self.frame_thumbnail(key, hit[0], hit[2])
        rel = self.path_of_key(key)
        if rel is None:
            return None
        path = self.safe_path(rel)
        if path is None:
            return None
        cache_key = (key, path)
        data = self.thumbs.get(cache_key)
        if data is not None:
            return data
        with self.thumbs_lock:
            making = self.thumbs_making.get(cache_key)
            if making is None:
                making = self.thumbs_making[cache_key] = self.thumb_pool.submit(self.make_thumbnail, rel)
                mine = True
            else:
                mine = False
        if mine:  # outside the lock: a future already done runs the callback here
            making.add_done_callback(lambda f: self._thumbnail_made(cache_key, f))
        return making.result(timeout=THUMB_WAIT)  # type: ignore[no-any-return]

    def _thumbnail_made(self, cache_key: Tuple[int, str], made: Future) -> None:
        """Cache a finished thumbnail (even when its requests stopped waiting for it)."""
        with self.thumbs_lock:
            self.thumbs_making.pop(cache_key, None)
        if not made.cancelled() and made.exception() is None and made.result() is not None:
            self.thumbs.put(cache_key, made.result())

    def make_thumbnail(self, rel: bytes) -> Optional[bytes]:
        from leanclip.images import ImageLoadError, decode_thumbnail

        fh = self.open_indexed(rel)
        if fh is None:
            return None
        try:  # decoded from the descriptor that was checked, not from the path again
            with fh:
                im = decode_thumbnail(
                    fh, rel, THUMB_SIZE, max_pixels=self.gallery.max_pixels, reserve=self.thumb_budget.reserve
                )
        except ImageLoadError:
            return None
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=82)
        return buf.getvalue()

    # -- updates ---------------------------------------------------------------------------

    def start_update(self) -> bool:
        with self.update_lock:
            if self.update_state["running"]:
                return False
            self.update_state["running"] = True

        def run() -> None:
            try:
                s = self.gallery.update()
                self.update_state.update(last=s.to_dict(), error=None)
            except Exception as exc:  # reported through /api/update
                self.update_state.update(error=str(exc))
            finally:
                self.thumbs.clear()
                self.update_state["running"] = False

        threading.Thread(target=run, name="leanclip-update", daemon=True).start()
        return True


def make_server(
    gallery: Gallery,
    host: str = "127.0.0.1",
    port: int = 8765,
    allow_updates: bool = False,
    max_batch: int = 64,
) -> GalleryServer:
    """A ready-to-run server (call ``serve_forever()``); port 0 picks a free port.
    ``max_batch``: most concurrent text queries answered together (1: no batching)."""
    return GalleryServer(gallery, host, port, allow_updates, max_batch)


def _static(name: str) -> bytes:
    return resources.files("leanclip").joinpath("web", name).read_bytes()


class Handler(BaseHTTPRequestHandler):
    server: GalleryServer
    server_version = "leanclip"
    sys_version = ""
    timeout = 30  # seconds a client may take to send its request (slow clients hold a thread)
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet unless asked
        if os.environ.get("LEANCLIP_SERVER_LOG"):
            super().log_message(format, *args)

    # -- responses -------------------------------------------------------------------------

    def _send(self, status: int, body: bytes, ctype: str, extra: Optional[Dict[str, str]] = None) -> None:
        self._head(status, len(body), ctype, extra)
        if self.command != "HEAD":
            self.wfile.write(body)

    def _head(self, status: int, length: int, ctype: str, extra: Optional[Dict[str, str]] = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Frame-Options", "DENY")
        if self.close_connection:
            self.send_header("Connection", "close")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()

    def _json(self, status: int, obj: Any) -> None:
        # '<' escaped too, so that JSON is never read as HTML
        body = json.dumps(obj).replace("<", "\\u003c").encode()
        self._send(status, body, "application/json; charset=utf-8", {"Cache-Control": "no-store"})

    def _not_found(self) -> None:
        self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def _error(self, status: int, message: str) -> None:
        if self.path.startswith("/api/"):
            self._json(status, {"error": message})
        else:
            self._send(status, (message + "\n").encode(), "text/plain; charset=utf-8")

    # -- request checks --------------------------------------------------------------------

    def _preflight(self) -> bool:
        """The checks every request passes first; False when it was answered (and refused)."""
        if len(self.path) > MAX_URL:
            self._error(414, f"request target longer than {MAX_URL} bytes")
            return False
        hosts = self.headers.get_all("Host") or []
        if len(hosts) > 1:
            self.close_connection = True
            self._error(400, "more than one Host header")
            return False
        host = hosts[0].strip().lower() if hosts else ""
        if not self.path.startswith("/"):
            # absolute form (http://host/path): its host is the one that counts (RFC 9112 3.2.2)
            target = urllib.parse.urlsplit(self.path)
            if target.scheme.lower() != "http" or not target.netloc:
                self._error(400, "bad request target")
                return False
            host = target.netloc.lower()
            self.path = urllib.parse.urlunsplit(("", "", target.path or "/", target.query, ""))
        if self.server.loopback_only and host not in self.server.allowed_hosts():
            # a page on another site reaching us through a rebound DNS name
            self._error(421, "unexpected Host header")
            return False
        return True

    def _body(self) -> Optional[bytes]:
        """The request body (b"" when there is none), read whole so that nothing of it is
        taken for a next request; None when the request was answered (refused) here or the
        client went away mid-body (then the connection is closed)."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._error(411, "chunked bodies are not accepted; send Content-Length")
            return None
        lengths = self.headers.get_all("Content-Length") or []
        n = _int(lengths[0].strip()) if len(lengths) == 1 else 0 if not lengths else None
        if n is None:
            self.close_connection = True
            self._error(400, "bad Content-Length")
            return None
        if n > MAX_BODY:
            self.close_connection = True
            self._error(413, f"request body larger than {MAX_BODY} bytes")
            return None
        body = self.rfile.read(n) if n else b""
        if len(body) < n:  # the client closed the connection mid-body: nobody to answer
            self.close_connection = True
            return None
        return body

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        try:
            if not self._preflight() or self._body() is None:
                return
            url = urllib.parse.urlsplit(self.path)
            path = url.path
            params = urllib.parse.parse_qs(url.query, keep_blank_values=True, max_num_fields=16)
            if path == "/":
                self._page(params)
            elif path == "/static/keys.js":
                self._send(
                    200,
                    _static("keys.js"),
                    "text/javascript; charset=utf-8",
                    {"Cache-Control": "max-age=3600"},
                )
            elif path == "/static/style.css":
                self._send(
                    200, _static("style.css"), "text/css; charset=utf-8", {"Cache-Control": "max-age=3600"}
                )
            elif path.startswith("/thumb/"):
                key = _int(path[len("/thumb/") :])
                try:
                    data = self.server.thumbnail(key) if key is not None else None
                except TimeoutError:
                    return self._error(503, "the server is busy making thumbnails; try again")
                if data is None:
                    return self._not_found()
                self._send(200, data, "image/jpeg", {"Cache-Control": "max-age=300"})
            elif path.startswith("/file/"):
                self._file(url.path[len("/file/") :])
            elif path == "/api/search":
                status, result = self._search(params)
                self._json(status, result)
            elif path == "/api/info":
                info = dict(self.server.info())
                info.pop("store", None)
                info["allow_updates"] = self.server.allow_updates
                self._json(200, info)
            elif path == "/api/update":
                self._json(200, {"enabled": self.server.allow_updates, **self.server.update_state})
            elif path == "/favicon.ico":
                self._send(204, b"", "image/x-icon")
            else:
                self._not_found()
        except ValueError as exc:  # e.g. too many query fields
            self._error(400, f"bad request: {exc}")
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_POST(self) -> None:
        try:
            self._post()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away: nobody to answer

    def _post(self) -> None:
        if not self._preflight() or self._body() is None:
            return
        if urllib.parse.urlsplit(self.path).path != "/api/update":
            return self._error(405, "method not allowed")
        if not self.server.allow_updates:
            return self._error(
                403, "updates are disabled; start `leanclip serve --allow-updates` to enable them"
            )
        if self.headers.get("X-Leanclip") != "update":
            return self._error(403, "missing header X-Leanclip: update")
        started = self.server.start_update()
        self._json(202 if started else 409, {"started": started, **self.server.update_state})

    def _refuse(self) -> None:
        self._error(405, "method not allowed")

    do_PUT = do_DELETE = do_PATCH = _refuse

    # -- content ---------------------------------------------------------------------------

    def _file(self, quoted: str) -> None:
        # one unquoting pass: '%2e%2e' becomes '..' and is refused like '..'
        rel = urllib.parse.unquote_to_bytes(quoted)
        fh = self.server.open_indexed(rel)
        if fh is None:
            return self._not_found()
        with fh:
            size = os.fstat(fh.fileno()).st_size
            ctype = _image_type(fh) or _video_type(fh)
            if ctype is None:
                return self._not_found()  # only image and video content is served, whatever the name
            self._head(200, size, ctype, {"Content-Disposition": "inline", "Cache-Control": "max-age=300"})
            if self.command == "HEAD":
                return
            # streamed from the checked descriptor by the kernel: no copy of the file in memory
            sent = self.connection.sendfile(fh, 0, size) if size else 0
            if sent != size:  # the file shrank meanwhile: the response is short, end it
                self.close_connection = True

    def _search(self, params: Dict[str, List[str]]) -> Tuple[int, Dict[str, Any]]:
        q = (params.get("q") or [""])[0].strip()
        similar = (params.get("similar") or [""])[0]
        k = _int((params.get("k") or ["48"])[0])
        glob = (params.get("path") or [""])[0].strip()
        if len(q) > MAX_QUERY or len(glob) > MAX_QUERY:
            return 400, {"error": f"query longer than {MAX_QUERY} characters"}
        if k is None or not 1 <= k <= MAX_K:
            return 400, {"error": f"k must be an integer from 1 to {MAX_K}"}
        g = self.server.gallery
        out: Dict[str, Any] = {"query": q, "results": []}
        if not q and not similar:
            return 200, out
        filters = _filters(params)  # dates and order: answered outside the batcher
        try:
            if similar:
                key = _int(similar)
                rel = self.server.path_of_key(key) if key is not None else None
                if key is None or rel is None:
                    return 404, {"error": "no such photo"}
                out["similar"] = {"key": key, "name": rel.decode("utf-8", "replace")}
                hits = g.search([Term(1, "photo", str(key))], k, paths=[glob] if glob else None, **filters)
            else:
                terms = self.server.indexed_terms(
                    parse_query(q)
                )  # refuse a bad query before it joins a batch
                if filters or any(t.kind == "ocr" for t in terms):
                    hits = g.search(terms, k, paths=[glob] if glob else None, **filters)
                else:
                    hits = self.server.batcher.search(terms, k, [glob] if glob else None)
        except LeanclipError as exc:
            return 400, {"error": str(exc)}
        except TimeoutError:
            return 503, {"error": "the server is overloaded; try again"}
        out["results"] = [_hit_json(h, g.root) for h in hits]
        return 200, out

    def _page(self, params: Dict[str, List[str]]) -> None:
        if (params.get("view") or [""])[0] == "duplicates":
            return self._send(*pages.duplicates_page(self.server.gallery, self.server.info()))
        status, result = self._search(params)
        q = (params.get("q") or [""])[0][:MAX_QUERY]
        glob = (params.get("path") or [""])[0][:MAX_QUERY]
        e = html.escape
        info = self.server.info()
        parts = [
            "<!doctype html><html lang=en><head><meta charset=utf-8>",
            "<meta name=viewport content='width=device-width,initial-scale=1'>",
            f"<title>{e(q) + ' - ' if q else ''}leanclip</title>",
            "<link rel=stylesheet href='/static/style.css'></head><body>",
            "<header><h1><a href='/'>leanclip</a></h1>",
            "<form method=get action='/' role=search>",
            f"<input type=search name=q value='{e(q, quote=True)}' placeholder='Search photos, e.g. dog on a beach -people'"
            f" maxlength={MAX_QUERY} autofocus aria-label='search'>",
            f"<input name=path value='{e(glob, quote=True)}' placeholder='folder/*' aria-label='path filter'>",
            pages.filter_inputs(params),
            "<button type=submit>Search</button></form>",
            f"<span class=note>{info['ok']} photos &middot; <a href='/?view=duplicates'>duplicates</a></span>"
            "</header><main>",
        ]
        if status != 200:
            parts.append(f"<p class=error id=error>{e(result.get('error', 'error'))}</p>")
        elif "similar" in result:
            s = result["similar"]
            parts.append(
                f"<div class=query id=similar-to><img src='/thumb/{s['key']}' alt=''>"
                f"<p>Photos similar to <b>{e(s['name'])}</b></p></div>"
            )
        elif q:
            parts.append(f"<p class=note id=summary>{len(result['results'])} results for <b>{e(q)}</b></p>")
        else:
            parts.append(
                "<p class=note>Type what you are looking for. Prefix words with + or - to add or "
                "exclude them; click a photo to see similar ones.</p>"
            )
        if result.get("results"):
            parts.append("<div class=grid id=results>")
            for r in result["results"]:
                name = e(r["name"])
                parts.append(
                    f"<figure><a href='/?similar={r['key']}' title='{name}'>"
                    f"<img src='/thumb/{r['key']}' alt='{name}' loading=lazy></a>"
                    f"<figcaption><a href='{e(r['file'], quote=True)}'>{name}</a> "
                    f"<span class=score>{r['score']:.3f}</span>{pages.hit_details(r)}</figcaption></figure>"
                )
            parts.append("</div>")
        elif status == 200 and (q or "similar" in result):
            parts.append("<p class=note id=empty>No results.</p>")
        parts.append("</main><script src='/static/keys.js'></script></body></html>")
        self._send(status, "".join(parts).encode(), "text/html; charset=utf-8", {"Cache-Control": "no-store"})


def _hit_json(h: Hit, root: Path) -> Dict[str, Any]:
    rel = os.path.relpath(os.fsencode(h.path), os.fsencode(root))
    out = {
        "key": h.key,
        "name": h.name,
        "score": round(h.score, 4),
        "thumb": f"/thumb/{h.key}",
        "file": "/file/" + urllib.parse.quote(rel),
    }
    out.update({k: v for k, v in h.to_dict().items() if k in ("taken", "text", "t")})
    return out


def _filters(params: Dict[str, List[str]]) -> Dict[str, Any]:
    """The date range and order a request asks for (only those given)."""
    out: Dict[str, Any] = {}
    for name in ("after", "before"):
        value = (params.get(name) or [""])[0].strip()[:32]
        if value:
            out[name] = value
    if (params.get("sort") or [""])[0] == "date":
        out["sort"] = "date"
    kind = (params.get("kind") or [""])[0]
    if kind in ("photo", "video"):
        out["kind"] = kind
    return out


_IMAGE_TYPES = {
    "JPEG": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "MPO": "image/jpeg",
    "HEIF": "image/heic",
    "AVIF": "image/avif",
}


def _video_type(fh: BinaryIO) -> Optional[str]:
    """The content type of a video file from its first bytes (MP4 / QuickTime, WebM /
    Matroska, AVI), or None."""
    fh.seek(0)
    head = fh.read(16)
    if head[4:8] == b"ftyp":
        return "video/quicktime" if head[8:12] == b"qt  " else "video/mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "video/webm"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "video/x-msvideo"
    return None


def _image_type(fh: BinaryIO) -> Optional[str]:
    """The content type of an image file, identified from its header by Pillow (no decoding),
    or None when it is not one of the gallery's image formats."""
    from PIL import Image, UnidentifiedImageError

    try:
        fh.seek(0)
        with Image.open(fh) as im:
            return _IMAGE_TYPES.get(im.format or "")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def _int(text: Optional[str]) -> Optional[int]:
    """A non-negative decimal integer below 2**63 (photo keys, k, lengths), else None: a
    key too large for SQLite is a 404 like any unknown key."""
    if not text or len(text) > 19 or not (text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if value < 1 << 63 else None
