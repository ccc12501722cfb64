"""Issue 25 (hardening, round 3), item 7 and the bundle items of 10: manifests that load but
cannot run are refused by the self-check each ONNX session runs when it is created, every
encoding failure is a LeanclipError naming the bundle, and the CLI prints one line. Each test
failed on the code before it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from leanclip.bundle import BundleError, read_manifest, write_manifest
from leanclip.cli import main
from leanclip.encoder import EncodeError, Encoder
from leanclip.errors import LeanclipError
from tests._fixtures_bundle import tiny_bundle  # noqa: F401
from tests._fixtures_gallery import COLORS, make_photo


def _altered(src: Path, dst: Path, **changes: Any) -> Path:
    """A copy of the bundle ``src`` with manifest fields changed (``image_size=8``, ...) and
    its checksums rewritten: a bundle that loads."""
    shutil.copytree(src, dst)
    m = read_manifest(dst)
    for key, value in changes.items():
        section, name = key.split("_", 1)
        setattr(getattr(m, section), name, value)
    write_manifest(dst, m)
    return dst


@pytest.mark.parametrize("size", [8, 223])
def test_an_image_size_the_graph_cannot_take_is_a_bundle_error(
    tiny_bundle: Path,
    tmp_path: Path,
    size: int,  # noqa: F811
) -> None:
    bad = _altered(tiny_bundle, tmp_path / "b", image_size=size)
    enc = Encoder(bad)  # the manifest alone is valid; text search never loads image.onnx
    assert enc.encode_text(["a dog"]).shape == (1, 32)
    img = Image.new("RGB", (40, 30), (200, 10, 10))
    for _ in range(2):  # the second use is refused at once, the same way
        with pytest.raises(BundleError, match=rf"image\.onnx.*image\.size {size}.*Expected: 32") as info:
            enc.encode_images([img])
        assert str(bad) in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(BundleError, match=f"image.size {size}"):
        Encoder(bad).load()


def test_a_pad_id_beyond_the_vocabulary_is_refused_at_load(tiny_bundle: Path, tmp_path: Path) -> None:  # noqa: F811
    bad = _altered(tiny_bundle, tmp_path / "b", text_pad_id=60000)
    with pytest.raises(BundleError, match=r"text\.pad_id 60000 is beyond the tokenizer's vocabulary \(49408"):
        Encoder(bad)


def test_a_text_model_smaller_than_its_tokenizer_is_refused(
    tiny_bundle: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,  # noqa: F811
) -> None:
    # the tokenizer has ids the model's embedding table has not: the self-check feeds the largest
    bad = tmp_path / "b"
    shutil.copytree(tiny_bundle, bad)
    tok = json.loads((bad / "tokenizer.json").read_text())
    tok["added_tokens"].append(
        {
            "id": 49408,
            "content": "<extra>",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    )
    (bad / "tokenizer.json").write_text(json.dumps(tok))
    write_manifest(bad, read_manifest(bad, verify=False))
    enc = Encoder(bad)
    with pytest.raises(BundleError, match=r"text\.onnx.*tokenizer ids up to 49408.*idx=49408"):
        enc.encode_text(["a dog"])


def test_a_failure_while_encoding_is_an_encode_error_naming_the_bundle(
    tiny_bundle: Path,
    tmp_path: Path,  # noqa: F811
) -> None:
    # a context longer than the model's 77 positions: the short self-check passes, a long text fails
    bad = _altered(tiny_bundle, tmp_path / "b", text_context_length=100)
    enc = Encoder(bad)
    assert enc.encode_text(["a dog"]).shape == (1, 32)
    with pytest.raises(EncodeError, match=r"the text model failed on a batch of 1") as info:
        enc.encode_text([" ".join(["dog"] * 99)])
    assert isinstance(info.value, LeanclipError) and str(bad) in str(info.value)
    assert "\n" not in str(info.value) and "[ONNXRuntimeError]" not in str(info.value)


def _cli(*args: str) -> Any:
    return CliRunner().invoke(main, list(args), catch_exceptions=True)


def test_the_cli_prints_one_line_for_a_bundle_that_cannot_run(
    tiny_bundle: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,  # noqa: F811
) -> None:
    monkeypatch.setenv("LEANCLIP_HOME", str(tmp_path / "home"))
    long_ctx = _altered(tiny_bundle, tmp_path / "ctx", text_context_length=100)
    size = _altered(tiny_bundle, tmp_path / "size", image_size=223)
    pad = _altered(tiny_bundle, tmp_path / "pad", text_pad_id=60000)
    roots = {}
    for name in ("ctx", "size"):
        roots[name] = tmp_path / f"photos-{name}"
        make_photo(roots[name] / "a.jpg", COLORS["red"])
    assert _cli("index", str(roots["ctx"]), "--model", str(long_ctx), "-q").exit_code == 0
    cases = [
        (["search", " ".join(["dog"] * 99), "-d", str(roots["ctx"])], "text model failed"),
        (["index", str(roots["size"]), "--model", str(size), "-q"], "image.size 223"),
        (["search", "dog", "-d", str(roots["ctx"]), "--model", str(pad)], "text.pad_id 60000"),
    ]
    for args, what in cases:
        r = _cli(*args)
        assert r.exit_code == 3, (args, r.output, r.exception)
        assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and what in lines[0], r.stderr


def test_a_tokenizer_that_is_a_fifo_is_named_as_one(tiny_bundle: Path, tmp_path: Path) -> None:  # noqa: F811
    bad = tmp_path / "b"
    shutil.copytree(tiny_bundle, bad)
    (bad / "tokenizer.json").unlink()
    os.mkfifo(bad / "tokenizer.json")
    for verify in (True, False):  # never opened (a FIFO would block the checksum)
        with pytest.raises(BundleError, match=r"tokenizer\.json is a FIFO \(named pipe\), not a file"):
            Encoder(bad, verify=verify)
    (bad / "tokenizer.json").unlink()
    (bad / "tokenizer.json").mkdir()
    with pytest.raises(BundleError, match=r"tokenizer\.json is a directory, not a file"):
        Encoder(bad)
    os.rmdir(bad / "tokenizer.json")
    with pytest.raises(BundleError, match="is missing tokenizer.json"):
        Encoder(bad)


@pytest.mark.parametrize("version", [True, 1.0, "1"])
def test_format_version_must_be_the_integer_1(tiny_bundle: Path, tmp_path: Path, version: Any) -> None:  # noqa: F811
    bad = tmp_path / "b"
    shutil.copytree(tiny_bundle, bad)
    data = json.loads((bad / "leanclip.json").read_text())
    data["format_version"] = version
    (bad / "leanclip.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="format version .* is not supported"):
        read_manifest(bad)
    data["format_version"] = 1
    (bad / "leanclip.json").write_text(json.dumps(data))
    assert read_manifest(bad).format_version == 1


def test_a_good_bundle_passes_the_self_check_and_encodes_as_before(tiny_bundle: Path) -> None:  # noqa: F811
    enc = Encoder(tiny_bundle).load()
    img = np.asarray(enc.encode_images([Image.new("RGB", (32, 32), (10, 200, 10))]))
    assert img.shape == (1, 32) and np.isclose(np.linalg.norm(img), 1.0)
