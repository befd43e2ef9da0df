"""`generate`'s argument checks: every argument and model checked before any work, each error naming the
argument and what was expected (a few host reads: prompt padding, token id ranges).

`check_arguments` returns what the decode loop needs: the models the policy runs (None for the others), their
attention layouts, the padding mask, the vocabulary size, the special ids, the example keys, the completions.

Vocabulary: without `tokenizer=` or `vocab_size=`, sampling is cut to the smaller of the models' output
vocabularies. Models that share a tokenizer (required) both cover it, so the smaller head still holds every
token and the ids it lacks are the other's padding rows (Qwen2-style heads are padded past the tokenizer);
only `tokenizer=` (or `vocab_size=`) also cuts padding that both heads have.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from adaswitch._validation import is_int
from adaswitch.engine.architecture import attention_layout
from adaswitch.engine.lookahead import CANDIDATES
from adaswitch.ops import rng
from adaswitch.policies import SKD, AdaSwitch, Mixed, Student, Teacher, check_policy

GUIDANCES = ("auto", "step", "speculative")
AUTO = "auto"
SPECULATIVE_CANDIDATES = (1, 2, 4, 8)  # lookahead="auto" under guidance="speculative": every block verifies


class Decoding(NamedTuple):
    """How the loop decodes: a fixed G, or the (G, speculative) options lookahead="auto" chooses among."""

    options: tuple  # lookahead="auto": ((G, speculative), ...); () for a fixed G
    lookahead: int  # fixed: G; auto: the largest option's G (the caches' transient columns)
    guided: bool  # fixed: speculative guidance; auto: some option verifies speculatively


def check_decoding(policy, lookahead, guidance, max_new_tokens: int, student) -> Decoding:
    """lookahead (an int G >= 0 or "auto") and guidance ("auto", "step", "speculative") for this policy.
    guidance="auto" verifies speculatively only where that gives step mode's tokens (a greedy teacher) and only
    under lookahead="auto"; with a fixed G it is step guidance."""
    if guidance not in GUIDANCES:
        raise ValueError(f"guidance must be one of {GUIDANCES}, got {guidance!r}")
    speculative = guidance == "speculative"
    if speculative and not isinstance(policy, (AdaSwitch, Teacher)):
        raise ValueError(f"guidance='speculative' applies to the AdaSwitch and Teacher policies, got "
                         f"{type(policy).__name__} (SKD's lookahead already scores G drafts per teacher forward)")
    if lookahead != AUTO:
        if not is_int(lookahead) or lookahead < 0:
            raise ValueError(f"lookahead must be 'auto' or an int >= 0 (0 = token by token), got {lookahead!r}")
        if speculative and lookahead < 1:
            raise ValueError(f"guidance='speculative' drafts lookahead = G tokens per teacher forward: pass "
                             f"lookahead >= 1 or 'auto', got {lookahead!r}")
        if lookahead > max_new_tokens:
            raise ValueError(f"lookahead must be <= max_new_tokens ({max_new_tokens}): a block drafts G tokens of "
                             f"a response of at most max_new_tokens (more only costs forwards), got {lookahead}")
        if lookahead > 0 and not isinstance(policy, (AdaSwitch, SKD)) and not speculative:
            raise ValueError("lookahead > 0 applies to the AdaSwitch and SKD policies (and Teacher with "
                             f"guidance='speculative'), got {type(policy).__name__}")
        return Decoding((), lookahead, speculative)
    fits = [g for g in CANDIDATES if g <= max_new_tokens]
    if speculative:
        options = tuple((g, True) for g in SPECULATIVE_CANDIDATES if g <= max_new_tokens)
    else:
        may_verify = (guidance == AUTO and isinstance(policy, (AdaSwitch, Teacher)) and policy.teacher_sampling.greedy
                      and student is not None)
        verified = tuple((g, True) for g in fits if g > 0) if may_verify else ()
        if isinstance(policy, Teacher):
            options = ((0, False), *verified) if verified else ()
        elif isinstance(policy, (AdaSwitch, SKD)):
            options = (*((g, False) for g in fits), *verified)
        else:  # one model decides every token: nothing to draft
            options = ()
    if not options:
        return Decoding((), 0, False)
    return Decoding(options, max(g for g, _ in options), any(v for _, v in options))


class Checked(NamedTuple):
    """The checked arguments of one `generate` call."""

    student: object  # None when the policy does not run it
    teacher: object
    layouts: dict  # {"student" | "teacher": attention layout or None}
    mask: torch.Tensor  # int64 [B, P] 0/1, left padding
    sync_every: int
    decoding: Decoding
    vocab_size: int
    eos: int
    pad: int
    keys: torch.Tensor  # int64 [B]
    completions: torch.Tensor | None




def _config(model):
    return model.config.get_text_config(decoder=True)


def _vocab(model) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and hasattr(head, "weight"):
        return head.weight.shape[0]
    return _config(model).vocab_size


def _check_model(name: str, model, needed: bool, policy):
    if model is None:
        if needed:
            raise ValueError(f"{name} is required by the {type(policy).__name__} policy, got None")
        return None
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"{name} must be a Hugging Face causal LM (torch.nn.Module with .config), "
                        f"got {type(model).__name__}")
    config = _config(model)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{name} must be a decoder-only causal LM, got an encoder-decoder model")
    return attention_layout(name, model)  # a clear error for layers the cache's masks cannot describe


def _special_id(name: str, value, models, vocab: int) -> int:
    if value is None:
        found = set()
        for m in models:
            v = getattr(_config(m), name, None)
            if isinstance(v, (list, tuple)):  # e.g. Llama 3's several EOS ids: one is needed here
                v = v[0] if len(v) == 1 else tuple(v)
            if v is not None:
                found.add(v)
        if len(found) != 1 or not is_int(next(iter(found))):
            raise ValueError(f"{name} is missing: pass {name}= explicitly (one int; the models' configs give "
                             f"{sorted(map(str, found)) or 'none'})")
        value = next(iter(found))
    if not is_int(value) or not 0 <= value < vocab:
        raise ValueError(f"{name} must be an int in [0, {vocab}), got {value!r}")
    return value


def _check_shared_tokenizer(student, teacher) -> None:
    cs, ct = _config(student), _config(teacher)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        a, b = getattr(cs, attr, None), getattr(ct, attr, None)
        if a is not None and b is not None and a != b:
            raise ValueError(f"student and teacher must share a tokenizer, but their configs disagree on "
                             f"{attr}: {a} vs {b}")


def _check_prompt(input_ids, attention_mask):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise TypeError("input_ids must be an int64 tensor [batch, prompt_length], got "
                        f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                        f"{tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must hold at least one row and one column, got {tuple(input_ids.shape)}")
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, got "
                         f"{tuple(getattr(attention_mask, 'shape', ()))}")
    mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
    # One host read: 0/1 values, left padding (non-decreasing along the row), a real last token.
    ok = ((mask == 0) | (mask == 1)).all() & (mask[:, 1:] >= mask[:, :-1]).all() & (mask[:, -1] == 1).all()
    if not bool(ok):
        raise ValueError("attention_mask must be 0/1 with left padding: every row's real tokens at the end, "
                         "at least one per row (use tokenizer.padding_side = 'left')")
    return mask


def default_sync_every(device) -> int:
    """Iterations between host reads when the caller gives none: a read drains an accelerator's queue (16
    amortises it), while on the CPU the work is already done when the read comes (1 stops the loop and the
    student at the first iteration where they are no longer needed)."""
    return 1 if torch.device(device).type == "cpu" else 16


def check_arguments(student, teacher, input_ids, attention_mask, *, policy, max_new_tokens, eos_token_id,
                    pad_token_id, seed, example_keys, lookahead, sync_every, completions, cuda_graph, vocab_size,
                    tokenizer, guidance, return_teacher_states) -> Checked:
    """`generate`'s arguments (see its docstring) checked, defaults resolved; raises on the first bad one."""
    check_policy(policy)
    if not isinstance(return_teacher_states, bool):
        raise TypeError(f"return_teacher_states must be a bool, got {type(return_teacher_states).__name__}")
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    decoding = check_decoding(policy, lookahead, guidance, max_new_tokens, student)
    guided = decoding.guided
    needs_student = isinstance(policy, (Student, SKD, AdaSwitch)) or (
        isinstance(policy, Mixed) and policy.lmbda > 0) or guided
    layouts = {"student": _check_model("student", student, needs_student, policy),
               "teacher": _check_model("teacher", teacher, policy.uses_teacher, policy)}
    # Models that define the vocabulary and special ids (Mixed(0) runs none but may still get a student).
    models = [m for m, used in ((student, policy.uses_student or guided), (teacher, policy.uses_teacher))
              if used and m is not None]
    if not needs_student:
        student = None
    if not policy.uses_teacher:
        teacher = None
    if student is not None and teacher is not None:
        _check_shared_tokenizer(student, teacher)
    if sync_every is None:
        sync_every = default_sync_every(input_ids.device if isinstance(input_ids, torch.Tensor) else "cpu")
    if not is_int(sync_every) or sync_every < 1:
        raise ValueError(f"sync_every must be an int >= 1, got {sync_every!r}")
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be a bool, got {type(cuda_graph).__name__}")
    rng.check_seed(seed)

    mask = _check_prompt(input_ids, attention_mask)
    device = input_ids.device
    for m in models:
        model_device = next(m.parameters()).device
        if model_device != device:
            raise ValueError(f"input_ids are on {device} but a model is on {model_device}; "
                             "move them to one device")
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs CUDA tensors and models, got {device}")

    if tokenizer is not None:
        if not hasattr(tokenizer, "__len__") or not hasattr(tokenizer, "eos_token_id"):
            raise TypeError(f"tokenizer must be a Hugging Face tokenizer, got {type(tokenizer).__name__}")
        n_tok = len(tokenizer)
        if vocab_size is None:
            vocab_size = n_tok
        elif is_int(vocab_size) and vocab_size > n_tok:
            raise ValueError(f"vocab_size={vocab_size} exceeds the tokenizer's {n_tok} tokens: ids past it are "
                             "not tokens (e.g. embedding rows padded past the tokenizer) and must not be sampled")
        eos_token_id = tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        pad_token_id = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
    model_vocab = min(_vocab(m) for m in models) if models else None
    if vocab_size is None:
        if model_vocab is None:
            raise ValueError("vocab_size is required when the policy runs no model")
        vocab_size = model_vocab
    elif not is_int(vocab_size) or vocab_size < 1:
        raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
    elif model_vocab is not None and vocab_size > model_vocab:
        raise ValueError(f"vocab_size={vocab_size} exceeds a model's output vocabulary ({model_vocab})")
    if isinstance(policy, SKD) and policy.top_k >= vocab_size:
        warnings.warn(f"SKD(top_k={policy.top_k}) with a vocabulary of {vocab_size} accepts every student "
                      "token: this is the Student policy (on-policy); choose top_k < vocab_size", stacklevel=3)
    eos = _special_id("eos_token_id", eos_token_id, models, vocab_size)
    pad = _special_id("pad_token_id", pad_token_id, models, vocab_size)
    if bool(((input_ids < 0) | (input_ids >= vocab_size)).any()):
        raise ValueError(f"input_ids must lie in [0, {vocab_size}) (the shared vocabulary)")

    b, p = input_ids.shape
    for m in models:
        limit = getattr(_config(m), "max_position_embeddings", None)
        if limit is not None and p + max_new_tokens > limit:
            raise ValueError(f"prompt length {p} + max_new_tokens {max_new_tokens} exceeds the model's "
                             f"max_position_embeddings {limit}")

    if example_keys is None:
        keys = torch.arange(b, device=device)
    else:
        keys = torch.as_tensor(example_keys, device=device)
        if keys.dtype not in (torch.int64, torch.int32) or tuple(keys.shape) != (b,):
            raise ValueError(f"example_keys must be {b} integers (one per row), got {keys.dtype} "
                             f"{tuple(keys.shape)}")
        keys = keys.long()

    if isinstance(policy, Mixed) and policy.lmbda < 1:
        if completions is None:
            raise ValueError("completions are required by Mixed(lmbda < 1): the dataset's responses [B, M]")
        if not isinstance(completions, torch.Tensor) or completions.dim() != 2 or completions.shape[0] != b \
                or completions.dtype != torch.long:
            raise ValueError(f"completions must be an int64 tensor [{b}, M], got "
                             f"{getattr(completions, 'dtype', type(completions).__name__)} "
                             f"{tuple(getattr(completions, 'shape', ()))}")
        completions = completions.to(device)
        if completions.numel() and bool(((completions < 0) | (completions >= vocab_size)).any()):
            bad = completions[(completions < 0) | (completions >= vocab_size)][0]
            raise ValueError(f"completions must hold token ids in [0, {vocab_size}) (the shared vocabulary, "
                             f"right-padded with pad_token_id={pad}), got {int(bad)}"
                             + (" (-100 is a label mask, not a token: pad with pad_token_id)" if bad == -100 else ""))
    elif completions is not None:
        raise ValueError(f"completions apply to the Mixed policy (lmbda < 1), not {type(policy).__name__}")


    return Checked(student, teacher, layouts, mask, sync_every, decoding, vocab_size, eos, pad, keys, completions)


__all__ = ["AUTO", "GUIDANCES", "Checked", "Decoding", "check_arguments", "check_decoding", "default_sync_every"]
