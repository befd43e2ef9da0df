"""The mixed decoding engine: `generate` and `GenerationOutput` load transformers on first use. The policies
live below the engine (`adaswitch.policies`, used by the ops and kernels too) and are re-exported here."""

from adaswitch.policies import SKD, AdaSwitch, Mixed, Sampling, Student, Teacher

_LAZY = {"generate": "adaswitch.engine.generate", "GenerationOutput": "adaswitch.engine.generate"}

__all__ = ["AdaSwitch", "Mixed", "SKD", "Sampling", "Student", "Teacher", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'adaswitch.engine' has no attribute {name!r}")
