"""The gallery stores a model's image-to-image vectors beside the joint ones and uses them for
image-only queries (issue 18). A tiny random starter bundle keeps it fast."""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
from PIL import Image

from leanclip.encoder import Encoder
from tests._fixtures_bundle import tiny_bundle  # noqa: F401 - session fixture
from tests.test_bundle_compat import CLASSES, _tiny_parts

pytest.importorskip("leanclip._engine")


@pytest.fixture(scope="module")
def sim_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from leanclip.starter import build_starter

    text, clf, tok = _tiny_parts()
    return build_starter(
        tmp_path_factory.mktemp("sim") / "b",
        text_tower=text,
        classifier=clf,
        tokenizer_json=tok,
        classnames=CLASSES,
        context_length=16,
        image_size=32,
    )


def _photos(folder: Path, n: int = 7) -> list:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    paths = []
    for i in range(n):
        base = rng.integers(0, 256, 3)
        arr = np.clip(base + rng.normal(0, 40 + 10 * i, (36 + i, 44, 3)), 0, 255).astype(np.uint8)
        p = folder / f"p{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def _gallery(root: Path, bundle: Path) -> Tuple[object, Encoder]:
    from leanclip.gallery import Gallery

    enc = Encoder(bundle, threads=1)
    return Gallery(root, model=enc), enc


def test_gallery_keeps_similarity_index_in_step_and_similar_uses_it(sim_bundle: Path, tmp_path: Path) -> None:
    from leanclip import Index

    paths = _photos(tmp_path / "photos")
    g, enc = _gallery(tmp_path / "photos", sim_bundle)
    g.update()
    gen = g.info()["generation"]
    store = g.store
    assert (store / f"index-{gen}.lci").is_file() and (store / f"similar-{gen}.lci").is_file()
    joint_idx = Index.load(str(store / f"index-{gen}.lci"))
    sim_idx = Index.load(str(store / f"similar-{gen}.lci"))
    assert sorted(np.asarray(joint_idx.keys()).tolist()) == sorted(np.asarray(sim_idx.keys()).tolist())
    assert sim_idx.dim == enc.similarity_dim and g.check() == ([], [])

    # `similar` ranks by the image-to-image vectors
    sims = enc.encode_images([str(p) for p in paths], kind="similarity")
    hits = g.similar(paths[0], k=len(paths) - 1)
    want = [paths[j].name for j in np.argsort(-(sims[1:] @ sims[0]), kind="stable") + 1]
    assert [h.name for h in hits] == want
    assert hits[0].score == pytest.approx(
        float(sims[0] @ sims[[p.name for p in paths].index(hits[0].name)]), abs=1e-3
    )
    qv, own = g.query_vector(f"img:{paths[0]}")
    assert qv.shape == (enc.similarity_dim,) and own

    # a query with text stays in the joint space
    joint = enc.encode_images([str(p) for p in paths])
    text = enc.encode_text(["a photo of the cat"])[0]
    q = (text + joint[0]) / np.linalg.norm(text + joint[0])
    mixed = g.search(f"a photo of the cat +img:{paths[0]}", k=3)
    best = max(range(1, len(paths)), key=lambda j: float(joint[j] @ q))
    assert mixed[0].name == paths[best].name
    assert mixed[0].score == pytest.approx(float(joint[best] @ q), abs=1e-3)
    batch = g.search_batch([f"img:{paths[0]}", f"a photo of the cat +img:{paths[0]}"], k=3)
    assert [h.name for h in batch[0]] == [h.name for h in hits[:3]]
    assert [h.name for h in batch[1]] == [h.name for h in mixed]

    # removals and additions keep the two files in step; old generations go
    paths[3].unlink()
    _photos(tmp_path / "photos" / "more", 2)
    g.update()
    gen2 = g.info()["generation"]
    assert gen2 > gen and not (store / f"similar-{gen}.lci").exists()
    sim_idx = Index.load(str(store / f"similar-{gen2}.lci"))
    joint_idx = Index.load(str(store / f"index-{gen2}.lci"))
    assert sorted(np.asarray(joint_idx.keys()).tolist()) == sorted(np.asarray(sim_idx.keys()).tolist())
    assert len(sim_idx) == len(paths) - 1 + 2 and g.check() == ([], [])


