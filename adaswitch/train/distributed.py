"""FSDP2 and DeepSpeed ZeRO plumbing of the `Distiller`: the configurations it accepts, and the full weights
that generation needs from a sharded or partitioned model.

FSDP2 (`fsdp=True`): accelerate shards the student only; generation runs inside `full_weights`, which
gathers its weights; the teacher is replicated on every process; the loss takes the student's logits,
since the LM-head weight is a shard outside the forward. FSDP1 is refused.

DeepSpeed ZeRO stage 2 or 3 (`deepspeed=` a config): the engine wraps the student only. ZeRO-2 keeps full
weights on every process, so nothing changes. ZeRO-3 partitions the student: generation runs inside
`zero3_full_weights` (DeepSpeed's `unwrap_model_for_generation`: gathers the weights once and removes the
engine's per-module hooks, which would otherwise re-gather in every forward, a collective that processes
whose rows stop early would leave waiting), and the loss takes the student's logits (the LM-head weight is
a partition outside the forward). A teacher created under ZeRO-3's `zero.Init` (e.g. `from_pretrained`
after the config) stays partitioned at rest and is gathered for each step (`gathered`). Stages 0 and 1
are refused (untested).
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn


def launched_processes() -> int:
    """How many processes the launcher (torchrun, accelerate launch, deepspeed) started: WORLD_SIZE."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def check_parallelism(args) -> None:
    """Refuses, before any work, the sharding set-ups the Distiller does not support: DeepSpeed ZeRO stages
    0 and 1, FSDP1."""
    if args.deepspeed:
        ds = args.hf_deepspeed_config
        if not (ds.is_zero2() or ds.is_zero3()):
            raise ValueError(
                "deepspeed: Distiller supports ZeRO stage 2 and 3 (zero_optimization.stage), got stage "
                f"{ds.get_value('zero_optimization.stage', 0)!r}; stages 0 and 1 are untested"
            )
    if args.fsdp and (args.fsdp_plugin_args or {}).get("fsdp_version", 2) != 2:
        raise ValueError(
            "fsdp_config['version'] must be 2: Distiller supports FSDP2 (transformers' default; FSDP1 "
            "is deprecated there)"
        )


def check_enabled(args, accelerator, fsdp_enabled: bool, deepspeed_enabled: bool) -> None:
    """Refuses a run whose FSDP or DeepSpeed setting accelerate silently dropped (it would run as DDP), and a
    launch of several processes that accelerate runs one by one (each would train alone)."""
    launched = launched_processes()
    if launched > 1 and accelerator.num_processes != launched:
        raise ValueError(
            f"WORLD_SIZE={launched} processes were launched but accelerate runs {accelerator.num_processes} "
            f"({accelerator.distributed_type} on {accelerator.device.type}): each process would train alone "
            "on the whole dataset and write the same output_dir. Check the device settings (use_cpu, "
            "ddp_backend) against the launcher's"
        )
    if args.fsdp and not fsdp_enabled:
        # accelerate (1.15) turns FSDP on only for accelerator devices: on CPU processes it would
        # silently run plain DDP instead.
        raise ValueError(
            f"fsdp=True but accelerate did not enable FSDP on {accelerator.device.type} "
            f"({accelerator.distributed_type}); FSDP needs GPUs (torchrun --nproc_per_node N on CUDA "
            "devices). For CPU or one device, leave fsdp unset (DDP under torchrun)"
        )
    if args.deepspeed and not deepspeed_enabled:
        # accelerate drops the DeepSpeed plugin when told to run on the CPU (Accelerator(cpu=True)); the
        # run would silently be plain DDP.
        raise ValueError(
            f"deepspeed is set but accelerate did not enable DeepSpeed ({accelerator.distributed_type} "
            f"on {accelerator.device.type}): accelerate drops it when told to use the CPU (`accelerate "
            "launch --cpu`, ACCELERATE_USE_CPU=true); launch with torchrun or the deepspeed launcher instead, "
            "or leave deepspeed unset"
        )


def _zero3_partitioned(model: nn.Module) -> list[nn.Parameter]:
    """The parameters under DeepSpeed ZeRO-3 (partitioned: empty outside a gather unless below the persistence
    threshold), or []."""
    return [p for p in model.parameters() if hasattr(p, "ds_id")]


@contextlib.contextmanager
def zero3_full_weights(engine):
    """Gives a DeepSpeed ZeRO-3 engine's model its full weights on every process for the duration of the block
    and removes the engine's per-module hooks meanwhile (DeepSpeed's `unwrap_model_for_generation`), so
    generation runs without a collective per forward; an engine without ZeRO-3 hooks is only gathered."""
    import deepspeed
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    if getattr(engine, "optimizer", None) is None:  # no ZeRO-3 optimizer or offload: no hooks to remove
        with deepspeed.zero.GatheredParameters(_zero3_partitioned(engine)):
            yield engine
    else:
        with unwrap_model_for_generation(engine):
            yield engine


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Full weights of a module partitioned by ZeRO-3's `zero.Init` that no engine manages (the teacher), for
    the block; any other module is left as is."""
    params = _zero3_partitioned(model)
    if not params:
        yield model
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        yield model


@contextlib.contextmanager
def full_weights(model: nn.Module):
    """Gives an FSDP2-sharded model (`torch.distributed.fsdp.fully_shard`) its full weights on every process
    for the duration of the block, and shards them back after; any other model is left as is.

    Generation needs this: without it every forward all-gathers the weights again, and a process whose
    rows stop early would leave the others waiting in that collective; the prefill also calls the
    decoder directly, outside the root module's hooks that gather the root's own parameters. Each
    module's reshard-after-forward setting is turned off inside the block and restored after (torch has
    setters for it but no getters, so the previous values are read from FSDP's state)."""
    from torch.distributed.fsdp import FSDPModule

    states, modules = {}, []
    for m in model.modules():
        if isinstance(m, FSDPModule):
            state = m._get_fsdp_state()
            if id(state) not in states:  # fully_shard([a, b]) gives several modules one state
                states[id(state)] = state
                modules.append(m)
    if not modules:
        yield model
        return
    # The root must be initialised by FSDP before any submodule runs (the prefill enters at the decoder):
    # that is what the root's first forward does; the first module in pre-order is the root.
    states[id(modules[0]._get_fsdp_state())]._lazy_init()
    saved = [(state, state._auto_reshard_after_forward, _param_groups(state)) for state in states.values()]
    saved = [(state, auto, [(g, g.post_forward_mesh_info) for g in groups]) for state, auto, groups in saved]
    try:
        for m in modules:
            m.set_reshard_after_forward(False, recurse=False)
            m.unshard()
        yield model
    finally:
        for m in modules:
            m.reshard()
        for state, auto, groups in saved:
            state._auto_reshard_after_forward = auto
            for group, info in groups:
                group.post_forward_mesh_info = info


def _param_groups(state) -> list:
    """An FSDP2 state's parameter groups (recent torch keeps a list; older versions one group or None)."""
    if hasattr(state, "_fsdp_param_groups"):
        return list(state._fsdp_param_groups)
    return [state._fsdp_param_group] if state._fsdp_param_group is not None else []
