"""Supervised fine-tuning on the task's worked completions, and greedy accuracy: used to build the
teacher checkpoint and to initialise the student before distillation."""

from __future__ import annotations

import math
import time

import torch


def encode(tokenizer, prompts: list, completions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded `prompt + completion + EOS` ids, labels (-100 on prompt and padding) and attention mask.
    Chat rows (message-list prompts) go through the chat template, as the Distiller tokenizes them."""
    from adaswitch.train.data import encode_example

    rows, labels = [], []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        if isinstance(prompt, str):
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        else:
            p, c = encode_example(tokenizer, prompt, completion, row=i)
        rows.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(l)] = torch.tensor(l)
        mask[i, : len(r)] = 1
    return ids, lab, mask


def make_optimizer(model, *, steps: int, lr: float, warmup: int | None = None, weight_decay: float = 0.01):
    """AdamW (betas 0.9, 0.98) with a linear warm-up over `warmup` steps (default 5%) times a cosine
    decay to 0 over `steps`. Shared by SFT and the demo's distillation runs (passed to `Distiller`),
    so every method trains with the same optimizer and schedule."""
    warmup = max(1, steps // 20) if warmup is None else warmup
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    return opt, sched


def sft(
    model,
    tokenizer,
    dataset,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    warmup: int | None = None,
    weight_decay: float = 0.01,
    progress: bool = True,
    log_every: int = 0,
    eval_fn=None,
) -> dict:
    """Trains `model` in place on the dataset's completions (`make_optimizer`'s AdamW and schedule).
    Batches are drawn from a seeded permutation, so the run is a pure function of the arguments.
    `eval_fn(step)` (optional) is called every `log_every` steps. Returns {"steps", "seconds", "loss"}."""
    from tqdm.auto import tqdm

    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt, sched = make_optimizer(model, steps=steps, lr=lr, warmup=warmup, weight_decay=weight_decay)
    prompts, completions = dataset["prompt"], dataset["completion"]
    order = torch.randperm(len(prompts), generator=gen)
    cursor, loss_avg, start = 0, None, time.perf_counter()
    model.train()
    bar = tqdm(range(steps), desc="sft", disable=not progress, leave=False)
    for step in bar:
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(prompts), generator=gen), 0
        idx = order[cursor : cursor + batch_size].tolist()
        cursor += batch_size
        ids, labels, mask = encode(tokenizer, [prompts[i] for i in idx], [completions[i] for i in idx])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        bar.set_postfix(loss=f"{loss_avg:.4f}")
        if eval_fn is not None and log_every and (step + 1) % log_every == 0:
            eval_fn(step + 1)
            model.train()
    model.eval()
    return {"steps": steps, "seconds": time.perf_counter() - start, "loss": loss_avg}


@torch.no_grad()
def greedy_accuracy(model, tokenizer, dataset, *, batch_size: int = 256, max_new_tokens: int = 48) -> float:
    """Fraction of rows whose greedy completion carries the right final answer (HF `generate`)."""
    from adaswitch.demo.task import is_correct

    model.eval()
    correct = 0
    prompts, answers = dataset["prompt"], dataset["answer"]
    for lo in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[lo : lo + batch_size], add_special_tokens=False, padding=True, return_tensors="pt")
        out = model.generate(
            **batch,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        correct += sum(is_correct(t, a) for t, a in zip(texts, answers[lo : lo + batch_size]))
    return correct / len(prompts)
