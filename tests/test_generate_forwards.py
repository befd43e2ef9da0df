"""The forwards `generate` runs, counted (not timed): a cost that is not inherent to running both models fails
here if it comes back.

- the prompt is prefilled whole and its last column's logits are response position 0's: a batch whose longest
  row has L tokens runs each model L times (the prefill and L - 1 one-position forwards), the teacher's states
  included;
- a block of G drafts runs G one-position student forwards and one teacher forward of G positions (the first
  block: G - 1, its first position's logits are the prefill's);
- the student stops once every live row has switched (AdaSwitch, step mode, sync_every = 1).
"""

import pytest
from tiny_models import EOS_ID, PAD_ID, VOCAB_SIZE

from adaswitch import SKD, AdaSwitch, Student, Teacher, generate

pytestmark = pytest.mark.usefixtures("one_thread")
# the fixtures teacher, student and prompts (B prompts of up to P tokens): tests/conftest.py

N, B, P = 12, 4, 6


class Calls:
    """Positions of every forward of a model's decoder (a forward pre-hook on it)."""

    def __init__(self, model):
        self.positions = []
        decoder = model.get_decoder()
        self.handle = decoder.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.positions.append(int(ids.shape[1]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def run(student, teacher, prompts, policy, **kw):
    ids, mask = prompts
    kw.update(policy=policy, eos_token_id=EOS_ID, pad_token_id=PAD_ID, vocab_size=VOCAB_SIZE, max_new_tokens=N,
              sync_every=1)
    with Calls(student) as s, Calls(teacher) as t:
        out = generate(student, teacher, ids, mask, **kw)
    return out, s.positions, t.positions


@pytest.mark.parametrize("states", [False, True])
def test_each_model_runs_once_per_response_position(student, teacher, prompts, states):
    width = prompts[0].shape[1]
    out, s, t = run(student, teacher, prompts, SKD(top_k=3), lookahead=0, return_teacher_states=states)
    longest = int(out.lengths.max())
    assert s == t == [width] + [1] * (longest - 1)  # the prefill, then one position per later token
    out, s, _ = run(student, teacher, prompts, Student(), lookahead=0)
    assert s == [width] + [1] * (int(out.lengths.max()) - 1)
    out, _, t = run(student, teacher, prompts, Teacher(), lookahead=0)
    assert t == [width] + [1] * (int(out.lengths.max()) - 1)


def test_blocks_run_g_student_forwards_and_one_teacher_forward(student, teacher, prompts):
    g = 4
    out, s, t = run(student, teacher, prompts, SKD(top_k=150), lookahead=g)  # half the vocabulary: drafts kept
    width = prompts[0].shape[1]
    blocks = len(t) - 1
    assert t[0] == s[0] == width
    assert t[1:] == [g - 1] + [g] * (blocks - 1)  # the first block's position 0: the prefill's logits
    assert len(s) - 1 == g * blocks - 1
    assert blocks < int(out.lengths.max())  # blocks kept more than one token each


def test_the_student_stops_once_every_row_has_switched(student, teacher, prompts):
    out, s, t = run(student, teacher, prompts, AdaSwitch(window=1, k=1e-3), lookahead=0)
    assert (out.switch_position >= 0).all()
    last_switch = int(out.switch_position.max())
    assert len(s) == last_switch + 1  # forwards for positions 0 .. last switch (the prefill gives position 0)
    assert len(t) == int(out.lengths.max())
