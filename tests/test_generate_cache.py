"""SlotCache (adaswitch.engine.cache): a forward through it equals the model without a cache, rollback
only clears validity bits and lowers positions (no K/V moves), and the forward does no host sync."""

import torch
from tiny_models import random_prompts, tiny_teacher

from adaswitch.engine.cache import SlotCache
from adaswitch.engine.sync import SyncCounter


def _decode(model, cache, tokens):
    mask, positions = cache.decode_inputs(tokens.shape[1])
    logits = model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache).logits
    cache.advance(tokens.shape[1])
    return logits


@torch.no_grad()
def test_cache_matches_full_forward_and_rollback_moves_no_data():
    model = tiny_teacher()
    ids, attn = random_prompts(3, 5, min_len=2, seed=1)
    cache = SlotCache(model, 3, capacity=12)
    mask, positions = cache.prefill_inputs(attn)
    model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache)
    cache.advance(5)
    new = torch.randint(4, 300, (3, 3))
    with SyncCounter() as counter:
        step = _decode(model, cache, new)  # three tokens in one forward (causal among them)
    assert counter.count == 0, dict(counter.by_op)

    full_ids, full_attn = torch.cat([ids, new], 1), torch.cat([attn, torch.ones(3, 3, dtype=torch.long)], 1)
    full_pos = (full_attn.cumsum(-1) - 1).clamp(min=0)
    ref = model(input_ids=full_ids, attention_mask=full_attn, position_ids=full_pos).logits[:, -3:]
    torch.testing.assert_close(step, ref, atol=1e-5, rtol=1e-4)

    keys = [layer.keys.clone() for layer in cache.layers]
    pointers = [layer.keys.data_ptr() for layer in cache.layers]
    before = cache.positions.clone()
    cache.rollback(torch.tensor([0, 1, 2]))  # row r forgets its last r tokens
    assert all(torch.equal(k, layer.keys) for k, layer in zip(keys, cache.layers))
    assert pointers == [layer.keys.data_ptr() for layer in cache.layers]
    assert torch.equal(cache.positions, before - torch.tensor([0, 1, 2]))
    assert cache.valid[:, 5:8].tolist() == [[True, True, True], [True, True, False], [True, False, False]]

    # After the rollback, row 2 continues as if only new[2, 0] had been appended.
    nxt = torch.randint(4, 300, (3, 1))
    logits = _decode(model, cache, nxt)[2, -1]
    ids2 = torch.cat([ids[2:], new[2:, :1], nxt[2:]], 1)
    attn2 = torch.cat([attn[2:], torch.ones(1, 2, dtype=torch.long)], 1)
    pos2 = (attn2.cumsum(-1) - 1).clamp(min=0)
    ref2 = model(input_ids=ids2, attention_mask=attn2, position_ids=pos2).logits[0, -1]
    torch.testing.assert_close(logits, ref2, atol=1e-5, rtol=1e-4)
