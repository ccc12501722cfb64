"""Fuzzing the model-bundle manifest reader: random and mutated ``leanclip.json`` files and
bundle directories through ``leanclip.bundle.read_manifest`` must either give a Manifest or raise
``BundleError`` (a ValueError) naming the problem, never any other exception.

The bundle's files are dummy bytes here: read_manifest checks names and sha256s, not ONNX.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from leanclip.bundle import (
    BundleError,
    ImageSpec,
    Manifest,
    TextSpec,
    read_manifest,
    write_manifest,
)

SETTINGS = settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def make_bundle(root: Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    for name, blob in (
        ("image.onnx", b"image-bytes"),
        ("text.onnx", b"text-bytes"),
        ("tokenizer.json", b'{"model": {}}'),
    ):
        (root / name).write_bytes(blob)
    write_manifest(root, Manifest(embedding_dim=32, image=ImageSpec(size=32), text=TextSpec(), name="tiny"))
    return json.loads((root / "leanclip.json").read_text())


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    valid = make_bundle(root)
    read_manifest(root)  # the control: the unmutated bundle is accepted
    return root, valid


def outcome(root: Path) -> str:
    """Runs read_manifest; returns 'ok' or 'BundleError', fails on anything else."""
    try:
        read_manifest(root, verify=True)
        return "ok"
    except BundleError as e:
        assert str(e), "empty BundleError message"
        return "BundleError"
    except Exception as e:  # noqa: BLE001 - the finding
        pytest.fail(
            f"read_manifest raised {type(e).__name__}: {e!r} (expected BundleError)\n"
            f"manifest: {(root / 'leanclip.json').read_bytes()[:600]!r}"
        )


json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
    max_leaves=12,
)


def paths_in(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths_in(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths_in(v, prefix + (i,))


def set_path(obj, path, value, delete=False):
    if not path:
        return value
    cur = obj
    for p in path[:-1]:
        cur = cur[p]
    if delete:
        del cur[path[-1]]
    else:
        cur[path[-1]] = value
    return obj


def dump(obj) -> str:
    return json.dumps(obj, allow_nan=True)


@SETTINGS
@given(data=st.data())
def test_mutated_manifest_values(bundle, data):
    root, valid = bundle
    doc = json.loads(json.dumps(valid))
    for _ in range(data.draw(st.integers(1, 3))):
        paths = list(paths_in(doc))
        path = data.draw(st.sampled_from(paths))
        if path and data.draw(st.booleans()) and isinstance(doc, (dict, list)):
            doc = set_path(doc, path, None, delete=True)
        else:
            doc = set_path(doc, path, data.draw(json_values))
        if not isinstance(doc, (dict, list)):
            break
    (root / "leanclip.json").write_text(dump(doc))
    outcome(root)


@SETTINGS
@given(blob=st.binary(max_size=3000))
def test_random_bytes_manifest(bundle, blob):
    root, _ = bundle
    (root / "leanclip.json").write_bytes(blob)
    assert outcome(root) == "BundleError"


def test_truncated_and_flipped_manifest_text(bundle):
    root, valid = bundle
    text = json.dumps(valid, indent=2).encode()
    rng = random.Random(6)
    seen = {"ok": 0, "BundleError": 0}
    for n in range(len(text)):
        (root / "leanclip.json").write_bytes(text[:n])
        assert outcome(root) == "BundleError", n
    for _ in range(1500):
        b = bytearray(text)
        for pos in rng.sample(range(len(b)), rng.randrange(1, 4)):
            b[pos] = rng.randrange(256)
        (root / "leanclip.json").write_bytes(bytes(b))
        seen[outcome(root)] += 1
    assert seen["BundleError"] > 0


# Specific hostile manifests, each a known trap for a JSON reader written in Python.
HOSTILE = {
    "deeply nested": "[" * 100_000 + "]" * 100_000,
    "deeply nested in a field": '{"format": "leanclip-bundle", "format_version": 1, "extra": '
    + "[" * 50_000
    + "]" * 50_000
    + "}",
    "huge integer literal": '{"format": "leanclip-bundle", "format_version": ' + "9" * 5000 + "}",
    "huge embedding_dim literal": None,  # filled below
    "Infinity embedding_dim": None,
    "NaN embedding_dim": None,
    "list as image file": None,
    "dict as text file": None,
    "list as tokenizer": None,
    "string image size": None,
    "negative image size": None,
    "zero context_length": None,
    "mean of wrong length": None,
    "BOM": "\ufeff" + "{}",
    "lone surrogate name": None,
    "NUL in a file name": None,
    "empty": "",
    "null": "null",
    "array": "[]",
    "string": '"leanclip-bundle"',
}


def hostile_docs(valid: dict) -> dict[str, str]:
    out = {k: v for k, v in HOSTILE.items() if v is not None}

    def edit(fn):
        d = json.loads(json.dumps(valid))
        fn(d)
        return dump(d)

    out["huge embedding_dim literal"] = dump(valid).replace(
        '"embedding_dim": 32', '"embedding_dim": ' + "7" * 5000
    )
    out["Infinity embedding_dim"] = edit(lambda d: d.__setitem__("embedding_dim", math.inf))
    out["NaN embedding_dim"] = edit(lambda d: d.__setitem__("embedding_dim", math.nan))
    out["list as image file"] = edit(lambda d: d["image"].__setitem__("file", ["image.onnx"]))
    out["dict as text file"] = edit(lambda d: d["text"].__setitem__("file", {"a": 1}))
    out["list as tokenizer"] = edit(lambda d: d["text"].__setitem__("tokenizer", []))
    out["string image size"] = edit(lambda d: d["image"].__setitem__("size", "big"))
    out["negative image size"] = edit(lambda d: d["image"].__setitem__("size", -3))
    out["zero context_length"] = edit(lambda d: d["text"].__setitem__("context_length", 0))
    out["mean of wrong length"] = edit(lambda d: d["image"].__setitem__("mean", [0.5]))
    out["lone surrogate name"] = edit(lambda d: d["files"].__setitem__("\ud800", "00"))
    out["NUL in a file name"] = edit(lambda d: d["files"].__setitem__("a\u0000b", "00"))
    return out


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_manifest(bundle, case):
    root, valid = bundle
    (root / "leanclip.json").write_text(hostile_docs(valid)[case], encoding="utf-8", errors="surrogatepass")
    assert outcome(root) == "BundleError"


def test_bundle_directory_problems(tmp_path):
    # Each broken bundle must be refused with BundleError naming the problem.
    def fresh(name):
        root = tmp_path / name
        return root, make_bundle(root)

    root, _ = fresh("missing-file")
    (root / "text.onnx").unlink()
    with pytest.raises(BundleError, match="missing text.onnx"):
        read_manifest(root)

    root, _ = fresh("altered-file")
    (root / "image.onnx").write_bytes(b"tampered")
    with pytest.raises(BundleError, match="sha256"):
        read_manifest(root)
    assert read_manifest(root, verify=False).embedding_dim == 32  # verify=False skips hashing only

    root, _ = fresh("directory-as-file")
    (root / "tokenizer.json").unlink()
    (root / "tokenizer.json").mkdir()
    with pytest.raises(BundleError, match=r"tokenizer\.json is a directory, not a file"):
        read_manifest(root)

    for bad_name in ("../outside.onnx", "/etc/passwd", "sub/../../x"):
        root, doc = fresh(f"traversal-{abs(hash(bad_name))}")
        doc["files"][bad_name] = "0" * 64
        (root / "leanclip.json").write_text(json.dumps(doc))
        with pytest.raises(BundleError, match="leaves the bundle directory"):
            read_manifest(root)

    root, doc = fresh("other-version")
    doc["format_version"] = 2
    (root / "leanclip.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match=r"version 2 .*version 1"):
        read_manifest(root)

    with pytest.raises(BundleError, match="not a directory"):
        read_manifest(tmp_path / "nowhere")
    (tmp_path / "plain-file").write_text("x")
    with pytest.raises(BundleError, match="not a directory"):
        read_manifest(tmp_path / "plain-file")
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(BundleError, match="has no leanclip.json"):
        read_manifest(tmp_path / "empty-dir")
    root, _ = fresh("manifest-is-dir")
    (root / "leanclip.json").unlink()
    (root / "leanclip.json").mkdir()
    with pytest.raises(BundleError):
        read_manifest(root)
    if os.name == "posix":
        root, _ = fresh("manifest-symlink-loop")
        (root / "leanclip.json").unlink()
        os.symlink("leanclip.json", root / "leanclip.json")
        with pytest.raises(BundleError):
            read_manifest(root)


# ------------------------------------------------------------ issue 14: model id and sane ranges

# Every field that changes an embedding: editing one (checksums still valid) must change the id.
EMBEDDING_EDITS = {
    "image.mean": lambda d: d["image"].__setitem__("mean", [0.5, 0.5, 0.5]),
    "image.std": lambda d: d["image"].__setitem__("std", [0.5, 0.5, 0.5]),
    "image.size": lambda d: d["image"].__setitem__("size", 64),
    "image.interpolation": lambda d: d["image"].__setitem__("interpolation", "bilinear"),
    "image.output": lambda d: d["image"].__setitem__("output", "other_output"),
    "text.context_length": lambda d: d["text"].__setitem__("context_length", 64),
    "text.pad_id": lambda d: d["text"].__setitem__("pad_id", 1),
    "text.inputs": lambda d: d["text"].__setitem__("inputs", ["input_ids", "attention_mask"]),
    "text.kind": lambda d: d["text"].__setitem__("kind", "wordpiece"),
    "embedding_dim": lambda d: d.__setitem__("embedding_dim", 64),
}


@pytest.mark.parametrize("field", list(EMBEDDING_EDITS))
def test_model_id_covers_everything_that_changes_an_embedding(bundle, field):
    root, valid = bundle
    (root / "leanclip.json").write_text(dump(valid), encoding="utf-8")
    before = read_manifest(root).model_id
    d = json.loads(json.dumps(valid))
    EMBEDDING_EDITS[field](d)
    (root / "leanclip.json").write_text(dump(d), encoding="utf-8")
    try:
        after = read_manifest(root).model_id  # the checksums still match: the bundle loads
    finally:
        (root / "leanclip.json").write_text(dump(valid), encoding="utf-8")
    assert after != before, field


def test_model_id_ignores_free_form_metadata(bundle):
    root, valid = bundle
    before = read_manifest(root).model_id
    d = json.loads(json.dumps(valid))
    d["source"], d["extra"] = "somewhere else", {"note": "changed"}
    (root / "leanclip.json").write_text(dump(d), encoding="utf-8")
    try:
        assert read_manifest(root).model_id == before
    finally:
        (root / "leanclip.json").write_text(dump(valid), encoding="utf-8")


OUT_OF_RANGE = {
    "context_length 1,000,000": (
        lambda d: d["text"].__setitem__("context_length", 1_000_000),
        "context_length",
    ),
    "image size 100,000": (lambda d: d["image"].__setitem__("size", 100_000), "image.size"),
    "image size 2": (lambda d: d["image"].__setitem__("size", 2), "image.size"),
    "mean 255": (lambda d: d["image"].__setitem__("mean", [255, 255, 255]), "image.mean"),
    "std 1e-9": (lambda d: d["image"].__setitem__("std", [1e-9, 1, 1]), "image.std"),
    "std 1e6": (lambda d: d["image"].__setitem__("std", [1e6, 1, 1]), "image.std"),
    "embedding_dim 10**7": (lambda d: d.__setitem__("embedding_dim", 10**7), "embedding_dim"),
    "pad_id 2**40": (lambda d: d["text"].__setitem__("pad_id", 2**40), "pad_id"),
    "name with a newline": (lambda d: d.__setitem__("name", "tiny\n0.99\t/etc/passwd"), "name"),
    "name with an ANSI escape": (lambda d: d.__setitem__("name", "tiny\x1b[2J"), "name"),
    "empty name": (lambda d: d.__setitem__("name", ""), "name"),
}


@pytest.mark.parametrize("case", list(OUT_OF_RANGE))
def test_values_outside_sane_ranges_are_bundle_errors(bundle, case):
    root, valid = bundle
    edit, field = OUT_OF_RANGE[case]
    d = json.loads(json.dumps(valid))
    edit(d)
    (root / "leanclip.json").write_text(dump(d), encoding="utf-8")
    try:
        with pytest.raises(BundleError, match=field.replace(".", r"\.")):
            read_manifest(root)
    finally:
        (root / "leanclip.json").write_text(dump(valid), encoding="utf-8")
