"""`fused_linear_distill_loss`: the distillation loss straight from hidden states and LM-head weights.

Tokens are processed in chunks: for each chunk the student and teacher logits are computed in float32
(the matmul accumulates in fp32 and its result is never rounded to bf16), the per-row loss and
d loss / d logits come from the same kernel as `distill_loss`, and the gradients of the student hidden
states, weight and bias are accumulated right away (Liger's fused-linear pattern). So the full [N, V]
logits never exist; peak extra memory is a few [chunk, V] fp32 tiles plus an fp32 copy of the
weight gradient. A model's own processing of its LM head's output (a logit scale as in Cohere or
Granite, a final tanh softcap as in Gemma 2) is applied to each chunk, so the loss is the loss of the
logits the model itself returns. Backward only scales the saved gradients by `grad_output`.

reduction="none" cannot pre-scale the weight gradient by a per-row grad_output, so there the forward
computes only the losses and the backward recomputes the chunks with the per-row scale.

Autocast is switched off inside (forward and backward): it would run the matmuls in bf16/fp16 and round
the logits, which is what the explicit fp32 computation avoids.
"""

from __future__ import annotations

import functools
import math

import torch

from adaswitch._validation import FLOAT_DTYPES
from adaswitch.ops.loss import autocast_off, loss_plan, reduce_rows
from adaswitch.ops.sampled import DEFAULT_IMPORTANCE_CAP

# default chunk = this many logits per model: 512 MB of fp32 on a GPU (few, large matmuls), 64 MB on
# the CPU (cache-friendlier, and the peak stays far below the eager loss's at every batch size)
DEFAULT_CHUNK_ELEMENTS = {"cuda": 1 << 27, "cpu": 1 << 24}


@functools.cache
def _cuda_mm_out_dtype() -> bool:
    """Whether torch.mm accepts out_dtype=float32 for bf16/fp16 CUDA operands (torch >= 2.8)."""
    try:
        a = torch.zeros(2, 2, dtype=torch.bfloat16, device="cuda")
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


