"""Speed and peak memory of the distillation losses against the baselines of bench_loss.py, one
subprocess per (op, shape, provider) so that peak memory is that case's alone; rows appended to a CSV
and a ratio table printed (baseline time / adaswitch time, and adaswitch memory / baseline memory).

    python benchmarks/loss_ratios.py [--out benchmarks/results/loss_cpu.csv] [--quick] [--providers a,b]
    python benchmarks/loss_ratios.py --table benchmarks/results/loss_cpu.csv [--md benchmarks/results/loss_cpu.md]

A run appends its rows to the CSV (date, commit and machine on every row) and writes the Markdown report
next to it (loss_cpu.md for loss_cpu.csv); `--table CSV --md FILE` renders the report of an existing CSV.

Time: median of --reps runs after one warm-up (torch.compile compiles in the warm-up), per mode:
forward (loss only), backward (backward only, after an untimed forward), full (both). Peak memory:
the largest resident-set size sampled every 0.5 ms during a timed full pass, minus the RSS just before it
(large tensors are mmapped by glibc and returned on free, so RSS follows the live tensors).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))

from machine_info import cpu_model, git_commit, versions_text  # noqa: E402

# (op, N, V, H): the CPU shapes; the logits-input op at N=4096, V=151936 (and the fused op there) would need
# > 20 GB for the eager baselines on the 23 GB machine the results were measured on, so it is cut.
SHAPES = [
    ("logits", 512, 32000, 0),
    ("logits", 4096, 32000, 0),
    ("logits", 512, 151936, 0),
    ("fused", 512, 32000, 512),
    ("fused", 4096, 32000, 512),
    ("fused", 512, 151936, 512),
]
QUICK = [("logits", 512, 32000, 0), ("fused", 512, 32000, 512)]
PROVIDERS = {
    "logits": ["adaswitch", "torch", "torch_compile", "trl"],
    "fused": ["adaswitch", "torch", "torch_compile", "trl", "liger"],
}
PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class _PeakSampler:
    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(0.0005)

    def __enter__(self):
        self.start = _rss()
        self.peak = self.start
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())


def run_case(op, n, v, h, provider, reps):
    import bench_loss as B
    import torch

    torch.manual_seed(0)
    x = B.make_logits(n, v) if op == "logits" else B.make_hidden(n, h, v)
    providers = B.logits_providers() if op == "logits" else B.fused_providers()
    fn = providers[provider]
    ours = B.run(providers["adaswitch"], x, op, "forward").item()
    loss = B.run(fn, x, op, "full").item()  # warm-up (compiles) and correctness check
    if abs(loss - ours) > 1e-3 * abs(ours) + 1e-6:
        raise AssertionError(f"{op}/{provider} loss {loss} != adaswitch {ours}")
    times = {"forward": [], "backward": [], "full": []}
    peak = 0
    for _ in range(reps):
        y = B.fresh_leaves(x, op)
        t0 = time.perf_counter()
        out = fn(y)
        t1 = time.perf_counter()
        out.backward()
        t2 = time.perf_counter()
        times["forward"].append(t1 - t0)
        times["backward"].append(t2 - t1)
        del out, y
        y = B.fresh_leaves(x, op)
        with _PeakSampler() as mem:  # the full pass, sampled for its peak RSS
            t0 = time.perf_counter()
            fn(y).backward()
            times["full"].append(time.perf_counter() - t0)
        peak = max(peak, mem.peak - mem.start)
    return {
        "ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
        "peak_mb": peak / 2**20,
        "loss": loss,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "results" / "loss_cpu.csv"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="the smallest shape of each op only")
    ap.add_argument("--providers", help="comma-separated subset of providers (default: all)")
    ap.add_argument("--ops", help="comma-separated subset of ops: logits, fused (default: both)")
    ap.add_argument("--table", metavar="CSV", help="only print the ratio table of an existing CSV")
    ap.add_argument("--md", metavar="FILE", help="with --table: also write the Markdown report there")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.case:
        op, n, v, h, provider = json.loads(args.case)
        print(json.dumps(run_case(op, n, v, h, provider, args.reps)))
        return
    if args.table:
        with open(args.table, newline="") as f:
            rows = list(csv.DictReader(f))
        print_ratios(rows)
        if args.md:
            write_markdown(rows, Path(args.md), Path(args.table).name)
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", TRL_EXPERIMENTAL_SILENCE="1")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
    mach = f"{cpu_model()}, {os.cpu_count()} cores; {versions_text(('torch', 'triton', 'liger-kernel', 'trl'))}"
    sha = git_commit()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for op, n, v, h in QUICK if args.quick else SHAPES:
        for provider in PROVIDERS[op]:
            if (args.providers and provider not in args.providers.split(",")) or (args.ops and op not in args.ops):
                continue
            case = json.dumps([op, n, v, h, provider])
            reps = args.reps if n * v <= 1 << 24 else 1  # the big shapes: one timed run per mode
            cmd = [sys.executable, __file__, "--case", case, "--reps", str(reps)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(f"{op} N={n} V={v} {provider}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            case_rows = [
                {
                    "op": op,
                    "N": n,
                    "V": v,
                    "H": h,
                    "dtype": "float32",
                    "kind": "jsd",
                    "provider": provider,
                    "mode": mode,
                    "ms": round(ms, 2),
                    "peak_mb": round(res["peak_mb"], 1),
                    "machine": mach,
                    "date": stamp,
                    "commit": sha,
                }
                for mode, ms in res["ms"].items()
            ]
            new = not out.exists()
            with out.open("a", newline="") as f:  # row by row, so a cut-short run keeps what it measured
                w = csv.DictWriter(f, fieldnames=list(case_rows[0]))
                if new:
                    w.writeheader()
                w.writerows(case_rows)
            rows += case_rows
            print(
                f"{op:6s} N={n:5d} V={v:6d} {provider:13s} fwd {res['ms']['forward']:9.1f} ms  "
                f"bwd {res['ms']['backward']:9.1f} ms  full {res['ms']['full']:9.1f} ms  "
                f"peak {res['peak_mb']:8.1f} MB",
                flush=True,
            )
    print_ratios(rows)
    with out.open(newline="") as f:  # the report covers the whole CSV (earlier runs' rows included)
        write_markdown(list(csv.DictReader(f)), out.with_suffix(".md"), out.name)


def ratio_lines(rows) -> list[str]:
    """The ratio table: baseline time / adaswitch time (> 1: adaswitch faster), adaswitch peak / baseline
    peak, per (op, N, V) and baseline."""
    key = lambda r: (r["op"], int(r["N"]), int(r["V"]))  # noqa: E731
    lines = ["{:6s} {:>5s} {:>6s} {:13s} {:>7s} {:>7s} {:>7s} {:>9s}".format(
        "op", "N", "V", "baseline", "fwd x", "bwd x", "full x", "mem ratio")]
    for k in sorted({key(r) for r in rows}):
        case = [r for r in rows if key(r) == k]
        ours = {r["mode"]: r for r in case if r["provider"] == "adaswitch"}
        if not ours:
            continue
        for base in sorted({r["provider"] for r in case} - {"adaswitch"}):
            b = {r["mode"]: r for r in case if r["provider"] == base}
            ratio = {m: float(b[m]["ms"]) / max(float(ours[m]["ms"]), 1e-9) for m in ("forward", "backward", "full")}
            mem = float(ours["full"]["peak_mb"]) / max(float(b["full"]["peak_mb"]), 1e-9)
            lines.append(
                f"{k[0]:6s} {int(k[1]):5d} {int(k[2]):6d} {base:13s} {ratio['forward']:7.2f} "
                f"{ratio['backward']:7.2f} {ratio['full']:7.2f} {mem:9.2f}"
            )
    return lines


def write_markdown(rows, path: Path, csv_name: str) -> None:
    """The report: provenance of the rows (each distinct date / commit / machine and the cases it holds),
    the set-up, and the ratio table, all taken from the CSV rows."""
    runs = {}
    for r in rows:
        runs.setdefault((r["date"], r["commit"], r["machine"]), set()).add(
            f"{r['op']} {r['provider']}"
        )
    provenance = "\n".join(
        f"- {date}, commit {sha}, {machine}: {', '.join(sorted(cases))}"
        for (date, sha, machine), cases in sorted(runs.items())
    )
    text = f"""# Distillation-loss CPU benchmark

Written by `python benchmarks/loss_ratios.py` from the rows of {csv_name} (ms per mode, peak MB, machine,
date and commit on every row). Rows by run:

{provenance}

Ratios compare rows of different runs where the list above shows more than one run for a case: read those
as rough (the machines were shared with other jobs, so absolute times are inflated and vary with the load).
float32, kind jsd (beta 0.5), mean over tokens with 1/8 ignored, H=512 for the fused op. Shapes with
N*V > 2^24 are one timed run per mode, the others the median of the runs asked for (--reps).

Ratios: baseline time / adaswitch time (> 1 means adaswitch is faster); mem ratio = adaswitch peak /
baseline peak (RSS above the inputs during a full pass). Liger's logits-input JSD is a Triton kernel, not
runnable natively on CPU; Liger appears in the fused rows (its chunked loss is PyTorch). adaswitch and
Liger's fused loss both compute the gradients in the forward pass, so their backward is only a scaling:
the backward-only column against Liger compares two near-zero times.

```
{chr(10).join(ratio_lines(rows))}
```
"""
    path.write_text(text)


def print_ratios(rows):
    """Prints `ratio_lines`."""
    print()
    print("\n".join(ratio_lines(rows)))


if __name__ == "__main__":
    main()
