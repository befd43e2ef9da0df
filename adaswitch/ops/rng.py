"""Counter-based random numbers (docs/spec.md section 3) and Gumbel-max sampling.

Every draw is a pure function of (seed, example key, response position, stream, vocabulary index):
no generator state, so a row's draws do not depend on batch composition, computation order, backend or
decoding mode. The hash is murmur3's 32-bit finaliser (fmix32) chained over the counters. PyTorch runs
it on int64 tensors masked to 32 bits (products split in 16-bit halves so nothing overflows int64);
the Triton kernels run the same rounds in uint32 (kernels/triton/step.py), so the uniforms are
bit-identical on every backend.

Uniforms take 23 bits: u = (k + 0.5) / 2^23, k = bits >> 9, which is exact in float32 and lies in the
open interval (0, 1) (24 bits would need 25 mantissa bits to stay off 0 and 1).

Streams: 0 the student's draw, 1 the teacher's draw, 2 the Mixed policy's per-sequence coin, 4 the
RandomSwitch control's per-sequence switch position; 3 and 5 the speculative guidance's acceptance
uniform and residual draw (adaswitch.ops.speculative).
"""

from __future__ import annotations

import torch

STREAM_STUDENT = 0
STREAM_TEACHER = 1
STREAM_MIXED = 2
STREAM_ACCEPT = 3
STREAM_RESIDUAL = 5
STREAM_SWITCH = 4

MASK32 = 0xFFFFFFFF
_M1 = 0x85EBCA6B  # murmur3 fmix32 multipliers
_M2 = 0xC2B2AE35
_GOLDEN = 0x9E3779B1  # odd: multiplication by it is a bijection mod 2^32
_SALT = 0x243F6A88  # pi's fraction bits: the chain's starting value
_INV_2_23 = 1.0 / (1 << 23)


def check_seed(seed) -> tuple[int, int]:
    """A Python int in [-2^63, 2^64) -> its (low, high) 32-bit words."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not (-(1 << 63) <= seed < (1 << 64)):
        raise TypeError(f"seed must be a Python int in [-2**63, 2**64), got {seed!r}")
    seed &= (1 << 64) - 1
    return seed & MASK32, seed >> 32


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    """(a * c) mod 2^32 for int64 a in [0, 2^32) without overflowing int64."""
    lo = a * (c & 0xFFFF)
    hi = ((a * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, _M1)
    h = h ^ (h >> 13)
    h = _mul32(h, _M2)
    return h ^ (h >> 16)


def _combine(h: torch.Tensor, word) -> torch.Tensor:
    return fmix32(_mul32(h, _GOLDEN) ^ word)


def _fmix32_int(h: int) -> int:
    h ^= h >> 16
    h = (h * _M1) & MASK32
    h ^= h >> 13
    h = (h * _M2) & MASK32
    return h ^ (h >> 16)


def seed_hash(seed: int) -> int:
    """The seed's part of the chain, a Python int in [0, 2^32) (computed once on the host)."""
    seed_lo, seed_hi = check_seed(seed)
    h = _fmix32_int(((_SALT * _GOLDEN) & MASK32) ^ seed_lo)
    return _fmix32_int(((h * _GOLDEN) & MASK32) ^ seed_hi)


def row_hash(seed: int, keys: torch.Tensor, positions: torch.Tensor, stream: int) -> torch.Tensor:
    """The per-row part of the hash: int64 [B] in [0, 2^32) from seed, keys [B], positions [B], stream."""
    keys = keys.long()
    h = torch.full_like(keys, seed_hash(seed))
    h = _combine(h, keys & MASK32)
    h = _combine(h, (keys >> 32) & MASK32)
    h = _combine(h, positions.long() & MASK32)
    return _combine(h, stream)


