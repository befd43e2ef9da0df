"""Tiny random-init Hugging Face models and a tiny tokenizer for tests, examples and CPU benchmarks.

No hub access is needed: models are built from configs, the tokenizer from a fixed word list with the
`tokenizers` library. A Qwen2-style teacher and a Llama-style student share one tokenizer and vocabulary
(different architectures and sizes, as in real distillation). Everything is deterministic given `seed`.

    tok = tiny_tokenizer()
    teacher, student = tiny_teacher(), tiny_student()
    batch = tok(["the cat", "a dog sat on"], return_tensors="pt", padding=True)   # left-padded
    trainer = tiny_distiller(tmp_path, policy="adaswitch")   # a Distiller on them (context 64), for tests
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
VOCAB_SIZE = 300  # tokenizer vocabulary: 4 special tokens, 26 letters, 10 digits, punctuation, words

_WORDS = (
    "the a an and or but if then else is are was were be been cat dog bird fish tree sun moon star "
    "sky sea red blue green big small old new one two three four five six seven eight nine ten "
    "plus minus times equals answer question what why how when where who run sat ran see saw eat "
    "ate go went come came on in at to of for with by from up down over under left right yes no"
).split()


def _vocabulary() -> dict[str, int]:
    tokens = list(SPECIAL_TOKENS)
    tokens += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens += [str(d) for d in range(10)]
    tokens += list(".,;:!?+-*/=()'\"")
    tokens += [w for w in _WORDS if w not in tokens]
    tokens += [f"w{i}" for i in range(VOCAB_SIZE - len(tokens))]  # filler words up to VOCAB_SIZE
    assert len(tokens) == VOCAB_SIZE, len(tokens)
    return {t: i for i, t in enumerate(tokens)}


def tiny_tokenizer(vocabulary: dict[str, int] | None = None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer (whitespace + punctuation split), left padding, pad/eos/bos/unk set; `vocabulary`
    (token -> id) replaces the default one."""
    tok = Tokenizer(models.WordLevel(vocab=vocabulary or _vocabulary(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        padding_side="left",
    )


def _common(vocab_size: int, max_positions: int) -> dict:
    return dict(
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )


def tiny_teacher(
    *,
    vocab_size: int = VOCAB_SIZE,
    hidden_size: int = 64,
    layers: int = 3,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 256,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Qwen2ForCausalLM:
    """Qwen2-style teacher (GQA, q/k/v bias), random init, eval mode. `vocab_size` > VOCAB_SIZE mimics
    an embedding matrix padded past the tokenizer's vocabulary."""
    config = Qwen2Config(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        **_common(vocab_size, max_positions),
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).to(dtype).eval()


def tiny_student(
    *,
    vocab_size: int = VOCAB_SIZE,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 4,
    max_positions: int = 256,
    seed: int = 1,
    dtype: torch.dtype = torch.float32,
) -> LlamaForCausalLM:
    """Llama-style student (smaller, plain multi-head attention), random init, eval mode."""
    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        **_common(vocab_size, max_positions),
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


def random_prompts(
    batch: int, max_len: int, *, min_len: int = 1, seed: int = 0, vocab_size: int = VOCAB_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts of lengths in [min_len, max_len] (no special tokens inside).
    Returns (input_ids [batch, max_len], attention_mask [batch, max_len])."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=g)
    ids = torch.randint(len(SPECIAL_TOKENS), vocab_size, (batch, max_len), generator=g)
    mask = torch.arange(max_len)[None, :] >= (max_len - lengths)[:, None]
    ids = torch.where(mask, ids, torch.full_like(ids, PAD_ID))
    return ids, mask.long()


def tiny_distill_config(tmp_path, **settings):
    """A DistillConfig for CPU tests: output under tmp_path/out, no saving, no reporting, batch 4, 5 new
    tokens, 2 steps (`settings` override any of them)."""
    from adaswitch import DistillConfig

    defaults = dict(
        output_dir=str(tmp_path / "out"),
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=4,
        max_new_tokens=5,
        max_steps=2,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        learning_rate=1e-2,
    )
    return DistillConfig(**{**defaults, **settings})


def tiny_distiller(
    tmp_path,
    *,
    data=None,
    eval_data=None,
    student=None,
    teacher=None,
    tokenizer=None,
    teacher_tokenizer=None,
    **settings,
):
    """A Distiller with `tiny_distill_config(tmp_path, **settings)`: by default a fresh student (train mode)
    and teacher with a 64-token context, the tiny tokenizer and four prompt/completion rows of
    tests/scripts/tiny_run.py."""
    import datasets
    from scripts.tiny_run import rows

    from adaswitch import Distiller

    return Distiller(
        model=student if student is not None else tiny_student(max_positions=64).train(),
        teacher_model=teacher if teacher is not None else tiny_teacher(max_positions=64),
        args=tiny_distill_config(tmp_path, **settings),
        train_dataset=data if data is not None else datasets.Dataset.from_list(rows(4)),
        eval_dataset=eval_data,
        processing_class=tokenizer if tokenizer is not None else tiny_tokenizer(),
        teacher_processing_class=teacher_tokenizer,
    )


def fused_and_logits_steps(trainer, batch):
    """[(loss, parameter gradients)] of one compute_loss + backward with the fused LM-head loss, then with the
    logits path, on the same batch: what the fused-vs-logits agreement tests compare."""
    results = []
    for fused in (True, False):
        trainer._use_fused = lambda model, fused=fused: fused
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in trainer.model.parameters()]))
    return results
