"""The demo's numbers in README.md, docs/demo.md and docs/ablation.md, written from the committed results
(never typed).

    python -m adaswitch.demo.tables          # rewrite the blocks from docs/demo_results/ and the assets
    python -m adaswitch.demo.tables --check  # exit 1 when a block differs from what the files render

Blocks sit between `<!-- NAME:begin -->` and `<!-- NAME:end -->` markers:

* `demo-quick`: the quick preset's table and paired differences (docs/demo_results/quick/results.json);
* `demo-rerun`: that table's accuracies next to a second `make demo`'s (docs/demo_results/quick/rerun.json,
  the results.json of a rerun from a fresh clone), or one line saying there is none; `demo-rerun-amd` the
  same for a run on another CPU (docs/demo_results/quick/rerun_amd.json);
* `switch-ablation`, `switch-ablation-setting`, `switch-summary`: the switching-rule sweep's table, its
  set-up and the facts the prose discusses (docs/demo_results/ablation_switch.json);
* `window-ablation`: the window x K sweep's set-up and table (docs/demo_results/ablation.json);
* `demo-checkpoints`: the shipped checkpoints (their build_info.json);
* `demo-real`: `adaswitch demo --real`'s table, paired differences and sample answers
  (docs/demo_results/real/results.json), and `real-pair`: how its pair was built (the build_info.json files
  copied beside it, docs/demo_results/real/build_info_*.json).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "demo_results"
QUICK = RESULTS / "quick" / "results.json"
RERUN = RESULTS / "quick" / "rerun.json"
RERUN_AMD = RESULTS / "quick" / "rerun_amd.json"  # a run on another CPU (AMD EPYC, AVX2)
REAL = RESULTS / "real" / "results.json"
REAL_BUILD = {part: RESULTS / "real" / f"build_info_{part}.json" for part in ("teacher", "data", "student")}
SWITCH = RESULTS / "ablation_switch.json"
WINDOW = RESULTS / "ablation.json"
ASSETS = Path(__file__).resolve().parent / "assets"
CHECKPOINTS = ("teacher", "student", "student_quick")
DOCUMENTS = tuple(ROOT / p for p in ("README.md", "docs/demo.md", "docs/ablation.md", "docs/demo_real.md"))


def _shown(path: Path) -> str:
    """A path as the documents name it: relative to the repository when inside it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _pct(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _runs_at_a_time(meta: dict) -> str:
    """How the runs shared the machine: results written before the worker pool record torch threads."""
    if "workers" in meta:
        threads = meta.get("threads_per_worker", 1)
        return (f"{meta['workers']} run{'s' if meta['workers'] != 1 else ''} at a time, {threads} torch "
                f"thread{'s' if threads != 1 else ''} each")
    if "torch_threads" in meta:
        return f"one run at a time, {meta['torch_threads']} torch threads"
    return "threads not recorded"


def _setup(meta: dict) -> str:
    """The packages and CPU code paths a run recorded (runs written before they were recorded: empty)."""
    parts = []
    versions = meta.get("versions") or {}
    if versions:
        parts.append(", ".join(f"{name} {versions[name]}" for name in ("torch", "transformers", "accelerate")
                               if versions.get(name)))
    numerics = meta.get("cpu_numerics") or {}
    if numerics.get("aten_capability_in_use"):
        pinned = "pinned" if numerics.get("MKL_CBWR") else "not pinned"
        parts.append(f"CPU code path {numerics['aten_capability_in_use']} ({pinned})")
    return "; ".join(parts)


def _time_split(meta: dict) -> str:
    split = meta.get("time_split")
    if not split:
        return ""
    return (f" (runs: {split['runs_train_seconds']:.0f} s training + {split['runs_eval_seconds']:.0f} s eval "
            f"generation, summed over the runs; {split['other_wall_seconds']:.0f} s loading, start and plots)")


def render_quick(results: dict) -> str:
    from adaswitch.demo.run import format_paired_table, format_table, summarise

    meta = results["meta"]
    budget = meta["budget"]
    head = (f"Written by `python -m adaswitch.demo.tables` from `docs/demo_results/quick/results.json`: "
            f"`make demo` on {meta['date']}, commit {meta['commit']}, {meta['machine']}, "
            f"{_runs_at_a_time(meta)}{'; ' + _setup(meta) if _setup(meta) else ''}, {meta['total_seconds']:.0f} s in "
            f"all{_time_split(meta)}; {len(meta['seeds'])} seeds, "
            f"{budget['steps']} steps x batch {budget['batch_size']} at lr {budget['lr']:g}; starting student "
            f"{_pct(meta['student_after_sft_accuracy'])}% final-answer / "
            f"{_pct(meta['student_after_sft_step_accuracy'])}% per-step accuracy on {meta['num_eval']:,} eval "
            f"problems, teacher {_pct(meta['teacher_accuracy'])}%; one accuracy's sampling noise (binomial std) "
            f"{_pct(meta['eval_binomial_std'])} points.")
    rows = summarise(_runs_of(results))
    return "\n\n".join([head, format_table(rows),
                        "Per-seed differences (points; mean ± std, seeds won, * = 95% paired t-test):",
                        format_paired_table(rows)])


def _runs_of(results: dict) -> list[dict]:
    """The per-run records (so every summary is the current code's); JSON keeps NaN as null."""
    return [{k: math.nan if v is None and k not in ("switch_position_counts", "samples") else v for k, v in r.items()}
            for r in results["runs"]]


def render_real(results: dict, *, samples: bool = True) -> str:
    """`adaswitch demo --real`: set-up line, table, paired differences, and (with `samples`) the answers of the
    first seed's runs to the same eval prompts."""
    from adaswitch.demo.run import format_paired_table, format_table, summarise

    meta = results["meta"]
    budget = meta["budget"]
    head = (f"Written by `python -m adaswitch.demo.tables` from `docs/demo_results/real/results.json`: "
            f"`adaswitch demo --real` on {meta['date']}, commit {meta['commit']}, {meta['machine']}, "
            f"{_runs_at_a_time(meta)}{'; ' + _setup(meta) if _setup(meta) else ''}, {meta['total_seconds']:.0f} s in "
            f"all{_time_split(meta)}; {len(meta['seeds'])} seeds, {budget['steps']} steps x batch "
            f"{budget['batch_size']} at lr {budget['lr']:g}, {budget['max_new_tokens']} new tokens; AdaSwitch window "
            f"{meta['adaswitch']['window']}, K {meta['adaswitch']['k']:g} (max divergence "
            f"{meta['adaswitch']['max_divergence']:g} nats in its second row), SKD top-{meta['skd_top_k']}. "
            f"{meta['num_eval']} eval prompts ({meta['num_eval_checkable']} checkable); teacher "
            f"{_pct(meta['teacher_accuracy'])}% checkable accuracy, NLL of its own answers "
            f"{meta['teacher_own_nll']:.3f}; starting student {_pct(meta['student_after_sft_accuracy'])}%, "
            f"teacher-forced KL {meta['student_start_teacher_kl']:.4f}, teacher NLL of its answers "
            f"{meta['student_start_teacher_nll']:.3f}; one accuracy's sampling noise (binomial std) "
            f"{_pct(meta['eval_binomial_std'])} points.")
    runs = _runs_of(results)
    rows = summarise(runs)
    parts = [head, format_table(rows),
             "Per-seed differences (accuracy in points; teacher NLL gain in nats per token, baseline − method, so + "
             "is better; mean ± std, seeds won, * = 95% paired t-test):",
             format_paired_table(rows)]
    if not samples:
        return "\n\n".join(parts)
    first = min(meta["seeds"])
    by_method = {r["method"]: next(x for x in runs if x["method"] == r["method"] and x["seed"] == first)
                 for r in rows}
    shown = [m for m in SAMPLE_METHODS if by_method.get(m, {}).get("samples")]
    columns = ["prompt", "teacher (reference)", "starting student", *shown]
    answers = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for i, start in enumerate(meta["start_samples"]):
        cells = [start["prompt"], start.get("reference", "-"), start["answer"]]
        cells += [by_method[m]["samples"][i]["answer"] for m in shown]
        answers.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n\n".join([*parts, f"Greedy answers (at most {budget['max_new_tokens']} new tokens) to the same eval "
                        f"prompts after distillation, seed {first}:", "\n".join(answers)])


