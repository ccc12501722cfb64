"""Corpus embedding for large collections: encode image/caption shards with a model bundle or a
training checkpoint into sharded embedding files, streaming, in memory bounded by the batch.

    python -m training.embed --model runs/coco/s6_stage2/best.pt --folder photos/ --out emb/
    torchrun --nproc_per_node 8 -m training.embed --model bundles/s6 \\
        --shards "data/cc3m/{00000..00331}.tar" --out emb/cc3m --index ivf --nlist 4096
    python -m training.embed --model best.pt --karpathy dataset_coco.json \\
        --image-root data/coco --split test --out emb/coco_test --index exact

Sources: ``--folder`` (every image under it, sorted, cut into ``--shard-size`` pieces),
``--karpathy`` (a split's images and captions, cut the same way), ``--shards`` (webdataset tars:
one job shard per tar, jpg/png/webp + txt, streamed). Shard s is encoded by rank ``s % W``.
Images are decoded one by one on ``--decode-threads`` threads (JPEGs at reduced scale, bounded
by the model's input size), turned into model input at once, and encoded and written
``--batch-size`` at a time, so memory does not grow with the shard size. Each shard writes

- ``OUT/images/NNNNN.npy``: (n, d) float32 L2-normalized rows, one per image (zero where the
  image could not be read);
- ``OUT/texts/NNNNN.npy``: one row per caption (when the source has captions);
- ``OUT/shards/NNNNN.npz``: ``names`` and ``valid`` of the image rows, ``captions``,
  ``caption_image`` (the row of the caption's image in this shard) and ``caption_valid`` (False
  where that image is missing or unreadable), ``problems`` (what was skipped, and why). Written
  last and atomically: it marks the shard done, and a rerun skips done shards.

Bad inputs do not stop the job: a truncated, empty or non-tar shard keeps the samples read
before the damage, an unreadable or missing image gets a zero row marked invalid, a caption that
is not UTF-8 is skipped; each is recorded in the shard's ``problems`` and reported at the end
(``OUT/manifest.json`` lists them all). A damaged shard's outputs can be deleted to encode it
again once its file is fixed.

The index step is optional (``--index``): ``exact`` writes one exact ``Index`` per shard file,
``ivf`` one ``IVFIndex`` per shard sharing a quantizer trained on a seeded sample across all
shards; either way the ranks split the shard files, keys are global row numbers (shards in
order), invalid image rows are left out (every caption is indexed, whether or not its image
could be read), and
``leanclip.shards.ShardedIndex.load(OUT/"images.index", mmap=True)`` searches them as one."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
from PIL import Image

from leanclip.errors import LeanclipError

log = logging.getLogger("training.embed")

Opener = Callable[[Optional[int]], Image.Image]  # reduce_for -> image (raises ImageLoadError)


class EmbedError(LeanclipError, ValueError):
    """Bad arguments or inputs of the embedding job (named in the message)."""


# --------------------------------------------------------------------------------------------
# Sources: job shards as streams of records


@dataclass
class Record:
    name: str
    open: Opener
    captions: list[str] = field(default_factory=list)


@dataclass
class JobShard:
    """One job shard: its name (a tar, or the range of a folder / split) and a stream of
    records. ``problems`` collects what the stream skipped (filled while it is read)."""

    name: str
    records: Callable[[list[str]], Iterator[Record]]


def _open_path(path: Path) -> Opener:
    from leanclip.images import load_image

    return lambda reduce_for: load_image(path, reduce_for=reduce_for)


def _open_bytes(raw: bytes, where: str) -> Opener:
    from leanclip.images import decode_image

    def open_(reduce_for: Optional[int]) -> Image.Image:
        from leanclip.images import ImageLoadError

        if not raw:
            raise ImageLoadError(where, "empty image (0 bytes)")
        return decode_image(io.BytesIO(raw), where, reduce_for=reduce_for)

    return open_


def _missing(where: str) -> Opener:
    def fail(reduce_for: Optional[int]) -> Image.Image:
        from leanclip.images import ImageLoadError

        raise ImageLoadError(where, "no image in the sample")

    return fail


def image_names(folder: Path) -> list[str]:
    """``training.data.list_images(folder)`` as names relative to ``folder``, in its order: the
    job keeps one short string per photo and makes no ``Path`` per file (listing 10,000 photos
    with ``rglob`` left 5.5 MiB of RSS behind, most of what a 10,000-photo shard held beyond a
    100-photo one)."""
    from training.data import IMAGE_EXTENSIONS, DataError

    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    names = []
    for top, dirs, files in os.walk(folder):  # names only: no object per file outlives its step
        rel = os.path.relpath(top, folder)
        for name in dirs + files:  # as rglob, a folder named like an image counts
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                names.append(name if rel == os.curdir else os.path.join(rel, name))
    if not names:
        raise DataError(f"{folder}: no image files")
    names.sort(key=lambda n: n.replace(os.sep, "\0"))  # Path order: part by part
    return names


def folder_shards(folder: Path, shard_size: int) -> list[JobShard]:
    names = image_names(folder)

    def make(chunk: list[str]) -> Callable[[list[str]], Iterator[Record]]:
        return lambda problems: (Record(n, _open_path(folder / n)) for n in chunk)

    return [
        JobShard(f"{folder} [{i}:{i + shard_size}]", make(names[i : i + shard_size]))
        for i in range(0, len(names), shard_size)
    ]


def karpathy_shards(json_path: Path, image_root: Path, split: str, shard_size: int) -> list[JobShard]:
    from training.data import load_karpathy

    corpus = load_karpathy(json_path, image_root, split, check_images=False)

    def make(start: int) -> Callable[[list[str]], Iterator[Record]]:
        def records(problems: list[str]) -> Iterator[Record]:
            for i in range(start, min(start + shard_size, len(corpus))):
                captions = [corpus.captions[c] for c in corpus.image_captions[i]]
                yield Record(
                    str(corpus.images[i].relative_to(image_root)), _open_path(corpus.images[i]), captions
                )

        return records

    return [
        JobShard(f"{json_path} [{s}:{s + shard_size}]", make(s)) for s in range(0, len(corpus), shard_size)
    ]


def webdataset_shards(pattern: str | Sequence[str]) -> list[JobShard]:
    from training.data import _all_shards, expand_shards

    def make(tar: str) -> Callable[[list[str]], Iterator[Record]]:
        def records(problems: list[str]) -> Iterator[Record]:
            import webdataset as wds

            count = 0
            damage: list[BaseException] = []

            def damaged(exc: BaseException) -> bool:  # the tar itself: stop reading, keep what was read
                damage.append(exc)
                return False

            stream = wds.WebDataset(
                tar,
                shardshuffle=False,
                empty_check=False,
                nodesplitter=_all_shards,
                workersplitter=_all_shards,
                handler=damaged,
            )
            for sample in stream:
                count += 1
                key = str(sample.get("__key__"))
                raw = next((sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
                where = f"{tar}:{key}"
                captions = []
                caption = sample.get("txt")
                if isinstance(caption, bytes):
                    try:
                        caption = caption.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        problems.append(
                            f"{where}: caption skipped, not UTF-8 ({exc.reason} at byte {exc.start})"
                        )
                        caption = None
                if caption is not None and str(caption).strip():
                    captions.append(" ".join(str(caption).split()))
                yield Record(key, _open_bytes(raw, where) if raw is not None else _missing(where), captions)
            for exc in damage:
                problems.append(
                    f"{tar}: damaged shard, {count} samples before the damage kept ({type(exc).__name__}: {exc})"
                )

        return records

    return [JobShard(tar, make(tar)) for tar in expand_shards(pattern)]


# --------------------------------------------------------------------------------------------
# Models: a bundle (ONNX, leanclip.Encoder) or a training checkpoint (torch)


class Embedder:
    """``prepare`` turns a decoded image into the model's input at once (so only that input,
    not the decoded photo, waits for the batch); ``images`` encodes prepared inputs."""

    dim: int
    image_size: int

    def prepare(self, image: Image.Image) -> Any:
        return image

    def images(self, prepared: Sequence[Any]) -> np.ndarray:
        raise NotImplementedError

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError


class BundleEmbedder(Embedder):
    def __init__(self, path: Path, batch_size: int) -> None:
        import leanclip

        self.encoder = leanclip.Encoder(path)
        self.dim = int(self.encoder.dim)
        self.image_size = int(self.encoder.manifest.image.size)
        self.batch_size = batch_size

    def images(self, prepared: Sequence[Any]) -> np.ndarray:
        return self.encoder.encode_images(list(prepared), batch_size=self.batch_size)

    def texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.encoder.encode_text(list(texts), batch_size=self.batch_size)


class CheckpointEmbedder(Embedder):
    def __init__(self, path: Path, batch_size: int, device: Any, amp: bool) -> None:
        from training.models import load_model

        self.model = load_model(path).to(device).eval()
        self.device, self.amp, self.batch_size = device, amp, batch_size
        self.image_size = int(self.model.image_size)
        # the width, known before any image is read (a shard may hold no readable image)
        self.dim = int(self.texts(["a photo"]).shape[1])

    def _run(self, encode: Callable[[Any], Any], batch: Any) -> np.ndarray:
        import torch

        from training.train_utils import autocast

        with torch.no_grad(), autocast(self.device, self.amp):
            emb = encode(batch)
        return torch.nn.functional.normalize(emb.float(), dim=-1).cpu().numpy()

    def prepare(self, image: Image.Image) -> Any:
        from training.data import image_to_tensor

        return image_to_tensor(image, self.image_size)

    def images(self, prepared: Sequence[Any]) -> np.ndarray:
        import torch

        from training.data import prepare_pixels

        if not prepared:
            return np.zeros((0, self.dim), np.float32)
        pixels = torch.stack(list(prepared)).to(self.device)
        return self._run(self.model.encode_image, prepare_pixels(self.model, pixels))

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
# Writing rows as they come


class RowWriter:
    """(n, dim) float32 rows appended batch by batch to a side file, then turned into an
    ``.npy`` (streamed, atomically): n need not be known in advance, and no row stays in
    memory."""

    def __init__(self, path: Path, dim: int) -> None:
        self.path, self.dim, self.rows = path, dim, 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self.side = path.with_name(f".{path.name}.rows")
        self.file = open(self.side, "wb")  # noqa: SIM115 - closed in finish()

    def write(self, rows: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(rows, np.float32).tobytes())
        self.rows += len(rows)

    def finish(self) -> None:
        from leanclip._fs import atomic_write

        self.file.close()
        header = {"descr": "<f4", "fortran_order": False, "shape": (self.rows, self.dim)}
        with atomic_write(self.path) as out, open(self.side, "rb") as src:
            np.lib.format.write_array_header_1_0(out, header)
            while chunk := src.read(1 << 22):
                out.write(chunk)
        self.side.unlink()


def _prepare(embedder: Embedder, rec: Record) -> Any:
    """``rec``'s image decoded and turned into model input (the decoded photo lives only here),
    or the ``ImageLoadError`` saying why it could not be read."""
    from leanclip.images import ImageLoadError

    try:
        with rec.open(embedder.image_size) as img:
            return embedder.prepare(img)
    except ImageLoadError as exc:
        return exc


def encode_shard(
    embedder: Embedder,
    shard: JobShard,
    out: Path,
    index: int,
    batch_size: int,
    pool: Optional[Executor] = None,
) -> dict[str, Any]:
    """Stream one job shard through the model into its files (see the module docstring).
    ``pool``: threads that decode a batch's images at once (Pillow decodes without the GIL);
    the rows are the same as decoding them one by one."""
    from leanclip._fs import atomic_write
    from leanclip.images import ImageLoadError

    problems: list[str] = []
    images = RowWriter(out / "images" / f"{index:05d}.npy", embedder.dim)
    texts = RowWriter(out / "texts" / f"{index:05d}.npy", embedder.dim)
    names: list[str] = []
    valid: list[bool] = []
    captions: list[str] = []
    caption_image: list[int] = []
    pending: list[Record] = []

    def flush() -> None:
        prepared, ok = [], []
        decode = partial(_prepare, embedder)
        for rec, got in zip(pending, pool.map(decode, pending) if pool else map(decode, pending)):
            ok.append(not isinstance(got, ImageLoadError))
            if ok[-1]:
                prepared.append(got)
            else:
                problems.append(f"{rec.name}: unreadable image ({got})")
        rows = np.zeros((len(pending), embedder.dim), np.float32)
        if prepared:
            rows[np.asarray(ok)] = embedder.images(prepared)
        images.write(rows)
        batch_captions = []
        for rec in pending:
            for c in rec.captions:
                batch_captions.append(c)
                caption_image.append(len(names))
            names.append(rec.name)
        valid.extend(ok)
        if batch_captions:
            texts.write(embedder.texts(batch_captions))
            captions.extend(batch_captions)
        pending.clear()

    for record in shard.records(problems):
        pending.append(record)
        if len(pending) == batch_size:
            flush()
    flush()
    images.finish()
    texts.finish()
    valid_arr = np.asarray(valid, bool)
    cap_rows = np.asarray(caption_image, np.int64)
    meta = {
        "names": np.asarray(names, dtype=str),
        "valid": valid_arr,
        "captions": np.asarray(captions, dtype=str),
        "caption_image": cap_rows,
        "caption_valid": valid_arr[cap_rows] if len(cap_rows) else np.zeros(0, bool),
        "problems": np.asarray(problems, dtype=str),
        "source": np.asarray(shard.name),
    }
    for p in problems:
        log.warning("shard %d: %s", index, p)
    path = out / "shards" / f"{index:05d}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:  # written last: it marks the shard done
        np.savez(f, **meta)  # type: ignore[arg-type]
    return {"images": len(names), "captions": len(captions), "problems": len(problems)}


# --------------------------------------------------------------------------------------------
# The job


def _meta(out: Path, s: int) -> Any:
    return np.load(out / "shards" / f"{s:05d}.npz")


def build_indexes(
    out: Path, n_shards: int, args: argparse.Namespace, rank: int, world_size: int
) -> dict[str, Any]:
    """``OUT/images.index`` (and ``OUT/texts.index``): index shards over the embedding files,
    split over the ranks (see the module docstring)."""
    from leanclip.shards import EmbeddingShards, build_exact, build_ivf
    from training.distributed import barrier

    built: dict[str, Any] = {}
    for kind in ("images", "texts"):
        paths = [out / kind / f"{s:05d}.npy" for s in range(n_shards)]
        masks = []
        for s in range(n_shards):
            with _meta(out, s) as m:
                # a caption is a valid text row even when its image is missing or unreadable
                masks.append(
                    m["valid"].astype(bool) if kind == "images" else np.ones(len(m["captions"]), bool)
                )
        if not sum(len(m) for m in masks):
            continue
        shards = EmbeddingShards(paths, masks)
        target = out / f"{kind}.index"
        if args.index == "exact":
            built[kind] = build_exact(
                shards, target, dtype=args.index_dtype, rank=rank, world_size=world_size, barrier=barrier
            )
        else:
            valid = sum(int(m.sum()) for m in masks)
            nlist = args.nlist or max(1, min(4096, valid // 256))
            if valid < nlist:
                raise EmbedError(f"{kind}: {valid} valid rows, fewer than --nlist {nlist}")
            built[kind] = build_ivf(
                shards,
                target,
                nlist=nlist,
                dtype=args.index_dtype,
                pq=args.pq,
                seed=args.seed,
                rank=rank,
                world_size=world_size,
                barrier=barrier,
            )
    return built


def default_decode_threads() -> int:
    """This process's share of the machine's cores (torchrun's LOCAL_WORLD_SIZE processes per
    machine), 1 to 8: decoding a 12-megapixel JPEG at reduced scale is ~40 ms of one core, most
    of the job's CPU time with a small model."""
    per_machine = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, (os.cpu_count() or 1) // per_machine))


