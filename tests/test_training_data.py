"""Dataset readers on tiny generated data: formats, errors, unreadable images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests._fixtures_training import jpeg_bytes, make_image, make_karpathy, write_shard
from training import data
from training.data import DataError


def test_karpathy_splits_and_groups(tmp_path: Path) -> None:
    json_path, root = make_karpathy(tmp_path, n_train=10, n_val=4, n_test=5)
    train = data.load_karpathy(json_path, root, "train")
    assert len(train) == 10  # train + restval
    assert len(train.captions) == 50
    assert np.bincount(train.caption_image).tolist() == [5] * 10
    assert all(p.is_file() for p in train.images)
    test = data.load_karpathy(json_path, root, "test")
    assert len(test) == 5 and test.images[0].name == "img0014.jpg"
    assert test.captions[0].startswith("a ")


def test_karpathy_errors_name_the_problem(tmp_path: Path) -> None:
    json_path, root = make_karpathy(tmp_path, n_train=3, n_val=1, n_test=1)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        data.load_karpathy(tmp_path / "nope.json", root)
    (root / "train2014" / "img0001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="img0001.jpg"):
        data.load_karpathy(json_path, root, "train")
    doc = json.loads(json_path.read_text())
    doc["images"][2]["sentences"][1]["raw"] = "   "
    json_path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match="empty caption"):
        data.load_karpathy(json_path, root, ["train"], check_images=False)
    with pytest.raises(DataError, match="no images"):
        data.load_karpathy(json_path, root, "nosuchsplit")


def test_tsv(tmp_path: Path) -> None:
    for i in range(3):
        make_image((10 * i, 20, 30), "square", i).save(tmp_path / f"{i}.png")
    tsv = tmp_path / "cc3m.tsv"
    tsv.write_text("filepath\ttitle\n0.png\tfirst\n1.png\tsecond\n0.png\tfirst again\n2.png\tthird\n")
    corpus = data.load_tsv(tsv)
    assert [p.name for p in corpus.images] == ["0.png", "1.png", "2.png"]
    assert corpus.image_captions[0] == [0, 2]
    tsv.write_text("filepath\ttitle\nhttp://x/y.jpg\tremote\n")
    with pytest.raises(DataError, match="URL"):
        data.load_tsv(tsv)
    tsv.write_text("url\tcaption\n0.png\tx\n")
    with pytest.raises(DataError, match="no column 'filepath'"):
        data.load_tsv(tsv)
    tsv.write_text("filepath\ttitle\n0.png\t \n")
    with pytest.raises(DataError, match="empty caption.*cc3m.tsv:2"):
        data.load_tsv(tsv)


def test_folder_with_tsv_or_json_captions(tmp_path: Path) -> None:
    for name in ("a.jpg", "b.jpg"):
        make_image((200, 10, 10), "dots", 0).save(tmp_path / name)
    (tmp_path / "captions.tsv").write_text("a.jpg\ta red thing\nb.jpg\tanother\na.jpg\tsame red\n")
    corpus = data.load_folder(tmp_path)
    assert len(corpus) == 2 and len(corpus.captions) == 3
    (tmp_path / "captions.tsv").unlink()
    (tmp_path / "caps.json").write_text(json.dumps({"a.jpg": ["x", "y"], "b.jpg": "z"}))
    corpus = data.load_folder(tmp_path, tmp_path / "caps.json")
    assert corpus.captions == ["x", "y", "z"]
    (tmp_path / "caps.json").write_text(json.dumps({"c.jpg": "missing"}))
    with pytest.raises(FileNotFoundError, match="c.jpg"):
        data.load_folder(tmp_path, tmp_path / "caps.json")
    with pytest.raises(FileNotFoundError, match="captions"):
        data.load_folder(tmp_path)


def test_webdataset_shards_stream_skip_and_count(tmp_path: Path) -> None:
    jpeg = jpeg_bytes
    write_shard(tmp_path / "s-000.tar", [(f"{i:04d}", jpeg(i), f"caption {i}") for i in range(3)])
    write_shard(tmp_path / "s-001.tar", [("0003", b"broken", "caption 3"), ("0004", jpeg(4), "caption 4")])
    shards = data.expand_shards(str(tmp_path / "s-{000..001}.tar"))
    assert len(shards) == 2
    stream = data.WebDatasetImages(shards, size=16)
    batches = list(DataLoader(stream, batch_size=2, collate_fn=data.collate_skipping))
    assert sum(b["skipped"] for b in batches) == 1  # the broken image is skipped, counted
    positions = torch.cat([b["columns"][0] for b in batches if b["size"]]).tolist()
    assert positions == [0, 1, 2, 4]
    resumed = [item for item in data.WebDatasetImages(shards, 16, skip=2) if item is not None]
    assert [item[0] for item in resumed] == [2, 4]
    assert data.read_webdataset_texts(shards)[-1] == "caption 4"
    # two ranks split the stream without overlap; the broken sample 3 falls to rank 1
    rank0 = [item for item in data.WebDatasetImages(shards, 16, global_batch=2, share=slice(0, 1))]
    rank1 = [item for item in data.WebDatasetImages(shards, 16, global_batch=2, share=slice(1, 2))]
    assert [item[0] for item in rank0] == [0, 2, 4]
    assert rank1[0][0] == 1 and rank1[1] is None
    two_workers = DataLoader(
        data.WebDatasetImages(shards, 16), batch_size=1, num_workers=2, collate_fn=data.collate_skipping
    )
    seen = sorted(int(b["columns"][0]) for b in two_workers if b["size"])
    assert seen == [0, 1, 2, 4]  # each sample decoded by exactly one worker
    with pytest.raises(FileNotFoundError, match="s-002.tar"):
        data.expand_shards(str(tmp_path / "s-{000..002}.tar"))


def test_unreadable_images_are_skipped_and_counted(tmp_path: Path) -> None:
    json_path, root = make_karpathy(tmp_path, n_train=6, n_val=1, n_test=1, broken=2)
    corpus = data.load_karpathy(json_path, root, "train")
    loader = DataLoader(data.ImageFiles(corpus.images, 16), batch_size=4, collate_fn=data.collate_skipping)
    batches = list(loader)
    assert [b["skipped"] for b in batches] == [2, 0]
    assert batches[0]["columns"][0].tolist() == [2, 3]
    with pytest.raises(data.ImageLoadError, match="img0000.jpg"):
        data.load_image(corpus.images[0])


def test_epoch_pairs_visit_every_caption_once(tmp_path: Path) -> None:
    """An epoch is every caption once (COCO: ~566k pairs, not 113k), laid out in rounds so a
    batch inside a round never holds two captions of one image."""
    json_path, root = make_karpathy(tmp_path, n_train=10, n_val=1, n_test=1)
    corpus = data.load_karpathy(json_path, root, "train")
    corpus = data.PairedCorpus(
        corpus.images,
        corpus.captions[:-2],  # uneven: 3 or 5 captions
        corpus.caption_image[:-2],
    )
    pairs = data.epoch_pairs(corpus, 0, 1, 2)
    assert sorted(pairs[:, 1].tolist()) == list(range(len(corpus.captions)))
    assert all(corpus.caption_image[c] == i for i, c in pairs)
    for start in range(0, 30, 10):  # the first three rounds hold each image once
        assert sorted(pairs[start : start + 10, 0].tolist()) == list(range(10))
    assert np.array_equal(pairs, data.epoch_pairs(corpus, 0, 1, 2))
    assert not np.array_equal(pairs, data.epoch_pairs(corpus, 0, 1, 3))


def test_prepare_pixels_resizes_and_normalises() -> None:
    class Model:
        image_size = 8
        image_mean = (0.5, 0.5, 0.5)
        image_std = (0.25, 0.25, 0.25)

    x = torch.full((1, 3, 16, 16), 0.75)
    out = data.prepare_pixels(Model(), x)
    assert out.shape == (1, 3, 8, 8)
    torch.testing.assert_close(out, torch.ones(1, 3, 8, 8))


def test_training_reads_images_through_the_products_loader(tmp_path):
    # one image loader for the encoder, the gallery and training (issue 13): the same limits
    import io

    from PIL import Image

    from leanclip.images import ImageLoadError as ProductImageLoadError
    from training.data import ImageLoadError, load_image

    assert ImageLoadError is ProductImageLoadError
    strip = tmp_path / "strip.png"
    Image.new("RGB", (6000, 1)).save(strip)  # 6000:1, refused before decoding
    with pytest.raises(ImageLoadError, match="aspect"):
        load_image(strip)
    buf = io.BytesIO()
    Image.new("I;16", (8, 6), 40000).save(buf, format="PNG")  # 16-bit: scaled, not clipped
    img = load_image(io.BytesIO(buf.getvalue()), where="sample 7")
    assert img.mode == "RGB" and img.size == (8, 6) and img.getpixel((0, 0))[0] > 128
    with pytest.raises(ImageLoadError, match="sample 7"):
        load_image(io.BytesIO(b"not an image"), where="sample 7")
