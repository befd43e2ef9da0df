"""requirements/lock.txt covers setup.py: every requirement `make` installs is locked at a version setup.py
allows (a dependency added without `make lock` fails here), and the checker sees a stale lock."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "requirements"))

import check_lock  # noqa: E402


def test_lock_covers_setup_py():
    result = subprocess.run([sys.executable, str(ROOT / "requirements" / "check_lock.py")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_lock_pins_exact_versions_of_the_core_stack():
    pins = check_lock.locked()
    for name in ("torch", "transformers", "accelerate", "datasets", "tokenizers", "kernels", "pip", "setuptools"):
        assert name in pins and pins[name][0].isdigit(), name


def test_a_stale_lock_is_reported():
    pins = dict(check_lock.locked())
    pins["transformers"] = "4.0.0"  # below setup.py's transformers>=4.56
    del pins["tqdm"]
    problems = check_lock.setup_problems(pins)
    assert any(p.startswith("transformers: ") and "make lock" in p for p in problems), problems
    assert any(p.startswith("tqdm: ") for p in problems), problems


def test_an_environment_off_the_lock_is_reported():
    pins = {"torch": "0.0.1", "no-such-package-adaswitch": "1.0"}
    problems = check_lock.installed_problems(pins)
    assert any(p.startswith("torch: locked at 0.0.1, installed ") for p in problems), problems
    assert "no-such-package-adaswitch: locked at 1.0, not installed" in problems
