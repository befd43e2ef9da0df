"""Seconds per distillation step for every policy on the demo models and budget, split into generation /
teacher forward (loss) / student forward + backward + optimizer, with teacher forwards per response token
and host syncs, plus TRL's `DistillationTrainer` (on-policy, same models, prompts, batch, max new tokens,
CPU, no vLLM) as the peer. Everything is timed in the same run, configurations interleaved over rounds;
ratios are what to read (the machine is shared and noisy). Writes
benchmarks/results/distill_step_cpu.{csv,md}.

    python benchmarks/bench_distill_step.py [--rounds 2] [--steps 3] [--batch 32] [--max-new-tokens 40]

Models: the demo's shipped teacher (Qwen2-style) and shipped student (Llama-style); prompts: the demo
task's training prompts (the same ones for every configuration); budget: the demo's quick preset (batch
32, 40 new tokens, forward KL, SKD top-k 2). Per configuration and round: a fresh copy of the student,
one warm-up step, then --steps timed steps; the table holds medians over all timed steps. Columns:

- generation: `adaswitch.generate` inside the step (Distiller's own timer);
- teacher fwd (loss): the loss's teacher forward (0 when the teacher states from generation are reused);
- student fwd+bwd+opt: the rest of the step (the student's forward and backward, the optimizer, metrics);
- teacher fwd / token: batched calls of the teacher's decoder (prefill, decode, verification and the loss's
  forward) per response token of a row (calls x batch / response tokens);
- host syncs / step: device-to-host reads in one compute_loss (generation, loss, metrics), counted by
  adaswitch.engine.sync.SyncCounter in an extra, untimed step.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import io
import logging
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from machine_info import cpu_model, git_commit, load_average, utc_now
from transformers import TrainerCallback

RESULTS = Path(__file__).resolve().parent / "results"
SKD_TOP_K = 2  # the demo's

# name -> DistillConfig overrides ("before": the settings before teacher-state reuse and guidance)
CONFIGS = {
    "On-policy": dict(policy="student"),
    "AdaSwitch, step (before)": dict(policy="adaswitch", lookahead=0, reuse_teacher_states=False),
    "AdaSwitch, step + reuse": dict(policy="adaswitch", lookahead=0),
    "AdaSwitch, G=4 lookahead, step guidance + reuse": dict(policy="adaswitch", lookahead=4, guidance="step"),
    "AdaSwitch, G=2 speculative + reuse": dict(policy="adaswitch", lookahead=2, guidance="speculative"),
    "AdaSwitch, G=4 speculative + reuse": dict(policy="adaswitch", lookahead=4, guidance="speculative"),
    "AdaSwitch, G=8 speculative + reuse": dict(policy="adaswitch", lookahead=8, guidance="speculative"),
    "SKD, step (before)": dict(policy="skd", skd_top_k=SKD_TOP_K, lookahead=0, reuse_teacher_states=False),
    "SKD, step + reuse": dict(policy="skd", skd_top_k=SKD_TOP_K, lookahead=0),
    "SKD, G=2 + reuse": dict(policy="skd", skd_top_k=SKD_TOP_K, lookahead=2),
    "SKD, G=4 + reuse": dict(policy="skd", skd_top_k=SKD_TOP_K, lookahead=4),
    "SKD, G=8 + reuse": dict(policy="skd", skd_top_k=SKD_TOP_K, lookahead=8),
    "SeqKD (teacher), step (before)": dict(policy="teacher", lookahead=0, reuse_teacher_states=False),
    "SeqKD (teacher), step + reuse": dict(policy="teacher", lookahead=0),
    "SeqKD (teacher), G=4 speculative + reuse": dict(policy="teacher", lookahead=4, guidance="speculative"),
    "AdaSwitch, defaults": dict(policy="adaswitch"),
    "SKD, defaults": dict(policy="skd", skd_top_k=SKD_TOP_K),
    "SeqKD (teacher), defaults": dict(policy="teacher"),
}
TRL = "TRL DistillationTrainer (on-policy)"


class StepTimer(TrainerCallback):
    def __init__(self):
        self.seconds, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds.append(time.perf_counter() - self._start)


class Counter:
    """Calls of a module's forward (a forward pre-hook)."""

    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, *args):
        self.calls += 1


def _decoder(model):
    return model.get_decoder() if hasattr(model, "get_decoder") else model