def _mm(a: torch.Tensor, b: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
    """a @ b with `compute` accumulation and result: low-precision operands stay as they are on CUDA
    when torch supports an fp32 output, else they are cast first."""
    if a.dtype == compute and b.dtype == compute:
        return a @ b
    if a.is_cuda and compute == torch.float32 and a.dtype == b.dtype and _cuda_mm_out_dtype():
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.to(compute) @ b.to(compute)


def _logits(h, w, b, compute, head=(1.0, None)):
    """softcap(logit_scale * (h @ w.T + b)) in `compute`; head = (logit_scale, softcap or None)."""
    z = _mm(h, w.t(), compute)
    if b is not None:
        z.add_(b.to(compute))
    logit_scale, cap = head
    if cap is not None:
        return z.mul_(logit_scale / cap).tanh_().mul_(cap)
    return z if logit_scale == 1.0 else z.mul_(logit_scale)


def _raw_grad(g, z, head):
    """d loss / d (h @ w.T + b) from g = d loss / d logits, in place; z (the processed logits, consumed)
    gives the softcap's derivative: 1 - tanh^2 = 1 - (z / cap)^2."""
    logit_scale, cap = head
    if cap is not None:
        g.mul_(z.div_(cap).square_().neg_().add_(1.0))
    return g if logit_scale == 1.0 else g.mul_(logit_scale)


def _sampled_coefficients(hs, ws_c, bs, ht, wt_c, bt, plan, chunk, compute, heads):
    """The sampled form's log p_S(y) and coefficients of every row, from a first sweep over the chunks
    (no gradient): with a discount, a token's coefficient needs the later tokens of its sequence."""
    n = hs.shape[0]
    lp_s = torch.empty(n, dtype=compute, device=hs.device)
    lp_t = torch.empty(n, dtype=compute, device=hs.device)
    with torch.no_grad():
        for i in range(0, n, chunk):
            j = min(n, i + chunk)
            lp_s[i:j] = plan.token_logprobs(_logits(hs[i:j], ws_c, bs, compute, heads[0]), slice(i, j))
            lp_t[i:j] = plan.token_logprobs(_logits(ht[i:j], wt_c, bt, compute, heads[1]), slice(i, j))
    return lp_s, plan.coefficients(lp_s, lp_t)


def _chunk_rows(zs, ht, wt_c, bt, compute, heads, plan, rows, scale, want_grad, sampled_all):
    """One chunk's loss rows and d loss / d logits (scaled by `scale`) under `plan`."""
    if plan.sampled and sampled_all is not None:  # the coefficients are known: the teacher is not needed
        lp_s, coef = (x[rows] for x in sampled_all)
        return plan.sampled_rows(zs, lp_s, coef, scale, want_grad, rows)
    with torch.no_grad():
        zt = _logits(ht[rows], wt_c, bt, compute, heads[1])
    if plan.sampled:  # no discount: each row's coefficient is its own
        lp_s = plan.token_logprobs(zs, rows)
        coef = plan.coefficients(lp_s, plan.token_logprobs(zt, rows), rows)
        return plan.sampled_rows(zs, lp_s, coef, scale, want_grad, rows)
    valid = None if plan.valid is None else plan.valid[rows]
    hard = None if plan.hard is None else (plan.hard[0][rows], plan.hard[1][rows], plan.hard[2])
    return plan.dense_rows(zs, zt, valid, scale, want_grad, hard)


def _run_chunks(hs, ws, bs, ht, wt, bt, plan, scale, chunk, want, heads):
    """Loss rows and (per `want` = (hidden, weight, bias)) gradients, scaled by `scale` per row.
    heads: ((logit_scale, softcap) of the student, the same of the teacher)."""
    n = hs.shape[0]
    compute = torch.float64 if hs.dtype == torch.float64 else torch.float32
    # a weight that is not in `compute` is cast once here on the CPU (no fp32 matmul from bf16 there)
    ws_c = ws if (ws.dtype == compute or ws.is_cuda) else ws.to(compute)
    wt_c = wt if (wt.dtype == compute or wt.is_cuda) else wt.to(compute)
    sampled_all = None
    if plan.sampled and plan.discount:
        sampled_all = _sampled_coefficients(hs, ws_c, bs, ht, wt_c, bt, plan, chunk, compute, heads)
    loss_rows = torch.empty(n, dtype=compute, device=hs.device)
    g_h = torch.empty_like(hs) if want[0] else None
    g_w = torch.zeros(ws.shape, dtype=compute, device=ws.device) if want[1] else None
    g_b = torch.zeros(ws.shape[0], dtype=compute, device=ws.device) if want[2] else None
    any_grad = any(want)
    for i in range(0, n, chunk):
        j = min(n, i + chunk)
        zs = _logits(hs[i:j], ws_c, bs, compute, heads[0])
        sc = scale if scale.numel() == 1 else scale[i:j]
        rows, g = _chunk_rows(zs, ht, wt_c, bt, compute, heads, plan, slice(i, j), sc, any_grad, sampled_all)
        loss_rows[i:j] = rows
        if not any_grad:
            continue
        g = _raw_grad(g, zs, heads[0])
        if want[0]:
            g_h[i:j] = _mm(g.to(ws_c.dtype) if ws_c.dtype != compute else g, ws_c, compute)
        if want[1]:
            if hs.dtype == compute or not hs.is_cuda or ws.dtype == compute:  # in place, no [V, H] temporary
                g_w.addmm_(g.t(), hs[i:j].to(compute))
            else:  # bf16/fp16 model on CUDA: bf16/fp16 operands, fp32 product
                g_w += _mm(g.t().to(hs.dtype), hs[i:j], compute)
        if want[2]:
            g_b += g.sum(0)
    return loss_rows, g_h, g_w, g_b


class FusedLinearDistillFunction(torch.autograd.Function):
    """Chunked forward that also produces the student-side gradients; backward scales them."""

    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, plan, reduction, chunk, lead_shape, heads):
        want = tuple(ctx.needs_input_grad[:3]) if reduction != "none" else (False, False, False)
        with autocast_off(hs.device):
            loss_rows, g_h, g_w, g_b = _run_chunks(hs, ws, bs, ht, wt, bt, plan, plan.scale, chunk, want, heads)
        ctx.reduction, ctx.plan, ctx.chunk, ctx.heads, ctx.used = reduction, plan, chunk, heads, False
        ctx.dtypes = (hs.dtype, ws.dtype, None if bs is None else bs.dtype)
        if reduction == "none":
            ctx.save_for_backward(hs, ws, bs, ht, wt, bt)
        else:
            ctx.save_for_backward(g_h, g_w, g_b)
        return reduce_rows(loss_rows, plan.scale, reduction, lead_shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if ctx.used:
            raise RuntimeError("fused_linear_distill_loss supports one backward per forward")
        ctx.used = True
        if ctx.reduction == "none":
            hs, ws, bs, ht, wt, bt = ctx.saved_tensors
            want = tuple(ctx.needs_input_grad[:3])
            scale = grad_output.reshape(-1).to(ctx.plan.scale.dtype)
            with autocast_off(hs.device):
                _, g_h, g_w, g_b = _run_chunks(hs, ws, bs, ht, wt, bt, ctx.plan, scale, ctx.chunk, want, ctx.heads)
        else:
            g_h, g_w, g_b = ctx.saved_tensors
            for g in (g_h, g_w, g_b):
                if g is not None:
                    g.mul_(grad_output.to(g.dtype))
        g_h = None if g_h is None else g_h.to(ctx.dtypes[0])
        g_w = None if g_w is None else g_w.to(ctx.dtypes[1])
        g_b = None if g_b is None else g_b.to(ctx.dtypes[2])
        return g_h, g_w, g_b, None, None, None, None, None, None, None, None


def _check_float(name, x, dims=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimension(s), got shape {tuple(x.shape)}")


def check_head_processing(name, logit_scale, softcap) -> tuple[float, float | None]:
    """(logit_scale, softcap) as floats: a finite scale > 0, a softcap None or finite > 0."""
    for arg, value, optional in ((f"{name}_logit_scale", logit_scale, False), (f"{name}_softcap", softcap, True)):
        if optional and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{arg} must be a finite number > 0{' or None' if optional else ''}, got {value!r}")
    return float(logit_scale), None if softcap is None else float(softcap)


def check_fused_args(hs, ws, ht, wt, bs, bt, chunk_size):
    _check_float("student_hidden", hs)
    _check_float("teacher_hidden", ht)
    _check_float("student_weight", ws, 2)
    _check_float("teacher_weight", wt, 2)
    if hs.dim() < 1 or hs.shape[-1] == 0 or hs.numel() == 0:
        raise ValueError(f"student_hidden must be (..., hidden) with at least one row, got {tuple(hs.shape)}")
    if ht.shape[:-1] != hs.shape[:-1]:
        raise ValueError(
            f"teacher_hidden must have the student_hidden's leading shape {tuple(hs.shape[:-1])}, got "
            f"{tuple(ht.shape[:-1])}"
        )
    if ws.shape[1] != hs.shape[-1]:
        raise ValueError(f"student_weight must be [vocab, {hs.shape[-1]}] (student hidden size), got {tuple(ws.shape)}")
    if wt.shape[1] != ht.shape[-1]:
        raise ValueError(f"teacher_weight must be [vocab, {ht.shape[-1]}] (teacher hidden size), got {tuple(wt.shape)}")
    if wt.shape[0] != ws.shape[0]:
        raise ValueError(
            f"student_weight and teacher_weight must have the same vocabulary size (dim 0), got "
            f"{ws.shape[0]} and {wt.shape[0]}"
        )
    for name, b in (("student_bias", bs), ("teacher_bias", bt)):
        if b is not None:
            _check_float(name, b, 1)
            if b.shape[0] != ws.shape[0]:
                raise ValueError(f"{name} must have shape [{ws.shape[0]}] (vocab), got {tuple(b.shape)}")
    tensors = {
        "student_hidden": hs,
        "student_weight": ws,
        "teacher_hidden": ht,
        "teacher_weight": wt,
        "student_bias": bs,
        "teacher_bias": bt,
    }
    for name, x in tensors.items():
        if x is not None and x.device != hs.device:
            raise ValueError(f"{name} must be on student_hidden's device {hs.device}, got {x.device}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def fused_linear_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    kind: str = "forward_kl",
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    weight_hard_loss: float = 0.0,
    weight_soft_loss: float = 1.0,
    hard_labels: torch.Tensor | None = None,
    discount: float = 0.0,
    importance_cap: float = DEFAULT_IMPORTANCE_CAP,
    teacher_sampled: torch.Tensor | None = None,
    chunk_size: int | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """`distill_loss(student_logits, teacher_logits, ...)` without materialising the [N, V] logits, where
    each model's logits are `softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap)`, or
    `logit_scale * (hidden @ weight.T + bias)` when its softcap is None (`lm_head_logits`).

    student_hidden (..., H_s) and teacher_hidden (..., H_t) share the leading shape; the hidden sizes
    may differ, the vocabulary (weight rows) may not. Gradients flow to the student hidden states,
    weight and bias; the teacher side is a constant. The logit scales and softcaps reproduce a model's
    own processing of its LM head's output (e.g. Cohere's `logit_scale`, Granite's 1 / `logits_scaling`,
    Gemma 2's `final_logit_softcapping`); the loss is computed in fp32 inside `torch.autocast` too.
    chunk_size: tokens per chunk (default: 2**27 / V on a GPU, 512 MB of fp32 logits per model; 2**24 / V
    on the CPU). Other arguments as in `distill_loss`, the hard-label term, "sequence_mean" and the
    sampled-token form included (with a discount, the sampled form sweeps the chunks twice: once for every
    token's coefficient, once for the gradients).
    """
    check_fused_args(
        student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias, chunk_size
    )
    heads = (
        check_head_processing("student", student_logit_scale, student_softcap),
        check_head_processing("teacher", teacher_logit_scale, teacher_softcap),
    )
    device = student_hidden.device
    lead_shape = student_hidden.shape[:-1]
    vocab = student_weight.shape[0]
    plan = loss_plan(
        kind=kind, beta=beta, alpha=alpha, temperature=temperature, lead_shape=lead_shape, vocab=vocab,
        device=device, dtype=student_hidden.dtype, labels=labels, ignore_index=ignore_index, reduction=reduction,
        num_items_in_batch=num_items_in_batch, weight_hard_loss=weight_hard_loss, weight_soft_loss=weight_soft_loss,
        hard_labels=hard_labels, discount=discount, importance_cap=importance_cap, teacher_sampled=teacher_sampled,
        impl=impl,
    )
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    chunk = chunk_size or max(1, DEFAULT_CHUNK_ELEMENTS.get(device.type, 1 << 27) // vocab)
    return FusedLinearDistillFunction.apply(
        hs,
        student_weight,
        student_bias,
        ht,
        teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
        plan,
        reduction,
        chunk,
        lead_shape,
        heads,
    )


def lm_head_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """The logits `fused_linear_distill_loss` works with, computed as in its chunks (fp32, or fp64 for
    fp64 hidden states; no grad), so a model's own logits can be checked against them."""
    logit_scale, softcap = check_head_processing("head", logit_scale, softcap)
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    h = hidden.detach().reshape(-1, hidden.shape[-1])
    with torch.no_grad(), autocast_off(hidden.device):
        w = weight.detach() if (weight.dtype == compute or weight.is_cuda) else weight.detach().to(compute)
        b = None if bias is None else bias.detach()
        z = _logits(h, w, b, compute, (logit_scale, softcap))
    return z.reshape(*hidden.shape[:-1], weight.shape[0])
