"""A short, real run of `token_divergence` on random logits: every kind on every implementation
available here, printed as a table (kind, value, time per implementation).

    python examples/op_example.py [--rows 64] [--vocab 32000] [--dtype float32]

"value" is the mean over rows; implementations must agree on it (the table shows each one's mean
and the largest difference to the PyTorch reference). Triton runs on CUDA tensors, or on CPU
tensors when TRITON_INTERPRET=1 was set before adaswitch was imported (slow: an interpreter).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from adaswitch._backend import native_available, triton_available
from adaswitch._validation import KINDS
from adaswitch.ops import token_divergence


def _time_ms(fn, repeats: int) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def available_impls(device: torch.device) -> list[str]:
    impls = ["torch"]
    if device.type == "cpu" and native_available():
        impls.append("native")
    if triton_available(device):
        impls.append("triton")
    return impls


def run(rows: int = 64, vocab: int = 32000, dtype: torch.dtype = torch.float32, device: str = "cpu",
        repeats: int = 5, seed: int = 0) -> list[dict]:
    """Returns one record per (kind, impl): mean value, largest |difference| to torch, median ms."""
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(rows, vocab, generator=gen) * 2).to(dtype).to(dev)
    teacher = (student.float().cpu() + torch.randn(rows, vocab, generator=gen)).to(dtype).to(dev)
    impls = available_impls(dev)
    if "triton" in impls and dev.type == "cpu":
        repeats = 1  # the interpreter is slow; one timed call is enough to show it works
    records = []
    for kind in KINDS:
        ref = token_divergence(student, teacher, kind, impl="torch")
        for impl in impls:
            out = token_divergence(student, teacher, kind, impl=impl)
            records.append({
                "kind": kind, "impl": impl, "value": out.mean().item(),
                "max_abs_diff": (out - ref).abs().max().item(),
                "ms": _time_ms(lambda i=impl, k=kind: token_divergence(student, teacher, k, impl=i), repeats),
            })
    return records


def format_table(records: list[dict], rows: int, vocab: int, dtype: torch.dtype, device: str) -> str:
    impls = list(dict.fromkeys(r["impl"] for r in records))
    head = f"{'kind':<16} {'value (mean)':>13} {'max |diff|':>11}"
    head += "".join(f" {i + ' ms':>11}" for i in impls)
    dtype_name = str(dtype).replace("torch.", "")
    title = f"token_divergence on {rows} x {vocab} random {dtype_name} logits ({device})"
    lines = [title, head, "-" * len(head)]
    for kind in dict.fromkeys(r["kind"] for r in records):
        rs = {r["impl"]: r for r in records if r["kind"] == kind}
        diff = max(r["max_abs_diff"] for r in rs.values())
        lines.append(f"{kind:<16} {rs['torch']['value']:13.6f} {diff:11.2e}"
                     + "".join(f" {rs[i]['ms']:11.2f}" for i in impls))
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Run token_divergence on random logits and print a table.")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    # Under TRITON_INTERPRET=1 numpy warns about -inf - -inf / log(0) on lanes the kernel discards.
    warnings.filterwarnings("ignore", "(invalid value|divide by zero) encountered", RuntimeWarning)
    records = run(args.rows, args.vocab, dtype, args.device, args.repeats)
    print(format_table(records, args.rows, args.vocab, dtype, args.device))


if __name__ == "__main__":
    main()
