"""Datasets: COCO / Flickr30k Karpathy json, CC3M-style tsv, webdataset tar shards, and a plain
folder of images with a captions file.

A *paired corpus* (stage 2, evaluation) is a list of images on disk with one or more captions
each; ``caption_image[c]`` is the image index of caption c (its group: captions of the same image
are positives, never negatives). Stage 1 reads unpaired image and text collections.

Images are returned as float tensors in [0, 1] at one size; ``prepare_pixels`` resizes them to a
model's ``image_size`` and applies its mean/std, so one loader feeds teacher and student even when
they normalise differently. Unreadable images are skipped and counted, never fatal.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset, IterableDataset

from leanclip import images as leanclip_images
from leanclip.images import ImageLoadError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DataError(ValueError):
    """A dataset file is missing, malformed, or holds an empty caption."""


# --------------------------------------------------------------------------------------------
# Images


def load_image(path: str | os.PathLike | IO[bytes], where: str | None = None) -> Image.Image:
    """EXIF-rotated 8-bit RGB image through the product's one image loader (``leanclip.images``:
    the same size, aspect-ratio and decompression-bomb limits as the encoder and the gallery);
    raises ``ImageLoadError`` naming the file (or ``where``, for in-memory data) and the reason."""
    if isinstance(path, (str, os.PathLike)):
        return leanclip_images.load_image(path)
    return leanclip_images.decode_image(path, where or "<in-memory image>")


def image_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` (bicubic) and centre-crop: CLIP's eval transform,
    without normalisation. Returns float32 (3, size, size) in [0, 1]."""
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    array = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def prepare_pixels(model: nn.Module, images01: torch.Tensor) -> torch.Tensor:
    """[0,1] images (n,3,S,S) -> the model's input size and normalisation."""
    size = int(model.image_size)
    if images01.shape[-1] != size or images01.shape[-2] != size:
        images01 = F.interpolate(
            images01, size=(size, size), mode="bicubic", align_corners=False, antialias=True
        ).clamp(0, 1)
    mean = torch.tensor(model.image_mean, dtype=images01.dtype, device=images01.device)
    std = torch.tensor(model.image_std, dtype=images01.dtype, device=images01.device)
    return (images01 - mean[:, None, None]) / std[:, None, None]


# --------------------------------------------------------------------------------------------
# Paired corpora


@dataclass
class PairedCorpus:
    """Images with captions. ``caption_image[c]`` = index of the image caption c describes."""

    images: list[Path]
    captions: list[str]
    caption_image: np.ndarray
    name: str = ""
    image_captions: list[list[int]] = field(init=False)

    def __post_init__(self) -> None:
        self.caption_image = np.asarray(self.caption_image, dtype=np.int64)
        if len(self.captions) != len(self.caption_image):
            raise DataError(
                f"{self.name}: {len(self.captions)} captions but "
                f"{len(self.caption_image)} caption->image entries"
            )
        self.image_captions = [[] for _ in self.images]
        for c, i in enumerate(self.caption_image.tolist()):
            self.image_captions[i].append(c)
        for i, caps in enumerate(self.image_captions):
            if not caps:
                raise DataError(f"{self.name}: image {self.images[i]} has no caption")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, image_indices: Sequence[int]) -> "PairedCorpus":
        images, captions, owner = [], [], []
        for new, old in enumerate(image_indices):
            images.append(self.images[old])
            for c in self.image_captions[old]:
                captions.append(self.captions[c])
                owner.append(new)
        return PairedCorpus(images, captions, np.asarray(owner), name=self.name)


def _clean_caption(text: Any, where: str) -> str:
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"empty caption in {where}")
    return " ".join(text.split())


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")


