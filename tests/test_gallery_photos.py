"""The gallery's photo features (issue 29): phone formats, capture dates (filters and sort
checked against a brute-force filter), near-duplicate groups (pairs checked against numpy),
all incremental."""

from __future__ import annotations

import itertools
import json
import os
import sqlite3

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from leanclip.cli import main
from leanclip.dates import parse_bound
from leanclip.gallery import Gallery, GalleryError
from leanclip.gallery import duplicates as dup
from leanclip.images import register_formats
from tests._fixtures_gallery import COLORS, ColorEncoder, make_photo, use_color_encoder

register_formats()


def _exif(date: str) -> bytes:
    ex = Image.Exif()
    ex.get_ifd(0x8769)[0x9003] = date
    return ex.tobytes()


# ------------------------------------------------------------------------------ phone formats


def test_heic_and_avif_index_search_and_thumbnail(tmp_path):
    from leanclip.server import make_server

    root = tmp_path / "photos"
    make_photo(root / "red.jpg", COLORS["red"], seed=1)
    make_photo(root / "blue.heic", COLORS["blue"], seed=2)
    make_photo(root / "green.avif", COLORS["green"], seed=3)
    (root / "broken.heic").write_bytes((root / "blue.heic").read_bytes()[:60])
    g = Gallery(root, model=ColorEncoder())
    s = g.update()
    assert s.added == 3 and s.failed == 1
    assert "corrupt HEIC/HEIF" in dict(s.failures)["broken.heic"]
    assert g.search("blue", k=1)[0].name == "blue.heic"
    assert g.search("green", k=1)[0].name == "green.avif"
    server = make_server(g, port=0)
    try:
        thumb = server.thumbnail(g.search("blue", k=1)[0].key)
        assert thumb is not None and thumb[:2] == b"\xff\xd8"  # served as a JPEG thumbnail
    finally:
        server.server_close()


def test_heic_is_read_from_its_thumbnail_when_large_enough(tmp_path):
    from leanclip.images import ImageLoadError, load_image

    rng = np.random.default_rng(0)
    arr = np.zeros((480, 640, 3), np.uint8)
    arr[:, :320] = (220, 30, 30)  # red left half, blue right half: the thumbnail is a scaled copy
    arr[:, 320:] = (30, 30, 220)
    im = Image.fromarray(np.clip(arr + rng.normal(0, 4, arr.shape), 0, 255).astype(np.uint8))
    path = tmp_path / "phone.heic"
    im.save(path, quality=80, thumbnails=[160], enc_params={"preset": "ultrafast"})
    with load_image(path, reduce_for=100) as small:  # the 160x120 thumbnail covers 100 x 100
        assert small.size == (160, 120)
        left, right = np.asarray(small)[:, :70].mean((0, 1)), np.asarray(small)[:, 90:].mean((0, 1))
        assert left[0] > 150 > left[2] and right[2] > 150 > right[0]
    with load_image(path, reduce_for=150) as full:  # too small for 150: the image, reduced
        assert full.size == (640, 480)
    with load_image(path) as full:
        assert full.size == (640, 480)
    with pytest.raises(ImageLoadError, match="pixels"):  # the declared size is checked first
        load_image(path, reduce_for=100, max_pixels=640 * 480 - 1)


# ------------------------------------------------------------------------------ dates

DATES = ["2019:12:31 23:59:59", "2020:01:01 00:00:00", "2020:07:14 12:00:00", "2021:03:01 08:00:00", None]


@pytest.fixture(scope="module")
def dated(tmp_path_factory):
    """20 photos of 4 colours, each with one of DATES (None: no EXIF, a fixed mtime)."""
    root = tmp_path_factory.mktemp("dated")
    truth = {}
    for i in range(20):
        color = list(COLORS)[i % 4]
        p = make_photo(root / f"p{i:02d}.jpg", COLORS[color], seed=i)
        date = DATES[i % 5]
        if date:
            Image.open(p).save(p, exif=_exif(date))
        else:
            os.utime(p, (1_500_000_000 + i, 1_500_000_000 + i))  # 2017-07
        truth[f"p{i:02d}.jpg"] = date
    g = Gallery(root, model=ColorEncoder())
    g.update()
    return g, truth


BOUNDS = [None, "2017", "2019-12-31", "2020", "2020-07", "2020-07-14T12:00", "2021", "2030"]


