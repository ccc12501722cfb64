"""Each loss against a direct, loop-based transcription of the paper's formula."""

from __future__ import annotations

import math

import pytest
import torch

from training import losses


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _eq1_t2v(text: torch.Tensor, image: torch.Tensor, tau: float) -> float:
    """-1/N sum_i log( e^{t_i.v_i/tau} / sum_j e^{t_i.v_j/tau} ), in float64 loops."""
    t, v = _unit(text.double()), _unit(image.double())
    n = len(t)
    total = 0.0
    for i in range(n):
        num = math.exp(float(t[i] @ v[i]) / tau)
        den = sum(math.exp(float(t[i] @ v[j]) / tau) for j in range(n))
        total += -math.log(num / den)
    return total / n


@pytest.fixture
def batch() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(6, 5, generator=g) for _ in range(4))


def test_clip_loss_matches_eq1_both_directions(batch: tuple[torch.Tensor, ...]) -> None:
    image, text = batch[0], batch[1]
    tau = 0.07
    t2v, v2t = losses.clip_loss(image, text, math.log(1 / tau))
    assert float(t2v) == pytest.approx(_eq1_t2v(text, image, tau), rel=1e-5)
    assert float(v2t) == pytest.approx(_eq1_t2v(image, text, tau), rel=1e-5)
    assert float(t2v) != pytest.approx(float(v2t), rel=1e-3)  # genuinely two directions


def test_logit_scale_is_clamped_at_100(batch: tuple[torch.Tensor, ...]) -> None:
    image, text = batch[0], batch[1]
    big = losses.clip_loss(image, text, torch.tensor(math.log(1000.0)))[0]
    assert float(big) == pytest.approx(_eq1_t2v(text, image, 0.01), rel=1e-5)


def test_intra_modal_infonce_is_eq2(batch: tuple[torch.Tensor, ...]) -> None:
    student, teacher = batch[0], batch[2]
    tau = 0.05
    got = losses.intra_modal_infonce(student, teacher, tau)
    # eq. 2: student i against teacher j
    assert float(got) == pytest.approx(_eq1_t2v(student, teacher, tau), rel=1e-5)


def test_intra_modal_infonce_gradient_reaches_only_student(batch: tuple[torch.Tensor, ...]) -> None:
    student = batch[0].clone().requires_grad_(True)
    teacher = batch[2].clone().requires_grad_(True)
    losses.intra_modal_infonce(student, teacher, 0.1).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_intra_modal_infonce_is_minimal_when_student_equals_teacher() -> None:
    teacher = torch.eye(4)
    perfect = losses.intra_modal_infonce(teacher.clone(), teacher, 0.05)
    shuffled = losses.intra_modal_infonce(teacher[[1, 0, 3, 2]], teacher, 0.05)
    assert float(perfect) < 1e-6 < float(shuffled)
    with pytest.raises(ValueError, match="temperature"):
        losses.intra_modal_infonce(teacher, teacher, 0.0)


def test_embedding_mse_on_normalized_vectors(batch: tuple[torch.Tensor, ...]) -> None:
    s, t = batch[0], batch[1]
    expected = float(((_unit(s) - _unit(t)) ** 2).mean())
    assert float(losses.embedding_mse(s, t)) == pytest.approx(expected, rel=1e-6)


def _kl_rows(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """mean_i sum_j p_ij log(p_ij / q_ij) with p, q row softmaxes."""
    p = torch.softmax(p_logits.double(), dim=1)
    q = torch.softmax(q_logits.double(), dim=1)
    return float((p * (p / q).log()).sum(dim=1).mean())


def test_matching_kl_is_kl_of_teacher_and_student_distributions(batch: tuple[torch.Tensor, ...]) -> None:
    s_img, s_txt, t_img, t_txt = batch
    s_scale, t_scale = math.log(20.0), math.log(50.0)
    s_logits = 20.0 * _unit(s_img) @ _unit(s_txt).T
    t_logits = 50.0 * _unit(t_img) @ _unit(t_txt).T
    expected = 0.5 * (_kl_rows(t_logits, s_logits) + _kl_rows(t_logits.T, s_logits.T))
    got = losses.matching_kl(s_img, s_txt, t_img, t_txt, s_scale, t_scale)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    same = losses.matching_kl(t_img, t_txt, t_img, t_txt, t_scale, t_scale)
    assert abs(float(same)) < 1e-6


def test_hard_negatives_enter_the_denominator(batch: tuple[torch.Tensor, ...]) -> None:
    queries, keys = batch[0], batch[1]
    g = torch.Generator().manual_seed(1)
    negatives = torch.randn(6, 3, 5, generator=g)
    valid = torch.ones(6, 3, dtype=torch.bool)
    valid[2, 1:] = False  # the miner found only one eligible negative for query 2
    tau = 0.1
    q, k, neg = _unit(queries.double()), _unit(keys.double()), _unit(negatives.double())
    total = 0.0
    for i in range(6):
        num = math.exp(float(q[i] @ k[i]) / tau)
        den = sum(math.exp(float(q[i] @ k[j]) / tau) for j in range(6))
        den += sum(math.exp(float(q[i] @ neg[i, m]) / tau) for m in range(3) if valid[i, m])
        total += -math.log(num / den)
    got = losses.hard_negative_infonce(queries, keys, negatives, math.log(1 / tau), valid)
    assert float(got) == pytest.approx(total / 6, rel=1e-5)
    # with no valid negatives it reduces to eq. 1
    none = losses.hard_negative_infonce(
        queries, keys, negatives, math.log(1 / tau), torch.zeros(6, 3, dtype=torch.bool)
    )
    assert float(none) == pytest.approx(_eq1_t2v(queries, keys, tau), rel=1e-5)
    assert float(got) > float(none)
