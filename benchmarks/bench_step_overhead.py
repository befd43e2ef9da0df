"""The fixed cost of one `fused_step` / `fused_lookahead` call on CPU: what the decode loop pays per step
beyond the draws and the divergence themselves, which dominates with small models and vocabularies.

    python benchmarks/bench_step_overhead.py [--batch 32] [--vocab 19,32000] [--threads 1] [--calls 200]
    python benchmarks/bench_step_overhead.py --profile   # also: where the time goes (torch.profiler, cProfile)

Per policy (AdaSwitch, SKD, Student, Teacher) and vocabulary: the median over --repeats runs of the mean
time of --calls back-to-back calls, in microseconds, with the native implementation (the path generate
takes on CPU) and grad mode off (as in generate), plus one fused_lookahead of --lookahead positions for
AdaSwitch and SKD. AdaSwitch rows keep exploring (K = +inf), so every call runs the whole rule. --profile
adds the operators' self time per call under torch.profiler (the profiler's own cost included) and the
Python functions by cumulative time under cProfile. Prints only; the machine may be shared, so the load
average is printed with the numbers.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import torch

from adaswitch._backend import native_ops
from adaswitch.ops import SwitchState, fused_lookahead, fused_step
from adaswitch.policies import SKD, AdaSwitch, Student, Teacher

POLICIES = {
    "AdaSwitch": AdaSwitch(window=8, k=math.inf),  # never switches: every row runs the whole rule each call
    "SKD": SKD(top_k=5),
    "Student": Student(),
    "Teacher": Teacher(),
}


def make_call(name, policy, batch, vocab, lookahead, impl):
    gen = torch.Generator().manual_seed(0)
    shape = (batch, lookahead, vocab) if lookahead else (batch, vocab)
    s, t = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    state = SwitchState.new(batch, getattr(policy, "window", 1))
    keys, pos = torch.arange(batch), torch.zeros(batch, dtype=torch.long)
    student = s if policy.uses_student else None
    teacher = t if policy.uses_teacher else None
    if lookahead:
        draft = torch.randint(0, vocab, (batch, lookahead), generator=gen)
        return lambda: fused_lookahead(s, t, draft, policy, state, seed=0, keys=keys, position=pos,
                                       eos_token_id=-1, pad_token_id=0, impl=impl)
    return lambda: fused_step(student, teacher, policy, state, seed=0, keys=keys, position=pos,
                              eos_token_id=-1, pad_token_id=0, impl=impl)


def per_call_us(call, calls, repeats):
    for _ in range(10):
        call()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def profile(call, calls, label):
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            call()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / calls
    print(f"\n--- {label}: operators' self time {total:.1f} us/call under torch.profiler; top operators:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]:
        print(f"  {e.key:40s} {e.count / calls:5.1f} calls  {e.self_cpu_time_total / calls:8.1f} us/call")
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        call()
    profiler.disable()
    print("  Python functions (cProfile, cumulative):")
    stats = pstats.Stats(profiler)
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][3])[:10]
    for (file, line, name), (_, ncalls, _, cum, _) in rows:
        where = f"{Path(file).name}:{line}({name})" if line else name
        print(f"  {where[:60]:60s} {ncalls / calls:5.1f} calls  {cum / calls * 1e6:8.1f} us/call")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vocab", default="19,32000")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lookahead", type=int, default=4, help="G of the fused_lookahead rows (0: none)")
    ap.add_argument("--impl", default="native")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.impl == "native" and native_ops() is None:
        raise SystemExit("the native op is not built (python setup.py -q build_ext --inplace)")
    torch.set_grad_enabled(False)  # as in generate
    load = os.getloadavg()[0]
    print(f"B={args.batch} threads={args.threads} impl={args.impl} torch {torch.__version__}")
    print(f"{'call':10s} {'policy':10s} {'V':>6s} {'us/call':>9s}")
    for vocab in (int(v) for v in args.vocab.split(",")):
        rows = [("step", name, 0) for name in POLICIES]
        if args.lookahead:
            rows += [("lookahead", name, args.lookahead) for name in ("AdaSwitch", "SKD")]
        for kind, name, g in rows:
            call = make_call(name, POLICIES[name], args.batch, vocab, g, args.impl)
            calls = args.calls if vocab < 4096 else max(10, args.calls // 10)
            us = per_call_us(call, calls, args.repeats)
            print(f"{kind:10s} {name:10s} {vocab:6d} {us:9.1f}")
            if args.profile and vocab < 4096:
                profile(call, calls, f"{kind} {name} V={vocab}")
    print(f"load average {load:.1f} -> {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
