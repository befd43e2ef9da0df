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
* SDPA (CPU, and CUDA without flash-attn): `decode_inputs` returns an explicit 4-D boolean mask
  [B, 1, q, C] and `position_ids` [B, q]; transformers returns a 4-D mask as is, so no mask-building
  code (and none of its data-dependent host checks) runs in the decode loop. K/V are [B, H, C, D].
* flash-attn (`layout="flash"`): K/V are [B, C, H, D] as `flash_attn_with_kvcache` wants them and the
  attention reads `lengths` / `start` directly; the model gets a [B, 1, 1, 1] all-true mask, which
  only stops transformers from building one (the flash attention ignores it).
Nothing here depends on a Python int that changes per step, so the same calls can be captured in a CUDA
graph.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

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
                 layout: str = "sdpa"):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        config = model.config.get_text_config(decoder=True)
        device = device or next(model.parameters()).device
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.start = torch.zeros(batch_size, dtype=torch.long, device=device)
        layers = [_RowLayer(capacity, self.lengths, layout) for _ in range(config.num_hidden_layers)]
        super().__init__(layers=layers)
        dtype = next(model.parameters()).dtype
        heads = config.num_key_value_heads or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.early_initialization(batch_size, heads, head_dim, dtype, device)
        self.capacity = capacity
        self.layout = layout
        self._cols = torch.arange(capacity, device=device)
        # flash-attn's int32 row bounds: end = lengths + q during a forward (after the write), start fixed
        # by the prompt; and the mask given to the model on that path, which its attention ignores.
        self.kv_end = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.kv_start = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self._flash_mask = torch.ones(batch_size, 1, 1, 1, dtype=torch.bool, device=device)

    def prefill_inputs(self, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask and position ids for the left-padded prompt [B, P] (written at columns 0 .. P - 1)."""
        self.start.copy_((attention_mask == 0).long().sum(-1))
        self.kv_start.copy_(self.start)
        self.lengths.zero_()
        return self.decode_inputs(attention_mask.shape[1])

    def decode_inputs(self, q: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask and position ids for q new tokens per row, at columns lengths[b] .. lengths[b] + q - 1."""
        own = self.lengths[:, None] + torch.arange(q, device=self.lengths.device)  # [B, q]
        position_ids = (own - self.start[:, None]).clamp(min=0)
        if self.layout == "flash":
            self.kv_end.copy_(self.lengths + q)
            return self._flash_mask, position_ids
        return self._mask(own), position_ids

    def _mask(self, own: torch.Tensor) -> torch.Tensor:
        """[B, 1, q, C]: query j of row b sees columns start[b] .. own[b, j], and always itself (so a
        left-pad query is never fully masked, which would give NaN states)."""
        cols = self._cols[None, None, :]
        own = own[:, :, None]
        mask = ((cols >= self.start[:, None, None]) & (cols <= own)) | (cols == own)
        return mask[:, None]

    def advance(self, q: int) -> None:
        """Every row keeps the q columns just written (call after the forward)."""
        self.lengths += q

    def rollback(self, n: torch.Tensor) -> None:
        """Forget the last n[b] tokens of row b (n [B], device, 0 <= n <= tokens the row holds past its
        prompt): lower the row's length. No K/V moves."""
        self.lengths -= n
