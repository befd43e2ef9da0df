"""The README block a benchmarks/*_table.py script writes: the text between its `begin` and `end` markers,
rendered from the committed results (never typed), and the script's command line (`--check` exits 1 when the
README's block differs from the rendering)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def replace_block(text: str, begin: str, end: str, body: str) -> str:
    """`text` with what stands between the markers `begin` and `end` replaced by `body`."""
    if begin not in text or end not in text:
        raise ValueError(f"README.md has no {begin} ... {end} block")
    return text[: text.index(begin) + len(begin)] + "\n" + body + "\n" + text[text.index(end):]


def main(argv, description: str, readme: Path, updated: Callable[[str], str], stale: str) -> int:
    """Rewrite `readme` as `updated` gives it; with --check only compare, printing `stale` when it differs."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true", help="exit 1 when the README block is stale")
    args = parser.parse_args(argv)
    text = readme.read_text()
    if args.check:
        if updated(text) != text:
            print(stale)
            return 1
        return 0
    readme.write_text(updated(text))
    return 0
