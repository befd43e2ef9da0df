"""Which implementation runs an op: Triton, the native CPU op (adaswitch._C_*) or the PyTorch reference.

Pick explicitly with an op's `impl=` argument or the ADASWITCH_IMPL environment variable
("auto", "triton", "native", "torch"). "auto": Triton for CUDA tensors, native for CPU tensors when
built, else PyTorch. Triton on CPU tensors needs TRITON_INTERPRET=1 set before adaswitch is imported.

The native op is built once per CPU capability (CMakeLists.txt): `adaswitch._C_default` (the plain
baseline), `_C_avx2` and `_C_avx512` (x86-64). `native_ops()` imports exactly one of them, the widest that
`torch.backends.cpu.get_cpu_capability()` reports (so ATEN_CPU_CAPABILITY=default / avx2 forces a narrower
one, as it does for torch's own kernels), falling back to a narrower one when that one is absent or fails to
load. Every variant registers the same torch.ops.adaswitch.* ops, so a process never loads two.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

IMPLS = ("auto", "triton", "native", "torch")
NATIVE_VARIANTS = ("avx512", "avx2", "default")  # widest first
_CAPABILITY_VARIANT = {"AVX512": "avx512", "AVX2": "avx2"}  # anything else (DEFAULT, NO AVX, VSX, SVE...): default
_VARIANT_FEATURES = {  # what each variant's compiler flags assume (CMakeLists.txt), as torch.cpu names it
    "avx512": ("avx512_f", "avx512_bw", "avx512_vl", "avx512_dq", "fma3"),
    "avx2": ("avx2", "fma3", "f16c"),
    "default": (),
}


def _cpu_runs(variant: str) -> bool:
    """Whether this CPU has the instructions of `variant`. torch reports what ATEN_CPU_CAPABILITY asks for
    even where the CPU lacks it (ATEN_CPU_CAPABILITY=avx512 on an AVX2 machine), and a wider variant would die
    on SIGILL while it loads, so the CPU's own features are checked too."""
    if not _VARIANT_FEATURES[variant]:
        return True
    features = getattr(torch.cpu, "get_capabilities", None)
    if features is not None:
        have = features()
        return all(have.get(name, False) for name in _VARIANT_FEATURES[variant])
    probe = getattr(torch.cpu, f"_is_{variant}_supported", None)  # older torch
    return bool(probe()) if probe is not None else True


def native_candidates() -> tuple[str, ...]:
    """The native variants this process may load, widest first: the one torch's CPU capability names (or the
    widest narrower one this CPU runs), then the narrower ones."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # a torch without the query: only the baseline is safe
        capability = "DEFAULT"
    first = _CAPABILITY_VARIANT.get(str(capability).upper(), "default")
    return tuple(v for v in NATIVE_VARIANTS[NATIVE_VARIANTS.index(first):] if _cpu_runs(v))


@functools.cache
def _load_native() -> str | None:
    for variant in native_candidates():
        try:
            importlib.import_module(f"adaswitch._C_{variant}")  # registers torch.ops.adaswitch.*
        except ImportError:  # not built, or built against another torch: try the next narrower one
            continue
        return variant
    return None


@functools.cache
def native_ops():
    """torch.ops.adaswitch once a native variant (`adaswitch._C_*`) is loaded, or None when none is built."""
    return torch.ops.adaswitch if _load_native() is not None else None


def native_capability() -> str | None:
    """Which native variant this process loaded: "avx512", "avx2", "default", or None (none built)."""
    return _load_native()


def native_available() -> bool:
    return native_ops() is not None


@functools.cache
def triton_interpreted() -> bool:
    try:
        from triton import knobs
    except ImportError:
        return False
    return bool(knobs.runtime.interpret)


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_available(device: torch.device) -> bool:
    if not triton_importable():
        return False
    if device.type == "cuda":
        return not triton_interpreted()
    return device.type == "cpu" and triton_interpreted()


def resolve_impl(impl: str | None, device: torch.device, *, native_op: str | None = None) -> str:
    """Returns "triton", "native" or "torch" for tensors on `device`; a clear error if impossible."""
    impl = impl or os.environ.get("ADASWITCH_IMPL", "auto")
    if impl == "reference":
        impl = "torch"
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    has_native = native_available() and (native_op is None or hasattr(native_ops(), native_op))
    if impl == "auto":
        if device.type == "cuda" and triton_available(device):
            return "triton"
        if device.type == "cpu" and has_native:
            return "native"
        return "torch"
    if impl == "triton" and not triton_available(device):
        hint = ""
        if device.type == "cpu":
            hint = " (set TRITON_INTERPRET=1 before importing adaswitch to run Triton on CPU)"
        raise ValueError(f"impl='triton' is not available for {device.type} tensors{hint}")
    if impl == "native":
        if device.type != "cpu":
            raise ValueError(f"impl='native' runs on CPU tensors only, got {device.type} tensors")
        if not has_native:
            raise ValueError("impl='native' requested but the native op is not built (run `make native`)")
    return impl
