"""Work on a few threads, results in order, a bounded number computed ahead: how the gallery
decodes photos while its encoder runs. Pillow's decoders (JPEG, PNG, AVIF) and pillow-heif
release the GIL, so decoding on threads uses the machine's cores."""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Deque, Generator, Iterable, TypeVar

__all__ = ["default_decode_threads", "ordered_map"]

T = TypeVar("T")
R = TypeVar("R")


def default_decode_threads() -> int:
    """Threads that decode photos by default: the machine's cores, at most 4 (the encoder
    wants cores too, and a handful of decoders keep it fed)."""
    return max(1, min(4, os.cpu_count() or 1))


def ordered_map(
    fn: Callable[[T], R], items: Iterable[T], threads: int, ahead: int
) -> Generator[R, None, None]:
    """``fn`` of each of ``items``, yielded in order. With ``threads`` > 1 they run on that many
    threads, at most ``ahead`` (>= 1) of them started before the caller takes the last yielded
    one: what is held at once is bounded, and the threads work while the caller does. With
    ``threads`` <= 1 each runs in the calling thread when asked for, one at a time. An exception
    of ``fn`` is raised where its result would have been yielded. Closing the iterator (or an
    exception in the caller's loop, once it closes it) cancels what has not started and waits
    for what has."""
    if threads <= 1:
        yield from map(fn, items)
        return
    ahead = max(1, ahead)
    with ThreadPoolExecutor(threads, thread_name_prefix="leanclip-decode") as pool:
        pending: Deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) > ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
