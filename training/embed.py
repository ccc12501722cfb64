"""Corpus embedding for large collections: encode image/caption shards with a model bundle or a
training checkpoint into sharded embedding files, then build a leanclip index from them.

    python -m training.embed --model runs/coco/s6_stage2/best.pt --folder photos/ --out emb/
    torchrun --nproc_per_node 8 -m training.embed --model bundles/s6 \\
        --shards "data/cc3m/{00000..00331}.tar" --out emb/cc3m
    python -m training.embed --model best.pt --karpathy dataset_coco.json \\
        --image-root data/coco --split test --out emb/coco_test

Sources: ``--folder`` (every image under it, sorted, cut into ``--shard-size`` pieces),
``--karpathy`` (a split's images and captions, cut the same way), ``--shards`` (webdataset tars:
one job shard per tar, jpg/png/webp + txt). Shard s is encoded by rank ``s % W``; each writes
``OUT/images/NNNNN.npz`` (and ``OUT/texts/NNNNN.npz`` when the source has captions) atomically,
so a rerun skips the shards already written (resumable per shard). When all shards exist, rank 0
builds ``OUT/images.lci`` (and ``OUT/texts.lci``): a leanclip ``Index`` whose key k is row k of
the shards read in order, and ``OUT/manifest.json`` mapping rows to their names.

Each ``.npz`` holds ``embeddings`` (n, d) float32 L2-normalized, ``valid`` (n,) bool (False: the
image could not be read; its row is zero and it is left out of the index) and ``names`` (n,)
(image path or webdataset key; for texts the caption and its image's name)."""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from leanclip.errors import LeanclipError

log = logging.getLogger("training.embed")


class EmbedError(LeanclipError, ValueError):
    """Bad arguments or inputs of the embedding job (named in the message)."""


# --------------------------------------------------------------------------------------------
# Sources: job shards of (name, image opener) and (caption, image name)


@dataclass
class JobShard:
    images: list[tuple[str, Callable[[], Image.Image]]] = field(default_factory=list)
    texts: list[tuple[str, str]] = field(default_factory=list)  # (caption, image name)


def _open_path(path: Path) -> Callable[[], Image.Image]:
    from training.data import load_image

    return lambda: load_image(path)


def _open_bytes(raw: bytes, name: str) -> Callable[[], Image.Image]:
    from training.data import load_image

    return lambda: load_image(io.BytesIO(raw))


def folder_shards(folder: Path, shard_size: int) -> list[Callable[[], JobShard]]:
    from training.data import list_images

    paths = list_images(folder)
    return [
        lambda chunk=paths[i : i + shard_size]: JobShard(
            [(str(p.relative_to(folder)), _open_path(p)) for p in chunk]
        )
        for i in range(0, len(paths), shard_size)
    ]


def karpathy_shards(
    json_path: Path, image_root: Path, split: str, shard_size: int
) -> list[Callable[[], JobShard]]:
    from training.data import load_karpathy

    corpus = load_karpathy(json_path, image_root, split)

    def make(start: int) -> JobShard:
        images = range(start, min(start + shard_size, len(corpus)))
        names = {i: str(corpus.images[i].relative_to(image_root)) for i in images}
        return JobShard(
            [(names[i], _open_path(corpus.images[i])) for i in images],
            [(corpus.captions[c], names[i]) for i in images for c in corpus.image_captions[i]],
        )

    return [lambda s=start: make(s) for start in range(0, len(corpus), shard_size)]


