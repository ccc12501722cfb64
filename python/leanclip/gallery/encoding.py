"""The encoding stage of an update: photos in batches (a batch the model refuses is encoded one
by one to find the photo at fault), video clips as their sampled frames; checkpointed as it
goes, so that a kill loses at most the work since the last checkpoint."""

from __future__ import annotations

from contextlib import closing
from functools import partial
from itertools import islice
from typing import Any, List, Optional, Tuple, Union

import numpy as np

from leanclip._pool import ordered_map
from leanclip.bundle import BundleError
from leanclip.gallery import duplicates
from leanclip.gallery import store as db
from leanclip.gallery.model import model_image_size
from leanclip.gallery.run import UpdateRun
from leanclip.gallery.scan import FoundFile
from leanclip.images import ImageLoadError, load_image

__all__ = ["encode_photos", "encode_videos"]


def encode_photos(run: UpdateRun, remaining: List[Tuple[FoundFile, str]]) -> None:
    """Decode and encode ``remaining`` (file, digest) in batches of ``options.batch_size``,
    storing each batch's vectors and looks; a file that cannot be decoded is recorded as
    failed. The photos are decoded on ``options.decode_threads`` threads, the next batch's
    while this one is encoded (at most one batch ahead: two batches of model-size images
    held at once); the results are the same as decoding them one by one. An interrupt
    between batches loses nothing already applied."""
    s, progress = run.state, run.progress
    opts = run.options
    size = model_image_size(run.encoder)
    total = len(remaining)
    if progress:
        progress("encode", 0, total)
    decode = partial(_decode, max_pixels=opts.max_pixels, size=size)
    decoded = ordered_map(decode, [f.abspath for f, _ in remaining], opts.decode_threads, opts.batch_size)
    with closing(decoded):  # a failure or interrupt stops the decoding threads
        done = 0
        for start in range(0, total, opts.batch_size):
            batch = remaining[start : start + opts.batch_size]
            s.clean = True  # an interrupt here loses nothing already applied
            images, ok_items, looks = [], [], {}
            for (f, digest), got in zip(batch, islice(decoded, len(batch))):
                if isinstance(got, ImageLoadError):
                    s.clean = False
                    run.record_failure(f, digest, got.reason)
                    s.clean = True
                    continue
                images.append(got[0])
                ok_items.append((f, digest))
                looks[f.rel] = got[1]
            vecs = _encode(run, images, ok_items)
            s.clean = False
            if vecs is not None and ok_items:
                run.store_vectors(ok_items, *vecs)
                run.summary.encoded += len(ok_items)
                run.store_looks([(run.rows[f.rel], looks[f.rel]) for f, _ in ok_items])
            s.clean = True
            for im in images:
                im.close()
            done += len(batch)
            s.since_checkpoint += len(batch)
            if progress:
                progress("encode", done, total)
            run.checkpoint_if_due()
    s.clean = False


def _decode(path: Any, *, max_pixels: int, size: int) -> Union[Tuple[Any, np.ndarray], ImageLoadError]:
    """The photo at ``path`` at the model's size and its look, or the ``ImageLoadError``
    saying why it cannot be read (returned, so that a failure is recorded in order)."""
    try:
        img = load_image(path, max_pixels=max_pixels, reduce_for=size)
    except ImageLoadError as exc:
        return exc
    return img, duplicates.look(img)