def load_karpathy(
    json_path: str | os.PathLike,
    image_root: str | os.PathLike,
    split: str | Sequence[str] = "train",
    check_images: bool = True,
) -> PairedCorpus:
    """COCO / Flickr30k in Karpathy's split json (dataset_coco.json, dataset_flickr30k.json).
    ``split``: "train" (COCO's "restval" is added to it, the usual 113,287 images), "val",
    "test", or a list of split names. Images are at image_root/filepath/filename."""
    json_path, image_root = Path(json_path), Path(image_root)
    _require_file(json_path, "Karpathy split json")
    if not image_root.is_dir():
        raise FileNotFoundError(f"image root directory not found: {image_root}")
    try:
        data = json.loads(json_path.read_text())
        entries = data["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{json_path}: not a Karpathy split json ({exc})") from exc
    splits = {split} if isinstance(split, str) else set(split)
    if "train" in splits:
        splits.add("restval")
    images: list[Path] = []
    captions: list[str] = []
    owner: list[int] = []
    for entry in entries:
        if entry.get("split") not in splits:
            continue
        path = image_root / entry.get("filepath", "") / entry["filename"]
        if check_images and not path.is_file():
            raise FileNotFoundError(f"{json_path}: image listed but missing on disk: {path}")
        index = len(images)
        images.append(path)
        sentences = entry.get("sentences") or []
        if not sentences:
            raise DataError(f"{json_path}: image {entry['filename']} has no sentences")
        for s in sentences:
            captions.append(_clean_caption(s.get("raw"), f"{json_path} ({entry['filename']})"))
            owner.append(index)
    if not images:
        raise DataError(f"{json_path}: no images in split(s) {sorted(splits)}")
    return PairedCorpus(images, captions, np.asarray(owner), name=f"{json_path.stem}:{split}")


def load_tsv(
    path: str | os.PathLike,
    image_root: str | os.PathLike | None = None,
    image_key: str = "filepath",
    caption_key: str = "title",
    sep: str = "\t",
) -> PairedCorpus:
    """CC3M-style tsv with a header naming the image and caption columns (open_clip's
    ``--csv-img-key filepath --csv-caption-key title`` convention). Rows sharing an image path
    become one image with several captions. URLs must be downloaded first (img2dataset)."""
    path = Path(path)
    _require_file(path, "tsv file")
    root = Path(image_root) if image_root is not None else path.parent
    index_of: dict[Path, int] = {}
    images: list[Path] = []
    captions: list[str] = []
    owner: list[int] = []
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=sep, quoting=csv.QUOTE_NONE)
        fields = reader.fieldnames or []
        for key in (image_key, caption_key):
            if key not in fields:
                raise DataError(f"{path}: no column {key!r} in header {fields}")
        for line, row in enumerate(reader, start=2):
            ref = row[image_key]
            if ref.startswith(("http://", "https://")):
                raise DataError(
                    f"{path}:{line}: image column holds a URL ({ref}); download "
                    "the images first (e.g. img2dataset) and point to local files"
                )
            image = root / ref
            if image not in index_of:
                index_of[image] = len(images)
                images.append(image)
            captions.append(_clean_caption(row[caption_key], f"{path}:{line}"))
            owner.append(index_of[image])
    if not images:
        raise DataError(f"{path}: no rows")
    missing = [p for p in images[:1000] if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path}: {len(missing)} of the first {min(1000, len(images))} "
            f"images are missing, e.g. {missing[0]}"
        )
    return PairedCorpus(images, captions, np.asarray(owner), name=path.stem)


