"""Data preparation: the archives a user already has -> the layout the training configs read.

    python -m training.prepare coco --karpathy caption_datasets.zip --images train2014.zip val2014.zip
    python -m training.prepare flickr30k --karpathy caption_datasets.zip --images flickr30k-images.tar.gz
    python -m training.prepare cc3m --shards /data/cc3m-img2dataset [--tsv Train_GCC-training.tsv] [--pairs]

Nothing is downloaded. Each command writes under ``--out`` (default ``data/coco``,
``data/flickr30k``, ``data/cc3m``) and ends with ``prepared.json``: what it found, what it
expected, what is missing or unreadable, and the sha256 of each input archive (compared with an
earlier run's, so a changed archive is noticed). Missing and unreadable files are reported and
left out (the written Karpathy json drops their entries; the shard index drops unreadable
shards), and the command goes on; it exits 1 when anything was left out, 0 otherwise.

* coco / flickr30k: ``--karpathy`` is Karpathy's ``caption_datasets.zip`` (or the json itself);
  ``--images`` are the image archives (zip or tar, any compression; COCO's train2014.zip and
  val2014.zip, Flickr30k's flickr30k-images archive) or folders. Images are extracted once
  (files already there with the same size are kept, so a second run resumes), then each image
  the json lists is opened (``PIL.Image.verify``). Expected counts: Karpathy's split.
* cc3m: ``--shards`` is img2dataset's webdataset output (``*.tar``: jpg + txt). Every shard is
  read through and its samples counted: ``shards.json`` holds the readable shards and the real
  sample count, which the stage-1 configs read (``images: {format: webdataset, index:
  data/cc3m/shards.json}``). ``captions.txt`` (stage-1 texts) holds the captions of
  ``--tsv`` (CC3M's Train_GCC-training.tsv, all 3.3M) or else those in the shards. ``--pairs``
  also extracts the images into ``images/`` and writes ``cc3m_local.tsv`` (filepath, title): the
  paired data of the TinyBERT baseline and the stage-1 inter-modal ablation (as much disk again as
  the shards).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from training.data import SHARD_INDEX_FORMAT

# Karpathy's split (caption_datasets.zip): images per split and captions in the json.
EXPECTED = {
    "coco": {
        "json": "dataset_coco.json",
        "images": 123_287,
        "captions": 616_767,
        "splits": {"train": 82_783, "restval": 30_504, "val": 5_000, "test": 5_000},
    },
    "flickr30k": {
        "json": "dataset_flickr30k.json",
        "images": 31_783,
        "captions": 158_915,
        "splits": {"train": 29_000, "val": 1_014, "test": 1_000},
    },
    "cc3m": {"captions": 3_318_333},  # CC3M training split; img2dataset gets fewer images (link rot)
}
IMAGE_DIRS = {"coco": ".", "flickr30k": "flickr30k-images"}  # image_root under --out, as the configs say
MAX_LISTED = 20  # examples of missing/unreadable files kept in prepared.json


class PrepareError(Exception):
    """An input that cannot be used at all (no Karpathy json, no shard, an unknown archive)."""


def _progress(items: Sequence[Any], description: str) -> Iterable[Any]:
    try:
        from rich.progress import track

        return track(items, description=description, transient=True, disable=not sys.stderr.isatty())
    except ImportError:  # rich is a dependency of the package; stay usable without it
        return items


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Archives


def _safe_member(name: str) -> Optional[PurePosixPath]:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        return None
    return path


def _members(archive: Path) -> Iterator[Tuple[PurePosixPath, int, Callable[[], bytes]]]:
    """(path, size, read) of every regular file of a zip or tar archive (unsafe paths skipped)."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                path = _safe_member(info.filename)
                if path is not None and not info.is_dir():
                    yield path, info.file_size, lambda info=info: zf.read(info)
        return
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            for member in tf:
                path = _safe_member(member.name)
                if path is not None and member.isfile():
                    yield path, member.size, lambda member=member: tf.extractfile(member).read()  # type: ignore[union-attr]
        return
    raise PrepareError(f"{archive}: not a zip or tar archive")


