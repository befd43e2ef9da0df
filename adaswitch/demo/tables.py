"""The demo's tables in README.md and docs/demo.md, written from the committed results (never typed).

    python -m adaswitch.demo.tables          # rewrite the blocks from docs/demo_results/
    python -m adaswitch.demo.tables --check  # exit 1 when a block differs from what the JSON renders

Blocks sit between `<!-- NAME:begin -->` and `<!-- NAME:end -->` markers: `demo-quick` (the quick preset's
table and paired differences, from docs/demo_results/quick/results.json) and `switch-ablation` (the
switching-rule sweep, from docs/demo_results/ablation_switch.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUICK = ROOT / "docs" / "demo_results" / "quick" / "results.json"
SWITCH = ROOT / "docs" / "demo_results" / "ablation_switch.json"
DOCUMENTS = (ROOT / "README.md", ROOT / "docs" / "demo.md")


def render_quick(results: dict) -> str:
    from adaswitch.demo.run import format_paired_table, format_table

    meta = results["meta"]
    budget = meta["budget"]
    head = (f"Written by `python -m adaswitch.demo.tables` from `docs/demo_results/quick/results.json`: "
            f"`make demo` on {meta['date']}, commit {meta['commit']}, {meta['machine']}, "
            f"{meta['torch_threads']} torch threads, {meta['total_seconds']:.0f} s in all; {len(meta['seeds'])} seeds, "
            f"{budget['steps']} steps x batch {budget['batch_size']}; starting student "
            f"{100 * meta['student_after_sft_accuracy']:.1f}% final-answer / "
            f"{100 * meta['student_after_sft_step_accuracy']:.1f}% per-step accuracy, teacher "
            f"{100 * meta['teacher_accuracy']:.1f}%; one accuracy's sampling noise (binomial std) "
            f"{100 * meta['eval_binomial_std']:.1f} points.")
    rows = results["results"]
    return "\n\n".join([head, format_table(rows),
                        "Per-seed differences (points; mean ± std, seeds won, * = 95% paired t-test):",
                        format_paired_table(rows)])


def render_switch(results: dict) -> str:
    from adaswitch.demo.ablation import format_switch_table

    return format_switch_table(results["cells"])


BLOCKS = {"demo-quick": (QUICK, render_quick), "switch-ablation": (SWITCH, render_switch)}


def _blocks() -> dict:
    return {name: render(json.loads(path.read_text())) for name, (path, render) in BLOCKS.items()}


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
            print(f"{doc.relative_to(ROOT)}: a demo table differs from the committed JSON; "
                  "run python -m adaswitch.demo.tables")
        return 1 if stale else 0
    for doc in stale:
        doc.write_text(updated(doc.read_text(), blocks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
