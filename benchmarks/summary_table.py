"""Writes the summary table of the README's Benchmarks section from the committed CSVs under
benchmarks/results/ (never typed): each row names the file, the rows and the columns its numbers come from;
a range is the minimum and maximum over the sizes that file measured.

    python benchmarks/summary_table.py          # rewrite the README block
    python benchmarks/summary_table.py --check  # exit 1 when the README block differs

Rerun it whenever a results CSV is measured again.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from readme_block import main as _main
from readme_block import replace_block

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- benchmarks-summary:begin -->", "<!-- benchmarks-summary:end -->"


def _rows(results: Path, name: str) -> list[dict]:
    with open(results / name, newline="") as f:
        return list(csv.DictReader(f))


def _x(value: float) -> str:
    return f"{value:.2f}×"


def _span(values) -> str:
    """`a–b×` over the values (one number when they print the same)."""
    values = list(values)
    if not values:
        raise ValueError("no rows to take a range over: the results CSV lacks the rows this table reads")
    low, high = _x(min(values)), _x(max(values))
    return low if low == high else f"{low[:-1]}–{high}"


def _link(name: str) -> str:
    md = Path(name).with_suffix(".md").name
    return f"[{name}](benchmarks/results/{name}) ([report](benchmarks/results/{md}))"


def _sizes(pairs) -> str:
    return ", ".join(f"{a} × {b}" for a, b in sorted(set(pairs), key=lambda p: (int(p[0]), int(p[1]))))


def divergence_row(results: Path) -> list[str]:
    name = "divergence_cpu_1thread.csv"
    native = [r for r in _rows(results, name) if r["impl"] == "native"]
    kinds = sorted({r["kind"] for r in native})
    shapes = {(r["rows"], r["vocab"]) for r in native}
    setting = "; ".join(sorted({f"{r['dtype']}, {r['threads']} thread{'' if r['threads'] == '1' else 's'}, "
                                f"{r['clock']} clock" for r in native}))
    headline = (f"native vs `torch.compile` {_span(float(r['speedup_vs_compiled']) for r in native)}, vs eager "
                f"{_span(float(r['speedup_vs_eager']) for r in native)} ({len(kinds)} kinds × {len(shapes)} "
                f"shapes, {setting})")
    source = ("rows `impl=native`, columns `speedup_vs_compiled` and `speedup_vs_eager`; min–max over kind and "
              f"rows × vocab ({_sizes(shapes)})")
    return ["`token_divergence`", _link(name), headline, source]


def _loss_cases(rows: list[dict], op: str):
    """{(N, V): {provider: row}} of the full-pass rows of `op` (a later row of a case replaces an earlier
    one, as in loss_ratios.py), and whether the adaswitch rows come from another run than the baselines'."""
    cases: dict = {}
    for r in rows:
        if r["op"] == op and r["mode"] == "full":
            cases.setdefault((r["N"], r["V"]), {})[r["provider"]] = r
    cases = {k: v for k, v in cases.items() if "adaswitch" in v}
    runs = lambda pick: {(r["date"], r["commit"]) for c in cases.values() for p, r in c.items() if pick(p)}  # noqa: E731
    mixed = runs(lambda p: p == "adaswitch") != runs(lambda p: p != "adaswitch")
    return cases, mixed


def _time_ratios(cases, provider) -> list[float]:
    return [float(c[provider]["ms"]) / float(c["adaswitch"]["ms"]) for c in cases.values() if provider in c]


def _memory_ratios(cases, provider) -> list[float]:
    return [float(c["adaswitch"]["peak_mb"]) / float(c[provider]["peak_mb"]) for c in cases.values() if provider in c]


ROUGH = " (the adaswitch rows come from another run than the baselines': rough)"


