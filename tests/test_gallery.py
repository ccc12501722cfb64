"""Gallery: incremental semantics, hostile files, model change, queries, concurrency."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from leanclip.gallery import (
    Gallery,
    GalleryBusyError,
    GalleryError,
    ModelMismatchError,
    Term,
    parse_query,
)
from tests._fixtures_gallery import (
    COLORS,
    ColorEncoder,
    make_folder,
    make_photo,
    set_mtime_later,
    update_worker_command,
)

REPO = Path(__file__).resolve().parent.parent  # the crash-test worker runs as tests._fixtures_gallery


def _gallery(root: Path, enc: ColorEncoder | None = None, **kw) -> Gallery:
    return Gallery(root, model=enc or ColorEncoder(), **kw)


def _consistent(g: Gallery) -> None:
    missing, extra = g.check()
    assert missing == [] and extra == [], (missing, extra)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    make_folder(root, n_per_color=2)
    return root


def test_first_index_then_nothing_to_do(folder: Path) -> None:
    enc = ColorEncoder()
    g = _gallery(folder, enc)
    s = g.update()
    assert (s.added, s.failed, s.removed, s.encoded) == (8, 0, 0, 8)
    assert (folder / ".leanclip" / "gallery.db").is_file()
    _consistent(g)
    hits = g.search("red", k=2)
    reference = ColorEncoder()  # brute force over the same photos ranks them the same way
    photos = sorted(folder.rglob("*.jpg"))
    scores = reference.encode_images(photos) @ reference.encode_text(["red"])[0]
    best = [photos[i].relative_to(folder).as_posix() for i in np.argsort(-scores, kind="stable")[:2]]
    assert [h.name for h in hits] == best
    assert {h.name for h in hits} == {"red/red_0.jpg", "red/red_1.jpg"}
    assert all(h.path.is_file() for h in hits)
    assert hits[0].score >= hits[1].score > 0.5
    s2 = g.update()
    assert (s2.added, s2.updated, s2.removed, s2.encoded, s2.unchanged) == (0, 0, 0, 0, 8)
    assert enc.images_encoded == 8  # nothing re-encoded


def test_new_changed_touched_deleted(folder: Path) -> None:
    enc = ColorEncoder()
    g = _gallery(folder, enc)
    g.update()
    make_photo(folder / "new" / "purple.jpg", COLORS["purple"], seed=99)
    # changed content: the red photo becomes white
    make_photo(folder / "red" / "red_0.jpg", COLORS["white"], seed=98)
    set_mtime_later(folder / "red" / "red_0.jpg")
    # touched: same bytes, new mtime -> hashed, not encoded
    set_mtime_later(folder / "green" / "green_0.jpg")
    (folder / "blue" / "blue_1.jpg").unlink()
    before = enc.images_encoded
    s = g.update()
    assert (s.added, s.updated, s.removed, s.renamed, s.failed) == (1, 1, 1, 0, 0)
    assert enc.images_encoded - before == 2
    _consistent(g)
    assert g.search("purple", k=1)[0].name == "new/purple.jpg"
    assert g.search("white", k=1)[0].name == "red/red_0.jpg"
    names = {h.name for h in g.search("blue", k=20)}
    assert "blue/blue_1.jpg" not in names and len(names) == 8
    assert g.info()["ok"] == 8


def test_rename_and_move_are_not_reencoded(folder: Path) -> None:
    enc = ColorEncoder()
    g = _gallery(folder, enc)
    g.update()
    key_before = {n: k for n, _, k in g.files()}["red/red_0.jpg"]
    (folder / "archive").mkdir()
    os.rename(folder / "red" / "red_0.jpg", folder / "archive" / "old red.jpg")
    os.rename(folder / "blue" / "blue_0.jpg", folder / "blue" / "sky.jpg")
    before = enc.images_encoded
    s = g.update()
    assert (s.renamed, s.added, s.removed, s.encoded) == (2, 0, 0, 0)
    assert enc.images_encoded == before
    keys = {n: k for n, _, k in g.files()}
    assert keys["archive/old red.jpg"] == key_before  # same vector, same key
    assert "red/red_0.jpg" not in keys
    _consistent(g)
    assert "archive/old red.jpg" in {h.name for h in g.search("red", k=2)}


def test_duplicate_copy_reuses_vector(folder: Path) -> None:
    enc = ColorEncoder()
    g = _gallery(folder, enc)
    g.update()
    shutil.copy(folder / "green" / "green_1.jpg", folder / "green_copy.jpg")
    before = enc.images_encoded
    s = g.update()
    assert (s.copied, s.encoded, s.added) == (1, 0, 1)
    assert enc.images_encoded == before
    _consistent(g)
    names = {h.name for h in g.search("green", k=3)}
    assert {"green_copy.jpg", "green/green_1.jpg"} <= names


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares width x height (a decompression bomb's first bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))


def test_hostile_files_are_recorded_and_skipped(folder: Path) -> None:
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not an image")
    good = make_photo(folder / "trunc_src.jpg", COLORS["orange"], seed=5, size=(256, 256))
    data = good.read_bytes()
    good.unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 3])
    _png_header_only(folder / "bomb.png", 100_000, 100_000)
    (folder / "album.jpg").mkdir()
    make_photo(folder / "album.jpg" / "inside.png", COLORS["black"], seed=6, fmt="PNG")
    # a PNG saved with a .jpg name is still an image: decoded by content
    make_photo(folder / "actually_png.jpg", COLORS["purple"], seed=7, fmt="PNG")
    g = _gallery(folder)
    s = g.update()
    reasons = dict(g.failures())
    assert set(reasons) == {"zero.jpg", "text.jpg", "truncated.jpg", "bomb.png", "album.jpg"}
    assert "empty" in reasons["zero.jpg"]
    assert "not a recognised image" in reasons["text.jpg"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "decompression bomb" in reasons["bomb.png"] and "pixels" in reasons["bomb.png"]
    assert "directory" in reasons["album.jpg"]
    assert s.failed == 5 and s.added == 10
    names = {n for n, st, _ in g.files() if st == "ok"}
    assert {"album.jpg/inside.png", "actually_png.jpg"} <= names
    _consistent(g)
    # failures are not retried while unchanged, and are retried once the file changes
    s2 = g.update()
    assert (s2.failed, s2.encoded) == (0, 0)
    make_photo(folder / "text.jpg", COLORS["white"], seed=8)
    set_mtime_later(folder / "text.jpg")
    s3 = g.update()
    assert (s3.updated, s3.failed) == (1, 0)
    assert "text.jpg" not in dict(g.failures())


def test_max_pixels_limit(tmp_path: Path) -> None:
    make_photo(tmp_path / "big.jpg", COLORS["red"], size=(400, 300))
    make_photo(tmp_path / "small.jpg", COLORS["red"], size=(40, 30))
    g = _gallery(tmp_path, max_pixels=50_000)
    s = g.update()
    assert s.added == 1 and s.failed == 1
    assert "400x300" in dict(g.failures())["big.jpg"]


def test_symlinks_are_not_followed_and_loops_terminate(folder: Path, tmp_path: Path) -> None:
    outside = make_photo(tmp_path / "outside" / "secret.jpg", COLORS["black"], seed=50)
    os.symlink(outside, folder / "link_to_outside.jpg")
    os.symlink(folder, folder / "loop")  # a directory symlink back to the root
    os.symlink("self.jpg", folder / "self.jpg")  # a symlink to itself
    g = _gallery(folder)
    s = g.update()
    assert s.failed == 0 and s.added == 8
    names = {n for n, _, _ in g.files()}
    assert not any("link" in n or "loop" in n or "self" in n for n in names)


def test_non_utf8_file_names(folder: Path) -> None:
    raw = os.fsencode(str(folder)) + b"/caf\xe9 \xff.jpg"
    src = make_photo(folder / "tmp.jpg", COLORS["orange"], seed=77)
    os.rename(src, raw)
    g = _gallery(folder)
    s = g.update()
    assert s.failed == 0 and s.added == 9
    hit = g.search("orange", k=1)[0]
    assert hit.name == "caf\ufffd \ufffd.jpg"
    assert os.fsencode(hit.path) == raw and os.path.isfile(hit.path)
    # renaming it to another non-UTF-8 name is a rename, not an add
    os.rename(raw, os.fsencode(str(folder)) + b"/\xfe.jpg")
    s2 = g.update()
    assert (s2.renamed, s2.encoded) == (1, 0)
    _consistent(g)


def test_unreadable_file_is_recorded(tmp_path: Path) -> None:
    """A file the indexing user may not read is recorded as failed. Tests run as root, which
    reads anything; so the update runs in a subprocess that first switches its filesystem user
    to 'nobody' (setfsuid drops root's file-access override for that thread)."""
    base = Path(tempfile.mkdtemp(prefix="leanclip-perm-"))
    try:
        os.chmod(base, 0o777)
        root = base / "photos"
        make_folder(root, n_per_color=1, colors=("red", "blue"))
        for p in [root, *root.rglob("*")]:
            os.chmod(p, 0o777 if p.is_dir() else 0o644)
        os.chmod(root / "red" / "red_0.jpg", 0o000)
        code = textwrap.dedent(
            f"""
            import ctypes, json, os, sys
            sys.path[:0] = {sys.path!r}
            from PIL import Image
            Image.init()  # load the decoders before losing access to site-packages
            import leanclip
            from leanclip import Index, IndexFileError
            from leanclip.gallery import Gallery
            from tests._fixtures_gallery import ColorEncoder
            if os.geteuid() == 0:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.setfsgid(65534)
                libc.setfsuid(65534)
                assert libc.setfsuid(-1) == 65534
            try:
                open({str(root / "red" / "red_0.jpg")!r}, "rb")
                print("STILL-READABLE")
            except PermissionError:
                pass
            s = Gallery({str(root)!r}, model=ColorEncoder()).update()
            print(json.dumps(s.to_dict()))
            """
        )
        res = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=os.getcwd(), timeout=120
        )
        assert res.returncode == 0, res.stderr
        assert "STILL-READABLE" not in res.stdout
        g = Gallery(root, model=ColorEncoder())
        failures = dict(g.failures())
        assert list(failures) == ["red/red_0.jpg"]
        assert "permission denied" in failures["red/red_0.jpg"].lower()
        assert {n for n, st, _ in g.files() if st == "ok"} == {"blue/blue_0.jpg"}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_model_change_reencodes_and_never_mixes(folder: Path) -> None:
    g1 = _gallery(folder, ColorEncoder("color-v1"))
    g1.update()
    model_v1 = g1.info()["model_id"]
    enc2 = ColorEncoder("color-v2")
    g2 = _gallery(folder, enc2)
    with pytest.raises(ModelMismatchError, match="color-v1"):
        g2.search("red")
    s = g2.update()
    assert "model changed" in s.recovered
    assert s.encoded == 8 and enc2.images_encoded == 8
    info = g2.info()
    assert info["model_id"] == "color-v2" != model_v1 and info["ok"] == 8 and info["pending"] == 0
    _consistent(g2)
    assert {h.name for h in g2.search("red", k=2)} == {"red/red_0.jpg", "red/red_1.jpg"}
    g1b = _gallery(folder, ColorEncoder("color-v1"))
    with pytest.raises(ModelMismatchError):
        g1b.search("red")


