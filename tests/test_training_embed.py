"""The corpus-embedding job end to end on generated data: Karpathy json (with unreadable images),
a folder and webdataset tars, a training checkpoint as the model; sharded embedding files, an
index built from them, and per-shard resumption."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests._fixtures_training import jpeg_bytes, make_karpathy, require_engine, write_shard

leanclip = require_engine()

from training import embed  # noqa: E402
from training.data import image_to_tensor, load_image, load_karpathy, prepare_pixels  # noqa: E402
from training.models import build_teacher, save_checkpoint, tokenize  # noqa: E402
from training.train_utils import seed_everything  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("embed")
    json_path, image_root = make_karpathy(root, n_train=4, n_val=2, n_test=10, broken=0)
    (image_root / "train2014" / "img0007.jpg").write_bytes(b"broken test image")
    seed_everything(0)
    save_checkpoint(root / "model.pt", build_teacher(pretrained=None, tiny=True), {"stage": 2})
    return {"root": root, "json": json_path, "images": image_root, "model": root / "model.pt"}


def test_karpathy_split_sharded_indexed_and_resumed(setup: dict[str, Path]) -> None:
    out = setup["root"] / "emb_coco"
    args = [
        "--model",
        str(setup["model"]),
        "--karpathy",
        str(setup["json"]),
        "--image-root",
        str(setup["images"]),
        "--split",
        "test",
        "--out",
        str(out),
        "--shard-size",
        "4",
        "--batch-size",
        "3",
        "--device",
        "cpu",
    ]
    assert embed.main(args) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "00000.npz",
        "00001.npz",
        "00002.npz",
    ]  # 10 images in shards of 4
    corpus = load_karpathy(setup["json"], setup["images"], "test")
    emb = np.concatenate([np.load(out / "images" / f"{s:05d}.npz")["embeddings"] for s in range(3)])
    valid = np.concatenate([np.load(out / "images" / f"{s:05d}.npz")["valid"] for s in range(3)])
    broken = [i for i, p in enumerate(corpus.images) if p.name == "img0007.jpg"]
    assert valid.sum() == 9 and not valid[broken].any()
    # the same embeddings as the model gives directly
    from training.models import load_model

    model = load_model(setup["model"])
    good = [i for i in range(len(corpus)) if valid[i]]
    with torch.no_grad():
        direct = model.encode_image(
            prepare_pixels(
                model,
                torch.stack([image_to_tensor(load_image(corpus.images[i]), model.image_size) for i in good]),
            )
        )
        direct_txt = model.encode_text(tokenize(corpus.captions))
    np.testing.assert_allclose(emb[good], torch.nn.functional.normalize(direct, dim=-1).numpy(), atol=1e-5)
    texts = np.concatenate([np.load(out / "texts" / f"{s:05d}.npz")["embeddings"] for s in range(3)])
    np.testing.assert_allclose(texts, torch.nn.functional.normalize(direct_txt, dim=-1).numpy(), atol=1e-5)
    # the index: every readable image under its row number
    index = leanclip.Index.load(out / "images.lci")
    assert sorted(index.keys().tolist()) == good
    keys, _ = index.search(emb[good[3]], k=1)
    assert int(keys[0]) == good[3]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"]["rows"] == 10 and manifest["images"]["indexed"] == 9
    assert manifest["images"]["names"][broken[0]].endswith("img0007.jpg")
    assert len(leanclip.Index.load(out / "texts.lci")) == len(corpus.captions)
    # resumable per shard: a lost shard is encoded again, the others are kept
    (out / "images" / "00001.npz").unlink()
    before = (out / "images" / "00000.npz").stat().st_mtime_ns
    summary = embed.run(embed.parser().parse_args(args))
    assert summary["encoded"] == 1 and summary["reused"] == 2
    assert (out / "images" / "00000.npz").stat().st_mtime_ns == before
    assert np.array_equal(np.load(out / "images" / "00001.npz")["embeddings"], emb[4:8])


def test_folder_and_webdataset_sources(setup: dict[str, Path]) -> None:
    root = setup["root"]
    tars = root / "tars"
    tars.mkdir()
    write_shard(tars / "000.tar", [(f"k{i}", jpeg_bytes(i), f"caption {i}") for i in range(3)])
    write_shard(tars / "001.tar", [("k3", b"broken", "caption 3"), ("k4", jpeg_bytes(4), "")])
    out = root / "emb_wds"
    assert (
        embed.main(
            [
                "--model",
                str(setup["model"]),
                "--shards",
                str(tars / "{000..001}.tar"),
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"]["names"] == ["k0", "k1", "k2", "k3", "k4"]
    assert manifest["images"]["indexed"] == 4 and manifest["texts"]["rows"] == 4
    out2 = root / "emb_folder"
    assert (
        embed.main(
            [
                "--model",
                str(setup["model"]),
                "--folder",
                str(setup["images"]),
                "--out",
                str(out2),
                "--shard-size",
                "7",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    manifest = json.loads((out2 / "manifest.json").read_text())
    assert manifest["images"]["rows"] == 16 and "texts" not in manifest
    with pytest.raises(embed.EmbedError, match="neither a bundle directory"):
        embed.main(["--model", str(root / "nope.pt"), "--folder", str(setup["images"]), "--out", str(out2)])
