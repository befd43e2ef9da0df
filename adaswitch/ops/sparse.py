"""Distillation against a sparse teacher: only its top-k log-probabilities and their token ids, so
teacher outputs can be precomputed, stored or served at k values per token instead of V.

Semantics (exact): both distributions are collapsed onto k + 1 buckets, the teacher's k token ids and
one tail bucket holding everything else.
  teacher: p_T on the k ids as given; tail = the given `teacher_tail_logprobs`, or else
           log(max(1 - sum of the k probabilities, 0)).
  student: p_S = softmax(student_logits / T) over the full vocabulary, summed into the same buckets
           (tail = log of the student's mass outside the k ids, computed by a masked log-sum-exp).
The chosen divergence (docs/spec.md section 1) is then taken between the two (k + 1)-bucket distributions.
With k = V every bucket is one token and the tail is empty, so the loss equals the dense loss. The
teacher log-probs must be at the loss temperature (`topk_teacher_logprobs` builds them so).

The student side is differentiated by autograd through this PyTorch code (k is small; the student's
[N, V] log-softmax is the only large tensor). Index validation (range, duplicates) reads one flag
back to the host once per call; pass check_indices=False inside a capture or a sync-free loop.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from adaswitch import reference
from adaswitch._validation import KINDS, check_divergence_args, check_logits, check_temperature
from adaswitch.ops.loss import (
    autocast_off,
    check_labels,
    check_num_items,
    check_reduction,
    reduce_rows,
    reduction_scale,
)


class SparseTeacher(NamedTuple):
    """Top-k teacher log-probs (float32, float64 for float64 logits; [..., k]), their token ids (int64
    [..., k]) and the log of the remaining mass ([...]), all at the temperature they were built with."""

    logprobs: torch.Tensor
    indices: torch.Tensor
    tail_logprobs: torch.Tensor


@torch.no_grad()
def topk_teacher_logprobs(teacher_logits: torch.Tensor, k: int, *, temperature: float = 1.0) -> SparseTeacher:
    """The sparse teacher of dense logits: top-k of log_softmax(teacher_logits / temperature),
    plus the exact log tail mass (log-sum-exp of the other entries)."""
    check_logits("teacher_logits", teacher_logits)
    temperature = check_temperature(temperature)
    vocab = teacher_logits.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an int in [1, {vocab}] (the vocabulary size), got {k!r}")
    dtype = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    logp = reference.log_probs(teacher_logits, temperature, dtype)
    values, indices = logp.topk(k, dim=-1)
    rest = logp.scatter(-1, indices, float("-inf"))
    return SparseTeacher(values, indices, _masked_logsumexp(rest))


def _masked_logsumexp(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dim, -inf (with zero, not NaN, gradients) for rows that are all -inf."""
    any_finite = (x > float("-inf")).any(-1, keepdim=True)
    safe = torch.where(any_finite, x, torch.zeros((), dtype=x.dtype, device=x.device))
    out = torch.logsumexp(safe, dim=-1)
    return torch.where(any_finite.squeeze(-1), out, torch.full_like(out, float("-inf")))


def check_sparse_teacher(student_logits, logprobs, indices, tail, check_indices) -> None:
    if not isinstance(logprobs, torch.Tensor) or not logprobs.dtype.is_floating_point:
        raise TypeError(
            "teacher_logprobs must be a floating-point tensor, got "
            f"{getattr(logprobs, 'dtype', type(logprobs))}"
        )
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            "teacher_indices must be an int64 or int32 tensor, got "
            f"{getattr(indices, 'dtype', type(indices))}"
        )
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    if logprobs.dim() != student_logits.dim() or logprobs.shape[:-1] != lead:
        raise ValueError(
            f"teacher_logprobs must be (*{tuple(lead)}, k) like the student's leading shape, got "
            f"{tuple(logprobs.shape)}"
        )
    if indices.shape != logprobs.shape:
        raise ValueError(
            f"teacher_indices must have teacher_logprobs' shape {tuple(logprobs.shape)}, got "
            f"{tuple(indices.shape)}"
        )
    if not 1 <= logprobs.shape[-1] <= vocab:
        raise ValueError(
            f"teacher_logprobs must hold k in [1, {vocab}] values per row, got {logprobs.shape[-1]}"
        )
    for name, x in (
        ("teacher_logprobs", logprobs),
        ("teacher_indices", indices),
        ("teacher_tail_logprobs", tail),
    ):
        if x is not None and x.device != student_logits.device:
            raise ValueError(
                f"{name} must be on student_logits' device {student_logits.device}, got {x.device}"
            )
    if tail is not None:
        if not isinstance(tail, torch.Tensor) or not tail.dtype.is_floating_point or tail.shape != lead:
            raise ValueError(f"teacher_tail_logprobs must be a float tensor of shape {tuple(lead)} or None")
    if check_indices:  # one host read for all three checks
        srt = indices.sort(dim=-1).values
        flags = torch.stack(
            [srt[..., 0].min() < 0, srt[..., -1].max() >= vocab, (srt[..., 1:] == srt[..., :-1]).any()]
        ).tolist()
        if flags[0] or flags[1]:
            raise ValueError(f"teacher_indices must lie in [0, {vocab}) (the student's vocabulary)")
        if flags[2]:
            raise ValueError("teacher_indices must not repeat a token id within a row")


