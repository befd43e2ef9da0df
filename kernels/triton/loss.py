"""Triton kernel for the distillation losses: per-row loss and the gradient w.r.t. the student logits in
one launch, so backward only has to scale.

One program per row, looping over vocabulary tiles, fp32 accumulation whatever the input dtype:
  pass 1: online log-sum-exp of s = z_S / T and t = z_T / T;
  pass 2: the loss terms; for forward KL also the gradient (p_S - p_T needs nothing more);
  pass 3 (other kinds): the gradient p_S * (h - c), where h = dL/dlog p_S and c = sum_j p_S,j h_j
          was accumulated in pass 2 (the softmax Jacobian needs this row constant).
The gradient is written once, in the input dtype, already multiplied by scale / T (scale: one device
scalar, or one value per row), so no [N, V] fp32 buffer exists. Rows whose label is ignore_index get
loss 0 and gradient 0 without reading the logits (padding rows may hold anything).

Kind codes follow adaswitch._validation.KIND_CODES; the JSD endpoints beta in {0, 1} and the skew
alpha = 0 are mapped to forward / reverse KL by the caller.
"""

import triton
import triton.language as tl

from adaswitch._backend import triton_interpreted

from .launch import launch, tile

NEG_BIG = -1.0e30  # log(0) for the mixture weights; finite so that 0 * NEG_BIG stays 0


@triton.jit
def _logaddexp(a, b):
    mx = tl.maximum(a, b)
    safe = tl.where(mx == float("-inf"), 0.0, mx)
    return safe + tl.log(tl.exp(a - safe) + tl.exp(b - safe))


@triton.jit
def _terms(ls, lt, log_w, log_1mw, w, KIND: tl.constexpr):
    """Loss term, gradient numerator h-part and its contribution to c for one tile (fp32).

    Returns (loss_term, ps * h, c_term) where grad = ps * h - ps * c with c = sum(c_term); for
    forward KL c_term is unused (the closed form p_S - p_T is used instead).
    """
    ps = tl.exp(ls)
    pt = tl.exp(lt)
    zero = tl.zeros_like(ls)
    if KIND == 0:  # forward KL: sum p_T (log p_T - log p_S)
        loss = tl.where(pt > 0, pt * (lt - ls), zero)
        psh = -pt
        cterm = zero
    elif KIND == 1:  # reverse KL: h = log p_S - log p_T
        d = tl.where(ps > 0, ls - lt, zero)
        loss = ps * d
        psh = ps * d
        cterm = psh
    elif KIND == 2:  # JSD, m = w p_T + (1 - w) p_S; h = (1 - w)(log p_S - log m)
        lm = _logaddexp(lt + log_w, ls + log_1mw)
        kt = tl.where(pt > 0, pt * (lt - lm), zero)
        ks = tl.where(ps > 0, ps * (ls - lm), zero)
        loss = w * kt + (1.0 - w) * ks
        psh = (1.0 - w) * ks
        cterm = psh
    elif KIND == 3:  # TVD: h = sign(p_S - p_T) / 2
        loss = 0.5 * tl.abs(pt - ps)
        sgn = tl.where(ps > pt, 1.0, tl.where(ps < pt, -1.0, 0.0))
        psh = 0.5 * ps * sgn
        cterm = psh
    elif KIND == 4:  # skew forward KL, m = w p_T + (1 - w) p_S; p_S h = -(1 - w) p_S p_T / m
        lm = _logaddexp(lt + log_w, ls + log_1mw)
        loss = tl.where(pt > 0, pt * (lt - lm), zero)
        r = tl.where((pt > 0) & (ps > 0), (1.0 - w) * tl.exp(ls + lt - lm), zero)
        psh = -r
        cterm = psh
    else:  # KIND == 5, skew reverse KL, m = w p_S + (1 - w) p_T; h = log p_S - log m - w p_S / m
        lm = _logaddexp(ls + log_w, lt + log_1mw)
        d = tl.where(ps > 0, ls - lm, zero)
        loss = ps * d
        psh = tl.where(ps > 0, ps * (d - w * tl.exp(ls - lm)), zero)
        cterm = psh
    return loss, psh, cterm


