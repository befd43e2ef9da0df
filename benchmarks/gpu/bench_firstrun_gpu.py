"""Checks a first GPU run of the Triton kernels needs (the interpreter and the sm_90 compile test cannot
make them):

1. device guard: every op on tensors of cuda:1 while cuda:0 is current gives what it gives on cuda:0,
   and leaves cuda:0 current (skipped, with a note, on a one-GPU machine);
2. lookahead == step mode in bf16, with the differences accounted for: each row's first differing
   position is classified as a near-tie (the deciding model's top-2 logits within NEAR_TIE_ULPS bf16
   ulps, or a switch decision) or not; only differences that are not near-ties fail
   (docs/numerics.md: lookahead's teacher logits come from one G-token forward, step mode's from
   1-token forwards, so bf16 logits may differ by an ulp and a near-tie may flip);
3. fused-linear peak memory: a full pass (forward + backward) at N=8192, H=4096, V=128256 bf16 with
   chunk_size=1024 stays under the bound its design gives (the fp32 weight gradient, its bf16 copy,
   the hidden-state gradient and a few [chunk, V] fp32 tiles), i.e. no [N, V] buffer appears.

    python benchmarks/gpu/bench_firstrun_gpu.py            # on the GPU (run by benchmarks/gpu/run.sh)
    TRITON_INTERPRET=1 python benchmarks/gpu/bench_firstrun_gpu.py --smoke   # CPU self-check, tiny

Results: $OUT/firstrun_gpu.md; one section appended to $ADASWITCH_GPU_SUMMARY. Exit 1 if a check fails.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import tiny_models  # noqa: E402

from adaswitch import SKD, AdaSwitch, Sampling, generate  # noqa: E402
from adaswitch.ops import (  # noqa: E402
    SwitchState,
    distill_loss,
    fused_linear_distill_loss,
    fused_lookahead,
    fused_step,
    token_divergence,
)

NEAR_TIE_ULPS = 4


def _ops_on(device: torch.device) -> dict[str, torch.Tensor]:
    """Every Triton op on `device`; outputs moved to the CPU."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 1000, generator=g).to(device, torch.bfloat16)
    t = torch.randn(6, 1000, generator=g).to(device, torch.bfloat16)
    out = {"divergence": token_divergence(s, t, "jsd")}
    x = s.clone().float().requires_grad_()
    distill_loss(x, t.float(), "forward_kl").backward()
    out["loss grad"] = x.grad
    hs = torch.randn(6, 16, generator=g).to(device).requires_grad_()
    ws = torch.randn(1000, 16, generator=g).to(device).requires_grad_()
    fused_linear_distill_loss(hs, ws, torch.randn(6, 8, generator=g).to(device),
                              torch.randn(1000, 8, generator=g).to(device), "jsd", chunk_size=4).backward()
    out["fused hs grad"] = hs.grad
    state = SwitchState.new(6, 3, device=device)
    common = dict(seed=1, keys=torch.arange(6, device=device), eos_token_id=1, pad_token_id=0)
    step = fused_step(s, t, AdaSwitch(window=3, k=1.1), state,
                      position=torch.zeros(6, dtype=torch.long, device=device), **common)
    out["step token"], out["step divergence"] = step.token, step.divergence
    look = fused_lookahead(s.view(3, 2, 1000), t.view(3, 2, 1000),
                           torch.randint(2, 1000, (3, 2), generator=g).to(device), SKD(top_k=50),
                           SwitchState.new(3, device=device), seed=1, keys=torch.arange(3, device=device),
                           position=torch.zeros(3, dtype=torch.long, device=device), eos_token_id=1, pad_token_id=0)
    out["lookahead accepted"], out["lookahead token"] = look.accepted, look.token
    return {k: v.detach().cpu() for k, v in out.items()}


