"""`token_divergence`: one float32 divergence per row between student and teacher logits.

The per-token quantity a switching rule needs (Liger and TRL only return a scalar or an [N, V]
tensor). Dispatches to the Triton kernel, the native CPU op or the PyTorch reference (see
adaswitch._backend).
"""

from __future__ import annotations

import torch

from adaswitch import reference
from adaswitch._backend import native_ops, resolve_impl
from adaswitch._validation import KINDS, check_divergence_args, check_logits_pair


@torch.no_grad()
def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    impl: str | None = None,
) -> torch.Tensor:
    """Divergence between p_T = softmax(teacher/t) and p_S = softmax(student/t), one value per row.

    Args:
        student_logits, teacher_logits: float16/bfloat16/float32/float64 tensors of the same shape
            (..., V); -inf entries are allowed (masked vocabulary).
        kind: one of "forward_kl" (KL(p_T||p_S)), "reverse_kl", "jsd", "tvd", "skew_forward_kl",
            "skew_reverse_kl" (docs/spec.md section 1).
        beta: JSD weight (TRL convention: 0 gives forward KL, 1 reverse KL).
        alpha: skew weight of the skewed KLs.
        temperature: divides the logits before the softmax.
        impl: "auto" (default), "triton", "native" or "torch".

    Returns:
        float32 tensor of shape (...), no grad, >= 0: every kind is a divergence, and rounding can leave
        a tiny negative value (about -1e-7 for jsd and the skew KLs of equal inputs), which is clamped to 0
        so that a floor such as min_divergence = 0 holds for equal distributions. Rows that are all -inf or
        contain NaN give NaN (checking would cost a host sync, which the decode loop must not pay).
    """
    check_logits_pair(student_logits, teacher_logits)
    kind_code, beta, alpha, temperature = check_divergence_args(kind, beta, alpha, temperature)
    lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    which = resolve_impl(impl, student_logits.device, native_op="token_divergence")
    s2d = student_logits.reshape(-1, vocab)
    t2d = teacher_logits.reshape(-1, vocab)
    if which == "triton":
        from adaswitch.kernels.triton.divergence import token_divergence_triton

        out = token_divergence_triton(s2d, t2d, kind_code, beta, alpha, temperature)
    elif which == "native":
        if s2d.dtype != t2d.dtype:  # the native op takes one dtype; mixed models (bf16 teacher, fp32 student)
            common = torch.promote_types(s2d.dtype, t2d.dtype)
            s2d, t2d = s2d.to(common), t2d.to(common)
        out = native_ops().token_divergence(s2d.contiguous(), t2d.contiguous(), kind_code, beta, alpha, temperature)
    else:
        compute = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
        out = reference.divergence_rows(s2d, t2d, KINDS[kind_code], beta=beta, alpha=alpha,
                                        temperature=temperature, dtype=compute).float()
    return out.clamp_(min=0.0).reshape(lead)  # NaN stays NaN