def run(args: argparse.Namespace) -> dict[str, Any]:
    from training.distributed import DistInfo, barrier, init_distributed

    info: DistInfo = init_distributed(args.device)
    out = Path(args.out)
    if args.folder:
        shards = folder_shards(Path(args.folder), args.shard_size)
    elif args.karpathy:
        shards = karpathy_shards(Path(args.karpathy), Path(args.image_root), args.split, args.shard_size)
    else:
        shards = webdataset_shards(args.shards)
    embedder = load_embedder(Path(args.model), args.batch_size, info.device, info.device.type == "cuda")
    done = skipped = 0
    threads = args.decode_threads or default_decode_threads()
    with ThreadPoolExecutor(threads) if threads > 1 else nullcontext() as pool:
        for s in range(info.rank, len(shards), info.world_size):
            if (out / "shards" / f"{s:05d}.npz").is_file():
                skipped += 1  # resumable: finished shards are kept
                continue
            encode_shard(embedder, shards[s], out, s, args.batch_size, pool)
            done += 1
            log.info("rank %d: shard %d of %d written", info.rank, s + 1, len(shards))
    barrier()
    summary: dict[str, Any] = {"shards": len(shards), "encoded": done, "reused": skipped}
    if args.index != "none":
        built = build_indexes(out, len(shards), args, info.rank, info.world_size)
        summary["index"] = {
            kind: {"vectors": b["vectors"], "path": f"{kind}.index"} for kind, b in built.items()
        }
    if info.is_main:
        manifest = _manifest(out, len(shards), args)
        from leanclip._fs import atomic_write

        with atomic_write(out / "manifest.json", "w") as f:
            json.dump(
                {**manifest, **({"index": summary["index"]} if "index" in summary else {})}, f, indent=1
            )
        summary["images"] = manifest["images"]
        summary["texts"] = manifest["texts"]
        summary["problems"] = len(manifest["problems"])
    barrier()
    return summary