def extract(archive: Path, dest: Path, target_of: Callable[[PurePosixPath], Optional[PurePosixPath]]) -> int:
    """Extract the files of ``archive`` for which ``target_of`` gives a path (relative to
    ``dest``); files already there with the same size are kept (a second run resumes). Returns
    the number written."""
    written = 0
    for path, size, read in _members(archive):
        rel = target_of(path)
        if rel is None:
            continue
        target = dest.joinpath(*rel.parts)
        if target.is_file() and target.stat().st_size == size:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        tmp.write_bytes(read())
        tmp.replace(target)
        written += 1
    return written


def image_is_readable(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except Exception:
        return False


# --------------------------------------------------------------------------------------------
# COCO / Flickr30k


def _read_karpathy(source: Path, json_name: str) -> Dict[str, Any]:
    if not source.exists():
        raise PrepareError(f"Karpathy split not found: {source}")
    try:
        if source.is_file() and zipfile.is_zipfile(source):
            with zipfile.ZipFile(source) as zf:
                names = [n for n in zf.namelist() if PurePosixPath(n).name == json_name]
                if not names:
                    raise PrepareError(f"{source}: has no {json_name} (Karpathy's caption_datasets.zip has)")
                data = json.loads(zf.read(names[0]))
        else:
            data = json.loads(source.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise PrepareError(f"{source}: not a readable Karpathy split json ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise PrepareError(f"{source}: not a Karpathy split json (no 'images' list)")
    return data


def _previous(out: Path) -> Dict[str, Any]:
    try:
        return json.loads((out / "prepared.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _input_checksums(paths: Sequence[Path], previous: Dict[str, Any], report: Dict[str, Any]) -> None:
    """sha256 of each input archive, compared with what the previous run recorded."""
    before = previous.get("inputs", {})
    report["inputs"] = {}
    for path in paths:
        if path.is_file():
            digest = sha256_file(path)
            report["inputs"][path.name] = digest
            if before.get(path.name) not in (None, digest):
                report["warnings"].append(
                    f"{path.name}: sha256 differs from the previous prepare ({before[path.name]})"
                )


def prepare_karpathy(dataset: str, karpathy: Path, images: Sequence[Path], out: Path) -> Dict[str, Any]:
    expected = EXPECTED[dataset]
    out.mkdir(parents=True, exist_ok=True)
    report: Dict[str, Any] = {"dataset": dataset, "expected": expected, "warnings": []}
    previous = _previous(out)
    data = _read_karpathy(karpathy, expected["json"])
    image_root = out / IMAGE_DIRS[dataset]
    entries = data["images"]
    # every image goes where the json says: image_root/filepath/filename, wherever the archive had it
    wanted = {e["filename"]: PurePosixPath(e.get("filepath", ""), e["filename"]) for e in entries}

    def target_of(path: PurePosixPath) -> Optional[PurePosixPath]:
        return wanted.get(path.name)

    for source in images:
        if source.is_dir():  # a folder already extracted: link its images in place
            for p in sorted(source.rglob("*")):
                rel = wanted.get(p.name)
                if rel is not None and p.is_file() and not (image_root / rel).exists():
                    (image_root / rel).parent.mkdir(parents=True, exist_ok=True)
                    (image_root / rel).symlink_to(p.resolve())
        elif source.is_file():
            report.setdefault("extracted", {})[source.name] = extract(source, image_root, target_of)
        else:
            report["warnings"].append(f"{source}: not found (its images will be missing)")
    _input_checksums([karpathy, *[p for p in images if p.is_file()]], previous, report)

    missing: List[str] = []
    unreadable: List[str] = []
    kept = []
    for entry in _progress(entries, f"checking {dataset} images"):
        path = image_root / entry.get("filepath", "") / entry["filename"]
        if not path.is_file():
            missing.append(str(path.relative_to(out)))
        elif not image_is_readable(path):
            unreadable.append(str(path.relative_to(out)))
        else:
            kept.append(entry)
    splits: Dict[str, int] = {}
    for e in kept:
        splits[e.get("split", "?")] = splits.get(e.get("split", "?"), 0) + 1
    report.update(
        {
            "json_images": len(entries),
            "json_captions": sum(len(e.get("sentences") or []) for e in entries),
            "images": len(kept),
            "captions": sum(len(e.get("sentences") or []) for e in kept),
            "splits": splits,
            "missing": len(missing),
            "unreadable": len(unreadable),
            "missing_examples": missing[:MAX_LISTED],
            "unreadable_examples": unreadable[:MAX_LISTED],
            "json": str(out / expected["json"]),
            "image_root": str(image_root),
        }
    )
    if len(entries) != expected["images"]:
        report["warnings"].append(
            f"the split json lists {len(entries):,} images; Karpathy's {expected['json']} has {expected['images']:,}"
        )
    # the configs' json: the entries whose image is there and readable (the loaders need all)
    written = dict(data)
    written["images"] = kept
    (out / expected["json"]).write_text(json.dumps(written), encoding="utf-8")
    return _finish(out, report)


# --------------------------------------------------------------------------------------------
# CC3M


def scan_shard(shard: Path, keep_images: bool) -> Tuple[int, List[str], List[Tuple[str, str, bytes]]]:
    """(number of samples with an image, their captions, [(key, caption, image)] if keep_images)."""
    samples: Dict[str, Dict[str, bytes]] = {}
    with tarfile.open(shard) as tf:
        for member in tf:
            if not member.isfile():
                continue
            key, _, ext = member.name.rpartition(".")
            if ext in ("jpg", "jpeg", "png", "webp", "txt"):
                data = tf.extractfile(member).read()  # type: ignore[union-attr]
                if ext == "txt" or keep_images:
                    samples.setdefault(key, {})[ext] = data
                else:
                    samples.setdefault(key, {})["img"] = b""
    count, captions, pairs = 0, [], []
    for key, parts in samples.items():
        image_ext = next((e for e in ("jpg", "jpeg", "png", "webp", "img") if e in parts), None)
        if image_ext is None:
            continue
        count += 1
        caption = " ".join(parts.get("txt", b"").decode("utf-8", errors="replace").split())
        captions.append(caption)
        if keep_images:
            pairs.append((key, caption, parts[image_ext]))
    return count, captions, pairs


def prepare_cc3m(
    shards_dir: Path, out: Path, tsv: Optional[Path] = None, pairs: bool = False
) -> Dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    report: Dict[str, Any] = {"dataset": "cc3m", "expected": EXPECTED["cc3m"], "warnings": []}
    previous = _previous(out)
    shards = sorted(shards_dir.glob("*.tar")) if shards_dir.is_dir() else []
    if not shards:
        raise PrepareError(f"no webdataset shards (*.tar) in {shards_dir}")
    readable: List[Tuple[Path, int]] = []
    unreadable: List[str] = []
    shard_captions: List[str] = []
    pair_rows: List[Tuple[str, str]] = []
    if pairs:
        (out / "images").mkdir(exist_ok=True)
    for shard in _progress(shards, "reading cc3m shards"):
        try:
            count, captions, samples = scan_shard(shard, keep_images=pairs)
        except (tarfile.TarError, OSError, EOFError) as exc:
            unreadable.append(f"{shard.name}: {exc}")
            continue
        if count == 0:
            unreadable.append(f"{shard.name}: no samples with an image")
            continue
        readable.append((shard, count))
        shard_captions += [c for c in captions if c]
        for key, caption, image in samples:
            if not caption:
                continue
            rel = f"images/{shard.stem}_{PurePosixPath(key).name}.jpg"
            target = out / rel
            if not (target.is_file() and target.stat().st_size == len(image)):
                target.write_bytes(image)
            pair_rows.append((rel, caption))
    index = {
        "format": SHARD_INDEX_FORMAT,
        "shards": [str(p.resolve()) if p.parent.resolve() != out.resolve() else p.name for p, _ in readable],
        "num_samples": sum(n for _, n in readable),
        "per_shard": {p.name: n for p, n in readable},
    }
    (out / "shards.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    if tsv is not None:
        if not tsv.is_file():
            raise PrepareError(f"CC3M tsv not found: {tsv}")
        with tsv.open(encoding="utf-8", errors="replace") as f:
            texts = [" ".join(line.split("\t", 1)[0].split()) for line in f]
        texts = [t for t in texts if t]
        report["captions_from"] = str(tsv)
    else:
        texts = shard_captions
        report["captions_from"] = "the shards"
    (out / "captions.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    if pairs:
        with (out / "cc3m_local.tsv").open("w", encoding="utf-8") as f:
            f.write("filepath\ttitle\n")
            for rel, caption in pair_rows:
                f.write(f"{rel}\t{caption.replace(chr(9), ' ')}\n")
        report["pairs"] = len(pair_rows)
    _input_checksums([tsv] if tsv is not None else [], previous, report)
    report.update(
        {
            "shards": len(shards),
            "readable_shards": len(readable),
            "images": index["num_samples"],
            "captions": len(texts),
            "unreadable": len(unreadable),
            "unreadable_examples": unreadable[:MAX_LISTED],
            "missing": 0,
        }
    )
    if tsv is not None and len(texts) != EXPECTED["cc3m"]["captions"]:
        report["warnings"].append(
            f"{tsv.name} has {len(texts):,} captions; CC3M's training tsv has 3,318,333"
        )
    return _finish(out, report)


def _finish(out: Path, report: Dict[str, Any]) -> Dict[str, Any]:
    (out / "prepared.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def _print_report(report: Dict[str, Any], out: Path) -> None:
    print(f"{report['dataset']}: {report['images']:,} images, {report['captions']:,} captions -> {out}")
    for key in ("missing", "unreadable"):
        if report.get(key):
            examples = ", ".join(report.get(f"{key}_examples", [])[:5])
            print(f"  {report[key]:,} {key} (left out), e.g. {examples}")
    for w in report["warnings"]:
        print(f"  warning: {w}")
    print(f"  report: {out / 'prepared.json'}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="dataset", required=True)
    for name in ("coco", "flickr30k"):
        p = sub.add_parser(name, help=f"{name} from Karpathy's split and the image archives")
        p.add_argument("--karpathy", required=True, type=Path, help="caption_datasets.zip or the json")
        p.add_argument("--images", required=True, nargs="+", type=Path, help="image archives or folders")
        p.add_argument("--out", type=Path, default=Path(f"data/{name}"))
    p = sub.add_parser("cc3m", help="CC3M from img2dataset's webdataset shards")
    p.add_argument("--shards", required=True, type=Path, help="the folder of *.tar shards")
    p.add_argument("--tsv", type=Path, help="Train_GCC-training.tsv: captions.txt from all its captions")
    p.add_argument("--pairs", action="store_true", help="also images/ + cc3m_local.tsv (paired stage 1)")
    p.add_argument("--out", type=Path, default=Path("data/cc3m"))
    args = parser.parse_args(argv)
    try:
        if args.dataset == "cc3m":
            report = prepare_cc3m(args.shards, args.out, args.tsv, args.pairs)
        else:
            report = prepare_karpathy(args.dataset, args.karpathy, args.images, args.out)
    except PrepareError as exc:
        print(f"training.prepare: {exc}", file=sys.stderr)
        return 2
    _print_report(report, args.out)
    return 1 if report.get("missing") or report.get("unreadable") else 0


if __name__ == "__main__":
    sys.exit(main())
