"""Triton kernel for the distillation losses: per-row loss and the gradient w.r.t. the student logits in
one launch, so backward only has to scale.

One program per row, looping over vocabulary tiles, fp32 accumulation whatever the input dtype:
  pass 1: online log-sum-exp of s = z_S / T and t = z_T / T (and of z_S / T_h for a hard-label term at
          another temperature);
  pass 2: the loss terms; for forward KL also the gradient (p_S - p_T needs nothing more);
  pass 3 (other kinds): the gradient p_S * (h - c), where h = dL/dlog p_S and c = sum_j p_S,j h_j
          was accumulated in pass 2 (the softmax Jacobian needs this row constant).
The optional hard-label term w_row * -log softmax(z_S / T_h)[y_row] (Liger's weight_hard_loss; with a
negative w_row and T_h = T also the sampled-token policy gradient of adaswitch/ops/sampled.py) adds
w_row * (softmax(z_S / T_h) - onehot(y)) / T_h to the gradient in whichever pass writes it; without a soft
term (kind code -1) the teacher is not read.
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
def _online_lse(m, d, x):
    """One tile of an online log-sum-exp: (running max, running sum of exp(x - max)) updated by x."""
    new = tl.maximum(m, tl.max(x, 0))
    safe = tl.where(new == float("-inf"), 0.0, new)
    return new, d * tl.exp(m - safe) + tl.sum(tl.exp(x - safe), 0)


@triton.jit
def _hard_grad(z, idx, label, lse_h, hard_w, inv_temp_hard):
    """d (hard_w * -log softmax(z * inv_temp_hard)[label]) / dz for one tile: hard_w * (q - onehot) / T_h."""
    q = tl.exp(z * inv_temp_hard - lse_h)
    return hard_w * inv_temp_hard * (q - tl.where(idx == label, 1.0, 0.0))


@triton.jit
def _distill_loss_fwd_kernel(
    S, T, G, LOSS, VALID, SCALE, LABELS, HARD_W,
    stride_s, stride_t, stride_g, scale_stride,
    V, inv_temp, w, log_w, log_1mw, soft_w, inv_temp_hard,
    KIND: tl.constexpr, HAS_SOFT: tl.constexpr, HAS_HARD: tl.constexpr, HARD_SAME_TEMP: tl.constexpr,
    HAS_VALID: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
):
    # S, T, G: [N, V] (row strides given, unit stride along V); LOSS: [N] fp32; VALID: [N] bool;
    # SCALE: [1] or [N] fp32 (scale_stride 0 / 1); LABELS: [N] int64, the hard-label targets (in [0, V));
    # HARD_W: [N] fp32, each row's hard-label weight (0 where the row has no target)
    row = tl.program_id(0).to(tl.int64)
    s_ptr = S + row * stride_s
    t_ptr = T + row * stride_t
    g_ptr = G + row * stride_g
    offs = tl.arange(0, BLOCK)
    valid = True
    if HAS_VALID:
        valid = tl.load(VALID + row) != 0
    if valid:
        # pass 1: online log-sum-exp of s = z_S / T and t = z_T / T (soft term), h = z_S * inv_temp_hard
        m_s = tl.full((), float("-inf"), tl.float32)
        m_t = tl.full((), float("-inf"), tl.float32)
        m_h = tl.full((), float("-inf"), tl.float32)
        d_s = tl.zeros((), tl.float32)
        d_t = tl.zeros((), tl.float32)
        d_h = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK):
            idx = start + offs
            mask = idx < V
            z = tl.load(s_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32)
            if HAS_SOFT:
                s = z * inv_temp
                t = tl.load(t_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
                m_s, d_s = _online_lse(m_s, d_s, s)
                m_t, d_t = _online_lse(m_t, d_t, t)
            if HAS_HARD:
                if not HARD_SAME_TEMP:
                    m_h, d_h = _online_lse(m_h, d_h, z * inv_temp_hard)
        lse_s = m_s + tl.log(d_s)
        lse_t = m_t + tl.log(d_t)
        lse_h = m_h + tl.log(d_h)
        if HARD_SAME_TEMP:
            lse_h = lse_s
        hard_w = 0.0
        label = 0
        row_loss = 0.0
        if HAS_HARD:
            hard_w = tl.load(HARD_W + row).to(tl.float32)
            label = tl.load(LABELS + row).to(tl.int64)
            z_y = tl.load(s_ptr + label).to(tl.float32) * inv_temp_hard
            row_loss = tl.where(hard_w != 0.0, hard_w * (lse_h - z_y), 0.0)
        scale = 1.0
        if WRITE_GRAD:
            scale = tl.load(SCALE + row * scale_stride).to(tl.float32)
        # pass 2: soft loss terms; the whole gradient when it needs no row constant (forward KL, hard only)
        loss_acc = tl.zeros((BLOCK,), tl.float32)
        c_acc = tl.zeros((BLOCK,), tl.float32)
        if HAS_SOFT or WRITE_GRAD:
            for start in range(0, V, BLOCK):
                idx = start + offs
                mask = idx < V
                z = tl.load(s_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32)
                grad = tl.zeros((BLOCK,), tl.float32)
                if HAS_SOFT:
                    t = tl.load(t_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
                    ls = z * inv_temp - lse_s
                    lt = t - lse_t
                    loss, psh, cterm = _terms(ls, lt, log_w, log_1mw, w, KIND)
                    loss_acc += tl.where(mask, loss, 0.0)
                    c_acc += tl.where(mask, cterm, 0.0)
                    if KIND == 0:
                        grad = (tl.exp(ls) - tl.exp(lt)) * (soft_w * inv_temp)
                if WRITE_GRAD:
                    if (not HAS_SOFT) or KIND == 0:
                        if HAS_HARD:
                            grad += _hard_grad(z, idx, label, lse_h, hard_w, inv_temp_hard)
                        tl.store(g_ptr + idx, (grad * scale).to(G.dtype.element_ty), mask=mask)
        if HAS_SOFT:
            row_loss += soft_w * tl.sum(loss_acc, 0)
        tl.store(LOSS + row, row_loss)
        # pass 3: gradient p_S * h - p_S * c for the soft kinds that need the row constant c
        if WRITE_GRAD:
            if HAS_SOFT and KIND != 0:
                c = tl.sum(c_acc, 0)
                for start in range(0, V, BLOCK):
                    idx = start + offs
                    mask = idx < V
                    z = tl.load(s_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32)
                    t = tl.load(t_ptr + idx, mask=mask, other=float("-inf")).to(tl.float32) * inv_temp
                    ls = z * inv_temp - lse_s
                    lt = t - lse_t
                    loss, psh, cterm = _terms(ls, lt, log_w, log_1mw, w, KIND)
                    grad = (psh - tl.exp(ls) * c) * (soft_w * inv_temp)
                    if HAS_HARD:
                        grad += _hard_grad(z, idx, label, lse_h, hard_w, inv_temp_hard)
                    tl.store(g_ptr + idx, (grad * scale).to(G.dtype.element_ty), mask=mask)
    else:
        tl.store(LOSS + row, 0.0)
        if WRITE_GRAD:
            for start in range(0, V, BLOCK):
                idx = start + offs
                tl.store(g_ptr + idx, tl.zeros((BLOCK,), G.dtype.element_ty), mask=idx < V)


def distill_loss_rows_triton(s, t, grad, loss_rows, valid, scale, kind_code, w, log_w, log_1mw, inv_temp, *,
                             soft_weight=1.0, hard=None):
    """Launches one program per row of the 2-D `s`, `t` ([N, V], unit stride along V).

    `grad` ([N, V], input dtype) may be None (loss only); `valid` is a bool/uint8 [N] tensor or None;
    `scale` is a float32 tensor with 1 element (broadcast) or N elements (per row). kind_code -1: no soft
    term (`t` is not read). `hard`: None, or (targets [N] int64, weights [N] float32, inverse temperature)
    of the hard-label term weights * -log softmax(z_S * inverse temperature)[target].
    """
    n, vocab = s.shape
    write_grad = grad is not None
    g = grad if write_grad else s  # never written when WRITE_GRAD is False
    has_soft = kind_code >= 0
    t = t if has_soft else s  # never read without a soft term
    labels, hard_w, inv_temp_hard = hard if hard is not None else (loss_rows, loss_rows, 1.0)
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
    same_temp = hard is not None and has_soft and inv_temp_hard == inv_temp
    if hard is not None and has_soft and not same_temp and not interpreted:
        cap = min(cap, 2048)  # the hard term's own softmax beside the soft term's spills at 4096 (JSD, bf16)
    block = tile(vocab, cap)
    launch(
        _distill_loss_fwd_kernel, (n,), s, t, g, loss_rows, valid if valid is not None else loss_rows,
        scale if write_grad else loss_rows, labels, hard_w,
        s.stride(0), t.stride(0), g.stride(0), (1 if scale.numel() > 1 else 0) if write_grad else 0,
        vocab, inv_temp, w, log_w, log_1mw, soft_weight, inv_temp_hard,
        KIND=max(kind_code, 0), HAS_SOFT=has_soft, HAS_HARD=hard is not None,
        HARD_SAME_TEMP=same_temp,
        HAS_VALID=valid is not None, WRITE_GRAD=write_grad, BLOCK=block,
        num_warps=num_warps, device=s.device,
    )
