"""`distill_loss`: the training loss of docs/spec.md section 5, differentiable w.r.t. the student logits.

The forward pass computes each row's loss *and* the analytic gradient w.r.t. the student logits in one
go (the Triton kernel in kernels/triton/loss.py, the native CPU op in kernels/csrc/loss.cpp, or a
chunked PyTorch version of the same formulas), so the autograd backward only multiplies the saved
gradient by `grad_output`. Nothing reads a device value on the host: the valid-token count, the mean's
divisor and `grad_output` stay tensors, so the op never syncs and can be captured in a CUDA graph.

Gradients, with s = z_S / T, p = softmax, h_j = dL/dlog p_S,j (log p_S treated as free) and
c = sum_j p_S,j h_j:  dL/dz_S = (1/T) * p_S * (h - c).  Per kind:
  forward_kl       dL/ds = p_S - p_T                                  (h = -p_T / p_S, c = -1)
  reverse_kl       h = log p_S - log p_T                               (c = the loss)
  jsd              h = (1 - beta)(log p_S - log m),  m = beta p_T + (1 - beta) p_S
  tvd              h = sign(p_S - p_T) / 2
  skew_forward_kl  p_S h = -(1 - alpha) p_S p_T / m,  m = alpha p_T + (1 - alpha) p_S
  skew_reverse_kl  h = log p_S - log m - alpha p_S / m,  m = alpha p_S + (1 - alpha) p_T
The JSD endpoints follow TRL/Liger: beta = 0 is forward KL, beta = 1 reverse KL.
"""

from __future__ import annotations

import contextlib
import math

import torch

from adaswitch import reference
from adaswitch._backend import native_ops, resolve_impl
from adaswitch._validation import KINDS, check_divergence_args, check_logits_pair

REDUCTIONS = ("mean", "sum", "none")
NEG_BIG = -1.0e30  # stands for log(0) of a mixture weight (kept finite so 0 * it is 0)
_TORCH_CHUNK_ELEMENTS = 1 << 22  # logits per chunk of the PyTorch path: ~16 MB of fp32 per temporary


# ----------------------------------------------------------------------------------------------------------
# argument checks (all before any work)


def autocast_off(device: torch.device):
    """A context that turns autocast off for `device`'s type: the ops pick their own precision (fp32
    accumulation, explicit casts), which autocast would override by running matmuls in bf16/fp16."""
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        enabled = False
    return torch.autocast(device.type, enabled=False) if enabled else contextlib.nullcontext()


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_labels(labels, lead_shape, device, ignore_index) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor (e.g. torch.long), got {labels.dtype}")
    if tuple(labels.shape) != tuple(lead_shape):
        raise ValueError(
            f"labels must have the logits' leading shape {tuple(lead_shape)}, got {tuple(labels.shape)}"
        )
    if labels.device != device:
        raise ValueError(f"labels must be on the logits' device {device}, got {labels.device}")


def check_num_items(num_items_in_batch, reduction, device) -> None:
    """Python numbers and CPU tensors must be > 0 (reading a CPU tensor costs no device sync); a tensor on
    an accelerator must hold one value and is not read (that would be a host sync): a value <= 0 there gives
    a NaN loss (see `reduction_scale`)."""
    if num_items_in_batch is None:
        return
    if reduction != "mean":
        raise ValueError(f"num_items_in_batch only applies to reduction='mean', got reduction={reduction!r}")
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                f"num_items_in_batch must be a number or a one-element tensor, got shape "
                f"{tuple(num_items_in_batch.shape)}"
            )
        if num_items_in_batch.device != device and num_items_in_batch.device.type != "cpu":
            raise ValueError(
                f"num_items_in_batch must be on {device} or the CPU, got {num_items_in_batch.device}"
            )
        if num_items_in_batch.dtype == torch.bool or num_items_in_batch.is_complex():
            raise TypeError(f"num_items_in_batch must be a real number tensor, got {num_items_in_batch.dtype}")
        if num_items_in_batch.device.type == "cpu":
            value = float(num_items_in_batch.reshape(()))
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"num_items_in_batch must be > 0, got tensor({value!r})")
        return
    if (
        isinstance(num_items_in_batch, bool)
        or not isinstance(num_items_in_batch, (int, float))
        or not math.isfinite(num_items_in_batch)
        or num_items_in_batch <= 0
    ):
        raise ValueError(f"num_items_in_batch must be a number > 0 (or a tensor), got {num_items_in_batch!r}")


