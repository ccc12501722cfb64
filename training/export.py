"""Export a training checkpoint (or an open_clip model) to a leanclip bundle: the command line
over :mod:`leanclip.export`, which does the work and ships in the package.

    python -m training.export CHECKPOINT_OR_NAME OUT_DIR [--int8] [--pretrained TAG_OR_FILE]

``CHECKPOINT_OR_NAME`` is a leanclip training checkpoint (teacher or student, rebuilt by
``training.models.load_model``), an open_clip checkpoint file (``--arch`` names its
architecture, default ViT-B-32), or an open_clip model name (``--pretrained`` picks its weights:
a local file or a tag; without it the weights are random, which the manifest records).
``--int8`` also writes an int8 bundle beside OUT_DIR, at ``OUT_DIR-int8`` (a bundle has one
precision, recorded in its ``leanclip.json``). docs/export.md describes the checks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from torch import nn

from leanclip.bundle import BundleError, read_manifest
from leanclip.export import ExportError, export_model

__all__ = ["load_source", "main"]


def load_source(
    spec: str, *, pretrained: Optional[str] = None, arch: str = "ViT-B-32"
) -> Tuple[nn.Module, str, str]:
    """(model, name, source description) for a checkpoint path or an open_clip model name."""
    path = Path(spec)
    if path.is_file():
        from training import models

        try:
            model = models.load_model(path)
            kind = getattr(model, "leanclip_config", {}).get("kind", "model")
            return model, path.stem, f"leanclip {kind} checkpoint {path.name}"
        except models.CheckpointError:
            pass  # not a leanclip checkpoint: an open_clip one
        model = models.build_teacher(arch, pretrained=str(path))
        return model.eval(), f"{arch}-{path.stem}", f"open_clip {arch} checkpoint {path.name}"
    if os.sep in spec or spec.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise FileNotFoundError(f"checkpoint not found: {spec}")
    import open_clip

    if spec not in open_clip.list_models():
        raise ValueError(f"{spec!r} is neither a checkpoint file nor an open_clip model name")
    from training import models

    model = models.build_teacher(spec, pretrained=pretrained)
    weights = f"weights {pretrained}" if pretrained else "RANDOM weights (no --pretrained given)"
    return model.eval(), spec, f"open_clip {spec}, {weights}"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="leanclip/open_clip checkpoint file, or an open_clip model name")
    parser.add_argument("out_dir", help="bundle directory to write")
    parser.add_argument("--int8", action="store_true", help="also write an int8 bundle at OUT_DIR-int8")
    parser.add_argument("--pretrained", default=None, help="open_clip weights (tag or file) for a model name")
    parser.add_argument(
        "--arch", default="ViT-B-32", help="open_clip architecture of an open_clip checkpoint file"
    )
    parser.add_argument("--name", default=None, help="bundle name (default: from the source)")
    parser.add_argument("--no-check", action="store_true", help="skip the torch-vs-ONNX self-check")
    args = parser.parse_args(argv)
    try:
        model, name, source = load_source(args.source, pretrained=args.pretrained, arch=args.arch)
        out8 = Path(str(Path(args.out_dir)) + "-int8") if args.int8 else None
        out = export_model(
            model,
            args.out_dir,
            name=args.name or name,
            source=source,
            check=not args.no_check,
            int8_out_dir=out8,
        )
        for d in [out] + ([out8] if out8 else []):
            m = read_manifest(d)
            print(
                f"wrote {d} ({m.precision}, dim {m.embedding_dim}; self-check {json.dumps(m.extra.get('self_check'))})"
            )
    except (ExportError, BundleError, FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
