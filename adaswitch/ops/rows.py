"""The per-row loss and its gradient w.r.t. the student logits, on each backend: the Triton kernel
(kernels/triton/loss.py), the native CPU op (kernels/csrc/loss.cpp) or a chunked PyTorch version of the same
formulas (adaswitch/ops/loss.py's docstring has them). Every loss op (dense, fused-linear, sampled-token)
reduces through `loss_rows_and_grad`."""

from __future__ import annotations

import math

import torch

from adaswitch._backend import native_ops
from adaswitch._validation import KINDS

NEG_BIG = -1.0e30  # stands for log(0) of a mixture weight (kept finite so 0 * it is 0)
_TORCH_CHUNK_ELEMENTS = 1 << 22  # logits per chunk of the PyTorch path: ~16 MB of fp32 per temporary


# ----------------------------------------------------------------------------------------------------------
# kind -> kernel code and mixture weight


def kernel_kind(kind_code: int, beta: float, alpha: float) -> tuple[int, float, float, float]:
    """(code, w, log w, log(1 - w)) for the kernels; endpoint cases collapse to forward / reverse KL; code -1
    (no soft term) stays -1."""
    if kind_code < 0:
        return -1, 0.0, NEG_BIG, 0.0
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


def _rows_and_grad_torch(s, t, grad, loss_rows, valid, scale, code, w, log_w, log_1mw, inv_temp, soft_weight, hard):
    n, vocab = s.shape
    compute = torch.float64 if s.dtype == torch.float64 else torch.float32
    step = max(1, _TORCH_CHUNK_ELEMENTS // vocab)
    for i in range(0, n, step):
        j = min(n, i + step)
        z = s[i:j].to(compute)
        rows = torch.zeros(j - i, dtype=compute, device=s.device)
        g = torch.zeros_like(z) if grad is not None else None
        ls = None
        if code >= 0:
            ls = torch.log_softmax(z * inv_temp, dim=-1)
            lt = torch.log_softmax(t[i:j].to(compute) * inv_temp, dim=-1)
            loss, psh, cterm = _terms_torch(ls, lt, code, w, log_w, log_1mw)
            rows += soft_weight * loss.sum(-1)
            if g is not None:
                ps = ls.exp()
                g += (ps - lt.exp() if code == 0 else psh - ps * cterm.sum(-1, keepdim=True)) * (soft_weight * inv_temp)
        if hard is not None:
            targets, weights, inv_temp_hard = hard
            y, hw = targets[i:j, None], weights[i:j].to(compute)
            lh = ls if (ls is not None and inv_temp_hard == inv_temp) else torch.log_softmax(z * inv_temp_hard, -1)
            rows -= torch.where(hw != 0, hw * lh.gather(-1, y)[:, 0], rows.new_zeros(()))
            if g is not None:
                q = lh.exp().scatter_add_(-1, y, torch.full_like(y, -1, dtype=compute))
                g += q * (hw * inv_temp_hard)[:, None]
        if valid is not None:
            rows = torch.where(valid[i:j], rows, rows.new_zeros(()))
        loss_rows[i:j] = rows
        if g is None:
            continue
        sc = scale if scale.numel() == 1 else scale[i:j, None]
        g = g * sc.to(compute)
        if valid is not None:
            g = g.masked_fill(~valid[i:j, None], 0.0)
        grad[i:j] = g


def loss_rows_and_grad(s, t, *, kind_code, beta, alpha, temperature, valid, scale, want_grad, which,
                       soft_weight=1.0, hard=None):
    """Per-row loss (float32, or float64 for float64 inputs off Triton) of 2-D `s`, `t` and, if
    `want_grad`, the gradient w.r.t. `s` in `s.dtype`, multiplied by `scale` (one-element or [N] tensor;
    float64 keeps float64 inputs exact off Triton). The row's loss is soft_weight * divergence (kind_code -1:
    none, `t` unread) plus, with `hard` = (targets [N] int64, weights [N] float, 1 / T_h), the hard-label
    term weights * -log softmax(s / T_h)[targets].
    Rows where `valid` is False get 0 and a zero gradient. `which`: "triton", "native" or "torch". Used per
    chunk by the fused-linear loss too."""
    code, w, log_w, log_1mw = kernel_kind(kind_code, beta, alpha)
    s = s if s.stride(-1) == 1 else s.contiguous()
    t = t if (code < 0 or t.stride(-1) == 1) else t.contiguous()
    if code < 0:
        t = s  # not read
    if which == "native":
        # The native op takes one dtype: a mixed pair (e.g. bf16 student, fp32 teacher) runs at the wider
        # one (the op accumulates in fp32 either way) and the gradient comes back in the student's dtype.
        common = torch.promote_types(s.dtype, t.dtype)
        labels, weights, hard_temp = (None, None, 1.0) if hard is None else (hard[0], hard[1], 1.0 / hard[2])
        rows, grad = native_ops().distill_loss_rows(
            s.to(common), t.to(common), valid, scale, code, w, temperature, want_grad, soft_weight, labels, weights,
            hard_temp,
        )
        return rows, (grad.to(s.dtype) if want_grad else None)
    out_dtype = torch.float64 if (s.dtype == torch.float64 and which == "torch") else torch.float32
    loss_rows = torch.empty(s.shape[0], dtype=out_dtype, device=s.device)
    grad = torch.empty_like(s) if want_grad else None
    inv_temp = 1.0 / temperature
    if which == "triton":
        from adaswitch.kernels.triton.loss import distill_loss_rows_triton

        if hard is not None:  # the kernel reads fp32 weights and scales
            hard = (hard[0], hard[1].to(torch.float32), hard[2])
        scale = scale.to(torch.float32).contiguous()  # a grad_output may be an expanded (stride-0) view
        distill_loss_rows_triton(s, t, grad, loss_rows, valid, scale, code, w, log_w, log_1mw, inv_temp,
                                 soft_weight=soft_weight, hard=hard)
    else:
        _rows_and_grad_torch(s, t, grad, loss_rows, valid, scale, code, w, log_w, log_1mw, inv_temp, soft_weight,
                             hard)
    return loss_rows, grad
