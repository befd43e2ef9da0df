"""Count device-to-host synchronisations, on CPU as on CUDA.

A decode loop that reads a tensor's value on the host (`.item()`, `bool(t)`, `if t.any():`, `.tolist()`,
boolean-mask indexing, `.cpu()`) stalls the GPU once per read. On CPU nothing stalls, so such reads go
unnoticed in CI; this counter makes them visible there. It is a `TorchDispatchMode` that counts the ATen
ops which need a value (or a data-dependent shape) on the host, plus `Tensor.tolist`/`Tensor.numpy`, which
read CPU memory without dispatching (counted once per call, whatever they dispatch inside).

    with SyncCounter() as sc:
        out = adaswitch.generate(...)
    print(sc.count, sc.by_op)
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops whose result the host must wait for: a scalar read, or an output shape that depends on values.
_SYNC_OPS = {
    aten._local_scalar_dense.default,  # .item(), int(t), float(t), bool(t), `if t:`
    aten.is_nonzero.default,
    aten.equal.default,  # torch.equal returns a Python bool
    aten.nonzero.default,
    aten.masked_select.default,
    aten.unique_consecutive.default,
    aten._unique2.default,
    aten.unique_dim.default,
}


def _is_host_copy(func, args, kwargs) -> bool:
    """A copy from a non-CPU tensor to the CPU (`.cpu()`, `.to("cpu")`, `cpu_tensor.copy_(cuda_tensor)`)."""
    if func in (aten._to_copy.default,):
        src = args[0]
        dev = kwargs.get("device")
        return isinstance(src, torch.Tensor) and src.device.type != "cpu" and dev is not None and (
            torch.device(dev).type == "cpu"
        )
    if func in (aten.copy_.default,):
        dst, src = args[0], args[1]
        return dst.device.type == "cpu" and isinstance(src, torch.Tensor) and src.device.type != "cpu"
    return False


def _needs_sync(func, args, kwargs) -> bool:
    if func in _SYNC_OPS:
        return True
    if func is aten.index.Tensor:  # x[bool_mask] has a data-dependent shape
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
    if func is aten.repeat_interleave.Tensor:  # without output_size the length is read on the host
        return kwargs.get("output_size") is None
    return _is_host_copy(func, args, kwargs)


class SyncCounter(TorchDispatchMode):
    """Counts host reads of device values while active. `count` is the total, `by_op` a Counter by name."""

    def __init__(self):
        super().__init__()
        self.by_op: Counter[str] = Counter()
        self._saved = {}
        self._inside_read = False  # within a counted Tensor.tolist/numpy: its inner copy is the same read

    @property
    def count(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._inside_read and _needs_sync(func, args, kwargs):
            self.by_op[str(func.overloadpacket.__name__)] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        counter = self
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(tensor, *a, _original=original, _name=name, **k):
                counter.by_op[_name] += 1
                counter._inside_read = True
                try:
                    return _original(tensor, *a, **k)
                finally:
                    counter._inside_read = False

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()
        return super().__exit__(*exc)
