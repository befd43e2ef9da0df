"""`adaswitch.evaluate`: task accuracy of a (distilled) model and its teacher-forced KL to a teacher.

Accuracy comes from greedy generation and a pluggable answer checker (default: exact match of the text
after the final-answer marker, GSM8K's "####" style). A task may also supply a `step_checker` that grades
each intermediate result of the model's answer given its own earlier results: the per-step accuracy,
a finer measure than the final answer, which one early slip makes wrong. The KL is the mean over reference-completion
tokens of KL(p_teacher || p_model) with both models teacher-forced on prompt + reference, the quantity
distillation minimises, so it tracks training without depending on decoding.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

from adaswitch.train.atomic import write_file
from adaswitch.train.data import (
    COMPLETION_IDS,
    PROMPT_IDS,
    DistillCollator,
    check_output_file,
    check_same_tokenizer,
    context_length,
    load_prompt_completion,
    prompt_limit,
    saved_tokenizers,
    tokenize_dataset,
)

DEFAULT_MAX_NEW_TOKENS = 256


def extract_answer(text: str, marker: str = "####") -> str | None:
    """The stripped text after the last `marker` (None when the marker is absent)."""
    if marker not in text:
        return None
    return text.rsplit(marker, 1)[1].strip()


def exact_match_checker(marker: str = "####") -> Callable[[str, str], bool]:
    """Checker comparing the answers after `marker`; a reference without the marker is the answer itself."""

    def check(prediction: str, reference: str) -> bool:
        predicted = extract_answer(prediction, marker)
        expected = extract_answer(reference, marker)
        expected = reference.strip() if expected is None else expected
        return predicted is not None and predicted == expected

    return check


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


class _TokenizerVocabulary(LogitsProcessor):
    """Logits processor for `model.generate`: ids >= vocab (embedding rows padded past the tokenizer's
    vocabulary, which are not tokens) get -inf, so they are never generated."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, input_ids, scores):
        if scores.shape[-1] > self.vocab:
            scores = scores.clone()
            scores[:, self.vocab :] = -math.inf
        return scores


@torch.no_grad()
def _teacher_forced_kl(model, teacher, batch, device, vocab: int) -> tuple[float, int]:
    """Sum over valid completion tokens of KL(p_T || p_S), and the number of those tokens."""
    from adaswitch.ops import token_divergence

    prompt, pmask = batch["prompt_input_ids"].to(device), batch["prompt_attention_mask"].to(device)
    comp, cmask = batch["completion_ids"].to(device), batch["completion_mask"].to(device)
    ids = torch.cat([prompt, comp], dim=1)
    mask = torch.cat([pmask, cmask], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    width = prompt.shape[1]
    # Logits at position j predict token j + 1: the completion is predicted from positions P-1 .. P+C-2.
    s = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, width - 1 : -1]
    t = teacher(input_ids=ids, attention_mask=mask, position_ids=positions.to(_device_of(teacher))).logits
    t = t[:, width - 1 : -1].to(s.device)
    # the tokenizer's ids only: rows of an embedding matrix padded past its vocabulary weigh nothing
    kl = token_divergence(s[..., :vocab].float(), t[..., :vocab].float(), "forward_kl")
    valid = cmask.bool()
    return float(kl[valid].sum()), int(valid.sum())


