"""Losses of the paper (section 3): small functions over embeddings, each tested against a
direct formula in tests/test_training_losses.py.

All functions take *unnormalized or normalized* embeddings and L2-normalize them first, as the
paper's equations use L2-normalized embeddings. Under DDP, callers pass embeddings gathered
across ranks (training.distributed.gather_with_grad) so the negatives span the global batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def _scale(logit_scale: torch.Tensor | float) -> torch.Tensor | float:
    # CLIP stores log(1/tau); the temperature is clamped at 1/100 as in CLIP's training.
    if isinstance(logit_scale, torch.Tensor):
        return logit_scale.float().exp().clamp(max=100.0)
    return min(float(torch.tensor(logit_scale).exp()), 100.0)


def infonce(queries: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """-1/N sum_i log softmax_j(scale * q_i . k_j)[i]: key i is query i's positive, every other
    key in the batch a negative (eq. 1 with queries=texts and keys=images)."""
    logits = scale * _normalize(queries) @ _normalize(keys).T
    labels = torch.arange(queries.shape[0], device=queries.device)
    return F.cross_entropy(logits, labels)


def clip_loss(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_t2v, L_v2t) of eq. 1 and its symmetric version; ``logit_scale`` is log(1/tau)."""
    scale = _scale(logit_scale)
    return infonce(text, image, scale), infonce(image, text, scale)


def intra_modal_infonce(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. 2 (images) / eq. 3 (texts): student embedding i must pick the teacher's embedding of
    the same input among the teacher's embeddings of the batch."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return infonce(student, teacher.detach(), 1.0 / temperature)


def intra_modal_infonce_learned(
    student: torch.Tensor, teacher: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Eq. 2/3 with a learned temperature: ``logit_scale`` is log(1/tau), trained as CLIP's
    (1/tau clamped at 100)."""
    return infonce(student, teacher.detach(), _scale(logit_scale))


def temperature(logit_scale: torch.Tensor) -> float:
    """tau of a learned ``logit_scale`` (log(1/tau)), with the clamp the losses apply."""
    return float(1.0 / _scale(logit_scale.detach()))


def embedding_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Stage-1 MSE ablation: mean squared error between normalized embeddings."""
    return F.mse_loss(_normalize(student), _normalize(teacher.detach()))


def matching_kl(
    student_image: torch.Tensor,
    student_text: torch.Tensor,
    teacher_image: torch.Tensor,
    teacher_text: torch.Tensor,
    student_logit_scale: torch.Tensor | float,
    teacher_logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """KD term: KL(p_teacher || p_student) of the image-to-text and text-to-image matching
    distributions over the batch, averaged over both directions (batch mean)."""
    s_logits = _scale(student_logit_scale) * _normalize(student_image) @ _normalize(student_text).T
    with torch.no_grad():
        t_logits = _scale(teacher_logit_scale) * _normalize(teacher_image) @ _normalize(teacher_text).T
    i2t = F.kl_div(
        F.log_softmax(s_logits, dim=1), F.log_softmax(t_logits, dim=1), reduction="batchmean", log_target=True
    )
    t2i = F.kl_div(
        F.log_softmax(s_logits.T, dim=1),
        F.log_softmax(t_logits.T, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return 0.5 * (i2t + t2i)


def hard_negative_infonce(
    queries: torch.Tensor,
    keys: torch.Tensor,
    negatives: torch.Tensor,
    logit_scale: torch.Tensor | float,
    negative_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """HN term: InfoNCE of queries against the in-batch keys with each query's mined corpus
    negatives added to its softmax denominator.

    queries (n,d); keys (n,d), key i the positive of query i; negatives (n,k,d) the embeddings of
    query i's top-k mined negatives; negative_valid (n,k) bool marks real ones (the miner returns
    -1 where fewer than k were eligible)."""
    scale = _scale(logit_scale)
    q = _normalize(queries)
    batch_logits = scale * q @ _normalize(keys).T
    negative_logits = scale * torch.einsum("nd,nkd->nk", q, _normalize(negatives))
    if negative_valid is not None:
        negative_logits = negative_logits.masked_fill(~negative_valid, float("-inf"))
    logits = torch.cat([batch_logits, negative_logits], dim=1)
    labels = torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits, labels)
