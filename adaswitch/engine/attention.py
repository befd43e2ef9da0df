"""flash-attn decode path for `RowCache`: `flash_attn_with_kvcache` reads each row's cache bounds directly.

`generate` uses it on CUDA when flash-attn (>= 2.6, for `cache_leftpad`) is importable and the model runs
in fp16 / bf16; otherwise the model's own SDPA attention reads the same cache through an explicit mask.
The function is registered with transformers' `AttentionInterface` under `ATTENTION_NAME` and switched
on for the duration of a `generate` call only (`kvcache_attention(model, cache)`), so the user's model is
left as it was. The cache reaches it through the attention modules themselves (an attribute set for the
block), since not every decoder layer passes its keyword arguments down. The layer's own attention
arguments are honoured: `sliding_window` (flash's `window_size`) and `softcap`; attention sinks have no
flash-attn equivalent, so models with sinks never take this path (`AttentionLayout.flash_ok`).

`flash_attn_with_kvcache_reference` is the same contract in plain PyTorch (float32 math): the CPU tests
run the whole flash path through it, and the GPU script checks the real kernel against it.
"""

from __future__ import annotations

import contextlib
import inspect
import math

import torch

ATTENTION_NAME = "adaswitch_kvcache"
CACHE_ATTRIBUTE = "_adaswitch_cache"
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


def flash_available(model, attention=None) -> bool:
    """The flash path applies: CUDA model in fp16 / bf16, head dim <= 256, attention that goes through
    transformers' attention interface without sinks (`attention.flash_ok`), flash-attn importable."""
    param = next(model.parameters())
    config = model.config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return (param.is_cuda and param.dtype in (torch.float16, torch.bfloat16) and head_dim <= 256
            and (attention is None or attention.flash_ok) and _load_flash() is not None)


def flash_attn_with_kvcache_reference(q, k_cache, v_cache, cache_seqlens, cache_leftpad=None, softmax_scale=None,
                                      causal=True, window_size=(-1, -1), softcap=0.0):
    """PyTorch statement of flash_attn_with_kvcache without new k/v: q [B, q, H, D], k_cache / v_cache
    [B, C, H_kv, D]; row b attends to columns leftpad[b] .. cache_seqlens[b] - 1, causal aligned to the
    bottom right (query i sees columns < cache_seqlens[b] - q + i + 1), and with window_size (left, right)
    only columns within [i' - left, i' + right] of its own column i' (-1: unbounded); softcap > 0 maps the
    scaled scores s to softcap * tanh(s / softcap); a query that sees nothing gives 0."""
    b, nq, h, d = q.shape
    c, h_kv = k_cache.shape[1], k_cache.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    k = k_cache.float().repeat_interleave(h // h_kv, dim=2)
    v = v_cache.float().repeat_interleave(h // h_kv, dim=2)
    scores = torch.einsum("bqhd,bchd->bhqc", q.float(), k) * scale
    if softcap and softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    cols = torch.arange(c, device=q.device)[None, None, :]
    end = cache_seqlens.long()[:, None, None]
    left = cache_leftpad.long()[:, None, None] if cache_leftpad is not None else torch.zeros_like(end)
    visible = (cols >= left) & (cols < end)  # [B, 1, C]
    own = end - nq + torch.arange(nq, device=q.device)[None, :, None]  # [B, q, 1]: each query's column
    if causal:
        visible = visible & (cols <= own)
    if window_size[0] >= 0:
        visible = visible & (cols >= own - window_size[0])
    if window_size[1] >= 0:
        visible = visible & (cols <= own + window_size[1])
    scores = scores.masked_fill(~visible[:, None], -math.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # fully masked query rows: 0
    return torch.einsum("bhqc,bchd->bqhd", probs, v.float()).to(q.dtype)


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
               softcap=None, **kwargs):
    """transformers attention function: query [B, H, q, D]; key / value are the cache's [B, H_kv, C, D]
    views of [B, C, H_kv, D] buffers. Returns [B, q, H, D] as transformers' attention functions do. A
    window of W tokens (transformers: keys at positions > p - W) is flash's window_size (W - 1, 0). The mask
    is not read (the row bounds are the cache's): it must be the cache's boolean one, since a floating mask
    carries something the model added to the scores (ALiBi's bias), which this function would drop."""
    cache = getattr(module, CACHE_ATTRIBUTE, None)
    if cache is None:
        raise RuntimeError(f"the {ATTENTION_NAME} attention runs only inside adaswitch.generate")
    if attention_mask is not None and attention_mask.dtype != torch.bool:  # dtype only: no device sync
        raise RuntimeError(f"the {ATTENTION_NAME} attention got a {attention_mask.dtype} attention mask from "
                           f"{type(module).__name__}: the model adds a bias to its scores through the mask (ALiBi), "
                           "which flash-attn does not read")
    if kwargs.get("s_aux") is not None:
        raise RuntimeError(f"the {ATTENTION_NAME} attention has no attention sinks ({type(module).__name__})")
    cache.flash_layers.add(getattr(module, "layer_idx", None))
    fn = _load_flash() or flash_attn_with_kvcache_reference
    window = (sliding_window - 1, 0) if sliding_window else (-1, -1)
    out = fn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), cache_seqlens=cache.kv_end,
             cache_leftpad=cache.kv_start, softmax_scale=scaling, causal=True, window_size=window,
             softcap=float(softcap or 0.0))
    return out, None


def _register() -> None:
    from transformers import AttentionInterface

    if ATTENTION_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(ATTENTION_NAME, _attention)


@contextlib.contextmanager
def kvcache_attention(model, cache):
    """Run `model` with the flash-attn cache attention on `cache` inside the block, then restore its own."""
    _register()
    config = model.config.get_text_config(decoder=True)
    before = config._attn_implementation
    modules = list(model.modules())
    config._attn_implementation_internal = ATTENTION_NAME
    for m in modules:
        m.__dict__[CACHE_ATTRIBUTE] = cache
    try:
        yield
    finally:
        config._attn_implementation_internal = before
        for m in modules:
            m.__dict__.pop(CACHE_ATTRIBUTE, None)
