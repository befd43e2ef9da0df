"""RowCache (adaswitch.engine.cache) and the flash-attn decode path (adaswitch.engine.attention).

A forward through the cache equals the model without a cache; rollback only lowers lengths (no K/V
moves) and the next write reuses the columns; the forward does no host sync. The flash path is run on
CPU through `flash_attn_with_kvcache_reference` (the same contract as flash-attn's kernel, which the GPU
script checks against it): its logits equal the SDPA path's, and `generate` gives the same tokens.
"""

import math

import pytest
import torch
from tiny_models import random_prompts, tiny_student, tiny_teacher

import adaswitch.engine.attention as attention_module
import adaswitch.engine.generate as generate_module
from adaswitch import SKD, AdaSwitch, generate
from adaswitch.engine.attention import (
    ATTENTION_NAME,
    CACHE_ATTRIBUTE,
    flash_attn_with_kvcache_reference,
    kvcache_attention,
)
from adaswitch.engine.cache import RowCache
from adaswitch.engine.sync import SyncCounter


def _forward(model, cache, tokens, prefill_mask=None):
    if prefill_mask is not None:
        mask, positions = cache.prefill_inputs(prefill_mask)
    else:
        mask, positions = cache.decode_inputs(tokens.shape[1])
    if cache.layout == "flash":
        with kvcache_attention(model, cache):
            logits = model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache).logits
    else:
        logits = model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache).logits
    cache.advance(tokens.shape[1])
    return logits


def _reference(model, ids, attn):
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=attn, position_ids=pos).logits


@pytest.mark.parametrize("layout", ["sdpa", "flash"])
@torch.no_grad()
def test_cache_matches_full_forward_and_rollback_moves_no_data(layout):
    model = tiny_teacher()
    ids, attn = random_prompts(3, 5, min_len=2, seed=1)
    cache = RowCache(model, 3, capacity=12, layout=layout)
    prefill = _forward(model, cache, ids, prefill_mask=attn)
    real = attn.bool()
    torch.testing.assert_close(prefill[real], _reference(model, ids, attn)[real], atol=1e-5, rtol=1e-4)
    new = torch.randint(4, 300, (3, 3))
    with SyncCounter() as counter:
        step = _forward(model, cache, new)  # three tokens in one forward (causal among them)
    assert counter.count == 0, dict(counter.by_op)
    full_ids, full_attn = torch.cat([ids, new], 1), torch.cat([attn, torch.ones(3, 3, dtype=torch.long)], 1)
    torch.testing.assert_close(step, _reference(model, full_ids, full_attn)[:, -3:], atol=1e-5, rtol=1e-4)

    keys = [layer.keys.clone() for layer in cache.layers]
    pointers = [layer.keys.data_ptr() for layer in cache.layers]
    cache.rollback(torch.tensor([0, 1, 2]))  # row r forgets its last r tokens
    assert all(torch.equal(k, layer.keys) for k, layer in zip(keys, cache.layers))
    assert pointers == [layer.keys.data_ptr() for layer in cache.layers]
    assert cache.lengths.tolist() == [8, 7, 6]

    # After the rollback, row r continues as if only new[r, :3 - r] had been appended; the next write
    # lands on the columns the rollback freed.
    nxt = torch.randint(4, 300, (3, 1))
    logits = _forward(model, cache, nxt)[:, -1]
    for r in range(3):
        ids_r = torch.cat([ids[r:r + 1], new[r:r + 1, : 3 - r], nxt[r:r + 1]], 1)
        attn_r = torch.cat([attn[r:r + 1], torch.ones(1, 4 - r, dtype=torch.long)], 1)
        torch.testing.assert_close(logits[r], _reference(model, ids_r, attn_r)[0, -1], atol=1e-5, rtol=1e-4)
    assert cache.lengths.tolist() == [9, 8, 7]


def test_cache_rejects_unknown_layout():
    with pytest.raises(ValueError, match="layout"):
        RowCache(tiny_student(), 2, capacity=4, layout="paged")


def test_kvcache_attention_restores_the_models_attention():
    model = tiny_student()
    cache = RowCache(model, 1, capacity=4, layout="flash")
    before = model.config._attn_implementation
    with kvcache_attention(model, cache):
        assert model.config._attn_implementation == ATTENTION_NAME
        assert all(getattr(m, CACHE_ATTRIBUTE) is cache for m in model.modules())
    assert model.config._attn_implementation == before
    assert not any(hasattr(m, CACHE_ATTRIBUTE) for m in model.modules())
    attention = model.model.layers[0].self_attn
    q = torch.zeros(1, 4, 1, 8)
    with pytest.raises(RuntimeError, match="inside adaswitch.generate"):
        attention_module._attention(attention, q, q, q, None)