def test_gallery_without_similarity_vectors_is_unchanged(tiny_bundle: Path, tmp_path: Path) -> None:  # noqa: F811
    paths = _photos(tmp_path / "photos", 4)
    g, enc = _gallery(tmp_path / "photos", tiny_bundle)
    g.update()
    assert not list(g.store.glob("similar-*"))
    joint = enc.encode_images([str(p) for p in paths])
    hits = g.similar(paths[0], k=3)
    want = [paths[j].name for j in np.argsort(-(joint[1:] @ joint[0]), kind="stable") + 1]
    assert [h.name for h in hits] == want
    qv, _ = g.query_vector(f"img:{paths[0]}")
    assert qv.shape == (enc.dim,)


def test_switching_to_a_similarity_model_reencodes_and_adds_the_index(
    sim_bundle: Path,
    tiny_bundle: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    from leanclip.gallery import Gallery

    _photos(tmp_path / "photos", 3)
    Gallery(tmp_path / "photos", model=Encoder(tiny_bundle, threads=1)).update()
    g = Gallery(tmp_path / "photos", model=Encoder(sim_bundle, threads=1))
    summary = g.update()
    assert summary.encoded == 3 and "model changed" in summary.recovered
    gen = g.info()["generation"]
    assert (g.store / f"similar-{gen}.lci").is_file()
    assert len(list(g.store.glob("similar-*"))) == 1 and len(list(g.store.glob("index-*"))) == 1


def test_ivf_gallery_keeps_an_exact_similarity_index(sim_bundle: Path, tmp_path: Path) -> None:
    """The joint index may be IVF (gallery.kinds); the image-to-image one stays an exact Index
    with the same keys, and image-only queries still search it."""
    from leanclip import Index, IVFIndex
    from leanclip.gallery import Gallery

    paths = _photos(tmp_path / "photos", 6)
    enc = Encoder(sim_bundle, threads=1)
    g = Gallery(tmp_path / "photos", model=enc, index_kind="ivf")
    g.update()
    info = g.info()
    assert info["index"] == "ivf"
    gen = info["generation"]
    joint_idx = IVFIndex.load(str(g.store / f"index-{gen}.lci"))
    sim_idx = Index.load(str(g.store / f"similar-{gen}.lci"))
    assert sorted(np.asarray(joint_idx.keys()).tolist()) == sorted(np.asarray(sim_idx.keys()).tolist())
    assert g.check() == ([], [])
    sims = enc.encode_images([str(p) for p in paths], kind="similarity")
    want = [paths[j].name for j in np.argsort(-(sims[1:] @ sims[0]), kind="stable") + 1]
    assert [h.name for h in g.similar(paths[0], k=len(paths) - 1)] == want
    # converting to exact moves the joint vectors; the similarity index is kept as it is
    g2 = Gallery(tmp_path / "photos", model=enc, index_kind="exact")
    s = g2.update()
    assert s.encoded == 0 and g2.info()["index"] == "exact" and g2.check() == ([], [])
    assert [h.name for h in g2.similar(paths[0], k=len(paths) - 1)] == want


def test_missing_similarity_index_is_reported_and_rebuilt(sim_bundle: Path, tmp_path: Path) -> None:
    from leanclip.gallery import Gallery, GalleryError

    paths = _photos(tmp_path / "photos", 4)
    g = Gallery(tmp_path / "photos", model=Encoder(sim_bundle, threads=1))
    g.update()
    gen = g.info()["generation"]
    (g.store / f"similar-{gen}.lci").unlink()
    g2 = Gallery(tmp_path / "photos", model=Encoder(sim_bundle, threads=1))
    with pytest.raises(GalleryError, match="image-to-image index similar-.* is missing.*leanclip index"):
        g2.similar(paths[0], k=2)
    assert g2.search("a photo of the cat", k=2)  # text queries do not need it
    summary = g2.update()
    assert "image-to-image" in summary.recovered and summary.encoded == len(paths)
    assert g2.check() == ([], []) and len(g2.similar(paths[0], k=2)) == 2