def _manifest(out: Path, n_shards: int, args: argparse.Namespace) -> dict[str, Any]:
    """What the job wrote, shard by shard, and every problem it skipped (read from the shards'
    small metadata files, one at a time)."""
    shards, problems = [], []
    images = {"rows": 0, "valid": 0}
    texts = {"rows": 0, "with_valid_image": 0}
    for s in range(n_shards):
        with _meta(out, s) as m:
            entry = {
                "source": str(m["source"]),
                "row": images["rows"],
                "images": int(len(m["names"])),
                "captions": int(len(m["captions"])),
            }
            images["rows"] += entry["images"]
            images["valid"] += int(m["valid"].sum())
            texts["rows"] += entry["captions"]
            texts["with_valid_image"] += int(m["caption_valid"].sum())
            problems += [str(p) for p in m["problems"]]
            shards.append(entry)
    return {
        "model": str(args.model),
        "shards": shards,
        "images": images,
        "texts": texts,
        "problems": problems,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.embed", description=__doc__.split("\n\n")[0])
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
    p.add_argument(
        "--decode-threads",
        type=int,
        default=0,
        help="threads decoding images (default 0: this process's share of the cores, at most 8)",
    )
    p.add_argument(
        "--index",
        default="none",
        choices=("none", "exact", "ivf"),
        help="index shards to build (default none)",
    )
    p.add_argument("--index-dtype", default="f32", choices=("f32", "f16", "i8"))
    p.add_argument("--nlist", type=int, default=0, help="IVF lists (default: valid rows / 256, 1 to 4096)")
    p.add_argument("--pq", type=int, default=0, help="IVF 4-bit PQ sub-quantizers (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    return p


def _check(args: argparse.Namespace) -> None:
    if args.shard_size < 1 or args.batch_size < 1:
        raise EmbedError("--shard-size and --batch-size must be >= 1")
    if args.decode_threads < 0:
        raise EmbedError(f"--decode-threads must be >= 0, got {args.decode_threads}")
    if args.nlist < 0 or args.pq < 0:
        raise EmbedError("--nlist and --pq must be >= 0")
    if args.karpathy and not args.image_root:
        raise EmbedError("--karpathy needs --image-root")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        _check(args)
        summary = run(args)
    except (LeanclipError, ValueError, OSError) as exc:  # bad arguments or setup: one line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if summary.get("problems"):
        manifest = json.loads((Path(args.out) / "manifest.json").read_text())
        print(f"{len(manifest['problems'])} inputs skipped (listed in manifest.json):", file=sys.stderr)
        for problem in manifest["problems"]:
            print(f"  {problem}", file=sys.stderr)
    if "images" in summary:  # rank 0
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
