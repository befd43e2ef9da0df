"""The per-token decision of the decoding loop on this CPU: `fused_step` (native and PyTorch reference)
against the step a research loop writes by hand, measured in one run. Writes
benchmarks/results/step_cpu.{csv,md} with the machine, date, git commit and load average.

    python benchmarks/bench_step.py [--repeats 5] [--batch 8] [--vocab 32000,151936]

"naive" is per policy what the usual loop does for one position: softmax + torch.multinomial for each
model it samples from, the full [B, V] KL(p_T || p_S) through log_softmax, and the switching rule
row by row in Python with `.item()` (AdaSwitch), or the teacher's top-k membership via torch.topk
(SKD). Triton is not timed: on CPU it only runs under the interpreter (see benchmarks/gpu/).
Times are medians of --repeats calls after one warm-up; the machine is shared, so the load average is
recorded with the numbers.
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from machine_info import cpu_model, git_commit, utc_now, versions_text

from adaswitch._backend import native_ops
from adaswitch.ops import SwitchState, fused_step
from adaswitch.policies import SKD, AdaSwitch, Student

RESULTS = Path(__file__).resolve().parent / "results"


def naive_step(policy, s, t, history):
    """One position the way research code writes it (host-side decisions)."""
    if isinstance(policy, Student):
        return torch.multinomial(torch.softmax(s.float(), -1), 1)[:, 0]
    ys = torch.multinomial(torch.softmax(s.float(), -1), 1)[:, 0]
    yt = torch.multinomial(torch.softmax(t.float(), -1), 1)[:, 0]
    if isinstance(policy, SKD):
        top = torch.topk(t, policy.top_k, dim=-1).indices
        keep = (top == ys[:, None]).any(-1)
        return torch.where(keep, ys, yt)
    logp_s, logp_t = torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1)
    d = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    tokens = []
    for b in range(s.shape[0]):
        di = d[b].item()
        past = history[b][-policy.window:]
        switch = len(history[b]) >= policy.window and di > policy.k * sum(past) / len(past)
        if not switch:
            history[b].append(di)
        tokens.append(yt[b].item() if switch else ys[b].item())
    return torch.tensor(tokens)


def median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", default="32000,151936")
    parser.add_argument("--out", default=str(RESULTS / "step_cpu"))
    args = parser.parse_args(argv)
    has_native = native_ops() is not None and hasattr(native_ops(), "gumbel_argmax")
    load_before = os.getloadavg()[0]
    rows = []
    for vocab in (int(v) for v in args.vocab.split(",")):
        s, t = torch.randn(2, args.batch, vocab).unbind(0)
        keys, pos = torch.arange(args.batch), torch.zeros(args.batch, dtype=torch.long)
        for policy in (Student(), SKD(top_k=25), AdaSwitch(window=8, k=2.0)):
            history = [[] for _ in range(args.batch)]
            naive = functools.partial(naive_step, policy, s, t, history)
            timings = {"naive": median_ms(naive, args.repeats)}
            for impl in ("native", "torch") if has_native else ("torch",):
                state = SwitchState.new(args.batch, getattr(policy, "window", 1))
                teacher = t if policy.uses_teacher else None
                call = functools.partial(fused_step, s, teacher, policy, state, seed=0, keys=keys,
                                         position=pos, eos_token_id=-1, pad_token_id=0, impl=impl)
                timings[impl] = median_ms(call, args.repeats if impl == "native" else 1)
            for impl, ms in timings.items():
                row = {"policy": type(policy).__name__, "batch": args.batch, "vocab": vocab, "impl": impl,
                       "ms": round(ms, 2), "naive_over_impl": round(timings["naive"] / ms, 2)}
                rows.append(row)
                print(f"{row['policy']:9s} V={vocab:6d} {impl:6s} {ms:9.2f} ms  "
                      f"naive/impl {row['naive_over_impl']:6.2f}")
    header = (f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
              f"Python {platform.python_version()}, commit {git_commit()}, {utc_now()}, "
              f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}; {versions_text()}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with open(out.with_suffix(".md"), "w") as f:
        f.write(f"# fused_step on CPU\n\n{header}\n\n| policy | V | impl | ms / step | naive / impl |\n"
                "|---|---|---|---|---|\n")
        for r in rows:
            cells = (r["policy"], r["vocab"], r["impl"], r["ms"], r["naive_over_impl"])
            f.write("| " + " | ".join(str(c) for c in cells) + " |\n")
    print(header)


if __name__ == "__main__":
    main()
