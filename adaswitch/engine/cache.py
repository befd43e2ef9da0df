"""Preallocated KV cache with per-row lengths on the device: rollback never copies K/V, never syncs.

Layout: every layer holds keys/values [B, H_kv, C, D] allocated once. All rows write each forward's new
tokens at the same columns, starting at a shared cursor (a 0-d device tensor). Which columns a row
attends to lives in `valid` [B, C] (bool, device); each row's next position id lives in `positions` [B].
So a left-padded prompt is just invalid columns, and rolling a row back (a rejected lookahead draft) is
clearing its `valid` bits for the rejected columns and lowering its position: the stale K/V stay where
they are and are never read again. Capacity C = prompt length + the most columns the decode loop can
consume (max_new_tokens, plus the columns rejected drafts waste in lookahead mode).

The model gets an explicit 4-D boolean mask [B, 1, q, C] and explicit `position_ids` [B, q]; transformers'
`create_causal_mask` returns a 4-D mask as is, so no mask-building code (and none of its data-dependent
checks, which read values on the host) runs inside the decode loop. Nothing here depends on a Python int
that changes per step, so the same calls can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _CursorLayer(CacheLayerMixin):
    """One layer's K/V buffers; writes the new states at columns cursor .. cursor + q - 1 in place."""

    is_compileable = True
    is_sliding = False

    def __init__(self, capacity: int, cursor: torch.Tensor):
        super().__init__()
        self.capacity = capacity
        self.cursor = cursor

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h = key_states.shape[:2]
        self.keys = key_states.new_zeros(b, h, self.capacity, key_states.shape[-1])
        self.values = value_states.new_zeros(b, h, self.capacity, value_states.shape[-1])
        self.device = self.keys.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cols = self.cursor + torch.arange(key_states.shape[-2], device=self.cursor.device)
        self.keys.index_copy_(2, cols, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, cols, value_states.to(self.values.dtype))
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.capacity, 0

    def get_seq_length(self) -> int:
        # Only consulted by transformers when position_ids or the mask are not given; we always give both.
        return self.cursor

    def get_max_length(self) -> int:
        return self.capacity


class SlotCache(Cache):
    """Cache for one model over a fixed batch: K/V slots, the shared write cursor, per-row validity and
    positions. Use `prefill_inputs` / `decode_inputs` to get the mask and positions for a forward, then
    `advance(q)` after it; `rollback(n)` un-writes the last n[b] tokens of each row b."""

    def __init__(self, model, batch_size: int, capacity: int, device: torch.device | None = None):
        config = model.config.get_text_config(decoder=True)
        device = device or next(model.parameters()).device
        self.cursor = torch.zeros((), dtype=torch.long, device=device)
        layers = [_CursorLayer(capacity, self.cursor) for _ in range(config.num_hidden_layers)]
        super().__init__(layers=layers)
        dtype = next(model.parameters()).dtype
        heads = config.num_key_value_heads or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.early_initialization(batch_size, heads, head_dim, dtype, device)
        self.capacity = capacity
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._cols = torch.arange(capacity, device=device)

    def prefill_inputs(self, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask and position ids for the left-padded prompt (written at columns 0 .. P-1)."""
        p = attention_mask.shape[1]
        keep = attention_mask.bool()
        self.valid[:, :p] = keep
        position_ids = (keep.long().cumsum(-1) - 1).clamp_(min=0)
        self.positions.copy_(keep.long().sum(-1))
        return self._mask(p), position_ids

    def decode_inputs(self, q: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask and position ids for q new tokens per row at columns cursor .. cursor + q - 1 (all valid)."""
        new = (self._cols >= self.cursor) & (self._cols < self.cursor + q)
        self.valid |= new
        position_ids = self.positions[:, None] + torch.arange(q, device=self.positions.device)
        self.positions += q
        return self._mask(q), position_ids

    def _mask(self, q: int) -> torch.Tensor:
        """[B, 1, q, C]: query j sees valid columns up to its own column cursor + j, and always itself
        (so a left-pad query row is never fully masked, which would give NaN states)."""
        own = (self.cursor + torch.arange(q, device=self._cols.device))[:, None]  # [q, 1]
        causal = self._cols[None, :] <= own  # [q, C]
        mask = self.valid[:, None, :] & causal[None] | (self._cols[None, :] == own)[None]
        return mask[:, None]

    def advance(self, q: int) -> None:
        """Move the shared write cursor past the q columns just written (call after the forward)."""
        self.cursor += q

    def rollback(self, n: torch.Tensor) -> None:
        """Forget the last n[b] tokens of row b (n [B], device, 0 <= n <= tokens written in the last
        forward): clear their columns in `valid` and lower the row's position. No K/V moves."""
        drop = (self._cols[None, :] >= self.cursor - n[:, None]) & (self._cols[None, :] < self.cursor)
        self.valid &= ~drop
        self.positions -= n