def loss_rows(results: Path) -> list[list[str]]:
    name = "loss_cpu.csv"
    rows = _rows(results, name)
    logits, logits_mixed = _loss_cases(rows, "logits")
    headline = (f"JSD forward + backward from logits: {_span(_time_ratios(logits, 'torch'))} eager, "
                f"{_span(_time_ratios(logits, 'torch_compile'))} `torch.compile`, "
                f"{_span(_time_ratios(logits, 'trl'))} TRL; {_span(_memory_ratios(logits, 'torch'))} eager's "
                f"peak memory" + (ROUGH if logits_mixed else ""))
    source = ("rows `op=logits, mode=full`: `ms` of provider torch / torch_compile / trl ÷ `ms` of adaswitch, "
              f"`peak_mb` of adaswitch ÷ torch; min–max over N × V ({_sizes(logits)})")
    fused, fused_mixed = _loss_cases(rows, "fused")
    fused_headline = (f"fused-linear full pass: {_span(_time_ratios(fused, 'liger'))} Liger's chunked loss, "
                      f"{_span(_memory_ratios(fused, 'liger'))} its peak memory" + (ROUGH if fused_mixed else ""))
    fused_source = ("rows `op=fused, mode=full`: `ms` of provider liger ÷ `ms` of adaswitch, `peak_mb` of "
                    f"adaswitch ÷ liger; min–max over N × V ({_sizes(fused)})")
    return [["`distill_loss`", _link(name), headline, source],
            ["`fused_linear_distill_loss`", _link(name), fused_headline, fused_source]]


def step_row(results: Path) -> list[str]:
    name = "step_cpu.csv"
    native = [r for r in _rows(results, name) if r["impl"] == "native"]
    batch = ", ".join(sorted({r["batch"] for r in native}, key=int))
    policies = ", ".join(dict.fromkeys(r["policy"] for r in native))
    vocab = ", ".join(sorted({r["vocab"] for r in native}, key=int))
    headline = (f"one decode step, B = {batch}: native {_span(float(r['naive_over_impl']) for r in native)} "
                "the speed of a research-style softmax + multinomial + `.item()` step")
    source = f"rows `impl=native`, column `naive_over_impl`; min–max over policy ({policies}) and vocab ({vocab})"
    return ["fused step", _link(name), headline, source]


def generate_row(results: Path) -> list[str]:
    name = "generate_cpu.csv"
    rows = _rows(results, name)
    engine = [r for r in rows if r["method"] == "engine"]
    naive = [r for r in rows if r["method"] == "naive"]
    cases = ", ".join(r["case"] for r in engine)
    syncs = lambda rs: sorted({float(r["syncs_per_token"]) for r in rs})  # noqa: E731
    show = lambda vs: "–".join(f"{v:.3g}" for v in (vs if len(vs) == 1 else (vs[0], vs[-1])))  # noqa: E731
    headline = (f"AdaSwitch decoding: {_span(float(r['vs_naive']) for r in engine)} the tokens/s of a naive loop, "
                f"{show(syncs(engine))} host syncs per token against the loop's {show(syncs(naive))}")
    source = (f"rows `method=engine` (cases {cases}): columns `vs_naive`, `syncs_per_token`; rows "
              "`method=naive`: `syncs_per_token`")
    return ["`generate`", _link(name), headline, source]


def distill_step_row(results: Path) -> list[str]:
    name = "distill_step_cpu.csv"
    rows = {r["config"]: r for r in _rows(results, name)}
    ours, ada, skd = rows["On-policy"], rows["AdaSwitch, auto"], rows["SKD, auto"]
    headline = (f"seconds per `Distiller` step: our on-policy {_x(float(ours['vs_trl']))} TRL's "
                f"`DistillationTrainer`; with the defaults AdaSwitch {_x(float(ada['vs_on_policy']))} and SKD "
                f"{_x(float(skd['vs_on_policy']))} our on-policy")
    source = ("row `On-policy`, column `vs_trl`; rows `AdaSwitch, auto` and `SKD, auto`, column "
              "`vs_on_policy`")
    return ["distillation step", _link(name), headline, source]


def render(results: Path = RESULTS) -> str:
    table = [divergence_row(results), *loss_rows(results), step_row(results), generate_row(results),
             distill_step_row(results)]
    lines = ["| what | results | headline | from |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in table]
    return "\n".join(lines)


def updated(text: str, results: Path = RESULTS) -> str:
    return replace_block(text, BEGIN, END, render(results))


def main(argv=None) -> int:
    return _main(argv, __doc__.splitlines()[0], README, updated,
                 "README's Benchmarks summary differs from benchmarks/results/*.csv; "
                 "run python benchmarks/summary_table.py")


if __name__ == "__main__":
    sys.exit(main())
