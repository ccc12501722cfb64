"""leanclip.clip_tokenizer: the CLIP BPE as tokenizer.json gives exactly open_clip's token ids."""

from __future__ import annotations

import random
from pathlib import Path
from typing import List

import pytest

from leanclip.clip_tokenizer import (
    EOT,
    SOT,
    VOCAB_SIZE,
    build_clip_tokenizer,
    tokenize,
    write_clip_tokenizer,
)

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")

SOT_ID, EOT_ID = 49406, 49407

FIXED = [
    "a photo of a cat",
    "",
    "   ",
    "A PHOTO OF A DOG",
    "  Hello,   WORLD!!   123  ",
    "don't you're we've I'm she'll he'd it's DON'T",
    "3.14159 and 1,000,000 and 2024-11-25",
    "C++ / C# / F#... (really?) [yes] {no} <tag> a@b.com http://x.y/z?q=1&r=2",
    "naïve café déjà vu Ångström Ærøskøbing straße",
    "日本語のテキスト、中文文本。한국어 텍스트",
    "Привет, мир! Ελληνικά ΟΔΥΣΣΕΥΣ σοφός",
    "مرحبا بالعالم שלום עולם हिन्दी",
    "emoji 🐱‍👤 🇫🇷 👍🏽 ❤️ 🎉🎉🎉",
    "ﬁsh ﬂower ﬀ ﬃ ĳ",
    "“curly” ‘quotes’ „low“ ‚single‘",
    "ＦＵＬＬＷＩＤＴＨ　ｔｅｘｔ　１２３！",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u2003em space\u3000ideographic",
    "control\x00chars\x07here\x1c\x1d\x7f",
    "c1 \x93quoted\x94 \x85 \x80 \x96 \x99 \x81",
    "&amp; &lt;b&gt; &quot;quoted&quot; &#39;apos&#39; &amp;amp;",
    "<start_of_text> inside <end_of_text> text <START_OF_TEXT>",
    "e\u0301 composed vs é precomposed",
    "İstanbul ΣΊΣΥΦΟΣ",
    "x" * 500,
    " ".join(["word"] * 200),
    "🙂" * 100,
    "a,b.c;d:e!f?g",
    "...!!!???---___***",
    "ALL CAPS WITH Numbers 007 AND Symbols #$%^",
]

_POOL = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    "          .,;:!?'\"()[]{}<>-_/\\@#$%^&*+=~`|"
    "éèêëàâäîïôöùûüçñßøåæœ"
    "αβγδεζηθΣσςπΩ"
    "дежзийклмнДЖЗ"
    "日本語中文字한국"
    "😀🐱🚀👍🏽❤️🎉"
    "\t\n\u00a0\u2009\u3000"
    "ﬁﬂ“”‘’ＡＢ１２"
    "0123456789"
)


def _random_strings(n: int, seed: int = 1234) -> List[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.choice([1, 3, 8, 20, 60, 150, 400])
        out.append("".join(rng.choice(_POOL) for _ in range(length)))
    return out


def _open_clip_ids(texts: List[str], context_length: int = 77) -> List[List[int]]:
    tok = open_clip_tokenizer.SimpleTokenizer(context_length=context_length)
    rows = tok(texts, context_length=context_length).tolist()
    out = []
    for row in rows:
        # open_clip pads with id 0 (which is also "!"): cut after the last end-of-text token
        last = len(row) - 1 - row[::-1].index(EOT_ID)
        out.append(row[: last + 1])
    return out


@pytest.fixture(scope="module")
def clip_tok():
    return build_clip_tokenizer()


def test_vocabulary_matches_open_clip(clip_tok):
    ref = open_clip_tokenizer.SimpleTokenizer()
    vocab = clip_tok.get_vocab()
    assert len(vocab) == VOCAB_SIZE == len(ref.encoder)
    assert vocab == ref.encoder
    assert clip_tok.token_to_id(SOT) == SOT_ID and clip_tok.token_to_id(EOT) == EOT_ID


def test_parity_on_varied_strings(clip_tok):
    texts = FIXED + _random_strings(300)
    ours = tokenize(texts, tokenizer=clip_tok)
    ref = _open_clip_ids(texts)
    mismatches = [(t, o, r) for t, o, r in zip(texts, ours, ref) if o != r]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ; first: {mismatches[0]!r}"


def test_truncation_keeps_end_token(clip_tok):
    long = " ".join(f"w{i}" for i in range(300))
    for ctx in (77, 16, 5):
        (ids,) = tokenize([long], context_length=ctx, tokenizer=clip_tok)
        assert len(ids) == ctx
        assert ids[0] == SOT_ID and ids[-1] == EOT_ID
        assert ids == _open_clip_ids([long], context_length=ctx)[0]


def test_empty_string_is_start_and_end(clip_tok):
    assert tokenize(["", "   \n\t "], tokenizer=clip_tok) == [[SOT_ID, EOT_ID], [SOT_ID, EOT_ID]]


def test_written_file_round_trips(tmp_path: Path, clip_tok):
    from tokenizers import Tokenizer

    path = write_clip_tokenizer(tmp_path / "tokenizer.json")
    loaded = Tokenizer.from_file(str(path))
    texts = FIXED[:10]
    assert tokenize(texts, tokenizer=loaded) == tokenize(texts, tokenizer=clip_tok)
    # decoding gives back the cleaned text
    ids = tokenize(["A Photo of 2 cats!"], tokenizer=loaded)[0]
    assert loaded.decode(ids).strip() == "a photo of 2 cats !"


def test_documented_residual_difference_mojibake(clip_tok):
    """ftfy repairs mojibake (UTF-8 read as Latin-1); tokenizer.json cannot. Documented in the
    module docstring; this pins the behaviour so a change is noticed."""
    text = "sÃ³ cafÃ©"
    assert tokenize([text], tokenizer=clip_tok) != _open_clip_ids([text])
    assert tokenize(["só café"], tokenizer=clip_tok) == _open_clip_ids([text])


def test_bad_merges_file_is_named(tmp_path: Path):
    bad = tmp_path / "bpe.txt.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="bpe.txt.gz"):
        build_clip_tokenizer(bad)
