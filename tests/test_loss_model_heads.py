"""The fused LM-head loss is the loss of the models' own logits, whatever a model family does to its LM
head's output (Cohere's logit_scale, Granite's logits_scaling, Gemma 2/3's final softcap, a biased head).

Op level: `fused_linear_distill_loss` with biases, logit scales and softcaps against float64 autograd on
the plain formula (values and gradients of hidden states, weight and bias). Distiller level: tiny
random-init models of each family (vocab 300, hidden 32, 2 layers); one training step's loss equals
`distill_loss` on `model(...).logits` of both models, the fused path is the one taken, its gradients
equal the logits path's, and a model whose logits the fused loss cannot form falls back to its logits.
"""

import logging

import datasets
import pytest
import torch
import transformers
from scripts.tiny_run import rows
from tiny_models import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, tiny_tokenizer

from adaswitch import DistillConfig, Distiller
from adaswitch._backend import native_available, native_ops, triton_available
from adaswitch.ops import FusedLinearDistillLoss, distill_loss, fused_linear_distill_loss
from adaswitch.ops.fused_linear import lm_head_logits
from adaswitch.ops.loss import reference_distill_loss
from adaswitch.train import distiller as distiller_module
from adaswitch.train.distiller import LogitProcessing, logit_processing, verify_fused_head

IMPLS = (
    ["torch"]
    + (["native"] if native_available() and hasattr(native_ops(), "distill_loss_rows") else [])
    + (["triton"] if triton_available(torch.device("cpu")) else [])
)
HEADS = {  # (logit_scale, softcap) of student and teacher
    "scale": ((0.25, None), (1 / 8, None)),
    "softcap": ((1.0, 1.5), (1.0, 2.0)),
    "both": ((3.0, 2.0), (0.5, None)),
}


# ----------------------------------------------------------------------------------------------------------
# the op


def _processed(h, w, b, scale, cap):
    z = (h @ w.T + (0 if b is None else b)) * scale
    return z if cap is None else cap * torch.tanh(z / cap)


def _problem(dtype, n=11, hs=8, ht=12, v=29):
    g = torch.Generator().manual_seed(3)
    mk = lambda *shape: (2 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)  # noqa: E731
    return dict(hs=mk(n, hs), ws=mk(v, hs), bs=mk(v), ht=mk(n, ht), wt=mk(v, ht), bt=mk(v))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
def test_processing_matches_float64_autograd(impl, heads, reduction, kind):
    """Loss and gradients of hidden, weight and bias against autograd on softcap(scale * (h W^T + b))."""
    dtype = torch.float32 if impl == "triton" else torch.float64  # the Triton kernel computes in fp32
    tol = 2e-5 if dtype == torch.float32 else 1e-9
    (s_scale, s_cap), (t_scale, t_cap) = HEADS[heads]
    p = _problem(dtype)
    labels = torch.randint(0, 29, (11,))
    labels[[1, 6]] = -100
    go = (torch.randn(11) if reduction == "none" else torch.tensor(0.75)).double()  # fp32 values: see backward
    kw = dict(labels=labels, reduction=reduction, temperature=1.5, beta=0.3)

    leaves = [p[k].double().clone().requires_grad_() for k in ("hs", "ws", "bs")]
    zs = _processed(*leaves, s_scale, s_cap)
    zt = _processed(p["ht"].double(), p["wt"].double(), p["bt"].double(), t_scale, t_cap)
    ref = reference_distill_loss(zs, zt, kind, **kw)
    ref.backward(go)

    ours_leaves = [p[k].clone().requires_grad_() for k in ("hs", "ws", "bs")]
    loss = fused_linear_distill_loss(
        ours_leaves[0], ours_leaves[1], p["ht"], p["wt"], kind, student_bias=ours_leaves[2], teacher_bias=p["bt"],
        student_logit_scale=s_scale, teacher_logit_scale=t_scale, student_softcap=s_cap, teacher_softcap=t_cap,
        chunk_size=4, impl=impl, **kw,
    )
    loss.backward(go.to(loss.dtype))
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=tol, atol=tol)
    for ours, theirs in zip(ours_leaves, leaves):
        assert ours.grad.dtype == dtype
        assert (ours.grad.double() - theirs.grad).abs().max() <= tol * theirs.grad.abs().max()
    # the processing matters here: without it the loss is visibly different
    plain = fused_linear_distill_loss(p["hs"], p["ws"], p["ht"], p["wt"], kind, student_bias=p["bs"],
                                      teacher_bias=p["bt"], impl=impl, **kw)
    assert (plain.double() - ref.detach()).abs().max() > 1e-3


