"""Where step-mode `generate` spends its CPU time: a torch profile of the benchmark models of
bench_generate.py (Qwen2-style, vocabulary 151936, batch 8) under an AdaSwitch policy that never switches
(both models run at every token), grouped by operator (self CPU time).

    python benchmarks/profile_generate.py [--new-tokens 64] [--threads 1]

Writes benchmarks/results/profile_generate_cpu.json and .md (date, commit, machine, load average) and
prints the table. "matrix products" = aten::mm, aten::addmm, aten::bmm (the LM heads and the layers'
projections); "fused step ops" = the adaswitch:: native ops (divergence, sampling, rank) plus, on the
PyTorch path, nothing (they would show as their aten ops).
"""

from __future__ import annotations

import argparse
import json
import sys
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
RESULTS = ROOT / "benchmarks" / "results"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "profile_generate_cpu"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
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


if __name__ == "__main__":
    main()
