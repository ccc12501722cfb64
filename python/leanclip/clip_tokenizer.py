"""CLIP's BPE tokenizer as a Hugging Face ``tokenizer.json``.

Torch-free (tokenizers; ftfy's tables are read when ftfy is installed). The :class:`leanclip.Encoder` tokenizes with the ``tokenizers`` library, so a bundle
ships the CLIP BPE in that format. :func:`build_clip_tokenizer` builds it from open_clip's own
``bpe_simple_vocab_16e6.txt.gz`` so that its ids equal ``open_clip.tokenize`` ids:

* open_clip cleans text with ``ftfy.fix_text``, ``html.unescape`` twice, collapses whitespace
  (``str.split``) and lower-cases. The tokenizer's normalizer reproduces what ftfy does to
  well-formed text, from ftfy's own tables: C1 controls read as Windows-1252, control
  characters removed, Latin ligatures and
  full/half-width forms replaced, curly quotes straightened, NFC; then Python's whitespace set
  collapsed to one space, stripped, lower-cased. HTML unescaping cannot be expressed as a
  normalizer: :func:`clip_clean` (stdlib ``html``) does it and the Encoder calls it first.
* Pre-tokenization uses open_clip's regex (letters runs, single digits, punctuation runs,
  English contractions), then GPT-2 byte-to-unicode mapping; the BPE model appends ``</w>`` to
  the last symbol of each word, as open_clip does.
* ``<start_of_text> ... <end_of_text>`` are added by the post-processor; with truncation enabled
  at the context length (the Encoder does this), the text is cut to ``context_length - 2``
  tokens and ``<end_of_text>`` is kept last, exactly like open_clip's truncation.

Residual differences (documented, tested where they are decidable): ftfy's mojibake repair
(``fix_encoding`` and friends, e.g. ``"sÃ³"`` -> ``"só"``) and terminal-escape removal are not
reproduced; ``<start_of_text>``/``<end_of_text>`` written inside a punctuation run (``"!<end_of_text>"``)
become special tokens here but not in open_clip.
"""

from __future__ import annotations

import argparse
import gzip
import html
import sys
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple, Union

if TYPE_CHECKING:  # tokenizers is imported where it is used: the Encoder imports clip_clean only
    from tokenizers import Tokenizer, normalizers

SOT = "<start_of_text>"
EOT = "<end_of_text>"
VOCAB_SIZE = 49408
# open_clip's word regex (tokenizer.py), minus the special-token alternatives which the
# tokenizer handles as added tokens.
CLIP_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def default_bpe_path() -> Path:
    """open_clip's shipped merges file (installed with open_clip_torch)."""
    from leanclip._deps import package_dir

    root = package_dir("open_clip")  # not imported: importing open_clip imports torch
    if root is None:
        raise FileNotFoundError("open_clip is not installed: pass bpe_path= to build_clip_tokenizer")
    path = root / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"open_clip's BPE merges file is missing: {path}")
    return path


def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2/CLIP reversible byte -> printable-unicode map (same order as open_clip)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _read_merges(bpe_path: Path) -> List[Tuple[str, str]]:
    try:
        lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ValueError(f"{bpe_path}: not a gzip'd CLIP BPE merges file ({exc})") from None
    # same slice as open_clip: skip the header line, keep 49152 - 256 - 2 merges
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    bad = [i for i, m in enumerate(merges) if len(m) != 2]
    if bad or len(merges) != 49152 - 256 - 2:
        raise ValueError(f"{bpe_path}: expected {49152 - 256 - 2} merge pairs, got a malformed file")
    return merges  # type: ignore[return-value]


def _python_whitespace() -> str:
    # str.split() splits on exactly these characters; \s in other regex engines differs
    # (e.g. \x1c-\x1f), so spell the class out.
    return "".join(chr(c) for c in range(0x110000) if chr(c).isspace())


def _char_class(chars: str) -> str:
    return "[" + "".join(f"\\x{{{ord(c):x}}}" for c in chars) + "]"


def _ranges_class(codes: List[int]) -> str:
    parts = []
    start = prev = codes[0]
    for c in codes[1:] + [-1]:
        if c == prev + 1:
            prev = c
            continue
        parts.append(f"\\x{{{start:x}}}" if start == prev else f"\\x{{{start:x}}}-\\x{{{prev:x}}}")
        start = prev = c
    return "[" + "".join(parts) + "]"


def _final_sigma_pattern() -> str:
    """Where Python's str.lower() turns Σ into final ς: after a cased character (skipping
    case-ignorable ones; up to two here, a regex lookbehind needs a bounded length) and not
    before one (skipping any case-ignorable). The character sets are read from this Python's
    own lower() so they follow its Unicode version."""
    cased: List[int] = []
    ignorable: List[int] = []
    for code in range(0x110000):
        if 0xD800 <= code < 0xE000:
            continue
        ch = chr(code)
        if ("AΣ" + ch).lower()[1] == "σ":
            cased.append(code)
        elif ("AΣ" + ch + "a").lower()[1] == "σ":
            ignorable.append(code)
    c, i = _ranges_class(cased), _ranges_class(ignorable)
    return f"(?<={c}|{c}{i}|{c}{i}{i})Σ(?!{i}*{c})"


