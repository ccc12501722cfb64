"""Tiny model bundles for tests: a random open_clip-shaped CLIP exported through export_bundle.

    from tests._fixtures_bundle import make_tiny_bundle
    bundle = make_tiny_bundle(tmp_path / "bundle")          # fp32, dim 32, 32 px images
    enc = leanclip.Encoder(bundle)

Exports take a few seconds, so ``tiny_bundle`` / ``tiny_bundle_int8`` are session fixtures
(import them into a test module or conftest to use them). Building needs torch and open_clip;
*using* the bundle needs only the Encoder's dependencies.
"""

from __future__ import annotations

import atexit
import shutil
from pathlib import Path
from typing import Any, Dict, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY_IMAGE_SIZE = 32
_CACHE: Dict[Tuple[Any, ...], Path] = {}


def make_tiny_clip(dim: int = 32, seed: int = 0, image_size: int = TINY_IMAGE_SIZE) -> Any:
    """A random open_clip ``CLIP`` (ViT image tower, causal text tower, vocab 49408, context 77),
    small enough to export in seconds, with the training-side interface attributes set."""
    import open_clip
    import torch

    torch.manual_seed(seed)
    model = open_clip.CLIP(
        embed_dim=dim,
        vision_cfg=open_clip.CLIPVisionCfg(
            image_size=image_size, layers=1, width=64, patch_size=8, head_width=32
        ),
        text_cfg=open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=2),
    ).eval()
    model.image_size = image_size
    model.image_mean = tuple(open_clip.OPENAI_DATASET_MEAN)
    model.image_std = tuple(open_clip.OPENAI_DATASET_STD)
    model.context_length = 77
    return model


def make_tiny_bundle(
    out_dir: Any, *, int8: bool = False, dim: int = 32, seed: int = 0, name: str = "tiny-clip"
) -> Path:
    """Export a tiny random CLIP to a valid bundle at ``out_dir`` (fp32, or int8 with ``int8=True``).

    Results are cached per (int8, dim, seed, name) within a test session and copied, so repeated
    calls cost a copy, not an export."""
    out = Path(out_dir)
    key = (int8, dim, seed, name)
    cached = _CACHE.get(key)
    if cached is not None and cached.is_dir():
        if out.exists():
            if any(out.iterdir()) and not (out / "leanclip.json").is_file():
                raise FileExistsError(f"{out} is a non-empty directory that is not a leanclip bundle")
            shutil.rmtree(out)
        shutil.copytree(cached, out)
        return out
    import tempfile

    from leanclip.export import export_model

    model = make_tiny_clip(dim=dim, seed=seed)
    export_model(model, out, name=name, source=f"tests: random tiny open_clip CLIP (seed {seed})", int8=int8)
    root = Path(tempfile.mkdtemp(prefix="leanclip-tiny-bundle-"))
    atexit.register(shutil.rmtree, root, True)
    keep = root / "bundle"
    shutil.copytree(out, keep)
    _CACHE[key] = keep
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only-by-convention fp32 tiny bundle shared by a test session (copy it to alter it)."""
    return make_tiny_bundle(tmp_path_factory.mktemp("tiny") / "bundle")


@pytest.fixture(scope="session")
def tiny_bundle_int8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("tiny8") / "bundle", int8=True)
