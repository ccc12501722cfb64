"""Fake pretrained weights for the offline-weights tests: tiny random models saved in the formats
``training.weights fetch`` stores (open_clip / timm state dicts, a Hugging Face folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def fake_fetchers() -> dict[str, Any]:
    """kind -> fetch(name, dest) making a tiny random stand-in (no network)."""
    import timm

    from training.models import TINY_STUDENT_TIMM, build_hf_student, build_teacher

    def open_clip_fetch(name: str, dest: Path) -> None:
        model_name, _tag = name.split(":", 1)
        torch.manual_seed(1)
        torch.save(build_teacher(model_name, None, tiny=True).state_dict(), dest)

    def timm_fetch(name: str, dest: Path) -> None:
        torch.manual_seed(2)
        torch.save(timm.create_model(name.split(".")[0], **TINY_STUDENT_TIMM).state_dict(), dest)

    def hf_fetch(name: str, dest: Path) -> None:
        from tokenizers import Tokenizer
        from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

        text = build_hf_student(tiny=True).leanclip_config["text"]  # the tiny BERT and its WordPiece
        torch.manual_seed(3)
        BertModel(BertConfig(**text["hf_config"]), add_pooling_layer=False).save_pretrained(dest)
        PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(text["tokenizer_json"]),
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        ).save_pretrained(dest)

    return {"open_clip": open_clip_fetch, "timm": timm_fetch, "hf": hf_fetch}


def make_fake_weights(folder: Path, monkeypatch: Any, ids: list[str] | None = None) -> dict[str, Any]:
    """``training.weights.fetch`` into ``folder`` with the fake fetchers; returns the manifest."""
    from training import weights

    monkeypatch.setattr(weights, "FETCHERS", fake_fetchers())
    return weights.fetch(ids or weights.shipped_ids(), folder, progress=lambda _: None)