SAMPLE_METHODS = ("On-policy (GKD)", "SKD", "AdaSwitch", "AdaSwitch + max divergence")


def _cell(text: str, limit: int = 120) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def render_real_pair(infos: dict[str, Path]) -> str:
    """How the real pair was built, from the build_info.json files of its parts."""
    teacher, data, student = (json.loads(Path(infos[p]).read_text()) for p in ("teacher", "data", "student"))
    heal = student["healing"]
    rows = data["rows"]
    return "\n".join([
        "Written by `python -m adaswitch.demo.tables` from `docs/demo_results/real/build_info_*.json` (copies of "
        "the build_info.json files `python -m adaswitch.demo.build_real` writes beside each part).", "",
        "| part | what | time |", "|---|---|---|",
        f"| teacher | {teacher['architecture']}, {teacher['parameters']:,} parameters, {teacher['layers']} layers; "
        f"{teacher['source']}; GGUF sha256 `{teacher['gguf_sha256'][:16]}…`; {teacher['quantization']} | "
        f"{teacher['convert_seconds']:.0f} s |",
        f"| data | {rows['heal']} heal / {rows['train']} train / {rows['eval']} eval prompts; {data['reference']}; "
        f"answers that end with EOS: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in
                                                   data["answers_finished_with_eos"].items())
        + f" | {data['seconds']:.0f} s |",
        f"| student | {len(student['layers_kept'])} of {len(student['block_influence'])} layers kept by block "
        f"influence: {student['layers_kept']}; {student['parameters']:,} parameters; healed {heal['steps']} steps x "
        f"{heal['batch_size']} at lr {heal['lr']:g} (supervised KD on the heal answers), loss "
        f"{heal['loss_first']:.3f} → {heal['loss_last']:.3f} | {student['seconds']:.0f} s |",
        "", f"Built {student['built']} with " + ", ".join(
            f"{k} {v}" for k, v in student["versions"].items() if k in ("torch", "transformers", "gguf") and v) + ".",
    ])