def sparse_distill_loss(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_indices: torch.Tensor,
    kind: str = "forward_kl",
    *,
    teacher_tail_logprobs: torch.Tensor | None = None,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    check_indices: bool = True,
) -> torch.Tensor:
    """`distill_loss` against a top-k teacher (see the module docstring for the k + 1 bucket semantics).

    Args:
        student_logits: (..., V) float tensor, differentiable.
        teacher_logprobs, teacher_indices: (..., k) teacher log-probs at `temperature` and their ids
            (distinct within a row), e.g. from `topk_teacher_logprobs`.
        teacher_tail_logprobs: optional (...) log of the teacher's mass outside the k ids.
        check_indices: validate range and uniqueness of the ids (one host sync).
        Other arguments as in `distill_loss`.

    Computed in float32 (float64 for float64 logits), inside `torch.autocast` too.
    """
    check_logits("student_logits", student_logits)
    kind_code, beta, alpha, temperature = check_divergence_args(kind, beta, alpha, temperature)
    check_reduction(reduction)
    device = student_logits.device
    check_labels(labels, student_logits.shape[:-1], device, ignore_index)
    check_num_items(num_items_in_batch, reduction, device)
    check_sparse_teacher(
        student_logits, teacher_logprobs, teacher_indices, teacher_tail_logprobs, check_indices
    )
    with autocast_off(device):
        return _sparse_loss(
            student_logits, teacher_logprobs, teacher_indices, teacher_tail_logprobs, kind_code, beta, alpha,
            temperature, labels, ignore_index, reduction, num_items_in_batch,
        )


def _sparse_loss(student_logits, teacher_logprobs, teacher_indices, teacher_tail_logprobs, kind_code, beta, alpha,
                 temperature, labels, ignore_index, reduction, num_items_in_batch):
    device = student_logits.device
    vocab, k = student_logits.shape[-1], teacher_logprobs.shape[-1]
    compute = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    s = student_logits.reshape(-1, vocab).to(compute)
    lp_t = teacher_logprobs.detach().reshape(-1, k).to(compute)
    idx = teacher_indices.reshape(-1, k).long()
    valid = None if labels is None else (labels != ignore_index).reshape(-1)
    if valid is not None:  # ignored rows (padding) may hold anything: make them harmless before the math
        s = torch.where(valid[:, None], s, torch.zeros((), dtype=compute, device=device))
        lp_t = torch.where(valid[:, None], lp_t, torch.full((), -math.log(k), dtype=compute, device=device))

    logp_s = torch.log_softmax(s / temperature, dim=-1)
    s_top = logp_s.gather(-1, idx)
    s_tail = _masked_logsumexp(logp_s.scatter(-1, idx, float("-inf")))
    if teacher_tail_logprobs is not None:
        t_tail = teacher_tail_logprobs.detach().reshape(-1).to(compute)
    else:
        t_tail = (1.0 - lp_t.exp().sum(-1)).clamp_min(0.0).log()
    if k == vocab:  # no tail bucket at all (distinct ids cover the vocabulary)
        t_tail = torch.full_like(t_tail, float("-inf"))
    buckets_s = torch.cat([s_top, s_tail[:, None]], dim=-1)
    buckets_t = torch.cat([lp_t, t_tail[:, None]], dim=-1)
    rows = reference.divergence_from_log_probs(buckets_s, buckets_t, KINDS[kind_code], beta, alpha)
    if valid is not None:
        rows = torch.where(valid, rows, rows.new_zeros(()))
    scale = reduction_scale(valid, rows.numel(), reduction, num_items_in_batch, device)
    return reduce_rows(rows, scale, reduction, student_logits.shape[:-1])
