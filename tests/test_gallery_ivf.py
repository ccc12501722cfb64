"""The gallery's index kinds (issue 16): exact Index, IVFIndex for large libraries, and auto."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

from leanclip import Index, IVFIndex
from leanclip.gallery import Gallery, GalleryError, kinds
from tests._fixtures_gallery import (
    COLORS,
    ColorEncoder,
    make_folder,
    make_photo,
    set_mtime_later,
    update_worker_command,
)

REPO = Path(__file__).resolve().parent.parent  # the crash-test worker runs as tests._fixtures_gallery

# the IVF index lays itself out once it holds 16 vectors (not 65,536): a few dozen photos train
SMALL = 16


def _consistent(g: Gallery) -> None:
    missing, extra = g.check()
    assert missing == [] and extra == [], (missing, extra)


def _index_files(store: Path) -> list:
    return sorted(p.name for p in store.iterdir() if p.name.startswith("index-"))


def _vectors(g: Gallery) -> dict:
    """key -> stored vector, read from the committed index file of the kind the meta names."""
    g._forget_snapshot()
    _, index, meta = g._snapshot()
    keys = np.asarray(index.keys(), dtype=np.uint64)
    vecs = np.asarray(index.get(keys), dtype=np.float32)
    return {int(k): v for k, v in zip(keys.tolist(), vecs)}


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    make_folder(root, n_per_color=8)  # 32 photos of 4 colours
    return root


@pytest.fixture()
def folder128(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    make_folder(root, n_per_color=32)  # 128 photos of 4 colours: the index chooses 4 lists
    return root


QUERIES = ["red", "green -yellow", "blue +white", "orange", "black purple", "yellow"]


def test_ivf_gallery_with_all_lists_probed_equals_exact(folder128: Path, tmp_path: Path) -> None:
    folder = folder128
    exact = Gallery(folder, store=tmp_path / "exact", model=ColorEncoder(), index_kind="exact")
    exact.update()
    ivf = Gallery(folder, store=tmp_path / "ivf", model=ColorEncoder(), index_kind="ivf", ivf_train_at=SMALL)
    s = ivf.update()
    assert s.index == "ivf" and ivf.info()["index"] == "ivf" and exact.info()["index"] == "exact"
    _, index, meta = ivf._snapshot()
    # laid out by IVFIndex itself (nlist from the 128 photos: 2 sqrt(n) as a power of two, at
    # least 32 a list), retrained on all of them after training itself at 16, tuned to 0.95
    assert isinstance(index, IVFIndex) and index.is_trained and index.nlist == 4 and len(index) == 128
    assert index.auto  # what the index chose itself (a file laid out by hand says nothing)
    assert index.tuned == pytest.approx((0.95, 10)) and index.dtype == "f32"
    assert meta["ivf_layout"] == "auto" and meta["ivf_trained_at"] == meta["ivf_tuned_at"] == "128"
    assert sorted(np.asarray(index.list_sizes()).tolist())[-1] < 128  # really split into lists
    _consistent(ivf)
    full = Gallery(folder, store=tmp_path / "ivf", model=ColorEncoder(), nprobe=4)
    blue = folder / "blue" / "blue_0.jpg"
    for q in QUERIES + [f"+img:{blue}"]:
        want = exact.search(q, k=10)
        got = full.search(q, k=10)
        assert [h.name for h in got] == [h.name for h in want], q
        assert np.allclose([h.score for h in got], [h.score for h in want], atol=1e-5), q
    # similar / exclude: the query photo itself is left out, as with exact
    sim_e, sim_i = exact.similar(blue, k=5), full.similar(blue, k=5)
    assert [h.name for h in sim_i] == [h.name for h in sim_e] and blue not in {h.path for h in sim_i}
    # path filters look deeper the same way
    deep_e = exact.search("red", k=3, paths=["yellow/*"])
    deep_i = full.search("red", k=3, paths=["yellow/*"])
    assert [h.name for h in deep_i] == [h.name for h in deep_e] and len(deep_i) == 3
    # with the tuned nprobe a search still returns k results, best first
    few = ivf.search("red", k=10)
    assert len(few) == 10 and [h.score for h in few] == sorted((h.score for h in few), reverse=True)
    assert few[0].name.startswith("red/")


def test_small_ivf_gallery_is_exact_before_training(folder: Path, tmp_path: Path) -> None:
    exact = Gallery(folder, store=tmp_path / "exact", model=ColorEncoder())
    exact.update()
    # IVFIndex trains itself at 65,536 vectors: 32 photos are one exact list
    ivf = Gallery(folder, store=tmp_path / "ivf", model=ColorEncoder(), index_kind="ivf")
    ivf.update()
    _, index, _ = ivf._snapshot()
    assert isinstance(index, IVFIndex) and not index.is_trained
    for q in QUERIES:
        assert [h.key for h in ivf.search(q, k=10)] == [h.key for h in exact.search(q, k=10)]


def test_switching_kinds_keeps_every_vector_without_reencoding(folder: Path) -> None:
    enc = ColorEncoder()
    g = Gallery(folder, model=enc)
    s = g.update()
    assert s.index == "exact" and g.info()["index_choice"] == "auto" and enc.images_encoded == 32
    before = _vectors(g)
    assert len(before) == 32
    store = folder / ".leanclip"
    gen = g.info()["generation"]

    s = Gallery(folder, model=enc, index_kind="ivf", ivf_train_at=SMALL).update()
    assert s.encoded == 0 and enc.images_encoded == 32 and s.index == "ivf"
    g2 = Gallery(folder, model=enc)
    info = g2.info()
    assert info["index"] == "ivf" and info["index_choice"] == "ivf" and info["generation"] == gen + 1
    _, index, _ = g2._snapshot()
    assert isinstance(index, IVFIndex) and index.is_trained
    after = _vectors(g2)
    assert after.keys() == before.keys()
    # the same vectors (the cosine engines re-normalize on add: equal to float rounding)
    assert all(np.allclose(after[k], before[k], rtol=0, atol=1e-6) for k in before)
    assert _index_files(store) == [f"index-{gen + 1}.lci"]  # a new generation, the old one removed
    _consistent(g2)

    # the choice is kept: a plain update (no index_kind) stays IVF and has nothing to do
    s = Gallery(folder, model=enc, ivf_train_at=SMALL).update()
    assert s.index == "ivf" and s.encoded == 0 and Gallery(folder, model=enc).info()["generation"] == gen + 1

    # new photos go into the IVF index (encoded once, only them)
    make_photo(folder / "new" / "n0.jpg", COLORS["white"], seed=99)
    s = Gallery(folder, model=enc, ivf_train_at=SMALL).update()
    assert s.added == 1 and enc.images_encoded == 33 and s.index == "ivf"

    # and back to exact, with precision change in the same run: still no re-encoding
    s = Gallery(folder, model=enc, index_kind="exact", dtype="f16").update()
    assert s.encoded == 0 and enc.images_encoded == 33 and s.index == "exact"
    g3 = Gallery(folder, model=enc)
    _, index, _ = g3._snapshot()
    assert isinstance(index, Index) and index.dtype == "f16" and len(index) == 33
    back = _vectors(g3)
    assert all(np.allclose(back[k], before[k], atol=2e-3) for k in before)
    assert [h.name for h in g3.search("red", k=3)] == [h.name for h in g.search("red", k=3)]
    assert len(_index_files(store)) == 1
    _consistent(g3)

    # f16 IVF (the precision is kept): another conversion, again without encoding
    s = Gallery(folder, model=enc, index_kind="ivf", ivf_train_at=SMALL).update()
    assert s.encoded == 0 and enc.images_encoded == 33
    _, index, _ = Gallery(folder, model=enc)._snapshot()
    assert isinstance(index, IVFIndex) and index.dtype == "f16" and len(index) == 33


def test_auto_switches_above_the_threshold(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    make_folder(root, n_per_color=3)  # 12 photos
    enc = ColorEncoder()
    kw = dict(model=enc, auto_threshold=16, ivf_train_at=SMALL)
    s = Gallery(root, **kw).update()
    assert s.index == "exact" and Gallery(root, **kw).info()["index_choice"] == "auto"
    for i in range(8):  # 20 photos > 16
        make_photo(root / "more" / f"m{i}.jpg", COLORS["green"], seed=100 + i)
    s = Gallery(root, **kw).update()
    assert s.index == "ivf" and s.encoded == 8 and enc.images_encoded == 20
    _consistent(Gallery(root, **kw))
    # hysteresis: back to 12 photos (between 8 and 16) it stays IVF ...
    shutil.rmtree(root / "more")
    assert Gallery(root, **kw).update().index == "ivf"
    # ... and below half the threshold it goes back to exact, keeping the vectors
    for p in sorted(root.rglob("*.jpg"))[:5]:
        p.unlink()
    s = Gallery(root, **kw).update()
    assert s.index == "exact" and s.encoded == 0 and enc.images_encoded == 20
    g = Gallery(root, **kw)
    _consistent(g)
    assert len(g.search("red", k=100)) == 7
    # the default threshold is the documented one
    assert kinds.AUTO_IVF_THRESHOLD == 200_000
    assert kinds.want_kind("auto", "exact", 200_000) == "exact"
    assert kinds.want_kind("auto", "exact", 200_001) == "ivf"
    assert kinds.want_kind("auto", "ivf", 150_000) == "ivf"
    assert kinds.want_kind("auto", "ivf", 99_999) == "exact"


def test_new_ivf_index_leaves_its_layout_to_ivfindex() -> None:
    index = kinds.new_index("ivf", 48, "f16")
    # the gallery gives its precision only: the rest is chosen at training (65,536 vectors)
    assert isinstance(index, IVFIndex) and index.dtype == "f16" and index.train_threshold == 65_536
    assert index.pq == 0 and index.scan_dims == 0 and not index.is_trained
    assert kinds.new_index("ivf", 48, "i8", train_at=100).train_threshold == 100
    assert isinstance(kinds.new_index("exact", 48, "f32"), Index)
    with pytest.raises(GalleryError, match="ivf_train_at"):
        Gallery(Path(__file__).parent, model=ColorEncoder(), ivf_train_at=0)


def test_keep_layout_retrains_after_growing_or_shrinking_twofold() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((600, 48)).astype(np.float32)
    index = kinds.new_index("ivf", 48, "f32", train_at=100)
    assert kinds.keep_layout(index, None) is None  # untrained: nothing to keep
    index.add(np.arange(100, dtype=np.uint64), x[:100])
    assert index.is_trained and index.nlist == 2  # trained itself at 100 vectors
    index.add(np.arange(100, 150, dtype=np.uint64), x[100:150])
    assert kinds.keep_layout(index, None) == 150  # on the first vectors only: retrained on all
    assert kinds.keep_layout(index, 150) is None  # as trained
    index.add(np.arange(150, 299, dtype=np.uint64), x[150:299])
    assert kinds.keep_layout(index, 150) is None  # 299 < 2 x 150
    index.add(np.arange(299, 600, dtype=np.uint64), x[299:600])
    assert kinds.keep_layout(index, 150) == 600 and index.nlist == 16  # nlist chosen again
    index.remove(np.arange(300, 600, dtype=np.uint64))
    assert kinds.keep_layout(index, 600) == 300 and index.nlist == 8
    assert kinds.keep_layout(Index(48), None) is None


def test_ivf_gallery_grows_into_a_new_layout(tmp_path: Path) -> None:
    """An IVF index trained on 32 photos is retrained (nlist chosen again, nothing re-encoded)
    once the gallery holds twice as many."""
    root = tmp_path / "photos"
    make_folder(root, n_per_color=8)
    enc = ColorEncoder()
    Gallery(root, model=enc, index_kind="ivf", ivf_train_at=SMALL).update()
    _, index, meta = Gallery(root, model=enc)._snapshot()
    assert index.is_trained and index.nlist == 1 and meta["ivf_trained_at"] == "32"
    for i in range(96):
        make_photo(root / "more" / f"m{i:02d}.jpg", COLORS[list(COLORS)[i % 8]], seed=200 + i)
    s = Gallery(root, model=enc, ivf_train_at=SMALL).update()
    assert s.encoded == 96 and enc.images_encoded == 128
    g = Gallery(root, model=enc)
    _, index, meta = g._snapshot()
    assert index.nlist == 4 and index.is_trained and len(index) == 128
    assert meta["ivf_trained_at"] == meta["ivf_tuned_at"] == "128"
    _consistent(g)


def test_ivf_store_from_before_the_automatic_layout_opens_and_is_converted(folder128: Path) -> None:
    """A store whose IVF file was laid out by hand (the gallery's layout before: nlist 4 sqrt(n),
    nprobe nlist / 16, 4-bit codes, shortlist >= 100; no ``ivf_layout`` in the meta) searches as it
    is, and the next update moves its vectors into an automatic index without encoding."""
    import sqlite3

    folder = folder128
    enc = ColorEncoder()
    exact = Gallery(folder, model=enc, index_kind="exact")
    exact.update()
    want = {q: [h.name for h in exact.search(q, k=10)] for q in QUERIES}
    store = folder / ".leanclip"
    gen = exact.info()["generation"]
    old = IVFIndex(48, dtype="f32", nlist=45, nprobe=16, train_threshold=39 * 45, pq=12, shortlist=100)
    _, ex, _ = exact._snapshot()
    keys = np.asarray(ex.keys(), dtype=np.uint64)
    vecs = np.asarray(ex.get(keys), dtype=np.float32)
    old.train(vecs)
    old.add(keys, vecs)
    assert not old.auto and old.tuned is None
    old.save(str(store / f"index-{gen}.lci"))
    conn = sqlite3.connect(store / "gallery.db")
    conn.execute("UPDATE meta SET value='ivf' WHERE key IN ('index', 'index_kind')")
    conn.execute("DELETE FROM meta WHERE key IN ('ivf_layout', 'ivf_trained_at', 'ivf_tuned_at')")
    conn.commit()
    conn.close()
    g = Gallery(folder, model=enc, nprobe=45)  # every list: the old file gives the exact answer
    _, index, _ = g._snapshot()
    assert index.nlist == 45 and not index.auto
    assert {q: [h.name for h in g.search(q, k=10)] for q in QUERIES} == want
    assert len(Gallery(folder, model=enc).search("red", k=10)) == 10  # its own nprobe
    s = Gallery(folder, model=enc, ivf_train_at=SMALL).update()
    assert s.encoded == 0 and enc.images_encoded == 128 and s.index == "ivf"
    g = Gallery(folder, model=enc, nprobe=4)
    _, index, meta = g._snapshot()
    assert g.info()["generation"] > gen and meta["ivf_layout"] == "auto"
    assert index.nlist == 4 and index.auto and index.tuned == pytest.approx((0.95, 10)) and len(index) == 128
    assert {q: [h.name for h in g.search(q, k=10)] for q in QUERIES} == want
    _consistent(g)


def test_bad_index_kind_is_refused(folder: Path) -> None:
    with pytest.raises(GalleryError, match="index kind must be one of 'exact', 'ivf', 'auto'"):
        Gallery(folder, model=ColorEncoder(), index_kind="hnsw")
    with pytest.raises(GalleryError, match="nprobe"):
        Gallery(folder, model=ColorEncoder(), nprobe=0)
    # a meta naming an unknown kind is a clear error for readers, not a wrong index class
    g = Gallery(folder, model=ColorEncoder())
    g.update()
    import sqlite3

    conn = sqlite3.connect(folder / ".leanclip" / "gallery.db")
    conn.execute("UPDATE meta SET value='bogus' WHERE key='index_kind'")
    conn.commit()
    conn.close()
    with pytest.raises(GalleryError, match="unknown index kind 'bogus'"):
        Gallery(folder, model=ColorEncoder()).search("red")


def test_cli_index_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from leanclip.cli import main
    from tests._fixtures_bundle import make_tiny_bundle

    monkeypatch.setenv("LEANCLIP_HOME", str(tmp_path / "home"))
    root = tmp_path / "photos"
    make_folder(root, n_per_color=2)
    runner = CliRunner()
    r = runner.invoke(main, ["index", str(root), "--index", "hnsw"], catch_exceptions=False)
    assert r.exit_code == 2 and "--index" in r.output and "'exact', 'ivf', 'auto'" in r.output
    assert not (root / ".leanclip").exists()  # nothing was written
    bundle = make_tiny_bundle(tmp_path / "bundle")
    r = runner.invoke(
        main, ["index", str(root), "--model", str(bundle), "--index", "ivf", "--json"], catch_exceptions=False
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["index"] == "ivf" and out["added"] == 8
    r = runner.invoke(
        main, ["search", "a red photo", "-k", "3", "--json", "--dir", str(root)], catch_exceptions=False
    )
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)["results"]) == 3
    # the choice is kept by a plain run; --index exact converts back without encoding
    r = runner.invoke(
        main, ["index", str(root), "--model", str(bundle), "--json", "-q"], catch_exceptions=False
    )
    assert json.loads(r.stdout)["index"] == "ivf"
    r = runner.invoke(
        main,
        ["index", str(root), "--model", str(bundle), "--index", "exact", "--json", "-q"],
        catch_exceptions=False,
    )
    out = json.loads(r.stdout)
    assert r.exit_code == 0 and out["index"] == "exact" and out["encoded"] == 0


def test_server_with_an_ivf_gallery(folder: Path) -> None:
    from leanclip.server import make_server

    g = Gallery(folder, model=ColorEncoder(), index_kind="ivf", ivf_train_at=SMALL)
    g.update()
    server = make_server(Gallery(folder, model=ColorEncoder(), nprobe=4), port=0)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        host, port = server.server_address[:2]

        def get(path: str) -> tuple:
            conn = http.client.HTTPConnection(host, port, timeout=10)
            conn.request("GET", path)
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
            return resp.status, data

        status, data = get("/api/info")
        assert status == 200 and json.loads(data)["index"] == "ivf"
        status, data = get("/api/search?q=red&k=4")
        assert status == 200
        res = json.loads(data)["results"]
        assert len(res) == 4 and all(r["name"].startswith("red/") for r in res)
        key = res[0]["key"]
        status, data = get(f"/api/search?similar={key}&k=3")
        assert status == 200
        sim = json.loads(data)["results"]
        assert len(sim) == 3 and key not in {r["key"] for r in sim}
    finally:
        server.shutdown()
        server.server_close()


# -------------------------------------------------------------------------- crash consistency


def test_sigkill_during_ivf_updates_and_conversions(tmp_path: Path) -> None:
    """Runs that encode into an IVF index, or convert exact <-> IVF, are SIGKILLed inside a batch,
    after the new generation's file is saved but before the commit, and after the commit: the
    committed rows, generation, index kind and index file always agree."""
    root = tmp_path / "photos"
    colors = list(COLORS)
    for i in range(40):
        make_photo(root / f"d{i % 5}" / f"p{i:03d}.jpg", COLORS[colors[i % 8]], seed=i, size=(24, 16))
    rng = np.random.default_rng(7)
    killed = 0
    modes = ["encode", "save", "unlink"]
    runs = 9
    for i in range(runs):
        if i > 0:
            files = sorted(root.rglob("*.jpg"))
            for j in rng.choice(len(files), size=6, replace=False):
                make_photo(
                    files[j],
                    COLORS[colors[int(rng.integers(8))]],
                    seed=int(rng.integers(1 << 30)),
                    size=(24, 16),
                )
                set_mtime_later(files[j], 1 + i)
        kind = ["ivf", "exact"][i % 2]  # every run after the first converts
        argv = update_worker_command(
            root,
            mode=modes[i % 3],
            at=int(rng.integers(1, 3)),
            delay=0.01,
            index_kind=kind,
            ivf_small=True,
            batch_size=2,
            checkpoint_every=2,
            checkpoint_overhead=1.0,
        )
        proc = subprocess.run(argv, cwd=REPO, timeout=120, stdout=subprocess.DEVNULL)
        killed += proc.returncode == -9
        if (root / ".leanclip" / "gallery.db").exists():
            g = Gallery(root, model=ColorEncoder())
            info = g.info()
            if info["generation"]:
                _, index, _ = g._snapshot()  # opened as the kind the meta names
                assert kinds.kind_of(index) == info["index"]
                _consistent(g)
            g.close()
    assert killed >= runs - 1, f"only {killed} of {runs} runs were killed mid-update"
    enc = ColorEncoder()
    g = Gallery(root, model=enc, index_kind="ivf", ivf_train_at=SMALL)
    s = g.update()
    assert s.index == "ivf" and s.failed == 0
    _consistent(g)
    rows = g.files()
    assert {n for n, st, _ in rows if st == "ok"} == {
        p.relative_to(root).as_posix() for p in root.rglob("*.jpg")
    }
    assert _index_files(root / ".leanclip") == [f"index-{g.info()['generation']}.lci"]
    full = Gallery(root, model=ColorEncoder(), nprobe=4)
    for name, _, key in rows:
        want = enc.encode_images([root / name])[0]
        hit = full.search(want, k=1)[0]
        assert hit.key == key or abs(hit.score - 1.0) < 1e-5


def test_damaged_ivf_file_is_reported_and_rebuilt_as_ivf(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    make_folder(root, n_per_color=2)
    Gallery(root, model=ColorEncoder(), index_kind="ivf").update()
    (index_file,) = (root / ".leanclip").glob("index-*.lci")
    data = bytearray(index_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    index_file.write_bytes(bytes(data))
    with pytest.raises(GalleryError, match="damaged"):
        Gallery(root, model=ColorEncoder()).search("red")
    s = Gallery(root, model=ColorEncoder()).update()
    assert "unusable" in s.recovered and s.encoded == 8 and s.index == "ivf"  # the choice is kept
    g = Gallery(root, model=ColorEncoder())
    _consistent(g)
    assert {h.name for h in g.search("red", k=2)} == {"red/red_0.jpg", "red/red_1.jpg"}
