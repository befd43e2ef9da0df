"""adaswitch.generate on a lent GPU: correctness checks on the device, then the CPU benchmark's comparison
(naive loop, transformers generate with the student and with the teacher, the engine in step and
lookahead mode, switch early / late / never) plus the engine with CUDA graphs, in bfloat16.

    bash benchmarks/gpu/run.sh                                   # on the device (all GPU benchmarks)
    python benchmarks/gpu/bench_generate_gpu.py [--smoke]        # --smoke: tiny models, a few tokens

Checks (tiny fp32 models on the device; exit 1 if one fails): lookahead == step mode (AdaSwitch, SKD),
cuda_graph=True == eager, greedy Teacher == transformers' greedy generate, the flash-attn cache path
(kernel == reference, generate == SDPA path; when flash-attn is importable), host syncs per call
<= ceil(N / sync_every) + 2 (counted on the CUDA device: real device-to-host reads).
Results: $OUT/generate_gpu.{md,csv}; one section appended to $ADASWITCH_GPU_SUMMARY.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_generate  # noqa: E402  (also puts tests/ and the repository on sys.path)
import tiny_models  # noqa: E402

from adaswitch import SKD, AdaSwitch, Sampling, Teacher, generate  # noqa: E402
from adaswitch.engine.sync import SyncCounter  # noqa: E402


def _same(a, b) -> bool:
    return (torch.equal(a.response, b.response) and torch.equal(a.from_teacher, b.from_teacher)
            and torch.equal(a.switch_position, b.switch_position))


def checks(device: torch.device, n: int) -> list[str]:
    """Returns the failed checks' descriptions (empty when all pass)."""
    student = tiny_models.tiny_student().to(device)
    teacher = tiny_models.tiny_teacher().to(device)
    ids, mask = (t.to(device) for t in tiny_models.random_prompts(4, 7, min_len=2, seed=5))
    common = dict(max_new_tokens=n, eos_token_id=tiny_models.EOS_ID, pad_token_id=tiny_models.PAD_ID)
    failures = []
    for name, policy in (("adaswitch", AdaSwitch(window=3, k=1.1)), ("skd", SKD(top_k=5))):
        step = generate(student, teacher, ids, mask, policy=policy, **common)
        for g in (2, 4):
            if not _same(step, generate(student, teacher, ids, mask, policy=policy, lookahead=g, sync_every=3,
                                        **common)):
                failures.append(f"{name}: lookahead={g} != step mode")
        if device.type == "cuda":
            for g in (0, 3):
                eager = generate(student, teacher, ids, mask, policy=policy, lookahead=g, **common)
                graph = generate(student, teacher, ids, mask, policy=policy, lookahead=g, cuda_graph=True,
                                 **common)
                if not _same(eager, graph):
                    failures.append(f"{name}: cuda_graph=True != eager (lookahead={g})")
    ref = teacher.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                           pad_token_id=tiny_models.PAD_ID, eos_token_id=tiny_models.EOS_ID)
    out = generate(None, teacher, ids, mask, policy=Teacher(Sampling(temperature=0)), **common)
    width = ref.shape[1] - ids.shape[1]
    if not torch.equal(out.response[:, :width], ref[:, ids.shape[1]:]):
        failures.append("greedy Teacher != transformers generate")
    failures += flash_checks(device, student, teacher, ids, mask, common)
    every = 4
    cases = (("adaswitch", AdaSwitch(window=3, k=1.1), 0), ("adaswitch", AdaSwitch(k=math.inf), 3),
             ("skd", SKD(top_k=5), 3))
    for name, policy, g in cases:
        with SyncCounter() as counter:
            generate(student, teacher, ids, mask, policy=policy, lookahead=g, sync_every=every, **common)
        if counter.count > math.ceil(n / every) + 2:
            failures.append(f"{name} lookahead={g}: {counter.count} host syncs ({dict(counter.by_op)})")
    return failures


def flash_checks(device, student, teacher, ids, mask, common) -> list[str]:
    """The flash-attn cache path: the real flash_attn_with_kvcache == its PyTorch reference (bf16, GQA,
    left padding, q in {1, 3}), and generate on bf16 models through it == through SDPA. Prints why it is
    skipped when flash-attn (>= 2.6) is not importable."""
    from adaswitch.engine import attention
    from adaswitch.engine import generate as generate_module

    flash = attention._load_flash()
    if device.type != "cuda" or flash is None:
        print("flash-attn path not checked: flash-attn >= 2.6 is not importable on this machine", flush=True)
        return []
    failures = []
    gen = torch.Generator(device=device).manual_seed(0)
    for nq in (1, 3):
        q = torch.randn(5, nq, 8, 64, device=device, generator=gen, dtype=torch.bfloat16)
        k = torch.randn(5, 40, 2, 64, device=device, generator=gen, dtype=torch.bfloat16)
        v = torch.randn(5, 40, 2, 64, device=device, generator=gen, dtype=torch.bfloat16)
        end = torch.tensor([40, 17, 9, 33, 5], device=device, dtype=torch.int32)
        left = torch.tensor([0, 3, 4, 10, 0], device=device, dtype=torch.int32)
        got = flash(q, k, v, cache_seqlens=end, cache_leftpad=left, softmax_scale=0.125, causal=True)
        ref = attention.flash_attn_with_kvcache_reference(q, k, v, cache_seqlens=end, cache_leftpad=left,
                                                          softmax_scale=0.125, causal=True)
        if not torch.allclose(got.float(), ref.float(), atol=2e-2, rtol=2e-2):
            failures.append(f"flash_attn_with_kvcache != reference (q={nq})")
    s16, t16 = (copy.deepcopy(m).to(torch.bfloat16) for m in (student, teacher))
    policy = AdaSwitch(window=3, k=1.1)
    with_flash = generate(s16, t16, ids, mask, policy=policy, lookahead=2, **common)
    available = generate_module.flash_available
    generate_module.flash_available = lambda model, attention=None: False
    try:
        with_sdpa = generate(s16, t16, ids, mask, policy=policy, lookahead=2, **common)
    finally:
        generate_module.flash_available = available
    agree = (with_flash.response == with_sdpa.response).float().mean().item()
    print(f"flash vs SDPA generate (bf16): {agree:.1%} of response tokens equal", flush=True)
    if agree < 0.9:  # bf16 rounding differs between the kernels; near-ties may flip a token, not 10%
        failures.append(f"flash-attn generate agrees with SDPA on only {agree:.1%} of tokens")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models and a few tokens (CPU self-check)")
    args, rest = parser.parse_known_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(os.environ.get("OUT") or ROOT / "gpu_out")
    failures = checks(device, 6 if args.smoke else 24)
    for f in failures:
        print("CHECK FAILED:", f, flush=True)
    bench_args = ["--device", device.type, "--results-dir", str(out), "--out", "generate_gpu"]
    if args.smoke:
        bench_args += ["--tiny", "--new-tokens", "8", "--batch", "2", "--lookahead", "2", "--cases", "early"]
    else:
        bench_args += ["--dtype", "bfloat16"]
    if device.type == "cuda":
        bench_args.append("--cuda-graph")
    bench_generate.main(bench_args + rest)
    summary = os.environ.get("ADASWITCH_GPU_SUMMARY")
    if summary:
        status = "all passed" if not failures else "FAILED: " + "; ".join(failures)
        table = (out / "generate_gpu.md").read_text()
        with open(summary, "a") as f:
            f.write(f"\n## generate ({device.type})\n\nChecks (lookahead == step, cuda_graph == eager, "
                    f"greedy teacher == transformers, sync bound): {status}\n\n{table}\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
