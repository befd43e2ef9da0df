"""`Distiller`: a `transformers.Trainer` that distils a teacher into the student with a generation policy.

Each training step (docs/spec.md sections 2 and 5):
1. the responses: generated with the policy by `adaswitch.generate` (student in eval mode, no grad,
   random draws keyed by the dataset index so a row's tokens do not depend on its batch), or the
   dataset's completions (`policy="dataset"`, and the dataset rows of `mixed`);
2. one forward of the student (with grad) over prompt + response; the teacher's side of the loss is the
   teacher's last hidden states that generation already computed (`reuse_teacher_states`: the policy ran
   the teacher on every loss position, in eval mode on the same prefix, and the fused LM-head loss forms
   its logits from them), else one teacher forward (no grad) over prompt + response;
3. the loss over the response tokens: `fused_linear_distill_loss` from the last hidden states and the
   LM-head weights (no [N, V] logits kept) when, for both models, it forms the model's own logits (a
   linear LM head with a known logit scale / softcap, checked once against a real forward at
   start-up, `verify_fused_head`), else `distill_loss` on the logits; prompt, padding and tokens outside
   `token_mask` are `ignore_index`; the loss form (`loss_kind`, a hard-label term, `loss_reduction`) is the
   op's (docs/spec.md section 5), the teacher-written tokens being what the sampled-token form weighs;
4. Trainer's backward and optimizer step (so accelerate's DDP, gradient accumulation, mixed precision,
   checkpoints, resume and `report_to` all apply).

FSDP2 (`fsdp=True`) and DeepSpeed ZeRO-2 / ZeRO-3 (`deepspeed=`): the student alone is sharded, generation
runs on its gathered weights, the loss takes the logits; see adaswitch/train/distributed.py. Checkpoints are
published atomically: adaswitch/train/checkpoint.py.

Normalisation: the loss is the mean over the valid response tokens of the whole micro-batch across all
processes (so N processes give the loss and gradients of one process on the same global batch);
micro-batches of a gradient accumulation are averaged, since on-policy responses only exist once they
are generated. A `num_items_in_batch` given by Trainer replaces the token count, as in TRL.
`loss_reduction="sequence_mean"` divides by the global count of sequences instead.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
import shutil
import time
from collections import defaultdict
from typing import NamedTuple

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints
from transformers.utils import logging

from adaswitch._validation import SAMPLED_KIND
from adaswitch.engine.lookahead import LookaheadStats
from adaswitch.train.atomic import disk_full, normalize_modes, publish_files, write_error
from adaswitch.train.checkpoint import STAGING_PREFIX, fsync_tree, publish, recover
from adaswitch.train.config import SWITCH_POLICIES, DistillConfig
from adaswitch.train.data import (
    DistillCollator,
    check_same_tokenizer,
    prepare_dataset,
    prompt_limit,
    saved_tokenizers,
)
from adaswitch.train.distributed import (  # FSDP2 / DeepSpeed ZeRO plumbing
    _zero3_partitioned,
    check_enabled,
    check_parallelism,
    full_weights,
    gathered,
    zero3_full_weights,
)
from adaswitch.train.finite import check_logs, check_weights
from adaswitch.train.resume import ResumeError, check_resume, save_run_settings
from adaswitch.train.run_state import (  # noqa: F401 (SWITCH_COUNTS_NAME, LOOKAHEAD_STATS_NAME re-exported)
    LOOKAHEAD_STATS_NAME,
    SWITCH_COUNTS_NAME,
    load_lookahead_stats,
    load_switch_counts,
    save_run_state,
)

IGNORE_INDEX = -100
# The final model is written here inside output_dir, then moved into place file by file (atomic.publish_files).
MODEL_STAGING = STAGING_PREFIX + "model"
_WEIGHT_FILES = ("model", "pytorch_model", "adapter_model")  # stems of weight files a new save makes stale

logger = logging.get_logger(__name__)


def _vocab_size(model) -> int:
    head = model.get_output_embeddings()
    if head is None:
        return model.config.vocab_size
    # a ZeRO-3 partitioned weight (created under deepspeed.zero.Init) is empty; ds_shape is its full shape
    return getattr(head.weight, "ds_shape", head.weight.shape)[0]


def _linear_head(model) -> nn.Linear | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head if isinstance(head, nn.Linear) else None


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


# ----------------------------------------------------------------------------------------------------------
# a causal LM's logits from its last hidden state: what the fused loss must reproduce


class LogitProcessing(NamedTuple):
    """What a causal LM's forward does to its LM head's output z: logits = softcap * tanh(logit_scale * z /
    softcap), or logit_scale * z when softcap is None (the form `fused_linear_distill_loss` computes)."""

    logit_scale: float = 1.0
    softcap: float | None = None


def _text_config(model):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def _optional_softcap(model) -> LogitProcessing:
    return LogitProcessing(softcap=getattr(_text_config(model), "final_logit_softcapping", None))


# transformers' causal-LM classes whose forward changes lm_head(h), as their code does it; the library's
# other causal LMs are taken to return lm_head(h) itself, which `verify_fused_head` confirms. Keyed by
# class: e.g. Gemma3ForCausalLM softcaps its logits, Gemma3ForConditionalGeneration does not.
_LOGIT_PROCESSING = {
    **dict.fromkeys(
        (
            "CohereForCausalLM",
            "Cohere2ForCausalLM",
            "Cohere2MoeForCausalLM",
            "CohereCompassForCausalLM",
            "CohereCompassForConditionalGeneration",
        ),
        lambda m: LogitProcessing(logit_scale=1.0 if m.logit_scale is None else m.logit_scale),
    ),
    **dict.fromkeys(
        (
            "GraniteForCausalLM",
            "GraniteSWAForCausalLM",
            "GraniteMoeForCausalLM",
            "GraniteMoeSWAForCausalLM",
            "GraniteMoeHybridForCausalLM",
            "GraniteMoeSharedForCausalLM",
            "Granite4VisionForConditionalGeneration",
            "GraniteDoclingForConditionalGeneration",
        ),
        lambda m: LogitProcessing(logit_scale=1.0 / _text_config(m).logits_scaling),  # logits / logits_scaling
    ),
    **dict.fromkeys(
        ("HyperCLOVAXForCausalLM", "HyperCLOVAXVisionV2ForConditionalGeneration"),
        lambda m: LogitProcessing(logit_scale=_text_config(m).logits_scaling),
    ),
    "FalconH1ForCausalLM": lambda m: LogitProcessing(logit_scale=m.model.lm_head_multiplier),
    **dict.fromkeys(
        (
            "Gemma2ForCausalLM",
            "Gemma3ForCausalLM",
            "Gemma3nForCausalLM",
            "Gemma3nForConditionalGeneration",
            "Gemma4ForCausalLM",
            "Gemma4ForConditionalGeneration",
            "Gemma4UnifiedForCausalLM",
            "Gemma4UnifiedForConditionalGeneration",
            "VaultGemmaForCausalLM",
            "NanoChatForCausalLM",
            "BeamForCausalLM",
            "PaliGemmaForConditionalGeneration",
        ),
        _optional_softcap,
    ),
    "RecurrentGemmaForCausalLM": lambda m: LogitProcessing(softcap=m.config.logits_soft_cap),
    "MistralLarge4ForConditionalGeneration": lambda m: LogitProcessing(softcap=m.final_logit_softcapping),
    **dict.fromkeys(
        ("MuseGlimmerForConditionalGeneration", "MuseSparkForConditionalGeneration"),
        lambda m: LogitProcessing(_text_config(m).output_multiplier, _text_config(m).final_logit_softcapping),
    ),
}
# transformers' causal LMs whose logits the fused loss cannot form (vocabulary slicing, a softcap module
# with its own rules, chunked inference-time capping)
_UNSUPPORTED_HEADS = frozenset(
    {
        "InklingForCausalLM",
        "Inkling2ForCausalLM",
        "Inkling2ForConditionalGeneration",
        "Inkling2LoopForCausalLM",
        "Inkling2LoopForConditionalGeneration",
        "xLSTMForCausalLM",
    }
)


def logit_processing(model: nn.Module) -> LogitProcessing | None:
    """How `model`'s forward turns its LM head's output into its logits, read from its class and config
    (a PEFT wrapper is looked through); None when unknown: a class from outside transformers, or one
    whose processing the fused loss cannot express."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    cls = type(base)
    if not cls.__module__.startswith("transformers.models.") or cls.__name__ in _UNSUPPORTED_HEADS:
        return None
    read = _LOGIT_PROCESSING.get(cls.__name__)
    if read is None:
        return LogitProcessing()
    try:
        scale, cap = read(base)
    except (AttributeError, TypeError, ZeroDivisionError):
        return None
    ok = lambda x: not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and x > 0  # noqa: E731
    if not ok(scale) or not (cap is None or ok(cap)):
        return None
    return LogitProcessing(float(scale), None if cap is None else float(cap))