def test_lm_head_logits_and_module():
    p = _problem(torch.float32)
    z = lm_head_logits(p["hs"].reshape(1, 11, 8), p["ws"], p["bs"], logit_scale=0.5, softcap=3.0)
    assert z.shape == (1, 11, 29) and z.dtype == torch.float32
    torch.testing.assert_close(z[0], _processed(p["hs"], p["ws"], p["bs"], 0.5, 3.0))
    mod = FusedLinearDistillLoss("jsd", student_logit_scale=0.5, teacher_softcap=2.0)
    expected = fused_linear_distill_loss(p["hs"], p["ws"], p["ht"], p["wt"], "jsd", student_logit_scale=0.5,
                                         teacher_softcap=2.0)
    torch.testing.assert_close(mod(p["hs"], p["ws"], p["ht"], p["wt"]), expected)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(student_logit_scale=0.0), "student_logit_scale"),
        (dict(teacher_logit_scale=float("nan")), "teacher_logit_scale"),
        (dict(student_logit_scale=True), "student_logit_scale"),
        (dict(student_softcap=-1.0), "student_softcap"),
        (dict(teacher_softcap=float("inf")), "teacher_softcap"),
    ],
)
def test_bad_processing(kw, match):
    p = _problem(torch.float32)
    with pytest.raises(ValueError, match=match):
        fused_linear_distill_loss(p["hs"], p["ws"], p["ht"], p["wt"], **kw)
    with pytest.raises(ValueError, match=match):
        FusedLinearDistillLoss(**kw)


# ----------------------------------------------------------------------------------------------------------
# model families

_LLAMA_LIKE = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64,
)
FAMILIES = {  # name: (config class, model class, config kwargs, the processing its forward applies)
    "llama": ("LlamaConfig", "LlamaForCausalLM", _LLAMA_LIKE, LogitProcessing()),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(_LLAMA_LIKE, logit_scale=0.25), LogitProcessing(0.25)),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(_LLAMA_LIKE, logit_scale=3.0), LogitProcessing(3.0)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(_LLAMA_LIKE, logits_scaling=4.0), LogitProcessing(0.25)),
    "gemma2": (
        "Gemma2Config", "Gemma2ForCausalLM",
        dict(_LLAMA_LIKE, head_dim=8, query_pre_attn_scalar=8, sliding_window=16, final_logit_softcapping=1.5),
        LogitProcessing(softcap=1.5),
    ),
    "gemma3": (
        "Gemma3TextConfig", "Gemma3ForCausalLM",
        dict(_LLAMA_LIKE, head_dim=8, query_pre_attn_scalar=8, sliding_window=16, final_logit_softcapping=1.5),
        LogitProcessing(softcap=1.5),
    ),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4),
             LogitProcessing()),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(_LLAMA_LIKE, num_key_value_heads=4), LogitProcessing()),
}


