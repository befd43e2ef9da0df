"""token_divergence on this CPU: each implementation's time and its ratio to PyTorch eager and to the
`torch.compile`d reference, measured in one run, for rows {8, 64} x V {32000, 128256, 151936}, all
kinds. Writes benchmarks/results/divergence_cpu.{csv,md} with the machine, date and git commit.

    python benchmarks/divergence_ratios.py [--repeats 7] [--dtype float32] [--kinds forward_kl,jsd]

Implementations: "eager" (adaswitch.reference in float32, what a user writes by hand), "compiled"
(the same function through torch.compile, one graph per kind and shape), "native" (adaswitch._C_*: the
per-CPU-capability build the process loaded, recorded as native_variant; ATEN_CPU_CAPABILITY=avx2 / default
measures a narrower one).
Triton is not timed here: on CPU it runs only under the interpreter, which measures numpy, not the
kernel (see benchmarks/gpu/ for its timings). Times are medians of --repeats calls after a warm-up;
the machine is shared, so the load average before and after the run is recorded with the numbers.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from machine_info import cpu_model, git_commit, utc_now, versions_text

from adaswitch import reference, token_divergence
from adaswitch._backend import native_available, native_capability
from adaswitch._validation import KINDS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ROWS = (8, 64)
VOCABS = (32000, 128256, 151936)
TARGET = ("forward_kl", 64, 151936)  # the target: native faster than torch.compile and >= 5x faster than eager


def machine() -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": utc_now(),
        "commit": git_commit(),
        "native_variant": native_capability(),
        "versions": versions_text(),
    }


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def median_ms(fn, repeats: int, clock: str = "wall") -> float:
    """Median of `repeats` calls after one warm-up call (which also compiles). "cpu" counts this
    process's CPU time: with one thread it is the compute time even while other jobs preempt us."""
    now = CLOCKS[clock]
    fn()
    times = []
    for _ in range(repeats):
        start = now()
        fn()
        times.append(now() - start)
    return statistics.median(times) * 1e3


def eager(s, t, kind):
    with torch.no_grad():
        return reference.divergence_rows(s, t, kind)


def compiled_for(kind: str):
    fn = torch.compile(lambda s, t: reference.divergence_rows(s, t, kind), dynamic=False)

    def run(s, t, _kind):
        with torch.no_grad():
            return fn(s, t)

    return run


def measure(s, t, kind, compiled, repeats, clock) -> dict[str, float]:
    return {
        "eager": median_ms(lambda: eager(s, t, kind), repeats, clock),
        "compiled": median_ms(lambda: compiled(s, t, kind), repeats, clock),
        "native": median_ms(lambda: token_divergence(s, t, kind, impl="native"), repeats, clock),
    }


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    ap.add_argument("--vocabs", default=",".join(map(str, VOCABS)))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="torch threads for every implementation (default: all cores)")
    ap.add_argument("--clock", default="wall", choices=list(CLOCKS),
                    help="wall: elapsed time; cpu: process CPU time (meaningful with --threads 1)")
    ap.add_argument("--out", default=str(RESULTS / "divergence_cpu"), help="path stem for .csv and .md")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not native_available():
        raise SystemExit("the native op is not built: run `make native` first")
    torch._dynamo.config.cache_size_limit = 256
    dtype = getattr(torch, args.dtype)
    kinds = args.kinds.split(",")
    info = machine()
    load_before = os.getloadavg()
    results = []
    print(f"{'kind':<16}{'rows':>5}{'V':>8} {'eager ms':>9} {'compile ms':>10} {'native ms':>9} "
          f"{'x eager':>8} {'x compile':>9}")
    for kind in kinds:
        compiled = compiled_for(kind)
        for rows in map(int, args.rows.split(",")):
            for vocab in map(int, args.vocabs.split(",")):
                gen = torch.Generator().manual_seed(rows * vocab)
                s = (torch.randn(rows, vocab, generator=gen) * 2).to(dtype)
                t = (s.float() + torch.randn(rows, vocab, generator=gen)).to(dtype)
                ms = measure(s, t, kind, compiled, args.repeats, args.clock)
                for impl, value in ms.items():
                    results.append({
                        "kind": kind, "rows": rows, "vocab": vocab, "dtype": args.dtype, "impl": impl,
                        "threads": args.threads, "clock": args.clock, "native_variant": info["native_variant"],
                        "ms": round(value, 3), "speedup_vs_eager": round(ms["eager"] / value, 2),
                        "speedup_vs_compiled": round(ms["compiled"] / value, 2),
                    })
                print(f"{kind:<16}{rows:>5}{vocab:>8} {ms['eager']:9.2f} {ms['compiled']:10.2f} "
                      f"{ms['native']:9.2f} {ms['eager'] / ms['native']:8.1f} "
                      f"{ms['compiled'] / ms['native']:9.2f}", flush=True)
    load_after = os.getloadavg()
    write(results, info, load_before, load_after, args)
    return results