def _ftfy_normalizers() -> List[normalizers.Normalizer]:
    """What ftfy.fix_text does to well-formed text, as tokenizers normalizers.

    ftfy's tables are read when ftfy is installed (it is an open_clip dependency); the result is
    frozen into tokenizer.json, so the Encoder needs no ftfy."""
    from tokenizers import Regex, normalizers

    out: List[normalizers.Normalizer] = []
    try:
        from ftfy import chardata
    except ImportError:  # pragma: no cover - ftfy comes with open_clip
        return [normalizers.NFC()]
    from ftfy import fixes

    # C1 control characters are read as Windows-1252 ("\x93" -> "“"), as ftfy's fix_c1_controls
    for code in range(0x80, 0xA0):
        repl = fixes.fix_c1_controls(chr(code))
        if repl != chr(code):
            out.append(normalizers.Replace(chr(code), repl))
    control = "".join(chr(c) for c in chardata.CONTROL_CHARS)
    out.append(normalizers.Replace(Regex(_char_class(control)), ""))
    for code, repl in sorted(chardata.LIGATURES.items()):
        out.append(normalizers.Replace(chr(code), repl))
    for code, repl in sorted(chardata.WIDTH_MAP.items()):
        out.append(normalizers.Replace(chr(code), repl))
    out.append(normalizers.Replace(Regex(chardata.SINGLE_QUOTE_RE.pattern), "'"))
    out.append(normalizers.Replace(Regex(chardata.DOUBLE_QUOTE_RE.pattern), '"'))
    out.append(normalizers.NFC())
    return out


def build_clip_tokenizer(bpe_path: Optional[Union[str, Path]] = None) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` equal to open_clip's ``SimpleTokenizer`` (see module docstring)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )

    path = Path(bpe_path) if bpe_path is not None else default_bpe_path()
    merges = _read_merges(path)
    byte_chars = list(bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [SOT, EOT]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{path}: built a vocabulary of {len(vocab)} tokens, expected {VOCAB_SIZE}")

    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", unk_token=None, fuse_unk=False)
    )
    tok.normalizer = normalizers.Sequence(
        _ftfy_normalizers()
        + [
            normalizers.Replace(Regex(_char_class(_python_whitespace()) + "+"), " "),
            normalizers.Strip(),
            # Python's str.lower() applies the Greek final-sigma rule; Lowercase does not
            normalizers.Replace(Regex(_final_sigma_pattern()), "ς"),
            normalizers.Lowercase(),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # bytes first (a token holds "</w>" in byte-level form), then the word ends become spaces
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Replace("</w>", " ")])
    # Written in the text, the special tokens are matched after normalization (open_clip's regex
    # also matches them in the lower-cased text).
    tok.add_special_tokens(
        [AddedToken(SOT, normalized=True, special=True), AddedToken(EOT, normalized=True, special=True)]
    )
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}", special_tokens=[(SOT, vocab[SOT]), (EOT, vocab[EOT])]
    )
    return tok


def clip_clean(text: str) -> str:
    """The part of open_clip's cleaning a normalizer cannot do: HTML entities, unescaped twice.

    The one home of CLIP text cleaning outside tokenizer.json: the Encoder, the export
    self-check and :func:`tokenize` call it."""
    return html.unescape(html.unescape(text)) if "&" in text else text


def write_clip_tokenizer(path: Union[str, Path], bpe_path: Optional[Union[str, Path]] = None) -> Path:
    out = Path(path)
    build_clip_tokenizer(bpe_path).save(str(out))
    return out


@lru_cache(maxsize=1)
def _cached_clip_tokenizer() -> Tokenizer:
    return build_clip_tokenizer()


def tokenize(
    texts: List[str], context_length: int = 77, tokenizer: Optional[Tokenizer] = None
) -> List[List[int]]:
    """Token ids as open_clip would produce them (unpadded), for tests and export checks."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str((tokenizer or _cached_clip_tokenizer()).to_str())
    tok.enable_truncation(context_length)
    tok.no_padding()
    return [e.ids for e in tok.encode_batch([clip_clean(t) for t in texts])]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m leanclip.clip_tokenizer",
        description="Write open_clip's CLIP BPE as a Hugging Face tokenizer.json",
    )
    parser.add_argument("out", help="output tokenizer.json path")
    parser.add_argument("--bpe", default=None, help="bpe_simple_vocab_16e6.txt.gz (default: open_clip's)")
    args = parser.parse_args(argv)
    print(write_clip_tokenizer(args.out, args.bpe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