def load_folder(folder: str | os.PathLike, captions_file: str | os.PathLike | None = None) -> PairedCorpus:
    """A folder of images plus a captions file: either ``name<TAB>caption`` lines (a name may
    repeat for several captions) or a JSON object {name: caption or [captions]}. The default
    captions file is folder/captions.tsv or folder/captions.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    if captions_file is None:
        for candidate in ("captions.tsv", "captions.txt", "captions.json"):
            if (folder / candidate).is_file():
                captions_file = folder / candidate
                break
        else:
            raise FileNotFoundError(f"{folder}: no captions.tsv / captions.txt / captions.json")
    captions_file = Path(captions_file)
    _require_file(captions_file, "captions file")
    pairs: list[tuple[str, str]] = []
    if captions_file.suffix == ".json":
        mapping = json.loads(captions_file.read_text())
        if not isinstance(mapping, dict):
            raise DataError(f"{captions_file}: expected a JSON object {{image name: captions}}")
        for name, caps in mapping.items():
            for cap in [caps] if isinstance(caps, str) else caps:
                pairs.append((name, _clean_caption(cap, f"{captions_file} ({name})")))
    else:
        for line_no, line in enumerate(captions_file.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            name, sep_, cap = line.partition("\t")
            if not sep_:
                raise DataError(f"{captions_file}:{line_no}: expected 'image name<TAB>caption'")
            pairs.append((name.strip(), _clean_caption(cap, f"{captions_file}:{line_no}")))
    index_of: dict[str, int] = {}
    images: list[Path] = []
    captions: list[str] = []
    owner: list[int] = []
    for name, cap in pairs:
        if name not in index_of:
            image = folder / name
            if not image.is_file():
                raise FileNotFoundError(f"{captions_file}: caption for missing image {image}")
            index_of[name] = len(images)
            images.append(image)
        captions.append(cap)
        owner.append(index_of[name])
    if not images:
        raise DataError(f"{captions_file}: no captions")
    return PairedCorpus(images, captions, np.asarray(owner), name=folder.name)


def load_text_lines(path: str | os.PathLike) -> list[str]:
    """A text collection for stage 1: one caption per line, blank lines ignored."""
    path = Path(path)
    _require_file(path, "text file")
    texts = [" ".join(line.split()) for line in path.read_text(encoding="utf-8").splitlines()]
    texts = [t for t in texts if t]
    if not texts:
        raise DataError(f"{path}: no non-empty lines")
    return texts


def list_images(folder: str | os.PathLike) -> list[Path]:
    """All image files under a folder (recursive, sorted): an unpaired image collection."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise DataError(f"{folder}: no image files")
    return images


def load_paired(spec: Mapping[str, Any]) -> PairedCorpus:
    """A paired corpus from a config entry: {format: karpathy|tsv|folder, ...}."""
    spec = dict(spec)
    fmt = spec.pop("format", None)
    if fmt == "karpathy":
        return load_karpathy(spec["path"], spec["image_root"], spec.get("split", "train"))
    if fmt == "tsv":
        return load_tsv(
            spec["path"],
            spec.get("image_root"),
            spec.get("image_key", "filepath"),
            spec.get("caption_key", "title"),
            spec.get("sep", "\t"),
        )
    if fmt == "folder":
        return load_folder(spec["path"], spec.get("captions"))
    raise DataError(
        f"unknown paired dataset format {fmt!r} (karpathy, tsv, folder); "
        "webdataset shards are read as streams by stage 1"
    )


SHARD_INDEX_FORMAT = "leanclip-webdataset-index"


def read_shard_index(path: str | os.PathLike) -> dict[str, Any]:
    """A webdataset index written by ``training.prepare cc3m``: the shards that exist (paths
    relative to the index's folder) and the real number of samples in them."""
    path = Path(path)
    _require_file(path, "webdataset index (python -m training.prepare cc3m writes it)")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataError(f"{path}: not JSON ({exc})") from exc
    if not isinstance(index, dict) or index.get("format") != SHARD_INDEX_FORMAT:
        raise DataError(f"{path}: not a webdataset index (format {SHARD_INDEX_FORMAT!r})")
    return index


