"""Distillation training: `DistillConfig`, `Distiller` (a transformers Trainer), data loading and `evaluate`.

Imported lazily by `adaswitch` (it needs transformers, datasets and accelerate).
"""

from adaswitch.train.config import DistillConfig
from adaswitch.train.data import DistillCollator, load_prompt_completion, prepare_dataset, tokenize_dataset
from adaswitch.train.evaluate import evaluate, exact_match_checker, extract_answer

__all__ = [
    "DistillCollator",
    "DistillConfig",
    "Distiller",
    "evaluate",
    "exact_match_checker",
    "extract_answer",
    "load_prompt_completion",
    "prepare_dataset",
    "tokenize_dataset",
]


def __getattr__(name):
    if name == "Distiller":  # the trainer imports the engine and the loss ops
        from adaswitch.train.distiller import Distiller

        return Distiller
    raise AttributeError(f"module 'adaswitch.train' has no attribute {name!r}")