def family_model(name, seed):
    config_cls, model_cls, kw, _ = FAMILIES[name]
    config = getattr(transformers, config_cls)(
        vocab_size=VOCAB_SIZE, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        tie_word_embeddings=False, initializer_range=0.2, attn_implementation="eager", **kw,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    head = model.get_output_embeddings()
    if head.bias is not None:  # initialised to zero: make it matter
        with torch.no_grad():
            head.bias.normal_(0.0, 1.0)
    return model


def make_trainer(tmp_path, student, teacher, **kw):
    config = DistillConfig(
        output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, per_device_train_batch_size=4,
        max_new_tokens=5, max_steps=1, save_strategy="no", disable_tqdm=True, policy="dataset",
        loss_kind="jsd", beta=0.3, loss_temperature=1.5, **kw,
    )
    return Distiller(model=student.train(), teacher_model=teacher, args=config,
                     train_dataset=datasets.Dataset.from_list(rows(4)), processing_class=tiny_tokenizer())


def first_batch(trainer):
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, read by training_step
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


@torch.no_grad()
def logits_loss(trainer, batch, drop_processing=False):
    """distill_loss on model(...).logits of both models, one unpadded row at a time (or, with
    `drop_processing`, on lm_head(last hidden state) alone: what the fused loss gave before)."""
    tok, student, teacher = trainer.processing_class, trainer.model, trainer.teacher_model
    s_rows, t_rows = [], []
    for key in batch["example_keys"].tolist():
        row = rows(4)[key]
        p = tok(row["prompt"])["input_ids"]
        c = (tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:5]
        ids = torch.tensor([p + c])
        pair = []
        for model in (student, teacher):
            out = model(ids, output_hidden_states=True)
            z = model.get_output_embeddings()(out.hidden_states[-1]) if drop_processing else out.logits
            pair.append(z[0, len(p) - 1 : -1])
        s_rows.append(pair[0])
        t_rows.append(pair[1])
    return distill_loss(torch.cat(s_rows), torch.cat(t_rows), "jsd", beta=0.3, temperature=1.5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reading_the_processing(family):
    model = family_model(family, 0)
    assert logit_processing(model) == FAMILIES[family][3]
    processing, why = verify_fused_head(model, VOCAB_SIZE)
    assert processing == FAMILIES[family][3], why


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_step_loss_is_the_logits_loss(tmp_path, family):
    trainer = make_trainer(tmp_path, family_model(family, 1), family_model(family, 2))
    assert trainer._fused_heads == {"student": FAMILIES[family][3], "teacher": FAMILIES[family][3]}
    assert trainer._use_fused(trainer.model)  # the fused path, with the processing, is what runs
    batch = first_batch(trainer)
    expected = logits_loss(trainer, batch)
    if family != "llama" and family not in ("gptj", "phi"):
        # the processing matters for these models: dropping it gives a visibly different loss
        assert abs(float(logits_loss(trainer, batch, drop_processing=True)) - float(expected)) > 0.05 * float(expected)
    if family in ("gptj", "phi"):  # so does the head's bias
        assert trainer.model.get_output_embeddings().bias.abs().max() > 0.1

    trainer.model.zero_grad()
    loss = trainer.training_step(trainer.model, batch)
    assert float(loss) == pytest.approx(float(expected), rel=2e-5)
    fused_grads = [p.grad.clone() for p in trainer.model.parameters()]
    trainer._use_fused = lambda model: False
    trainer.model.zero_grad()
    loss_logits = trainer.training_step(trainer.model, batch)
    assert float(loss_logits) == pytest.approx(float(expected), rel=2e-5)
    for a, p in zip(fused_grads, trainer.model.parameters()):
        assert (a - p.grad).abs().max() <= 1e-4 * p.grad.abs().max().clamp_min(1e-6)


class ScaledLlama(transformers.LlamaForCausalLM):
    """A causal LM from outside transformers that processes its logits (unknown to the fused loss)."""

    def forward(self, input_ids=None, logits_to_keep=0, **kwargs):
        out = super().forward(input_ids, logits_to_keep=logits_to_keep, **kwargs)
        out.logits = out.logits * 3.0
        return out


def _scaled_llama(seed):
    plain = family_model("llama", seed)
    model = ScaledLlama(plain.config)
    model.load_state_dict(plain.state_dict())
    return model


def test_unknown_model_falls_back_to_logits(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger=distiller_module.__name__):
        trainer = make_trainer(tmp_path, family_model("llama", 1), _scaled_llama(2))
    assert trainer._fused_heads == {"student": LogitProcessing(), "teacher": None}
    assert not trainer._use_fused(trainer.model)
    assert any("teacher's logits" in r.getMessage() and "unknown" in r.getMessage() for r in caplog.records)
    batch = first_batch(trainer)
    assert float(trainer.training_step(trainer.model, batch)) == pytest.approx(
        float(logits_loss(trainer, batch)), rel=2e-5
    )


def test_misread_processing_fails_the_check(tmp_path, caplog, monkeypatch):
    """A table entry that does not match the forward (here: Granite's read as plain) is caught by the
    start-up check, and the loss takes the logits."""
    monkeypatch.setitem(distiller_module._LOGIT_PROCESSING, "GraniteForCausalLM", lambda m: LogitProcessing())
    with caplog.at_level(logging.WARNING, logger=distiller_module.__name__):
        trainer = make_trainer(tmp_path, family_model("granite", 1), family_model("llama", 2))
    assert trainer._fused_heads == {"student": None, "teacher": LogitProcessing()}
    assert not trainer._use_fused(trainer.model)
    assert any("student's logits" in r.getMessage() and "differ" in r.getMessage() for r in caplog.records)
    batch = first_batch(trainer)
    assert float(trainer.training_step(trainer.model, batch)) == pytest.approx(
        float(logits_loss(trainer, batch)), rel=2e-5
    )


def test_check_leaves_modes_and_rng_alone():
    model = family_model("gemma2", 0).train()
    model.model.layers[0].eval()
    state = torch.get_rng_state()
    verify_fused_head(model, VOCAB_SIZE)
    assert torch.equal(state, torch.get_rng_state())
    assert model.training and not model.model.layers[0].training and model.model.layers[1].training
