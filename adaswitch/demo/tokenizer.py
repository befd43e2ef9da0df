"""A character-level tokenizer for the demo task, built with `tokenizers` and wrapped as a
`transformers.PreTrainedTokenizerFast` so the engine and trainer treat it like any HF tokenizer.

No special token is added automatically: prompts and completions are tokenized as plain text and the
trainer appends EOS to completions (as TRL does).
"""

from __future__ import annotations

from adaswitch.demo.task import CHARS

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, BOS, EOS)


def build_tokenizer(chars: str = CHARS):
    """Ids: <pad>=0, <bos>=1, <eos>=2, then one id per character in `chars` order."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if not isinstance(chars, str) or not chars or len(set(chars)) != len(chars):
        raise ValueError(f"chars must be a non-empty string of distinct characters, got {chars!r}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(chars)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        padding_side="left",
        model_max_length=128,
        clean_up_tokenization_spaces=False,
    )
