"""Argument checks shared by the ops: every error names the argument and what was expected,
and is raised before any work is done."""

from __future__ import annotations

import math

import torch

KINDS = ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_forward_kl", "skew_reverse_kl")
KIND_CODES = {k: i for i, k in enumerate(KINDS)}
# The loss kinds: the divergences, and the sampled-token policy-gradient form (adaswitch/ops/sampled.py),
# which is a loss only (it needs the sampled token, so no switching rule compares by it)
SAMPLED_KIND = "sampled_reverse_kl"
LOSS_KINDS = (*KINDS, SAMPLED_KIND)
SAMPLED_CODE = len(KINDS)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_int(value) -> bool:
    """An int that is not a bool (True is an int to Python, never a count to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def first_line(exc: BaseException) -> str:
    """An exception's first line of text (its type's name when it has none): what a one-line error quotes."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_kind(kind) -> int:
    if kind not in KIND_CODES:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return KIND_CODES[kind]


def check_unit_interval(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 <= float(value) <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def check_temperature(value, name: str = "temperature") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def check_logits(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (..., vocab), got a scalar")
    if x.numel() == 0:
        raise ValueError(f"{name} must hold at least one row with a non-empty vocabulary, got shape {tuple(x.shape)}")


def check_logits_pair(student_logits, teacher_logits) -> None:
    """Same shape, float dtypes, same device, at least one row of at least one entry."""
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            "student_logits and teacher_logits must have the same vocabulary size (last dim), got "
            f"{student_logits.shape[-1]} and {teacher_logits.shape[-1]}"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            "student_logits and teacher_logits must be on the same device, got "
            f"{student_logits.device} and {teacher_logits.device}"
        )


def check_divergence_args(kind, beta, alpha, temperature) -> tuple[int, float, float, float]:
    return check_kind(kind), check_unit_interval("beta", beta), check_unit_interval("alpha", alpha), \
        check_temperature(temperature)


def check_loss_args(kind, beta, alpha, temperature) -> tuple[int, float, float, float]:
    """As `check_divergence_args`, for the loss kinds: the sampled-token form's code is SAMPLED_CODE."""
    if kind == SAMPLED_KIND:
        return SAMPLED_CODE, check_unit_interval("beta", beta), check_unit_interval("alpha", alpha), \
            check_temperature(temperature)
    if kind not in KIND_CODES:
        raise ValueError(f"kind must be one of {LOSS_KINDS}, got {kind!r}")
    return check_divergence_args(kind, beta, alpha, temperature)


def check_nonnegative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_loss_weights(weight_hard_loss, weight_soft_loss) -> tuple[float, float]:
    """Liger's weights of the hard-label (cross-entropy) and soft (distillation) terms, not both 0."""
    hard = check_nonnegative("weight_hard_loss", weight_hard_loss)
    soft = check_nonnegative("weight_soft_loss", weight_soft_loss)
    if hard == 0.0 and soft == 0.0:
        raise ValueError("weight_hard_loss and weight_soft_loss are both 0: the loss would be 0; set one > 0")
    return hard, soft


def check_sampled_args(discount, importance_cap) -> tuple[float, float]:
    """The sampled-token form's discount over later tokens (in [0, 1]) and importance-weight cap (> 0)."""
    discount = check_unit_interval("discount", discount)
    if isinstance(importance_cap, bool) or not isinstance(importance_cap, (int, float)) \
            or not math.isfinite(importance_cap) or importance_cap <= 0:
        raise ValueError(f"importance_cap must be a finite number > 0, got {importance_cap!r}")
    return discount, float(importance_cap)
