"""The versions of the packages a result depends on, recorded in every results file (demo, benchmarks), so a
number can be traced to the install that produced it (`make` installs them from requirements/lock.txt)."""

from __future__ import annotations

import importlib.metadata

PACKAGES = ("torch", "transformers", "accelerate", "datasets", "tokenizers", "safetensors", "numpy", "triton",
            "kernels", "trl", "liger-kernel")


def package_versions(packages=PACKAGES) -> dict[str, str | None]:
    """{distribution name: installed version, or None when it is not installed}."""
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions
