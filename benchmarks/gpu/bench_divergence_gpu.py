"""token_divergence on a GPU: checks the Triton kernel against the float64 reference, then times it
against PyTorch eager and Liger-Kernel at 8192 rows x V in {32000, 151936}, bf16, and reports the
achieved bandwidth as a fraction of a device-to-device copy measured in the same run.

    python3 benchmarks/gpu/bench_divergence_gpu.py            # on the GPU (run by benchmarks/gpu/run.sh)
    TRITON_INTERPRET=1 python benchmarks/gpu/bench_divergence_gpu.py --smoke   # CPU self-check, tiny

Bandwidth counts the bytes any implementation must read: both logit tensors once (the [N] output is
negligible). Liger needs log-probabilities (KL, JSD) or probabilities (TVD) first, so its time
includes the log_softmax / softmax pass(es) over the bf16 logits, as a user would run it; it returns
a batch reduction rather than per-row values and its forward also writes the [N, V] gradient.
Results: $OUT/divergence_gpu.csv, one section appended to $OUT/summary.md (shared with the other
benchmarks/gpu scripts), and a short table printed last. Exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from adaswitch import reference, token_divergence  # noqa: E402
from adaswitch._validation import KINDS  # noqa: E402

TIMED_KINDS = ("forward_kl", "jsd", "tvd")


def out_dir() -> Path:
    path = Path(os.environ.get("OUT") or ROOT / "gpu_out")
    path.mkdir(parents=True, exist_ok=True)
    return path


def timer_ms(fn, device: torch.device) -> float:
    """Median milliseconds: CUDA events through triton.testing.do_bench on a GPU, a host clock on CPU."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def copy_bandwidth_gbps(device: torch.device, nbytes: int) -> float:
    """Device-to-device copy of `nbytes`, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = timer_ms(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def make_logits(rows, vocab, dtype, device, seed, masked=False):
    """Fresh random logits drawn on the device (8192 x 151936 on the host would cost seconds)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    s = torch.randn(rows, vocab, generator=gen, device=device) * 2
    t = s + torch.randn(rows, vocab, generator=gen, device=device)
    if masked:
        t = t.masked_fill(torch.rand(rows, vocab, generator=gen, device=device) < 0.2, -math.inf)
        s = s.masked_fill(torch.rand(rows, vocab, generator=gen, device=device) < 0.2, -math.inf)
        s[:, 0] = t[:, 0] = 0.0  # never a whole row masked
    return s.to(dtype), t.to(dtype)


