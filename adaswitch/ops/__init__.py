"""Public ops other KD code imports (SPEC.md section 6). Names here are stable."""

from adaswitch.ops.divergence import token_divergence

__all__ = ["token_divergence"]
