"""The demo pins the CPU code paths of torch, MKL and oneDNN to AVX2, so an AVX-512 host takes the same paths.

Measured (docs/demo.md): the digits repeat run to run on one CPU, but an Intel AVX-512 host pinned so does not
reproduce an AMD AVX2 host's run to the digit; the pin narrows the differences, it does not remove them.

torch's own CPU kernels (ATen), its BLAS (MKL) and oneDNN pick their code path from the CPU: an AVX-512 host
sums a matrix product in another order than an AVX2 one, a sampled token flips, and after 150 steps the
accuracies differ. Pinning all three to their AVX2 path (each library's documented switch) is meant to make
the arithmetic the same on both; the demo's models are so small that the wider vectors buy nothing. Set before the
first CPU computation of the process (each library reads its switch then) and inherited by the worker
processes. A variable the user has set already is left as it is; ADASWITCH_DEMO_PIN_CPU=0 leaves all three
alone. In a process whose torch has already chosen a wider path (the demo called from a program, or a test,
after other CPU work) the switches cannot take effect any more; they are then not set for the workers either,
so that the runs in this process and in the workers compute alike (the results must not depend on --workers)."""

from __future__ import annotations

import contextlib
import os

# each library's switch to its AVX2 code path
AVX2_PATHS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2"}


def _has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


@contextlib.contextmanager
def pinned_cpu_numerics():
    """Sets the AVX2 switches where unset and the CPU has AVX2 (see the module docstring) while the block runs
    (the worker processes it starts inherit them); restores the environment after, so a caller that runs the
    demo in its own process (a test) keeps its own."""
    before = {name: os.environ.get(name) for name in AVX2_PATHS}
    if os.environ.get("ADASWITCH_DEMO_PIN_CPU", "1") != "0" and _has_avx2():
        for name, value in AVX2_PATHS.items():
            os.environ.setdefault(name, value)
        import torch

        # torch reads ATEN_CPU_CAPABILITY once, at its first CPU kernel: here, unless it ran one before
        if torch.backends.cpu.get_cpu_capability().lower() != os.environ["ATEN_CPU_CAPABILITY"].lower():
            _restore(before)
    try:
        yield
    finally:
        _restore(before)


def _restore(values: dict) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def cpu_numerics() -> dict:
    """What the results record: each switch's value in this process and the capability ATen uses."""
    import torch

    return {**{name: os.environ.get(name) for name in AVX2_PATHS},
            "aten_capability_in_use": torch.backends.cpu.get_cpu_capability()}
