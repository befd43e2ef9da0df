"""Launching a tests/scripts/*_distill.py run under torchrun (or alone) and reading what its ranks wrote.

Each script writes OUT/rank{R}.json (losses, responses by dataset index, ...) and OUT/weights_rank0.pt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def launch(script: Path, out: Path, *extra: str, world: int = 2, torchrun: bool | None = None):
    """One run: `world` processes under torchrun --standalone (the launcher picks a free port), or, by
    default for world=1, the script alone. Output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launcher = [sys.executable]
    if world > 1 if torchrun is None else torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    return subprocess.run(
        launcher + [str(script), str(out), *extra], env=env, capture_output=True, text=True, timeout=600
    )


def run(script: Path, out: Path, *extra: str, world: int = 2, torchrun: bool | None = None):
    """`launch`, retried once when the port torchrun picked was taken meanwhile (busy host); fails the test
    with the ranks' error lines otherwise. Returns (the ranks' logs, rank 0's weights)."""
    proc = launch(script, out, *extra, world=world, torchrun=torchrun)
    if proc.returncode != 0 and "address already in use" in proc.stderr.lower():
        proc = launch(script, out, *extra, world=world, torchrun=torchrun)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("[rank") or "Error" in line]
    assert proc.returncode == 0, "\n".join(errors[-40:]) + "\n---- stderr tail ----\n" + proc.stderr[-3000:]
    logs = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    return logs, torch.load(out / "weights_rank0.pt")


def merged_responses(logs: list[dict]) -> dict:
    """{step: {dataset index: response ids}} over all ranks."""
    merged: dict = {}
    for log in logs:
        for step, rows in log["responses"].items():
            merged.setdefault(step, {}).update(rows)
    return merged
