"""Crash consistency of Gallery.update(): SIGKILL at 50 random moments.

A folder of a few hundred small generated photos is changed between rounds (rewrites, new
files, deletions, renames, copies; every tenth round starts from an empty store), then
``update()`` runs in a subprocess that is killed with SIGKILL after a random delay: inside
decoding, encoding, a checkpoint's index save, the SQLite commit, or the clean-up. After every
kill:

* the committed state agrees with itself: the SQLite 'ok' rows and the committed index hold the
  same keys (``Gallery.check()``), keys are unique, and every 'ok' row whose file still has the
  recorded content maps to that content's vector (no key points at another file's vector);
* the next ``update()`` completes, and then every photo on disk is indexed exactly once with the
  vector of its current content, nothing else is in the index, and no stray index file is left.

Unlike tests/test_gallery.py's kill test (hooks at chosen points, one final check), the kills
here land at arbitrary instructions and the full check runs after every one of them.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))
from _fixtures_gallery import COLORS, ColorEncoder, make_photo, update_worker_command  # noqa: E402

N_FILES = 240
ROUNDS = 50


def _gallery(root: Path, store: Path):
    from leanclip.gallery import Gallery

    return Gallery(root, store=store, model=ColorEncoder(), batch_size=8, checkpoint_every=24)


def _photos(root: Path) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*.jpg")}


def _encode_all(paths: dict[str, Path]) -> dict[str, np.ndarray]:
    enc = ColorEncoder()
    names = sorted(paths)
    vecs = enc.encode_images([paths[n] for n in names]) if names else []
    return dict(zip(names, vecs))


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_committed(root: Path, store: Path) -> int:
    """Checks the committed state after a kill; returns the number of ok rows."""
    from leanclip import Index

    db = store / "gallery.db"
    if not db.exists():
        return 0
    conn = sqlite3.connect(db)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" not in tables:
            return 0  # killed before the schema's first commit: nothing committed yet
        meta = dict(conn.execute("SELECT key, value FROM meta"))
        rows = conn.execute("SELECT path, sha256, key FROM files WHERE status='ok'").fetchall()
        dup = conn.execute(
            "SELECT key FROM files WHERE key IS NOT NULL GROUP BY key HAVING COUNT(*) > 1"
        ).fetchall()
        # the near-duplicate pairs and the texts are committed with the rows: never of a key
        # that is not an 'ok' row
        live = "SELECT key FROM files WHERE status='ok'"
        stray = (
            conn.execute(
                f"SELECT count(*) FROM near WHERE a NOT IN ({live}) OR b NOT IN ({live})"
            ).fetchone()[0]
            + conn.execute(f"SELECT count(*) FROM near_done WHERE key NOT IN ({live})").fetchone()[0]
        )
        stray += conn.execute(f"SELECT count(*) FROM texts WHERE rowid NOT IN ({live})").fetchone()[0]
        stray += conn.execute(f"SELECT count(*) FROM looks WHERE key NOT IN ({live})").fetchone()[0]
    finally:
        conn.close()
    assert dup == [], f"keys used by several rows: {dup}"
    assert stray == 0, "near-duplicate pairs, looks or texts of keys without an 'ok' row"
    gen = int(meta["generation"])
    if gen == 0:
        assert rows == [], "ok rows committed without an index generation"
        return 0
    index = Index.load(str(store / f"index-{gen}.lci"))
    index_keys = {int(k) for k in np.asarray(index.keys())}
    row_keys = {int(k) for _, _, k in rows}
    assert row_keys == index_keys, (
        f"rows without vectors: {sorted(row_keys - index_keys)[:10]}, "
        f"vectors without rows: {sorted(index_keys - row_keys)[:10]}"
    )
    # a committed key must hold the vector of the content its row records
    on_disk = _photos(root)
    unchanged = {
        bytes(p).decode(): (sha, int(k))
        for p, sha, k in rows
        if bytes(p).decode() in on_disk and _sha(on_disk[bytes(p).decode()]) == sha
    }
    if unchanged:
        want = _encode_all({n: on_disk[n] for n in unchanged})
        keys = np.array([unchanged[n][1] for n in sorted(unchanged)], dtype=np.uint64)
        got = index.get(keys)
        np.testing.assert_allclose(got, np.stack([want[n] for n in sorted(unchanged)]), atol=1e-5)
    return len(rows)


def _check_complete(root: Path, store: Path, g) -> None:
    from leanclip import Index

    on_disk = _photos(root)
    files = g.files()
    assert {n for n, s, _ in files if s == "ok"} == set(on_disk), "lost or extra files"
    assert len(files) == len(on_disk), "rows for files that are gone"
    assert g.check() == ([], [])
    gen = g.info()["generation"]
    leftovers = sorted(p.name for p in store.iterdir() if "index-" in p.name or p.name.startswith(".tmp"))
    assert leftovers == [f"index-{gen}.lci"], leftovers
    index = Index.load(str(store / f"index-{gen}.lci"))
    assert len(index) == len(on_disk), "duplicated vectors"
    want = _encode_all(on_disk)
    key_of = {n: k for n, _, k in files}
    keys = np.array([key_of[n] for n in sorted(on_disk)], dtype=np.uint64)
    np.testing.assert_allclose(index.get(keys), np.stack([want[n] for n in sorted(on_disk)]), atol=1e-5)
    # every photo's neighbours were searched once; each stored pair holds its true score
    conn = sqlite3.connect(store / "gallery.db")
    try:
        done = {int(k) for (k,) in conn.execute("SELECT key FROM near_done")}
        pairs = conn.execute("SELECT a, b, score FROM near").fetchall()
        looks = {int(k) for (k,) in conn.execute("SELECT key FROM looks")}
    finally:
        conn.close()
    assert done == set(key_of.values()), "photos whose near-duplicates were never searched"
    assert looks == set(key_of.values()), "photos without a look (gallery.duplicates.look)"
    if pairs:
        a, b, sc = (np.array(c) for c in zip(*pairs))
        va, vb = index.get(a.astype(np.uint64)), index.get(b.astype(np.uint64))
        np.testing.assert_allclose((va * vb).sum(1), sc, atol=1e-4)


def _mutate(root: Path, rng: random.Random, round_no: int) -> None:
    colors = list(COLORS)
    files = sorted(_photos(root).values())
    for p in rng.sample(files, 20):  # rewrite content
        make_photo(p, COLORS[rng.choice(colors)], seed=rng.randrange(1 << 30), size=(32, 24))
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9 * (round_no + 1)))
    files = sorted(_photos(root).values())
    for p in rng.sample(files, 6):
        p.unlink()
    files = sorted(_photos(root).values())
    for i, p in enumerate(rng.sample(files, 6)):
        p.rename(root / f"d{rng.randrange(6)}" / f"moved_{round_no}_{i}.jpg")
    files = sorted(_photos(root).values())
    for i, p in enumerate(rng.sample(files, 3)):
        shutil.copy2(p, root / f"d{rng.randrange(6)}" / f"copy_{round_no}_{i}.jpg")
    for i in range(12):
        make_photo(
            root / f"d{rng.randrange(6)}" / f"new_{round_no}_{i}.jpg",
            COLORS[rng.choice(colors)],
            seed=rng.randrange(1 << 30),
            size=(32, 24),
        )


@pytest.mark.slow
def test_sigkill_at_50_random_points_keeps_rows_and_index_in_step(tmp_path):
    rng = random.Random(606)
    root, store = tmp_path / "photos", tmp_path / "store"
    colors = list(COLORS)
    for i in range(N_FILES):
        make_photo(
            root / f"d{i % 6}" / f"p{i:04d}.jpg", COLORS[colors[i % len(colors)]], seed=i, size=(32, 24)
        )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS.parent / "python"), str(TESTS.parent)]))

    def run_child(delay: float | None) -> tuple[bool, float]:
        """Starts update() in a child; kills it `delay` s after it starts. (killed, seconds)"""
        argv = update_worker_command(
            root, store=str(store), batch_size=8, checkpoint_every=24, checkpoint_seconds=0.05
        )
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=TESTS.parent
        )
        assert proc.stdout.readline().strip() == "start", proc.stderr.read()
        t0 = time.monotonic()
        if delay is None:
            proc.wait(timeout=300)
        else:
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=60)
        elapsed = time.monotonic() - t0
        if proc.returncode == -signal.SIGKILL:
            return True, elapsed
        assert proc.returncode == 0, proc.stderr.read()[-3000:]
        return False, elapsed

    # Calibrate: how long a first index and a round's incremental update take here.
    _, full = run_child(None)
    _mutate(root, rng, -1)
    _, incremental = run_child(None)
    g = _gallery(root, store)
    _check_complete(root, store, g)
    g.close()

    killed = 0
    committed_seen = []
    empty_db_rounds = []
    for r in range(ROUNDS):
        if r % 10 == 0:
            shutil.rmtree(store)  # a first index, killed
            budget = full
        else:
            _mutate(root, rng, r)
            budget = incremental
        was_killed, _ = run_child(rng.uniform(0.0, 0.8 * budget))
        killed += was_killed
        committed_seen.append(_check_committed(root, store))
        if _empty_db(store):
            # a kill before the first commit leaves a database without tables: the next
            # update must take it over (checked right below), not refuse it
            empty_db_rounds.append(r)
        g = _gallery(root, store)
        g.update()  # the next update completes ...
        _check_complete(root, store, g)  # ... with nothing lost or duplicated
        g.close()
    # the delays are drawn within a normal run's duration: nearly all runs die mid-update
    # (timing-based: on a loaded machine a run can finish before its kill, so ask for half)
    assert killed >= ROUNDS // 2, f"only {killed} of {ROUNDS} runs were killed before finishing"
    # kills landed at different stages: some before anything was committed, some after
    assert min(committed_seen) == 0 and max(committed_seen) > 0
    print(
        f"\n{killed}/{ROUNDS} killed mid-update; left a gallery.db without tables (taken over by the next update): rounds {empty_db_rounds};"
        f" first index {full:.2f} s, incremental {incremental:.2f} s; "
        f"ok rows committed at the kill: {committed_seen}"
    )


def _empty_db(store: Path) -> bool:
    db = store / "gallery.db"
    if not db.exists():
        return False
    conn = sqlite3.connect(db)
    try:
        return not conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name='meta'"
        ).fetchall()
    finally:
        conn.close()


def test_update_after_kill_before_first_commit(tmp_path):
    # What SIGKILL leaves when it lands between sqlite3.connect() creating gallery.db (WAL mode
    # set) and the first COMMIT of the schema: a database file without tables.
    root, store = tmp_path / "photos", tmp_path / "store"
    make_photo(root / "a.jpg", COLORS["red"], seed=1)
    store.mkdir()
    conn = sqlite3.connect(store / "gallery.db")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.close()
    g = _gallery(root, store)
    s = g.update()
    assert s.added == 1 and g.check() == ([], [])
