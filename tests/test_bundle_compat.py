"""Bundle format compatibility and the automatic choice of vector space (issue 18).

Bundles without ``image.similarity_output`` (every bundle before issue 18) must load and work as
before; a starter bundle built now exposes a second, image-to-image output; the Encoder picks it
for image-only queries and keeps any query with text in the joint space. Tiny random stand-ins
keep the exports to seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import List, Tuple

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from leanclip.bundle import BundleError, Manifest, read_manifest, write_manifest
from leanclip.encoder import Encoder, QueryVector, preprocess_image, query_space
from tests._fixtures_bundle import tiny_bundle  # noqa: F401 - session fixture

CLASSES = ["cat", "dog", "red car", "tree", "cup of coffee"]
WORDS = "a photo of the cat dog red car tree cup coffee blue small big on in with picture".split()


def _tiny_parts() -> Tuple[nn.Module, nn.Module, str]:
    from leanclip.minilm import BertConfig, MiniLMTextTower, tiny_wordpiece_tokenizer_json

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    text = MiniLMTextTower(cfg).eval()
    torch.manual_seed(1)
    clf = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU6(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, len(CLASSES)),
    ).eval()
    return text, clf, tiny_wordpiece_tokenizer_json(WORDS)


def _photos(n: int = 3) -> List[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.fixture(scope="module")
def starter_pair(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Path, nn.Module]:
    """(fp32, int8) tiny starter bundles with the similarity output, and their torch image tower."""
    from leanclip.starter import build_starter, starter_towers

    text, clf, tok = _tiny_parts()
    kw = dict(text_tower=text, classifier=clf, tokenizer_json=tok, classnames=CLASSES, context_length=16)
    root = tmp_path_factory.mktemp("starter-compat")
    fp32 = build_starter(root / "fp32", image_size=32, **kw)
    int8 = build_starter(root / "int8", image_size=32, int8=True, **kw)
    image, _, _ = starter_towers(**kw)
    return fp32, int8, image


# --- manifests -----------------------------------------------------------------------------------


def test_old_bundle_has_no_similarity_fields_and_loads(tiny_bundle: Path) -> None:  # noqa: F811
    raw = json.loads((tiny_bundle / "leanclip.json").read_text())
    assert "similarity_output" not in raw["image"] and raw["format_version"] == 1
    m = read_manifest(tiny_bundle)
    assert not m.has_similarity and m.image.similarity_dim is None
    enc = Encoder(tiny_bundle, threads=1)
    assert enc.has_similarity is False and enc.similarity_dim is None
    imgs = _photos(2)
    joint, sim = enc.encode_images_all(imgs)
    assert sim is None and joint.shape == (2, enc.dim)
    assert np.allclose(joint, enc.encode_images(imgs), atol=1e-6)
    with pytest.raises(ValueError, match="no image-to-image"):
        enc.encode_images(imgs, kind="similarity")
    with pytest.raises(ValueError, match="kind must be one of"):
        enc.encode_images(imgs, kind="pooled")
    # without similarity vectors an image-only query stays in the joint space
    q = enc.encode_query([(1, "image", imgs[0])])
    assert q.space == "joint" and np.allclose(q.vector, joint[0], atol=1e-6)


def test_rewriting_an_old_manifest_keeps_it_version_1_without_new_keys(
    tiny_bundle: Path, tmp_path: Path
) -> None:  # noqa: F811
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    before = json.loads((copy / "leanclip.json").read_text())
    write_manifest(copy, read_manifest(copy))
    assert json.loads((copy / "leanclip.json").read_text()) == before


@pytest.mark.parametrize(
    "image_patch, message",
    [
        ({"similarity_output": "sim"}, "both set or both absent"),
        ({"similarity_dim": 8}, "both set or both absent"),
        ({"similarity_output": "image_embeds", "similarity_dim": 8}, "another output than image.output"),
        ({"similarity_output": "", "similarity_dim": 8}, "non-empty string"),
        ({"similarity_output": "sim", "similarity_dim": 0}, "similarity_dim must be an integer"),
        ({"similarity_output": "sim", "similarity_dim": 8.0}, "similarity_dim must be an integer"),
    ],
)
def test_bad_similarity_fields_are_refused_by_name(
    tiny_bundle: Path,
    tmp_path: Path,  # noqa: F811
    image_patch: dict,
    message: str,
) -> None:
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    doc = json.loads((copy / "leanclip.json").read_text())
    doc["image"].update(image_patch)
    (copy / "leanclip.json").write_text(json.dumps(doc))
    with pytest.raises(BundleError, match=message):
        read_manifest(copy)


def test_declared_similarity_output_missing_from_onnx_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:  # noqa: F811
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    m = read_manifest(copy)
    m.image.similarity_output, m.image.similarity_dim = "similarity_embeds", 16
    write_manifest(copy, m)
    enc = Encoder(copy, threads=1)
    assert enc.has_similarity
    with pytest.raises(BundleError, match="lack the manifest's similarity output 'similarity_embeds'"):
        enc.encode_images(_photos(1))


# --- the new starter bundle --------------------------------------------------------------------------


def test_new_starter_bundle_exposes_similarity_vectors(starter_pair: Tuple[Path, Path, nn.Module]) -> None:
    fp32, _, tower = starter_pair
    raw = json.loads((fp32 / "leanclip.json").read_text())
    assert raw["image"]["similarity_output"] == "similarity_embeds" and raw["image"]["similarity_dim"] == 16
    from leanclip.starter import STARTER_RECIPE

    assert raw["extra"]["starter"]["recipe"] == STARTER_RECIPE == 3
    enc = Encoder(fp32, threads=1)
    assert enc.has_similarity and enc.similarity_dim == 16
    imgs = _photos(3)
    joint, sim = enc.encode_images_all(imgs)
    assert sim is not None and sim.shape == (3, 16) and joint.shape == (3, enc.dim)
    assert np.allclose(np.linalg.norm(sim, axis=1), 1.0, atol=1e-5)
    assert np.allclose(sim, enc.encode_images(imgs, kind="similarity"), atol=1e-6)
    assert np.allclose(joint, enc.encode_images(imgs), atol=1e-6)
    m = enc.manifest
    px = np.stack([preprocess_image(im, 32, m.image.mean, m.image.std, m.image.interpolation) for im in imgs])
    with torch.no_grad():
        want_joint, want_sim = (o.numpy() for o in tower(torch.from_numpy(px)))
    assert np.allclose(joint, want_joint, atol=1e-4)
    assert np.allclose(sim, want_sim / np.linalg.norm(want_sim, axis=1, keepdims=True), atol=1e-4)


def test_int8_starter_keeps_similarity_output(starter_pair: Tuple[Path, Path, nn.Module]) -> None:
    fp32, int8, _ = starter_pair
    m = read_manifest(int8)
    assert m.precision == "int8" and m.image.similarity_output == "similarity_embeds"
    assert m.extra["self_check_int8_vs_fp32"]["int8 image similarity"] >= 0.99
    imgs = _photos(2)
    a = Encoder(fp32, threads=1).encode_images(imgs, kind="similarity")
    b = Encoder(int8, threads=1).encode_images(imgs, kind="similarity")
    assert (a * b).sum(1).min() > 0.99


def test_encoder_chooses_the_space_by_query_kind(starter_pair: Tuple[Path, Path, nn.Module]) -> None:
    fp32, _, _ = starter_pair
    enc = Encoder(fp32, threads=1)
    imgs = _photos(3)
    joint, sim = enc.encode_images_all(imgs)
    assert sim is not None
    text = enc.encode_text(["a photo of the cat"])[0]

    only_image = enc.encode_query([(1, "image", imgs[0])])
    assert isinstance(only_image, QueryVector) and only_image.space == "similarity"
    assert only_image.vector.shape == (16,) and np.allclose(only_image.vector, sim[0], atol=1e-5)

    two_images = enc.encode_query([(1, "image", imgs[0]), (-1, "image", imgs[1])])
    want = (sim[0] - sim[1]) / np.linalg.norm(sim[0] - sim[1])
    assert two_images.space == "similarity" and np.allclose(two_images.vector, want, atol=1e-5)

    mixed = enc.encode_query([(1, "text", "a photo of the cat"), (1, "image", imgs[0])])
    want = (text + joint[0]) / np.linalg.norm(text + joint[0])
    assert mixed.space == "joint" and mixed.vector.shape == (enc.dim,)
    assert np.allclose(mixed.vector, want, atol=1e-5)

    only_text = enc.encode_query([(1, "text", "a photo of the cat")])
    assert only_text.space == "joint" and np.allclose(only_text.vector, text, atol=1e-5)

    with pytest.raises(ValueError, match="cancel out"):
        enc.encode_query([(1, "image", imgs[0]), (-1, "image", imgs[0])])
    with pytest.raises(ValueError, match="positive term"):
        enc.encode_query([(-1, "image", imgs[0])])
    with pytest.raises(ValueError, match="terms\\[0\\] must be"):
        enc.encode_query([(2, "image", imgs[0])])


def test_query_space_rules() -> None:
    assert query_space(["image"], True) == "similarity"
    assert query_space(["image", "image"], True) == "similarity"
    assert query_space(["image"], False) == "joint"
    assert query_space(["text", "image"], True) == "joint"
    assert query_space(["text"], True) == "joint"
    with pytest.raises(ValueError, match="unknown query term kind"):
        query_space(["video"], True)
    with pytest.raises(ValueError, match="at least one term"):
        query_space([], True)


def test_similarity_spec_round_trips(tiny_bundle: Path) -> None:  # noqa: F811
    m = read_manifest(tiny_bundle)
    m.image.similarity_output, m.image.similarity_dim = "s", 4
    data = json.loads(m.to_json())
    assert data["image"]["similarity_output"] == "s" and data["image"]["similarity_dim"] == 4
    assert isinstance(m, Manifest) and m.has_similarity


def test_model_id_covers_similarity_fields_and_keeps_old_ids(tiny_bundle: Path) -> None:  # noqa: F811
    import hashlib
    from dataclasses import asdict

    m = read_manifest(tiny_bundle)
    # the id of a bundle without the fields is what it was before they existed
    image = {k: v for k, v in asdict(m.image).items() if k not in ("similarity_output", "similarity_dim")}
    identity = {
        "files": m.files,
        "embedding_dim": m.embedding_dim,
        "precision": m.precision,
        "image": image,
        "text": asdict(m.text),
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode())
    assert m.model_id == f"{m.name}-{m.precision}-{digest.hexdigest()[:16]}"
    ids = {m.model_id}
    for out, dim in (("s", 4), ("s", 8), ("t", 4)):
        m.image.similarity_output, m.image.similarity_dim = out, dim
        ids.add(m.model_id)
    assert len(ids) == 4
