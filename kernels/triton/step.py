"""The fused decoding step in Triton: one program per row reads the row's student and teacher logits in
vocabulary tiles and, in the same loop, draws both models' Gumbel-max samples, accumulates the online
softmax statistics of the switching divergence and (SKD) ranks the draft among the teacher's logits;
then it applies the policy's decision and updates the row's switching state in place.

Lookahead splits the same work in two launches: `_lookahead_stats_kernel` (one program per drafted
position, B*G programs, fully parallel) and `_lookahead_scan_kernel` (one program per row, a short
loop over G that replays the step decision, stopping at the switch).

Random bits are the counter hash of adaswitch/ops/rng.py run in uint32, bit-identical to the PyTorch
reference; scores are (x * (1/T)) - log(-log u) with FMA fusion off (enable_fp_fusion=False) and, on a GPU,
libdevice's log, so they follow PyTorch's own float32 arithmetic. The divergence is accumulated in fp32 (forward/reverse KL in one pass over the row; JSD,
TVD and the skewed KLs read the row a second time for the exact per-entry mixture). The switch rule's
mean and threshold are fp64 so that both backends decide identically. Semantics: adaswitch/ops/step.py.
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from adaswitch._backend import triton_interpreted
from adaswitch._validation import KIND_CODES
from adaswitch.ops import rng
from adaswitch.policies import SCHEDULED, SKD, AdaSwitch, Mixed, Student, Teacher

from .launch import launch, tile

# Kernel divergence modes: the public kinds routed onto the four computations.
_NONE, _FKL, _RKL, _JSD, _TVD, _SKEW_F, _SKEW_R = -1, 0, 1, 2, 3, 4, 5


# ----------------------------------------------------------------------------------------------- hash

@triton.jit
def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * tl.full((), 0x85EBCA6B, tl.uint32)
    h = h ^ (h >> 13)
    h = h * tl.full((), 0xC2B2AE35, tl.uint32)
    return h ^ (h >> 16)


@triton.jit
def _combine(h, word):
    return _fmix32((h * tl.full((), 0x9E3779B1, tl.uint32)) ^ word)


@triton.jit
def _row_hash(seed_hash, key, position, STREAM: tl.constexpr):
    """rng.row_hash with the seed's part (rng.seed_hash) precomputed on the host."""
    h = seed_hash.to(tl.uint32)
    h = _combine(h, (key & 0xFFFFFFFF).to(tl.uint32))
    h = _combine(h, ((key >> 32) & 0xFFFFFFFF).to(tl.uint32))
    h = _combine(h, (position & 0xFFFFFFFF).to(tl.uint32))
    return _combine(h, tl.full((), STREAM, tl.uint32))


@triton.jit
def _uniform(rowh, cols):
    """rng.element_bits + rng.bits_to_uniform: (k + 0.5) / 2^23 with k the top 23 bits (exact in fp32)."""
    t = _fmix32((cols.to(tl.uint32) * tl.full((), 0x9E3779B1, tl.uint32)) ^ rowh)
    bits = _fmix32(t ^ ((rowh >> 7) | ((rowh & 0x7F) << 25)))
    return ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)


@triton.jit(do_not_specialize=["seed_hash", "V"])
def _uniform_kernel(KEYS, POS, OUT, seed_hash, V, STREAM: tl.constexpr, BLOCK: tl.constexpr):
    """OUT[b, :V] = rng.uniform(...): exposes the in-kernel bits to the tests. (The stream is named
    STREAM: Triton's launcher reserves the keyword `stream`.)"""
    row = tl.program_id(0).to(tl.int64)
    rowh = _row_hash(seed_hash, tl.load(KEYS + row), tl.load(POS + row), STREAM)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        tl.store(OUT + row * V + cols, _uniform(rowh, cols), mask=cols < V)


# ----------------------------------------------------------------------------------------- row pieces

@triton.jit
def _log(x, PRECISE: tl.constexpr):
    """Natural log for the Gumbel noise: libdevice's (the routine torch's CUDA log calls) on a GPU, where
    tl.log is a faster approximation; the interpreter's numpy log otherwise."""
    if PRECISE:
        y = libdevice.log(x)
    else:
        y = tl.log(x)
    return y


