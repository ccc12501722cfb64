"""Real sample photographs shipped inside installed Python packages, for the demo and benchmarks.

No network is needed: scikit-image, scikit-learn and matplotlib each ship a few real, freely
licensed photographs as package data. :func:`collect_sample_photos` copies them byte for byte
under stable file names and writes ``CREDITS.md`` naming every source and licence. Synthetic
images and test patterns (checkerboards, blobs, phantoms, colour wheels, text renderings,
texture crops) are deliberately left out: the demo searches photographs. So is scikit-image's
motion-blurred ``clock``: it is too blurred to show what it depicts.

A package that is not installed is skipped with a warning; so is a file a package no longer
ships. Only the standard library is needed at import time.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from leanclip._deps import MissingDependency, missing, package_dir
from leanclip._fs import PathLike

__all__ = [
    "SAMPLE_CREDITS",
    "SAMPLE_SOURCES",
    "GENERATED",
    "collect_sample_photos",
    "make_generated_samples",
    "sample_photo_names",
]


# file name in dest_dir -> (package, path of the file inside that package)
SAMPLE_SOURCES: Dict[str, Tuple[str, str]] = {
    "astronaut.png": ("skimage", "data/astronaut.png"),
    "camera.png": ("skimage", "data/camera.png"),
    "chelsea.png": ("skimage", "data/chelsea.png"),
    "coffee.png": ("skimage", "data/coffee.png"),
    "rocket.jpg": ("skimage", "data/rocket.jpg"),
    "motorcycle.png": ("skimage", "data/motorcycle_left.png"),
    "coins.png": ("skimage", "data/coins.png"),
    "hubble_deep_field.jpg": ("skimage", "data/hubble_deep_field.jpg"),
    "retina.jpg": ("skimage", "data/retina.jpg"),
    "china.jpg": ("sklearn", "datasets/images/china.jpg"),
    "flower.jpg": ("sklearn", "datasets/images/flower.jpg"),
    "grace_hopper.jpg": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
}

# file name -> credit record (taken from each package's own documentation of the file)
SAMPLE_CREDITS: Dict[str, Dict[str, str]] = {
    "astronaut.png": {
        "title": "Astronaut Eileen Collins (skimage.data.astronaut)",
        "package": "scikit-image",
        "source": "NASA Great Images database, https://flic.kr/p/r9qvLn",
        "license": "Public domain (no known copyright restrictions)",
    },
    "camera.png": {
        "title": "Man with a camera on a tripod (skimage.data.camera)",
        "package": "scikit-image",
        "source": "Photograph by Lav Varshney",
        "license": "CC0",
    },
    "chelsea.png": {
        "title": "Chelsea the cat (skimage.data.chelsea)",
        "package": "scikit-image",
        "source": "Photograph by Stefan van der Walt",
        "license": "CC0",
    },
    "coffee.png": {
        "title": "Coffee cup (skimage.data.coffee), courtesy of Pikolo Espresso Bar",
        "package": "scikit-image",
        "source": "Photograph by Rachel Michetti",
        "license": "CC0",
    },
    "rocket.jpg": {
        "title": "Launch of DSCOVR on a Falcon 9 (skimage.data.rocket)",
        "package": "scikit-image",
        "source": "SpaceX Photos, https://www.flickr.com/photos/spacexphotos/16511594820/",
        "license": "Public domain (released by SpaceX)",
    },
    "motorcycle.png": {
        "title": "Motorcycle, left view of a stereo pair (skimage.data.stereo_motorcycle)",
        "package": "scikit-image",
        "source": "Middlebury 2014 stereo benchmark (Scharstein et al., Middlebury College), "
        "down-sampled by scikit-image",
        "license": "Free for research use as distributed with scikit-image (see its "
        "documentation of stereo_motorcycle)",
    },
    "coins.png": {
        "title": "Greek coins from Pompeii (skimage.data.coins)",
        "package": "scikit-image",
        "source": "Brooklyn Museum Collection, "
        "https://www.brooklynmuseum.org/opencollection/archives/image/51611",
        "license": "No known copyright restrictions",
    },
    "hubble_deep_field.jpg": {
        "title": "Hubble eXtreme Deep Field (skimage.data.hubble_deep_field)",
        "package": "scikit-image",
        "source": "NASA / HubbleSite, http://hubblesite.org/newscenter/archive/releases/2012/37/image/a/",
        "license": "Public domain (NASA media guidelines)",
    },
    "retina.jpg": {
        "title": "Fundus photograph of a normal left eye (skimage.data.retina)",
        "package": "scikit-image",
        "source": "Mikael Häggström, Wikimedia Commons, "
        "https://commons.wikimedia.org/wiki/File:Fundus_photograph_of_normal_left_eye.jpg",
        "license": "CC0 1.0",
    },
    "china.jpg": {
        "title": "Summer Palace, Beijing (sklearn.datasets.load_sample_images: china.jpg)",
        "package": "scikit-learn",
        "source": "danielbuechele on Flickr, https://www.flickr.com/photos/danielbuechele/6061409035/",
        "license": "CC BY 2.0, https://creativecommons.org/licenses/by/2.0/",
    },
    "flower.jpg": {
        "title": "Flower (sklearn.datasets.load_sample_images: flower.jpg)",
        "package": "scikit-learn",
        "source": "vultilion on Flickr, https://www.flickr.com/photos/vultilion/6056698931/",
        "license": "CC BY 2.0, https://creativecommons.org/licenses/by/2.0/",
    },
    "grace_hopper.jpg": {
        "title": "Rear Admiral Grace Hopper (matplotlib sample_data/grace_hopper.jpg)",
        "package": "matplotlib",
        "source": "U.S. Navy official portrait, shipped with matplotlib's sample data",
        "license": "Public domain (work of the U.S. federal government)",
    },
}


def sample_photo_names() -> List[str]:
    """The stable file names :func:`collect_sample_photos` can produce, in a fixed order."""
    return list(SAMPLE_SOURCES)


def _credits_markdown(names: List[str]) -> str:
    lines = [
        "# Sample photo credits",
        "",
        "These photographs were copied unchanged from the package data of installed Python",
        "packages by `leanclip.samples.collect_sample_photos`.",
        "",
        "| file | photo | package | source | licence |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        c = SAMPLE_CREDITS[name]
        lines.append(f"| {name} | {c['title']} | {c['package']} | {c['source']} | {c['license']} |")
    return "\n".join(lines) + "\n"


# files make_generated_samples writes -> what they show
GENERATED: Dict[str, str] = {
    "coffee_phone.heic": "coffee.png saved as a phone would (HEIC, with an EXIF capture date of "
    "2024-07-14): a phone format, and a near-duplicate of coffee.png",
    "receipt.png": 'a rendered receipt, for text in photos (`text:"total 42.50"`)',
    "clip.mp4": "a 6-second clip: rocket.jpg for 3 s, then chelsea.png (the cat) for 3 s, for video search",
}
RECEIPT_LINES = ("CAFE LEANCLIP", "2 x espresso   5.00", "1 x croissant  2.50", "TOTAL 42.50 EUR")


def make_generated_samples(dest_dir: PathLike) -> List[Path]:
    """Write the demo's generated files (:data:`GENERATED`) into ``dest_dir``: a HEIC made from
    the sample coffee photo (skipped with a warning without pillow-heif or that photo) and a
    receipt rendered with a font Debian ships (else Pillow's own). Returns the paths written."""
    from PIL import Image, ImageDraw, ImageFont

    from leanclip.images import register_formats

    dest = Path(dest_dir)
    out: List[Path] = []
    coffee = dest / "coffee.png"
    register_formats()
    if "HEIF" not in Image.SAVE:
        warnings.warn(
            "leanclip.samples: pillow-heif is not installed (pip install 'leanclip[heif]'); no HEIC sample",
            UserWarning,
            stacklevel=2,
        )
    elif coffee.is_file():
        exif = Image.Exif()
        exif.get_ifd(0x8769)[0x9003] = "2024:07:14 09:30:00"
        with Image.open(coffee) as im:
            im.convert("RGB").save(dest / "coffee_phone.heic", quality=80, exif=exif.tobytes())
        out.append(dest / "coffee_phone.heic")
    font_path = Path("/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf")
    font = ImageFont.truetype(str(font_path), 30) if font_path.is_file() else ImageFont.load_default(size=30)
    receipt = Image.new("RGB", (560, 360), (250, 248, 240))
    draw = ImageDraw.Draw(receipt)
    for i, line in enumerate(RECEIPT_LINES):
        draw.text((40, 40 + 72 * i), line, fill=(20, 20, 20), font=font)
    receipt.save(dest / "receipt.png")
    out.append(dest / "receipt.png")
    clip = _make_clip(dest, [dest / "rocket.jpg", dest / "chelsea.png"], seconds_each=3)
    if clip is not None:
        out.append(clip)
    credits = dest / "CREDITS.md"
    if credits.is_file():
        text = credits.read_text(encoding="utf-8").split(_MADE)[0].rstrip("\n") + "\n"
        lines = [f"- {p.name}: {GENERATED[p.name]}" for p in out]
        credits.write_text(text + "\n" + _MADE + "\n\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return out


def _make_clip(dest: Path, stills: List[Path], seconds_each: int) -> Optional[Path]:
    """``dest/clip.mp4`` showing each still for ``seconds_each`` seconds (MPEG-4, 10 fps, a
    keyframe a second); None (with a warning) without PyAV or the stills."""
    if missing(["av"]):
        warnings.warn(
            "leanclip.samples: PyAV is not installed (pip install 'leanclip[video]'); no video sample",
            UserWarning,
            stacklevel=3,
        )
        return None
    if not all(p.is_file() for p in stills):
        return None
    import av
    from PIL import Image

    path = dest / "clip.mp4"
    out = av.open(str(path), "w")
    stream = out.add_stream("mpeg4", rate=10)
    stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
    stream.codec_context.gop_size = 10
    for still in stills:
        with Image.open(still) as im:
            frame = av.VideoFrame.from_image(im.convert("RGB").resize((320, 240)))
        for _ in range(10 * seconds_each):
            for packet in stream.encode(frame):
                out.mux(packet)
    for packet in stream.encode():
        out.mux(packet)
    out.close()
    return path


_MADE = "Made by `leanclip demo` (`leanclip.samples.make_generated_samples`), not copied from a package:"


def collect_sample_photos(dest_dir: PathLike) -> List[Path]:
    """Copy the available sample photos into ``dest_dir`` and write ``CREDITS.md`` there.

    Returns the paths of the copied photos in the order of :func:`sample_photo_names`.
    Packages that are not installed (or no longer ship a file) are skipped with a
    ``UserWarning``; :class:`leanclip._deps.MissingDependency` (naming the ``demo`` extra) if no
    photo at all could be found.
    """
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)
    roots: Dict[str, Optional[Path]] = {}
    copied: List[Path] = []
    for name, (package, relative) in SAMPLE_SOURCES.items():
        if package not in roots:
            roots[package] = package_dir(package)
            if roots[package] is None:
                warnings.warn(
                    f"leanclip.samples: package {package!r} is not installed; skipping its sample photos",
                    UserWarning,
                    stacklevel=2,
                )
        root = roots[package]
        if root is None:
            continue
        source = root / relative
        if not source.is_file():
            warnings.warn(
                f"leanclip.samples: {package} does not ship {relative} here ({source}); skipping {name}",
                UserWarning,
                stacklevel=2,
            )
            continue
        target = dest / name
        # copy2 keeps the bytes (and so any JPEG/PNG metadata) exactly as shipped
        shutil.copy2(source, target)
        copied.append(target)
    if not copied:
        raise MissingDependency(
            "leanclip demo",
            "demo",
            [p for p, root in roots.items() if root is None],
            need="the sample photos of scikit-image, scikit-learn or matplotlib (none found)",
        )
    (dest / "CREDITS.md").write_text(_credits_markdown([p.name for p in copied]), encoding="utf-8")
    return copied
