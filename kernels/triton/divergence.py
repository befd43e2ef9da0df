"""Per-row divergence between the student's and the teacher's softmax, one Triton program per row.

Each program walks its row in vocabulary tiles with an online (running-max) log-sum-exp in fp32 for
both distributions, in base 2 (`exp2` of logits pre-scaled by log2(e)/temperature). Nothing of size
[N, V] is ever written; the output is one float32 per row.

- forward/reverse KL read each logit once: KL(p_x || p_y) = sum_i p_x,i (x_i - y_i) - lse_x + lse_y,
  the expectation accumulated online next to the normaliser and rescaled with it.
- JSD, TVD and the skewed KLs need the exact per-entry mixture, so pass 1 finds both log-sum-exps
  and pass 2 reads the row again for the terms (twice in all).

Conventions (docs/spec.md section 1, as adaswitch/reference.py): 0 * log 0 = 0; +inf where p_x > 0 and
p_y = 0; a row that is all -inf or holds NaN gives NaN. The JSD endpoints beta = 0 / 1 and the skew
alpha = 0 are exactly the plain KLs and are routed to the one-pass kernel on the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adaswitch._backend import triton_interpreted

from .launch import launch, tile

LOG2E = 1.4426950408889634

# Kernel "modes" (host routes the six public kinds onto these).
_KL, _JSD, _TVD, _SKEW = 0, 1, 2, 3


@triton.jit
def _divergence_kernel(
    X, Y, OUT,
    stride_x_row, stride_x_col, stride_y_row, stride_y_col,
    V, scale, w,
    MODE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Row r of OUT = D(p_x, p_y) with p_x = softmax(X[r] / t), p_y = softmax(Y[r] / t).

    MODE _KL: KL(p_x || p_y). _JSD: w KL(p_x||m) + (1-w) KL(p_y||m), m = w p_x + (1-w) p_y.
    _TVD: 1/2 sum |p_x - p_y|. _SKEW: KL(p_x || w p_x + (1-w) p_y). `scale` = log2(e) / t.
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x_row
    y_row = Y + row * stride_y_row
    # int64 offsets: a column stride times a column index passes 2^31 on a transposed [16384, 151936]
    offs = tl.arange(0, BLOCK).to(tl.int64)

    # Pass 1: online base-2 log-sum-exp of both rows (and, for KL, E_{p_x}[x - y] unnormalised).
    m_x = float("-inf")
    z_x = 0.0
    m_y = float("-inf")
    z_y = 0.0
    acc = 0.0
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        x = tl.load(x_row + cols * stride_x_col, mask=mask, other=float("-inf")).to(tl.float32) * scale
        y = tl.load(y_row + cols * stride_y_col, mask=mask, other=float("-inf")).to(tl.float32) * scale

        mx_new = tl.maximum(m_x, tl.max(x, axis=0))
        mx_ref = tl.where(mx_new == float("-inf"), 0.0, mx_new)  # avoids (-inf) - (-inf)
        r_x = tl.exp2(m_x - mx_ref)
        e_x = tl.exp2(x - mx_ref)
        z_x = z_x * r_x + tl.sum(e_x, axis=0)

        my_new = tl.maximum(m_y, tl.max(y, axis=0))
        my_ref = tl.where(my_new == float("-inf"), 0.0, my_new)
        z_y = z_y * tl.exp2(m_y - my_ref) + tl.sum(tl.exp2(y - my_ref), axis=0)

        if MODE == 0:
            # entries with p_x = 0 contribute 0 (no 0 * inf); a finite x with y = -inf makes the
            # KL +inf, also where exp2(x - m) underflows in float32 (as in the float64 reference)
            term = tl.where(y == float("-inf"), float("inf"), e_x * (x - y))
            term = tl.where(x == float("-inf"), 0.0, term)
            acc = tl.where(acc == float("inf"), acc, acc * r_x) + tl.sum(term, axis=0)  # no inf * 0
        m_x = mx_new
        m_y = my_new

    log_zx = tl.log2(z_x)
    log_zy = tl.log2(z_y)
    lse_x = m_x + log_zx
    lse_y = m_y + log_zy

    if MODE == 0:
        # = E[x - y] - lse_x + lse_y, without rounding lse_x, lse_y at their (possibly large) scale
        res = (acc / z_x - (m_x - m_y) - (log_zx - log_zy)) * 0.6931471805599453
    else:
        # Pass 2: exact per-entry terms with the final normalisers.
        res = 0.0
        for start in range(0, V, BLOCK):
            cols = start + offs
            mask = cols < V
            x = tl.load(x_row + cols * stride_x_col, mask=mask, other=float("-inf")).to(tl.float32) * scale
            y = tl.load(y_row + cols * stride_y_col, mask=mask, other=float("-inf")).to(tl.float32) * scale
            lx = (x - m_x) - log_zx  # base-2 log-probabilities; x - m first keeps it exact near 0
            ly = (y - m_y) - log_zy
            px = tl.exp2(lx)
            py = tl.exp2(ly)
            if MODE == 2:
                term = tl.abs(px - py)
            else:
                mix = w * px + (1.0 - w) * py
                lm = tl.log2(mix)
                if MODE == 1:
                    wx = w * px
                    wy = (1.0 - w) * py
                    term = tl.where(wx > 0.0, wx * (lx - lm), 0.0) + tl.where(wy > 0.0, wy * (ly - lm), 0.0)
                else:
                    # mix == 0 with px > 0 only when w * px underflows: the term is below 1e-36
                    term = tl.where((px > 0.0) & (mix > 0.0), px * (lx - lm), 0.0)
            res += tl.sum(term, axis=0)
        if MODE == 2:
            res = 0.5 * res
        else:
            res = res * 0.6931471805599453

    # All -inf rows (lse = -inf), +inf logits (lse = +inf) and NaN rows give NaN: a NaN logit always
    # reaches z through exp2(NaN - m) = NaN, even where max() skips it (PTX max.f32 does).
    ok = (tl.abs(lse_x) < float("inf")) & (tl.abs(lse_y) < float("inf"))
    res = tl.where(ok, res, float("nan"))
    tl.store(OUT + row, res)


def _route(kind_code: int, beta: float, alpha: float) -> tuple[int, bool, float]:
    """Public kind -> (kernel mode, swap (student is x), weight), folding the exact endpoints."""
    if kind_code == 0:
        return _KL, False, 0.0
    if kind_code == 1:
        return _KL, True, 0.0
    if kind_code == 2:
        if beta == 0.0:  # TRL / Liger: beta = 0 is forward KL, beta = 1 reverse KL
            return _KL, False, 0.0
        if beta == 1.0:
            return _KL, True, 0.0
        return _JSD, False, beta
    if kind_code == 3:
        return _TVD, False, 0.0
    if kind_code in (4, 5):
        swap = kind_code == 5
        if alpha == 0.0:
            return _KL, swap, 0.0
        return _SKEW, swap, alpha
    raise ValueError(f"kind code must be in 0..5, got {kind_code!r}")


def _launch_config(vocab: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK, num_warps): tiles of up to 4096 entries on GPU; the interpreter prefers few big tiles."""
    if device.type != "cuda" and triton_interpreted():
        return tile(vocab, 8192), 1
    block = tile(vocab, 4096)
    return block, (4 if block <= 1024 else 8)


def token_divergence_triton(
    s2d: torch.Tensor, t2d: torch.Tensor, kind_code: int, beta: float, alpha: float, temperature: float
) -> torch.Tensor:
    """float32 [N] divergence for student/teacher logits [N, V] (any float dtype, any strides)."""
    if s2d.dim() != 2 or s2d.shape != t2d.shape:
        raise ValueError(f"expected two [N, V] tensors of one shape, got {tuple(s2d.shape)} and {tuple(t2d.shape)}")
    n_rows, vocab = s2d.shape
    out = torch.empty(n_rows, dtype=torch.float32, device=s2d.device)
    if n_rows == 0:
        return out
    mode, swap, weight = _route(kind_code, beta, alpha)
    x, y = (s2d, t2d) if swap else (t2d, s2d)
    block, num_warps = _launch_config(vocab, s2d.device)
    launch(
        _divergence_kernel, (n_rows,), x, y, out,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        vocab, LOG2E / temperature, float(weight),
        MODE=mode, BLOCK=block, num_warps=num_warps, device=s2d.device,
    )
    return out

