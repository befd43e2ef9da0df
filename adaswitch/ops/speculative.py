"""Speculative teacher guidance: the fused accept / resample op that lets the teacher write up to G + 1
tokens per forward while every token it writes keeps the teacher's own sampling distribution.

The student drafts d_j ~ p_S (adaswitch.ops.rng stream 0, the draft's usual draw) at G positions; the
teacher scores them in one forward. From each row's `start` index on, draft j is accepted with probability
min(1, p_T(d_j) / p_S(d_j)); at the first rejection the row's token is a draw from
norm(max(0, p_T - p_S)) and the row stops there. p_T and p_S are the sampling distributions of the two
models (softmax of logits / temperature restricted by top_k / top_p, renormalised; a greedy side is the
point mass at its argmax, ties to the lowest id), so every token written from `start` on is distributed
exactly as a draw from p_T (the speculative-sampling identity). Greedy teachers get exactly their argmax:
the draft is accepted iff it is the argmax, else the residual is the point mass at the argmax.

Bonus token: when the teacher also scored the position after the last draft (teacher logits [B, G + 1, V],
its input being d_{G-1}), a row that accepts every draft from `start` on (start < G) without an EOS takes
one more token, at index G, drawn from p_T there: the residual rule with nothing drafted (p_S = 0, so the
residual is p_T), hence G + 1 teacher tokens for one teacher forward. With [B, G, V] teacher logits there
is no bonus.

Draws: the acceptance uniform is rng stream 3 (index 0) at the draft's response position, the residual's
Gumbel noise rng stream 5 there; the bonus at index G takes stream 5 at position + G: argmax(log p_T + g),
the residual rule with p_S = 0, so the one rule serves both. All are pure functions of (seed, example key,
position), so the tokens do not depend on batch composition or implementation. No kept token's noise
entered an earlier decision: the scan reads nothing past a row's first rejection and takes the bonus only
after accepting every draft, so what the next block draws again at those positions is still unused. A row
whose residual is zero everywhere (possible only through fp32 rounding after a rejection) draws from p_T
with the stream-5 noise.

Implementations: the Triton kernels (kernels/triton/speculative.py: a stats kernel over the B*G drafted
positions and the B bonus positions, and a per-row scan), the native CPU op (kernels/csrc/speculative.cpp
for the per-position statistics, the scan in PyTorch ops) and the PyTorch reference below. No host sync
anywhere.
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
    """accepted int64 [B]: drafts accepted from `start` on; token int64 [B]: the teacher's own draw at index
    start + accepted where `resampled` (the residual draw) or `bonus` (the p_T draw at index G), else pad;
    resampled bool [B]: a draft was rejected; bonus bool [B]: every draft from `start` on was accepted and
    the row took the bonus token (only with [B, G + 1, V] teacher logits); finished bool [B]: the row
    emitted EOS (an accepted EOS draft, a residual or a bonus EOS draw)."""

    accepted: torch.Tensor
    token: torch.Tensor
    resampled: torch.Tensor
    bonus: torch.Tensor
    finished: torch.Tensor


def _check(student_logits, teacher_logits, draft, start, student_sampling, teacher_sampling, seed, keys,
           position, eos, pad):
    for name, x, dims in (("student_logits", student_logits, "[B, G, V]"),
                          ("teacher_logits", teacher_logits, "[B, G, V] or [B, G + 1, V]")):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be a float {dims} tensor, got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    b, g, v = student_logits.shape
    if teacher_logits.shape not in ((b, g, v), (b, g + 1, v)) or student_logits.device != teacher_logits.device:
        raise ValueError(f"teacher_logits must be [B, G, V] or [B, G + 1, V] (the bonus position) for "
                         f"student_logits [B, G, V] = {tuple(student_logits.shape)} on {student_logits.device}, "
                         f"got {tuple(teacher_logits.shape)} on {teacher_logits.device}")
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


def _stats_torch(s, t, draft, student_sampling, teacher_sampling, seed, keys, positions, g, gt):
    """Per teacher position (t: [B * GT, V], the first G of each row's GT drafted; s: [B * G, V], draft:
    [B * G]): p_T(draft), p_S(draft) and the residual draw; a bonus position (index G) has no draft and
    p_S = 0 there, so its residual is p_T and its draw argmax(log p_T + g)."""
    vocab = t.shape[-1]
    b = t.shape[0] // gt
    pt = sampling_probs(t, teacher_sampling)
    ps = pt.new_zeros(b, gt, vocab)
    ps[:, :g] = sampling_probs(s, student_sampling).view(b, g, vocab)
    ps = ps.view(b * gt, vocab)
    drafts = torch.full((b, gt), -1, dtype=torch.int64, device=t.device)
    drafts[:, :g] = draft.view(b, g)
    drafts = drafts.view(-1)
    ok = (drafts >= 0) & (drafts < vocab)
    safe = torch.where(ok, drafts, torch.zeros_like(drafts))[:, None]
    q = torch.where(ok, pt.gather(1, safe)[:, 0], torch.zeros_like(pt[:, 0]))
    p = torch.where(ok, ps.gather(1, safe)[:, 0], torch.zeros_like(ps[:, 0]))
    noise = rng.gumbel(seed, keys, positions, rng.STREAM_RESIDUAL, vocab)
    residual = (pt - ps).clamp(min=0)
    z = torch.argmax(torch.log(residual) + noise, -1)
    z_teacher = torch.argmax(torch.log(pt) + noise, -1)
    z = torch.where((residual > 0).any(-1), z, z_teacher)
    return q, p, z


def _stats_native(s, t, draft, student_sampling, teacher_sampling, seed, keys, positions, g, gt):
    def inv(sm):
        return 1.0 if sm.greedy else 1.0 / sm.temperature

    thr_s = rng.sampling_threshold(s, student_sampling)
    thr_t = rng.sampling_threshold(t, teacher_sampling)
    return native_ops().speculative_stats(s, t, draft, keys, positions, rng.seed_hash(seed), inv(student_sampling),
                                          inv(teacher_sampling), thr_s, thr_t, student_sampling.greedy,
                                          teacher_sampling.greedy, g, gt)


def _scan(q, p, z, u, draft, start, eos, pad) -> SpeculativeOutput:
    """The per-row accept / resample scan over G positions (q, p, u, draft: [B, G]; z: [B, GT], GT = G + 1
    when the teacher scored the bonus position), then the bonus of rows that accepted every draft."""
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
    bonus = active & (z.shape[1] > g)  # still active: every draft from start on accepted, no EOS
    if z.shape[1] > g:
        token = torch.where(bonus, z[:, g], token)
        finished |= bonus & (z[:, g] == eos)
    return SpeculativeOutput(accepted, token, resampled, bonus, finished)


# ---------------------------------------------------------------------------------------------- public

@torch.no_grad()
def fused_speculative(student_logits, teacher_logits, draft, start, *, student_sampling: Sampling,
                      teacher_sampling: Sampling, seed: int, keys: torch.Tensor, position: torch.Tensor,
                      eos_token_id: int, pad_token_id: int, impl: str | None = None) -> SpeculativeOutput:
    """Speculative accept / resample of G drafted positions per row, from index `start` on, and the bonus
    token after them when the teacher scored one more position (no host sync).

    Args:
        student_logits: [B, G, V], the student's logits the drafts were drawn from (stream 0, with
            `student_sampling`).
        teacher_logits: [B, G + 1, V], the teacher's logits at the drafted positions and the one after them
            (one teacher forward on [last, d_0 .. d_{G-1}]): a row that accepts all its drafts takes a
            bonus token drawn from p_T at index G. [B, G, V] (the forward on [last, d_0 .. d_{G-2}]): no
            bonus.
        draft: int64 [B, G], the drafted tokens (an id outside [0, V) has p_T = p_S = 0: rejected).
        start: int64 [B], the index where the row's guided positions begin; start >= G: the row takes
            nothing here (accepted 0, not resampled, no bonus).
        student_sampling, teacher_sampling: the draft's and the teacher's sampling settings.
        seed, keys: the RNG's seed and each row's example key; position: int64 [B], the response index of
            draft[:, 0].
        eos_token_id: a row stops after an accepted or drawn EOS; pad_token_id: `token` where no draw.
        impl: "auto", "triton", "native" or "torch" (as `fused_step`).

    Returns:
        SpeculativeOutput(accepted, token, resampled, bonus, finished). The row's guided tokens are
        draft[start : start + accepted] and then `token` where `resampled` or `bonus`; each is distributed
        as p_T.
    """
    _check(student_logits, teacher_logits, draft, start, student_sampling, teacher_sampling, seed, keys,
           position, eos_token_id, pad_token_id)
    b, g, vocab = student_logits.shape
    gt = teacher_logits.shape[1]
    which = resolve_impl(impl, teacher_logits.device, native_op="speculative_stats")
    if which == "triton":
        from adaswitch.kernels.triton.speculative import fused_speculative_triton

        return fused_speculative_triton(student_logits, teacher_logits, draft, start, student_sampling,
                                        teacher_sampling, seed, keys, position, eos_token_id, pad_token_id)
    positions = position[:, None] + torch.arange(gt, device=position.device)
    flat_keys = keys[:, None].expand(b, gt).reshape(-1)
    s = student_logits.reshape(b * g, vocab)
    t = teacher_logits.reshape(b * gt, vocab)
    stats = _stats_native if which == "native" else _stats_torch
    q, p, z = stats(s, t, draft.reshape(-1), student_sampling, teacher_sampling, seed, flat_keys,
                    positions.reshape(-1), g, gt)
    u = rng.uniform(seed, flat_keys.view(b, gt)[:, :g].reshape(-1), positions[:, :g].reshape(-1),
                    rng.STREAM_ACCEPT, 1)[:, 0]
    return _scan(q.view(b, gt)[:, :g], p.view(b, gt)[:, :g], z.view(b, gt), u.view(b, g), draft, start,
                 eos_token_id, pad_token_id)
