"""The executable spec (docs/spec.md section 1) in plain PyTorch: per-row divergences between the student's
and the teacher's distributions at a temperature. Differentiable, runs in any float dtype (float64 for
tests). Conventions: 0·log 0 = 0; a row that is all -inf or holds NaN gives NaN; gradients at -inf
entries are 0, never NaN.
"""

from __future__ import annotations

import math

import torch

from adaswitch._validation import KINDS


def log_probs(logits: torch.Tensor, temperature: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.log_softmax(logits.to(dtype) / temperature, dim=-1)


def kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities. Terms with p == 0 (log p = -inf) are 0; a term with
    p > 0 and q == 0 is +inf even when p underflows in the compute dtype; NaN propagates."""
    p_zero = torch.isneginf(logp)
    q_zero = torch.isneginf(logq) & ~p_zero
    diff = torch.where(p_zero | q_zero, torch.zeros_like(logp), logp - logq)
    terms = torch.where(q_zero, torch.full_like(logp, float("inf")), logp.exp() * diff)
    return terms.sum(-1)


def log_mixture(loga: torch.Tensor, logb: torch.Tensor, wa: float) -> torch.Tensor:
    """log(wa·a + (1 − wa)·b) from log a, log b, with finite gradients where both are -inf."""
    if wa == 1.0:
        return loga
    if wa == 0.0:
        return logb
    both = torch.isneginf(loga) & torch.isneginf(logb)
    sa = torch.where(both, torch.zeros_like(loga), loga)
    sb = torch.where(both, torch.zeros_like(logb), logb)
    mixed = torch.logaddexp(sa + math.log(wa), sb + math.log1p(-wa))
    return torch.where(both, torch.full_like(mixed, float("-inf")), mixed)


def divergence_from_log_probs(logp_s, logp_t, kind: str, beta: float = 0.5, alpha: float = 0.1) -> torch.Tensor:
    """Per-row divergence given student and teacher log-probabilities (student first)."""
    if kind == "forward_kl":
        return kl_rows(logp_t, logp_s)
    if kind == "reverse_kl":
        return kl_rows(logp_s, logp_t)
    if kind == "jsd":
        if beta == 0.0:  # TRL / Liger endpoint convention
            return kl_rows(logp_t, logp_s)
        if beta == 1.0:
            return kl_rows(logp_s, logp_t)
        logm = log_mixture(logp_t, logp_s, beta)
        return beta * kl_rows(logp_t, logm) + (1.0 - beta) * kl_rows(logp_s, logm)
    if kind == "tvd":
        return 0.5 * (logp_t.exp() - logp_s.exp()).abs().sum(-1)
    if kind == "skew_forward_kl":
        return kl_rows(logp_t, log_mixture(logp_t, logp_s, alpha))
    if kind == "skew_reverse_kl":
        return kl_rows(logp_s, log_mixture(logp_s, logp_t, alpha))
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def divergence_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-row divergence of the leading shape, computed in `dtype` (differentiable)."""
    logp_s = log_probs(student_logits, temperature, dtype)
    logp_t = log_probs(teacher_logits, temperature, dtype)
    value = divergence_from_log_probs(logp_s, logp_t, kind, beta, alpha)
    # a bad row (NaN, or all -inf) on either side is NaN even where the kind ignores that side (alpha = 1)
    bad = torch.isnan(logp_s).any(-1) | torch.isnan(logp_t).any(-1)
    return torch.where(bad, torch.full_like(value, float("nan")), value)
