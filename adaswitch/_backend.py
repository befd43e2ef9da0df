"""Which implementation runs an op: Triton, the native CPU op (adaswitch._C) or the PyTorch reference.

Pick explicitly with an op's `impl=` argument or the ADASWITCH_IMPL environment variable
("auto", "triton", "native", "torch"). "auto": Triton for CUDA tensors, native for CPU tensors when
built, else PyTorch. Triton on CPU tensors needs TRITON_INTERPRET=1 set before adaswitch is imported.
"""

from __future__ import annotations

import functools
import os

import torch

IMPLS = ("auto", "triton", "native", "torch")


@functools.cache
def native_ops():
    """torch.ops.adaswitch once `adaswitch._C` is loaded, or None when the native build is absent."""
    try:
        import adaswitch._C  # noqa: F401  (registers torch.ops.adaswitch.*)
    except ImportError:
        return None
    return torch.ops.adaswitch


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
