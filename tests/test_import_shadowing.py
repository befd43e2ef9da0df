"""The repository's top-level `kernels/` directory never shadows Hugging Face's `kernels` package.

transformers (5.25 and later) imports `kernels` while loading any model config; every process whose path
starts at the repository root (`python -m pytest`, `python -c`, a REPL, `torchrun -m adaswitch.cli`) must find
the installed package, not the project's directory. The project's kernels stay importable as
`adaswitch.kernels`.
"""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = (
    "import importlib.util, kernels; "
    "from kernels import CUDAProperties; "
    "print(kernels.__file__); print(importlib.util.find_spec('kernels').origin)"
)


def _installed_kernels() -> str:
    try:
        return importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("Hugging Face's `kernels` package must be installed for this test (it is in the dev extras)")


def _run(args, extra_path=None, **kwargs):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONSAFEPATH")}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)  # after the root, which -m puts first
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, **kwargs)


def _assert_installed_package(result):
    assert result.returncode == 0, result.stderr[-2000:]
    for line in result.stdout.split():
        path = Path(line).resolve()
        assert ROOT / "kernels" not in path.parents, f"`kernels` resolved to the project's directory: {path}"
        assert "site-packages" in path.parts or "dist-packages" in path.parts, path


def test_no_regular_package_at_the_top_level():
    assert not (ROOT / "kernels" / "__init__.py").exists(), (
        "kernels/__init__.py makes the directory a regular package that shadows Hugging Face's `kernels`"
    )


@pytest.mark.parametrize("mode", ["-c", "stdin"])
def test_repository_root_finds_the_installed_kernels(mode):
    _installed_kernels()
    if mode == "-c":
        result = _run([sys.executable, "-c", PROBE])
    else:  # what a REPL does: '' (the current directory) first on sys.path
        result = _run([sys.executable, "-"], input=PROBE.replace("; ", "\n"))
    _assert_installed_package(result)


def test_repository_root_module_run_finds_the_installed_kernels(tmp_path):
    """`python -m ...` from the root (as `python -m pytest` and `torchrun -m` run) puts the root first on sys.path."""
    _installed_kernels()
    (tmp_path / "probe_kernels.py").write_text(PROBE.replace("; ", "\n"))
    result = _run([sys.executable, "-m", "probe_kernels"], extra_path=tmp_path)
    _assert_installed_package(result)


def test_transformers_loads_a_config_from_the_root():
    """What failed at collection: transformers' hub-kernels integration imported the project's directory."""
    _installed_kernels()
    code = (
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "import transformers.integrations.hub_kernels as hk, kernels\n"
        "m = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,"
        " num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))\n"
        "print(kernels.__file__)\n"
    )
    _assert_installed_package(_run([sys.executable, "-c", code]))


def test_project_kernels_import_as_adaswitch_kernels():
    code = (
        "import adaswitch.kernels, adaswitch.kernels.triton.step as s, adaswitch.kernels.triton.launch as l\n"
        "print(s.__file__); print(l.__file__)\n"
    )
    result = _run([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr[-2000:]
    files = [Path(line) for line in result.stdout.split()]
    assert [f.name for f in files] == ["step.py", "launch.py"]
    assert all(f.parent.name == "triton" for f in files)
