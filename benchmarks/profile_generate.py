"""Where step-mode `generate` spends its CPU time: a torch profile of the benchmark models of
bench_generate.py (Qwen2-style, vocabulary 151936, batch 8) under an AdaSwitch policy that never switches
(both models run at every token), grouped by operator (self CPU time).

    python benchmarks/profile_generate.py [--new-tokens 64] [--threads 1]
    python benchmarks/profile_generate.py --models demo [--calls 3] [--out PATH]

Writes benchmarks/results/profile_generate_cpu.json and .md (date, commit, machine, load average) and
prints the table. "matrix products" = aten::mm, aten::addmm, aten::bmm (the LM heads and the layers'
projections); "fused step ops" = the adaswitch:: native ops (divergence, sampling, rank) plus, on the
PyTorch path, nothing (they would show as their aten ops).

--models demo: where AdaSwitch's generation time above its floor goes on the distillation benchmark's work
(bench_distill_step.py: the demo's shipped teacher and student, a batch of the demo's training prompts,
AdaSwitch's defaults, step mode, the teacher's states returned as the Distiller asks). The floor is
bench_distill_step's: raw DynamicCache forwards of each model for the positions the outputs need. The gap
ours - floor is split into: forwards the engine runs beyond those positions (priced at the engine's mean
forward), the engine's forwards against the floor's for the same positions, and the engine's work outside
the forwards (the rule, writes, cache bookkeeping), the last also by function under cProfile. Defaults
there: batch 32, 40 new tokens (the benchmark's); writes
benchmarks/results/profile_generate_demo_cpu.{json,md} unless --out.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_generate import EOS, PAD, VOCAB, machine, policies, prompts, qwen2  # noqa: E402
from machine_info import load_average  # noqa: E402

from adaswitch import Sampling, generate  # noqa: E402

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm")
MODELS = ("benchmark", "demo")
# --models demo: the engine's per-step work by function (cache.update is the K/V write inside each forward)
FUNCTIONS = ("step.fused_step", "cache.decode_inputs", "cache.update", "generate._write_hidden", "generate._write",
             "cache.rollback", "cache.advance", "generate._idle", "generate.flags", "generate.finish")
RESULTS = ROOT / "benchmarks" / "results"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=None, help="default 64 (demo: 40)")
    ap.add_argument("--batch", type=int, default=None, help="default 8 (demo: 32)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", choices=MODELS, default="benchmark",
                    help="benchmark: bench_generate.py's large-vocabulary models; demo: bench_distill_step.py's work")
    ap.add_argument("--calls", type=int, default=3, help="--models demo: generate calls per measurement")
    ap.add_argument("--out", default=None, help="output path without suffix (default: results/profile_generate"
                    "_cpu, or _demo_cpu with --models demo)")
    args = ap.parse_args(argv)
    demo_run = args.models == "demo"
    args.new_tokens = args.new_tokens if args.new_tokens is not None else (40 if demo_run else 64)
    args.batch = args.batch if args.batch is not None else (32 if demo_run else 8)
    for name in ("new_tokens", "batch", "threads", "calls"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be an int >= 1, got {getattr(args, name)}")
    torch.set_num_threads(args.threads)
    if demo_run:
        return demo(args, argv)
    args.out = args.out or str(RESULTS / "profile_generate_cpu")
    info = machine(torch.device("cpu"))
    teacher = qwen2(4, 512, 8, 2, seed=0, device="cpu", dtype=torch.float32)
    student = qwen2(2, 256, 4, 2, seed=1, device="cpu", dtype=torch.float32)
    ids, mask = prompts(args.batch, "cpu", VOCAB, PAD)
    policy = policies(Sampling(temperature=0.0))["never"]

    def run(n):
        return generate(student, teacher, ids, mask, policy=policy, max_new_tokens=n, eos_token_id=EOS,
                        pad_token_id=PAD)

    run(4)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(args.new_tokens)
    self_us = defaultdict(float)
    for e in prof.key_averages():
        self_us[e.key] += e.self_cpu_time_total
    total = sum(self_us.values())
    share = {k: v / total for k, v in self_us.items()}
    fused = {k: v for k, v in share.items() if k.startswith("adaswitch::")}
    summary = {
        "matrix_products": sum(share.get(k, 0.0) for k in MATMUL),
        "fused_step_ops": sum(fused.values()),
        "fused_ops": sorted(fused),
        "top": sorted(([k, round(v, 4)] for k, v in share.items()), key=lambda kv: -kv[1])[:12],
    }
    info.update(load_avg_end=load_average(), threads=args.threads, new_tokens=args.new_tokens, batch=args.batch,
                command="python benchmarks/profile_generate.py " + " ".join(sys.argv[1:] if argv is None else argv))
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"machine": info, "summary": summary}, indent=2) + "\n")
    lines = [
        "# Where step-mode generate spends its CPU time",
        "",
        f"Written by `{info['command'].strip()}` ({info['date']}, commit {info['commit']}, {info['cpu']}, "
        f"{info['cores']} cores, {args.threads} torch thread(s), load average {info['load_avg_start']} -> "
        f"{info['load_avg_end']}). Teacher Qwen2-style 4 layers x 512, student 2 x 256, vocabulary {VOCAB}, "
        f"batch {args.batch}, {args.new_tokens} new tokens, AdaSwitch that never switches (both models at every "
        "token), step mode, greedy. Shares of self CPU time under torch.profiler.",
        "",
        f"- matrix products ({', '.join(MATMUL)}): {100 * summary['matrix_products']:.1f}%",
        f"- fused step ops ({', '.join(summary['fused_ops']) or 'none'}): {100 * summary['fused_step_ops']:.1f}%",
        "",
        "| operator | share of self CPU time |",
        "|---|---|",
        *[f"| `{k}` | {100 * v:.1f}% |" for k, v in summary["top"]],
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


def _median_seconds(fn, calls: int) -> float:
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


class _ForwardClock:
    """Seconds and calls of a model's top-level forwards (pre / post hooks)."""

    def __init__(self, model):
        self.seconds, self.calls, self._start = 0.0, 0, None
        self.handles = [model.register_forward_pre_hook(self._pre), model.register_forward_hook(self._post)]

    def _pre(self, *a):
        self._start = time.perf_counter()

    def _post(self, *a):
        self.seconds += time.perf_counter() - self._start
        self.calls += 1

    def remove(self):
        for h in self.handles:
            h.remove()


