"""Preallocated KV cache with per-row lengths on the device: rollback never copies K/V, never syncs.

Layout: every layer holds keys/values allocated once for B rows x C columns. Row b's live tokens are the
contiguous columns start[b] .. lengths[b] - 1: `start` is the row's left padding (the prompt is written
left-padded at columns 0 .. P - 1), `lengths` is where the row's next token goes (flash-attn's
`cache_seqlens`; `start` is its `cache_leftpad`). A forward of q tokens writes row b's new K/V at columns
lengths[b] .. lengths[b] + q - 1 (one scatter per layer); `advance(q)` then raises every row's length.
Rolling a row back (a rejected lookahead draft, a finished row's dummy step) is lowering its length: the
stale K/V stay where they are and are overwritten by the row's next write. Position ids follow from the
lengths (lengths - start), so nothing else moves. Capacity C = prompt length + the tokens a row can keep +
the widest forward: no column is wasted on rejected drafts.

Two attention paths read the same cache (`adaswitch.engine.attention`):
* SDPA / eager (CPU, and CUDA without flash-attn): `decode_inputs` returns an explicit 4-D mask
  [B, 1, q, C] and `position_ids` [B, q]; transformers returns a 4-D mask as is, so no mask-building
  code (and none of its data-dependent host checks) runs in the decode loop. The mask is what the
  model's attention expects (`adaswitch.engine.architecture.AttentionLayout`): boolean for SDPA,
  additive (0 / dtype minimum) for eager, with each layer kind's sliding window, and one mask per layer
  kind for hybrid models. K/V are [B, H, C, D], with H and D read from the first key states (so
  multi-query, grouped and per-family head layouts need no config field).
* flash-attn (`layout="flash"`): K/V are [B, C, H, D] as `flash_attn_with_kvcache` wants them and the
  attention reads `lengths` / `start` directly; the model gets a [B, 1, 1, 1] all-true mask, which
  only stops transformers from building one (the flash attention ignores it).
Nothing here depends on a Python int that changes per step, so the same calls can be captured in a CUDA
graph.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from adaswitch.engine.architecture import AttentionLayout, attention_layout

LAYOUTS = ("sdpa", "flash")


class _RowLayer(CacheLayerMixin):
    """One layer's K/V buffers; writes row b's q new states at columns lengths[b] .. lengths[b] + q - 1."""

    is_compileable = True
    is_sliding = False

    def __init__(self, capacity: int, lengths: torch.Tensor, layout: str):
        super().__init__()
        self.capacity = capacity
        self.lengths = lengths
        self.seq_dim = 2 if layout == "sdpa" else 1

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        shape = (b, h, self.capacity, d) if self.seq_dim == 2 else (b, self.capacity, h, d)
        self.keys = key_states.new_zeros(shape)
        self.values = value_states.new_zeros(shape[:-1] + (value_states.shape[-1],))
        self.device = self.keys.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        """Scatter the new [B, H, q, D] states into each row's next columns; return [B, H, C, D] views."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        cols = self.lengths[:, None] + torch.arange(q, device=self.lengths.device)  # [B, q]
        if self.seq_dim == 1:
            key_states, value_states = key_states.transpose(1, 2), value_states.transpose(1, 2)
            index = cols[:, :, None, None]
        else:
            index = cols[:, None, :, None]
        self.keys.scatter_(self.seq_dim, index.expand_as(key_states), key_states.to(self.keys.dtype))
        self.values.scatter_(self.seq_dim, index.expand_as(value_states), value_states.to(self.values.dtype))
        if self.seq_dim == 1:
            return self.keys.transpose(1, 2), self.values.transpose(1, 2)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.capacity, 0

    def get_seq_length(self) -> int:
        # Only consulted by transformers when position_ids or the mask are not given; we always give both.
        return self.capacity

    def get_max_length(self) -> int:
        return self.capacity


