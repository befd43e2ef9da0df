"""What every benchmark result records about where it ran: CPU model, commit, date, load, package versions."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    """lscpu's model name (platform.processor() where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown"


def git_commit() -> str:
    """The repository's short HEAD ("unknown" outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def versions_text(packages=None) -> str:
    """The installed versions of the packages a result depends on (default: adaswitch.versions.PACKAGES), as
    one line."""
    from adaswitch.versions import PACKAGES, package_versions

    versions = package_versions(packages or PACKAGES)
    return ", ".join(f"{name} {version}" for name, version in versions.items() if version is not None)
