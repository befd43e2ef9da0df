"""Speculative teacher guidance in Triton (semantics: adaswitch/ops/speculative.py).

Two launches, as lookahead: `_speculative_stats_kernel`, one program per teacher position (B*GT
programs, GT = G, or G + 1 with the bonus position), reads both rows twice in vocabulary tiles (pass 1:
each side's online max / sum, or its argmax when greedy; pass 2: the residual max(0, p_T - p_S) and its
Gumbel-max draw, rng stream 5) and stores p_T(draft), p_S(draft) and the residual token; at the bonus
position nothing is drafted (p_S = 0: the residual is p_T, the draw a p_T draw). `_speculative_scan_kernel`,
one program per row, runs the accept / resample scan over G with the stream-3 acceptance uniforms, then
takes the bonus of a row that accepted every draft. The hash is the step kernels' (uint32, bit-identical to
adaswitch/ops/rng.py); FMA fusion off, libdevice's log on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from adaswitch._backend import triton_interpreted
from adaswitch.ops import rng

from .launch import launch, tile
from .step import _argmax_update, _log, _row_hash, _uniform


@triton.jit
def _side_logits(x, mask, inv_t, thr, FILTER: tl.constexpr):
    """One side's masked, tempered logits of a tile: x / temperature, -inf below the top-k / top-p threshold
    and outside `mask` (the row's end; a bonus position's student side)."""
    xs = x * inv_t
    if FILTER:
        xs = tl.where(xs >= thr, xs, float("-inf"))
    return tl.where(mask, xs, float("-inf"))


@triton.jit
def _side_pass1(row, cols, mask, inv_t, thr, m, z, best, arg, start, GREEDY: tl.constexpr, FILTER: tl.constexpr):
    """Loads one side's tile and folds it into the side's online max / sum (its argmax when greedy)."""
    x = tl.load(row + cols, mask=mask, other=float("-inf")).to(tl.float32)
    if GREEDY:
        best, arg = _argmax_update(tl.where(mask, x, float("-inf")), start, best, arg)
    else:
        xs = _side_logits(x, mask, inv_t, thr, FILTER)
        m_new = tl.maximum(m, tl.max(xs, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        z = z * tl.exp(m - m_ref) + tl.sum(tl.exp(xs - m_ref), axis=0)
        m = m_new
    return m, z, best, arg


@triton.jit
def _side_prob(row, cols, mask, inv_t, thr, m, z, arg, GREEDY: tl.constexpr, FILTER: tl.constexpr):
    """p(cols) of one side from its pass-1 statistics; 0 outside `mask`."""
    if GREEDY:
        p = tl.where(mask & (cols == arg), 1.0, 0.0)
    else:
        x = tl.load(row + cols, mask=mask, other=float("-inf")).to(tl.float32)
        p = tl.where(mask, tl.exp(_side_logits(x, mask, inv_t, thr, FILTER) - m) / z, 0.0)
    return p


@triton.jit(do_not_specialize=["V", "G", "GT", "seed_hash"])
def _speculative_stats_kernel(
    S, T, DRAFT, V, G, GT, THR_S, THR_T, KEYS, POS, seed_hash, Q, P, Z, inv_ts, inv_tt,
    GREEDY_S: tl.constexpr, GREEDY_T: tl.constexpr, FILTER_S: tl.constexpr, FILTER_T: tl.constexpr,
    PRECISE: tl.constexpr, BLOCK: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)  # teacher row: batch row r // GT, index j = r % GT
    j = r % GT
    drafted = j < G  # else the bonus position: no draft, the student's side is empty (p_S = 0)
    rs = r // GT * G + tl.where(drafted, j, 0)  # the student's row (a bonus reads none of it)
    v_s = tl.where(drafted, V, 0)  # the student's columns (a mask bound rather than `mask & drafted`)
    position = tl.load(POS + r // GT) + j
    rowh = _row_hash(seed_hash, tl.load(KEYS + r // GT), position, 5)
    s_row = S + rs * V
    t_row = T + r * V
    thr_s = float("-inf")
    thr_t = float("-inf")
    if FILTER_S:
        thr_s = tl.load(THR_S + rs)
    if FILTER_T:
        thr_t = tl.load(THR_T + r)
    offs = tl.arange(0, BLOCK)
    m_s = float("-inf")
    z_s = 0.0
    m_t = float("-inf")
    z_t = 0.0
    best_s = float("-inf")
    best_t = float("-inf")
    arg_s = tl.zeros((), tl.int64)
    arg_t = tl.zeros((), tl.int64)
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        m_s, z_s, best_s, arg_s = _side_pass1(s_row, cols, cols < v_s, inv_ts, thr_s, m_s, z_s, best_s, arg_s,
                                              start, GREEDY_S, FILTER_S)
        m_t, z_t, best_t, arg_t = _side_pass1(t_row, cols, mask, inv_tt, thr_t, m_t, z_t, best_t, arg_t, start,
                                              GREEDY_T, FILTER_T)
    draft = tl.where(drafted, tl.load(DRAFT + rs), -1)
    ok = (draft >= 0) & (draft < V)
    safe = tl.where(ok, draft, 0)
    inside = safe < V  # always: the loads at `safe` stay in the rows
    q = tl.where(ok, _side_prob(t_row, safe, inside, inv_tt, thr_t, m_t, z_t, arg_t, GREEDY_T, FILTER_T), 0.0)
    p = tl.where(ok, _side_prob(s_row, safe, inside, inv_ts, thr_s, m_s, z_s, arg_s, GREEDY_S, FILTER_S), 0.0)
    best = float("-inf")
    arg = tl.zeros((), tl.int64)
    best_f = float("-inf")
    arg_f = tl.zeros((), tl.int64)
    any_res = tl.zeros((), tl.int32)
    for start in range(0, V, BLOCK):
        cols = start + offs
        mask = cols < V
        ps = _side_prob(s_row, cols, cols < v_s, inv_ts, thr_s, m_s, z_s, arg_s, GREEDY_S, FILTER_S)
        pt = _side_prob(t_row, cols, mask, inv_tt, thr_t, m_t, z_t, arg_t, GREEDY_T, FILTER_T)
        res = tl.maximum(pt - ps, 0.0)
        any_res += tl.sum((mask & (res > 0.0)).to(tl.int32), axis=0)
        g = -_log(-_log(_uniform(rowh, cols), PRECISE), PRECISE)
        best, arg = _argmax_update(tl.where(mask, _log(res, PRECISE) + g, float("-inf")), start, best, arg)
        best_f, arg_f = _argmax_update(tl.where(mask, _log(pt, PRECISE) + g, float("-inf")), start, best_f, arg_f)
    tl.store(Q + r, q)
    tl.store(P + r, p)
    tl.store(Z + r, tl.where(any_res > 0, arg, arg_f))


@triton.jit(do_not_specialize=["G", "GT", "seed_hash", "eos", "pad"])
def _speculative_scan_kernel(Q, P, Z, DRAFT, START, KEYS, POS, G, GT, seed_hash, ACCEPTED, TOKEN, RESAMPLED, BONUS,
                             FINISHED, eos, pad):
    row = tl.program_id(0).to(tl.int64)
    key = tl.load(KEYS + row)
    position = tl.load(POS + row)
    start = tl.load(START + row)
    active = start < G
    accepted = tl.zeros((), tl.int64)
    token = tl.zeros((), tl.int64) + pad
    resampled = tl.zeros((), tl.int1)
    finished = tl.zeros((), tl.int1)
    for j in range(G):
        r = row * GT + j
        u = _uniform(_row_hash(seed_hash, key, position + j, 3), tl.zeros((), tl.int64))
        on = active & (start <= j)
        acc = u * tl.load(P + r) < tl.load(Q + r)
        take = on & acc
        reject = on & (acc == 0)
        z = tl.load(Z + r)
        accepted += take.to(tl.int64)
        token = tl.where(reject, z, token)
        resampled = resampled | reject
        done = (take & (tl.load(DRAFT + row * G + j) == eos)) | (reject & (z == eos))
        finished = finished | done
        active = active & (reject == 0) & (done == 0)
    bonus = active & (GT > G)  # every draft from start on accepted, no EOS, and the teacher scored index G
    z_bonus = tl.load(Z + row * GT + GT - 1)  # index G where it exists (else unused)
    token = tl.where(bonus, z_bonus, token)
    finished = finished | (bonus & (z_bonus == eos))
    tl.store(ACCEPTED + row, accepted)
    tl.store(TOKEN + row, token)
    tl.store(RESAMPLED + row, resampled.to(tl.int8))
    tl.store(BONUS + row, bonus.to(tl.int8))
    tl.store(FINISHED + row, finished.to(tl.int8))


def _inv(sampling) -> float:
    return 1.0 if sampling.greedy else 1.0 / sampling.temperature


def fused_speculative_triton(student_logits, teacher_logits, draft, start, student_sampling, teacher_sampling,
                             seed, keys, position, eos, pad):
    """Launches the stats kernel over the B*GT teacher positions, then the per-row scan (validated arguments)."""
    from adaswitch.ops.speculative import SpeculativeOutput

    batch, g, vocab = student_logits.shape
    gt = teacher_logits.shape[1]
    device = teacher_logits.device
    s = student_logits.reshape(batch * g, vocab).contiguous()
    t = teacher_logits.reshape(batch * gt, vocab).contiguous()
    thr_s = rng.sampling_threshold(s, student_sampling)
    thr_t = rng.sampling_threshold(t, teacher_sampling)
    flat_draft = draft.contiguous()
    q = torch.empty(batch * gt, dtype=torch.float32, device=device)
    p = torch.empty(batch * gt, dtype=torch.float32, device=device)
    z = torch.empty(batch * gt, dtype=torch.int64, device=device)
    block = tile(vocab, 4096)
    seed_hash = rng.seed_hash(seed)
    launch(
        _speculative_stats_kernel, (batch * gt,), s, t, flat_draft, vocab, g, gt,
        thr_s if thr_s is not None else q, thr_t if thr_t is not None else q, keys, position, seed_hash,
        q, p, z, _inv(student_sampling), _inv(teacher_sampling),
        GREEDY_S=student_sampling.greedy, GREEDY_T=teacher_sampling.greedy, FILTER_S=thr_s is not None,
        FILTER_T=thr_t is not None, PRECISE=not triton_interpreted(), BLOCK=block, enable_fp_fusion=False,
        num_warps=8 if block >= 2048 else 4, device=device,
    )
    accepted = torch.empty(batch, dtype=torch.int64, device=device)
    token = torch.empty(batch, dtype=torch.int64, device=device)
    resampled = torch.empty(batch, dtype=torch.bool, device=device)
    bonus = torch.empty(batch, dtype=torch.bool, device=device)
    finished = torch.empty(batch, dtype=torch.bool, device=device)
    launch(
        _speculative_scan_kernel, (batch,), q, p, z, flat_draft, start.contiguous(), keys, position, g, gt,
        seed_hash, accepted, token, resampled.view(torch.int8), bonus.view(torch.int8), finished.view(torch.int8),
        eos, pad, device=device,
    )
    return SpeculativeOutput(accepted, token, resampled, bonus, finished)
