"""Tiny random-init models of every decoder-only family the engine supports, built from their config
classes (no hub access), sharing the tiny tokenizer's ids (vocabulary 300, pad 0, bos 1, eos 2).

`FAMILIES` maps a family name to a builder `(seed, dtype, attn) -> model`; windowed families get a
sliding window of `WINDOW` tokens so that a short prompt plus response runs past it. `build(name)` makes
one in eval mode. `REFUSED` maps families whose layers are not attention to the layer type named in
the engine's refusal.
"""

from __future__ import annotations

import torch
import transformers as tf
from tiny_models import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE

WINDOW = 5  # sliding window of the windowed families: prompts of up to 7 + 12 new tokens run past it
HIDDEN, LAYERS, HEADS, KV_HEADS = 32, 2, 4, 2


def _ids() -> dict:
    return dict(vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                tie_word_embeddings=False)


def _llama_like(cls, **extra):
    def make():
        kw = dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=128, **_ids())
        kw.update(extra)
        return cls(**kw)
    return make


def _moe(cls, **extra):
    return _llama_like(cls, num_experts_per_tok=2, **extra)


CONFIGS = {
    "llama": _llama_like(tf.LlamaConfig),
    "qwen2": _llama_like(tf.Qwen2Config),
    "qwen2-sliding": _llama_like(tf.Qwen2Config, use_sliding_window=True, sliding_window=WINDOW,
                                 max_window_layers=1),
    "qwen3": _llama_like(tf.Qwen3Config, head_dim=8),
    "qwen3-moe": _moe(tf.Qwen3MoeConfig, head_dim=8, num_experts=4, moe_intermediate_size=16,
                      use_sliding_window=True, sliding_window=WINDOW),
    "mistral": _llama_like(tf.MistralConfig, sliding_window=WINDOW),
    "mixtral": _moe(tf.MixtralConfig, num_local_experts=4, sliding_window=WINDOW),
    "gemma": _llama_like(tf.GemmaConfig, head_dim=8),
    "gemma2": _llama_like(tf.Gemma2Config, head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8,
                          final_logit_softcapping=3.0, attn_logit_softcapping=1.0,
                          initializer_range=0.5),  # scores large enough for the softcaps to bite
    "gemma3": _llama_like(tf.Gemma3TextConfig, head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8,
                          sliding_window_pattern=2, layer_types=["sliding_attention", "full_attention"]),
    "phi": _llama_like(tf.PhiConfig, partial_rotary_factor=0.5),
    "phi3": _llama_like(tf.Phi3Config, sliding_window=WINDOW),
    "starcoder2": _llama_like(tf.Starcoder2Config, sliding_window=WINDOW),
    "gpt2": lambda: tf.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=128, **_ids()),
    "gpt-neox": _llama_like(tf.GPTNeoXConfig, rotary_pct=0.5),
    "gptj": lambda: tf.GPTJConfig(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, rotary_dim=4, n_positions=128,
                                  **_ids()),
    "opt": lambda: tf.OPTConfig(hidden_size=HIDDEN, ffn_dim=2 * HIDDEN, num_hidden_layers=LAYERS,
                                num_attention_heads=HEADS, word_embed_proj_dim=HIDDEN, max_position_embeddings=128,
                                dropout=0.0,
                                **_ids()),
    "falcon-mqa": lambda: tf.FalconConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                          multi_query=True, new_decoder_architecture=False, alibi=False,
                                          max_position_embeddings=128, **_ids()),
    "falcon-alibi": lambda: tf.FalconConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                            multi_query=False, alibi=True, max_position_embeddings=128, **_ids()),
    "bloom": lambda: tf.BloomConfig(hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, **_ids()),
    "stablelm": _llama_like(tf.StableLmConfig),
    "olmo2": _llama_like(tf.Olmo2Config),
    "olmo3": _llama_like(tf.Olmo3Config, sliding_window=WINDOW,
                         layer_types=["sliding_attention", "full_attention"]),
    "cohere": _llama_like(tf.CohereConfig, logit_scale=0.5),
    "cohere2": _llama_like(tf.Cohere2Config, logit_scale=0.5, sliding_window=WINDOW,
                           layer_types=["sliding_attention", "full_attention"]),
    "granite": _llama_like(tf.GraniteConfig, logits_scaling=2.0, attention_multiplier=0.2,
                           embedding_multiplier=2.0, residual_multiplier=0.5),
    "smollm3": _llama_like(tf.SmolLM3Config),
    "gpt-oss": _moe(tf.GptOssConfig, head_dim=8, num_local_experts=4, sliding_window=WINDOW,
                    layer_types=["sliding_attention", "full_attention"]),
}


# Families whose transformers implementation has no SDPA attention (transformers refuses it): eager only.
EAGER_ONLY = ("gemma2", "bloom", "gpt-oss")


def attentions(name: str) -> tuple:
    return ("eager",) if name in EAGER_ONLY else ("sdpa", "eager")


def build(name: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, attn: str = "sdpa",
          vocab_size: int = VOCAB_SIZE, init: float | None = None):
    """The family's tiny model, random init from `seed`, in eval mode; `vocab_size` > VOCAB_SIZE pads the
    embedding matrix past the tokenizer's vocabulary; `init` sets the weights' initializer range (larger:
    peakier distributions)."""
    cfg = CONFIGS[name]()
    cfg.vocab_size = vocab_size
    if init is not None:
        cfg.initializer_range = init
    if hasattr(cfg, "rope_parameters") and isinstance(cfg.rope_parameters, dict) \
            and "original_max_position_embeddings" in cfg.rope_parameters:  # GPT-OSS's YaRN: same length
        cfg.rope_parameters["original_max_position_embeddings"] = cfg.max_position_embeddings
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).to(dtype).eval()


def _refused_configs() -> dict:
    """Families whose layers are not attention over a KV cache -> the layer type the refusal names."""
    base = dict(hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_attention_heads=HEADS,
                num_key_value_heads=KV_HEADS, **_ids())
    return {
        "qwen3-next": (lambda: tf.Qwen3NextConfig(num_hidden_layers=2, layer_types=["linear_attention",
                       "full_attention"], num_experts=4, moe_intermediate_size=16, head_dim=8, **base),
                       "linear_attention"),
        "lfm2": (lambda: tf.Lfm2Config(num_hidden_layers=2, layer_types=["conv", "full_attention"], **base), "conv"),
        "llama4-chunked": (lambda: tf.Llama4TextConfig(num_hidden_layers=2, attention_chunk_size=4,
                           num_local_experts=2, intermediate_size_mlp=2 * HIDDEN, **base), "chunked_attention"),
    }


REFUSED = _refused_configs()


def build_refused(name: str):
    cfg = REFUSED[name][0]()
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()
