"""Checks requirements/lock.txt against setup.py and against this environment.

`python requirements/check_lock.py`: every requirement of setup.py (install_requires and the extras `make`
installs) is in the lock at a version it allows, so a dependency added to setup.py without `make lock` is
caught. `--installed`: this environment has exactly the locked version of every locked package (run by
`make` after installing .venv, so a fresh machine is known to have what CI had). Exit 1 with one line per
difference."""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
EXTRAS = ("dev", "compare", "deepspeed", "real")  # the Makefile's EXTRAS


def locked(path: Path = LOCK) -> dict[str, str]:
    """{canonical name: version} from the lock's `name==version` lines."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def setup_requirements(extras=EXTRAS) -> list[Requirement]:
    """install_requires and the given extras, read from setup.py's setup(...) call without running it."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    wanted = ("install_requires", "extras_require")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in wanted}
    lines = list(kwargs["install_requires"]) + [r for e in extras for r in kwargs["extras_require"][e]]
    return [Requirement(line) for line in lines]


def setup_problems(pins: dict[str, str]) -> list[str]:
    problems = []
    for req in setup_requirements():
        if req.marker is not None and not req.marker.evaluate():
            continue
        version = pins.get(canonicalize_name(req.name))
        if version is None:
            problems.append(f"{req.name}: required by setup.py ({req}) but not in {LOCK.name}; run `make lock`")
        elif not req.specifier.contains(Version(version), prereleases=True):
            problems.append(f"{req.name}: {LOCK.name} has {version}, setup.py asks for {req}; run `make lock`")
    return problems


def installed_problems(pins: dict[str, str]) -> list[str]:
    problems = []
    for name, version in sorted(pins.items()):
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{name}: locked at {version}, not installed")
            continue
        if Version(have).public != Version(version).public:  # torch's local label (+cpu) is not locked
            problems.append(f"{name}: locked at {version}, installed {have}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--installed", action="store_true", help="also compare this environment with the lock")
    args = parser.parse_args(argv)
    pins = locked()
    problems = setup_problems(pins) + (installed_problems(pins) if args.installed else [])
    for problem in problems:
        print(f"check_lock: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
