"""Conformance of `generate` across the decoder-only model zoo (tiny random-init models, tests/model_zoo.py).

For every family, with SDPA and eager attention (eager alone where transformers has no SDPA for it):
greedy Teacher and Student equal transformers' `generate`; AdaSwitch and SKD in step and lookahead mode
equal a no-cache reference that re-runs both models on each row's whole prefix (rows that switch and
student tokens that are rejected occur in every run); the flash-attn layout (through
`flash_attn_with_kvcache_reference`, with windows and softcapping) gives the masked path's tokens. Prompts
of different lengths are left padded and prompt + response runs past the windowed families' window.
Families whose layers are not attention are refused before any forward.
"""

import math
import sys

import pytest
import torch
from model_zoo import CONFIGS, REFUSED, WINDOW, attentions, build, build_refused
from tiny_models import EOS_ID, PAD_ID, VOCAB_SIZE, random_prompts

import adaswitch.engine.generate as generate_module
from adaswitch import AdaSwitch, Student, generate
from adaswitch.engine.architecture import alibi_adapter, attention_layout
from adaswitch.engine.conformance import check_pair, greedy_matches_transformers

N, B, P = 12, 3, 7
assert P + N > 2 * WINDOW  # every row's response runs past the window
CASES = [(name, attn) for name in CONFIGS for attn in attentions(name)]
IDS = [f"{name}-{attn}" for name, attn in CASES]
ALIBI = ("falcon-alibi", "bloom")  # families that add ALiBi position biases to their attention scores


pytestmark = pytest.mark.usefixtures("one_thread")


def _prompts(seed=3):
    return random_prompts(B, P, min_len=2, seed=seed)


@pytest.mark.parametrize("name,attn", CASES, ids=IDS)
def test_greedy_equals_transformers_generate(name, attn):
    model = build(name, attn=attn)
    ids, mask = _prompts()
    kw = dict(max_new_tokens=N, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    assert greedy_matches_transformers(model, ids, mask, role="teacher", **kw)
    assert greedy_matches_transformers(model, ids, mask, role="student", **kw)


@pytest.mark.parametrize("name,attn", CASES, ids=IDS)
def test_policies_equal_nocache_reference(name, attn):
    student, teacher = build(name, seed=1, attn=attn), build(name, seed=0, attn=attn)
    ids, mask = _prompts()
    results = check_pair(student, teacher, ids, mask, max_new_tokens=N, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                         vocab_size=VOCAB_SIZE)
    assert all(results.values()), results


@pytest.mark.parametrize("name", list(CONFIGS))
def test_flash_layout_equals_masked_path(monkeypatch, name):
    """The flash-attn layout (its PyTorch reference on CPU) gives the masked path's tokens, in step and
    lookahead mode; families it cannot serve (no attention interface, attention sinks, ALiBi) never take it.
    ALiBi models never do, whatever their transformers version (from 5.25 Falcon's attention goes through
    the attention interface with its bias in the mask, which flash-attn does not read)."""
    attn = attentions(name)[0]
    student, teacher = build(name, seed=1, attn=attn), build(name, seed=0, attn=attn)
    if name in ALIBI:
        assert not attention_layout("teacher", teacher).flash_ok
    if not attention_layout("teacher", teacher).flash_ok:
        assert name in ("falcon-mqa", "gpt-oss", *ALIBI)
        return
    ids, mask = _prompts(seed=4)
    kw = dict(policy=AdaSwitch(window=2, k=1.1, warmup=2), max_new_tokens=N, eos_token_id=EOS_ID,
              pad_token_id=PAD_ID, vocab_size=VOCAB_SIZE)
    masked = [generate(student, teacher, ids, mask, lookahead=g, **kw) for g in (0, 3)]
    monkeypatch.setattr(generate_module, "flash_available", lambda model, attention=None: attention.flash_ok)
    for g, ref in zip((0, 3), masked):
        out = generate(student, teacher, ids, mask, lookahead=g, **kw)
        assert torch.equal(out.sequences, ref.sequences) and torch.equal(out.from_teacher, ref.from_teacher)
        torch.testing.assert_close(out.divergence, ref.divergence, equal_nan=True, atol=1e-4, rtol=1e-3)
    assert (masked[0].switch_position > 0).any()


@pytest.mark.parametrize("name", ALIBI)
def test_flash_attention_refuses_a_bias_in_the_mask(monkeypatch, name):
    """Forced onto the flash layout (past `flash_ok`), an ALiBi model is refused, never run without its bias:
    one whose attention goes through the interface (Falcon from transformers 5.25) hands the flash attention
    its bias in a float mask, which it refuses; one whose attention is its own never calls it (Bloom, Falcon
    before 5.25), which the first-forward check refuses."""
    attn = attentions(name)[0]
    student, teacher = build(name, seed=1, attn=attn), build(name, seed=0, attn=attn)
    ids, mask = _prompts(seed=4)
    monkeypatch.setattr(generate_module, "flash_available", lambda model, attention=None: True)
    via_interface = hasattr(sys.modules[type(teacher).__module__], "ALL_ATTENTION_FUNCTIONS")
    error, match = ((RuntimeError, "float32 attention mask from .*ALiBi") if via_interface
                    else (ValueError, "did not use the KV cache"))
    with pytest.raises(error, match=match):
        generate(student, teacher, ids, mask, policy=AdaSwitch(window=2, k=1.1, warmup=2), max_new_tokens=4,
                 eos_token_id=EOS_ID, pad_token_id=PAD_ID, vocab_size=VOCAB_SIZE)


@pytest.mark.parametrize("name,attn", [(n, a) for n in ALIBI for a in attentions(n)])
def test_alibi_bias_from_the_cache_mask_is_the_models_own(name, attn):
    """ALiBi from the cache's 4-D mask (`alibi_adapter`): every real position's logits of a left-padded batch
    through `RowCache` are the model's own float64 forward on the unpadded row. The tokens the tests above
    compare barely see the bias of these tiny models (a dropped Bloom bias changes none); logits do (a
    dropped or doubled bias moves them by 5e-4 .. 8e-3, float32 rounding by ~1e-7). atol / rtol: torch's
    float32 defaults (1e-5 / 1.3e-6), the size of the worst-case float32 bound of the longest sum here
    (n u = 128 x 6e-8 = 8e-6 of its magnitudes; the logits are < 1)."""
    from adaswitch.engine.cache import RowCache

    model, truth_model = build(name, attn=attn), build(name, attn=attn, dtype=torch.float64)
    alibi_adapter(model)
    ids, mask = _prompts()
    cache = RowCache(model, B, capacity=P, attention=attention_layout("model", model))
    cache_mask, position_ids = cache.prefill_inputs(mask)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=cache_mask, position_ids=position_ids, cache=cache).logits
        for row in range(B):
            real = mask[row].bool()
            truth = truth_model(input_ids=ids[row][real][None]).logits[0]
            torch.testing.assert_close(logits[row][real].double(), truth, atol=1e-5, rtol=1.3e-6)


