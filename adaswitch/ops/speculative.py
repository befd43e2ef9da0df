"""Speculative teacher guidance: the fused accept / resample op that lets the teacher write G tokens per
forward while every token it writes keeps the teacher's own sampling distribution.

The student drafts d_j ~ p_S (adaswitch.ops.rng stream 0, the draft's usual draw) at G positions; the
teacher scores them in one forward. From each row's `start` index on, draft j is accepted with probability
min(1, p_T(d_j) / p_S(d_j)); at the first rejection the row's token is a draw from
norm(max(0, p_T - p_S)) and the row stops there. p_T and p_S are the sampling distributions of the two
models (softmax of logits / temperature restricted by top_k / top_p, renormalised; a greedy side is the
point mass at its argmax, ties to the lowest id), so every token written from `start` on is distributed
exactly as a draw from p_T (the speculative-sampling identity). Greedy teachers get exactly their argmax:
the draft is accepted iff it is the argmax, else the residual is the point mass at the argmax.

Draws: the acceptance uniform is rng stream 3 (index 0) at the position, the residual's Gumbel noise
rng stream 5 at the position; both pure functions of (seed, example key, position), so the tokens do not
depend on batch composition or implementation. A row whose residual is zero everywhere (possible only
through fp32 rounding after a rejection) draws from p_T with the stream-5 noise.

Implementations: the Triton kernels (kernels/triton/speculative.py: a stats kernel over the B*G drafted
positions and a per-row scan), the native CPU op (kernels/csrc/speculative.cpp for the per-position
statistics, the scan in PyTorch ops) and the PyTorch reference below. No host sync anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adaswitch._backend import native_ops, resolve_impl
from adaswitch._validation import FLOAT_DTYPES
from adaswitch.ops import rng
from adaswitch.policies import Sampling


@dataclass
class SpeculativeOutput:
    """accepted int64 [B]: drafts accepted from `start` on; token int64 [B]: the residual draw at index
    start + accepted where `resampled`, else pad; resampled bool [B]; finished bool [B]: the row emitted
    EOS (an accepted EOS draft or a residual EOS draw)."""

    accepted: torch.Tensor
    token: torch.Tensor
    resampled: torch.Tensor
    finished: torch.Tensor


def _check(student_logits, teacher_logits, draft, start, student_sampling, teacher_sampling, seed, keys,
           position, eos, pad):
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be a float [B, G, V] tensor, got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if student_logits.shape != teacher_logits.shape or student_logits.device != teacher_logits.device:
        raise ValueError(f"student_logits and teacher_logits must have one shape and device, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    b, g, _ = teacher_logits.shape
    device = teacher_logits.device
    for name, x, shape in (("draft", draft, (b, g)), ("start", start, (b,)), ("keys", keys, (b,)),
                           ("position", position, (b,))):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.int64 or tuple(x.shape) != shape \
                or x.device != device:
            raise ValueError(f"{name} must be an int64 tensor of shape {shape} on {device}, got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    for name, s in (("student_sampling", student_sampling), ("teacher_sampling", teacher_sampling)):
        if not isinstance(s, Sampling):
            raise TypeError(f"{name} must be an adaswitch.Sampling, got {type(s).__name__}")
    rng.check_seed(seed)
    for name, v in (("eos_token_id", eos), ("pad_token_id", pad)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be a Python int, got {type(v).__name__}")


# ------------------------------------------------------------------------------------------- reference

def sampling_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """float32 [N, V]: the distribution a draw with `sampling` follows (rng.sample's), as exp(x - max) / sum
    over the entries the filter keeps; greedy: the point mass at the argmax (ties to the lowest id)."""
    if sampling.greedy:
        x = logits.float()
        return torch.nn.functional.one_hot(torch.argmax(x, -1), x.shape[-1]).float()
    x = rng.scale_logits(logits, sampling.temperature)
    if sampling.filtered:
        thr = rng.filter_threshold(x, sampling.top_k, sampling.top_p)
        x = torch.where(x >= thr[..., None], x, torch.full_like(x, float("-inf")))
    e = torch.exp(x - x.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def _stats_torch(s, t, draft, student_sampling, teacher_sampling, seed, keys, positions):
    """Per drafted position (rows of [N, V]): p_T(draft), p_S(draft) and the residual draw."""
    ps, pt = sampling_probs(s, student_sampling), sampling_probs(t, teacher_sampling)
    vocab = t.shape[-1]
    ok = (draft >= 0) & (draft < vocab)
    safe = torch.where(ok, draft, torch.zeros_like(draft))[:, None]
    q = torch.where(ok, pt.gather(1, safe)[:, 0], torch.zeros_like(pt[:, 0]))
    p = torch.where(ok, ps.gather(1, safe)[:, 0], torch.zeros_like(ps[:, 0]))
    g = rng.gumbel(seed, keys, positions, rng.STREAM_RESIDUAL, vocab)
    residual = (pt - ps).clamp(min=0)
    z = torch.argmax(torch.log(residual) + g, -1)
    z_teacher = torch.argmax(torch.log(pt) + g, -1)
    z = torch.where((residual > 0).any(-1), z, z_teacher)
    return q, p, z


def _stats_native(s, t, draft, student_sampling, teacher_sampling, seed, keys, positions):
    def inv(sm):
        return 1.0 if sm.greedy else 1.0 / sm.temperature

    thr_s = rng.sampling_threshold(s, student_sampling)
    thr_t = rng.sampling_threshold(t, teacher_sampling)
    return native_ops().speculative_stats(s, t, draft, keys, positions, rng.seed_hash(seed), inv(student_sampling),
                                          inv(teacher_sampling), thr_s, thr_t, student_sampling.greedy,
                                          teacher_sampling.greedy)


def _scan(q, p, z, u, draft, start, eos, pad) -> SpeculativeOutput:
    """The per-row accept / resample scan over G positions (q, p, z, u, draft: [B, G])."""
    b, g = draft.shape
    device = draft.device
    active = start < g
    accepted = torch.zeros(b, dtype=torch.int64, device=device)
    token = torch.full((b,), pad, dtype=torch.int64, device=device)
    resampled = torch.zeros(b, dtype=torch.bool, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    for j in range(g):
        on = active & (start <= j)
        acc = u[:, j] * p[:, j] < q[:, j]
        take, reject = on & acc, on & ~acc
        accepted += take.long()
        token = torch.where(reject, z[:, j], token)
        resampled |= reject
        done = (take & (draft[:, j] == eos)) | (reject & (z[:, j] == eos))
        finished |= done
        active = active & ~reject & ~done
    return SpeculativeOutput(accepted, token, resampled, finished)


# ---------------------------------------------------------------------------------------------- public

@torch.no_grad()
def fused_speculative(student_logits, teacher_logits, draft, start, *, student_sampling: Sampling,
                      teacher_sampling: Sampling, seed: int, keys: torch.Tensor, position: torch.Tensor,
                      eos_token_id: int, pad_token_id: int, impl: str | None = None) -> SpeculativeOutput:
    """Speculative accept / resample of G drafted positions per row, from index `start` on (no host sync).

    Args:
        student_logits: [B, G, V], the student's logits the drafts were drawn from (stream 0, with
            `student_sampling`).
        teacher_logits: [B, G, V], the teacher's logits at the same positions (one teacher forward).
        draft: int64 [B, G], the drafted tokens (an id outside [0, V) has p_T = p_S = 0: rejected).
        start: int64 [B], the index where the row's guided positions begin; start >= G: the row takes
            nothing here (accepted 0, not resampled).
        student_sampling, teacher_sampling: the draft's and the teacher's sampling settings.
        seed, keys: the RNG's seed and each row's example key; position: int64 [B], the response index of
            draft[:, 0].
        eos_token_id: a row stops after an accepted or drawn EOS; pad_token_id: `token` where no draw.
        impl: "auto", "triton", "native" or "torch" (as `fused_step`).

    Returns:
        SpeculativeOutput(accepted, token, resampled, finished). The row's guided tokens are
        draft[start : start + accepted] and then `token` where `resampled`; each is distributed as p_T.
    """
    _check(student_logits, teacher_logits, draft, start, student_sampling, teacher_sampling, seed, keys,
           position, eos_token_id, pad_token_id)
    b, g, vocab = teacher_logits.shape
    which = resolve_impl(impl, teacher_logits.device, native_op="speculative_stats")
    if which == "triton":
        from adaswitch.kernels.triton.speculative import fused_speculative_triton

        return fused_speculative_triton(student_logits, teacher_logits, draft, start, student_sampling,
                                        teacher_sampling, seed, keys, position, eos_token_id, pad_token_id)
    positions = position[:, None] + torch.arange(g, device=position.device)
    flat_keys = keys[:, None].expand(b, g).reshape(-1)
    flat_pos = positions.reshape(-1)
    s = student_logits.reshape(b * g, vocab)
    t = teacher_logits.reshape(b * g, vocab)
    stats = _stats_native if which == "native" else _stats_torch
    q, p, z = stats(s, t, draft.reshape(-1), student_sampling, teacher_sampling, seed, flat_keys, flat_pos)
    u = rng.uniform(seed, flat_keys, flat_pos, rng.STREAM_ACCEPT, 1)[:, 0]
    return _scan(q.view(b, g), p.view(b, g), z.view(b, g), u.view(b, g), draft, start, eos_token_id,
                 pad_token_id)