@triton.jit
def _score(x, cols, mask, rowh, inv_temp, thr, GREEDY: tl.constexpr, FILTER: tl.constexpr,
           PRECISE: tl.constexpr):
    """Gumbel-max score of one tile (greedy: the raw logit); -inf outside the row or the filter."""
    if GREEDY:
        score = x
    else:
        score = x * inv_temp
        if FILTER:
            score = tl.where(score >= thr, score, float("-inf"))
        score = score - _log(-_log(_uniform(rowh, cols), PRECISE), PRECISE)
    return tl.where(mask, score, float("-inf"))


@triton.jit
def _argmax_update(score, start, best, arg):
    """Running argmax over tiles; ties (within and across tiles) go to the lowest id."""
    tile_max = tl.max(score, axis=0)
    tile_arg = tl.argmax(score, axis=0, tie_break_left=True)
    upd = tile_max > best
    return tl.where(upd, tile_max, best), tl.where(upd, start + tile_arg, arg)


@triton.jit
def _online_lse(m, z, x):
    """One tile of the running-max log-sum-exp: returns the new max, rescaled sum, rescale and exps."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    r = tl.exp(m - m_ref)
    e = tl.exp(x - m_ref)
    return m_new, z * r + tl.sum(e, axis=0), r, e


@triton.jit
def _logaddexp(a, b):
    mx = tl.maximum(a, b)
    mref = tl.where(mx == float("-inf"), 0.0, mx)
    return tl.where(mx == float("-inf"), float("-inf"), mref + tl.log(tl.exp(a - mref) + tl.exp(b - mref)))


@triton.jit
def _kl_terms(lp, lq):
    """p * (log p - log q) per entry with 0 where p == 0 (0 * log 0 = 0)."""
    p = tl.exp(lp)
    return tl.where(p == 0.0, 0.0, p * (lp - lq))


@triton.jit
def _row_stats(
    s_row, t_row, V, rowh_s, rowh_t, inv_ts, inv_tt, thr_s, thr_t, draft,
    inv_td, log_w, log_1mw, w,
    NEED_YS: tl.constexpr, NEED_YT: tl.constexpr, GREEDY_S: tl.constexpr, GREEDY_T: tl.constexpr,
    FILTER_S: tl.constexpr, FILTER_T: tl.constexpr, KIND: tl.constexpr, RANK: tl.constexpr,
    PRECISE: tl.constexpr, BLOCK: tl.constexpr,
):
    """One row: the student's draw ys, the teacher's draw yt, the divergence d and the teacher rank of
    the draft (RANK 1: of ys, in a second pass over the teacher's logits; RANK 2: of the given `draft`,
    in the same pass). Logits are read once unless KIND or RANK 1 need a second pass.

    A `draft` outside [0, V) is never read: its rank is 2^62, so SKD rejects it (as the PyTorch path).
    The KLs follow the reference's conventions: an entry with p > 0 where the other side is -inf makes
    the KL +inf, also where exp underflows in fp32 (the float64 reference still sees p > 0), never the
    0 * inf = NaN of the plain product."""
    offs = tl.arange(0, BLOCK)
    best_s = float("-inf")
    best_t = float("-inf")
    ys = tl.zeros((), tl.int64)
    yt = tl.zeros((), tl.int64)
    m_s = float("-inf")
    z_s = 0.0
    m_t = float("-inf")
    z_t = 0.0
    acc = 0.0
    bad = 0.0
    rank = tl.zeros((), tl.int64)
    if RANK == 2:
        draft_ok = (draft >= 0) & (draft < V)
        t_draft = tl.load(t_row + tl.where(draft_ok, draft, 0), mask=draft_ok, other=0.0).to(tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        if NEED_YS or KIND >= 0:
            s = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if NEED_YT or KIND >= 0 or RANK == 2:
            t = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if NEED_YS:
            best_s, ys = _argmax_update(
                _score(s, cols, mask, rowh_s, inv_ts, thr_s, GREEDY_S, FILTER_S, PRECISE), start, best_s, ys)
        if NEED_YT:
            best_t, yt = _argmax_update(
                _score(t, cols, mask, rowh_t, inv_tt, thr_t, GREEDY_T, FILTER_T, PRECISE), start, best_t, yt)
        if RANK == 2:
            above = (t > t_draft) | ((t == t_draft) & (cols < draft))
            rank += tl.sum((above & mask).to(tl.int64), axis=0)
        if KIND >= 0:
            xs = s * inv_td
            xt = t * inv_td
            bad += tl.sum(((xs != xs) | (xt != xt)).to(tl.float32), axis=0)
            m_s_new, z_s, r_s, e_s = _online_lse(m_s, z_s, xs)
            m_t_new, z_t, r_t, e_t = _online_lse(m_t, z_t, xt)
            if KIND == 0:  # forward KL: E_{p_T}[t - s], unnormalised, rescaled with z_t (inf stays inf)
                term = tl.where(xs == float("-inf"), float("inf"), e_t * (xt - xs))
                term = tl.where(xt == float("-inf"), 0.0, term)
                acc = tl.where(acc == float("inf"), acc, acc * r_t) + tl.sum(term, axis=0)
            if KIND == 1:
                term = tl.where(xt == float("-inf"), float("inf"), e_s * (xs - xt))
                term = tl.where(xs == float("-inf"), 0.0, term)
                acc = tl.where(acc == float("inf"), acc, acc * r_s) + tl.sum(term, axis=0)
            m_s = m_s_new
            m_t = m_t_new
    if RANK == 2:
        rank = tl.where(draft_ok, rank, 1 << 62)
    if RANK == 1:
        t_ys = tl.load(t_row + ys).to(tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + offs
            mask = cols < V
            t = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32)
            above = (t > t_ys) | ((t == t_ys) & (cols < ys))
            rank += tl.sum((above & mask).to(tl.int64), axis=0)
    d = 0.0
    if KIND >= 0:
        lse_s = m_s + tl.log(z_s)
        lse_t = m_t + tl.log(z_t)
        if KIND == 0:
            d = acc / z_t - lse_t + lse_s
        elif KIND == 1:
            d = acc / z_s - lse_s + lse_t
        else:
            for start in range(0, V, BLOCK):
                cols = start + offs
                mask = cols < V
                lps = tl.load(s_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_td - lse_s
                lpt = tl.load(t_row + cols, mask=mask, other=float("-inf")).to(tl.float32) * inv_td - lse_t
                if KIND == 2:  # JSD, m = w p_T + (1 - w) p_S
                    lm = _logaddexp(lpt + log_w, lps + log_1mw)
                    term = w * _kl_terms(lpt, lm) + (1.0 - w) * _kl_terms(lps, lm)
                elif KIND == 3:
                    term = 0.5 * tl.abs(tl.exp(lpt) - tl.exp(lps))
                elif KIND == 4:  # KL(p_T || w p_T + (1 - w) p_S)
                    term = _kl_terms(lpt, _logaddexp(lpt + log_w, lps + log_1mw))
                else:  # KL(p_S || w p_S + (1 - w) p_T)
                    term = _kl_terms(lps, _logaddexp(lps + log_w, lpt + log_1mw))
                d += tl.sum(tl.where(mask, term, 0.0), axis=0)
        # NaN logits, all -inf rows (lse = -inf) and +inf logits (lse = +inf or NaN) give NaN
        ok = (bad == 0) & (tl.abs(lse_s) < float("inf")) & (tl.abs(lse_t) < float("inf"))
        d = tl.where(ok, d, float("nan"))
        d = tl.where(d < 0.0, 0.0, d)  # rounding of equal inputs (about -1e-7) is 0, as token_divergence; NaN stays
    return ys, yt, d, rank


@triton.jit
def _switch_rule(d, explore, position, ring, lanes, count, switched, switch_pos, L, min_hist, k64, f64, a64, at,
                 SCHEDULED: tl.constexpr):
    """The switching rule (docs/spec.md section 2.1) for one row at one position, on the row's state held in registers
    (ring: the L-slot window, float32). Returns (switch now, ring, count, switched, switch_pos); d
    joins the ring at slot count % L when the row keeps exploring and d is finite. AdaSwitch fires on
    the relative trigger, d > A or d = +inf; the scheduled controls at position >= at (adaswitch/ops/step.py)."""
    if SCHEDULED:
        fire = position >= at
    else:
        tau = k64 * (tl.sum(ring.to(tl.float64), axis=0) / L)
        d64 = d.to(tl.float64)
        fire = ((count >= min_hist) & (d64 > tau) & (d64 >= f64)) | (d64 > a64) | (d64 == float("inf"))
    switch = explore & fire
    push = explore & (switch == 0) & (tl.abs(d) < float("inf"))
    ring = tl.where(push & (lanes == count % L), d, ring)
    count = count + push.to(tl.int64)
    switch_pos = tl.where(switch, position, switch_pos)
    return switch, ring, count, switched | switch, switch_pos


# -------------------------------------------------------------------------------------------- kernels

@triton.jit(do_not_specialize=["V", "seed_hash", "L", "min_hist", "k_bits", "f_bits", "a_bits", "skd_k", "eos",
                               "pad"])
def _fused_step_kernel(
    S, T, stride_s, stride_t, V, THR_S, THR_T, KEYS, POS, seed_hash,
    WINDOW, COUNT, SWITCHED, SWITCH_POS, FINISHED, SWITCH_AT, TOKEN, FROM_T, DIV,
    inv_ts, inv_tt, inv_td, log_w, log_1mw, w, L, min_hist, k_bits, f_bits, a_bits, skd_k, eos, pad,
    CODE: tl.constexpr, NEED_YS: tl.constexpr, NEED_YT: tl.constexpr, GREEDY_S: tl.constexpr,
    GREEDY_T: tl.constexpr, FILTER_S: tl.constexpr, FILTER_T: tl.constexpr, KIND: tl.constexpr,
    PRECISE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_L: tl.constexpr, SCHEDULED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    key = tl.load(KEYS + row)
    position = tl.load(POS + row)
    rowh_s = _row_hash(seed_hash, key, position, 0)
    rowh_t = _row_hash(seed_hash, key, position, 1)
    thr_s = float("-inf")
    thr_t = float("-inf")
    if FILTER_S:
        thr_s = tl.load(THR_S + row)
    if FILTER_T:
        thr_t = tl.load(THR_T + row)
    ys, yt, d, rank = _row_stats(
        S + row * stride_s, T + row * stride_t, V, rowh_s, rowh_t, inv_ts, inv_tt, thr_s, thr_t, 0,
        inv_td, log_w, log_1mw, w, NEED_YS, NEED_YT, GREEDY_S, GREEDY_T, FILTER_S, FILTER_T, KIND,
        1 if CODE == 3 else 0, PRECISE, BLOCK)
    finished = tl.load(FINISHED + row) != 0
    div = float("nan")
    if CODE == 0 or CODE == 2:
        token = ys
        from_t = tl.zeros((), tl.int1)
    elif CODE == 1:
        token = yt
        from_t = tl.full((), 1, tl.int1)
    elif CODE == 3:
        from_t = rank >= skd_k
        token = tl.where(from_t, yt, ys)
    elif NEED_YS:  # AdaSwitch
        switched = tl.load(SWITCHED + row) != 0
        explore = (switched == 0) & (finished == 0)
        lanes = tl.arange(0, BLOCK_L)
        ring = tl.load(WINDOW + row * L + lanes, mask=lanes < L, other=0.0)
        at = tl.zeros((), tl.int64)
        if SCHEDULED:
            at = tl.load(SWITCH_AT + row)
        _, ring, count, switched, switch_pos = _switch_rule(
            d, explore, position, ring, lanes, tl.load(COUNT + row), switched, tl.load(SWITCH_POS + row), L,
            min_hist, k_bits.to(tl.int64).to(tl.float64, bitcast=True),
            f_bits.to(tl.int64).to(tl.float64, bitcast=True), a_bits.to(tl.int64).to(tl.float64, bitcast=True),
            at, SCHEDULED)
        tl.store(WINDOW + row * L + lanes, ring, mask=lanes < L)
        tl.store(COUNT + row, count)
        tl.store(SWITCHED + row, switched.to(tl.int8))
        tl.store(SWITCH_POS + row, switch_pos)
        from_t = switched
        token = tl.where(from_t, yt, ys)
        div = tl.where(explore, d, div)
    else:  # AdaSwitch without student logits: every live row has switched
        token = yt
        from_t = tl.full((), 1, tl.int1)
    live = finished == 0
    token = tl.where(live, token, pad)
    tl.store(TOKEN + row, token)
    tl.store(FROM_T + row, (from_t & live).to(tl.int8))
    tl.store(DIV + row, div)
    tl.store(FINISHED + row, (finished | (live & (token == eos))).to(tl.int8))


@triton.jit(do_not_specialize=["V", "G", "seed_hash", "skd_k"])
def _lookahead_stats_kernel(
    S, T, DRAFT, V, G, THR_T, KEYS, POS, seed_hash, YT, D, KEEP,
    inv_tt, inv_td, log_w, log_1mw, w, skd_k,
    GREEDY_T: tl.constexpr, FILTER_T: tl.constexpr, KIND: tl.constexpr, RANK: tl.constexpr,
    PRECISE: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program r = b * G + j: the teacher's draw, the divergence and (SKD) the draft's acceptance at
    drafted position j of row b."""
    r = tl.program_id(0).to(tl.int64)
    position = tl.load(POS + r // G) + r % G
    rowh_t = _row_hash(seed_hash, tl.load(KEYS + r // G), position, 1)
    thr_t = float("-inf")
    if FILTER_T:
        thr_t = tl.load(THR_T + r)
    draft = tl.load(DRAFT + r)
    _, yt, d, rank = _row_stats(
        S + r * V, T + r * V, V, rowh_t, rowh_t, 1.0, inv_tt, thr_t, thr_t, draft, inv_td, log_w, log_1mw,
        w, False, True, True, GREEDY_T, False, FILTER_T, KIND, RANK, PRECISE, BLOCK)
    tl.store(YT + r, yt)
    tl.store(D + r, d)
    tl.store(KEEP + r, (rank < skd_k).to(tl.int8))


@triton.jit(do_not_specialize=["G", "L", "min_hist", "k_bits", "f_bits", "a_bits", "eos", "pad"])
def _lookahead_scan_kernel(
    DRAFT, YT, D, KEEP, POS, G, WINDOW, COUNT, SWITCHED, SWITCH_POS, FINISHED, SWITCH_AT,
    ACCEPTED, TOKEN, FROM_T, DIV, L, min_hist, k_bits, f_bits, a_bits, eos, pad,
    CODE: tl.constexpr, BLOCK_L: tl.constexpr, SCHEDULED: tl.constexpr,
):
    """One row: replay the step decision over its G drafted positions, stopping at the switch / first
    rejected draft / EOS. Same state updates as G sequential fused steps."""
    row = tl.program_id(0).to(tl.int64)
    k64 = k_bits.to(tl.int64).to(tl.float64, bitcast=True)
    f64 = f_bits.to(tl.int64).to(tl.float64, bitcast=True)
    a64 = a_bits.to(tl.int64).to(tl.float64, bitcast=True)
    position = tl.load(POS + row)
    at = tl.zeros((), tl.int64)
    if SCHEDULED:
        at = tl.load(SWITCH_AT + row)
    finished = tl.load(FINISHED + row) != 0
    lanes = tl.arange(0, BLOCK_L)
    ring = tl.load(WINDOW + row * L + lanes, mask=lanes < L, other=0.0)
    count = tl.load(COUNT + row)
    switched = tl.load(SWITCHED + row) != 0
    switch_pos = tl.load(SWITCH_POS + row)
    active = finished == 0
    accepted = tl.zeros((), tl.int64)
    token = tl.zeros((), tl.int64) + pad
    from_t = tl.zeros((), tl.int1)
    for j in range(G):
        r = row * G + j
        yt = tl.load(YT + r)
        drafted = tl.load(DRAFT + r)
        if CODE == 4:
            d = tl.load(D + r)
            was_switched = active & switched
            explore = active & (switched == 0)
            switch, ring, count, switched, switch_pos = _switch_rule(
                d, explore, position + j, ring, lanes, count, switched, switch_pos, L, min_hist, k64, f64, a64,
                at, SCHEDULED)
            tl.store(DIV + r, tl.where(explore, d, float("nan")))
            stop = was_switched | switch
        elif CODE == 3:
            stop = active & (tl.load(KEEP + r) == 0)
        elif CODE == 1:
            stop = active
        else:
            stop = tl.zeros((), tl.int1)
        token = tl.where(stop, yt, token)
        from_t = from_t | stop
        accept = active & (stop == 0)
        accepted += accept.to(tl.int64)
        done = (accept & (drafted == eos)) | (stop & (yt == eos))
        finished = finished | done
        active = accept & (done == 0)
    if CODE == 4:
        tl.store(WINDOW + row * L + lanes, ring, mask=lanes < L)
        tl.store(COUNT + row, count)
        tl.store(SWITCHED + row, switched.to(tl.int8))
        tl.store(SWITCH_POS + row, switch_pos)
    tl.store(FINISHED + row, finished.to(tl.int8))
    tl.store(ACCEPTED + row, accepted)
    tl.store(TOKEN + row, token)
    tl.store(FROM_T + row, from_t.to(tl.int8))


# --------------------------------------------------------------------------------------------- host

def _f64_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _inv(sampling) -> float:
    return 1.0 if sampling.greedy else 1.0 / sampling.temperature


def _divergence_args(policy):
    """(kernel mode, 1/T_d, log w, log(1 - w), w) for AdaSwitch; endpoints routed onto the plain KLs."""
    if not isinstance(policy, AdaSwitch):
        return _NONE, 1.0, 0.0, 0.0, 0.0
    kind = KIND_CODES[policy.divergence]
    w = policy.beta if policy.divergence == "jsd" else policy.alpha
    if policy.divergence == "jsd" and w in (0.0, 1.0):
        kind = _FKL if w == 0.0 else _RKL
    if policy.divergence.startswith("skew") and w == 0.0:
        kind = _FKL if policy.divergence == "skew_forward_kl" else _RKL
    log_w = math.log(w) if w > 0 else float("-inf")
    log_1mw = math.log1p(-w) if w < 1 else float("-inf")
    return kind, 1.0 / policy.divergence_temperature, log_w, log_1mw, w


def _rule_args(policy, state):
    """(L, max(L, W), K bits, F bits, A bits, scheduled, switch_at): unscheduled policies pass `state.count`
    as the switch_at pointer, which the kernel then never reads."""
    scheduled = isinstance(policy, SCHEDULED)
    at = state.switch_at if scheduled else state.count
    if isinstance(policy, AdaSwitch):
        return (policy.window, policy.min_history, _f64_bits(policy.k), _f64_bits(policy.min_divergence),
                _f64_bits(policy.max_divergence), scheduled, at)
    return state.window.shape[1], 0, _f64_bits(math.inf), 0, _f64_bits(math.inf), False, at


def _block(vocab: int) -> int:
    return tile(vocab, 4096)


def _warps(block: int) -> int:
    """8 warps once a tile is wide enough to keep them busy (one program streams a whole row)."""
    return 8 if block >= 2048 else 4


def _rowmajor(x):
    return x if x.stride(-1) == 1 else x.contiguous()


def _as_i8(flag: torch.Tensor) -> torch.Tensor:
    return flag.view(torch.int8)


def fused_step_triton(student_logits, teacher_logits, policy, state, seed, keys, position, eos, pad):
    """Launches `_fused_step_kernel`; validated arguments (adaswitch.ops.step.fused_step)."""
    ref = teacher_logits if teacher_logits is not None else student_logits
    batch, vocab = ref.shape
    device = ref.device
    need_ys = student_logits is not None and isinstance(policy, (Student, Mixed, SKD, AdaSwitch))
    need_yt = teacher_logits is not None and isinstance(policy, (Teacher, SKD, AdaSwitch))
    ss, ts = policy.student_sampling, policy.teacher_sampling
    kind, inv_td, log_w, log_1mw, w = _divergence_args(policy) if need_ys else (_NONE, 1.0, 0.0, 0.0, 0.0)
    s = _rowmajor(student_logits) if student_logits is not None else ref
    t = _rowmajor(teacher_logits) if teacher_logits is not None else ref
    thr_s = rng.sampling_threshold(student_logits, ss) if need_ys else None
    thr_t = rng.sampling_threshold(teacher_logits, ts) if need_yt else None
    length, min_hist, k_bits, f_bits, a_bits, scheduled, at = _rule_args(policy, state)
    token = torch.empty(batch, dtype=torch.int64, device=device)
    from_t = torch.empty(batch, dtype=torch.bool, device=device)
    div = torch.empty(batch, dtype=torch.float32, device=device)
    launch(
        _fused_step_kernel, (batch,), s, t, s.stride(0), t.stride(0), vocab,
        thr_s if thr_s is not None else div, thr_t if thr_t is not None else div,
        keys, position, rng.seed_hash(seed),
        state.window, state.count, _as_i8(state.switched), state.switch_pos, _as_i8(state.finished), at,
        token, _as_i8(from_t), div,
        _inv(ss), _inv(ts), inv_td, log_w, log_1mw, w, length, min_hist, k_bits, f_bits, a_bits,
        policy.top_k if isinstance(policy, SKD) else 0, eos, pad,
        CODE=policy.code, NEED_YS=need_ys, NEED_YT=need_yt, GREEDY_S=ss.greedy, GREEDY_T=ts.greedy,
        FILTER_S=thr_s is not None, FILTER_T=thr_t is not None, KIND=kind, PRECISE=not triton_interpreted(),
        BLOCK=_block(vocab), BLOCK_L=triton.next_power_of_2(length), SCHEDULED=scheduled, enable_fp_fusion=False,
        num_warps=_warps(_block(vocab)), device=device,
    )
    from adaswitch.ops.step import StepOutput

    return StepOutput(token, from_t, div)


def fused_lookahead_triton(student_logits, teacher_logits, draft, policy, state, seed, keys, position, eos,
                           pad):
    """Launches the stats kernel over B*G drafted positions, then the per-row scan."""
    batch, g, vocab = teacher_logits.shape
    device = teacher_logits.device
    s = student_logits.reshape(batch * g, vocab).contiguous()
    t = teacher_logits.reshape(batch * g, vocab).contiguous()
    flat_draft = draft.contiguous()
    ts = policy.teacher_sampling
    thr_t = rng.sampling_threshold(t, ts)
    kind, inv_td, log_w, log_1mw, w = _divergence_args(policy)
    yt = torch.empty(batch * g, dtype=torch.int64, device=device)
    d = torch.empty(batch * g, dtype=torch.float32, device=device)
    keep = torch.empty(batch * g, dtype=torch.bool, device=device)
    launch(
        _lookahead_stats_kernel, (batch * g,), s, t, flat_draft, vocab, g, thr_t if thr_t is not None else d, keys, position, rng.seed_hash(seed),
        yt, d, _as_i8(keep), _inv(ts), inv_td, log_w, log_1mw, w,
        policy.top_k if isinstance(policy, SKD) else 0,
        GREEDY_T=ts.greedy, FILTER_T=thr_t is not None, KIND=kind, RANK=2 if isinstance(policy, SKD) else 0,
        PRECISE=not triton_interpreted(), BLOCK=_block(vocab), enable_fp_fusion=False,
        num_warps=_warps(_block(vocab)), device=device,
    )
    length, min_hist, k_bits, f_bits, a_bits, scheduled, at = _rule_args(policy, state)
    accepted = torch.empty(batch, dtype=torch.int64, device=device)
    token = torch.empty(batch, dtype=torch.int64, device=device)
    from_t = torch.empty(batch, dtype=torch.bool, device=device)
    div = torch.full((batch, g), math.nan, dtype=torch.float32, device=device)
    launch(
        _lookahead_scan_kernel, (batch,), flat_draft, yt, d, _as_i8(keep), position, g, state.window, state.count, _as_i8(state.switched),
        state.switch_pos, _as_i8(state.finished), at, accepted, token, _as_i8(from_t), div,
        length, min_hist, k_bits, f_bits, a_bits, eos, pad,
        CODE=policy.code, BLOCK_L=triton.next_power_of_2(length), SCHEDULED=scheduled, device=device,
    )
    from adaswitch.ops.step import LookaheadOutput

    return LookaheadOutput(accepted, token, from_t, div)


def uniform_triton(seed: int, keys: torch.Tensor, positions: torch.Tensor, stream: int, vocab: int):
    """float32 [B, vocab] uniforms from the kernels' hash (tests compare them with rng.uniform)."""
    out = torch.empty(keys.shape[0], vocab, dtype=torch.float32, device=keys.device)
    launch(_uniform_kernel, (keys.shape[0],), keys, positions, out, rng.seed_hash(seed), vocab, STREAM=stream,
           BLOCK=_block(vocab), device=keys.device)
    return out