def render_rerun(committed_path: str | Path, rerun_path: str | Path) -> str:
    """The committed run's accuracies next to a rerun's, per method, with their difference (points) and
    each file's commit, machine and date; one line when there is no rerun file."""
    committed_path, rerun_path = Path(committed_path), Path(rerun_path)
    if not rerun_path.exists():
        return (f"No rerun is recorded: `{_shown(rerun_path)}` (the results.json of a second `make demo` "
                "from a fresh clone) does not exist.")
    committed, rerun = (json.loads(p.read_text()) for p in (committed_path, rerun_path))
    theirs = {r["method"]: r for r in rerun["results"]}
    lines = [f"Written by `python -m adaswitch.demo.tables` from `{_shown(committed_path)}` (committed) and "
             f"`{_shown(rerun_path)}` (rerun); accuracy % as mean over seeds, Δ = rerun − committed in points.", ""]
    for label, r in (("committed", committed), ("rerun", rerun)):
        m = r["meta"]
        lines.append(f"* {label}: commit {m.get('commit', '?')}, {m.get('machine', '?')}, {m.get('date', '?')}, "
                     f"{m.get('preset', '?')} preset, seeds {m.get('seeds', '?')}, {_runs_at_a_time(m)}"
                     f"{'; ' + _setup(m) if _setup(m) else ''}"
                     + (f"; {m['total_seconds']:.0f} s in all, load average {m['load_average_1m_at_end']:.2f} at "
                        "the end" if "total_seconds" in m and "load_average_1m_at_end" in m else ""))
    head = ("method", "accuracy % committed", "accuracy % rerun", "Δ accuracy",
            "step accuracy % committed", "step accuracy % rerun", "Δ step accuracy")
    lines += ["", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]

    def delta(a, b):
        if any(v is None or math.isnan(v) for v in (a, b)):
            return "-"
        return f"{100 * (b - a):+.1f}"

    methods = [r["method"] for r in committed["results"]]
    methods += [m for m in theirs if m not in methods]
    mine = {r["method"]: r for r in committed["results"]}
    for name in methods:
        a, b = mine.get(name, {}), theirs.get(name, {})
        cells = [name]
        for key in ("accuracy", "step_accuracy"):
            cells += [_pct(a.get(key)), _pct(b.get(key)), delta(a.get(key), b.get(key))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_switch(results: dict) -> str:
    from adaswitch.demo.ablation import format_switch_table

    return format_switch_table(results["cells"])


def _seeds(seeds: list[int]) -> str:
    return ", ".join(map(str, seeds[:-1])) + f" and {seeds[-1]}" if len(seeds) > 1 else str(seeds[0])


def render_switch_setting(results: dict) -> str:
    """The switching-rule sweep's set-up, from its JSON."""
    meta = results["meta"]
    budget = meta["budget"]
    return (f"Setting (written from `docs/demo_results/ablation_switch.json`): the {meta['preset']} preset "
            f"(docs/demo.md), starting student {meta['student_source']} ({_pct(meta['student_start_accuracy'])}% "
            f"final-answer, {_pct(meta['student_start_step_accuracy'])}% per-step accuracy on the "
            f"{meta['num_eval']:,} eval problems; teacher {_pct(meta['teacher_accuracy'])}%), {budget['steps']} "
            f"steps x {budget['batch_size']} prompts at lr {budget['lr']:g}, seeds {_seeds(meta['seeds'])}, "
            f"AdaSwitch at the shipped L = {meta['adaswitch']['window']}, K = {meta['adaswitch']['k']:g}. Run "
            f"{meta['date']}, commit {meta['commit']}, {meta['machine']}, {_runs_at_a_time(meta)}, "
            f"{meta['total_seconds']:.0f} s for the {len(results['runs'])} runs.")


def render_switch_summary(results: dict) -> str:
    """What the prose about the switching-rule sweep rests on: the default against its controls, what
    passes the paired test, and how far any setting moved the student."""
    from adaswitch.demo.ablation import BASELINE, CONTROLS
    from adaswitch.demo.stats import format_paired

    cells = {c["name"]: c for c in results["cells"]}
    base, meta = cells[BASELINE], results["meta"]
    lines = ["Written from `docs/demo_results/ablation_switch.json` (points; mean ± std over seeds of the "
             "per-seed difference, seeds above the default, * = 95% paired t-test):", ""]
    lines.append(f"* {BASELINE}: {_pct(base['accuracy'])} ± {_pct(base['accuracy_std'])}% "
                 f"final-answer, {_pct(base['step_accuracy'])} ± {_pct(base['step_accuracy_std'])}% per-step "
                 "accuracy;")
    for name in CONTROLS:
        if name in cells:
            vs = cells[name]["vs_default"]
            lines.append(f"* {name} − default: {format_paired(vs['accuracy'])} final-answer, "
                         f"{format_paired(vs['step_accuracy'])} per-step;")
    significant = [c["name"] for c in results["cells"] if c["name"] != BASELINE
                   and any(c["vs_default"][key]["significant"] for key in ("accuracy", "step_accuracy"))]
    lines.append(f"* settings whose difference from the default passes the paired test: "
                 f"{', '.join(significant) if significant else 'none'};")
    acc = [c["accuracy"] for c in results["cells"]]
    step = [c["step_accuracy"] for c in results["cells"]]
    lines.append(f"* after {meta['budget']['steps']} steps from {_pct(meta['student_start_accuracy'])}% final-answer "
                 f"/ {_pct(meta['student_start_step_accuracy'])}% per-step accuracy at start, the settings end at "
                 f"{_pct(min(acc))}-{_pct(max(acc))}% final-answer and {_pct(min(step))}-{_pct(max(step))}% per-step "
                 "accuracy.")
    return "\n".join(lines)


def render_window(results: dict) -> str:
    """The window x K sweep's set-up and table, best cell in bold."""
    from adaswitch.demo.ablation import rank
    from adaswitch.demo.presets import adaswitch_defaults
    from adaswitch.demo.stats import format_paired, paired

    meta, cells = results["meta"], results["cells"]
    budget = meta["budget"]
    best = rank(cells)[0]
    runs = sum(len(c["accuracies"]) for c in cells)
    head = (f"Setting (written from `docs/demo_results/ablation.json`): the {meta['preset']} preset of that "
            f"run: the shipped Qwen2 teacher ({_pct(meta['teacher_accuracy'])}% on these {meta['num_eval']} eval "
            f"problems), the Llama student from {meta['student_source']} "
            f"({_pct(meta['student_after_sft_accuracy'])}%), "
            f"AdaSwitch distillation for {budget['steps']} steps x {budget['batch_size']} prompts at lr "
            f"{budget['lr']:g}, seeds {_seeds(meta['seeds'])}, greedy accuracy on the first {meta['num_eval']} eval "
            f"problems. The file records commit {meta['commit']} at the end of the run, {meta['date']}, "
            f"{meta['machine']}, {_runs_at_a_time(meta)}, {meta['total_seconds']:.0f} s for the {runs} runs.")
    # The shipped default's cell, when the sweep has it: every cell's per-seed difference from it.
    window, k = adaswitch_defaults()
    default = next((c for c in cells if c["window"] == window and c["k"] == k), None)
    versus = f"Δ vs L = {window}, K = {k:g} (paired)"
    columns = ("L", "K", "accuracy % per seed", "mean ± std", versus, "teacher KL", "switch rate",
               "mean switch pos", "s / step")
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    significant = []
    for c in cells:
        is_best = c is best
        mean = f"{_pct(c['accuracy'])} ± {_pct(c['accuracy_std'])}"
        vs = None
        if default is not None and c is not default:
            vs = paired(dict(zip(meta["seeds"], c["accuracies"])), dict(zip(meta["seeds"], default["accuracies"])))
            if vs["significant"]:
                significant.append(f"L = {c['window']}, K = {c['k']:g}")
        lines.append("| " + " | ".join([
            str(c["window"]),
            f"**{c['k']:g}**" if is_best else f"{c['k']:g}",
            ", ".join(_pct(a) for a in c["accuracies"]),
            f"**{mean}**" if is_best else mean,
            "default" if c is default else format_paired(vs),
            f"{c['teacher_kl']:.4f}",
            f"{c['switch_rate']:.2f}",
            f"{c['mean_switch_position']:.1f}",
            f"{c['seconds_per_step']:.2f}",
        ]) + " |")
    tail = (f"**Best by the rule: L = {best['window']}, K = {best['k']:g}** "
            f"({_pct(best['accuracy'])}% mean accuracy).")
    if default is not None:
        tail += (f" Cells whose accuracy differs from the shipped default L = {window}, K = {k:g} by more than "
                 f"the seed noise (95% paired t-test over the seeds; Δ in points, seeds above the default): "
                 f"{', '.join(significant) if significant else 'none'}.")
    return "\n\n".join([head, "\n".join(lines), tail])


def render_checkpoints(asset_dirs: dict[str, Path]) -> str:
    """The shipped checkpoints as their build_info.json records them."""
    columns = ("checkpoint", "architecture", "parameters", "safetensors MB", "SFT steps x batch, lr",
               "greedy accuracy", "build time", "built")
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for name, path in asset_dirs.items():
        info = json.loads((Path(path) / "build_info.json").read_text())
        lines.append("| " + " | ".join([
            f"`assets/{name}`",
            info["architecture"],
            f"{info['parameters']:,}",
            f"{info['checkpoint_bytes'] / 1e6:.1f}",
            f"{info['train_steps']:,} x {info['batch_size']}, {info['lr']:g}",
            f"{_pct(info['eval_accuracy'])}% of {info['eval_examples']:,}",
            f"{info['train_seconds']:.0f} s ({info['machine']})",
            info["built"],
        ]) + " |")
    return "\n".join(lines)


def _blocks() -> dict:
    quick, switch, window = (json.loads(p.read_text()) for p in (QUICK, SWITCH, WINDOW))
    real = {}
    if REAL.exists() and all(p.exists() for p in REAL_BUILD.values()):
        results = json.loads(REAL.read_text())
        real = {"demo-real": render_real(results), "demo-real-summary": render_real(results, samples=False),
                "real-pair": render_real_pair(REAL_BUILD)}
    return {
        **real,
        "demo-quick": render_quick(quick),
        "demo-rerun": render_rerun(QUICK, RERUN),
        "demo-rerun-amd": render_rerun(QUICK, RERUN_AMD),
        "switch-ablation": render_switch(switch),
        "switch-ablation-setting": render_switch_setting(switch),
        "switch-summary": render_switch_summary(switch),
        "window-ablation": render_window(window),
        "demo-checkpoints": render_checkpoints({name: ASSETS / name for name in CHECKPOINTS}),
    }


def _replace(text: str, name: str, body: str) -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    if begin not in text:
        return text
    return text[: text.index(begin) + len(begin)] + "\n" + body + "\n" + text[text.index(end):]


def updated(text: str, blocks: dict | None = None) -> str:
    """`text` with every block it marks rewritten."""
    for name, body in (blocks or _blocks()).items():
        text = _replace(text, name, body)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a document's block is stale")
    args = parser.parse_args(argv)
    blocks = _blocks()
    stale = [doc for doc in DOCUMENTS if updated(doc.read_text(), blocks) != doc.read_text()]
    if args.check:
        for doc in stale:
            print(f"{doc.relative_to(ROOT)}: a demo block differs from the committed results; "
                  "run python -m adaswitch.demo.tables")
        return 1 if stale else 0
    from adaswitch.train.atomic import write_file

    for doc in stale:
        write_file(doc, updated(doc.read_text(), blocks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