@pytest.mark.parametrize("window,softcap", [((-1, -1), 0.0), ((2, 0), 0.0), ((-1, -1), 0.4), ((1, 0), 0.4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_flash_reference_matches_float64_attention(dtype, window, softcap):
    """The reference's contract, written out independently in float64 per row and query: GQA, left pad,
    bottom-right causal alignment, a sliding window of window[0] columns before the query's own, softcapped
    scores, a query that sees nothing gives zeros."""
    gen = torch.Generator().manual_seed(0)
    b, nq, h, h_kv, d, c = 3, 3, 4, 2, 16, 11
    q = torch.randn(b, nq, h, d, generator=gen).to(dtype)
    k = torch.randn(b, c, h_kv, d, generator=gen).to(dtype)
    v = torch.randn(b, c, h_kv, d, generator=gen).to(dtype)
    end = torch.tensor([9, 4, 2], dtype=torch.int32)
    left = torch.tensor([2, 0, 2], dtype=torch.int32)  # row 2: queries 0 and 1 see no column
    out = flash_attn_with_kvcache_reference(q, k, v, cache_seqlens=end, cache_leftpad=left, softmax_scale=0.3,
                                            window_size=window, softcap=softcap)
    assert out.dtype == dtype
    for bi in range(b):
        for i in range(nq):
            last = int(end[bi]) - nq + i  # the newest column query i sees
            first = int(left[bi]) if window[0] < 0 else max(int(left[bi]), last - window[0])
            for hi in range(h):
                cols = list(range(first, last + 1))
                if not cols:
                    expected = torch.zeros(d, dtype=torch.float64)
                else:
                    kk = k[bi, cols, hi // 2].double()
                    scores = kk @ q[bi, i, hi].double() * 0.3
                    if softcap:
                        scores = softcap * torch.tanh(scores / softcap)
                    w = torch.softmax(scores, 0)
                    expected = w @ v[bi, cols, hi // 2].double()
                tol = 1e-5 if dtype == torch.float32 else 2e-2
                torch.testing.assert_close(out[bi, i, hi].double(), expected, atol=tol, rtol=tol)
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("g", [0, 3])
def test_generate_flash_path_equals_sdpa_path(monkeypatch, g):
    """The whole engine on the flash layout (reference kernel on CPU) gives the SDPA path's tokens."""
    student, teacher = tiny_student(), tiny_teacher()
    ids, attn = random_prompts(4, 7, min_len=2, seed=3)
    policy = AdaSwitch(window=2, k=1.5)
    kw = dict(policy=policy, max_new_tokens=10, seed=5, lookahead=g, sync_every=4)
    sdpa = generate(student, teacher, ids, attn, **kw)
    monkeypatch.setattr(generate_module, "flash_available", lambda model, attention=None: True)
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs["cache_seqlens"].clone())
        return flash_attn_with_kvcache_reference(*args, **kwargs)

    monkeypatch.setattr(attention_module, "flash_attn_with_kvcache_reference", counted)
    flash = generate(student, teacher, ids, attn, **kw)
    assert len(calls) >= 10 * 2  # every layer of every forward went through the flash contract
    assert torch.equal(flash.sequences, sdpa.sequences)
    assert torch.equal(flash.from_teacher, sdpa.from_teacher)
    assert torch.equal(flash.switch_position, sdpa.switch_position)
    torch.testing.assert_close(flash.divergence, sdpa.divergence, equal_nan=True, atol=1e-4, rtol=1e-3)
    assert student.config._attn_implementation == teacher.config._attn_implementation == "sdpa"
    assert not math.isnan(float(flash.divergence.nan_to_num(0).sum()))


@pytest.mark.parametrize("policy", [AdaSwitch(window=1, k=math.inf), AdaSwitch(window=1, k=1.2), SKD(top_k=3)])
def test_lookahead_past_the_budget_stays_in_capacity(policy):
    """Rows whose accepted drafts run past max_new_tokens while other rows are still live (switched rows
    gain one token per block, rejections differ per row; no host read in between) never write past the
    cache's prompt + N + G columns (an out-of-range write raises) and give step mode's tokens."""
    student, teacher = tiny_student(), tiny_teacher()
    ids, attn = random_prompts(6, 4, min_len=1, seed=2)
    kw = dict(policy=policy, max_new_tokens=10, seed=1, sync_every=64, eos_token_id=299)
    step = generate(student, teacher, ids, attn, **kw)
    look = generate(student, teacher, ids, attn, lookahead=4, **kw)
    assert torch.equal(look.sequences, step.sequences) and torch.equal(look.lengths, step.lengths)