def test_custom_store_location(folder: Path, tmp_path: Path) -> None:
    store = tmp_path / "elsewhere"
    g = Gallery(folder, store=store, model=ColorEncoder())
    g.update()
    assert (store / "gallery.db").is_file() and not (folder / ".leanclip").exists()
    assert len(g.search("blue", k=3)) == 3


def test_search_before_index_and_bad_root(tmp_path: Path) -> None:
    with pytest.raises(GalleryError, match="leanclip index"):
        _gallery(tmp_path).search("red")
    with pytest.raises(GalleryError, match="does not exist"):
        Gallery(tmp_path / "nope", model=ColorEncoder())


def test_parse_query() -> None:
    terms = parse_query('beach at night +sunset -people +img:a.jpg -img:"b c.png" -"city lights"')
    assert terms == [
        Term(1, "text", "beach at night"),
        Term(1, "text", "sunset"),
        Term(-1, "text", "people"),
        Term(1, "image", "a.jpg"),
        Term(-1, "image", "b c.png"),
        Term(-1, "text", "city lights"),
    ]
    with pytest.raises(GalleryError, match="no positive"):
        parse_query("-people")
    with pytest.raises(GalleryError, match="cannot parse"):
        parse_query('"unclosed')
    with pytest.raises(GalleryError, match="4096"):
        parse_query("x" * 5000)