@torch.no_grad()
def _teacher_nll(teacher, sequences, prompt_mask, eos: int | None, vocab: int) -> tuple[float, int]:
    """Sum over the generated tokens (up to and including the first EOS) of -log p_T(token | prefix), and the
    number of those tokens: how likely the teacher finds what the model wrote on its own."""
    device = _device_of(teacher)
    sequences, prompt_mask = sequences.to(device), prompt_mask.to(device)
    width = prompt_mask.shape[1]
    response = sequences[:, width:]
    if response.shape[1] == 0:
        return 0.0, 0
    if eos is None:
        valid = torch.ones_like(response, dtype=torch.bool)
    else:
        is_eos = (response == eos).long()
        valid = (torch.cumsum(is_eos, 1) - is_eos) == 0  # no EOS strictly before the token
    mask = torch.cat([prompt_mask, valid.long()], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = teacher(input_ids=sequences, attention_mask=mask, position_ids=positions).logits[:, width - 1 : -1]
    logp = torch.log_softmax(logits[..., :vocab].float(), -1).gather(-1, response[..., None])[..., 0]
    return float(-logp[valid].sum()), int(valid.sum())


def evaluate(
    model,
    tokenizer,
    dataset,
    *,
    answer_marker: str = "####",
    checker: Callable[[str, str], bool] | None = None,
    step_checker: Callable[[object, str, str], Sequence[bool]] | None = None,
    teacher=None,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    output_path: str | Path | None = None,
    progress: bool = True,
    teacher_tokenizer=None,
    teacher_nll: bool = False,
) -> dict:
    """Greedy-decode every prompt, check the answers and (with `teacher`) measure the teacher-forced KL.

    Args:
        model: a causal LM (`AutoModelForCausalLM`), evaluated in eval mode.
        tokenizer: its tokenizer (chat template applied to message-list rows). Only its ids are generated
            and scored: ids >= len(tokenizer) (embedding rows padded past it) are cut off.
        dataset: a `datasets.Dataset` or a .jsonl/.json/.parquet/.csv path with `prompt` and `completion`
            (the reference) columns.
        answer_marker: the default checker compares the text after the last occurrence of this marker.
        checker: `checker(prediction_text, reference_text) -> bool`; replaces the default exact match.
        step_checker: `step_checker(prompt, prediction_text, reference_text) -> sequence of bool`, one
            entry per step the task expects (a missing step is False), each True when the model's result
            of that step is right given its own earlier results. `prompt` is the dataset row's prompt (text
            or messages). Adds `step_accuracy` (right steps / expected steps, over all examples) and, per
            example, `steps_correct` / `steps_total`.
        teacher: when given, also report `teacher_kl`, the mean token KL(p_teacher || p_model) over the
            reference completions.
        max_new_tokens: greedy decoding budget per prompt; None: 256, or less if the longest prompt plus
            256 would not fit in the models' context.
        batch_size: prompts per generation batch.
        output_path: where to also write the results as JSON (atomically: a failed write, e.g. a full disk,
            leaves the previous file unchanged and raises `adaswitch.train.atomic.WriteError` naming the path).
        progress: show a tqdm progress bar.
        teacher_tokenizer: the teacher's tokenizer, when loaded separately. It, and the tokenizers saved in
            the local directories the models were loaded from, must have `tokenizer`'s vocabulary
            (token -> id map): the KL compares distributions id by id (an error otherwise).
        teacher_nll: with `teacher`, also report `teacher_nll`, the teacher's mean negative log-likelihood
            (nats per token) of the model's own greedy answers, EOS included: how much the teacher agrees
            with what the model writes on its own, where `teacher_kl` scores it on the reference's tokens.

    Returns:
        {"accuracy", "correct", "num_examples", "teacher_kl" (when a teacher is given), "teacher_nll" (with
        teacher_nll=True), "step_accuracy" and
        "steps_total" (with a step_checker), "examples": [{"index", "prediction", "reference", "correct"},
        ...]}.
    """
    if not isinstance(answer_marker, str) or not answer_marker:
        raise ValueError(f"answer_marker must be a non-empty string, got {answer_marker!r}")
    if checker is not None and not callable(checker):
        raise TypeError(
            f"checker must be a callable (prediction, reference) -> bool, got {type(checker).__name__}"
        )
    if step_checker is not None and not callable(step_checker):
        raise TypeError(
            "step_checker must be a callable (prompt, prediction, reference) -> sequence of bool, got "
            f"{type(step_checker).__name__}"
        )
    for name, value in (
        ("max_new_tokens", 1 if max_new_tokens is None else max_new_tokens),
        ("batch_size", batch_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer must define a pad token (tokenizer.pad_token_id is None)")
    if not isinstance(teacher_nll, bool):
        raise TypeError(f"teacher_nll must be a bool, got {type(teacher_nll).__name__}")
    if teacher_nll and teacher is None:
        raise ValueError("teacher_nll=True needs a teacher (teacher is None)")
    if output_path is not None:  # a path that cannot be written fails now, not after the whole evaluation
        output_path = check_output_file(output_path, name="output_path")
    named = [("tokenizer", tokenizer)]
    if teacher_tokenizer is not None:
        named.append(("teacher_tokenizer", teacher_tokenizer))
    known = [tok for _, tok in named]
    check_same_tokenizer(
        named + saved_tokenizers([("model", model)] + ([("teacher", teacher)] if teacher is not None else []), known)
    )
    vocab = len(tokenizer)
    for name, m in (("model", model), ("teacher", teacher)):
        head = m.get_output_embeddings() if hasattr(m, "get_output_embeddings") else None
        rows = getattr(head, "out_features", None)
        if rows is not None and rows < vocab:
            raise ValueError(f"the tokenizer has {vocab} tokens but the {name} has {rows} output rows")
    check = checker or exact_match_checker(answer_marker)
    data = load_prompt_completion(dataset, name="evaluation dataset", require_completion=True)
    models = [model] + ([teacher] if teacher is not None else [])
    limit = prompt_limit(None, max_new_tokens or 1, *models)
    tokens = tokenize_dataset(data, tokenizer, max_prompt_length=limit, name="evaluation dataset")
    if max_new_tokens is None:
        ctx = context_length(*models)
        longest = max(len(p) for p in tokens[PROMPT_IDS])
        max_new_tokens = DEFAULT_MAX_NEW_TOKENS if ctx is None else min(DEFAULT_MAX_NEW_TOKENS, ctx - longest)
    collate = DistillCollator(tokenizer.pad_token_id)
    device = _device_of(model)
    was_training = model.training
    model.eval()
    if teacher is not None:
        teacher.eval()

    examples, kl_sum, kl_count, nll_sum, nll_count = [], 0.0, 0, 0.0, 0
    bar = tqdm(total=len(tokens), desc="Evaluating", disable=not progress, unit="ex")
    try:
        for start in range(0, len(tokens), batch_size):
            rows = [tokens[i] for i in range(start, min(start + batch_size, len(tokens)))]
            batch = collate(rows)
            prompt = batch["prompt_input_ids"].to(device)
            with torch.no_grad():
                out = model.generate(
                    input_ids=prompt,
                    attention_mask=batch["prompt_attention_mask"].to(device),
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    logits_processor=LogitsProcessorList([_TokenizerVocabulary(vocab)]),
                )
            for j, row in enumerate(rows):
                index = start + j
                prediction = tokenizer.decode(out[j, prompt.shape[1] :], skip_special_tokens=True)
                reference = tokenizer.decode(row[COMPLETION_IDS], skip_special_tokens=True)
                example = {
                    "index": index,
                    "prediction": prediction,
                    "reference": reference,
                    "correct": bool(check(prediction, reference)),
                }
                if step_checker is not None:
                    steps = [bool(x) for x in step_checker(data[index]["prompt"], prediction, reference)]
                    example["steps_correct"], example["steps_total"] = sum(steps), len(steps)
                examples.append(example)
            if teacher is not None:
                s, n = _teacher_forced_kl(model, teacher, batch, device, vocab)
                kl_sum, kl_count = kl_sum + s, kl_count + n
            if teacher_nll:
                s, n = _teacher_nll(teacher, out, batch["prompt_attention_mask"], tokenizer.eos_token_id, vocab)
                nll_sum, nll_count = nll_sum + s, nll_count + n
            bar.update(len(rows))
    finally:
        bar.close()
        model.train(was_training)

    correct = sum(e["correct"] for e in examples)
    results = {"accuracy": correct / len(examples), "correct": correct, "num_examples": len(examples)}
    if step_checker is not None:
        total = sum(e["steps_total"] for e in examples)
        results["step_accuracy"] = sum(e["steps_correct"] for e in examples) / total if total else math.nan
        results["steps_total"] = total
    if teacher is not None:
        results["teacher_kl"] = kl_sum / kl_count if kl_count else math.nan
    if teacher_nll:
        results["teacher_nll"] = nll_sum / nll_count if nll_count else math.nan
    results["examples"] = examples
    if output_path is not None:  # whole or not at all: a full disk leaves the previous file as it was
        write_file(output_path, json.dumps(results, indent=2) + "\n")
    return results


__all__ = ["evaluate", "exact_match_checker", "extract_answer"]