def _matmul_eps(dtype: torch.dtype) -> float:
    """Relative rounding of a logit the model computes in `dtype` (fp32 matmuls may run as TF32 or bf16
    when torch is told so)."""
    if dtype == torch.float32:
        return {"highest": torch.finfo(torch.float32).eps, "high": 2.0**-10}.get(
            torch.get_float32_matmul_precision(), 2.0**-7
        )
    return torch.finfo(dtype).eps


@torch.no_grad()
def verify_fused_head(
    model: nn.Module, vocab_size: int | None = None, tokens: int = 16, amp_dtype: torch.dtype | None = None
):
    """(processing, "") when the logits the fused loss forms from `model`'s last hidden state, LM head and
    `logit_processing` equal its own `model(...).logits` on `tokens` fixed token ids (to the rounding of
    the model's dtype, or of `amp_dtype` when its forward runs under autocast, as accelerate's mixed
    precision makes it); else (None, the reason). Runs in eval mode, modes restored after."""
    head = _linear_head(model)
    if head is None:
        return None, "its LM head (get_output_embeddings) is not an nn.Linear"
    processing = logit_processing(model)
    if processing is None:
        return None, f"{type(model).__name__}'s logit processing is unknown"
    if not _accepts(model, "logits_to_keep"):
        return None, "its forward takes no logits_to_keep argument"
    from adaswitch.ops.fused_linear import lm_head_logits

    if head.weight.is_meta:
        return None, "its LM-head weight is offloaded (on the meta device)"
    rows = head.weight.shape[0]
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    device = getattr(getattr(embeddings, "weight", None), "device", head.weight.device)  # where inputs go
    gen = torch.Generator().manual_seed(0)  # fixed ids, and the global RNG stream is left alone
    ids = torch.randint(0, min(rows, vocab_size or rows), (1, tokens), generator=gen).to(device)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, use_cache=False)
    except Exception as e:  # a model that needs more than token ids
        return None, f"its check forward failed ({type(e).__name__}: {e})"
    finally:
        for m, mode in modes:
            m.training = mode
    hidden = getattr(out, "hidden_states", None)
    if not hidden or getattr(out, "logits", None) is None:
        return None, "its forward returns no hidden_states or logits"
    logits = out.logits.float()
    if hidden[-1].shape[:-1] != logits.shape[:-1] or logits.shape[-1] != rows:
        return None, f"its logits {tuple(logits.shape)} are not [tokens, LM-head rows ({rows})]"
    ours = lm_head_logits(hidden[-1].to(head.weight.device), head.weight, head.bias,
                          logit_scale=processing.logit_scale, softcap=processing.softcap)
    ours = ours.float().to(logits.device)
    dtypes = (out.logits.dtype, head.weight.dtype, hidden[-1].dtype) + ((amp_dtype,) if amp_dtype else ())
    eps = max(_matmul_eps(d) for d in dtypes)
    tol = 1e-6 + max(2 * eps, 1e-4) * float(ours.abs().max())
    err = float((ours - logits).abs().max())
    if not err <= tol:
        return None, (
            f"its logits differ from lm_head(last hidden state) with {processing} by {err:.3g} (tolerance "
            f"{tol:.3g}): its forward processes the logits in a way the fused loss does not reproduce"
        )
    return processing, ""