def encode_videos(run: UpdateRun, clips: List[Tuple[FoundFile, str]]) -> None:
    """Each clip's sampled frames (leanclip.video), encoded in batches like photos; a frame
    is a key of its own (the ``frames`` table: key, clip, time) and the clip's row holds
    its first frame's key. A clip is applied whole between checkpoints: a kill loses at
    most the clip being read. A clip that cannot be read is recorded as failed."""
    from leanclip.video import VideoError, sample_frames

    s, progress = run.state, run.progress
    size = model_image_size(run.encoder)
    for n, (f, digest) in enumerate(clips):
        if progress:
            progress("video", n, len(clips))
        old = run.rows.get(f.rel)
        if old is not None and old.key is not None:
            run.remove_keys([old.key])  # the previous version's frames
        added: List[int] = []
        try:
            batch: List[Tuple[float, Any]] = []
            for item in sample_frames(f.abspath, run.options.video_interval, reduce_for=size):
                batch.append(item)
                if len(batch) == run.options.batch_size:
                    added += _store_frames(run, f.rel, batch)
                    batch = []
            if batch:
                added += _store_frames(run, f.rel, batch)
        except VideoError as exc:
            if added:
                run.remove_keys(added[:1])
            run.rows.pop(f.rel, None)
            run.record_failure(f, digest, exc.reason)
            continue
        row = f.ok_row(digest, added[0])
        db.write_row(s.conn, row)
        if old is None:
            run.summary.added += 1
        else:
            run.summary.updated += 1
        run.rows[f.rel] = row
        run.summary.encoded += 1
        run.summary.frames += len(added)
        s.dirty = True
        s.since_checkpoint += max(1, len(added))
        run.checkpoint_if_due()
    if progress and clips:
        progress("video", len(clips), len(clips))


def _store_frames(run: UpdateRun, rel: bytes, batch: List[Tuple[float, Any]]) -> List[int]:
    """Encode and add one batch of a clip's frames; returns their keys."""
    from leanclip.video import VideoError

    s = run.state
    images = [im for _, im in batch]
    try:
        vecs, sims = _encode_batch(run, images)
    except Exception as exc:  # the model refused a frame: the clip fails with the reason
        raise VideoError(rel, f"encoder failed: {_describe(exc)}") from None
    finally:
        for im in images:
            im.close()
    finite = np.isfinite(vecs).all(axis=1) & (np.linalg.norm(vecs, axis=1) > 0)
    if not finite.all():
        raise VideoError(rel, "encoder produced a NaN or zero vector for a frame")
    keys = run.new_keys(len(batch))
    arr = np.asarray(keys, dtype=np.uint64)
    s.index.add(arr, vecs)
    if s.similar is not None and sims is not None:
        s.similar.add(arr, sims)
    s.conn.executemany(
        "INSERT INTO frames (key, path, t_ms) VALUES (?, ?, ?)",
        [(k, rel, int(round(t * 1000))) for k, (t, _) in zip(keys, batch)],
    )
    return keys


def _encode_batch(run: UpdateRun, images: List[Any]) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """(joint, image-to-image) vectors of ``images`` from one run of the image model; the
    second is None unless the gallery keeps image-to-image vectors."""
    enc = run.encoder
    if run.state.similar is None:
        return np.asarray(enc.encode_images(images), dtype=np.float32), None
    joint, sim = enc.encode_images_all(images)  # type: ignore[attr-defined]
    return np.asarray(joint, dtype=np.float32), np.asarray(sim, dtype=np.float32)


def _encode(
    run, images: List[Any], items: List[Tuple[FoundFile, str]]
) -> Optional[Tuple[np.ndarray, Optional[np.ndarray]]]:
    if not images:
        return None
    try:
        return _encode_batch(run, images)
    except BundleError:
        raise  # the model cannot run at all (it failed its run-check): no photo is at fault
    except Exception:
        if len(images) == 1:
            raise
    # a batch failed: encode one by one to find the file at fault
    vecs, sims, keep = [], [], []
    for im, item in zip(images, items):
        try:
            v, sv = _encode_batch(run, [im])
            vecs.append(v[0])
            if sv is not None:
                sims.append(sv[0])
            keep.append(item)
        except BundleError:
            raise
        except Exception as exc:  # the model refused this image; record, go on
            run.record_failure(item[0], item[1], f"encoder failed: {_describe(exc)}")
    items[:] = keep
    if not vecs:
        return None
    return np.stack(vecs), (np.stack(sims) if sims else None)


def _describe(exc: BaseException) -> str:
    """A non-empty reason from an exception (MemoryError() and others have an empty message)."""
    text = str(exc).strip()
    if isinstance(exc, MemoryError):
        return f"out of memory ({text})" if text else "out of memory"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