# ----------------------------------------------------------------------------------------------------------
# kind -> kernel code and mixture weight


def kernel_kind(kind_code: int, beta: float, alpha: float) -> tuple[int, float, float, float]:
    """(code, w, log w, log(1 - w)) for the kernels; endpoint cases collapse to forward / reverse KL."""
    kind = KINDS[kind_code]
    code, w = kind_code, 0.0
    if kind == "jsd":
        code, w = (0, 0.0) if beta == 0.0 else (1, 0.0) if beta == 1.0 else (2, beta)
    elif kind == "skew_forward_kl":
        code, w = (0, 0.0) if alpha == 0.0 else (4, alpha)
    elif kind == "skew_reverse_kl":
        code, w = (1, 0.0) if alpha == 0.0 else (5, alpha)
    log_w = math.log(w) if w > 0 else NEG_BIG
    log_1mw = math.log1p(-w) if w < 1 else NEG_BIG
    return code, w, log_w, log_1mw


# ----------------------------------------------------------------------------------------------------------
# the PyTorch (CPU) path: the kernel's formulas, chunked over rows


def _terms_torch(ls, lt, code, w, log_w, log_1mw):
    """(loss terms, p_S * h, c terms) per entry; mirrors kernels/triton/loss.py::_terms."""
    ps, pt = ls.exp(), lt.exp()
    zero = torch.zeros((), dtype=ls.dtype, device=ls.device)
    if code == 0:
        return torch.where(pt > 0, pt * (lt - ls), zero), None, None
    if code == 1:
        d = torch.where(ps > 0, ls - lt, zero)
        psh = ps * d
        return psh, psh, psh
    if code == 2:
        lm = torch.logaddexp(lt + log_w, ls + log_1mw)
        kt = torch.where(pt > 0, pt * (lt - lm), zero)
        ks = torch.where(ps > 0, ps * (ls - lm), zero)
        psh = (1.0 - w) * ks
        return w * kt + psh, psh, psh
    if code == 3:
        psh = 0.5 * ps * torch.sign(ps - pt)
        return 0.5 * (pt - ps).abs(), psh, psh
    if code == 4:
        lm = torch.logaddexp(lt + log_w, ls + log_1mw)
        loss = torch.where(pt > 0, pt * (lt - lm), zero)
        psh = torch.where((pt > 0) & (ps > 0), -(1.0 - w) * (ls + lt - lm).exp(), zero)
        return loss, psh, psh
    lm = torch.logaddexp(ls + log_w, lt + log_1mw)
    d = torch.where(ps > 0, ls - lm, zero)
    psh = torch.where(ps > 0, ps * (d - w * (ls - lm).exp()), zero)
    return ps * d, psh, psh


