"""flash-attn decode path for `RowCache`: `flash_attn_with_kvcache` reads each row's cache bounds directly.

`generate` uses it on CUDA when flash-attn (>= 2.6, for `cache_leftpad`) is importable and the model runs
in fp16 / bf16; otherwise the model's own SDPA attention reads the same cache through an explicit mask.
The function is registered with transformers' `AttentionInterface` under `ATTENTION_NAME` and switched
on for the duration of a `generate` call only (`kvcache_attention(model)`), so the user's model is left
as it was. The cache's bounds reach it through the forward's keyword arguments (`adaswitch_cache`),
which transformers passes down to every attention call.

`flash_attn_with_kvcache_reference` is the same contract in plain PyTorch (float32 math): the CPU tests
run the whole flash path through it, and the GPU script checks the real kernel against it.
"""

from __future__ import annotations

import contextlib
import inspect
import math

import torch

ATTENTION_NAME = "adaswitch_kvcache"
_flash_fn = None


def _load_flash():
    """flash_attn_with_kvcache if a flash-attn with `cache_leftpad` is importable, else None."""
    global _flash_fn
    if _flash_fn is None:
        try:
            from flash_attn import flash_attn_with_kvcache
        except Exception:  # not installed, or built against another torch / CUDA
            _flash_fn = False
        else:
            ok = "cache_leftpad" in inspect.signature(flash_attn_with_kvcache).parameters
            _flash_fn = flash_attn_with_kvcache if ok else False
    return _flash_fn or None


def flash_available(model) -> bool:
    """The flash path applies: CUDA model in fp16 / bf16, head dim <= 256, flash-attn importable."""
    param = next(model.parameters())
    config = model.config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return (param.is_cuda and param.dtype in (torch.float16, torch.bfloat16) and head_dim <= 256
            and _load_flash() is not None)


def flash_attn_with_kvcache_reference(q, k_cache, v_cache, cache_seqlens, cache_leftpad=None, softmax_scale=None,
                                      causal=True):
    """PyTorch statement of flash_attn_with_kvcache without new k/v: q [B, q, H, D], k_cache / v_cache
    [B, C, H_kv, D]; row b attends to columns leftpad[b] .. cache_seqlens[b] - 1, causal aligned to the
    bottom right (query i sees columns < cache_seqlens[b] - q + i + 1); a query that sees nothing gives 0."""
    b, nq, h, d = q.shape
    c, h_kv = k_cache.shape[1], k_cache.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    k = k_cache.float().repeat_interleave(h // h_kv, dim=2)
    v = v_cache.float().repeat_interleave(h // h_kv, dim=2)
    scores = torch.einsum("bqhd,bchd->bhqc", q.float(), k) * scale
    cols = torch.arange(c, device=q.device)[None, None, :]
    end = cache_seqlens.long()[:, None, None]
    left = cache_leftpad.long()[:, None, None] if cache_leftpad is not None else torch.zeros_like(end)
    visible = (cols >= left) & (cols < end)  # [B, 1, C]
    if causal:
        visible = visible & (cols <= end - nq + torch.arange(nq, device=q.device)[None, :, None])
    scores = scores.masked_fill(~visible[:, None], -math.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked query rows: 0
    return torch.einsum("bhqc,bchd->bqhd", probs, v.float()).to(q.dtype)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [B, H, q, D]; key / value are the cache's [B, H_kv, C, D]
    views of [B, C, H_kv, D] buffers. Returns [B, q, H, D] as transformers' attention functions do."""
    cache = kwargs.get("adaswitch_cache")
    if cache is None:
        raise RuntimeError(f"the {ATTENTION_NAME} attention runs only inside adaswitch.generate")
    fn = _load_flash() or flash_attn_with_kvcache_reference
    out = fn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), cache_seqlens=cache.kv_end,
             cache_leftpad=cache.kv_start, softmax_scale=scaling, causal=True)
    return out, None


def _register() -> None:
    from transformers import AttentionInterface

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, _attention)


@contextlib.contextmanager
def kvcache_attention(model):
    """Run `model` with the flash-attn cache attention inside the block, then restore its own."""
    _register()
    config = model.config.get_text_config(decoder=True)
    before = config._attn_implementation
    config._attn_implementation_internal = ATTENTION_NAME
    try:
        yield
    finally:
        config._attn_implementation_internal = before
