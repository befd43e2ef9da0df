"""Teacher and student architectures for the demo: real transformers models built from configs
(no hub access needed). Qwen2-style teacher, Llama-style student about 10x smaller; both share the
demo tokenizer's vocabulary exactly."""

from __future__ import annotations

# name -> keyword arguments of the transformers config. "tiny" exists for tests (seconds to train).
TEACHER_PRESETS = {
    "demo": dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "tiny": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    ),
}
STUDENT_PRESETS = {
    "demo": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "tiny": dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    ),
}
MAX_POSITIONS = 128


def _special_ids(tokenizer) -> dict:
    return dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
    )


def _preset(presets: dict, preset: str) -> dict:
    if preset not in presets:
        raise ValueError(f"preset must be one of {sorted(presets)}, got {preset!r}")
    return presets[preset]


def teacher_config(tokenizer, preset: str = "demo"):
    from transformers import Qwen2Config

    return Qwen2Config(**_preset(TEACHER_PRESETS, preset), **_special_ids(tokenizer))


def student_config(tokenizer, preset: str = "demo"):
    from transformers import LlamaConfig

    return LlamaConfig(**_preset(STUDENT_PRESETS, preset), **_special_ids(tokenizer))


def build_model(config, seed: int):
    """A freshly initialised causal LM for `config`, the same weights for the same seed."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def num_parameters(model) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())