def check_correctness(device: torch.device, smoke: bool) -> list[str]:
    """Triton vs the float64 reference on fresh inputs; returns the failures (empty = pass)."""
    failures = []
    all_shapes = [(37, 1), (37, 7), (64, 1271), (16, 32000), (8, 151936), (3, 262144)]
    # every shape in bf16; float32 / float16 on two (each dtype x shape is a separate Triton compile)
    two = [(37, 7), (16, 32000)]
    plan = {torch.bfloat16: all_shapes, torch.float32: two, torch.float16: two}
    if smoke:
        plan = {torch.bfloat16: [(5, 7), (9, 1271)], torch.float32: [(5, 7)]}
    seed = 1000
    for dtype, shapes in plan.items():
        for rows, vocab in shapes:
            for masked in (False, True):
                seed += 1
                s, t = make_logits(rows, vocab, dtype, device, seed, masked=masked and vocab > 1)
                s[0] = -math.inf  # documented: all -inf row -> NaN
                if rows > 1 and vocab > 1:
                    t[1, vocab // 2] = math.nan  # NaN row -> NaN
                finite = torch.cat([s[torch.isfinite(s)], t[torch.isfinite(t)]]).float()
                scale = max(1.0, finite.abs().max().item())
                s64, t64 = s.double(), t.double()
                for kind in KINDS:
                    # alpha = 1 is left to the CPU tests: there the reference ignores the other row
                    # entirely (KL(p || p)), so it does not give NaN for a bad row as the kernels do
                    for beta, alpha, temperature in ((0.5, 0.1, 1.0), (0.0, 0.0, 2.0), (1.0, 0.9, 0.5),
                                                     (0.1, 0.5, 1.0)):
                        kw = dict(beta=beta, alpha=alpha, temperature=temperature)
                        ref = reference.divergence_rows(s64, t64, kind, dtype=torch.float64, **kw)
                        out = token_divergence(s, t, kind, impl="triton", **kw)
                        again = token_divergence(s, t, kind, impl="triton", **kw)
                        try:
                            torch.testing.assert_close(out.double(), ref, rtol=1e-4,
                                                       atol=2e-6 * scale / temperature, equal_nan=True)
                            assert torch.equal(out.isnan(), again.isnan()) and torch.equal(
                                out.nan_to_num(), again.nan_to_num()), "two runs differ (race?)"
                        except AssertionError as exc:
                            msg = str(exc).splitlines()[0:3]
                            failures.append(f"{kind} {dtype} {rows}x{vocab} masked={masked} {kw}: "
                                            f"{' '.join(msg)}")
    return failures


def liger_fns():
    """Liger's forward functions, or {} when liger-kernel is not installed (carry its wheel: run.sh)."""
    try:
        from liger_kernel.ops.jsd import LigerJSDFunction
        from liger_kernel.ops.kl_div import LigerKLDivLossFunction
        from liger_kernel.ops.tvd import LigerTVDLossFunction
    except ImportError as exc:
        print(f"liger-kernel not importable ({exc}); timing Triton and eager only")
        return {}
    return {
        # kl_div(input = student log-probs, target = teacher log-probs) = KL(p_T || p_S), batch mean
        "forward_kl": lambda s, t: LigerKLDivLossFunction.apply(
            s.log_softmax(-1), t.log_softmax(-1), "batchmean", True, 1e-10),
        "jsd": lambda s, t: LigerJSDFunction.apply(s.log_softmax(-1), t.log_softmax(-1), None, 0.5, -100),
        "tvd": lambda s, t: LigerTVDLossFunction.apply(t.softmax(-1), s.softmax(-1), None, "batchmean"),
    }


def _impls(s, t, kind, liger) -> dict:
    impls = {
        "triton": lambda: token_divergence(s, t, kind, impl="triton"),
        "torch_eager": lambda: reference.divergence_rows(s, t, kind),
    }
    if kind in liger:
        impls["liger"] = lambda: liger[kind](s, t)
    return impls


def _time_vocab(rows, vocab, device, liger, copy_gbps) -> list[dict]:
    s, t = make_logits(rows, vocab, torch.bfloat16, device, seed=vocab)
    nbytes = 2 * s.numel() * s.element_size()
    records = []
    for kind in TIMED_KINDS:
        # the same quantity for all: the batch mean of the per-row divergence
        with torch.no_grad():
            expected = token_divergence(s, t, kind, impl="triton").double().mean().item()
        for name, fn in _impls(s, t, kind, liger).items():
            try:
                with torch.no_grad():
                    value = fn().double().mean().item()
                    ms = timer_ms(fn, device)
                ok = math.isclose(value, expected, rel_tol=2e-3, abs_tol=1e-4)
                note = "" if ok else f"value {value:.6g} vs triton {expected:.6g}"
                if name == "liger":  # bf16 log-probs in, a bf16 scalar out: informative, not a check
                    note = f"rel. diff {abs(value - expected) / max(abs(expected), 1e-12):.1e}"
                    ok = True
            except torch.cuda.OutOfMemoryError:
                ms, ok, note = float("nan"), True, "out of memory"
            if device.type == "cuda":
                torch.cuda.empty_cache()
            gbps = nbytes / (ms * 1e-3) / 1e9
            records.append({
                "kind": kind, "rows": rows, "vocab": vocab, "dtype": "bfloat16", "impl": name,
                "ms": round(ms, 4), "gbps": round(gbps, 1), "frac_copy_bw": round(gbps / copy_gbps, 3),
                "value_ok": ok, "note": note,
            })
            print(f"  {kind:<11} V={vocab:<7} {name:<12} {ms:9.3f} ms {gbps:8.1f} GB/s "
                  f"({gbps / copy_gbps:5.1%} of copy) {note}", flush=True)
    return records


def time_all(device: torch.device, smoke: bool, copy_gbps: float) -> list[dict]:
    rows = 16 if smoke else 8192
    vocabs = (1000,) if smoke else (32000, 151936)
    liger = liger_fns() if device.type == "cuda" else {}
    return [r for vocab in vocabs for r in _time_vocab(rows, vocab, device, liger, copy_gbps)]


def summarize(records, copy_gbps, failures, device_name) -> str:
    lines = [f"## token_divergence ({device_name}; copy bandwidth {copy_gbps:.0f} GB/s, read + write)", ""]
    verdict = "PASS" if not failures else f"FAIL ({len(failures)})"
    lines.append(f"correctness vs float64 reference: {verdict}")
    lines += [f"  - {f}" for f in failures[:10]]
    lines += ["", "| kind | V | impl | ms | GB/s | of copy bw | vs liger | vs eager |",
              "|---|---:|---|---:|---:|---:|---:|---:|"]
    by = {(r["kind"], r["vocab"], r["impl"]): r for r in records}
    for r in records:
        lg = by.get((r["kind"], r["vocab"], "liger"))
        eg = by.get((r["kind"], r["vocab"], "torch_eager"))
        vs_l = f"{lg['ms'] / r['ms']:.2f}x" if lg and r["impl"] == "triton" else ""
        vs_e = f"{eg['ms'] / r['ms']:.2f}x" if eg and r["impl"] == "triton" else ""
        lines.append(f"| {r['kind']} | {r['vocab']} | {r['impl']} | {r['ms']:.3f} | {r['gbps']:.0f} | "
                     f"{r['frac_copy_bw']:.0%} | {vs_l} | {vs_e} |" + (f" {r['note']}" if r["note"] else ""))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU under TRITON_INTERPRET=1")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        print("no CUDA device: use --smoke (with TRITON_INTERPRET=1) for a CPU self-check")
        return 2
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter smoke test)"
    print(f"device: {name}, torch {torch.__version__}")
    copy_gbps = copy_bandwidth_gbps(device, (1 << 20) if args.smoke else (2 << 30))
    print(f"copy bandwidth: {copy_gbps:.0f} GB/s")
    failures = check_correctness(device, args.smoke)
    print("correctness: " + ("PASS" if not failures else f"FAIL ({len(failures)})"))
    for f in failures[:20]:
        print("  " + f)
    records = time_all(device, args.smoke, copy_gbps)
    out = out_dir()
    with open(out / "divergence_gpu.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    summary = summarize(records, copy_gbps, failures, name)
    shared = os.environ.get("ADASWITCH_GPU_SUMMARY")  # set by run.sh, which prints it last
    with open(Path(shared or out / "summary.md"), "a") as f:
        f.write(summary + "\n")
    if not shared:
        print("\n" + summary)
    bad_values = [r for r in records if not r["value_ok"]]
    return 1 if failures or bad_values else 0


if __name__ == "__main__":
    sys.exit(main())
