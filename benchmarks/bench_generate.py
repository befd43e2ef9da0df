"""adaswitch.generate against the ways people generate distillation data today, measured in one run.

    python benchmarks/bench_generate.py [--new-tokens 128] [--batch 8] [--sampling greedy|sample]
                                        [--lookahead 2,4,8] [--device cpu] [--cuda-graph]

Methods (all on the same random-init Qwen2-style models with the real vocabulary 151936: teacher 4 layers
x 512, student 2 layers x 256; batch 8 left-padded prompts of 16-32 tokens; 128 new tokens, no early EOS):
  naive        the research-code loop: both models' HF forward with DynamicCache every token,
               torch.softmax / log_softmax, a per-row Python AdaSwitch rule with .item() per token
  hf-student   transformers `generate` with the student (the on-policy baseline)
  hf-teacher   transformers `generate` with the teacher (SeqKD data)
  engine-student / engine-teacher   adaswitch.generate with the Student / Teacher policy (one model: the
               engine's loop against transformers' on the same work)
  engine       adaswitch.generate, AdaSwitch in step mode (lookahead=0)
  lookahead-G  adaswitch.generate, AdaSwitch with lookahead G
  lm-heads     only the two LM-head products of every exploring step (the floor of the never case:
               naive / lm-heads is the most any step-mode engine could gain over the naive loop)
AdaSwitch cases force the switch early (window 4, k=1: first spike after 4 divergences), late (the same
with warmup 96) or never (k=inf). Host syncs are counted with adaswitch.engine.sync.SyncCounter on the
tiny test models (tests/tiny_models.py) with the same batch, length and policies: the count depends on the
loop, not on the model size, and counting every op of the large models would distort their timings.
Reported per generated position: (syncs at N tokens - syncs at N/2 tokens) / (N/2), i.e. the per-token
part without the per-call constant; the per-call total is in the CSV.

Writes benchmarks/results/generate_<device>.{md,csv} with machine, date, commit and load average.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM

# The engine's host-read interval here: the accelerator default, on every device, so the sync counts are
# what a GPU run does (the CPU default is 1, a free read per token; with no early EOS the work is the same).
SYNC_EVERY = 16

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import tiny_models  # noqa: E402
from machine_info import cpu_model, git_commit, load_average, utc_now  # noqa: E402

from adaswitch import AdaSwitch, Sampling, Student, Teacher, generate  # noqa: E402
from adaswitch.engine.sync import SyncCounter  # noqa: E402
from adaswitch.versions import package_versions  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
VOCAB = 151936
PAD, EOS = 151643, 151645


def machine(device: torch.device) -> dict:
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "versions": package_versions(),
        "date": utc_now(),
        "commit": git_commit(),
        "load_avg_start": load_average(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def qwen2(layers: int, hidden: int, heads: int, kv_heads: int, seed: int, device, dtype):
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=4096, tie_word_embeddings=True, pad_token_id=PAD,
                         bos_token_id=PAD, eos_token_id=EOS, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config).to(device=device, dtype=dtype).eval()


def policies(sampling: Sampling) -> dict:
    kw = dict(student_sampling=sampling, teacher_sampling=sampling)
    return {
        "early": AdaSwitch(window=4, k=1.0, **kw),
        "late": AdaSwitch(window=4, k=1.0, warmup=96, **kw),
        "never": AdaSwitch(window=4, k=math.inf, **kw),
    }


@torch.no_grad()
def naive_adaswitch(student, teacher, ids, mask, n, policy: AdaSwitch, greedy: bool):
    """What research code does: HF forwards with DynamicCache, softmax, a Python rule per row, .item()."""
    b = ids.shape[0]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    caches = [DynamicCache(config=student.config), DynamicCache(config=teacher.config)]
    ls = student(input_ids=ids, attention_mask=mask, position_ids=pos, cache=caches[0]).logits[:, -1]
    lt = teacher(input_ids=ids, attention_mask=mask, position_ids=pos, cache=caches[1]).logits[:, -1]
    history = [[] for _ in range(b)]
    switched = [False] * b
    out = []
    attn = mask
    next_pos = pos[:, -1:] + 1
    need = policy.min_history
    for _ in range(n):
        log_ps = torch.log_softmax(ls.float(), -1)
        log_pt = torch.log_softmax(lt.float(), -1)
        tokens = []
        for r in range(b):
            if not switched[r]:
                d = (log_pt[r].exp() * (log_pt[r] - log_ps[r])).sum().item()
                h = history[r]
                if len(h) >= need and d > policy.k * sum(h[-policy.window:]) / policy.window:
                    switched[r] = True
                else:
                    h.append(d)
            logp = log_pt[r] if switched[r] else log_ps[r]
            if greedy:
                tokens.append(logp.argmax().item())
            else:
                tokens.append(torch.multinomial(torch.softmax(logp, -1), 1).item())
        x = torch.tensor(tokens, device=ids.device)[:, None]
        out.append(x)
        attn = torch.cat([attn, torch.ones_like(x)], 1)
        ls = student(input_ids=x, attention_mask=attn, position_ids=next_pos, cache=caches[0]).logits[:, -1]
        lt = teacher(input_ids=x, attention_mask=attn, position_ids=next_pos, cache=caches[1]).logits[:, -1]
        next_pos = next_pos + 1
    return torch.cat(out, 1), switched


@torch.no_grad()
def hf_generate(model, ids, mask, n, greedy: bool):
    sampling = {} if greedy else dict(do_sample=True, top_k=0, top_p=1.0, temperature=1.0)
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **sampling,
                          pad_token_id=model.config.pad_token_id, eos_token_id=model.config.eos_token_id)


def prompts(batch: int, device, vocab: int, pad: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(16, 33, (batch,), generator=g)
    ids = torch.randint(4, min(vocab, 150000), (batch, 32), generator=g)
    mask = (torch.arange(32)[None, :] >= (32 - lengths)[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad))
    return ids.to(device), mask.to(device)


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def count_syncs(cases: dict, batch: int, n: int, lookaheads, greedy: bool, device) -> dict:
    """Host syncs per call at n and n/2 new tokens, on the tiny models (same loop, same policies)."""
    student = tiny_models.tiny_student(max_positions=4096).to(device)
    teacher = tiny_models.tiny_teacher(max_positions=4096).to(device)
    ids, mask = (t.to(device) for t in tiny_models.random_prompts(batch, 32, min_len=16, seed=0))
    eos = tiny_models.VOCAB_SIZE - 1  # a rare id: rows run to the end as in the timed runs
    sampling = Sampling(temperature=0.0 if greedy else 1.0)
    pols = policies(sampling)
    counts = {}

    def syncs(fn):
        with SyncCounter() as counter:
            fn()
        return counter.count

    for case in cases:
        pol = pols[case]
        for length in (n, n // 2):
            counts[("naive", case, length)] = syncs(lambda length=length, pol=pol: naive_adaswitch(
                student, teacher, ids, mask, length, pol, greedy))
            counts[("engine", case, length)] = syncs(lambda length=length, pol=pol: generate(
                student, teacher, ids, mask, policy=pol, max_new_tokens=length, eos_token_id=eos,
                pad_token_id=tiny_models.PAD_ID, sync_every=SYNC_EVERY))
            for g in lookaheads:
                counts[(f"lookahead-{g}", case, length)] = syncs(lambda length=length, pol=pol, g=g: generate(
                    student, teacher, ids, mask, policy=pol, max_new_tokens=length, eos_token_id=eos,
                    pad_token_id=tiny_models.PAD_ID, lookahead=g, sync_every=SYNC_EVERY))
    for name, model in (("hf-student", student), ("hf-teacher", teacher)):
        for length in (n, n // 2):
            with SyncCounter() as counter:
                hf_kw = {} if greedy else dict(do_sample=True, top_k=0)
                model.generate(ids, attention_mask=mask, max_new_tokens=length, min_new_tokens=length,
                               pad_token_id=tiny_models.PAD_ID, eos_token_id=eos, **hf_kw)
            counts[(name, "-", length)] = counter.count
    for name, s, t, pol in (("engine-student", student, None, Student(sampling)),
                            ("engine-teacher", None, teacher, Teacher(sampling))):
        for length in (n, n // 2):
            counts[(name, "-", length)] = syncs(lambda length=length, s=s, t=t, pol=pol: generate(
                s, t, ids, mask, policy=pol, max_new_tokens=length, eos_token_id=eos,
                pad_token_id=tiny_models.PAD_ID, sync_every=SYNC_EVERY))
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sampling", choices=("greedy", "sample"), default="greedy")
    parser.add_argument("--lookahead", default="2,4,8")
    parser.add_argument("--cases", default="early,late,never")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--cuda-graph", action="store_true", help="also time the engine with cuda_graph=True")
    parser.add_argument("--out", default=None, help="results file stem (default generate_<device>)")
    parser.add_argument("--results-dir", default=str(RESULTS))
    parser.add_argument("--repeats", type=int, default=1, help="round-robin repeats; the best time is kept")
    parser.add_argument("--tiny", action="store_true", help="time the tiny test models (a smoke run)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (on a shared, loaded CPU 1 is faster for every method)")
    args = parser.parse_args(argv)
    args.command = " ".join(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    greedy = args.sampling == "greedy"
    n, batch = args.new_tokens, args.batch
    lookaheads = [int(g) for g in args.lookahead.split(",") if g]
    cases = args.cases.split(",")
    info = machine(device)

    if args.tiny:
        teacher = tiny_models.tiny_teacher(max_positions=4096).to(device=device, dtype=dtype)
        student = tiny_models.tiny_student(max_positions=4096).to(device=device, dtype=dtype)
        ids, mask = prompts(batch, device, tiny_models.VOCAB_SIZE, tiny_models.PAD_ID)
    else:
        teacher = qwen2(4, 512, 8, 2, seed=0, device=device, dtype=dtype)
        student = qwen2(2, 256, 4, 2, seed=1, device=device, dtype=dtype)
        ids, mask = prompts(batch, device, VOCAB, PAD)
    eos, pad = teacher.config.eos_token_id, teacher.config.pad_token_id
    sampling = Sampling(temperature=0.0 if greedy else 1.0)
    pols = policies(sampling)

    def engine(pol, g=0, graph=False, length=n):
        return generate(student, teacher, ids, mask, policy=pol, max_new_tokens=length, eos_token_id=eos,
                        pad_token_id=pad, lookahead=g, cuda_graph=graph,
                        sync_every=SYNC_EVERY)

    runs = []  # (method, case, fn)
    for case in cases:
        pol = pols[case]
        runs.append(("naive", case,
                     lambda pol=pol: naive_adaswitch(student, teacher, ids, mask, n, pol, greedy)))
    runs.append(("hf-student", "-", lambda: hf_generate(student, ids, mask, n, greedy)))
    runs.append(("hf-teacher", "-", lambda: hf_generate(teacher, ids, mask, n, greedy)))
    # The floor: the two LM-head products every exploring step needs (batch x hidden times hidden x V
    # for each model), nothing else. naive / lm-heads bounds what any engine can gain in the never case.
    heads = [(m.get_output_embeddings().weight, torch.randn(batch, m.config.hidden_size, device=device,
                                                            dtype=dtype)) for m in (student, teacher)]

    def lm_heads():
        for _ in range(n):
            for weight, hidden in heads:
                torch.nn.functional.linear(hidden, weight)

    runs.append(("lm-heads", "never", lm_heads))
    runs.append(("engine-student", "-", lambda: generate(student, None, ids, mask, policy=Student(sampling),
                                                         max_new_tokens=n, eos_token_id=eos, pad_token_id=pad,
                                                         sync_every=SYNC_EVERY)))
    runs.append(("engine-teacher", "-", lambda: generate(None, teacher, ids, mask, policy=Teacher(sampling),
                                                         max_new_tokens=n, eos_token_id=eos, pad_token_id=pad,
                                                         sync_every=SYNC_EVERY)))
    for case in cases:
        pol = pols[case]
        runs.append(("engine", case, lambda pol=pol: engine(pol)))
        if args.cuda_graph:
            runs.append(("engine-cudagraph", case, lambda pol=pol: engine(pol, graph=True)))
        for g in lookaheads:
            runs.append((f"lookahead-{g}", case, lambda pol=pol, g=g: engine(pol, g)))
            if args.cuda_graph:
                runs.append((f"lookahead-{g}-cudagraph", case,
                             lambda pol=pol, g=g: engine(pol, g, graph=True)))

    # Warm-up: one short engine call (Triton compile on CUDA, allocator) and one short HF call.
    engine(pols[cases[0]], length=4)
    hf_generate(teacher, ids, mask, 4, greedy)

    counts = count_syncs(cases, batch, n, lookaheads, greedy, device)
    # Round-robin repeats, best time kept: on a shared machine the load changes during the run, and every
    # method should see the same conditions. Results are written after every round.
    rows = [{"method": method, "case": case, "seconds": math.inf, "switch": ""} for method, case, _ in runs]
    for row in rows:
        key = row["method"].replace("-cudagraph", "")
        full, half = counts.get((key, row["case"], n)), counts.get((key, row["case"], n // 2))
        row["syncs_per_call"] = full
        row["syncs_per_token"] = None if full is None else (full - half) / (n - n // 2)
    for done in range(1, args.repeats + 1):
        for row, (method, case, fn) in zip(rows, runs):
            seconds, result = timed(fn, device)
            if hasattr(result, "switch_position"):
                sp = result.switch_position
                row["switch"] = f"{(sp >= 0).sum().item()}/{batch} rows"
                if (sp >= 0).any():
                    row["switch"] += f", mean {sp[sp >= 0].float().mean().item():.1f}"
            elif method == "naive":
                row["switch"] = f"{sum(result[1])}/{batch} rows"
            row["seconds"] = min(row["seconds"], seconds)
            row["tokens_per_s"] = batch * n / row["seconds"]
            print(f"{method:>22} {case:>6}  {seconds:8.2f} s  {batch * n / seconds:9.1f} tok/s  "
                  f"{row['switch']}", flush=True)
        info["load_avg_end"] = load_average()
        info["rounds"] = f"{done} of {args.repeats}"
        naive = {r["case"]: r["tokens_per_s"] for r in rows if r["method"] == "naive"}
        hf_teacher = next(r["tokens_per_s"] for r in rows if r["method"] == "hf-teacher")
        hf_student = next(r["tokens_per_s"] for r in rows if r["method"] == "hf-student")
        for row in rows:
            row["vs_naive"] = row["tokens_per_s"] / naive[row["case"]] if row["case"] in naive else None
            row["vs_hf_teacher"] = row["tokens_per_s"] / hf_teacher
            row["vs_hf_student"] = row["tokens_per_s"] / hf_student
        write(rows, info, args, device)
    return rows


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def write(rows, info, args, device) -> None:
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stem = args.out or f"generate_{device.type}"
    fields = ["method", "case", "seconds", "tokens_per_s", "vs_naive", "vs_hf_teacher", "vs_hf_student",
              "syncs_per_token", "syncs_per_call", "switch"]
    with open(results / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k) for k in fields})
    lines = [
        f"# adaswitch.generate vs baselines ({device.type})",
        "",
        f"Produced by `python benchmarks/bench_generate.py {args.command}` (one run).",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        f"- setup: batch {args.batch}, {args.new_tokens} new tokens, prompts 16-32 tokens left-padded, "
        f"{args.sampling} sampling, {args.dtype}, best of the completed round-robin rounds; "
        "teacher Qwen2 4x512 (8 heads, 2 KV), student Qwen2 2x256, "
        f"vocabulary {VOCAB}, random init",
        "- early / late / never: AdaSwitch(window=4, k=1) / the same with warmup=96 / k=inf",
        "- lm-heads: the two LM-head products of an exploring step, alone, once per token (the floor of the "
        "never case; its `vs naive` is the most a step-mode engine could gain over the naive loop)",
        "- syncs/token: marginal host syncs per generated position (tiny models, same loop); syncs/call: "
        f"total at {args.new_tokens} tokens",
        "",
        "| method | case | tokens/s | vs naive | vs hf-teacher | vs hf-student | syncs/token | syncs/call "
        "| switch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        cells = [r["method"], r["case"], f"{r['tokens_per_s']:.1f}", _fmt(r["vs_naive"], ".2f"),
                 f"{r['vs_hf_teacher']:.2f}", f"{r['vs_hf_student']:.2f}", _fmt(r["syncs_per_token"], ".3f"),
                 _fmt(r["syncs_per_call"], "d"), r["switch"]]
        lines.append("| " + " | ".join(cells) + " |")
    (results / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
