"""What a model's attention needs from the engine's cache, read from its config and modules before any work.

The engine gives every model an explicit attention mask over its cache (`RowCache`), so everything the
model would otherwise build into its own mask has to be known here:

* layer kinds: `full_attention` and `sliding_attention` layers (a window of `config.sliding_window`
  tokens: a query at position p sees keys at positions > p - window, as transformers' own masks) are
  supported, alone or mixed per layer (`config.layer_types`; hybrid models take one mask per kind).
  Models without `layer_types` use one kind for every layer: sliding when `config.sliding_window` is set.
  Layers that are not attention over a KV cache (linear attention, convolutions, state-space blocks,
  chunked attention) are refused, naming the layer type.
* mask form: SDPA takes a boolean mask; eager attention adds the mask to the scores, so it gets 0 / the
  dtype's minimum (never a boolean, which would add 1 / 0). Other attention implementations are refused.
* ALiBi (Bloom, Falcon with `alibi=True`): the model builds its position biases from a 2-D padding mask;
  `alibi_adapter` lets it build them from the cache's 4-D mask (each column's position in its row).
* flash-attn: only models whose attention goes through transformers' attention interface can take the
  cache's flash-attn function; models with attention sinks cannot (flash-attn has none), nor ALiBi models:
  they add their position bias to the attention mask (transformers >= 5.25 does so for Falcon's attention
  interface too), and the flash-attn function reads no mask, so the bias would be dropped silently.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

ATTENTION_KINDS = ("full_attention", "sliding_attention")
MASKED_IMPLEMENTATIONS = ("sdpa", "eager")
# Config fields that describe layers which are not attention over a KV cache, by family.
_BLOCK_TYPE_FIELDS = ("layers_block_type", "layer_block_types", "block_types", "hybrid_override_pattern")
_SUPPORTED = ("supported: decoder-only models whose layers are all attention over a KV cache: full attention, "
              "sliding-window attention, or a per-layer mix of the two (e.g. Llama, Qwen2/3, Mistral, Gemma2/3, "
              "GPT-2, Falcon, Bloom, GPT-OSS)")


@dataclass(frozen=True)
class AttentionLayout:
    """windows: layer kind -> window in tokens (None: full); per_kind: the model takes a {kind: mask} dict
    (one mask per layer kind); additive: the attention adds the mask to its scores (eager); flash_ok: the
    model can run on the cache's flash-attn function (attention interface, no sinks, no ALiBi)."""

    windows: dict
    per_kind: bool
    additive: bool
    flash_ok: bool


def _config(model):
    return model.config.get_text_config(decoder=True)


def _refuse(name: str, model, what: str) -> ValueError:
    return ValueError(f"{name} ({type(model).__name__}) has {what}; adaswitch.generate does not support it "
                      f"({_SUPPORTED})")


def layer_kinds(name: str, model) -> list[str]:
    """Each layer's attention kind; a clear error for layers that are not attention over a KV cache."""
    config = _config(model)
    n = config.num_hidden_layers
    for field in _BLOCK_TYPE_FIELDS:
        value = getattr(config, field, None)
        if value:
            raise _refuse(name, model, f"layers of the types {sorted(set(map(str, value)))} (config.{field})")
    if getattr(config, "attention_chunk_size", None):
        raise _refuse(name, model, "chunked_attention layers (config.attention_chunk_size)")
    kinds = list(getattr(config, "layer_types", None) or [])
    if not kinds:
        kind = "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"
        kinds = [kind] * n
    other = sorted(set(kinds) - set(ATTENTION_KINDS))
    if other:
        raise _refuse(name, model, f"{', '.join(other)} layers (config.layer_types)")
    if "sliding_attention" in kinds:
        window = getattr(config, "sliding_window", None)
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"{name} ({type(model).__name__}) has sliding_attention layers but "
                             f"config.sliding_window is {window!r}; expected an int >= 1")
    return kinds


def _attention_layers(model) -> set:
    """Layer indices served by an attention module (a module named *Attention* with a `layer_idx`)."""
    found = set()
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if isinstance(idx, int) and "attention" in type(module).__name__.lower():
            found.add(idx)
    return found


def uses_alibi(model) -> bool:
    """The model adds ALiBi position biases to its attention scores: Falcon with `config.alibi`, and families
    whose modeling module builds them (`build_alibi_tensor`) without a config switch (Bloom)."""
    flag = getattr(_config(model), "alibi", None)
    if flag is not None:
        return bool(flag)
    return callable(getattr(sys.modules.get(type(model).__module__), "build_alibi_tensor", None))


def attention_layout(name: str, model) -> AttentionLayout:
    """The layout `RowCache` builds masks for; raises a clear error for models the engine cannot run."""
    config = _config(model)
    kinds = layer_kinds(name, model)
    served = _attention_layers(model)
    if len(served) < config.num_hidden_layers:
        missing = sorted(set(range(config.num_hidden_layers)) - served)
        layers = next((m for m in model.modules() if isinstance(m, torch.nn.ModuleList)
                       and len(m) == config.num_hidden_layers), None)
        types = sorted({type(layers[i]).__name__ for i in missing}) if layers is not None else []
        raise _refuse(name, model, f"layers without attention over a KV cache (layers {missing}: {types})")
    implementation = config._attn_implementation or "eager"
    if implementation not in MASKED_IMPLEMENTATIONS:
        raise ValueError(f"{name} ({type(model).__name__}) uses attn_implementation={implementation!r}; "
                         f"adaswitch.generate runs models loaded with one of {MASKED_IMPLEMENTATIONS} "
                         "(and uses flash-attn itself on CUDA when it is installed)")
    windows = {k: (config.sliding_window if k == "sliding_attention" else None) for k in sorted(set(kinds))}
    module = sys.modules.get(type(model).__module__)
    uses_interface = getattr(type(model), "_supports_attention_backend", False) or hasattr(
        module, "ALL_ATTENTION_FUNCTIONS")
    sinks = any(isinstance(getattr(m, "sinks", None), torch.nn.Parameter) for m in model.modules())
    return AttentionLayout(windows=windows, per_kind=getattr(config, "layer_types", None) is not None
                           and len(windows) > 1, additive=implementation == "eager",
                           flash_ok=bool(uses_interface) and not sinks and not uses_alibi(model))


def _alibi_mask(mask) -> torch.Tensor:
    """[B, C] 0/1: the columns the last query of each row sees in a cache mask (boolean or additive; the one
    of the full-attention layers for a {kind: mask} dict). ALiBi's bias is linear in the key position and
    the softmax is unchanged by a per-row constant, so the running count over these columns gives each
    visible column's bias exactly as for the unpadded row."""
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next(iter(mask.values())))
    last = mask[:, 0, -1, :]
    return (last if last.dtype == torch.bool else last == 0).long()


def _adapt_alibi(build):
    def build_alibi_tensor(attention_mask, num_heads, dtype):
        if isinstance(attention_mask, dict) or attention_mask.dim() == 4:
            attention_mask = _alibi_mask(attention_mask)
        return build(attention_mask, num_heads, dtype)

    build_alibi_tensor.adaswitch_adapted = True
    return build_alibi_tensor


def alibi_adapter(model) -> None:
    """Let an ALiBi model's `build_alibi_tensor` take the cache's 4-D mask. Installed once in the model's
    modeling module; a 2-D mask (every other caller) gives exactly the original result."""
    module = sys.modules.get(type(model).__module__)
    build = getattr(module, "build_alibi_tensor", None)
    if callable(build) and not getattr(build, "adaswitch_adapted", False):
        module.build_alibi_tensor = _adapt_alibi(build)