def demo(args, argv) -> None:
    """The --models demo profile (see the module docstring)."""
    import cProfile
    import pstats
    import tempfile

    from bench_distill_step import decode_seconds, positions_needed
    from transformers.utils import logging as hf_logging

    from adaswitch.demo.build_teacher import STUDENT_DIR, TEACHER_DIR, DataSpec, load_teacher
    from adaswitch.train.config import DistillConfig
    from adaswitch.train.data import DistillCollator, prepare_dataset

    hf_logging.set_verbosity_error()
    info = machine(torch.device("cpu"))
    teacher, tokenizer = load_teacher(TEACHER_DIR)
    student, _ = load_teacher(STUDENT_DIR)
    n = args.new_tokens
    rows = prepare_dataset(DataSpec().build()["train"].select(range(args.batch)), tokenizer,
                           max_prompt_length=teacher.config.max_position_embeddings - n, use_completion=False)
    batch = DistillCollator(tokenizer.pad_token_id)([rows[i] for i in range(len(rows))])
    ids, mask = batch["prompt_input_ids"], batch["prompt_attention_mask"]
    with tempfile.TemporaryDirectory() as tmp:
        policy = DistillConfig(output_dir=tmp, policy="adaswitch", use_cpu=True, report_to="none").build_policy()

    def run():
        return generate(student, teacher, ids, mask, policy=policy, max_new_tokens=n, tokenizer=tokenizer,
                        seed=1, example_keys=batch["example_keys"], return_teacher_states=True)

    out = run()  # warm-up; the same seed gives the same tokens in every call
    need = positions_needed(policy, out.lengths, out.switch_position)
    # Engine and floor alternate, so both see the same load. The decoders' hooks time each model's
    # forwards inside the engine (prefill and decode; the LM heads count as outside).
    samples = []  # per call: engine seconds, inside student / teacher, floor student / teacher, forwards
    for _ in range(args.calls):
        clocks = [_ForwardClock(m.get_decoder()) for m in (student, teacher)]
        try:
            engine = _median_seconds(run, 1)
        finally:
            for c in clocks:
                c.remove()
        s = decode_seconds(student, ids, mask, need[0], seed=0)[-1] if need[0] else 0.0
        t = decode_seconds(teacher, ids, mask, need[1], seed=0)[-1] if need[1] else 0.0
        samples.append((engine, clocks[0].seconds, clocks[1].seconds, s, t, clocks[0].calls, clocks[1].calls))
    ours, inside_s, inside_t, floor_s, floor_t = (statistics.median(x[i] for x in samples) for i in range(5))
    floor, inside, forwards = floor_s + floor_t, [inside_s, inside_t], list(samples[0][5:])
    per_forward = [inside[i] / forwards[i] if forwards[i] else 0.0 for i in (0, 1)]
    extra = [max(forwards[i] - need[i], 0) * per_forward[i] for i in (0, 1)]  # the floor runs need[i] forwards
    outside = ours - sum(inside)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.calls):
        run()
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    engine_total = sum(v[3] for k, v in stats.items() if k[2] == "generate" and k[0].endswith("generate.py"))
    functions = {}
    for (path, _, fn), v in stats.items():
        if "/adaswitch/engine/" in path or "/adaswitch/ops/" in path:
            functions[f"{Path(path).stem}.{fn}"] = v[3] / max(engine_total, 1e-12)
    gap = ours - floor
    summary = {
        "positions_needed": {"student": need[0], "teacher": need[1]},
        "forwards_engine": {"student": forwards[0], "teacher": forwards[1]},
        "seconds": {"ours": ours, "floor": floor, "floor_student": floor_s, "floor_teacher": floor_t,
                    "inside_student": inside_s, "inside_teacher": inside_t},
        "gap_shares": {
            "forwards_beyond_needed": sum(extra) / gap if gap > 0 else math.nan,
            "forwards_vs_floor_same_positions": (sum(inside) - sum(extra) - floor) / gap if gap > 0 else math.nan,
            "outside_forwards": outside / gap if gap > 0 else math.nan,
        },
        "outside_forwards_by_function": sorted(
            ([k, round(v, 4)] for k, v in functions.items()
             if k in FUNCTIONS),
            key=lambda kv: -kv[1]),
    }
    info.update(load_avg_end=load_average(), threads=args.threads, new_tokens=n, batch=args.batch, calls=args.calls,
                command="python benchmarks/profile_generate.py " + " ".join(sys.argv[1:] if argv is None else argv))
    out = Path(args.out or RESULTS / "profile_generate_demo_cpu")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": info, "summary": summary}, indent=2) + "\n")
    g = summary["gap_shares"]
    lines = [
        "# Where AdaSwitch's generation time above its floor goes (demo models)",
        "",
        f"Written by `{info['command'].strip()}` ({info['date']}, commit {info['commit']}, {info['cpu']}, "
        f"{info['cores']} cores, {args.threads} torch thread(s), load average {info['load_avg_start']} -> "
        f"{info['load_avg_end']}). The demo's shipped teacher and student, batch {args.batch} of the demo's training "
        f"prompts, {n} new tokens, AdaSwitch defaults, step mode, teacher states returned; medians of "
        f"{args.calls} calls.",
        "",
        f"- ours / floor: {ours / floor:.2f}x",
        f"- forwards (prefill included) the outputs need, student / teacher: {need[0]} / {need[1]}; the engine's: "
        f"{forwards[0]:.0f} / {forwards[1]:.0f}",
        f"- share of the gap from forwards beyond the needed positions: {100 * g['forwards_beyond_needed']:.0f}%",
        f"- from the engine's forwards against the floor's (same positions): "
        f"{100 * g['forwards_vs_floor_same_positions']:.0f}%",
        f"- from the engine's work outside the forwards: {100 * g['outside_forwards']:.0f}%",
        "",
        "| engine function (cumulative time under cProfile; `cache.update` runs inside the forwards) "
        "| share of generate |",
        "|---|---|",
        *[f"| `{k}` | {100 * v:.1f}% |" for k, v in summary["outside_forwards_by_function"]],
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