def webdataset_shards(pattern: str | Sequence[str]) -> list[Callable[[], JobShard]]:
    from training.data import _all_shards, expand_shards

    def make(tar: str) -> JobShard:
        import webdataset as wds

        shard = JobShard()
        for sample in wds.WebDataset(
            tar, shardshuffle=False, empty_check=False, nodesplitter=_all_shards, workersplitter=_all_shards
        ):
            key = str(sample.get("__key__"))
            raw = next((sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
            shard.images.append((key, _open_bytes(raw, key) if raw is not None else _missing(key)))
            caption = sample.get("txt")
            if caption is not None:
                text = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
                if text.strip():
                    shard.texts.append((" ".join(text.split()), key))
        return shard

    return [lambda t=tar: make(t) for tar in expand_shards(pattern)]


def _missing(key: str) -> Callable[[], Image.Image]:
    def fail() -> Image.Image:
        from training.data import ImageLoadError

        raise ImageLoadError(f"webdataset sample {key}", "no image in the sample")

    return fail


# --------------------------------------------------------------------------------------------
# Models: a bundle (ONNX, leanclip.Encoder) or a training checkpoint (torch)


class Embedder:
    dim: int

    def images(self, images: Sequence[Image.Image]) -> np.ndarray:
        raise NotImplementedError

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError


class BundleEmbedder(Embedder):
    def __init__(self, path: Path, batch_size: int) -> None:
        import leanclip

        self.encoder = leanclip.Encoder(path)
        self.dim = int(self.encoder.dim)
        self.batch_size = batch_size

    def images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.encoder.encode_images(list(images), batch_size=self.batch_size)

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.encode_text(list(texts), batch_size=self.batch_size)


class CheckpointEmbedder(Embedder):
    def __init__(self, path: Path, batch_size: int, device: Any, amp: bool) -> None:
        from training.models import load_model

        self.model = load_model(path).to(device).eval()
        self.device, self.amp, self.batch_size = device, amp, batch_size
        # the width, known before any image is read (a shard may hold no readable image)
        self.dim = int(self.texts(["a photo"]).shape[1])

    def _run(self, encode: Callable[[Any], Any], batch: Any) -> np.ndarray:
        import torch

        from training.train_utils import autocast

        with torch.no_grad(), autocast(self.device, self.amp):
            emb = encode(batch)
        emb = torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy()
        self.dim = emb.shape[1]
        return emb

    def images(self, images: Sequence[Image.Image]) -> np.ndarray:
        import torch

        from training.data import image_to_tensor, prepare_pixels

        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = torch.stack(
                [image_to_tensor(im, int(self.model.image_size)) for im in images[i : i + self.batch_size]]
            )
            out.append(self._run(self.model.encode_image, prepare_pixels(self.model, pixels.to(self.device))))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        from training.models import tokenize_for

        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = tokenize_for(self.model, texts[i : i + self.batch_size]).to(self.device)
            out.append(self._run(self.model.encode_text, tokens.long()))
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


def load_embedder(path: Path, batch_size: int, device: Any, amp: bool) -> Embedder:
    if path.is_dir():
        return BundleEmbedder(path, batch_size)
    if path.is_file():
        return CheckpointEmbedder(path, batch_size, device, amp)
    raise EmbedError(f"--model {path}: neither a bundle directory nor a checkpoint file")


# --------------------------------------------------------------------------------------------
# The job


def _write_npz(path: Path, **arrays: np.ndarray) -> None:
    from leanclip._fs import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        np.savez(f, **arrays)


def encode_shard(embedder: Embedder, shard: JobShard, out: Path, index: int) -> None:
    from training.data import ImageLoadError

    pictures: list[Image.Image] = []
    valid = np.zeros(len(shard.images), bool)
    for row, (name, opener) in enumerate(shard.images):
        try:
            pictures.append(opener())
            valid[row] = True
        except ImageLoadError as exc:
            log.warning("skipping unreadable image %s: %s", name, exc)
    emb = embedder.images(pictures)
    dim = emb.shape[1] if len(emb) else embedder.dim
    images = np.zeros((len(shard.images), dim), np.float32)
    images[valid] = emb
    names = np.asarray([n for n, _ in shard.images], dtype=str)
    if shard.texts:
        texts = embedder.texts([t for t, _ in shard.texts])
        _write_npz(
            out / "texts" / f"{index:05d}.npz",
            embeddings=texts,
            valid=np.ones(len(texts), bool),
            names=np.asarray([t for t, _ in shard.texts], dtype=str),
            image_names=np.asarray([n for _, n in shard.texts], dtype=str),
        )
    _write_npz(
        out / "images" / f"{index:05d}.npz", embeddings=images, valid=valid, names=names
    )  # written last: it marks the shard done


def build_index(out: Path, kind: str, n_shards: int, dtype: str) -> dict[str, Any] | None:
    """An index over the shard files of ``kind`` (keys: row numbers in shard order)."""
    import leanclip

    files = [out / kind / f"{s:05d}.npz" for s in range(n_shards)]
    files = [f for f in files if f.is_file()]
    if not files:
        return None
    index = None
    names: list[str] = []
    row = 0
    for f in files:
        with np.load(f) as data:
            emb, valid = data["embeddings"], data["valid"].astype(bool)
            names.extend(data["names"].tolist())
        if index is None:
            index = leanclip.Index(emb.shape[1], metric="ip", dtype=dtype)
        keys = np.arange(row, row + len(emb), dtype=np.uint64)[valid]
        if len(keys):
            index.add(keys, np.ascontiguousarray(emb[valid], np.float32))
        row += len(emb)
    assert index is not None
    index.save(out / f"{kind}.lci")
    return {"rows": row, "indexed": len(index), "names": names}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from training.distributed import DistInfo, barrier, init_distributed

    info: DistInfo = init_distributed(args.device)
    out = Path(args.out)
    if args.folder:
        shards = folder_shards(Path(args.folder), args.shard_size)
    elif args.karpathy:
        if not args.image_root:
            raise EmbedError("--karpathy needs --image-root")
        shards = karpathy_shards(Path(args.karpathy), Path(args.image_root), args.split, args.shard_size)
    else:
        shards = webdataset_shards(args.shards)
    embedder = load_embedder(Path(args.model), args.batch_size, info.device, info.device.type == "cuda")
    done = skipped = 0
    for s in range(info.rank, len(shards), info.world_size):
        if (out / "images" / f"{s:05d}.npz").is_file():
            skipped += 1  # resumable: finished shards are kept
            continue
        encode_shard(embedder, shards[s](), out, s)
        done += 1
        log.info("rank %d: shard %d of %d written", info.rank, s + 1, len(shards))
    barrier()
    summary: dict[str, Any] = {"shards": len(shards), "encoded": done, "reused": skipped}
    if info.is_main:
        manifest: dict[str, Any] = {"model": str(args.model), "shards": len(shards)}
        for kind in ("images", "texts"):
            built = build_index(out, kind, len(shards), args.index_dtype)
            if built is not None:
                manifest[kind] = {
                    "index": f"{kind}.lci",
                    "rows": built["rows"],
                    "indexed": built["indexed"],
                    "names": built["names"],
                }
                summary[kind] = {"rows": built["rows"], "indexed": built["indexed"]}
        from leanclip._fs import atomic_write

        with atomic_write(out / "manifest.json", "w") as f:
            json.dump(manifest, f)
    barrier()
    return summary


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a bundle directory or a training checkpoint")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", help="a folder of images (recursive)")
    src.add_argument("--karpathy", help="a Karpathy split json (with --image-root, --split)")
    src.add_argument("--shards", action="append", help="webdataset tar shards (brace patterns)")
    p.add_argument("--image-root")
    p.add_argument("--split", default="test")
    p.add_argument("--out", required=True)
    p.add_argument(
        "--shard-size",
        type=int,
        default=10000,
        help="images per job shard (folders and Karpathy splits; a webdataset tar is one shard)",
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--index-dtype", default="f32", choices=("f32", "f16", "i8"))
    p.add_argument("--device", default=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.shard_size < 1 or args.batch_size < 1:
        raise EmbedError("--shard-size and --batch-size must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    summary = run(args)
    from training.distributed import init_distributed

    if init_distributed(args.device).is_main:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