def test_every_date_filter_and_sort_matches_a_brute_force_filter(dated):
    g, _ = dated
    everything = g.search("red", k=100)
    assert len(everything) == 20
    taken = {h.key: h.taken for h in everything}
    assert all(t is not None for t in taken.values())
    for after, before, sort in itertools.product(BOUNDS, BOUNDS, ["score", "date"]):
        for k in (3, 100):
            got = g.search("red", k=k, after=after, before=before, sort=sort)
            lo = parse_bound(after) if after else None
            hi = parse_bound(before) if before else None
            # brute force: filter the full ranking, keep the best k, then order
            want = [
                h
                for h in everything
                if (lo is None or taken[h.key] >= lo) and (hi is None or taken[h.key] < hi)
            ][:k]
            if sort == "date":
                want = sorted(want, key=lambda h: -taken[h.key])
                assert [taken[h.key] for h in got] == [taken[h.key] for h in want]
                assert {h.key for h in got} == {h.key for h in want}, (after, before, sort, k)
            else:
                assert [h.key for h in got] == [h.key for h in want], (after, before, sort, k)


def test_exif_dates_and_mtime_fallback_are_stored(dated):
    g, truth = dated
    conn = sqlite3.connect(g.db_path)
    rows = dict(
        (
            (bytes(p).decode(), (t, src))
            for p, t, src in conn.execute("SELECT path, taken, taken_from FROM files")
        )
    )
    conn.close()
    for name, date in truth.items():
        t, src = rows[name]
        if date:
            assert src == "exif" and t == parse_bound(date.replace(":", "-", 2).replace(" ", "T"))
        else:
            assert src == "mtime" and 1_500_000_000 <= t < 1_500_000_000 + 86400


def test_date_options_on_the_command_line(dated, monkeypatch):
    g, _ = dated
    use_color_encoder(monkeypatch)
    run = CliRunner().invoke(
        main,
        [
            "search",
            "red",
            "-d",
            str(g.root),
            "--after",
            "2020",
            "--before",
            "2021",
            "--sort",
            "date",
            "--json",
        ],
    )
    assert run.exit_code == 0, run.output
    res = json.loads(run.output)["results"]
    assert res and all(r["taken"].startswith("2020-") for r in res)
    assert [r["taken"] for r in res] == sorted((r["taken"] for r in res), reverse=True)
    bad = CliRunner().invoke(main, ["search", "red", "-d", str(g.root), "--after", "last summer"])
    assert bad.exit_code == 3 and "--after" in bad.output and "not a date" in bad.output


def test_absurd_exif_date_falls_back_and_never_fails(tmp_path):
    root = tmp_path / "p"
    for i, date in enumerate(
        ["0000:00:00 00:00:00", "2999:01:01 00:00:00", "garbage", "1700:01:01 00:00:00"]
    ):
        p = make_photo(root / f"a{i}.jpg", COLORS["red"], seed=i)
        Image.open(p).save(p, exif=_exif(date))
    g = Gallery(root, model=ColorEncoder())
    s = g.update()
    assert s.added == 4 and s.failed == 0
    conn = sqlite3.connect(g.db_path)
    assert {r[0] for r in conn.execute("SELECT taken_from FROM files")} == {"mtime"}
    conn.close()


def test_version_2_store_gets_dates_without_re_encoding(tmp_path):
    root = tmp_path / "p"
    p = make_photo(root / "a.jpg", COLORS["red"], seed=1)
    Image.open(p).save(p, exif=_exif("2022:02:02 02:02:02"))
    make_photo(root / "b.jpg", COLORS["blue"], seed=2)
    Gallery(root, model=ColorEncoder()).update()
    conn = sqlite3.connect(root / ".leanclip" / "gallery.db")
    conn.execute("ALTER TABLE files DROP COLUMN taken")
    conn.execute("ALTER TABLE files DROP COLUMN taken_from")
    for table in ("texts", "near", "near_done", "looks"):
        conn.execute(f"DROP TABLE {table}")
    conn.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    g = Gallery(root, model=ColorEncoder())
    assert g.search("red", k=1)[0].taken is None  # read as it is
    with pytest.raises(GalleryError, match="leanclip index"):
        g.search("red", after="2020")
    enc = ColorEncoder()
    s = Gallery(root, model=enc).update()
    assert enc.images_encoded == 0 and s.unchanged == 2
    g = Gallery(root, model=ColorEncoder())
    assert [h.name for h in g.search("red", k=5, after="2022", before="2023")] == ["a.jpg"]


# ------------------------------------------------------------------------------ duplicates


def _union_find_groups(a, b):
    parent = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for x, y in zip(a, b):
        parent[find(x)] = find(y)
    groups = {}
    for x in parent:
        groups.setdefault(find(x), []).append(x)
    return sorted(sorted(g) for g in groups.values() if len(g) > 1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), max_size=60))
def test_components_match_a_union_find(edges):
    edges = [(x, y) for x, y in edges if x != y]
    a = np.array([x for x, _ in edges], dtype=np.uint64)
    b = np.array([y for _, y in edges], dtype=np.uint64)
    assert sorted(dup.components(a, b)) == _union_find_groups([x for x, _ in edges], [y for _, y in edges])