def element_bits(rowh: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """32 random bits per (row, vocabulary index): two more rounds over the index."""
    t = fmix32(_mul32(index & MASK32, _GOLDEN) ^ rowh)
    return fmix32(t ^ ((rowh >> 7) | ((rowh & 0x7F) << 25)))


def bits_to_uniform(bits: torch.Tensor) -> torch.Tensor:
    return ((bits >> 9).float() + 0.5) * _INV_2_23


def uniform(seed: int, keys: torch.Tensor, positions: torch.Tensor, stream: int, vocab: int) -> torch.Tensor:
    """float32 [B, vocab] uniforms in (0, 1) for rows (keys[b], positions[b]) of `stream`."""
    rowh = row_hash(seed, keys, positions, stream)
    index = torch.arange(vocab, device=keys.device, dtype=torch.int64)
    return bits_to_uniform(element_bits(rowh[:, None], index[None, :]))


def gumbel(seed: int, keys: torch.Tensor, positions: torch.Tensor, stream: int, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise g = -log(-log u), float32 [B, vocab]."""
    return -torch.log(-torch.log(uniform(seed, keys, positions, stream, vocab)))


def mixed_coin(seed: int, keys: torch.Tensor, lmbda: float) -> torch.Tensor:
    """The Mixed policy's per-sequence coin: bool [B], True (the student generates) with probability lmbda.

    u(seed, key, position 0, stream 2, index 0) < lmbda, so lmbda = 0 is never and lmbda = 1 always.
    """
    zero = torch.zeros_like(keys, dtype=torch.int64)
    u = bits_to_uniform(element_bits(row_hash(seed, keys, zero, STREAM_MIXED), zero))
    return u < lmbda


def switch_draw(seed: int, keys: torch.Tensor) -> torch.Tensor:
    """The RandomSwitch control's per-sequence uniform: float32 [B], u(seed, key, position 0, stream 4,
    index 0)."""
    zero = torch.zeros_like(keys, dtype=torch.int64)
    return bits_to_uniform(element_bits(row_hash(seed, keys, zero, STREAM_SWITCH), zero))


def filter_threshold(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Per-row threshold (float32 [B]) on temperature-scaled logits: entries >= it survive top_k/top_p.

    top_k keeps the k largest (ties at the k-th value all kept, as transformers' TopKLogitsWarper);
    top_p then keeps the smallest set of largest-probability tokens of the (top_k-restricted)
    distribution whose cumulative probability reaches top_p (ties at the boundary all kept). Sorting on
    the device, no host sync. -inf means no filtering.
    """
    x = scaled.float()
    vocab = x.shape[-1]
    thr = torch.full(x.shape[:-1], float("-inf"), device=x.device, dtype=torch.float32)
    if top_k > 0 and top_k < vocab:
        thr = torch.topk(x, top_k, dim=-1).values[..., -1]
        x = torch.where(x >= thr[..., None], x, torch.full_like(x, float("-inf")))
    if top_p < 1.0:
        sorted_x = torch.sort(x, dim=-1, descending=True).values
        cum = torch.softmax(sorted_x, dim=-1).cumsum(-1)
        last = (cum < top_p).sum(-1, keepdim=True).clamp_(max=vocab - 1)
        thr = torch.maximum(thr, sorted_x.gather(-1, last).squeeze(-1))
    return thr.contiguous()


def scale_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """float32 logits times float32(1 / temperature): the exact operation the Triton kernel performs."""
    return logits.float() * (1.0 / temperature)


def sampling_threshold(logits: torch.Tensor, sampling) -> torch.Tensor | None:
    """filter_threshold of `sampling` on logits / temperature, or None when nothing is filtered."""
    if not sampling.filtered:
        return None
    return filter_threshold(scale_logits(logits, sampling.temperature), sampling.top_k, sampling.top_p)


def sample(logits: torch.Tensor, sampling, *, seed: int, keys: torch.Tensor, positions: torch.Tensor,
           stream: int) -> torch.Tensor:
    """Gumbel-max draw (int64 [B]) from softmax(logits / temperature) restricted by top_k/top_p.

    token = argmax(logits / temperature + g) over the surviving entries; temperature 0 is the greedy
    argmax. Ties go to the lowest id (torch.argmax returns the first maximum).
    """
    if sampling.greedy:
        return torch.argmax(logits.float(), dim=-1)
    x = scale_logits(logits, sampling.temperature)
    if sampling.filtered:
        thr = filter_threshold(x, sampling.top_k, sampling.top_p)
        x = torch.where(x >= thr[..., None], x, torch.full_like(x, float("-inf")))
    return torch.argmax(x + gumbel(seed, keys, positions, stream, x.shape[-1]), dim=-1)