def check_device_guard(notes: list[str], smoke: bool = False) -> list[str]:
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        if smoke:  # at least run the ops the check uses
            _ops_on(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        notes.append("device guard: not checked (needs two GPUs; this machine has "
                     f"{torch.cuda.device_count() if torch.cuda.is_available() else 0})")
        return []
    torch.cuda.set_device(0)
    ref = _ops_on(torch.device("cuda", 0))
    got = _ops_on(torch.device("cuda", 1))
    torch.cuda.synchronize(1)
    failures = [f"device guard: {k} on cuda:1 != cuda:0" for k in ref
                if not torch.allclose(ref[k].double(), got[k].double(), equal_nan=True)]
    if torch.cuda.current_device() != 0:
        failures.append(f"device guard: the current device changed to {torch.cuda.current_device()}")
    notes.append(f"device guard: {len(ref)} outputs on cuda:1 (cuda:0 current) == cuda:0: "
                 f"{'yes' if not failures else 'NO'}")
    return failures


def _bf16_ulp(x: float) -> float:
    import math

    return 2.0 ** (math.floor(math.log2(max(abs(x), 1e-30))) - 7)


def _last_logits(model, ids, mask, b, prefix):
    row = torch.cat([ids[b][mask[b].bool()], prefix])[None]
    with torch.no_grad():
        return model(input_ids=row, attention_mask=torch.ones_like(row)).logits[0, -1].float()


def check_near_ties(device: torch.device, n: int, notes: list[str]) -> list[str]:
    """lookahead vs step mode on bf16 models with greedy draws: differences must be near-ties."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    student = copy.deepcopy(tiny_models.tiny_student()).to(device, dtype)
    teacher = copy.deepcopy(tiny_models.tiny_teacher()).to(device, dtype)
    ids, mask = (t.to(device) for t in tiny_models.random_prompts(16, 9, min_len=2, seed=11))
    greedy = Sampling(0)
    common = dict(max_new_tokens=n, eos_token_id=tiny_models.EOS_ID, pad_token_id=tiny_models.PAD_ID)
    failures = []
    for name, policy in (("adaswitch", AdaSwitch(window=3, k=1.1, student_sampling=greedy, teacher_sampling=greedy)),
                         ("skd", SKD(top_k=5, student_sampling=greedy, teacher_sampling=greedy))):
        step = generate(student, teacher, ids, mask, policy=policy, **common)
        for g in (2, 4):
            look = generate(student, teacher, ids, mask, policy=policy, lookahead=g, **common)
            counts = {"equal rows": 0, "token near-tie": 0, "switch decision": 0, "not a near-tie": 0}
            for b in range(ids.shape[0]):
                diff = (step.response[b] != look.response[b]) | (step.from_teacher[b] != look.from_teacher[b])
                if not diff.any():
                    counts["equal rows"] += 1
                    continue
                j = int(diff.nonzero()[0])
                if step.from_teacher[b, j] != look.from_teacher[b, j]:
                    counts["switch decision"] += 1  # d against the moving threshold, or SKD's top-k edge
                    continue
                model = teacher if bool(step.from_teacher[b, j]) else student
                top = _last_logits(model, ids, mask, b, step.response[b, :j]).topk(2).values.tolist()
                if top[0] - top[1] <= NEAR_TIE_ULPS * _bf16_ulp(top[0]):
                    counts["token near-tie"] += 1
                else:
                    counts["not a near-tie"] += 1
                    failures.append(f"{name} lookahead={g} row {b} position {j}: tokens differ with a top-2 gap "
                                    f"of {top[0] - top[1]:.4g} (bf16 ulp {_bf16_ulp(top[0]):.3g})")
            notes.append(f"lookahead={g} vs step ({name}, {dtype}, {ids.shape[0]} rows x {n} tokens): "
                         + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return failures


def check_fused_linear_memory(device: torch.device, smoke: bool, notes: list[str]) -> list[str]:
    if device.type != "cuda":
        notes.append("fused-linear peak memory: not measured (no GPU)")
        return []
    n, h, v, chunk = (512, 256, 32000, 128) if smoke else (8192, 4096, 128256, 1024)
    g = torch.Generator(device=device).manual_seed(0)
    hs = (torch.randn(n, h, device=device, generator=g) * 0.1).to(torch.bfloat16).requires_grad_()
    ws = (torch.randn(v, h, device=device, generator=g) * 0.02).to(torch.bfloat16).requires_grad_()
    ht = (torch.randn(n, h, device=device, generator=g) * 0.1).to(torch.bfloat16)
    wt = (torch.randn(v, h, device=device, generator=g) * 0.02).to(torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fused_linear_distill_loss(hs, ws, ht, wt, "jsd", chunk_size=chunk).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    # fp32 weight gradient + its bf16 copy, the hidden gradient, and at most 8 [chunk, V] fp32 tiles
    bound = 4 * v * h + 2 * v * h + 2 * n * h + 8 * 4 * chunk * v
    gib = 1 << 30
    notes.append(f"fused-linear peak memory (N={n}, H={h}, V={v}, bf16, chunk {chunk}): {peak / gib:.2f} GiB "
                 f"over the inputs; bound {bound / gib:.2f} GiB; one [N, V] fp32 tensor is "
                 f"{4 * n * v / gib:.2f} GiB")
    return [] if peak <= bound else [f"fused-linear peak memory {peak / gib:.2f} GiB > bound {bound / gib:.2f} GiB"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CPU self-check)")
    args, _ = parser.parse_known_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    notes: list[str] = []
    failures = check_device_guard(notes, args.smoke)
    failures += check_near_ties(device, 8 if args.smoke else 32, notes)
    failures += check_fused_linear_memory(device, args.smoke, notes)
    for line in notes:
        print(line, flush=True)
    for f in failures:
        print("CHECK FAILED:", f, flush=True)
    status = "all passed" if not failures else "FAILED: " + "; ".join(failures)
    text = f"\n## first GPU run checks ({device.type})\n\n{status}\n\n" + "".join(f"- {x}\n" for x in notes)
    out = Path(os.environ.get("OUT") or ROOT / "gpu_out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "firstrun_gpu.md").write_text(text)
    summary = os.environ.get("ADASWITCH_GPU_SUMMARY")
    if summary:
        with open(summary, "a") as f:
            f.write(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