def run_adaswitch(name, overrides, teacher, student, tokenizer, pool, args, out_dir):
    from adaswitch.engine.sync import SyncCounter
    from adaswitch.train.config import DistillConfig
    from adaswitch.train.distiller import Distiller

    steps = args.steps + 1
    config = DistillConfig(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=args.batch, learning_rate=1e-4,
        max_grad_norm=1.0, max_new_tokens=args.max_new_tokens, seed=0, data_seed=0, logging_steps=1,
        save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
        **overrides,
    )
    trainer = Distiller(model=copy.deepcopy(student), teacher_model=teacher, args=config, train_dataset=pool,
                        processing_class=tokenizer)
    teacher_seconds = []
    forward = trainer._forward

    def timed_forward(model, *a, **kw):
        if model is not trainer.teacher_model:
            return forward(model, *a, **kw)
        start = time.perf_counter()
        out = forward(model, *a, **kw)
        teacher_seconds[-1] += time.perf_counter() - start
        return out

    trainer._forward = timed_forward
    timer = StepTimer()
    trainer.add_callback(timer)
    begin = timer.on_step_begin

    def step_begin(*a, **kw):
        teacher_seconds.append(0.0)
        begin(*a, **kw)

    timer.on_step_begin = step_begin
    counter = Counter(_decoder(teacher))
    try:
        trainer.train()
    finally:
        counter.handle.remove()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    gen = [h["generation_seconds"] for h in logs]
    tokens = sum(h["response_tokens"] for h in logs)
    step_teacher, calls = list(teacher_seconds), counter.calls  # before the extra step
    # the extra step: host reads of one compute_loss
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with SyncCounter() as sync:
        trainer.compute_loss(trainer.model, batch)
    rows = []
    for i in range(1, steps):  # step 0 is the warm-up
        total = timer.seconds[i]
        rows.append(dict(total=total, generation=gen[i], teacher=step_teacher[i],
                         student=total - gen[i] - step_teacher[i]))
    extra = dict(teacher_forwards_per_token=calls * args.batch / max(tokens, 1), host_syncs=sync.count,
                 teacher_token_fraction=statistics.mean(h.get("teacher_token_fraction", 0.0) for h in logs),
                 reused=statistics.mean(h.get("teacher_states_reused", 0.0) for h in logs),
                 lookahead=config.lookahead, guidance=config.guidance)
    return rows, extra


