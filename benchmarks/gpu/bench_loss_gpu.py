"""GPU benchmark of the distillation losses at Liger's own shapes (BT in {1024, 8192}, H=4096, V=128256,
bf16): the fused-linear loss against torch eager, torch.compile, TRL (logits + generalized_jsd_loss)
and Liger's LigerFusedLinearJSDLoss; the logits-input loss against torch, torch.compile, TRL and
LigerJSD. JSD, beta = 0.5, temperature 1, mean over tokens. Forward / backward / full pass, median of
CUDA-event timings, peak memory from torch.cuda.max_memory_allocated (minus the inputs).

Correctness first: on a small problem every adaswitch path is checked against the float64 reference
(loss and gradients), and at each benchmark shape every provider's loss against adaswitch's, before
anything is timed. Rows go to $OUT/loss_gpu.csv (or --out) and a ratio table is printed.

    python benchmarks/gpu/bench_loss_gpu.py [--quick] [--out FILE]

Targets: fused-linear full pass faster than Liger at BT=8192 and faster than torch at BT=1024, peak
memory at most a fifth of torch eager's; the table prints those checks.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import bench_loss as B  # noqa: E402

from adaswitch.ops import distill_loss, fused_linear_distill_loss  # noqa: E402
from adaswitch.ops.loss import reference_distill_loss  # noqa: E402

KIND, BETA, H, V = "jsd", 0.5, 4096, 128256


def check_correctness(device, smoke):
    """adaswitch (Triton) against the float64 reference on a small bf16 / fp32 problem."""
    n, h, v = (12, 16, 301) if smoke else (64, 256, 5003)
    for dtype, tol_g in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        x = B.make_hidden(n, h, v, dtype=dtype, device=device, h_teacher=h + 8)
        leaves = [x["hs"].clone().requires_grad_(), x["ws"].clone().requires_grad_()]
        loss = fused_linear_distill_loss(
            leaves[0], leaves[1], x["ht"], x["wt"], KIND, labels=x["labels"], chunk_size=24
        )
        loss.backward()
        ref_leaves = [x["hs"].double().requires_grad_(), x["ws"].double().requires_grad_()]
        zs = ref_leaves[0] @ ref_leaves[1].T
        zt = x["ht"].double() @ x["wt"].double().T
        ref = reference_distill_loss(zs, zt, KIND, labels=x["labels"])
        ref.backward()
        assert torch.allclose(loss.double(), ref, rtol=1e-4), (dtype, loss.item(), ref.item())
        for a, b in zip(leaves, ref_leaves):
            err = (a.grad.double() - b.grad).abs().max() / b.grad.abs().max()
            assert err < tol_g, (dtype, err.item())
        s = zs.detach().to(dtype).requires_grad_()
        t = zt.to(dtype)
        out = distill_loss(s, t, KIND, labels=x["labels"], impl="triton")
        out.backward()
        s_ref = s.detach().double().requires_grad_()
        r = reference_distill_loss(s_ref, t.double(), KIND, labels=x["labels"])
        r.backward()
        assert torch.allclose(out.double(), r, rtol=1e-4), (dtype, out.item(), r.item())
        err = (s.grad.double() - s_ref.grad).abs().max() / s_ref.grad.abs().max()
        assert err < tol_g, (dtype, err.item())
    return "correctness: adaswitch Triton losses match the float64 reference (fp32 and bf16): ok"


def fused_providers(smoke=False):
    def ours(x):
        return fused_linear_distill_loss(
            x["hs"], x["ws"], x["ht"], x["wt"], KIND, beta=BETA, labels=x["labels"]
        )

    def eager(x):
        return reference_distill_loss(
            x["hs"] @ x["ws"].T, x["ht"] @ x["wt"].T, KIND, beta=BETA, labels=x["labels"]
        )

    out = {"adaswitch": ours, "torch": eager}
    if not smoke:
        out["torch_compile"] = torch.compile(eager, dynamic=False)
    try:
        trl = B._trl_loss()
        out["trl"] = lambda x: trl(
            (x["hs"] @ x["ws"].T).float(), (x["ht"] @ x["wt"].T).float(), labels=x["labels"], beta=BETA
        )
    except ImportError:
        pass
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA)
        out["liger"] = lambda x: liger(x["hs"], x["ws"], x["ht"], x["wt"], x["labels"])
    except ImportError:
        pass
    return out


def logits_providers(device, smoke=False):
    out = B.logits_providers(device=device.type)  # adaswitch, torch, torch_compile, trl, liger (LigerJSD)
    if smoke:
        out.pop("torch_compile")
    return out


def measure(fn, x, op, reps, device):
    cuda = device.type == "cuda"

    def timed(f):
        if not cuda:
            t0 = time.perf_counter()
            r = f()
            return r, 1e3 * (time.perf_counter() - t0)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        r = f()
        end.record()
        torch.cuda.synchronize()
        return r, start.elapsed_time(end)

    times = {"forward": [], "backward": [], "full": []}
    for _ in range(reps):
        y = B.fresh_leaves(x, op)
        out, ms = timed(lambda y=y: fn(y))
        times["forward"].append(ms)
        _, ms = timed(out.backward)
        times["backward"].append(ms)
        del out, y
        y = B.fresh_leaves(x, op)
        times["full"].append(timed(lambda y=y: fn(y).backward())[1])
        del y
    if not cuda:
        return {k: statistics.median(v) for k, v in times.items()}, float("nan")
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y = B.fresh_leaves(x, op)
    fn(y).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return {k: statistics.median(v) for k, v in times.items()}, peak / 2**20


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(os.environ.get("OUT", ROOT / "benchmarks" / "results")) / "loss_gpu.csv"
    ap.add_argument("--out", default=str(default_out))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="BT=1024 only")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU under TRITON_INTERPRET=1")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.smoke:
        print("no CUDA device: use --smoke (with TRITON_INTERPRET=1) for a CPU self-check")
        return 1
    lines = [check_correctness(device, args.smoke)]
    print(lines[0])
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter smoke test)"
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
    h, v = (32, 300) if args.smoke else (H, V)
    sizes = (16,) if args.smoke else (1024,) if args.quick else (1024, 8192)
    rows = []
    for op in ("fused", "logits"):
        for bt in sizes:
            if op == "fused":
                x = B.make_hidden(bt, h, v, dtype=torch.bfloat16, device=device)
                providers = fused_providers(args.smoke)
            else:
                x = B.make_logits(bt, v, dtype=torch.bfloat16, device=device)
                providers = logits_providers(device, args.smoke)
            ref = B.run(providers["adaswitch"], x, op, "forward").item()
            for prov, fn in providers.items():
                try:
                    got = B.run(fn, x, op, "full").item()  # warm-up (compile, autotune) + correctness
                    if abs(got - ref) > 2e-2 * abs(ref) + 1e-4:  # baselines round logits to bf16
                        raise AssertionError(f"loss {got} != adaswitch {ref}")
                    ms, peak = measure(fn, x, op, 1 if args.smoke else args.reps, device)
                except (torch.OutOfMemoryError, AssertionError, RuntimeError) as exc:
                    msg = f"{op} BT={bt} {prov}: skipped ({type(exc).__name__}: {str(exc)[:200]})"
                    print(msg)
                    lines.append(msg)
                    if prov == "adaswitch":
                        raise
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                for mode, val in ms.items():
                    rows.append(
                        {
                            "op": op,
                            "N": bt,
                            "V": v,
                            "H": h if op == "fused" else 0,
                            "dtype": "bfloat16",
                            "kind": KIND,
                            "provider": prov,
                            "mode": mode,
                            "ms": round(val, 3),
                            "peak_mb": round(peak, 1),
                            "machine": name,
                            "date": stamp,
                            "commit": sha.stdout.strip(),
                        }
                    )
                print(
                    f"{op:6s} BT={bt:5d} {prov:13s} fwd {ms['forward']:8.2f} ms  bwd {ms['backward']:8.2f} ms"
                    f"  full {ms['full']:8.2f} ms  peak {peak:9.1f} MB",
                    flush=True,
                )
            del x
            if device.type == "cuda":
                torch.cuda.empty_cache()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import loss_ratios

    loss_ratios.print_ratios(rows)
    full = {(r["op"], r["N"], r["provider"]): r for r in rows if r["mode"] == "full"}
    for bt, base in ((8192, "liger"), (1024, "torch")):
        a, b = full.get(("fused", bt, "adaswitch")), full.get(("fused", bt, base))
        if a and b:
            lines.append(
                f"target fused BT={bt} full pass faster than {base}: {a['ms'] < b['ms']} "
                f"({b['ms'] / a['ms']:.2f}x)"
            )
    for bt in sizes if device.type == "cuda" else ():
        a, b = full.get(("fused", bt, "adaswitch")), full.get(("fused", bt, "torch"))
        if a and b:
            lines.append(
                f"target fused BT={bt} peak <= 1/5 of torch eager: {a['peak_mb'] <= b['peak_mb'] / 5} "
                f"({a['peak_mb']:.0f} vs {b['peak_mb']:.0f} MB)"
            )
    table = [
        f"| {r['op']} | {r['N']} | {r['provider']} | {r['ms']} | {r['peak_mb']} |"
        for r in rows
        if r["mode"] == "full"
    ]
    summary = "\n".join(
        [
            f"## distillation losses ({name}, {stamp})",
            "",
            *[f"- {x}" for x in lines],
            "",
            "| op | BT | provider | full ms | peak MB |",
            "|---|---|---|---|---|",
            *table,
            "",
        ]
    )
    shared = os.environ.get("ADASWITCH_GPU_SUMMARY")  # set by run.sh, which prints it last
    with open(Path(shared) if shared else out.with_name("summary.md"), "a") as f:
        f.write(summary + "\n")
    if not shared:
        print("\n" + summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
