"""adaswitch: adaptive-switching knowledge distillation (AdaSwitch, arXiv 2510.07842).

Light at import: ops are imported eagerly, the engine and trainer (which need transformers) lazily.
"""

from adaswitch._backend import native_available
from adaswitch.ops import token_divergence

__version__ = "0.1.0"

_LAZY = {
    "distill_loss": "adaswitch.ops",
    "fused_linear_distill_loss": "adaswitch.ops",
    "sampled_token_loss": "adaswitch.ops",
    "generate": "adaswitch.engine.generate",
    "GenerationOutput": "adaswitch.engine.generate",
    "LookaheadStats": "adaswitch.engine.lookahead",
    "Sampling": "adaswitch.policies",
    "Student": "adaswitch.policies",
    "Teacher": "adaswitch.policies",
    "Mixed": "adaswitch.policies",
    "SKD": "adaswitch.policies",
    "AdaSwitch": "adaswitch.policies",
    "FixedSwitch": "adaswitch.policies",
    "RandomSwitch": "adaswitch.policies",
    "Distiller": "adaswitch.train.distiller",
    "DistillConfig": "adaswitch.train.config",
    "evaluate": "adaswitch.train.evaluate",
}

__all__ = ["native_available", "token_divergence", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'adaswitch' has no attribute {name!r}")
