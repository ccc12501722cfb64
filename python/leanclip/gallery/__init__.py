"""Gallery: a photo folder kept in step with a SQLite database and a saved leanclip Index.

The package, by concern (imports point down this list's groups, never up):

* :mod:`~leanclip.gallery.api` — the :class:`Gallery` (open, read, search; ``update()``)
* searching, one module per step a query takes: :mod:`~leanclip.gallery.query` (the syntax,
  :func:`parse_query`, :class:`Term`, and results, :class:`Hit`), :mod:`~leanclip.gallery.filters`
  (paths, dates, kind and ``text:`` terms), :mod:`~leanclip.gallery.vectors` (the query's vector),
  :mod:`~leanclip.gallery.hits` (the index searched to hits); :mod:`~leanclip.gallery.reader`
  holds what the reads share (connection, cached indexes, model)
* updating: :mod:`~leanclip.gallery.sync` (``run_update``: the driver and the crash-consistent
  commit protocol), :mod:`~leanclip.gallery.run` (one run's options, state, summary, writes and
  checkpoints), its stages :mod:`~leanclip.gallery.scan`, :mod:`~leanclip.gallery.reconcile`,
  :mod:`~leanclip.gallery.encoding` and :mod:`~leanclip.gallery.upkeep`
* :mod:`~leanclip.gallery.store` — the SQLite store: layout, schema, typed rows
* :mod:`~leanclip.gallery.kinds` — the index kinds (exact ``Index`` or ``IVFIndex``; ``auto``),
  the IVF layout they leave to ``IVFIndex`` and the conversions between them
* :mod:`~leanclip.gallery.duplicates`, :mod:`~leanclip.gallery.texts` — near-duplicate groups;
  the text read in photos
* :mod:`~leanclip.gallery.model` — what the gallery needs of a model
* :mod:`~leanclip.gallery.errors` — its errors (all :class:`leanclip.errors.LeanclipError`)

Images are decoded by :mod:`leanclip.images`, the loader the encoder uses too.

Query syntax (``Gallery.search``): unsigned words form one phrase; ``+term`` adds and ``-term``
subtracts a term; quotes group words; ``img:PATH`` makes a term an image::

    beach at night +sunset -people +img:photos/dog.jpg -"city lights"
"""

from __future__ import annotations

from leanclip.gallery.api import Gallery
from leanclip.gallery.errors import GalleryBusyError, GalleryError, ModelMismatchError
from leanclip.gallery.kinds import AUTO_IVF_THRESHOLD, INDEX_CHOICES
from leanclip.gallery.model import EncoderLike
from leanclip.gallery.query import Hit, Term, parse_query
from leanclip.gallery.run import Progress, UpdateState, UpdateSummary
from leanclip.gallery.scan import IMAGE_EXTENSIONS
from leanclip.gallery.store import DB_NAME, SCHEMA, SCHEMA_VERSION, STORE_DIRNAME, FileRow
from leanclip.images import DEFAULT_MAX_PIXELS

__all__ = [
    "AUTO_IVF_THRESHOLD",
    "INDEX_CHOICES",
    "DB_NAME",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "STORE_DIRNAME",
    "EncoderLike",
    "FileRow",
    "Gallery",
    "GalleryBusyError",
    "GalleryError",
    "Hit",
    "ModelMismatchError",
    "Progress",
    "Term",
    "UpdateState",
    "UpdateSummary",
    "parse_query",
]