def test_combined_filtered_and_similar_queries(folder: Path) -> None:
    g = _gallery(folder)
    g.update()
    blue = folder / "blue" / "blue_0.jpg"
    hits = g.search(f"red +img:{blue}", k=3)  # 2 red + 1 other blue
    colors = {h.name.split("/")[0] for h in hits}
    assert colors == {"red", "blue"}
    assert "blue/blue_0.jpg" not in {h.name for h in hits}  # the query image is left out
    # a negative term pushes its colour down the list
    plain = [h.name for h in g.search("orange", k=8)]
    minus = [h.name for h in g.search("orange -yellow", k=8)]
    assert plain.index("yellow/yellow_0.jpg") < minus.index("yellow/yellow_0.jpg")
    # path filter and minimum score
    only_blue = g.search("red", k=5, paths=["blue/*"])
    assert [h.name.split("/")[0] for h in only_blue] == ["blue", "blue"]
    strict = g.search("red", k=8, min_score=0.9)
    assert strict and all(h.score >= 0.9 for h in strict) and len(strict) < 8
    sim = g.similar(blue, k=3)
    assert sim[0].name == "blue/blue_1.jpg" and blue not in {h.path for h in sim}
    # an image from outside the gallery is encoded on the fly
    ext = make_photo(folder.parent / "query.jpg", COLORS["green"], seed=123)
    assert g.similar(ext, k=1)[0].name.startswith("green/")
    with pytest.raises(GalleryError, match="k must be"):
        g.search("red", k=0)