def _rows_and_grad_torch(s, t, grad, loss_rows, valid, scale, code, w, log_w, log_1mw, inv_temp):
    n, vocab = s.shape
    compute = torch.float64 if s.dtype == torch.float64 else torch.float32
    step = max(1, _TORCH_CHUNK_ELEMENTS // vocab)
    for i in range(0, n, step):
        j = min(n, i + step)
        ls = torch.log_softmax(s[i:j].to(compute) * inv_temp, dim=-1)
        lt = torch.log_softmax(t[i:j].to(compute) * inv_temp, dim=-1)
        loss, psh, cterm = _terms_torch(ls, lt, code, w, log_w, log_1mw)
        rows = loss.sum(-1)
        if valid is not None:
            rows = torch.where(valid[i:j], rows, rows.new_zeros(()))
        loss_rows[i:j] = rows
        if grad is None:
            continue
        ps = ls.exp()
        g = ps - lt.exp() if code == 0 else psh - ps * cterm.sum(-1, keepdim=True)
        sc = scale if scale.numel() == 1 else scale[i:j, None]
        g = g * (sc.to(compute) * inv_temp)
        if valid is not None:
            g = g.masked_fill(~valid[i:j, None], 0.0)
        grad[i:j] = g


def loss_rows_and_grad(s, t, *, kind_code, beta, alpha, temperature, valid, scale, want_grad, which):
    """Per-row loss (float32, or float64 for float64 inputs off Triton) of 2-D `s`, `t` and, if
    `want_grad`, the gradient w.r.t. `s` in `s.dtype`, multiplied by `scale` (one-element or [N] float32
    tensor) / T. Rows where `valid` is False get 0 and a zero gradient. `which`: "triton", "native"
    or "torch". Used per chunk by the fused-linear loss too."""
    code, w, log_w, log_1mw = kernel_kind(kind_code, beta, alpha)
    s = s if s.stride(-1) == 1 else s.contiguous()
    t = t if t.stride(-1) == 1 else t.contiguous()
    if which == "native":
        # The native op takes one dtype: a mixed pair (e.g. bf16 student, fp32 teacher) runs at the wider
        # one (the op accumulates in fp32 either way) and the gradient comes back in the student's dtype.
        common = torch.promote_types(s.dtype, t.dtype)
        rows, grad = native_ops().distill_loss_rows(s.to(common), t.to(common), valid, scale, code, w,
                                                    temperature, want_grad)
        return rows, (grad.to(s.dtype) if want_grad else None)
    out_dtype = torch.float64 if (s.dtype == torch.float64 and which == "torch") else torch.float32
    loss_rows = torch.empty(s.shape[0], dtype=out_dtype, device=s.device)
    grad = torch.empty_like(s) if want_grad else None
    inv_temp = 1.0 / temperature
    if which == "triton":
        from adaswitch.kernels.triton.loss import distill_loss_rows_triton

        distill_loss_rows_triton(s, t, grad, loss_rows, valid, scale, code, w, log_w, log_1mw, inv_temp)
    else:
        _rows_and_grad_torch(s, t, grad, loss_rows, valid, scale, code, w, log_w, log_1mw, inv_temp)
    return loss_rows, grad


def reduction_scale(valid, n_rows, reduction, num_items_in_batch, device) -> torch.Tensor:
    """The factor each row's loss is multiplied by, as a one-element float32 device tensor (no sync):
    1 for sum / none; 1 / num_items_in_batch, or 1 / max(valid count, 1) for mean."""
    if reduction != "mean":
        return torch.ones(1, dtype=torch.float32, device=device)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):  # > 0 checked on the CPU; on a device: NaN if <= 0
            n = num_items_in_batch.to(device=device, dtype=torch.float32).reshape(1)
            return torch.where(n > 0, 1.0 / n, torch.full_like(n, math.nan))
        return torch.full((1,), 1.0 / float(num_items_in_batch), dtype=torch.float32, device=device)
    if valid is None:
        return torch.full((1,), 1.0 / max(n_rows, 1), dtype=torch.float32, device=device)
    return (1.0 / valid.sum().clamp_min(1).to(torch.float32)).reshape(1)


def reduce_rows(rows, scale, reduction, lead_shape):
    """Applies the reduction to already-masked per-row losses (differentiable, no sync)."""
    if reduction == "none":
        return rows.reshape(lead_shape)
    total = rows.sum()
    return total * scale.to(total.dtype).reshape(()) if reduction == "mean" else total


# ----------------------------------------------------------------------------------------------------------
# autograd