@triton.jit
def _distill_loss_fwd_kernel(
    S, T, G, LOSS, VALID, SCALE,
    stride_s, stride_t, stride_g, scale_stride,
    V, inv_temp, w, log_w, log_1mw,
    KIND: tl.constexpr, HAS_VALID: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_ptr = S + row * stride_s
    t_ptr = T + row * stride_t
    g_ptr = G + row * stride_g
    offs = tl.arange(0, BLOCK)
    valid = True
    if HAS_VALID:
        valid = tl.load(VALID + row) != 0
    if valid:
        # pass 1: online log-sum-exp of both rows
        m_s = tl.full((), float("-inf"), tl.float32)
        m_t = tl.full((), float("-inf"), tl.float32)
        d_s = tl.zeros((), tl.float32)
        d_t = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK):
            idx = start + offs
            mask = idx < V
            s = tl.load(s_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
            t = tl.load(t_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
            new_s = tl.maximum(m_s, tl.max(s, 0))
            new_t = tl.maximum(m_t, tl.max(t, 0))
            safe_s = tl.where(new_s == float("-inf"), 0.0, new_s)
            safe_t = tl.where(new_t == float("-inf"), 0.0, new_t)
            d_s = d_s * tl.exp(m_s - safe_s) + tl.sum(tl.exp(s - safe_s), 0)
            d_t = d_t * tl.exp(m_t - safe_t) + tl.sum(tl.exp(t - safe_t), 0)
            m_s = new_s
            m_t = new_t
        lse_s = m_s + tl.log(d_s)
        lse_t = m_t + tl.log(d_t)
        scale = 1.0
        if WRITE_GRAD:
            scale = tl.load(SCALE + row * scale_stride).to(tl.float32) * inv_temp
        # pass 2: loss terms (and the forward-KL gradient)
        loss_acc = tl.zeros((BLOCK,), tl.float32)
        c_acc = tl.zeros((BLOCK,), tl.float32)
        for start in range(0, V, BLOCK):
            idx = start + offs
            mask = idx < V
            s = tl.load(s_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
            t = tl.load(t_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
            ls = s - lse_s
            lt = t - lse_t
            loss, psh, cterm = _terms(ls, lt, log_w, log_1mw, w, KIND)
            loss_acc += tl.where(mask, loss, 0.0)
            c_acc += tl.where(mask, cterm, 0.0)
            if WRITE_GRAD:
                if KIND == 0:
                    grad = (tl.exp(ls) - tl.exp(lt)) * scale
                    tl.store(g_ptr + idx, grad.to(G.dtype.element_ty), mask=mask)
        tl.store(LOSS + row, tl.sum(loss_acc, 0))
        # pass 3: gradient p_S * h - p_S * c for the kinds that need the row constant c
        if WRITE_GRAD:
            if KIND != 0:
                c = tl.sum(c_acc, 0)
                for start in range(0, V, BLOCK):
                    idx = start + offs
                    mask = idx < V
                    s = tl.load(s_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
                    t = tl.load(t_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
                    ls = s - lse_s
                    lt = t - lse_t
                    loss, psh, cterm = _terms(ls, lt, log_w, log_1mw, w, KIND)
                    grad = (psh - tl.exp(ls) * c) * scale
                    tl.store(g_ptr + idx, grad.to(G.dtype.element_ty), mask=mask)
    else:
        tl.store(LOSS + row, 0.0)
        if WRITE_GRAD:
            for start in range(0, V, BLOCK):
                idx = start + offs
                tl.store(g_ptr + idx, tl.zeros((BLOCK,), G.dtype.element_ty), mask=idx < V)


def distill_loss_rows_triton(s, t, grad, loss_rows, valid, scale, kind_code, w, log_w, log_1mw, inv_temp):
    """Launches one program per row of the 2-D `s`, `t` ([N, V], unit stride along V).

    `grad` ([N, V], input dtype) may be None (loss only); `valid` is a bool/uint8 [N] tensor or None;
    `scale` is a float32 tensor with 1 element (broadcast) or N elements (per row).
    """
    n, vocab = s.shape
    write_grad = grad is not None
    g = grad if write_grad else s  # never written when WRITE_GRAD is False
    interpreted = not s.is_cuda and triton_interpreted()
    # 4096-entry tiles over 8 warps; where that makes ptxas spill (tests/test_triton_compile.py checks
    # every launch), 2048 over 8 for float64 inputs and 2048 over 4 for rows not 16-element aligned
    if interpreted:
        cap, num_warps = 65536, 1
    elif max(s.element_size(), t.element_size()) > 4:
        cap, num_warps = 2048, 8
    elif any(x.stride(0) % 16 for x in (s, t, g)):
        cap, num_warps = 2048, 4
    else:
        cap, num_warps = 4096, 8
    block = tile(vocab, cap)
    launch(
        _distill_loss_fwd_kernel, (n,), s, t, g, loss_rows, valid if valid is not None else loss_rows,
        scale if write_grad else loss_rows,
        s.stride(0), t.stride(0), g.stride(0), (1 if scale.numel() > 1 else 0) if write_grad else 0,
        vocab, inv_temp, w, log_w, log_1mw,
        KIND=kind_code, HAS_VALID=valid is not None, WRITE_GRAD=write_grad, BLOCK=block,
        num_warps=num_warps, device=s.device,
    )
