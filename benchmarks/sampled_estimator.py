"""How noisy the sampled-token loss (`kind="sampled_reverse_kl"`) is next to the full reverse KL, on the demo's
quick pair: the shipped teacher and the quick preset's start student, on-policy responses to its training
prompts (student sampling at temperature 1, the quick budget of 40 tokens).

On the student's own sequences, at every response position t (prefix fixed):
* value: the sampled estimate delta_t = log p_S(y_t) - log p_T(y_t) against the exact KL(p_S || p_T)_t;
  their means over the tokens (the estimate is unbiased) and the per-token standard deviation of
  delta_t - KL_t (the estimator's noise), with the batch mean's standard error that noise gives;
* gradient (w.r.t. the student's logits, the batch's token mean): the sampled form's gradient from the
  sampled tokens, and from D more tokens drawn from p_S at each position (same prefixes), against the full
  reverse KL's: cosine similarity and relative error of one draw and of the mean of D draws (the noise
  falls as 1 / sqrt(D)).

    python benchmarks/sampled_estimator.py            # writes benchmarks/results/sampled_estimator_cpu.{json,md}
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine_info import ROOT, cpu_model, git_commit, load_average, utc_now, versions_text  # noqa: E402

OUT = ROOT / "benchmarks" / "results" / "sampled_estimator_cpu"


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.reshape(1, -1), b.reshape(1, -1)))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def measure(batch: int, max_new_tokens: int, draws: int, seed: int) -> dict:
    from transformers.utils import logging as hf_logging

    from adaswitch import Student, generate
    from adaswitch.demo.build_teacher import QUICK_STUDENT_DIR, TEACHER_DIR, DataSpec, load_teacher
    from adaswitch.ops import distill_loss
    from adaswitch.policies import Sampling
    from adaswitch.train.data import prompt_batch

    hf_logging.set_verbosity_error()
    logging.getLogger("adaswitch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.manual_seed(seed)
    teacher, tokenizer = load_teacher(TEACHER_DIR)
    student, _ = load_teacher(QUICK_STUDENT_DIR)
    teacher.eval()
    student.eval()
    prompts = DataSpec().build()["train"].select(range(batch))["prompt"]
    ids, mask = prompt_batch(tokenizer, prompts)
    started = time.perf_counter()
    out = generate(student, teacher, ids, mask, policy=Student(sampling=Sampling(1.0)), max_new_tokens=max_new_tokens,
                   seed=seed)
    width, n = ids.shape[1], out.response.shape[1]
    resp_mask = out.attention_mask[:, width:].bool()
    positions = (out.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        s = student(out.sequences, attention_mask=out.attention_mask, position_ids=positions).logits
        t = teacher(out.sequences, attention_mask=out.attention_mask, position_ids=positions).logits
    v = min(s.shape[-1], t.shape[-1], len(tokenizer))
    s, t = (x[:, width - 1 : width - 1 + n, :v].double() for x in (s, t))
    labels = torch.where(resp_mask, out.response, -100)

    lp_s, lp_t = s.log_softmax(-1), t.log_softmax(-1)
    kl = (lp_s.exp() * (lp_s - lp_t)).sum(-1)[resp_mask]
    y = labels.clamp_min(0)[..., None]
    delta = (lp_s.gather(-1, y) - lp_t.gather(-1, y))[..., 0][resp_mask]
    tokens = int(resp_mask.sum())
    noise = (delta - kl).std().item()

    def grad(kind, lab):
        x = s.clone().requires_grad_()
        distill_loss(x, t, kind, labels=lab).backward()
        return x.grad

    exact = grad("reverse_kl", labels)
    one = grad("sampled_reverse_kl", labels)
    gen = torch.Generator().manual_seed(seed + 1)
    probs = lp_s.exp().reshape(-1, v)
    total = torch.zeros_like(exact)
    for _ in range(draws):
        drawn = torch.multinomial(probs, 1, generator=gen).reshape(labels.shape)
        total += grad("sampled_reverse_kl", torch.where(resp_mask, drawn, -100))
    mean_draws = total / draws
    return {
        "prompts": batch,
        "max_new_tokens": max_new_tokens,
        "response_tokens": tokens,
        "draws": draws,
        "seed": seed,
        "mean_exact_reverse_kl": kl.mean().item(),
        "mean_sampled_estimate": delta.mean().item(),
        "std_exact_reverse_kl_per_token": kl.std().item(),
        "std_sampled_estimate_per_token": delta.std().item(),
        "std_estimator_noise_per_token": noise,
        "batch_mean_standard_error": noise / math.sqrt(tokens),
        "grad_cosine_one_draw": _cos(one, exact),
        "grad_relative_error_one_draw": _rel(one, exact),
        f"grad_cosine_mean_of_{draws}_draws": _cos(mean_draws, exact),
        f"grad_relative_error_mean_of_{draws}_draws": _rel(mean_draws, exact),
        "seconds": round(time.perf_counter() - started, 1),
    }


def render(result: dict) -> str:
    m = result["meta"]
    r = result["measured"]
    d = r["draws"]
    return "\n".join([
        f"Written by `python benchmarks/sampled_estimator.py` on {m['date']}, commit {m['commit']}, {m['machine']}, "
        f"{m['threads']} torch threads, load average {m['load_average']}; {m['versions']}.",
        "",
        f"Demo quick pair, {r['prompts']} on-policy responses (student sampled at temperature 1, "
        f"<= {r['max_new_tokens']} tokens): {r['response_tokens']} response tokens.",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| exact reverse KL, mean per token (nats) | {r['mean_exact_reverse_kl']:.4f} |",
        f"| sampled estimate log p_S(y) - log p_T(y), mean per token | {r['mean_sampled_estimate']:.4f} |",
        f"| per-token std of the exact reverse KL | {r['std_exact_reverse_kl_per_token']:.4f} |",
        f"| per-token std of the sampled estimate | {r['std_sampled_estimate_per_token']:.4f} |",
        f"| per-token std of the estimator's noise (estimate - exact) | {r['std_estimator_noise_per_token']:.4f} |",
        f"| standard error of the batch-mean estimate | {r['batch_mean_standard_error']:.4f} |",
        f"| gradient cosine with the full reverse KL's, one draw | {r['grad_cosine_one_draw']:.3f} |",
        f"| gradient relative error, one draw | {r['grad_relative_error_one_draw']:.3f} |",
        f"| gradient cosine, mean of {d} draws per position | {r[f'grad_cosine_mean_of_{d}_draws']:.3f} |",
        f"| gradient relative error, mean of {d} draws per position | "
        f"{r[f'grad_relative_error_mean_of_{d}_draws']:.3f} |",
    ])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--draws", type=int, default=16, help="extra draws per position for the averaged gradient")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(OUT), help="path without extension: .json and .md are written")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {
        "meta": {"date": utc_now(), "commit": git_commit(), "machine": cpu_model(), "threads": args.threads,
                 "load_average": load_average(), "versions": versions_text()},
        "measured": measure(args.batch, args.max_new_tokens, args.draws, args.seed),
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(render(result) + "\n")
    print(render(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
