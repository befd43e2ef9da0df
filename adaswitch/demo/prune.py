"""Depth pruning by measured importance: ShortGPT's block influence (Men et al., 2024).

A decoder layer whose output hidden state points where its input did changes little and can go:
BI_i = 1 - E_tokens[cos(x_i, x_{i+1})], with x_i the hidden state entering layer i, averaged over every
(unpadded) token of calibration text. The layers with the highest BI are kept, in their order.
"""

from __future__ import annotations

import copy

import torch


def decoder_layers(model) -> torch.nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(f"model must have model.layers (a Llama-style decoder), got {type(model).__name__}")
    return layers


@torch.no_grad()
def block_influence(model, sequences: list[list[int]]) -> list[float]:
    """BI of every decoder layer over the tokens of `sequences` (token id lists, each run on its own, so no
    padding enters the mean)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("sequences must be a non-empty list of non-empty token id lists")
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(index):
        def record(module, args, kwargs, output):
            x = kwargs.get("hidden_states", args[0] if args else None)
            y = output[0] if isinstance(output, tuple) else output
            captured[index] = (x, y)
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    was_training = model.training
    model.eval()
    try:
        for seq in sequences:
            captured.clear()
            model(input_ids=torch.tensor([seq], device=model.device))
            for i in range(len(layers)):
                x, y = captured[i]
                cos = torch.nn.functional.cosine_similarity(x[0].double(), y[0].double(), dim=-1)
                sums[i] += (1 - cos).sum()
            count += len(seq)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return (sums / count).tolist()


def keep_most_influential(scores: list[float], num_layers: int) -> list[int]:
    """Indices of the `num_layers` highest scores, in layer order (ties: the earlier layer)."""
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or not 1 <= num_layers <= len(scores):
        raise ValueError(f"num_layers must be an int in [1, {len(scores)}], got {num_layers!r}")
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:num_layers])


def prune_layers(model, keep: list[int]):
    """A new model of the same class with only the decoder layers `keep` (in that order), every other
    weight (embeddings, final norm, head) copied. `model` is not modified."""
    layers = decoder_layers(model)
    if not keep or sorted(set(keep)) != list(keep) or keep[0] < 0 or keep[-1] >= len(layers):
        raise ValueError(f"keep must be increasing layer indices in [0, {len(layers)}), got {keep!r}")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in keep]
    new = type(model)(config).to(dtype=next(model.parameters()).dtype)
    state, renamed = model.state_dict(), {}
    for key, value in state.items():
        parts = key.split(".")
        if "layers" in parts:
            at = parts.index("layers") + 1
            index = int(parts[at])
            if index not in keep:
                continue
            parts[at] = str(keep.index(index))
        renamed[".".join(parts)] = value
    new.load_state_dict(renamed, strict=True)
    return new.eval()