class DistillLossFunction(torch.autograd.Function):
    """Forward computes the loss and d loss / d student_logits; backward scales that by grad_output.

    The saved gradient is scaled in place (no second [N, V] buffer), so one graph can be differentiated
    once: a second backward through the same graph (retain_graph=True) raises.
    """

    @staticmethod
    def forward(ctx, student, teacher, valid, scale, kind_code, beta, alpha, temperature, reduction, which):
        vocab = student.shape[-1]
        s2d, t2d = student.reshape(-1, vocab), teacher.reshape(-1, vocab)
        want_grad = ctx.needs_input_grad[0]
        rows, grad = loss_rows_and_grad(
            s2d,
            t2d,
            kind_code=kind_code,
            beta=beta,
            alpha=alpha,
            temperature=temperature,
            valid=valid,
            scale=scale,
            want_grad=want_grad,
            which=which,
        )
        ctx.reduction = reduction
        ctx.student_shape = student.shape
        ctx.used = False
        if want_grad:
            ctx.save_for_backward(grad)
        return reduce_rows(rows, scale, reduction, student.shape[:-1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        if ctx.used:
            raise RuntimeError(
                "distill_loss supports one backward per forward (its saved gradient is scaled in place)"
            )
        ctx.used = True
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            grad.mul_(grad_output.reshape(-1, 1).to(grad.dtype))
        else:
            grad.mul_(grad_output.to(grad.dtype))
        return grad.view(ctx.student_shape), None, None, None, None, None, None, None, None, None


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward_kl",
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items_in_batch: int | float | torch.Tensor | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """Distillation loss between student and teacher logits, differentiable w.r.t. `student_logits`.

    Args:
        student_logits, teacher_logits: (..., V) float16/bfloat16/float32/float64 tensors of one shape.
            The teacher is a constant (no gradient flows to it).
        kind: "forward_kl" (KL(p_T||p_S), default), "reverse_kl", "jsd", "tvd", "skew_forward_kl",
            "skew_reverse_kl" (docs/spec.md section 1), at `temperature` (no T^2 factor, like TRL).
        beta: JSD weight, TRL/Liger convention (0 = forward KL, 1 = reverse KL).
        alpha: skew weight of the skewed KLs.
        labels: optional integer tensor of the leading shape; positions equal to `ignore_index` count
            neither in the loss nor in the mean's divisor and get a zero gradient.
        reduction: "mean" (over valid tokens; `num_items_in_batch` replaces the count, as in TRL, for
            gradient accumulation), "sum", or "none" (per-position losses, 0 at ignored positions).
        impl: "auto" (Triton on CUDA, the native op on CPU when built, else PyTorch), "triton",
            "native" or "torch".

    Accumulates in float32 (float64 for float64 inputs on the PyTorch path), inside `torch.autocast` too;
    the gradient is returned in the student's dtype. If every position is ignored, the loss is 0 with a
    zero gradient.
    """
    check_logits_pair(student_logits, teacher_logits)
    kind_code, beta, alpha, temperature = check_divergence_args(kind, beta, alpha, temperature)
    check_reduction(reduction)
    device = student_logits.device
    check_labels(labels, student_logits.shape[:-1], device, ignore_index)
    check_num_items(num_items_in_batch, reduction, device)
    which = resolve_impl(impl, device, native_op="distill_loss_rows")
    n_rows = student_logits.numel() // student_logits.shape[-1]
    with autocast_off(device):
        return _distill_loss(student_logits, teacher_logits, labels, ignore_index, n_rows, reduction,
                             num_items_in_batch, kind_code, beta, alpha, temperature, which)


def _distill_loss(student_logits, teacher_logits, labels, ignore_index, n_rows, reduction, num_items_in_batch,
                  kind_code, beta, alpha, temperature, which):
    device = student_logits.device
    valid = None if labels is None else (labels != ignore_index).reshape(-1)
    scale = reduction_scale(valid, n_rows, reduction, num_items_in_batch, device)
    return DistillLossFunction.apply(
        student_logits,
        teacher_logits.detach(),
        valid,
        scale,
        kind_code,
        beta,
        alpha,
        temperature,
        reduction,
        which,
    )


def reference_distill_loss(
    student_logits,
    teacher_logits,
    kind="forward_kl",
    *,
    beta=0.5,
    alpha=0.1,
    temperature=1.0,
    labels=None,
    ignore_index=-100,
    reduction="mean",
    num_items_in_batch=None,
    dtype=None,
):
    """The executable spec of the loss: adaswitch.reference.divergence_rows, masked and reduced, with
    plain autograd (float64 for float64 inputs). Tests differentiate this and compare."""
    dtype = dtype or (torch.float64 if student_logits.dtype == torch.float64 else torch.float32)
    rows = reference.divergence_rows(
        student_logits,
        teacher_logits.detach(),
        kind,
        beta=beta,
        alpha=alpha,
        temperature=temperature,
        dtype=dtype,
    ).reshape(-1)
    valid = None
    if labels is not None:
        valid = (labels != ignore_index).reshape(-1)
        rows = torch.where(valid, rows, rows.new_zeros(()))
    scale = reduction_scale(valid, rows.numel(), reduction, num_items_in_batch, rows.device)
    return reduce_rows(rows, scale, reduction, student_logits.shape[:-1])