def resolve_webdataset(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A webdataset spec with ``index: shards.json`` turned into ``shards`` (the listed files)
    and ``num_samples`` (the counted samples); a spec with ``shards`` is returned as is."""
    spec = dict(spec)
    if spec.get("format") != "webdataset" or "index" not in spec:
        return spec
    index_path = Path(spec.pop("index"))
    index = read_shard_index(index_path)
    spec["shards"] = [str(index_path.parent / name) for name in index["shards"]]
    spec.setdefault("num_samples", int(index["num_samples"]))
    return spec


def spec_missing_files(spec: Mapping[str, Any]) -> list[str]:
    """The files and folders a data spec names that are not there (checked before a long run
    starts; the images inside a folder or a json are not opened)."""
    fmt = spec.get("format")
    wanted: list[tuple[str, str]] = []  # (path, "file" | "dir")
    if fmt == "karpathy":
        wanted = [(spec.get("path", ""), "file"), (spec.get("image_root", ""), "dir")]
    elif fmt in ("tsv", "lines"):
        wanted = [(spec.get("path", ""), "file")]
        if spec.get("image_root"):
            wanted.append((spec["image_root"], "dir"))
    elif fmt in ("folder", "images"):
        wanted = [(spec.get("path", ""), "dir")]
        if spec.get("captions"):
            wanted.append((spec["captions"], "file"))
    elif fmt == "webdataset":
        if "index" in spec:
            if not Path(spec["index"]).is_file():
                return [str(spec["index"])]
            try:
                shards = resolve_webdataset(spec)["shards"]
            except DataError as exc:
                return [f"{spec['index']} ({exc})"]
        else:
            import braceexpand

            patterns = (
                [spec["shards"]] if isinstance(spec.get("shards"), str) else list(spec.get("shards") or [])
            )
            shards = [f for pattern in patterns for f in braceexpand.braceexpand(pattern)]
        missing = [f for f in shards if "://" not in f and not Path(f).is_file()]
        if len(missing) > 3:
            return missing[:3] + [f"... and {len(missing) - 3} more shards"]
        return missing
    missing = []
    for path, kind in wanted:
        ok = Path(path).is_file() if kind == "file" else Path(path).is_dir()
        if not path or not ok:
            missing.append(str(path) or f"(no path in {dict(spec)})")
    return missing


# --------------------------------------------------------------------------------------------
# torch datasets. Each item carries its index so cached embeddings can be looked up; an
# unreadable image yields None and is dropped (and counted) by ``collate_skipping``.


class ImageFiles(Dataset):
    def __init__(self, paths: Sequence[Path], size: int) -> None:
        self.paths = list(paths)
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor] | None:
        try:
            return index, image_to_tensor(load_image(self.paths[index]), self.size)
        except ImageLoadError as exc:
            log.warning("skipping unreadable image: %s", exc)
            return None


class PairedImages(Dataset):
    """(image index, pixels, caption index) for a schedule of (image, caption) pairs."""

    def __init__(self, corpus: PairedCorpus, size: int) -> None:
        self.corpus = corpus
        self.size = size
        self.pairs: np.ndarray = np.stack(
            [np.arange(len(corpus)), [c[0] for c in corpus.image_captions]], axis=1
        )

    def set_pairs(self, pairs: np.ndarray) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor, int] | None:
        image_index, caption_index = (int(v) for v in self.pairs[position])
        try:
            pixels = image_to_tensor(load_image(self.corpus.images[image_index]), self.size)
        except ImageLoadError as exc:
            log.warning("skipping unreadable image: %s", exc)
            return None
        return image_index, pixels, caption_index


class SkippingBatch(dict):
    """A collated batch; ``skipped`` counts unreadable images dropped from it."""


def collate_skipping(items: Sequence[Any]) -> SkippingBatch:
    kept = [item for item in items if item is not None]
    batch = SkippingBatch(skipped=len(items) - len(kept), size=len(kept))
    if kept:
        columns = list(zip(*kept))
        batch["columns"] = [
            torch.stack(col)
            if isinstance(col[0], torch.Tensor)
            else list(col)
            if isinstance(col[0], str)
            else torch.tensor(col)
            for col in columns
        ]
    return batch


def _all_shards(urls: Any) -> Any:
    return urls


class WebDatasetImages(IterableDataset):
    """Images (and captions) streamed from webdataset tar shards, in shard order, so a resumed
    run can skip the samples already consumed. Keys: jpg/jpeg/png/webp for the image, txt for
    the caption. The stream is cut into global batches of ``global_batch`` samples; this rank
    decodes the rows ``share`` of each (see ``training.distributed.BatchLayout``), and DataLoader
    worker w the global batches b with ``b % num_workers == w``, so ranks and workers never decode
    the same image, and a DataLoader with ``batch_size`` = the share size yields exactly one
    step's share per batch, in step order, with any number of workers. Resumption skips the first
    ``skip`` samples (whole global batches) of the stream."""

    def __init__(
        self,
        urls: str | Sequence[str],
        size: int,
        skip: int = 0,
        global_batch: int = 1,
        share: slice = slice(0, 1),
    ) -> None:
        super().__init__()
        self.urls = urls
        self.size = size
        self.skip = skip
        self.global_batch = global_batch
        self.share = share

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, str] | None]:
        import webdataset as wds
        from torch.utils.data import get_worker_info

        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        # Every rank and worker reads all shards (tar reads are cheap) and decodes its share;
        # webdataset's own shard splitters would break the global sample positions.
        dataset = wds.WebDataset(
            self.urls,
            shardshuffle=False,
            empty_check=False,
            nodesplitter=_all_shards,
            workersplitter=_all_shards,
        )
        for position, sample in enumerate(dataset):
            if position < self.skip:
                continue
            batch, row = divmod(position, self.global_batch)
            if not self.share.start <= row < self.share.stop or batch % workers != worker_id:
                continue
            raw = next((sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
            caption = sample.get("txt", b"")
            caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
            if raw is None:
                log.warning("skipping webdataset sample %s without an image", sample.get("__key__"))
                yield None
                continue
            try:
                img = load_image(io.BytesIO(raw), where=f"webdataset sample {sample.get('__key__')}")
            except ImageLoadError as exc:
                log.warning("skipping sample %s: %s", sample.get("__key__"), exc)
                yield None
                continue
            yield position, image_to_tensor(img, self.size), " ".join(caption.split())


def read_webdataset_texts(urls: str | Sequence[str]) -> list[str]:
    """All non-empty captions (txt entries) of webdataset shards: a stage-1 text collection."""
    import webdataset as wds

    texts = []
    for sample in wds.WebDataset(
        urls, shardshuffle=False, empty_check=False, nodesplitter=_all_shards, workersplitter=_all_shards
    ):
        caption = sample.get("txt", b"")
        caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
        caption = " ".join(caption.split())
        if caption:
            texts.append(caption)
    if not texts:
        raise DataError(f"no captions in webdataset shards {urls}")
    return texts


def expand_shards(urls: str | Sequence[str]) -> list[str]:
    """Brace-expand shard patterns ('shards/{000..009}.tar') and check the files exist."""
    import braceexpand

    patterns = [urls] if isinstance(urls, str) else list(urls)
    files = [f for pattern in patterns for f in braceexpand.braceexpand(pattern)]
    missing = [f for f in files if "://" not in f and not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"webdataset shard not found: {missing[0]}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    return files


def epoch_permutation(n: int, seed: int, *salt: int) -> np.ndarray:
    """Deterministic shuffle of range(n) for one epoch (resumable: depends only on the seed)."""
    return np.random.default_rng([seed, *salt]).permutation(n)


def epoch_pairs(corpus: PairedCorpus, seed: int, *salt: int) -> np.ndarray:
    """One epoch of a paired corpus: every (image, caption) pair exactly once, shape
    (n_captions, 2). The epoch is laid out in rounds: round j holds the j-th caption (in a random
    order per image and epoch) of every image that has more than j captions, the images shuffled
    anew in each round, so no batch inside a round holds two captions of one image (they would be
    each other's false negatives); only a batch straddling two rounds can."""
    rng = np.random.default_rng([seed, *salt])
    captions = [rng.permutation(np.asarray(c, dtype=np.int64)) for c in corpus.image_captions]
    counts = np.asarray([len(c) for c in captions])
    rounds = []
    for j in range(int(counts.max()) if len(counts) else 0):
        images = rng.permutation(np.flatnonzero(counts > j))
        rounds.append(
            np.stack([images, np.asarray([captions[i][j] for i in images], dtype=np.int64)], axis=1)
        )
    return np.concatenate(rounds) if rounds else np.zeros((0, 2), np.int64)


__all__ = [
    "DataError",
    "ImageLoadError",
    "PairedCorpus",
    "load_karpathy",
    "load_tsv",
    "load_folder",
    "load_text_lines",
    "list_images",
    "load_paired",
    "ImageFiles",
    "PairedImages",
    "collate_skipping",
    "WebDatasetImages",
    "read_webdataset_texts",
    "expand_shards",
    "epoch_permutation",
    "epoch_pairs",
    "image_to_tensor",
    "prepare_pixels",
    "load_image",
]
