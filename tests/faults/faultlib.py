"""Helpers of the fault suite: the command run in-process, one-line errors, snapshots of files on disk."""

from __future__ import annotations

import hashlib
from pathlib import Path

from adaswitch import cli

# The options of a one-step run on the tiny models (a checkpoint at every step).
FAST = ["--max-steps", "1", "--per-device-train-batch-size", "2", "--max-new-tokens", "4", "--use-cpu",
        "--logging-steps", "1", "--save-steps", "1", "--set", "disable_tqdm=true"]


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """`adaswitch ARGV` in this process: (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def distill_argv(files, out, *extra) -> list:
    return ["distill", "--teacher", files["teacher"], "--student", files["student"], "--train", files["train"],
            "--output-dir", out, *FAST, *extra]


def one_line_error(code: int, err: str, *fragments) -> str:
    """Asserts exit code 2 and a last stderr line naming every fragment; returns that line."""
    assert code == 2, err[-3000:]
    assert "Traceback" not in err and "internal error" not in err, err[-3000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("adaswitch"), err[-3000:]
    for fragment in fragments:
        assert fragment in line, line
    return line


def snapshot(path) -> dict:
    """{relative path: (sha256, mode)} of every file under `path` (or of the file itself)."""
    path = Path(path)
    if path.is_file():
        return {path.name: (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mode)}
    return {
        str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }
