"""adaswitch: kernels and an engine for adaptive-switching knowledge distillation.

`kernels/` is shipped as `adaswitch.kernels` (package mapping below; adaswitch/kernels/__init__.py says why the
top-level directory has no `__init__.py`). The optional native CPU op
(`adaswitch._C_<cpu capability>`) is built by CMake against the torch already installed; if torch or a compiler is
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
    """Builds the native op with CMakeLists.txt, once per CPU capability: `adaswitch._C_default`, and on x86-64
    `_C_avx2` and `_C_avx512` (adaswitch/_backend.py imports the widest one the CPU supports). They go next to
    the extension's own path (which stays unbuilt), each replaced atomically. Never fails the install (the op is
    optional): a variant that does not build is left out, and without any the package falls back to PyTorch."""

    def build_extension(self, ext):
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        self._native = getattr(self, "_native", {})
        try:
            import torch  # noqa: F401  (must be the torch of the target environment)

            prefix = subprocess.check_output(
                [sys.executable, "-c", "import torch.utils; print(torch.utils.cmake_prefix_path)"], text=True
            ).strip()
            build_dir = Path(self.build_temp).resolve() / "cmake"
            build_dir.mkdir(parents=True, exist_ok=True)
            out = build_dir / "out"
            subprocess.check_call(
                [
                    "cmake", str(ROOT), f"-DCMAKE_PREFIX_PATH={prefix}", f"-DPython_EXECUTABLE={sys.executable}",
                    "-DCMAKE_BUILD_TYPE=Release", f"-DADASWITCH_OUTPUT_DIR={out}",
                ],
                cwd=build_dir,
            )
            variants = (build_dir / "adaswitch_variants.txt").read_text().split()
            for old in out.glob("_C*"):  # relinked below: a variant that fails now must not leave an older build
                old.unlink()
            jobs = ["-j", str(os.cpu_count() or 2)]
            if subprocess.call(["cmake", "--build", ".", *jobs], cwd=build_dir) != 0:
                for variant in variants:  # build what builds (an assembler without AVX-512, say)
                    if not list(out.glob(f"_C_{variant}.*")):
                        subprocess.call(["cmake", "--build", ".", "--target", f"_C_{variant}", *jobs], cwd=build_dir)
            built = {v: next(iter(out.glob(f"_C_{v}.*")), None) for v in variants}
            built = {v: path for v, path in built.items() if path is not None}
            if not built:
                raise RuntimeError("no variant built")
            if len(built) < len(variants):
                print(f"adaswitch: native variants {sorted(set(variants) - set(built))} not built", file=sys.stderr)
            self._native[ext.name] = self._install_variants(ext, {v: str(p) for v, p in built.items()}, target)
        except Exception as exc:  # the pure-PyTorch path still works
            print(f"adaswitch: native op not built ({exc}); using the PyTorch fallback", file=sys.stderr)

    @staticmethod
    def _variant_path(ext, module_path: Path, variant: str) -> Path:
        """`adaswitch/_C_<variant><suffix>` beside the extension's own module path `adaswitch/_C<suffix>`."""
        base = ext.name.rpartition(".")[2]
        return module_path.with_name(f"{base}_{variant}{module_path.name[len(base):]}")

    def _install_variants(self, ext, sources: dict, module_path: Path) -> dict:
        """Copies {variant: file} beside `module_path`, each atomically (a process that has the old library
        loaded keeps it intact); removes the variants not in `sources` (an older build would be loaded before the
        fresh narrower one) and the single module of the old layout. Returns {variant: installed path}."""
        module_path.parent.mkdir(parents=True, exist_ok=True)
        installed = {}
        for variant, source in sources.items():
            dest = self._variant_path(ext, module_path, variant)
            staged = dest.with_name(dest.name + ".tmp")
            shutil.copyfile(source, staged)
            shutil.copymode(source, staged)
            os.replace(staged, dest)
            installed[variant] = str(dest)
        stale = [self._variant_path(ext, module_path, v) for v in ("default", "avx2", "avx512") if v not in sources]
        for path in [*stale, module_path]:
            if path.exists():
                path.unlink()
        return installed

    def copy_extensions_to_source(self):
        """--inplace / editable: the variants this run built, from the build directory into the source tree."""
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            if self._native_outputs(ext):
                inplace_file, _ = self._get_inplace_equivalent(build_py, ext)
                try:
                    self._install_variants(ext, self._native_outputs(ext), Path(inplace_file).resolve())
                except OSError as exc:
                    print(f"adaswitch: native op not installed in place ({exc})", file=sys.stderr)

    def _native_outputs(self, ext) -> dict:
        return getattr(self, "_native", {}).get(ext.name, {})

    def get_outputs(self):
        if self.inplace:
            return list(self.get_output_mapping())
        return sorted(p for ext in self.extensions for p in self._native_outputs(ext).values())

    def _get_output_mapping(self):
        if not self.inplace:
            return
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, _ = self._get_inplace_equivalent(build_py, ext)
            for variant, path in self._native_outputs(ext).items():
                yield path, str(self._variant_path(ext, Path(inplace_file).resolve(), variant))

setup(
    name="adaswitch",
    version="0.1.0",
    description="Adaptive-switching knowledge distillation: fused Triton/native kernels and a mixed decoding engine",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # adaswitch/kernels/__init__.py is the package; its subpackages come from the top-level kernels/ (which
    # must stay without an __init__.py, see that file's docstring).
    packages=find_packages(include=["adaswitch", "adaswitch.*"])
    + ["adaswitch.kernels.triton", "adaswitch.kernels.csrc"],
    package_dir={"adaswitch.kernels.triton": "kernels/triton", "adaswitch.kernels.csrc": "kernels/csrc"},
    package_data={"adaswitch.kernels.csrc": ["*.cpp", "*.h"], "adaswitch.demo": ["assets/*", "assets/**/*"]},
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
        # kernels: Hugging Face's package, which transformers imports; the tests check that the repository's own
        # kernels/ directory never shadows it
        "dev": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "ruff>=0.5", "kernels"],
        "compare": ["liger-kernel", "trl"],
        "flash": ["flash-attn"],
        "deepspeed": ["deepspeed>=0.19"],
        # the real pair (adaswitch.demo.build_real): transformers' GGUF loader reads the teacher with it
        "real": ["gguf>=0.10"],
    },
    entry_points={"console_scripts": ["adaswitch=adaswitch.cli:main"]},
)