def run_trl(teacher, student, tokenizer, pool, args, out_dir):
    from trl import DistillationConfig, DistillationTrainer

    from adaswitch.engine.sync import SyncCounter

    steps = args.steps + 1
    config = DistillationConfig(
        output_dir=out_dir, max_steps=steps, per_device_train_batch_size=args.batch, learning_rate=1e-4,
        max_grad_norm=1.0, max_completion_length=args.max_new_tokens, temperature=1.0, beta=0.0, seed=0,
        data_seed=0, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
        dataloader_num_workers=0, use_vllm=False,
    )
    trainer = DistillationTrainer(model=copy.deepcopy(student), teacher_model=teacher, args=config,
                                  train_dataset=pool.select_columns(["prompt"]), processing_class=tokenizer)
    timer = StepTimer()
    trainer.add_callback(timer)
    counter = Counter(_decoder(teacher))
    tokens = []
    generate = trainer.model.generate if hasattr(trainer.model, "generate") else None
    gen_seconds = []

    def timed_generate(*a, **kw):
        start = time.perf_counter()
        out = generate(*a, **kw)
        gen_seconds.append(time.perf_counter() - start)
        tokens.append(int((out[:, kw["input_ids"].shape[1] if "input_ids" in kw else a[0].shape[1]:]
                           != tokenizer.pad_token_id).sum()))
        return out

    if generate is not None:
        trainer.model.generate = timed_generate
    try:
        with SyncCounter() as sync:
            trainer.train()
    finally:
        counter.handle.remove()
    rows = []
    for i in range(1, steps):
        g = gen_seconds[i] if len(gen_seconds) == steps else float("nan")
        rows.append(dict(total=timer.seconds[i], generation=g, teacher=float("nan"),
                         student=timer.seconds[i] - g))
    per_token = counter.calls * args.batch / max(sum(tokens), 1) if tokens else float("nan")
    extra = dict(teacher_forwards_per_token=per_token,
                 host_syncs=sync.count / steps, teacher_token_fraction=0.0, reused=0.0, lookahead=0,
                 guidance="-")
    return rows, extra


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--only", default=None, help="semicolon-separated configuration names (default: all)")
    parser.add_argument("--no-trl", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "distill_step_cpu"))
    args = parser.parse_args()

    from transformers.utils import logging as hf_logging

    from adaswitch.demo.build_teacher import STUDENT_DIR, TEACHER_DIR, DataSpec, load_teacher

    hf_logging.set_verbosity_error()
    logging.getLogger("adaswitch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    teacher, tokenizer = load_teacher(TEACHER_DIR)
    teacher.requires_grad_(False)
    student, _ = load_teacher(STUDENT_DIR)
    student.train()
    train = DataSpec().build()["train"]
    pool = train.select(range((args.steps + 2) * args.batch))
    names = list(CONFIGS) if args.only is None else [n.strip() for n in args.only.split(";")]
    if not args.no_trl:
        names.append(TRL)
    load_before = load_average()
    results = {n: [] for n in names}
    extras = {}
    for r in range(args.rounds):
        for name in names:
            with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp, contextlib.redirect_stdout(io.StringIO()):
                if name == TRL:
                    rows, extra = run_trl(teacher, student, tokenizer, pool, args, tmp)
                else:
                    rows, extra = run_adaswitch(name, CONFIGS[name], teacher, student, tokenizer, pool, args, tmp)
            results[name] += rows
            extras[name] = extra
            med = statistics.median(x["total"] for x in rows)
            print(f"round {r} {name}: {med:.3f} s/step", flush=True)
    load_after = load_average()

    def med(name, key):
        vals = [x[key] for x in results[name] if x[key] == x[key]]
        return statistics.median(vals) if vals else float("nan")

    base = med("On-policy", "total") if "On-policy" in results else float("nan")
    trl = med(TRL, "total") if TRL in results else float("nan")
    table = []
    for name in names:
        e = extras[name]
        table.append(dict(
            config=name, lookahead=e["lookahead"], guidance=e["guidance"],
            seconds_per_step=med(name, "total"), generation=med(name, "generation"),
            teacher_forward_loss=med(name, "teacher"), student_fwd_bwd_opt=med(name, "student"),
            vs_on_policy=med(name, "total") / base, vs_trl=med(name, "total") / trl,
            teacher_forwards_per_token=e["teacher_forwards_per_token"], host_syncs_per_step=e["host_syncs"],
            teacher_token_fraction=e["teacher_token_fraction"], teacher_states_reused=e["reused"],
        ))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    meta = (f"CPU: {cpu_model()}, torch {torch.__version__}, threads {torch.get_num_threads()}; commit "
            f"{git_commit()}; {utc_now()}; load average before {load_before}, after {load_after}. "
            f"Batch {args.batch}, max_new_tokens {args.max_new_tokens}, {args.rounds} rounds x {args.steps} timed "
            f"steps per configuration (medians).")
    lines = [
        "# Distillation step cost on CPU (demo models, quick-preset budget)", "", meta, "",
        "Generated by `benchmarks/bench_distill_step.py`. Seconds are medians; ratios divide medians of the "
        "same run. TRL's row times its whole step (generation by `model.generate`; its other columns are "
        "not split). Teacher forwards per token count the teacher decoder's batched calls (prefill, decode, "
        "verification, the loss's forward) per response token of a row; host syncs are per compute_loss "
        "(TRL: per training step).", "",
        "| configuration | G | guidance | s / step | generation | teacher fwd (loss) | student fwd+bwd+opt "
        "| vs on-policy | vs TRL | teacher fwd / token | host syncs / step | teacher tokens | states reused |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for t in table:
        lines.append(
            f"| {t['config']} | {t['lookahead']} | {t['guidance']} | {t['seconds_per_step']:.3f} | "
            f"{t['generation']:.3f} | {t['teacher_forward_loss']:.3f} | {t['student_fwd_bwd_opt']:.3f} | "
            f"{t['vs_on_policy']:.2f}x | {t['vs_trl']:.2f}x | {t['teacher_forwards_per_token']:.3f} | "
            f"{t['host_syncs_per_step']:.0f} | {t['teacher_token_fraction']:.2f} | {t['teacher_states_reused']:.0%} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
