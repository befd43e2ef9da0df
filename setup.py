"""adaswitch: kernels and an engine for adaptive-switching knowledge distillation.

`kernels/` is shipped as `adaswitch.kernels` (package mapping below). The optional native CPU op
(`adaswitch._C`) is built by CMake against the torch already installed; if torch or a compiler is
missing the build is skipped and the package falls back to PyTorch.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Builds `adaswitch._C` with CMakeLists.txt; never fails the install (the op is optional)."""

    def build_extension(self, ext):
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        try:
            import torch  # noqa: F401  (must be the torch of the target environment)

            prefix = subprocess.check_output(
                [sys.executable, "-c", "import torch.utils; print(torch.utils.cmake_prefix_path)"], text=True
            ).strip()
            build_dir = Path(self.build_temp).resolve() / "cmake"
            build_dir.mkdir(parents=True, exist_ok=True)
            subprocess.check_call(
                [
                    "cmake", str(ROOT), f"-DCMAKE_PREFIX_PATH={prefix}", f"-DPython_EXECUTABLE={sys.executable}",
                    "-DCMAKE_BUILD_TYPE=Release", f"-DADASWITCH_OUTPUT_DIR={build_dir / 'out'}",
                ],
                cwd=build_dir,
            )
            subprocess.check_call(["cmake", "--build", ".", "-j", str(os.cpu_count() or 2)], cwd=build_dir)
            built = next((build_dir / "out").glob("_C*"))
            target.parent.mkdir(parents=True, exist_ok=True)
            staged = target.with_name(target.name + ".tmp")
            shutil.copyfile(built, staged)
            os.replace(staged, target)  # atomic: a process that has the old library loaded keeps it intact
        except Exception as exc:  # the pure-PyTorch path still works
            print(f"adaswitch: native op not built ({exc}); using the PyTorch fallback", file=sys.stderr)


setup(
    name="adaswitch",
    version="0.1.0",
    description="Adaptive-switching knowledge distillation: fused Triton/native kernels and a mixed decoding engine",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["adaswitch", "adaswitch.*"]) + ["adaswitch.kernels", "adaswitch.kernels.triton"],
    package_dir={"adaswitch.kernels": "kernels"},
    package_data={"adaswitch.kernels": ["csrc/*.cpp", "csrc/*.h"], "adaswitch.demo": ["assets/*", "assets/**/*"]},
    ext_modules=[CMakeExtension("adaswitch._C")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.56",
        "accelerate>=1.0",
        "datasets>=3.0",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "tqdm",
        "matplotlib",
        "pyyaml",
        "numpy",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "ruff>=0.5"],
        "compare": ["liger-kernel", "trl"],
        "flash": ["flash-attn"],
        "deepspeed": ["deepspeed>=0.19"],
    },
    entry_points={"console_scripts": ["adaswitch=adaswitch.cli:main"]},
)
