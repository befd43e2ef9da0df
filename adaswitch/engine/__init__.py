"""The mixed decoding engine. Policies import eagerly (they are light and adaswitch.ops.step needs them);
`generate` and `GenerationOutput` (transformers) on first use, so importing adaswitch.ops stays cheap and
free of import cycles."""

from adaswitch.engine.policies import SKD, AdaSwitch, Mixed, Sampling, Student, Teacher

_LAZY = {"generate": "adaswitch.engine.generate", "GenerationOutput": "adaswitch.engine.generate"}

__all__ = ["AdaSwitch", "Mixed", "SKD", "Sampling", "Student", "Teacher", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'adaswitch.engine' has no attribute {name!r}")