PAIRS = [("gemma2", "qwen3"), ("falcon-alibi", "mistral"), ("gpt-oss", "gpt2"), ("cohere2", "falcon-mqa"),
         ("qwen2-sliding", "bloom")]


@pytest.mark.parametrize("teacher_name,student_name", PAIRS, ids=[f"{t}>{s}" for t, s in PAIRS])
def test_mixed_family_pairs_with_padded_vocabularies(teacher_name, student_name):
    """Teacher and student of different families, both embedding matrices padded past the tokenizer."""
    teacher = build(teacher_name, seed=0, attn="eager", vocab_size=VOCAB_SIZE + 24)
    student = build(student_name, seed=1, attn=attentions(student_name)[0], vocab_size=VOCAB_SIZE + 8)
    ids, mask = _prompts(seed=6)
    results = check_pair(student, teacher, ids, mask, max_new_tokens=N, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                         vocab_size=VOCAB_SIZE)
    assert all(results.values()), results
    out = generate(student, teacher, ids, mask, policy=AdaSwitch(window=2, k=1.1), max_new_tokens=N,
                   eos_token_id=EOS_ID, pad_token_id=PAD_ID, vocab_size=VOCAB_SIZE)
    assert (out.response < VOCAB_SIZE).all()


@pytest.mark.parametrize("name", list(REFUSED))
def test_non_attention_layers_are_refused_before_any_forward(name):
    model = build_refused(name)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    student = build("llama", seed=1)
    ids, mask = _prompts()
    with pytest.raises(ValueError, match=f"{REFUSED[name][1]}.*supported: decoder-only models"):
        generate(student, model, ids, mask, max_new_tokens=4, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    assert not calls


def test_other_attention_implementations_are_refused():
    model = build("llama")
    model.config._attn_implementation_internal = "flex_attention"
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="attn_implementation='flex_attention'.*'sdpa', 'eager'"):
        generate(model, None, ids, mask, policy=Student(), max_new_tokens=4, eos_token_id=EOS_ID,
                 pad_token_id=PAD_ID)


def test_eager_mask_is_additive_and_windows_bound_the_past():
    """The masks the families above rely on: eager gets 0 / dtype minimum (a boolean would be added as 1 / 0),
    a sliding layer sees only its last WINDOW positions, hybrid models get one mask per layer kind."""
    from adaswitch.engine.cache import RowCache

    model = build("gemma2", attn="eager")
    cache = RowCache(model, 1, capacity=12, attention=attention_layout("model", model))
    cache.prefill_inputs(torch.ones(1, 9, dtype=torch.long))
    cache.advance(9)
    masks, _ = cache.decode_inputs(1)
    assert set(masks) == {"full_attention", "sliding_attention"}
    full, sliding = masks["full_attention"][0, 0, 0], masks["sliding_attention"][0, 0, 0]
    assert full.dtype == torch.float32 and set(full.unique().tolist()) == {0.0, torch.finfo(torch.float32).min}
    assert (full[:10] == 0).all() and (full[10:] < -1e30).all()
    assert (sliding[9 - WINDOW + 1:10] == 0).all() and (sliding[: 9 - WINDOW + 1] < -1e30).all()
    assert not math.isnan(float(full.sum()))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_distiller_step_loss_is_the_loss_of_the_models_logits(tmp_path, name):
    """One Distiller training step on a pair of the family: its loss is `distill_loss` on both models' own
    `model(...).logits` (whichever loss path the start-up check chose for the family). Weights initialised
    wide enough that the loss is far above float32 rounding; dropout off (GPT-2, OPT, ... train with it)."""
    from test_loss_model_heads import first_batch, logits_loss, make_trainer

    attn = attentions(name)[0]
    pair = [build(name, seed=seed, attn=attn, init=0.2) for seed in (1, 0)]
    for module in pair[0].modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    trainer = make_trainer(tmp_path, *pair)
    batch = first_batch(trainer)
    expected = logits_loss(trainer, batch)
    assert float(trainer.training_step(trainer.model, batch)) == pytest.approx(float(expected), rel=2e-5)