class Distiller(Trainer):
    """Knowledge distillation with a generation policy (student, teacher, dataset, mixed, skd, adaswitch).

    Args:
        model: the student, a causal LM (`PreTrainedModel`); the only model that is trained.
        teacher_model: the teacher, a causal LM sharing the student's tokenizer and vocabulary (an embedding
            matrix only padded past the tokenizer's vocabulary is fine). Put in eval mode, frozen, and moved
            to the student's device; never updated.
        args: a `DistillConfig`.
        train_dataset, eval_dataset: `datasets.Dataset`s or .jsonl/.json/.parquet/.csv paths with a `prompt`
            column and, for policies `dataset` and `mixed`, a `completion` column (text or chat messages); or
            what `adaswitch.train.data.prepare_dataset` returned for them (checked against this run's limits,
            not tokenized again).
        processing_class: the shared tokenizer (must define a pad token). Its ids are the vocabulary:
            generation never samples, and the loss never weighs, an id >= len(processing_class) (embedding
            rows padded past the tokenizer).
        callbacks, optimizers, optimizer_cls_and_kwargs: as in `transformers.Trainer`.
        teacher_processing_class: the teacher's tokenizer, when loaded separately: must have the same
            vocabulary (token -> id map) as processing_class. Tokenizers saved in the local directories
            the models were loaded from (`from_pretrained(dir)`) are compared too. Different tokenizers
            are an error before any work: cross-tokenizer distillation is not supported.

    Example:
        >>> config = DistillConfig(output_dir="out", policy="adaswitch", max_new_tokens=64, max_steps=100)
        >>> Distiller(model=student, teacher_model=teacher, args=config, train_dataset="train.jsonl",
        ...           processing_class=tokenizer).train()
    """

    _tag_names = ["adaswitch", "distillation"]

    def __init__(
        self,
        model: PreTrainedModel,
        teacher_model: PreTrainedModel,
        args: DistillConfig,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        teacher_processing_class=None,
    ):
        if not isinstance(args, DistillConfig):
            raise TypeError(f"args must be an adaswitch.DistillConfig, got {type(args).__name__}")
        for name, m in (("model", model), ("teacher_model", teacher_model)):
            if not isinstance(m, nn.Module) or not hasattr(m, "get_output_embeddings"):
                raise TypeError(
                    f"{name} must be a transformers causal LM (PreTrainedModel), got {type(m).__name__}"
                )
        if processing_class is None or not hasattr(processing_class, "pad_token_id"):
            raise TypeError("processing_class must be the tokenizer shared by student and teacher")
        if processing_class.pad_token_id is None:
            raise ValueError(
                "processing_class (the tokenizer) must define a pad token; set tokenizer.pad_token"
            )
        if train_dataset is None:
            raise ValueError(
                "train_dataset is required: a datasets.Dataset or a .jsonl/.json/.parquet/.csv path"
            )
        check_parallelism(args)
        # One tokenizer: the given ones and those saved with the models must have one vocabulary.
        named = [("processing_class", processing_class)]
        if teacher_processing_class is not None:
            named.append(("teacher_processing_class", teacher_processing_class))
        known = [tok for _, tok in named]
        check_same_tokenizer(named + saved_tokenizers([("student", model), ("teacher", teacher_model)], known))
        n_tok = len(processing_class)
        v_student, v_teacher = _vocab_size(model), _vocab_size(teacher_model)
        if min(v_student, v_teacher) < n_tok:
            raise ValueError(
                f"the tokenizer has {n_tok} tokens but the student has {v_student} and the teacher "
                f"{v_teacher} output rows; both must cover the tokenizer's vocabulary"
            )
        # The tokenizer's ids: generation samples in [0, vocab_size) and the loss cuts logits to it, so rows
        # padded past the tokenizer (e.g. Qwen2.5: 151936 rows, 151665 tokens) are never sampled nor weighed.
        self.vocab_size = n_tok

        # Data checks come first: a bad row is reported before any model is moved or any work is done.
        limit = prompt_limit(args.max_prompt_length, args.max_new_tokens, model, teacher_model)
        self._prompt_limit = limit
        train_dataset = self._prepare_dataset(train_dataset, processing_class, args, limit, "train dataset")
        if isinstance(eval_dataset, dict):
            eval_dataset = {
                k: self._prepare_dataset(v, processing_class, args, limit, f"eval dataset {k!r}")
                for k, v in eval_dataset.items()
            }
        elif eval_dataset is not None:
            eval_dataset = self._prepare_dataset(eval_dataset, processing_class, args, limit, "eval dataset")

        self.policy = args.build_policy()
        super().__init__(
            model=model,
            args=args,
            data_collator=DistillCollator(processing_class.pad_token_id),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
        )
        check_enabled(args, self.accelerator, self.is_fsdp_enabled, self.is_deepspeed_enabled)
        # The loss is normalised here (per token over the micro-batch), so Trainer divides it by the number
        # of accumulation steps; compute_loss flips this when Trainer passes num_items_in_batch.
        self.loss_is_scaled_for_ga = False
        teacher_model.eval()
        teacher_model.requires_grad_(False)
        # evaluation_mode: never wrapped in DDP nor sharded by FSDP or a DeepSpeed engine (accelerate wraps only
        # the model given to `prepare` with the optimizer), so every process holds the full teacher for
        # generation (one partitioned by zero.Init is gathered per step, see `gathered`).
        # device_placement: accelerate skips the move to the device under FSDP; the teacher needs it.
        self.teacher_model = self.accelerator.prepare_model(
            teacher_model, device_placement=True, evaluation_mode=True
        )
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        # Training rows per switch position (index p + 1; index 0: no switch), summed over processes, for the
        # switch policies: e.g. the distribution a RandomSwitch control draws from. Saved with each checkpoint
        # (SWITCH_COUNTS_NAME) and restored on resume.
        self.switch_position_counts = [0] * (args.max_new_tokens + 1)
        # lookahead="auto": forward timings and acceptance learnt on this pair, carried across steps
        self.lookahead_stats = LookaheadStats()
        self._last_generation_seconds = 0.0
        self._last_tokens = 0.0
        self._log_since = 0  # the step of the log before the current one (for NonFiniteError's message)
        if not self.is_fsdp_enabled:  # FSDP ranks may hold uninitialised weights until rank 0's are broadcast
            check_weights(model, what="the student", when="before training")
            check_weights(teacher_model, what="the teacher", when="before training")
        self._check_fused_heads()

    @staticmethod
    def _prepare_dataset(dataset, tokenizer, args, limit, name):
        return prepare_dataset(
            dataset,
            tokenizer,
            max_prompt_length=limit,
            max_completion_length=args.max_new_tokens,
            use_completion=args.uses_completions,
            name=name,
        )

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """Trainer.evaluate; an `eval_dataset` given here (prompt/completion rows or a file path, or a dict
        of them) is checked and tokenized like the one given to the constructor."""
        if eval_dataset is not None:
            prepare = functools.partial(
                self._prepare_dataset, tokenizer=self.processing_class, args=self.args, limit=self._prompt_limit
            )
            if isinstance(eval_dataset, dict):
                eval_dataset = {k: prepare(v, name=f"eval dataset {k!r}") for k, v in eval_dataset.items()}
            else:
                eval_dataset = prepare(eval_dataset, name="eval dataset")
        return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)

    # ------------------------------------------------------------------------------------------------
    # responses

    def _generation_seed(self) -> int:
        """The draws depend on (seed, example key, position): a seed per optimizer step gives a row fresh
        samples each time it is seen, and a resumed run repeats exactly what an uninterrupted one does.
        Evaluation uses the fixed seed, so successive evaluations are comparable."""
        if not self.model.training:
            return int(self.args.seed) % (2**31 - 1)
        return (int(self.args.seed) + 1_000_003 * (self.state.global_step + 1)) % (2**31 - 1)

    @torch.no_grad()
    def _responses(self, model, inputs):
        """(response ids [B, N], valid [B, N] bool, student-sampled [B, N] bool, teacher-sampled [B, N]
        bool, generation output or None)."""
        if self.policy is None:  # policy "dataset": the completions are the responses
            ids, valid = inputs["completion_ids"], inputs["completion_mask"].bool()
            none = torch.zeros_like(valid)
            return ids, valid, none, none, None
        from adaswitch.engine.generate import generate

        student = self.accelerator.unwrap_model(model)
        was_training = student.training
        student.eval()
        try:
            # FSDP / ZeRO-3: generation runs on the gathered weights (FSDP2 needs torch >= 2.6: imported only then)
            if self.is_fsdp_enabled:
                weights = full_weights(student)
            elif _zero3_partitioned(student):
                weights = zero3_full_weights(self.model_wrapped)
            else:
                weights = contextlib.nullcontext()
            with weights, gathered(self.teacher_model):
                extra = {}
                if self.args.uses_completions:  # mixed: rows that lose the coin use their dataset completion
                    extra["completions"] = inputs["completion_ids"]
                if self._reuses_teacher(model):
                    extra["return_teacher_states"] = True
                out = generate(
                    student,
                    self.teacher_model,
                    inputs["prompt_input_ids"],
                    inputs["prompt_attention_mask"],
                    policy=self.policy,
                    max_new_tokens=self.args.max_new_tokens,
                    eos_token_id=self.processing_class.eos_token_id,
                    pad_token_id=self.processing_class.pad_token_id,
                    vocab_size=self.vocab_size,
                    seed=self._generation_seed(),
                    example_keys=inputs["example_keys"],
                    sync_every=self.args.sync_every,
                    lookahead=self.args.lookahead,
                    guidance=self.args.guidance,
                    lookahead_stats=self.lookahead_stats,
                    **extra,
                )
        finally:
            student.train(was_training)
        ids = out.response
        valid = out.attention_mask[:, out.prompt_length :].bool()
        from_teacher = out.from_teacher & valid
        # Dataset rows of `mixed` are sampled by neither model.
        from_student = valid & ~from_teacher & ~out.from_dataset[:, None]
        return ids, valid, from_student, from_teacher, out

    # ------------------------------------------------------------------------------------------------
    # loss

    def _forward(self, model, ids, mask, positions, *, fused: bool):
        """(last hidden states, LM head) when `fused`, else (logits, None), over every position."""
        if fused:
            out = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                output_hidden_states=True,
                logits_to_keep=1,
                use_cache=False,
            )
            head = _linear_head(self.accelerator.unwrap_model(model))
            return out.hidden_states[-1], head
        return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits, None

    def _check_fused_heads(self) -> None:
        """Decides once per model whether the fused LM-head loss may stand in for its logits
        (`verify_fused_head`); when not, the loss takes the logits and the reason is logged."""
        self._fused_heads = {"student": None, "teacher": None}
        if self.is_fsdp_enabled or (self.args.deepspeed and self.args.hf_deepspeed_config.is_zero3()):
            return  # the loss takes the logits there (see `_use_fused`): nothing to check
        # mixed precision: the teacher's forward already runs under autocast (accelerate wrapped it)
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(self.accelerator.mixed_precision))
        for name, wrapped in (("student", self.model), ("teacher", self.teacher_model)):
            model = self.accelerator.unwrap_model(wrapped)
            with gathered(model):
                processing, why = verify_fused_head(model, self.vocab_size, amp_dtype=amp)
            if processing is None:
                logger.warning(f"Distiller: the loss uses the {name}'s logits (no fused LM-head loss): {why}")
            else:
                logger.info(f"Distiller: fused LM-head loss for the {name}, {processing} (checked)")
            self._fused_heads[name] = processing

    def _use_fused(self, model) -> bool:
        if self.is_fsdp_enabled:
            # Outside the student's forward its LM-head weight is a shard (DTensor) unless its FSDP unit
            # keeps it gathered after forward (accelerate's default tail unit does, a custom wrap may not):
            # the logits of the wrapped model do not depend on how the model was wrapped.
            return False
        student = self.accelerator.unwrap_model(model)
        if _zero3_partitioned(student):  # ZeRO-3: the LM-head weight is a partition outside the forward
            return False
        heads = getattr(self, "_fused_heads", {})
        if heads.get("student") is None or heads.get("teacher") is None:  # not checked, or failed the check
            return False
        teacher = self.accelerator.unwrap_model(self.teacher_model)
        return all(_linear_head(m) is not None and _accepts(m, "logits_to_keep") for m in (student, teacher))

    def _reuses_teacher(self, model) -> bool:
        """Whether generation returns the teacher's last hidden states for the loss: `reuse_teacher_states`,
        a policy that runs the teacher, and the fused LM-head loss (which forms the teacher's logits from
        those states with its checked logit processing, exactly as from a second forward's)."""
        return bool(
            self.args.reuse_teacher_states
            and self.policy is not None
            and self.policy.uses_teacher
            and self._use_fused(model)
        )

    @staticmethod
    def _generated_teacher_states(gen, keep):
        """The teacher's states from generation [B, N, H] when they cover every loss position (`keep`), else
        None (one host read)."""
        if gen is None or gen.teacher_hidden_states is None or gen.teacher_states_mask is None:
            return None
        if bool((keep & ~gen.teacher_states_mask.to(keep.device)).any()):
            return None
        return gen.teacher_hidden_states

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from adaswitch.ops import distill_loss, fused_linear_distill_loss

        mode = "train" if model.training else "eval"
        device = inputs["prompt_input_ids"].device
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        start = time.perf_counter()
        resp, valid, from_student, from_teacher, gen = self._responses(model, inputs)
        sync()
        self._last_generation_seconds = time.perf_counter() - start

        prompt, pmask = inputs["prompt_input_ids"], inputs["prompt_attention_mask"]
        width, n = prompt.shape[1], resp.shape[1]
        ids = torch.cat([prompt, resp], dim=1)
        mask = torch.cat([pmask, valid.long()], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = {"all": valid, "student": from_student, "teacher": from_teacher}[self.args.token_mask]
        real = self._real_rows(resp.shape[0], device) if mode == "eval" else None
        if real is not None:  # rows repeated to pad the last evaluation step count nowhere
            keep, valid, from_teacher = keep & real[:, None], valid & real[:, None], from_teacher & real[:, None]
        labels = torch.where(keep, resp, torch.full_like(resp, IGNORE_INDEX))
        hard_labels = None
        if self.args.hard_label_mask != "all":
            hard_keep = {"student": from_student, "teacher": from_teacher}[self.args.hard_label_mask]
            hard_labels = torch.where(hard_keep, resp, torch.full_like(resp, IGNORE_INDEX))

        # Global token count of this micro-batch over all processes (see the module docstring), or, for
        # loss_reduction="sequence_mean", its global count of sequences.
        count = keep.sum()
        world = self.accelerator.num_processes
        if self.args.loss_reduction == "sequence_mean":
            rows = torch.tensor(float(resp.shape[0]), device=device) if real is None else real.sum().float()
            divisor = self.accelerator.reduce(rows, reduction="sum") if world > 1 else rows
            divisor = divisor.clamp(min=1)
            self.loss_is_scaled_for_ga = False
        elif num_items_in_batch is not None:
            divisor = num_items_in_batch
            self.loss_is_scaled_for_ga = True
        else:
            divisor = self.accelerator.reduce(count.clone(), reduction="sum") if world > 1 else count
            divisor = divisor.clamp(min=1)
            self.loss_is_scaled_for_ga = False

        fused = self._use_fused(model)
        teacher_positions = positions.to(next(self.teacher_model.parameters()).device)
        s_out, s_head = self._forward(model, ids, mask, positions, fused=fused)
        # Position j predicts token j + 1: response token i is predicted at position width - 1 + i.
        s_sel = s_out[:, width - 1 : width - 1 + n]
        reused = self._generated_teacher_states(gen, keep) if fused else None
        self._metrics[mode]["teacher_states_reused"].append(float(reused is not None))
        if reused is not None:  # the teacher's states from generation: no second teacher forward
            t_head = _linear_head(self.accelerator.unwrap_model(self.teacher_model))
            t_sel = reused.to(s_sel.device)
        else:
            with torch.no_grad(), gathered(self.teacher_model):
                t_out, t_head = self._forward(
                    self.teacher_model,
                    ids.to(teacher_positions.device),
                    mask.to(teacher_positions.device),
                    teacher_positions,
                    fused=fused,
                )
            t_sel = t_out[:, width - 1 : width - 1 + n].to(s_sel.device)
        kwargs = dict(
            kind=self.args.loss_kind,
            beta=self.args.beta,
            alpha=self.args.alpha,
            temperature=self.args.loss_temperature,
            labels=labels,
            ignore_index=IGNORE_INDEX,
            reduction=self.args.loss_reduction,
            num_items_in_batch=divisor,
            weight_hard_loss=self.args.weight_hard_loss,
            weight_soft_loss=self.args.weight_soft_loss,
            hard_labels=hard_labels,
        )
        if self.args.loss_kind == SAMPLED_KIND:  # the teacher's tokens carry the importance weight p_S / p_T
            kwargs.update(discount=self.args.sampled_discount, importance_cap=self.args.sampled_importance_cap,
                          teacher_sampled=from_teacher)
        v = self.vocab_size
        if fused:
            s_proc, t_proc = self._fused_heads["student"], self._fused_heads["teacher"]
            if s_proc is None or t_proc is None:
                raise RuntimeError("the fused loss needs both models' logit processing (see _check_fused_heads)")
            loss = fused_linear_distill_loss(
                s_sel,
                s_head.weight[:v],
                t_sel.to(t_head.weight.dtype),
                t_head.weight[:v].to(s_sel.device),
                student_bias=None if s_head.bias is None else s_head.bias[:v],
                teacher_bias=None if t_head.bias is None else t_head.bias[:v].to(s_sel.device),
                student_logit_scale=s_proc.logit_scale,
                teacher_logit_scale=t_proc.logit_scale,
                student_softcap=s_proc.softcap,
                teacher_softcap=t_proc.softcap,
                **kwargs,
            )
        else:
            loss = distill_loss(s_sel[..., :v], t_sel[..., :v], **kwargs)
        if world > 1 and not self.loss_is_scaled_for_ga:
            if mode == "train":
                loss = loss * world  # DDP averages gradients over processes; this makes it a global token mean
            else:  # every process reports the global mean (Trainer keeps some processes' values of a last step)
                loss = self.accelerator.reduce(loss.detach(), reduction="sum")

        self._record(mode, valid, from_teacher, count, gen, real)
        return (loss, None) if return_outputs else loss

    # ------------------------------------------------------------------------------------------------
    # metrics

    @torch.no_grad()
    def _record(self, mode, valid, from_teacher, count, gen, real=None) -> None:
        """Adds this step's generation statistics, summed over processes, to the metrics to be logged
        (`real`: the rows to count, see `_real_rows`)."""
        rows = valid.shape[0] if real is None else real.sum()
        stats = [float(rows) if real is None else rows, valid.sum(), from_teacher.sum(), count]
        has_switch = gen is not None and self.args.policy in SWITCH_POLICIES
        hist = None
        if has_switch:
            switched = gen.switch_position >= 0
            div = gen.divergence
            finite = ~torch.isnan(div)
            if real is not None:
                switched, finite = switched & real, finite & real[:, None]
            stats += [
                switched.sum(),
                torch.where(switched, gen.switch_position, 0).sum(),
                torch.where(finite, div, 0).sum(),
                finite.sum(),
            ]
            counted = torch.ones_like(switched) if real is None else real
            hist = torch.zeros(len(self.switch_position_counts), dtype=torch.float64, device=valid.device)
            hist.scatter_add_(0, (gen.switch_position + 1).clamp(0, len(hist) - 1), counted.double())
        device = valid.device
        vec = torch.stack([torch.as_tensor(s, dtype=torch.float64, device=device) for s in stats])
        if hist is not None:
            vec = torch.cat([vec, hist])
        if self.accelerator.num_processes > 1:
            vec = self.accelerator.reduce(vec, reduction="sum")
        vals = vec.tolist()
        if hist is not None and mode == "train":
            for i, c in enumerate(vals[len(stats):]):
                self.switch_position_counts[i] += int(c)
        m = self._metrics[mode]
        m["response_tokens"].append(vals[1])
        m["loss_tokens"].append(vals[3])
        if gen is not None:
            m["teacher_token_fraction"].append(vals[2] / max(vals[1], 1.0))
            m["mean_lookahead"].append(gen.mean_lookahead)
        if has_switch:
            m["switch_rate"].append(vals[4] / max(vals[0], 1.0))
            if vals[4] > 0:
                m["mean_switch_position"].append(vals[5] / vals[4])
            if vals[7] > 0:
                m["mean_exploration_divergence"].append(vals[6] / vals[7])
        m["generation_seconds"].append(self._last_generation_seconds)
        self._last_tokens = vals[1]

    def _real_rows(self, rows: int, device) -> torch.Tensor:
        """[rows] bool, False for the rows accelerate repeats to give every process a full last evaluation
        step (the rows its `gather_for_metrics` drops: past the dataset's remainder, in process order)."""
        real = torch.ones(rows, dtype=torch.bool, device=device)
        state = self.accelerator.gradient_state
        if self.accelerator.num_processes > 1 and state.end_of_dataloader and state.remainder > 0:
            first = self.accelerator.process_index * rows
            real = first + torch.arange(rows, device=device) < state.remainder
        return real

    def training_step(self, model, inputs, num_items_in_batch=None):
        start = time.perf_counter()
        loss = super().training_step(model, inputs, num_items_in_batch)
        total = time.perf_counter() - start
        m = self._metrics["train"]
        m["train_seconds"].append(max(total - self._last_generation_seconds, 0.0))
        m["tokens_per_second"].append(self._last_tokens / total if total > 0 else math.nan)
        return loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the means of the generation metrics since the last log (prefixed `eval_` in evaluation)."""
        mode = "train" if self.model.training else "eval"
        sums = {"response_tokens", "loss_tokens", "generation_seconds", "train_seconds"}
        metrics = {k: (sum(v) if k in sums else sum(v) / len(v)) for k, v in self._metrics[mode].items() if v}
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs.update(metrics)  # in place: Trainer.evaluate returns the dict it logs, so it holds these too
        self._metrics[mode].clear()
        super().log(logs, start_time)  # a NaN is logged as NaN (logging_nan_inf_filter=False), then stops the run
        check_logs(logs, step=self.state.global_step, since=self._log_since)

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
        """Trainer's log / evaluate / save point, remembering the step of the previous log (the steps a
        logged loss covers)."""
        self._log_since = self._globalstep_last_logged
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    # ------------------------------------------------------------------------------------------------
    # atomic checkpoints

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None):
        """Trainer.train, after putting back a checkpoint that a run killed while replacing it had moved
        aside (`adaswitch.train.checkpoint.recover`), so `resume_from_checkpoint=True` finds it, and after
        restoring the checkpoint's `switch_position_counts` and `lookahead_stats` (adaswitch.train.run_state)."""
        if self.args.should_save and resume_from_checkpoint not in (None, False):
            recover(self.args.output_dir)
        if resume_from_checkpoint is True:  # as Trainer resolves it (it raises when there is none)
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            check_resume(resume_from_checkpoint, self.args)  # same settings, steps left, whole files
            self.switch_position_counts = load_switch_counts(
                resume_from_checkpoint, len(self.switch_position_counts)
            )
            self.lookahead_stats = load_lookahead_stats(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        with _naming_checkpoint_file(resume_from_checkpoint, "the model weights (model.safetensors)"):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint):
        with _naming_checkpoint_file(checkpoint, "the optimizer or scheduler state (optimizer.pt, scheduler.pt)"):
            return super()._load_optimizer_and_scheduler(checkpoint)

    def _load_rng_state(self, checkpoint):
        with _naming_checkpoint_file(checkpoint, "the random number generator state (rng_state.pth)"):
            return super()._load_rng_state(checkpoint)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Trainer.save_model, but written under `output_dir/.staging-model/` and moved into place file by
        file once complete (a full disk or a kill leaves the previous files as they were and no partial
        ones), only when the weights are finite, with the modes open() gives (not 0600). Checkpoints
        (`_internal_call`) are staged by `_save_checkpoint` instead."""
        if _internal_call:
            return super().save_model(output_dir, _internal_call=True)
        output_dir = os.fspath(output_dir if output_dir is not None else self.args.output_dir)
        if not self.is_fsdp_enabled:
            check_weights(self.accelerator.unwrap_model(self.model), what="the student",
                          when=f"before saving it to {output_dir!r}")
        staging = os.path.join(output_dir, MODEL_STAGING)
        if self.args.should_save and os.path.isdir(staging):
            shutil.rmtree(staging)  # left by a run killed while saving
        self.accelerator.wait_for_everyone()
        try:
            super().save_model(staging, _internal_call=True)
            if self.args.should_save:
                normalize_modes(staging)
                fsync_tree(staging)
        except Exception as exc:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, OSError) or disk_full(exc, output_dir):
                kept = "nothing in it was replaced" + _last_checkpoint_note(self.args.output_dir)
                raise write_error(exc, output_dir, kept=kept) from exc
            raise
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            names = publish_files(staging, output_dir)
            _remove_stale_weights(output_dir, names)
        self.accelerator.wait_for_everyone()
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_checkpoint(self, model, trial):
        """Trainer writes a checkpoint in place (a crash leaves a partial `checkpoint-N` that resume would
        pick); here it is written under `.staging-N/` and renamed once complete, so `checkpoint-N` either
        exists whole or not at all. (With push_to_hub, Trainer uploads from the folder it wrote, so
        its in-place save is kept.)"""
        if self.args.push_to_hub:
            super()._save_checkpoint(model, trial)  # the counts go up with the next push
            if self.args.should_save:
                step = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
                folder = os.path.join(self._get_output_dir(trial=trial), step)
                save_run_state(folder, self.switch_position_counts, self.lookahead_stats)
                save_run_settings(folder, self.args)
            return
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, f"{STAGING_PREFIX}{self.state.global_step}")
        written, final = os.path.join(staging, name), os.path.join(run_dir, name)
        if self.args.should_save:
            recover(run_dir)  # a checkpoint moved aside by a save killed mid-replace is put back first
            if os.path.isdir(staging):
                shutil.rmtree(staging)  # left by a run killed while saving
        if not self.is_fsdp_enabled:  # a NaN run is stopped before it overwrites a good checkpoint
            check_weights(self.accelerator.unwrap_model(self.model), what="the student", when=f"before saving {name}")
        self.accelerator.wait_for_everyone()
        self._get_output_dir = lambda trial=None: staging
        try:
            try:
                super()._save_checkpoint(model, trial)
            finally:
                del self._get_output_dir  # back to the class's method
            best = self.state.best_model_checkpoint
            if best and best.startswith(staging):  # Trainer recorded the staging path: point at the final one
                self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
                if self.args.should_save:
                    self.state.save_to_json(os.path.join(written, TRAINER_STATE_NAME))
            if self.args.should_save:
                save_run_state(written, self.switch_position_counts, self.lookahead_stats)
                save_run_settings(written, self.args)
                normalize_modes(written)
        except Exception as exc:  # a failed write (a full disk): no partial checkpoint is left behind
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            if isinstance(exc, OSError) or disk_full(exc, run_dir):
                kept = "the partial checkpoint was removed" + _last_checkpoint_note(run_dir)
                raise write_error(exc, final, kept=kept, fix="free space there, then resume the run from its last "
                                  "checkpoint (--resume-from-checkpoint last)") from exc
            raise
        self.accelerator.wait_for_everyone()  # every process has written its files (e.g. its RNG state)
        if self.args.should_save:
            # fsync, then one rename (or one atomic exchange when the step is saved again), see checkpoint.py
            publish(written, final, staging=staging)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()


@contextlib.contextmanager
def _naming_checkpoint_file(checkpoint, what: str):
    """Turns a failure to load part of a checkpoint (a truncated file, a pickle that is not weights-only) into a
    ResumeError naming the checkpoint and the file, instead of an error from deep inside torch."""
    try:
        yield
    except (ResumeError, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        why = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
        raise ResumeError(
            f"resume_from_checkpoint: cannot load {what} of {os.fspath(checkpoint)!r} ({why}); the file is damaged or "
            "was not written by a Trainer (only weights-only files are loaded): resume from another checkpoint-N"
        ) from exc


def _last_checkpoint_note(run_dir) -> str:
    last = get_last_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    return f"; the last complete checkpoint is {last!r}" if last else ""


def _remove_stale_weights(output_dir: str, kept: list[str]) -> None:
    """Removes the weight files of an earlier save in `output_dir` that the new save did not write (e.g. the
    shards of a model saved in more pieces), as save_pretrained does in the directory it writes."""
    for name in os.listdir(output_dir):
        stem = name.split(".", 1)[0].split("-0", 1)[0]
        weights = name.endswith((".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json"))
        if weights and stem in _WEIGHT_FILES and name not in kept and os.path.isfile(os.path.join(output_dir, name)):
            os.remove(os.path.join(output_dir, name))