class RowCache(Cache):
    """Cache for one model over a fixed batch: K/V buffers, each row's `start` and `lengths` (device).

    Use `prefill_inputs` / `decode_inputs` for a forward's mask and positions, `advance(q)` after it,
    `rollback(n)` to forget the last n[b] tokens of row b."""

    def __init__(self, model, batch_size: int, capacity: int, device: torch.device | None = None,
                 layout: str = "sdpa", attention: AttentionLayout | None = None, name: str = "model"):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        config = model.config.get_text_config(decoder=True)
        device = device or next(model.parameters()).device
        self.attention = attention or attention_layout(name, model)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.start = torch.zeros(batch_size, dtype=torch.long, device=device)
        # K/V buffers are allocated by the first forward, in the shape of its key states.
        layers = [_RowLayer(capacity, self.lengths, layout) for _ in range(config.num_hidden_layers)]
        super().__init__(layers=layers)
        self.dtype = next(model.parameters()).dtype
        self.capacity = capacity
        self.layout = layout
        self._cols = torch.arange(capacity, device=device)
        # flash-attn's int32 row bounds: end = lengths + q during a forward (after the write), start fixed
        # by the prompt; and the mask given to the model on that path, which its attention ignores.
        self.kv_end = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.kv_start = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self._flash_mask = torch.ones(batch_size, 1, 1, 1, dtype=torch.bool, device=device)
        self.name, self.checked = name, False  # the model's role in errors; the first-forward check ran
        self.flash_layers: set = set()  # layer indices the flash-attn function served (a check, no sync)

    def check_layers(self, name: str) -> None:
        """After the first forward: every layer wrote K/V here (a layer that did not is no attention layer the
        masks describe, so its output would be wrong without an error)."""
        unused = [i for i, layer in enumerate(self.layers) if not layer.is_initialized]
        if self.layout == "flash" and not unused:
            unused = sorted(set(range(len(self.layers))) - self.flash_layers)
        if unused:
            raise ValueError(f"{name}: layers {unused} did not use the KV cache; adaswitch.generate supports "
                             "models whose layers are all attention over a KV cache")

    def prefill_inputs(self, attention_mask: torch.Tensor) -> tuple:
        """Mask and position ids for the left-padded prompt [B, P] (written at columns 0 .. P - 1)."""
        self.start.copy_((attention_mask == 0).long().sum(-1))
        self.kv_start.copy_(self.start)
        self.lengths.zero_()
        return self.decode_inputs(attention_mask.shape[1])

    def decode_inputs(self, q: int) -> tuple:
        """Mask and position ids for q new tokens per row, at columns lengths[b] .. lengths[b] + q - 1."""
        own = self.lengths[:, None] + torch.arange(q, device=self.lengths.device)  # [B, q]
        position_ids = (own - self.start[:, None]).clamp(min=0)
        if self.layout == "flash":
            self.kv_end.copy_(self.lengths + q)
            return self._flash_mask, position_ids
        return self._mask(own), position_ids

    def _mask(self, own: torch.Tensor):
        """[B, 1, q, C] per layer kind: query j of row b sees columns start[b] .. own[b, j] (within the kind's
        window), and always itself (so a left-pad query is never fully masked, which would give NaN states).
        Boolean, or additive for attention that adds the mask; a {kind: mask} dict for hybrid models."""
        cols = self._cols[None, None, :]
        own = own[:, :, None]
        causal = (cols >= self.start[:, None, None]) & (cols <= own)
        masks = {}
        for kind, window in self.attention.windows.items():
            visible = (causal & (cols > own - window) if window else causal) | (cols == own)
            if self.attention.additive:
                zero = torch.zeros((), dtype=self.dtype, device=visible.device)
                visible = torch.where(visible, zero, torch.finfo(self.dtype).min)
            masks[kind] = visible[:, None]
        return masks if self.attention.per_kind else next(iter(masks.values()))

    def advance(self, q: int) -> None:
        """Every row keeps the q columns just written (call after the forward)."""
        self.lengths += q

    def rollback(self, n: torch.Tensor) -> None:
        """Forget the last n[b] tokens of row b (n [B], device, 0 <= n <= tokens the row holds past its
        prompt): lower the row's length. No K/V moves."""
        self.lengths -= n
