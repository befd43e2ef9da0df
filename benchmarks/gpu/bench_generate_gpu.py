"""adaswitch.generate on a lent GPU: the CPU benchmark's comparison (naive loop, transformers generate with
the student and with the teacher, the engine in step and lookahead mode, early / late / never switch)
plus the engine with CUDA graphs, on CUDA in bfloat16. Writes benchmarks/results/generate_gpu.{md,csv}
(and copies them to $OUT when set, for the device runner).

    python benchmarks/gpu/bench_generate_gpu.py [--new-tokens 128] [--batch 8] [--sampling greedy|sample]
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_generate  # noqa: E402


def main(argv=None) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("bench_generate_gpu.py needs a CUDA device")
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = {"--device": "cuda", "--dtype": "bfloat16", "--out": "generate_gpu"}
    for flag, value in defaults.items():
        if flag not in argv:
            argv += [flag, value]
    if "--cuda-graph" not in argv:
        argv.append("--cuda-graph")
    bench_generate.main(argv)
    out = os.environ.get("OUT")
    if out:
        stem = argv[argv.index("--out") + 1]
        for suffix in (".md", ".csv"):
            shutil.copy(bench_generate.RESULTS / f"{stem}{suffix}", Path(out) / f"{stem}{suffix}")


if __name__ == "__main__":
    main()