@pytest.mark.parametrize("self_join", [False, True])
def test_neighbour_pairs_match_numpy(monkeypatch, self_join):
    from leanclip import Index

    rng = np.random.default_rng(3)
    base = rng.standard_normal((300, 32)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    copies = base[:60] + 0.15 * rng.standard_normal((60, 32)).astype(np.float32)
    x = np.concatenate([base, copies / np.linalg.norm(copies, axis=1, keepdims=True)])
    keys = np.arange(10, 10 + len(x), dtype=np.uint64)
    index = Index(32)
    index.add(keys, x)
    if self_join:
        monkeypatch.setattr(dup, "EXACT_BUDGET", 0)  # force the IVF self-join
    pairs = dup.neighbour_pairs(index, keys, floor=0.8)
    sims = x @ x.T
    np.fill_diagonal(sims, -1)
    want = {(min(keys[i], keys[j]), max(keys[i], keys[j])) for i, j in zip(*np.nonzero(sims >= 0.8))}
    got = set(zip(pairs.a.tolist(), pairs.b.tolist()))
    assert got <= want  # never a pair that does not score above the floor
    recall = len(got) / len(want)
    assert recall == 1.0 if not self_join else recall >= 0.95, recall
    assert np.all(pairs.score >= 0.8)
    # the background is each photo's BACKGROUND_RANK-th best other score
    i = 5
    assert (
        abs(pairs.background[int(keys[i])] - np.sort(sims[i])[::-1][dup.BACKGROUND_RANK - 1]) < 1e-3
        or self_join
    )


def test_calibrated_rule_rises_with_look_alike_photos():
    score = np.array([0.97, 0.97, 0.97, 0.89, 0.87])
    bg_a = np.array([0.50, 0.95, 0.50, 0.50, 0.10])
    bg_b = np.array([0.50, 0.50, 0.94, 0.80, 0.10])
    # a varied pair passes; a pair where either photo lives among look-alikes scoring 0.94-0.95
    # does not; nothing passes below MIN_THRESHOLD
    assert dup.calibrated(score, bg_a, bg_b).tolist() == [True, False, False, True, False]
    # unknown looks (NaN: photos indexed before looks) leave that rule as it is
    assert dup.calibrated(score, bg_a, bg_b, np.full(5, np.nan)).tolist() == [True, False, False, True, False]


def test_calibrated_rule_with_looks():
    # model-sure pairs whose layouts disagree are vetoed; pairs that look the same count when
    # the model agrees loosely, whatever the backgrounds; neither signal alone is enough
    score = np.array([0.97, 0.97, 0.70, 0.70, 0.55, 0.97])
    look = np.array([0.80, 0.30, 0.95, 0.85, 0.99, np.nan])
    bg = np.full(6, 0.96)  # photos among look-alikes: the model's rule alone passes nothing here
    assert dup.calibrated(score, bg - 0.5, bg - 0.5, look).tolist() == [True, False, True, False, False, True]
    assert dup.calibrated(score, bg, bg, look).tolist() == [False, False, True, False, False, False]
    assert (score[[0, 2]] >= dup.LOOK_FLOOR).all() and dup.worth_storing(score, look).tolist() == [
        True,
        True,
        True,
        False,
        False,
        True,
    ]


def test_look_keeps_edits_and_tells_layouts_apart():
    from PIL import ImageEnhance

    rng = np.random.default_rng(0)
    arr = np.zeros((96, 128, 3), np.uint8)
    arr[:, :64] = (200, 40, 40)
    arr[48:, 64:] = (30, 60, 220)
    arr = np.clip(arr + rng.normal(0, 8, arr.shape), 0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    look = dup.look(im).astype(np.float32)
    assert look.dtype == np.float32 and look.shape == (dup.LOOK_SIDE**2 * 3,)
    assert abs(float(np.linalg.norm(look)) - 1) < 1e-2
    brighter = dup.look(ImageEnhance.Brightness(im).enhance(1.15)).astype(np.float32)
    smaller = dup.look(im.resize((48, 36))).astype(np.float32)
    mirrored = dup.look(im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)).astype(np.float32)
    assert look @ brighter > 0.97 and look @ smaller > 0.97
    assert look @ mirrored < 0.5  # the same colours laid out otherwise
    assert not dup.look(Image.new("RGB", (40, 30), (9, 9, 9))).any()  # flat: no layout at all
    keys = np.array([1, 1, 2], dtype=np.uint64)
    scores = dup.look_scores(keys, np.array([2, 3, 3], dtype=np.uint64), {1: dup.look(im), 2: dup.look(im)})
    assert abs(scores[0] - 1) < 1e-2 and np.isnan(scores[1]) and np.isnan(scores[2])


def test_duplicate_groups_are_incremental_and_nothing_is_deleted(tmp_path, monkeypatch):
    use_color_encoder(monkeypatch)
    root = tmp_path / "p"
    for i, c in enumerate(COLORS):
        make_photo(root / f"{c}.jpg", COLORS[c], seed=i, size=(64, 48))
    Image.open(root / "red.jpg").save(root / "red_resaved.jpg", quality=40)
    Image.open(root / "blue.jpg").crop((2, 2, 62, 46)).save(root / "blue_crop.png")
    g = Gallery(root, model=ColorEncoder())
    g.update()
    _, groups = g.duplicates(0.97)
    assert sorted([h.name for h in grp] for grp in groups) == [
        ["blue.jpg", "blue_crop.png"],
        ["red.jpg", "red_resaved.jpg"],
    ]
    conn = sqlite3.connect(g.db_path)
    searched = conn.execute("SELECT count(*) FROM near_done").fetchone()[0]
    conn.close()
    assert searched == 10
    # a new copy: only it is searched; a removed photo leaves its group
    Image.open(root / "green.jpg").save(root / "green_copy.webp", quality=90)
    (root / "red_resaved.jpg").unlink()
    g = Gallery(root, model=ColorEncoder())
    g.update()
    _, groups = g.duplicates(0.97)
    assert sorted([h.name for h in grp] for grp in groups) == [
        ["blue.jpg", "blue_crop.png"],
        ["green.jpg", "green_copy.webp"],
    ]
    assert sorted(p.name for p in root.iterdir() if p.is_file()) == sorted(
        [
            "blue.jpg",
            "blue_crop.png",
            "green.jpg",
            "green_copy.webp",
            *[f"{c}.jpg" for c in COLORS if c not in ("blue", "green")],
        ]
    )
    run = CliRunner().invoke(main, ["duplicates", "-d", str(root), "--threshold", "0.97", "--json"])
    assert run.exit_code == 0, run.output
    out = json.loads(run.output)
    assert out["threshold"] == 0.97 and not out["auto"] and len(out["groups"]) == 2
    auto = CliRunner().invoke(main, ["duplicates", "-d", str(root), "--json"])
    assert json.loads(auto.output)["auto"] is True and json.loads(auto.output)["threshold"] is None
    both = CliRunner().invoke(main, ["duplicates", "-d", str(root), "--auto", "--threshold", "0.9"])
    assert both.exit_code == 2 and "not both" in both.output


def test_looks_are_stored_copied_and_an_older_store_migrates(tmp_path):
    import shutil

    root = tmp_path / "p"
    for i, c in enumerate(["red", "green", "blue"]):
        make_photo(root / f"{c}.jpg", COLORS[c], seed=i)
    shutil.copy(root / "red.jpg", root / "red_same.jpg")  # same bytes: the vector is copied
    Image.open(root / "blue.jpg").save(root / "blue_resaved.jpg", quality=30)
    Gallery(root, model=ColorEncoder()).update()
    conn = sqlite3.connect(root / ".leanclip" / "gallery.db")
    key = dict(conn.execute("SELECT CAST(path AS TEXT), key FROM files"))
    looks = dict(conn.execute("SELECT key, look FROM looks"))
    assert set(looks) == set(key.values())
    assert looks[key["red.jpg"]] == looks[key["red_same.jpg"]]
    stored = {(a, b): t for a, b, t in conn.execute("SELECT a, b, look FROM near")}
    pair = tuple(sorted((key["blue.jpg"], key["blue_resaved.jpg"])))
    want = np.frombuffer(looks[pair[0]], np.float16).astype(np.float32) @ np.frombuffer(
        looks[pair[1]], np.float16
    ).astype(np.float32)
    assert abs(stored[pair] - want) < 1e-3 and want > dup.LOOK_MIN
    # a version 3 store (no looks): read as it is, then migrated; only new photos get a look
    conn.execute("DROP TABLE looks")
    conn.execute("ALTER TABLE near DROP COLUMN look")
    conn.execute("UPDATE meta SET value='3' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    _, groups = Gallery(root, model=ColorEncoder()).duplicates()
    assert ["blue.jpg", "blue_resaved.jpg"] in [[h.name for h in g] for g in groups]
    make_photo(root / "yellow.jpg", COLORS["yellow"], seed=9)
    enc = ColorEncoder()
    Gallery(root, model=enc).update()
    assert enc.images_encoded == 1
    conn = sqlite3.connect(root / ".leanclip" / "gallery.db")
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "4"
    new_key = conn.execute("SELECT key FROM files WHERE path = CAST('yellow.jpg' AS BLOB)").fetchone()[0]
    assert [k for (k,) in conn.execute("SELECT key FROM looks")] == [new_key]
    conn.close()
    _, groups = Gallery(root, model=ColorEncoder()).duplicates()
    assert ["blue.jpg", "blue_resaved.jpg"] in [[h.name for h in g] for g in groups]
