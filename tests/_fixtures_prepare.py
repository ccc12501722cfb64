"""Small generated archives of the shapes ``training.prepare`` reads: Karpathy's
caption_datasets.zip, COCO's train2014.zip, a Flickr30k images tar.gz, img2dataset's webdataset
shards (with one damaged shard and a missing and an unreadable image)."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

from tests._fixtures_training import make_karpathy, write_shard


def make_archives(root: Path, n_train: int = 24, n_val: int = 6, n_test: int = 10) -> dict[str, Path]:
    """Archives under ``root``; the COCO zip lacks one listed image and holds one unreadable one."""
    src = root / "src"
    json_path, image_root = make_karpathy(src, n_train=n_train, n_val=n_val, n_test=n_test)
    coco = json.loads(json_path.read_text())
    images = sorted((image_root / "train2014").glob("*.jpg"))
    flickr = {
        "dataset": "flickr30k",
        "images": [
            {k: v for k, v in e.items() if k != "filepath"} | {"filename": e["filename"].replace("img", "fl")}
            for e in coco["images"]
        ],
    }
    karpathy = root / "caption_datasets.zip"
    with zipfile.ZipFile(karpathy, "w") as zf:
        zf.writestr("dataset_coco.json", json.dumps(coco))
        zf.writestr("dataset_flickr30k.json", json.dumps(flickr))
    coco_zip = root / "train2014.zip"
    with zipfile.ZipFile(coco_zip, "w") as zf:
        for i, path in enumerate(images):
            if i == 3:
                continue  # listed in the json, not in the archive: "missing"
            data = b"not a jpeg at all" if i == 5 else path.read_bytes()  # "unreadable"
            zf.writestr(f"train2014/{path.name}", data)
    flickr_tar = root / "flickr30k-images.tar.gz"
    with tarfile.open(flickr_tar, "w:gz") as tf:
        for path in images:
            data = path.read_bytes()
            info = tarfile.TarInfo(f"flickr30k-images/{path.name.replace('img', 'fl')}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    shards = root / "cc3m_shards"
    shards.mkdir()
    captions = [s["raw"] for e in coco["images"] for s in e["sentences"]]
    for s in range(2):
        write_shard(
            shards / f"{s:05d}.tar",
            [
                (f"{s:05d}{i:04d}", images[(6 * s + i) % len(images)].read_bytes(), captions[7 * s + i])
                for i in range(6 + s)
            ],
        )
    # a damaged shard: img2dataset died mid-write (the tar ends inside an image)
    (shards / "00002.tar").write_bytes((shards / "00000.tar").read_bytes()[:1500])
    return {"karpathy": karpathy, "coco": coco_zip, "flickr": flickr_tar, "shards": shards}