def verdict(results) -> str:
    kind, rows, vocab = TARGET
    row = {r["impl"]: r for r in results if (r["kind"], r["rows"], r["vocab"]) == (kind, rows, vocab)}
    if "native" not in row:
        return "target configuration not measured in this run"
    n = row["native"]
    beats_compile = n["speedup_vs_compiled"] > 1.0
    five_x = n["speedup_vs_eager"] >= 5.0
    return (
        f"{kind}, {rows} x {vocab}, {n['dtype']}: native {n['ms']:.2f} ms, "
        f"eager {row['eager']['ms']:.2f} ms, "
        f"compiled {row['compiled']['ms']:.2f} ms -> {n['speedup_vs_eager']:.1f}x eager "
        f"({'met' if five_x else 'NOT met'}: >= 5x), {n['speedup_vs_compiled']:.2f}x compiled "
        f"({'met' if beats_compile else 'NOT met'}: > 1x)"
    )


def write(results, info, load_before, load_after, args) -> None:
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
        writer.writeheader()
        writer.writerows(results)
    lines = [
        "# token_divergence on CPU: native op vs PyTorch eager vs torch.compile",
        "",
        f"- machine: {info['cpu']}, {info['cores']} cores (torch threads {info['torch_threads']}), "
        f"torch {info['torch']}, Python {info['python']}, native variant {info['native_variant']}",
        f"- date: {info['date']}, commit {info['commit']}, dtype {args.dtype}, "
        f"median of {args.repeats} calls, {args.clock} clock, {args.threads} thread(s)",
        f"- load average (1/5/15 min) before {tuple(round(x, 2) for x in load_before)}, "
        f"after {tuple(round(x, 2) for x in load_after)} (the machine is shared)",
        f"- target (native faster than torch.compile, >= 5x eager): {verdict(results)}",
    ]
    busy = max(load_before[0], load_after[0]) > (os.cpu_count() or 1)
    if args.clock == "wall" and args.threads > 1 and busy:
        lines.append(
            "- CAUTION: the load average exceeded the core count, so multi-threaded wall-clock times "
            "include waits for a preempted OpenMP thread (milliseconds per parallel region, for every "
            "implementation); `--threads 1 --clock cpu` measures compute time on a busy machine"
        )
    lines += [
        "",
        "| kind | rows | V | eager ms | compiled ms | native ms | native vs eager | native vs compiled |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    by_key = {}
    for r in results:
        by_key.setdefault((r["kind"], r["rows"], r["vocab"]), {})[r["impl"]] = r
    for (kind, rows, vocab), row in by_key.items():
        n = row["native"]
        lines.append(f"| {kind} | {rows} | {vocab} | {row['eager']['ms']:.2f} | "
                     f"{row['compiled']['ms']:.2f} | {n['ms']:.2f} | {n['speedup_vs_eager']:.1f}x | "
                     f"{n['speedup_vs_compiled']:.2f}x |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(line[2:] for line in lines[5:] if line.startswith("- ")))
    print(f"wrote {stem.with_suffix('.csv')} and {stem.with_suffix('.md')}")


if __name__ == "__main__":
    main()
