"""The leanclip command line (click's CliRunner) with a tiny real bundle, and the model registry."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from leanclip import registry
from leanclip.cli import main
from tests._fixtures_bundle import make_tiny_bundle
from tests._fixtures_gallery import COLORS, make_folder, make_photo


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("cli") / "bundle")


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    monkeypatch.setenv("LEANCLIP_HOME", str(h))
    monkeypatch.delenv("LEANCLIP_MODEL", raising=False)
    return h


def _run(*args: str, cwd: Path | None = None):
    runner = CliRunner()
    if cwd is None:
        return runner.invoke(main, list(args), catch_exceptions=False)
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(main, list(args), catch_exceptions=False)
    finally:
        os.chdir(old)


def test_help_everywhere() -> None:
    for cmd in [
        [],
        ["index"],
        ["search"],
        ["similar"],
        ["serve"],
        ["models"],
        ["models", "show"],
        ["models", "fetch"],
        ["demo"],
    ]:
        r = _run(*cmd, "--help")
        assert r.exit_code == 0, (cmd, r.output)
        assert "Usage:" in r.output
    assert _run("--version").output.strip().startswith("leanclip ")
    top = _run("--help").output
    assert "Exit codes" in top and "img:PATH" in top
    for name in ["index", "search", "similar", "serve", "models", "demo"]:
        assert name in top


def test_index_search_similar(tmp_path: Path, bundle: Path, home: Path) -> None:
    root = tmp_path / "photos"
    make_folder(root, n_per_color=2)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    r = _run("index", str(root), "--model", str(bundle), "--json")
    assert r.exit_code == 4, r.output  # finished, one file failed
    summary = json.loads(r.stdout)
    assert (summary["added"], summary["failed"], summary["removed"]) == (8, 1, 0)
    assert summary["failures"][0]["name"] == "broken.jpg"
    # second run: nothing to do, exit 0 (the old failure is not new)
    r = _run("index", str(root), "--model", str(bundle), "--json", "-q")
    assert r.exit_code == 0 and json.loads(r.stdout)["unchanged"] == 9
    # search uses the model recorded at index time (no --model needed), from inside the folder
    r = _run("search", "a red photo", "-k", "3", "--json", cwd=root / "red")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["query"] == "a red photo" and len(res["results"]) == 3
    assert all(Path(x["path"]).is_file() for x in res["results"])
    scores = [x["score"] for x in res["results"]]
    assert scores == sorted(scores, reverse=True)
    # plain output for scripts: score<TAB>path
    r = _run("search", "sky", "-d", str(root), "-k", "2")
    lines = r.stdout.strip().splitlines()
    assert r.exit_code == 0 and len(lines) == 2 and all(l.split("\t")[1].startswith(str(root)) for l in lines)
    # path filter and minimum score; nothing above 1.0 -> exit 1
    r = _run("search", "photo", "-d", str(root), "--path", "blue/*", "--json")
    assert {Path(x["name"]).parts[0] for x in json.loads(r.stdout)["results"]} == {"blue"}
    r = _run("search", "photo", "-d", str(root), "--min-score", "1.01")
    assert r.exit_code == 1
    # similar: the image itself is left out, its twin is found; combined with text terms
    img = root / "green" / "green_0.jpg"
    r = _run("similar", str(img), "-d", str(root), "-k", "8", "--json")
    names = [x["name"] for x in json.loads(r.stdout)["results"]]
    assert r.exit_code == 0 and "green/green_0.jpg" not in names and len(names) == 7  # all others
    r = _run("similar", str(img), "--and", "+sunset -people", "-d", str(root), "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["query"].endswith("+sunset -people")
    r = _run("search", f"+img:{img} -img:{root / 'red' / 'red_0.jpg'}", "-d", str(root), "--json")
    assert r.exit_code == 0


def test_error_exit_codes(tmp_path: Path, bundle: Path, home: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _run("search", "cat", "-d", str(empty), "--model", str(bundle))
    assert r.exit_code == 3 and "leanclip index" in r.stderr
    r = _run("index", str(tmp_path / "missing"))
    assert r.exit_code == 2  # click usage error: folder does not exist
    r = _run("search", "-d", str(empty))
    assert r.exit_code == 2
    r = _run("index", str(empty), "--model", str(tmp_path / "nobundle"))
    assert r.exit_code == 3 and "no such bundle" in r.stderr
    bad = tmp_path / "bad_bundle"
    shutil.copytree(bundle, bad)
    (bad / "text.onnx").write_bytes(b"tampered")
    r = _run("index", str(empty), "--model", str(bad))
    assert r.exit_code == 3 and "sha256" in r.stderr
    make_photo(empty / "a.jpg", COLORS["red"])
    assert _run("index", str(empty), "--model", str(bundle), "-q").exit_code == 0
    r = _run("similar", str(tmp_path / "nope.jpg"), "-d", str(empty))
    assert r.exit_code == 3 and "does not exist" in r.stderr
    (tmp_path / "fake.jpg").write_text("text")
    r = _run("similar", str(tmp_path / "fake.jpg"), "-d", str(empty))
    assert r.exit_code == 3 and "fake.jpg" in r.stderr
    r = _run("search", '"unclosed', "-d", str(empty))
    assert r.exit_code == 3 and "cannot parse" in r.stderr
    # another model than the gallery's
    other = make_tiny_bundle(tmp_path / "other", seed=5, dim=16)
    r = _run("search", "cat", "-d", str(empty), "--model", str(other))
    assert r.exit_code == 3 and "indexed with model" in r.stderr


def test_models_list_show_and_fetch_conversion(tmp_path: Path, bundle: Path, home: Path) -> None:
    r = _run("models", "--json")
    data = json.loads(r.stdout)
    assert r.exit_code == 0 and data["home"] == str(home)
    by_name = {m["name"]: m for m in data["models"]}
    assert by_name["starter"]["active"] and not by_name["starter"]["installed"]
    assert "openai-vit-b-32" in by_name
    r = _run("models", "show", str(bundle), "--json")
    info = json.loads(r.stdout)
    assert info["dim"] == 32 and info["model_id"].startswith("tiny-clip")
    r = _run("models", "show", "openai-vit-b-32")
    assert r.exit_code == 3 and "models fetch openai-vit-b-32" in r.stderr
    # the fetch path, with a tiny open_clip model in place of the downloaded weights
    from tests._fixtures_bundle import make_tiny_clip

    path = registry.fetch("openai-vit-b-32", create=lambda: make_tiny_clip(dim=16, seed=3))
    assert path == home / "models" / "openai-vit-b-32" and registry.is_bundle(path)
    assert registry.describe("openai-vit-b-32")["dim"] == 16
    enc = registry.load_encoder("openai-vit-b-32")
    assert enc.encode_text(["a dog"]).shape == (1, 16)
    assert not [p for p in (home / "models").iterdir() if p.name.startswith(".")]  # no temp dirs left
    listed = {m["name"]: m for m in json.loads(_run("models", "--json").stdout)["models"]}
    assert listed["openai-vit-b-32"]["installed"]
    r = _run("models", "fetch", "no-such-model")
    assert r.exit_code == 3 and "unknown model" in r.stderr


def test_failed_build_leaves_no_half_bundle(home: Path) -> None:
    def broken(_tmp: Path) -> None:
        (_tmp / "leanclip.json").write_text("{}")
        raise RuntimeError("interrupted build")

    with pytest.raises(RuntimeError):
        registry._build_into_cache("starter", broken)
    assert not registry.model_path("starter").exists()
    assert not [p for p in (home / "models").iterdir()]


def test_serve_warns_on_non_loopback(tmp_path: Path, bundle: Path) -> None:
    root = tmp_path / "photos"
    make_folder(root, n_per_color=1)
    assert _run("index", str(root), "--model", str(bundle), "-q").exit_code == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "leanclip.cli", "serve", str(root), "--host", "0.0.0.0", "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        cwd=os.getcwd(),
    )
    try:
        lines = []
        deadline = time.time() + 60
        while time.time() < deadline:
            line = proc.stderr.readline()
            lines.append(line)
            if "serving" in line or not line:
                break
        text = "".join(lines)
        assert "warning" in text and "not loopback" in text and "0.0.0.0" in text, text
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_bundle_checksums_are_rechecked_after_a_change(tmp_path: Path, bundle: Path, home: Path) -> None:
    b = tmp_path / "b"
    shutil.copytree(bundle, b)
    registry.load_encoder(str(b))  # verified, remembered
    assert registry._already_verified(b)
    registry.load_encoder(str(b))  # fast path
    data = bytearray((b / "text.onnx").read_bytes())
    data[-1] ^= 1
    (b / "text.onnx").write_bytes(bytes(data))  # same size, new mtime
    assert not registry._already_verified(b)
    with pytest.raises(registry.ModelError, match="sha256"):
        registry.load_encoder(str(b))


def test_demo_command(tmp_path: Path, bundle: Path, home: Path) -> None:
    """`leanclip demo` with a tiny model: real sample photos collected, indexed, queried."""
    from leanclip.demo import TEXT_QUERIES

    dest = tmp_path / "demo"
    r = _run("demo", "--dir", str(dest), "--model", str(bundle), "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    n_photos = len([p for p in dest.iterdir() if p.suffix in (".jpg", ".png", ".heic", ".mp4")])
    assert n_photos >= 3 and (dest / "CREDITS.md").is_file()
    assert out["index"]["added"] == n_photos and out["index"]["failed"] == 0
    assert [q["query"] for q in out["queries"]][: len(TEXT_QUERIES)] == list(TEXT_QUERIES)
    assert all(len(q["results"]) == 3 for q in out["queries"])
    image_q = out["queries"][-1]
    assert image_q["query"] == "similar to chelsea.png"
    assert "chelsea.png" not in [x["name"] for x in image_q["results"]]
    # the generated phone photo and receipt: HEIC indexed with its date, text found, duplicates
    assert [r["name"] for r in out["features"]["text"]["results"]] == ["receipt.png"]
    assert [r["name"] for r in out["features"]["dates"]["results"]] == ["coffee_phone.heic"]
    assert out["features"]["video"]["results"][0]["name"] == "clip.mp4"  # a frame: (clip, time)
    assert out["features"]["video"]["results"][0]["t"] >= 0.0
    # a second run finds everything indexed already
    r = _run("demo", "--dir", str(dest), "--model", str(bundle), "--json")
    assert json.loads(r.stdout)["index"]["added"] == 0


# ------------------------------------------------- issue 14: hostile names, one-line errors


@pytest.fixture()
def color_cli(monkeypatch: pytest.MonkeyPatch):
    """The CLI over galleries encoded by the deterministic ColorEncoder (no bundle needed)."""
    import leanclip.gallery as G
    from tests._fixtures_gallery import ColorEncoder

    real = G.Gallery

    class ColorGallery(real):  # type: ignore[misc,valid-type]
        def __init__(self, root, store=None, model=None, **kw):
            super().__init__(root, store=store, model=ColorEncoder(), **kw)

    monkeypatch.setattr(G, "Gallery", ColorGallery)
    return ColorGallery


HOSTILE_NAMES = {
    "x\n0.9999\t/etc/passwd\n.png": r"x\n0.9999\t/etc/passwd\n.png",
    "[red]markup [link=https:evil]x.png": "[red]markup [link=https:evil]x.png",  # ('/' would make folders)
    "esc\x1b[2J\x1b[31mred.png": r"esc\x1b[2J\x1b[31mred.png",
    "cr\rover.png": r"cr\rover.png",
    "bidi\u202egnp.exe.png": r"bidi\u202egnp.exe.png",
    "back\\slash.png": r"back\\slash.png",
}


def _hostile_folder(root: Path) -> None:
    for i, name in enumerate(HOSTILE_NAMES):
        make_photo(root / name, COLORS["red"], seed=100 + i, fmt="PNG")
    make_photo(Path(os.fsdecode(os.fsencode(str(root)) + b"/caf\xe9.png")), COLORS["red"], seed=99, fmt="PNG")
    make_photo(root / "plain.png", COLORS["blue"], seed=98, fmt="PNG")
    (root / "bad\n0.5\tforged[red]x.png").write_bytes(b"not an image")


def test_hostile_file_names_cannot_forge_output(
    tmp_path: Path, color_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    import leanclip.cli as cli

    root = tmp_path / "photos"
    _hostile_folder(root)
    r = _run("index", str(root), "-q")
    assert r.exit_code == 4, r.output  # the one broken file
    # the failure line names it escaped, on one line
    failed = [l for l in r.stderr.splitlines() if "failed" in l and "bad" in l]
    assert failed == [
        r"  failed bad\n0.5\tforged[red]x.png: not a recognised image format (corrupt or wrong extension)"
    ]
    # piped: one "score<TAB>path" line per result, names escaped
    r = _run("search", "red", "-d", str(root), "-k", "20")
    lines = r.stdout.splitlines()
    assert r.exit_code == 0 and len(lines) == 8, lines
    for line in lines:
        score, path = line.split("\t")  # exactly one tab
        assert float(score) <= 1.0 and path.startswith(str(root) + "/")
        assert "\x1b" not in path and "\r" not in path
    shown = {l.split("\t")[1][len(str(root)) + 1 :] for l in lines}
    assert shown == set(HOSTILE_NAMES.values()) | {r"caf\xe9.png", "plain.png"}
    assert not any(l.startswith("0.9999\t/etc/passwd") for l in lines)
    # JSON: names as they are
    r = _run("search", "red", "-d", str(root), "-k", "20", "--json")
    assert set(HOSTILE_NAMES) <= {x["name"] for x in json.loads(r.stdout)["results"]}
    # terminal: a rich table, names never read as markup, no raw escapes
    monkeypatch.setattr(cli, "_stdout_is_terminal", lambda: True)
    r = _run("search", "red", "-d", str(root), "-k", "20")
    assert r.exit_code == 0
    out = r.stdout
    assert "\x1b" not in out and "\r" not in out and "\u202e" not in out
    for shown_name in (
        "[red]markup [link=https:evil]x.png",
        r"esc\x1b[2J\x1b[31mred.png",
        r"bidi\u202egnp.exe.png",
        r"back\\slash",
    ):
        assert shown_name in out, (shown_name, out)


def test_unreadable_root_is_reported_not_emptied(
    tmp_path: Path, color_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "photos"
    make_folder(root, n_per_color=1)
    assert _run("index", str(root), "-q").exit_code == 0
    real = os.scandir

    def scandir(path: object = ".") -> object:
        if os.path.realpath(os.fspath(path)) == str(root.resolve()):  # type: ignore[arg-type]
            raise PermissionError(13, "Permission denied", os.fspath(path))  # type: ignore[arg-type]
        return real(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", scandir)
    r = _run("index", str(root), "--json")
    assert r.exit_code == 4, r.output
    s = json.loads(r.stdout)
    assert (
        s["removed"] == 0
        and s["total_ok"] == 4
        and s["unreadable"] == [{"name": ".", "reason": "Permission denied"}]
    )
    assert "warning: the gallery folder itself cannot be read (Permission denied)" in r.stderr


def test_lock_folder_and_non_utf8_query_are_one_line_errors(tmp_path: Path, bundle: Path, home: Path) -> None:
    root = tmp_path / "photos"
    make_folder(root, n_per_color=1)
    assert _run("index", str(root), "--model", str(bundle), "-q").exit_code == 0
    # a query whose bytes are not UTF-8 (argv is decoded with surrogateescape)
    r = _run("search", os.fsdecode(b"caf\xe9 \xff"), "-d", str(root))
    assert r.exit_code == 3, r.output
    assert r.stderr.count("\n") == 1 and "not valid UTF-8" in r.stderr and "Traceback" not in r.output
    r = _run("similar", str(root / "red" / "red_0.jpg"), "--and", os.fsdecode(b"+\xff"), "-d", str(root))
    assert r.exit_code == 3 and "not valid UTF-8" in r.stderr
    # the store's lock is a folder
    (root / ".leanclip" / "lock").unlink()
    (root / ".leanclip" / "lock").mkdir()
    r = _run("index", str(root), "--model", str(bundle), "-q")
    assert r.exit_code == 3, r.output
    assert r.stderr.count("\n") == 1 and "lock" in r.stderr and "is a directory" in r.stderr


def test_printable_is_one_line_printable_and_reversible() -> None:
    """Fuzz: whatever the name, the escaped form is one printable line, and it can be read back
    (so two different names never print the same)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from leanclip.cli import printable

    @settings(max_examples=3000, deadline=None, derandomize=True)
    @given(st.text())  # any code point but surrogates
    def check(name: str) -> None:
        out = printable(name)
        assert out.isprintable() and "\n" not in out and "\t" not in out and "\x1b" not in out
        assert out.encode("latin-1", "backslashreplace").decode("unicode_escape") == name

    check()
    # bytes that are not UTF-8 (surrogateescape) print as \xNN
    assert printable(os.fsdecode(b"caf\xe9\xff")) == r"caf\xe9\xff"


def test_similar_without_dir_finds_the_gallery_from_the_photo(
    tmp_path: Path, bundle: Path, home: Path
) -> None:
    # issue 25: the gallery is looked for from the photo's folder (walking up), then the current one
    root = tmp_path / "photos"
    make_folder(root, n_per_color=1)
    assert _run("index", str(root), "--model", str(bundle), "-q").exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = _run("similar", str(root / "red" / "red_0.jpg"), "-k", "2", "--json", cwd=elsewhere)
    assert r.exit_code == 0, r.output
    assert len(json.loads(r.stdout)["results"]) == 2
    # a photo outside any gallery: the current folder's gallery, as before
    outside = make_photo(tmp_path / "outside.jpg", COLORS["red"])
    r = _run("similar", str(outside), "-k", "1", "--json", cwd=root / "blue")
    assert r.exit_code == 0 and Path(json.loads(r.stdout)["results"][0]["path"]).parent.parent == root
    r = _run("similar", str(outside), "-k", "1", cwd=elsewhere)
    assert r.exit_code == 3 and "leanclip index" in r.stderr
