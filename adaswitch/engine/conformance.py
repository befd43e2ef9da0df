"""Checks that `generate` is right for a given model pair, against what a user trusts.

`generate` replaces a model's own mask building, cache and attention dispatch (`adaswitch.engine.cache`),
so for every architecture its tokens are compared with:

* transformers' own `model.generate` (greedy, left-padded batch) for the Teacher and Student policies;
* a no-cache reference (`nocache_reference`) that re-runs both models on each row's whole unpadded prefix
  at every step and decides with `fused_step`: no cache, no mask, no padding, so it cannot share a bug
  with the engine's cache (step mode == lookahead mode alone could);
* lookahead mode (the student drafts, the teacher scores a block in one forward).

`check_pair` runs them all and returns {check name: passed}; the model-zoo tests and the README's
"Supported models" table come from it. Models are small enough here that the no-cache reference's
O(N^2) forwards are cheap; on a real model use few rows and a short budget.
"""

from __future__ import annotations

import torch

from adaswitch.engine.generate import generate
from adaswitch.ops.step import SwitchState, fused_step
from adaswitch.policies import SKD, AdaSwitch, Sampling, Student, Teacher

GREEDY = Sampling(temperature=0)
# Settings under which tiny random models switch / reject within a few tokens, so the checks see it happen.
CHECK_POLICIES = (("adaswitch", AdaSwitch(window=2, k=1.1, warmup=2)), ("skd", SKD(top_k=100)))


@torch.no_grad()
def nocache_reference(student, teacher, input_ids, attention_mask, policy, *, max_new_tokens: int,
                      eos_token_id: int, pad_token_id: int, vocab_size: int, seed: int = 0):
    """(response [B, N], from_teacher [B, N], switch_position [B]) of `policy`, each step's logits from a
    full forward of each model over each row's unpadded prompt + response so far (positions 0..n-1)."""
    b = input_ids.shape[0]
    window = policy.window if isinstance(policy, AdaSwitch) else 1
    state = SwitchState.new(b, window, input_ids.device)
    keys = torch.arange(b, device=input_ids.device)
    rows = [input_ids[r][attention_mask[r].bool()].tolist() for r in range(b)]
    tokens, from_teacher = [], []

    def last_logits(model):
        if model is None:
            return None
        out = [model(input_ids=torch.tensor([row], device=input_ids.device)).logits[0, -1, :vocab_size]
               for row in rows]
        return torch.stack(out)

    for pos in range(max_new_tokens):
        ls = last_logits(student if policy.uses_student else None)
        lt = last_logits(teacher if policy.uses_teacher else None)
        out = fused_step(ls, lt, policy, state, seed=seed, keys=keys,
                         position=torch.full((b,), pos, device=input_ids.device), eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id, impl="torch")
        for r in range(b):
            rows[r].append(int(out.token[r]))
        tokens.append(out.token)
        from_teacher.append(out.from_teacher)
    response, from_teacher = torch.stack(tokens, 1), torch.stack(from_teacher, 1)
    finished_before = torch.cumsum((response == eos_token_id).long(), 1) - (response == eos_token_id).long()
    from_teacher = from_teacher & (finished_before == 0)
    return response, from_teacher, state.switch_pos


def greedy_matches_transformers(model, input_ids, attention_mask, *, role: str, max_new_tokens: int,
                                eos_token_id: int, pad_token_id: int) -> bool:
    """Greedy Teacher (role "teacher") or Student (role "student") tokens equal `model.generate`'s."""
    ref = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad_token_id, eos_token_id=eos_token_id)[:, input_ids.shape[1]:]
    if role == "teacher":
        out = generate(None, model, input_ids, attention_mask, policy=Teacher(GREEDY), max_new_tokens=max_new_tokens,
                       eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    else:
        out = generate(model, None, input_ids, attention_mask, policy=Student(GREEDY), max_new_tokens=max_new_tokens,
                       eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    width = ref.shape[1]
    return bool(torch.equal(out.response[:, :width], ref)
                and (out.response[:, width:] == pad_token_id).all())


def _same(out, ref) -> bool:
    response, from_teacher, switch = ref
    valid = torch.arange(response.shape[1])[None, :] < out.lengths[:, None]
    response = torch.where(valid, response, torch.full_like(response, -1))
    got = torch.where(valid, out.response, torch.full_like(out.response, -1))
    switch = torch.where((switch >= 0) & (switch < out.lengths), switch, torch.full_like(switch, -1))
    return bool(torch.equal(got, response) and torch.equal(out.from_teacher, from_teacher & valid)
                and torch.equal(out.switch_position, switch))


def check_pair(student, teacher, input_ids, attention_mask, *, max_new_tokens: int, eos_token_id: int,
               pad_token_id: int, vocab_size: int, lookahead: int = 3,
               policies=CHECK_POLICIES,
               seed: int = 0) -> dict:
    """{"<policy>-step": step mode == no-cache reference, "<policy>-lookahead": lookahead == reference,
    "<policy>-switched" / "-rejected": the property under test occurred (some rows switched / some
    student tokens were replaced, others not)}."""
    kw = dict(max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
              vocab_size=vocab_size, seed=seed)
    results = {}
    for name, policy in policies:
        ref = nocache_reference(student, teacher, input_ids, attention_mask, policy, **kw)
        step = generate(student, teacher, input_ids, attention_mask, policy=policy, **kw)
        look = generate(student, teacher, input_ids, attention_mask, policy=policy, lookahead=lookahead, **kw)
        results[f"{name}-step"] = _same(step, ref)
        results[f"{name}-lookahead"] = _same(look, ref)
        if isinstance(policy, AdaSwitch):
            switched = step.switch_position >= 0
            results[f"{name}-switched"] = bool(switched.any() and (step.switch_position != 0).any())
        else:
            replaced = step.from_teacher.any(1)
            results[f"{name}-rejected"] = bool(replaced.any() and (~step.from_teacher & (
                torch.arange(max_new_tokens)[None, :] < step.lengths[:, None])).any())
    return results
