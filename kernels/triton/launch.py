"""The one way the library launches a Triton kernel: `launch(kernel, grid, *args, device=..., **kwargs)`.

- Device guard: the launch runs under `torch.cuda.device(device)`, so a kernel on tensors of cuda:1
  runs on cuda:1 whatever the current device is (Triton launches on the current device and stream).
- Registry: every call records (kernel name, the launching function, the constexpr / option values) in
  `LAUNCHES`. tests/test_triton_compile.py sweeps the library's launches, compiles each for sm_90 and
  checks that every launch site in the source was reached and every kernel was compiled, so a new launch
  site without coverage fails there.
- Compile-only mode (`compile_only()`): the launches go through Triton's launcher with warmup=True,
  which binds and specialises the arguments and compiles the kernel but does not run it (the compile
  test uses it with a stand-in driver on a machine without a GPU).
- Tile override: `tile(vocab, cap)` is the BLOCK the kernels loop over; `set_max_block(n)` or the
  ADASWITCH_TRITON_MAX_BLOCK environment variable caps it, so that the multi-tile paths (online
  log-sum-exp across tiles, the later passes) run on small vocabularies in the tests.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import defaultdict

import torch
import triton

# kernel name -> {(caller "module:function", frozenset of (constexpr / option, value))}
LAUNCHES: dict[str, set] = defaultdict(set)

_COMPILE_ONLY = False
_MAX_BLOCK: int | None = None


def set_max_block(n: int | None) -> None:
    """Caps every kernel's tile (a power of two >= 16), or None for the kernels' own choice."""
    global _MAX_BLOCK
    if n is not None and (n < 16 or n & (n - 1)):
        raise ValueError(f"max block must be a power of two >= 16, got {n!r}")
    _MAX_BLOCK = n


@contextlib.contextmanager
def max_block(n: int | None):
    """`set_max_block(n)` for the duration of a `with` block."""
    old = _MAX_BLOCK
    set_max_block(n)
    try:
        yield
    finally:
        set_max_block(old)


def tile(vocab: int, cap: int) -> int:
    """The kernels' BLOCK: next power of two of `vocab`, at most `cap`, at most the override."""
    block = min(triton.next_power_of_2(max(int(vocab), 1)), cap)
    limit = _MAX_BLOCK if _MAX_BLOCK is not None else int(os.environ.get("ADASWITCH_TRITON_MAX_BLOCK", "0") or 0)
    return min(block, limit) if limit > 0 else block


@contextlib.contextmanager
def compile_only():
    """Launches compile (warmup=True) instead of running; the outputs stay uninitialised."""
    global _COMPILE_ONLY
    old = _COMPILE_ONLY
    _COMPILE_ONLY = True
    try:
        yield
    finally:
        _COMPILE_ONLY = old


def device_guard(device: torch.device):
    """`torch.cuda.device(device)` for CUDA tensors (cheap: a no-op when already current), else nothing."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _freeze(value):
    return value if isinstance(value, (bool, int, float, str, type(None))) else repr(value)


def launch(kernel, grid, *args, device: torch.device, **kwargs):
    """kernel[grid](*args, **kwargs) on `device` (the tensors' device), recorded in LAUNCHES."""
    caller = sys._getframe(1).f_code
    name = getattr(getattr(kernel, "fn", kernel), "__name__", repr(kernel))
    LAUNCHES[name].add((f"{caller.co_filename}:{caller.co_name}",
                        frozenset((k, _freeze(v)) for k, v in kwargs.items())))
    with device_guard(device):
        if _COMPILE_ONLY:
            return kernel.run(*args, grid=grid, warmup=True, **kwargs)
        return kernel[grid](*args, **kwargs)