def test_second_writer_is_refused(folder: Path) -> None:
    class Slow(ColorEncoder):
        def encode_images(self, images, batch_size=32):
            time.sleep(0.3)
            return super().encode_images(images)

    g = _gallery(folder, Slow(), batch_size=1)
    t = threading.Thread(target=g.update)
    t.start()
    time.sleep(0.3)
    try:
        with pytest.raises(GalleryBusyError, match="another process"):
            _gallery(folder).update()
    finally:
        t.join()
    _consistent(g)


def test_concurrent_read_while_indexing(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    make_folder(root, n_per_color=6)

    class Slow(ColorEncoder):
        def encode_images(self, images, batch_size=32):
            time.sleep(0.05)
            return super().encode_images(images)

    writer = _gallery(root, Slow(), batch_size=2, checkpoint_every=2)
    writer.update()  # create the store, then make everything change so the next run is long
    for p in root.rglob("*.jpg"):
        set_mtime_later(p)
        make_photo(p, COLORS["white"], seed=hash(p.name) % 1000)
    errors: list[BaseException] = []
    t = threading.Thread(target=lambda: writer.update())
    t.start()
    reader = _gallery(root)
    seen_generations = set()
    n_queries = 0
    while t.is_alive() or n_queries < 3:
        try:
            hits = reader.search("white", k=24)
            assert len({h.key for h in hits}) == len(hits)
            assert all(h.path.is_file() for h in hits)
            seen_generations.add(reader.info()["generation"])
            _consistent(reader)
        except BaseException as exc:  # noqa: BLE001 - collected and reported below
            errors.append(exc)
            break
        n_queries += 1
    t.join()
    assert not errors, errors
    assert len(seen_generations) >= 2  # the reader saw checkpoints happen
    assert len(reader.search("white", k=30)) == 24


def test_interrupt_keeps_finished_batches(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    make_folder(root, n_per_color=3)

    class Interrupting(ColorEncoder):
        def encode_images(self, images, batch_size=32):
            if self.images_encoded >= 6:
                raise KeyboardInterrupt
            return super().encode_images(images)

    g = _gallery(root, Interrupting(), batch_size=2, checkpoint_every=100)
    with pytest.raises(KeyboardInterrupt):
        g.update()
    assert g.info()["ok"] == 6  # the three finished batches were saved
    _consistent(g)
    enc = ColorEncoder()
    s = _gallery(root, enc).update()
    assert s.added == 6 and enc.images_encoded == 6


# -------------------------------------------------------------------------- crash consistency

_MODES = ["encode", "save", "unlink", "time"]


def _kill_test(tmp_path: Path, n_files: int, kills: int, seed: int) -> None:
    root = tmp_path / "photos"
    colors = list(COLORS)
    for i in range(n_files):
        make_photo(
            root / f"d{i % 7}" / f"p{i:04d}.jpg", COLORS[colors[i % len(colors)]], seed=i, size=(24, 16)
        )
    rng = np.random.default_rng(seed)
    killed = 0
    for i in range(kills):
        if i > 0:
            # change the folder between runs so every run has work: rewrites, a delete, a rename
            files = sorted(root.rglob("*.jpg"))
            for j in rng.choice(len(files), size=max(4, len(files) // 5), replace=False):
                make_photo(
                    files[j],
                    COLORS[colors[int(rng.integers(len(colors)))]],
                    seed=int(rng.integers(1 << 30)),
                    size=(24, 16),
                )
                set_mtime_later(files[j], 1 + i)
            files[int(rng.integers(len(files)))].unlink()
            v = sorted(root.rglob("*.jpg"))[int(rng.integers(len(files) - 1))]
            os.rename(v, v.with_name(f"moved{i}_" + v.name))
        mode = _MODES[i % len(_MODES)]
        at = int(rng.integers(1, 6)) if mode != "time" else 0
        argv = update_worker_command(
            root, mode=mode, at=at, delay=0.01, batch_size=4, checkpoint_every=8, checkpoint_overhead=1.0
        )
        proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL)
        if mode == "time":
            time.sleep(float(rng.uniform(0.3, 1.2)))
            proc.kill()
        proc.wait(timeout=120)
        killed += proc.returncode == -9
        if (root / ".leanclip" / "gallery.db").exists():
            g = _gallery(root)
            _consistent(g)
            g.close()
    assert killed >= kills * 3 // 4, f"only {killed} of {kills} runs were killed mid-update"
    g = _gallery(root)
    s = g.update()
    _consistent(g)
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*.jpg")}
    rows = g.files()
    assert {n for n, st, _ in rows if st == "ok"} == on_disk
    assert len(rows) == len(on_disk) and s.failed == 0
    keys = [k for _, _, k in rows]
    assert len(set(keys)) == len(keys)
    # nothing duplicated in the index either
    assert len(g.search("red", k=10_000)) == len(on_disk)
    leftovers = [p.name for p in (root / ".leanclip").iterdir() if p.name.startswith("index-")]
    assert len(leftovers) == 1
    # every stored vector is the one of the file's current content
    enc = ColorEncoder()
    for name, _, key in rows[:: max(1, len(rows) // 20)]:
        want = enc.encode_images([root / name])[0]
        got = g.search(want, k=1)[0]
        assert got.key == key or abs(got.score - 1.0) < 1e-5


def test_resume_after_sigkill(tmp_path: Path) -> None:
    _kill_test(tmp_path, n_files=60, kills=8, seed=1)


@pytest.mark.slow
def test_resume_after_sigkill_50_points(tmp_path: Path) -> None:
    """Issue 6: 50 random kill points on a few hundred files."""
    _kill_test(tmp_path, n_files=300, kills=50, seed=2)


# -------------------------------------------------------------------------- with a real bundle


def test_real_encoder_vectors_match_direct_encoding(tmp_path: Path) -> None:
    """With a tiny exported bundle, the gallery's stored vectors are the Encoder's own."""
    from leanclip.encoder import Encoder
    from tests._fixtures_bundle import make_tiny_bundle

    enc = Encoder(make_tiny_bundle(tmp_path / "bundle"))
    root = tmp_path / "photos"
    files = make_folder(root, n_per_color=1)
    g = Gallery(root, model=enc)
    s = g.update()
    assert s.added == 4 and g.info()["model_id"] == enc.model_id and g.info()["dim"] == enc.dim
    direct = enc.encode_images([str(p) for p in files])
    for p, v in zip(files, direct):
        hit = g.search(v, k=1)[0]
        assert hit.path == p and hit.score > 0.999
    # a text query runs through the real text tower
    assert len(g.search("a photo of the sea", k=4)) == 4
    # an int8 export of another model id: the gallery re-encodes instead of mixing
    enc8 = Encoder(make_tiny_bundle(tmp_path / "bundle8", int8=True))
    assert enc8.model_id != enc.model_id
    s2 = Gallery(root, model=enc8).update()
    assert s2.encoded == 4 and "model changed" in s2.recovered


def test_storage_precision_change_converts_without_reencoding(folder: Path) -> None:
    enc = ColorEncoder()
    g = Gallery(folder, model=enc)
    g.update()
    top32 = [h.name for h in g.search("red", k=8)]
    g16 = Gallery(folder, model=enc, dtype="f16")
    s = g16.update()
    assert s.encoded == 0 and enc.images_encoded == 8
    assert {h.name for h in g16.search("red", k=2)} == set(top32[:2])
    _consistent(g16)
    # the store remembers its precision
    s = Gallery(folder, model=enc).update()
    assert s.encoded == 0
    with pytest.raises(GalleryError, match="dtype"):
        Gallery(folder, model=enc, dtype="f64")


def test_damaged_index_file_is_rebuilt(folder: Path) -> None:
    enc = ColorEncoder()
    g = _gallery(folder, enc)
    g.update()
    (index_file,) = (folder / ".leanclip").glob("index-*.lci")
    data = bytearray(index_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    index_file.write_bytes(bytes(data))
    with pytest.raises(GalleryError, match="damaged"):
        _gallery(folder).search("red")
    s = g.update()
    assert "unusable" in s.recovered and s.encoded == 8 and s.failed == 0
    _consistent(g)
    assert {h.name for h in _gallery(folder).search("red", k=2)} == {"red/red_0.jpg", "red/red_1.jpg"}


def test_search_batch_matches_single_searches(folder: Path) -> None:
    enc = ColorEncoder()
    g = _gallery(folder, enc)
    g.update()
    blue = folder / "blue" / "blue_0.jpg"
    queries = ["red", "green -yellow", f"+img:{blue}", "red", "white +blue"]
    before = enc.texts_encoded
    batch = g.search_batch(queries, k=3, paths=["*"])
    assert enc.texts_encoded - before == 5  # one call, distinct texts only: red, green, yellow, white, blue
    for q, hits in zip(queries, batch):
        single = g.search(q, k=3, paths=["*"])
        assert [h.key for h in hits] == [h.key for h in single]
        assert [round(h.score, 5) for h in hits] == [round(h.score, 5) for h in single]
    assert blue not in {h.path for h in batch[2]}
    deep = g.search_batch(["red", "blue"], k=2, paths=["yellow/*"])
    assert all(h.name.startswith("yellow/") for hits in deep for h in hits) and all(len(h) == 2 for h in deep)
    assert g.search_batch([], k=3) == []


def test_large_images_are_decoded_small(tmp_path: Path) -> None:
    """Memory per image stays bounded: a 24-megapixel JPEG is decoded at reduced scale (draft)
    and a large PNG shrunk by an integer factor, to under 4x the model input size (short side)."""
    from PIL import Image

    from leanclip.images import load_image

    big = tmp_path / "big.jpg"
    Image.new("RGB", (6000, 4000), (200, 30, 30)).save(big, quality=50)
    im = load_image(big, reduce_for=224)
    assert 224 <= min(im.size) < 4 * 224 and im.mode == "RGB"
    png = tmp_path / "big.png"
    Image.new("L", (3000, 2000), 128).save(png)
    im = load_image(png, reduce_for=224)
    assert 224 <= min(im.size) < 4 * 224 and im.mode == "RGB"
    assert abs(im.size[0] / im.size[1] - 1.5) < 0.01  # aspect ratio kept
