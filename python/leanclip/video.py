"""Video clips: frames sampled at an interval, decoded by PyAV (``pip install 'leanclip[video]'``).

:func:`sample_frames` walks a clip's *keyframes* only (the decoder skips every other frame, so
an hour of 1080p costs seconds, not the minutes a full decode would) and yields the first
keyframe at or after each multiple of the interval, as a small RGB image (short side twice the
model's input, like photos). Frames are streamed one at a time: memory does not grow with the
clip's length. A clip whose keyframes are sparser than the interval yields one frame per
keyframe. A file that cannot be read as a video raises :class:`VideoError` with the reason.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Optional, Tuple

from leanclip._deps import require
from leanclip._fs import PathLike
from leanclip.errors import LeanclipError

__all__ = ["VIDEO_EXTENSIONS", "DEFAULT_INTERVAL", "VideoError", "sample_frames", "frame_at", "format_time"]

VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi"})
DEFAULT_INTERVAL = 2.0  # seconds between sampled frames
MAX_FRAMES = 100_000  # a clip yields at most this many frames (about 55 hours at 2 s)


class VideoError(LeanclipError, ValueError):
    """A video file could not be read; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: Any, reason: str) -> None:
        self.path = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
        self.reason = reason or "unknown error"
        super().__init__(f"cannot read video {self.path}: {self.reason}")


def _size(w: int, h: int, reduce_for: Optional[int]) -> Tuple[int, int]:
    if not reduce_for or min(w, h) <= 2 * reduce_for:
        return w, h
    scale = 2 * reduce_for / min(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def sample_frames(
    path: PathLike, interval: float = DEFAULT_INTERVAL, reduce_for: Optional[int] = 224
) -> Iterator[Tuple[float, Any]]:
    """``(seconds, PIL image)`` of the first keyframe at or after each multiple of
    ``interval`` (see the module docstring). Raises :class:`VideoError` for a file that is not
    a readable video (before or during the walk)."""
    av = require("av", "video", "indexing video clips (--video)")
    if interval <= 0:
        raise ValueError(f"interval must be > 0 seconds, got {interval}")
    try:
        container = av.open(os.fspath(path), mode="r")
    except (av.FFmpegError, OSError, UnicodeDecodeError, ValueError) as exc:
        raise VideoError(path, f"not a readable video ({_reason(exc)})") from None
    try:
        if not container.streams.video:
            raise VideoError(path, "has no video stream")
        stream = container.streams.video[0]
        stream.codec_context.skip_frame = "NONKEY"  # decode keyframes only
        stream.thread_type = "AUTO"
        next_t, count = 0.0, 0
        try:
            for frame in container.decode(stream):
                t = frame.time
                if t is None or t < next_t - 1e-6:
                    continue
                w, h = _size(frame.width, frame.height, reduce_for)
                image = frame.to_image(width=w, height=h)
                yield float(t), image
                count += 1
                if count >= MAX_FRAMES:
                    break
                next_t = (int(t / interval) + 1) * interval
        except (av.FFmpegError, EOFError, ValueError) as exc:
            raise VideoError(path, f"corrupt video data at frame {count + 1} ({_reason(exc)})") from None
        if count == 0:
            raise VideoError(path, "no frame could be decoded")
    finally:
        container.close()


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def format_time(seconds: float) -> str:
    """``m:ss`` or ``h:mm:ss``."""
    s = int(seconds)
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def frame_at(path: PathLike, seconds: float, reduce_for: Optional[int] = 256) -> Any:
    """The keyframe of the clip at ``path`` at ``seconds`` (the first at or after it, as
    :func:`sample_frames` sampled it), as a small PIL image; :class:`VideoError` if none."""
    av = require("av", "video", "showing video frames")
    try:
        with av.open(os.fspath(path), mode="r") as container:
            if not container.streams.video:
                raise VideoError(path, "has no video stream")
            stream = container.streams.video[0]
            stream.codec_context.skip_frame = "NONKEY"
            if stream.time_base and seconds > 0:
                container.seek(int(seconds / float(stream.time_base)), stream=stream, backward=True)
            for frame in container.decode(stream):
                if frame.time is not None and frame.time >= seconds - 1e-3:
                    w, h = _size(frame.width, frame.height, reduce_for)
                    return frame.to_image(width=w, height=h)
    except (av.FFmpegError, OSError, EOFError, ValueError) as exc:
        raise VideoError(path, f"cannot decode the frame at {seconds:.2f} s ({_reason(exc)})") from None
    raise VideoError(path, f"no frame at {seconds:.2f} s")
