"""The measuring code of benchmarks/bench_starter_heldout.py (issue 30's held-out experiments):
class rows, the OCR signals, the variant choice (tuning set only) and the keep rule."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import bench_starter_heldout as B


def _m(t1: float, t5: float, h1: float, mrr: float = 0.5) -> dict:
    return {"tuning": {"r1": t1, "r5": t5, "mrr": mrr}, "held-out": {"r1": h1, "r5": 1.0, "mrr": 0.5}}


def test_class_rows_average_each_group_of_normalised_embeddings() -> None:
    emb = np.array([[2.0, 0.0], [0.0, 3.0], [0.0, 1.0]])
    rows = B.class_rows(emb, [["a", "b"], ["c"]])
    assert np.allclose(rows[0], [2**-0.5, 2**-0.5]) and np.allclose(rows[1], [0.0, 1.0])


def test_lexical_hits_need_a_word_of_three_letters_in_the_text() -> None:
    hits = B.lexical_hits(["a YAMAHA bike", "an ox", "coffee"], ["YAWATA\nYamaha", "", "ox"])
    assert hits.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]


def test_the_variant_is_chosen_on_the_tuning_set_alone() -> None:
    rows = [
        ("idea", "v1", _m(0.8, 1.0, 0.9)),
        ("idea", "v2", _m(0.9, 1.0, 0.1)),  # best tuning R@1, worst held-out: still chosen
        ("idea", "v3", _m(0.9, 1.0, 0.5, mrr=0.4)),  # ties R@1, lower MRR
        ("other", "w", _m(0.1, 0.1, 0.1)),
    ]
    picks = B.chosen(rows)
    assert picks["idea"][0] == "v2" and picks["other"][0] == "w"


def test_kept_needs_held_out_up_and_tuning_not_down() -> None:
    base = _m(0.8, 1.0, 0.8)
    assert B.kept(base, _m(0.8, 1.0, 0.85))
    assert not B.kept(base, _m(0.8, 1.0, 0.8))  # held-out level: not kept
    assert not B.kept(base, _m(0.78, 1.0, 0.9))  # tuning R@1 down
    assert not B.kept(base, _m(0.9, 0.97, 0.9))  # tuning R@5 down


def test_wordnet_descriptions_cover_the_classifier_classes() -> None:
    pytest.importorskip("timm")
    pytest.importorskip("open_clip")
    wn = B.wordnet_classes()
    assert len(wn) == 1000 and wn[0][0][0] == "tench" and "fish" in wn[0][1]
    sets = B.description_sets()
    assert all(len(groups) == 1000 for groups in sets.values())
    assert sets["name (recipe 2)"][0] == ["a photo of a tench."]
    assert "a photo of a Tinca tinca." in sets["(a) synonyms"][0]
