"""`generate`: distillation sequences under any policy of docs/spec.md section 2, decided on the device.

Design (gpt-fast style: prefill, then a short per-token loop; details fixed here):

* Invariant: each model's next input is `last` [B], the newest token of every row. The prompt is
  prefilled whole, the LM head on its last column only: those logits (and the teacher's state there) are
  the first iteration's, which so runs no forward for response position 0 (`_Run.first`); from then on the
  loop feeds `last` (generated tokens). Step mode and lookahead mode share this invariant, so a run can go
  from one to the other.
* Caches (`adaswitch.engine.cache.RowCache`): preallocated per model; each row's start and length live
  on the device; a forward writes each row at its own length, rollback lowers lengths. Rows that are
  no longer live (finished, or at max_new_tokens) give back the column of every dummy forward, so a row
  never holds more than prompt + max_new_tokens columns. On CUDA with flash-attn and fp16 / bf16 models
  the attention is `flash_attn_with_kvcache` on the row bounds (`adaswitch.engine.attention`), else
  the model's SDPA with an explicit mask.
* Step mode (lookahead=0), per iteration: forward the models the policy needs on `last`,
  `adaswitch.ops.fused_step` picks every row's token (finished rows get pad), the token is scattered
  into the output buffers at each row's response position (device tensors, never a Python int).
* Lookahead mode (lookahead=G, AdaSwitch and SKD), per iteration ("block"): the student drafts G tokens
  with G one-token forwards, each drawn by `fused_step` under `Student(policy.student_sampling)` (stream
  0 at the same positions as step mode, same implementation); the teacher scores [last, d_0 .. d_{G-2}]
  in one forward; `fused_lookahead` finds each row's first switch / rejection; each row keeps
  `accepted` drafts plus, where it stopped, the teacher's token; both caches roll back the rejected
  drafts (lengths only). A row that has already switched takes one teacher token
  per block.
* Speculative guidance (guidance="speculative", AdaSwitch and its controls, Teacher): blocks as above,
  except that both models also take d_{G-1} (the teacher scores [last, d_0 .. d_{G-1}]); then from each
  row's stop (its switch; index 0 once switched, and always under Teacher) `fused_speculative` accepts
  drafts with probability min(1, p_T / p_S) and, at the first rejection, draws from
  norm(max(0, p_T - p_S)); a row that accepted every draft takes a bonus token from p_T at index G:
  up to G + 1 teacher tokens per block, each distributed as the teacher's own draw; the run stays in
  blocks after switches. Caches roll back as in lookahead.
* Teacher states (return_teacher_states=True): the teacher's forwards also return their last hidden
  states, scattered like the tokens into a [B, N, H] buffer (and a mask of where the teacher ran), so a
  loss can take them instead of running the teacher again.
* Host reads (`sync_every`: 16 on an accelerator, 1 on the CPU, where a read is free, unless given):
  about every `sync_every` tokens the host reads one small tensor (all rows done?, all rows
  switched?, least response position of unfinished rows) -- one device-to-host sync: every sync_every
  steps, or every ceil(sync_every / G) blocks while blocks keep giving G tokens (else every sync_every
  blocks), so at most ceil(max_new_tokens / sync_every) + 1 reads in the loop. It stops early
  when all rows are done; an AdaSwitch run leaves lookahead mode once some row has switched (that row
  gains one token per block, so blocks would not shorten the run) and stops running the student once
  every row has switched. Every iteration moves each unfinished row forward by >= 1 token, so at most
  max_new_tokens iterations run and the caches hold prompt + max_new_tokens + max(1, G) columns (one
  more under speculative guidance).
  Argument validation before the loop (adaswitch/engine/arguments.py) does a few more reads (prompt
  padding, token id range).
* Mixed: the per-sequence coin is `adaswitch.ops.rng.mixed_coin`; rows that lose it take `completions`
  (the dataset's responses, right-padded with pad) and are marked finished before the loop.
* Output: fixed shapes. Everything after a row's first EOS is pad; `lengths` counts response tokens up
  to and including EOS (dataset rows without EOS: their non-pad tokens).
* cuda_graph=True: each kind of iteration (block / step, with or without the student) runs once
  eagerly (warm-up: Triton compiles, cuBLAS initialises), is then captured into a CUDA graph and
  replayed; everything that changes per iteration is a device tensor updated in place.
* Vocabulary: logits are cut to `vocab_size`, so no id >= vocab_size is ever sampled (default:
  len(tokenizer) when `tokenizer` is given, else the smaller of the two models' vocabularies; with
  embedding matrices padded past the tokenizer's vocabulary, pass `tokenizer` or vocab_size so the
  padded rows are never sampled). The smaller vocabulary is right for models that share a tokenizer (both
  heads cover it, so only the larger head's padding rows are cut); `tokenizer` also cuts the padding both
  have. Models whose configs disagree on bos/eos/pad ids do not share a tokenizer: an error.
* Attention: full, sliding-window and hybrid (per-layer) attention, SDPA or eager, MHA / GQA / MQA, ALiBi,
  rotary or learned positions: the cache's masks follow `adaswitch.engine.architecture`.
* Not supported (clear errors before any work): layers that are not attention over a KV cache (linear
  attention, convolutions, state-space blocks, chunked attention), models that are not decoder-only.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from adaswitch.engine.architecture import alibi_adapter
from adaswitch.engine.arguments import GUIDANCES, check_arguments, default_sync_every  # noqa: F401 (re-exported)
from adaswitch.engine.attention import flash_available, kvcache_attention
from adaswitch.engine.cache import RowCache
from adaswitch.engine.lookahead import ForwardClock, LookaheadStats, Rows, choose, iteration_key
from adaswitch.ops import rng
from adaswitch.ops.speculative import fused_speculative
from adaswitch.ops.step import SwitchState, fused_lookahead, fused_step, schedule
from adaswitch.policies import AdaSwitch, Mixed, Student, Teacher


@dataclass
class GenerationOutput:
    """Result of `generate`; B rows, P prompt columns, N = max_new_tokens.

    sequences: int64 [B, P + N], the (left-padded) prompt followed by the response.
    response: int64 [B, N], response tokens; pad after EOS / past the row's length.
    attention_mask: int64 [B, P + N], 1 on real prompt tokens and on the first `lengths` response tokens.
    from_teacher: bool [B, N], the teacher produced the token.
    switch_position: int64 [B], AdaSwitch's switch position (response index), -1 if none.
    divergence: float32 [B, N], AdaSwitch's divergence at each exploration position, NaN elsewhere.
    lengths: int64 [B], response lengths (including the EOS token when there is one).
    from_dataset: bool [B], Mixed only: the row is the dataset's completion.
    prompt_length: P.
    mean_lookahead: the mean draft length G over the decode loop's iterations (0 for a token-by-token one).
    teacher_hidden_states: [B, N, H] (return_teacher_states=True, else None): the teacher's last hidden
        state (after its final norm, the LM head's input) at the position that predicts response token i,
        where the teacher ran for that token; zeros elsewhere.
    teacher_states_mask: bool [B, N] (return_teacher_states=True, else None): where those states exist
        (every response token the teacher ran on).
    """

    sequences: torch.Tensor
    response: torch.Tensor
    attention_mask: torch.Tensor
    from_teacher: torch.Tensor
    switch_position: torch.Tensor
    divergence: torch.Tensor
    lengths: torch.Tensor
    from_dataset: torch.Tensor
    prompt_length: int
    teacher_hidden_states: torch.Tensor | None = None
    teacher_states_mask: torch.Tensor | None = None
    mean_lookahead: float = 0.0


# ------------------------------------------------------------------------------------------ engine

class _Flags(NamedTuple):
    """One host read of the loop's state."""

    done: bool  # no live row (every row finished or at max_new_tokens)
    exploring: bool  # some live row has not switched
    switched: bool  # some live row has switched
    least: int  # least response position of the live rows
    live: int  # live rows
    counts: list  # lookahead="auto": [offered, accepted, verified offered, verified accepted] since the last read


class _Run:
    """All device buffers of one generate call and the two kinds of iteration (step, block)."""

    def __init__(self, student, teacher, input_ids, mask, policy, n, eos, pad, seed, keys, max_lookahead,
                 vocab, completions, impl, attention_scope, layouts, may_guide=False, record_teacher=False,
                 clock=None):
        self.student, self.teacher, self.policy = student, teacher, policy
        self.record = record_teacher and teacher is not None and policy.uses_teacher
        self.hidden = self.ran = None  # teacher states [B, n + 1, H] and where they exist, allocated lazily
        self.n, self.eos, self.pad, self.seed, self.keys = n, eos, pad, seed, keys
        # lookahead="auto": forwards timed, drafts counted (offered, accepted; switched rows' verified drafts)
        self.clock = clock
        self.counts = torch.zeros(4, dtype=torch.long, device=input_ids.device) if clock is not None else None
        self.vocab, self.impl = vocab, impl
        b, p = input_ids.shape
        device = input_ids.device
        self.device = device
        self.run_student = student is not None and not (isinstance(policy, Mixed) and policy.lmbda == 0)
        self.run_teacher = teacher is not None and policy.uses_teacher
        self.state = SwitchState.new(b, policy.window if isinstance(policy, AdaSwitch) else 1, device)
        schedule(policy, self.state, seed, keys)  # the scheduled controls' switch positions, before any graph
        # Output buffers: column n is scratch for writes past the end (rows whose position ran beyond n).
        self.tokens = torch.full((b, n + 1), pad, dtype=torch.long, device=device)
        self.from_teacher = torch.zeros(b, n + 1, dtype=torch.bool, device=device)
        self.divergence = torch.full((b, n + 1), math.nan, dtype=torch.float32, device=device)
        self.pos = torch.zeros(b, dtype=torch.long, device=device)  # each row's next response index
        self.last = input_ids[:, -1].clone()
        self.dataset_rows = torch.zeros(b, dtype=torch.bool, device=device)
        if isinstance(policy, Mixed):
            self.dataset_rows = ~rng.mixed_coin(seed, keys, policy.lmbda)
            self.state.finished |= self.dataset_rows
        self.completions = completions
        if max_lookahead:
            self.draft_policy = Student(policy.student_sampling)
            self.draft_state = SwitchState.new(b, 1, device)
        # Columns: the prompt, <= n - 1 kept tokens fed back, and one forward's transient columns (a guided
        # block's G + 1: its drafts and the bonus position).
        capacity = p - 1 + n + max(1, max_lookahead) + int(may_guide)
        self.caches = {}
        # {"student" | "teacher": (logits [B, 1, V], teacher state [B, 1, H] or None)} of the prompt's last
        # column, from the prefill, until the first iteration that runs the model takes them
        self.first = {}
        for name, model, used in (("student", student, self.run_student),
                                  ("teacher", teacher, self.run_teacher)):
            if used:
                attention = layouts[name]  # read once, by the argument checks
                flash = flash_available(model, attention)
                alibi_adapter(model)
                cache = RowCache(model, b, capacity, device, layout="flash" if flash else "sdpa",
                                 attention=attention, name=name)
                if flash:  # the model's attention is the cache's flash-attn call until the scope closes
                    attention_scope.enter_context(kvcache_attention(model, cache))
                self.caches[name] = cache
                self.first[name] = self._prefill(model, cache, input_ids, mask, self.record and name == "teacher")

    def _prefill(self, model, cache, ids, mask, hidden: bool):
        """The whole prompt [B, P] into the cache: (the logits of its last column [B, 1, V], the last hidden
        state there [B, 1, H] with `hidden`, else None); the LM head runs on that column only."""
        attn, position_ids = cache.prefill_inputs(mask)
        extra = {"output_hidden_states": True} if hidden else {}
        if "logits_to_keep" in inspect.signature(model.forward).parameters:
            extra["logits_to_keep"] = 1
        out = model(input_ids=ids, attention_mask=attn, position_ids=position_ids, cache=cache, use_cache=True,
                    **extra)
        self._advance(cache, ids.shape[1])
        return out.logits[:, -1:, : self.vocab], out.hidden_states[-1][:, -1:] if hidden else None

    def _forward(self, model, cache, ids, hidden=False, logits=True):
        """The model on `ids` through its cache: the logits [B, q, V] (with `hidden`, also the last hidden
        states); None with `logits=False`, whose outputs nothing reads (it only writes keys and values), so the
        LM head is skipped."""
        attn, position_ids = cache.decode_inputs(ids.shape[1])
        if not logits:
            decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
            body, kw = (model, {"logits_to_keep": 1}) if decoder is model else (decoder, {})
            body(input_ids=ids, attention_mask=attn, position_ids=position_ids, cache=cache, use_cache=True, **kw)
            self._advance(cache, ids.shape[1])
            return None
        extra = {"output_hidden_states": True} if hidden else {}
        started = self.clock.start() if self.clock is not None else None
        out = model(input_ids=ids, attention_mask=attn, position_ids=position_ids, cache=cache, **extra)
        if self.clock is not None:
            self.clock.stop(cache.name, ids.shape[1], started)
        self._advance(cache, ids.shape[1])
        if hidden:
            return out.logits[..., : self.vocab], out.hidden_states[-1]
        return out.logits[..., : self.vocab]

    def _teacher_forward(self, ids):
        """(the teacher's logits on `ids` [B, q], its last hidden states with return_teacher_states else None)."""
        if not self.record:
            return self._forward(self.teacher, self.caches["teacher"], ids), None
        return self._forward(self.teacher, self.caches["teacher"], ids, hidden=True)

    def _write_hidden(self, idx, keep, hidden) -> None:
        """Scatter teacher states [B, k, H] at response indices idx [B, k] where keep, else into the scratch
        column (allocated by the first call: H is the first forward's)."""
        if self.hidden is None:
            b, _, h = hidden.shape
            self.hidden = hidden.new_zeros(b, self.n + 1, h)
            self.ran = torch.zeros(b, self.n + 1, dtype=torch.bool, device=self.device)
        idx = torch.where(keep & (idx < self.n), idx, torch.full_like(idx, self.n))
        self.hidden.scatter_(1, idx[:, :, None].expand(-1, -1, hidden.shape[-1]), hidden)
        self.ran.scatter_(1, idx, keep)

    @staticmethod
    def _advance(cache, q: int) -> None:
        if not cache.checked:  # the first forward shows which layers used the cache (Python state, no sync)
            cache.check_layers(cache.name)
            cache.checked = True
        cache.advance(q)

    def _idle(self) -> torch.Tensor:
        """[B] bool: rows that are finished or at max_new_tokens (they run along with the batch)."""
        return self.state.finished | (self.pos >= self.n)

    def _write(self, idx, keep, token, from_teacher, divergence):
        """Scatter [B, k] values at response indices idx where keep, else into the scratch column."""
        idx = torch.where(keep & (idx < self.n), idx, torch.full_like(idx, self.n))
        self.tokens.scatter_(1, idx, token)
        self.from_teacher.scatter_(1, idx, from_teacher)
        self.divergence.scatter_(1, idx, divergence)

    def step(self, use_student: bool) -> None:
        """One token per row: forward on `last` (the first iteration: the prefill's logits), fused_step, write,
        advance."""
        x = self.last[:, None]
        idle = self._idle()  # rows that only run along: their cache column is given back
        first_s = self.first.pop("student", None) if use_student else None
        first_t = self.first.pop("teacher", None) if self.run_teacher else None
        ls = lt = ht = None
        if use_student:
            ls = (first_s[0] if first_s is not None else self._forward(self.student, self.caches["student"], x))[:, 0]
        if self.run_teacher:
            lt, ht = first_t if first_t is not None else self._teacher_forward(x)
            lt = lt[:, 0]
        if ht is not None:
            self._write_hidden(self.pos[:, None], ~idle[:, None], ht)
        if use_student and first_s is None:
            self.caches["student"].rollback(idle.long())
        if self.run_teacher and first_t is None:
            self.caches["teacher"].rollback(idle.long())
        # lookahead="auto" counts drafts: rows exploring before this token's decision
        exploring = ~idle & ~self.state.switched if self.counts is not None else None
        out = fused_step(ls, lt, self.policy, self.state, seed=self.seed, keys=self.keys, position=self.pos,
                         eos_token_id=self.eos, pad_token_id=self.pad, impl=self.impl)
        if self.counts is not None and use_student and not isinstance(self.policy, Teacher):
            # each exploring row offered the student's token as a draft
            self.counts[0] += exploring.sum()
            self.counts[1] += (exploring & ~out.from_teacher).sum()
        keep = torch.ones_like(self.pos, dtype=torch.bool)[:, None]
        self._write(self.pos[:, None], keep, out.token[:, None], out.from_teacher[:, None],
                    out.divergence[:, None])
        self.last.copy_(out.token)
        self.pos += 1

    def block(self, g: int, guided: bool) -> None:
        """Lookahead: G student drafts, one teacher forward, fused_lookahead (and, with speculative guidance,
        fused_speculative from each row's stop, with its bonus token), write, roll back."""
        student, teacher = self.caches["student"], self.caches["teacher"]
        # Columns a block writes to each cache: [last, d_0 .. d_{G-2}]; with guidance also d_{G-1}, so the
        # teacher scores the position after the last draft (the bonus token's distribution).
        width = g + 1 if guided else g
        offsets = torch.arange(width, device=self.device)
        idle = self._idle()
        # lookahead="auto" counts drafts: rows exploring before this block's decisions
        exploring = ~idle & ~self.state.switched if self.counts is not None else None
        cur, drafts, student_logits = self.last, [], []
        # the first iteration: the prefill's logits stand for both models' forward on `last`
        first_s, first_t = self.first.pop("student", None), self.first.pop("teacher", None)
        self.draft_state.finished.zero_()
        for j in range(g):
            if j == 0 and first_s is not None:
                ls = first_s[0][:, 0]
            else:
                ls = self._forward(self.student, student, cur[:, None])[:, 0]
            # The student's draw at response index pos + j (stream 0), by the same implementation as
            # fused_step's; a draft after a drafted EOS is pad and never accepted.
            cur = fused_step(ls, None, self.draft_policy, self.draft_state, seed=self.seed, keys=self.keys,
                             position=self.pos + j, eos_token_id=self.eos, pad_token_id=self.pad,
                             impl=self.impl).token
            drafts.append(cur)
            student_logits.append(ls)
        draft = torch.stack(drafts, 1)
        if guided:  # d_{G-1} into the student's cache too: a row that takes the bonus keeps it
            self._forward(self.student, student, cur[:, None], logits=False)
        ids = torch.cat([self.last[:, None], draft[:, : width - 1]], 1)  # [B, width]
        if first_t is None:
            lt, ht = self._teacher_forward(ids)
        else:  # `last`'s logits from the prefill, the drafts' (if any) from a forward on them
            lt, ht = first_t
            if width > 1:
                rest, rest_h = self._teacher_forward(ids[:, 1:])
                lt = torch.cat([lt, rest], 1)
                ht = torch.cat([ht, rest_h], 1) if ht is not None else None
        student_logits = torch.stack(student_logits, 1)
        finished_before = self.state.finished.clone() if guided else None
        out = fused_lookahead(student_logits, lt[:, :g], draft, self.policy, self.state,
                              seed=self.seed, keys=self.keys, position=self.pos, eos_token_id=self.eos,
                              pad_token_id=self.pad, impl=self.impl)
        a = out.accepted
        divergence = out.divergence
        if self.counts is not None:  # an exploring row offered its drafts up to its stop (switch, rejection)
            self.counts[0] += torch.where(exploring, a + out.from_teacher.long(), 0).sum()
            self.counts[1] += torch.where(exploring, a, 0).sum()
        if guided:
            # From each row's stop (its switch, or index 0 once switched / under Teacher) the teacher's tokens
            # are the drafts it accepts and then its own draw: the residual draw at the first rejection, or
            # the bonus token at index G when it accepted every draft (fused_speculative); instead of one
            # teacher draw per block. The row's EOS follows those tokens.
            spec = fused_speculative(student_logits, lt, draft, torch.where(out.from_teacher, a, g),
                                     student_sampling=self.policy.student_sampling,
                                     teacher_sampling=self.policy.teacher_sampling, seed=self.seed,
                                     keys=self.keys, position=self.pos, eos_token_id=self.eos,
                                     pad_token_id=self.pad, impl=self.impl)
            self.state.finished.copy_(torch.where(out.from_teacher, finished_before | spec.finished,
                                                  self.state.finished))
            end = a + torch.where(out.from_teacher, spec.accepted, 0)
            if self.counts is not None:  # drafts the teacher verified, up to its first rejection
                verifying = out.from_teacher & ~idle
                self.counts[2] += torch.where(verifying, spec.accepted + spec.resampled.long(), 0).sum()
                self.counts[3] += torch.where(verifying, spec.accepted, 0).sum()
            drawn = out.from_teacher & (spec.resampled | spec.bonus)  # the teacher's own draw at index `end`
            at_stop = (offsets[None, :] == end[:, None]) & drawn[:, None]
            keep = (offsets[None, :] < end[:, None]) | at_stop
            padded = torch.cat([draft, torch.full_like(draft[:, :1], self.pad)], 1)  # index G: the bonus
            token = torch.where(at_stop, spec.token[:, None], padded)
            by_teacher = ((offsets[None, :] >= a[:, None]) & out.from_teacher[:, None] & keep) | at_stop
            produced = end + drawn.long()
            divergence = torch.cat([divergence, torch.full_like(divergence[:, :1], math.nan)], 1)
        else:
            at_stop = (offsets[None, :] == a[:, None]) & out.from_teacher[:, None]
            keep = (offsets[None, :] < a[:, None]) | at_stop
            token = torch.where(at_stop, out.token[:, None], draft)
            by_teacher = at_stop
            produced = a + out.from_teacher.long()
        self._write(self.pos[:, None] + offsets, keep, token, by_teacher, divergence)
        if ht is not None:
            self._write_hidden(self.pos[:, None] + offsets, keep, ht)
        # `last` becomes the newest kept token; rows that produced nothing (finished) keep theirs.
        newest = token.gather(1, (produced - 1).clamp(min=0)[:, None])[:, 0]
        self.last.copy_(torch.where(produced > 0, newest, self.last))
        # Both caches hold the block's `width` columns; a live row keeps the first `produced` (>= 1) of them,
        # at most up to max_new_tokens (what lies beyond, a bonus included, is never output), so no row
        # outgrows the capacity.
        kept = torch.minimum(produced, self.n - self.pos)
        drop = torch.where(idle, width, width - kept)
        # a model whose `last` column came with the prefill wrote one column less, all of them kept but by
        # idle rows
        student.rollback(drop - idle.long() if first_s is not None else drop)
        teacher.rollback(drop - idle.long() if first_t is not None else drop)
        self.pos += produced

    def flags(self) -> _Flags:
        """What the host needs to steer the loop, in one host read (with lookahead="auto", also the draft counts
        and the timings recorded since the last read)."""
        live = ~self._idle()
        switched = self.state.switched & live
        least = torch.where(live, self.pos, torch.full_like(self.pos, self.n)).min()
        values = [(~live.any()).long(), (live & ~switched).any().long(), switched.any().long(), least, live.sum()]
        if self.counts is not None:
            values.extend(self.counts.unbind())
        flags = torch.stack(values).tolist()
        if self.counts is not None:
            self.counts.zero_()
            self.clock.collect()
        return _Flags(bool(flags[0]), bool(flags[1]), bool(flags[2]), int(flags[3]), int(flags[4]), flags[5:])

    def finish(self, input_ids, mask) -> GenerationOutput:
        n = self.n
        tokens, from_teacher = self.tokens[:, :n], self.from_teacher[:, :n]
        divergence = self.divergence[:, :n]
        if isinstance(self.policy, Mixed) and self.completions is not None:
            comp = torch.full_like(tokens, self.pad)
            width = min(n, self.completions.shape[1])
            comp[:, :width] = self.completions[:, :width]
            rows = self.dataset_rows[:, None]
            tokens = torch.where(rows, comp, tokens)
            from_teacher = from_teacher & ~rows
            divergence = torch.where(rows, torch.full_like(divergence, math.nan), divergence)
        is_eos = tokens == self.eos
        before_eos = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # up to and including the first EOS
        eos_len = before_eos.long().sum(1)
        lengths = torch.where(is_eos.any(1), eos_len, torch.full_like(eos_len, n))
        if isinstance(self.policy, Mixed):  # dataset rows without EOS end at their padding
            unended = self.dataset_rows & ~is_eos.any(1)
            lengths = torch.where(unended, (tokens != self.pad).long().sum(1), lengths)
        valid = torch.arange(n, device=self.device)[None, :] < lengths[:, None]
        tokens = torch.where(valid, tokens, torch.full_like(tokens, self.pad))
        from_teacher = from_teacher & valid
        divergence = torch.where(valid, divergence, torch.full_like(divergence, math.nan))
        sp = self.state.switch_pos
        switch_position = torch.where((sp >= 0) & (sp < lengths), sp, torch.full_like(sp, -1))
        return GenerationOutput(
            sequences=torch.cat([input_ids, tokens], 1),
            response=tokens,
            attention_mask=torch.cat([mask, valid.long()], 1),
            from_teacher=from_teacher,
            switch_position=switch_position,
            divergence=divergence,
            lengths=lengths,
            from_dataset=self.dataset_rows.clone(),
            prompt_length=input_ids.shape[1],
            **self._teacher_states(valid),
        )

    def _teacher_states(self, valid) -> dict:
        """GenerationOutput's teacher_hidden_states / teacher_states_mask (return_teacher_states only)."""
        if not self.record:
            return {}
        if self.hidden is None:  # no decode iteration ran (e.g. every row finished before the loop)
            return {"teacher_hidden_states": None, "teacher_states_mask": torch.zeros_like(valid)}
        ran = self.ran[:, : self.n] & valid
        hidden = torch.where(ran[:, :, None], self.hidden[:, : self.n], torch.zeros((), dtype=self.hidden.dtype,
                                                                                      device=self.device))
        return {"teacher_hidden_states": hidden, "teacher_states_mask": ran}


class _Graphs:
    """Runs each kind of iteration eagerly once (warm-up), then captures it in a CUDA graph and replays."""

    def __init__(self):
        self.graphs: dict = {}
        self.seen: set = set()

    def __call__(self, key, fn) -> None:
        if key in self.graphs:
            self.graphs[key].replay()
            return
        if key not in self.seen:
            self.seen.add(key)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()
            torch.cuda.current_stream().wait_stream(stream)
            return
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        self.graphs[key] = graph


# ------------------------------------------------------------------------------------------ public

@torch.no_grad()
def generate(
    student,
    teacher,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    policy=None,
    max_new_tokens: int = 128,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
    example_keys=None,
    lookahead: int | str = "auto",
    sync_every: int | None = None,
    completions: torch.Tensor | None = None,
    cuda_graph: bool = False,
    vocab_size: int | None = None,
    impl: str | None = None,
    tokenizer=None,
    guidance: str = "auto",
    return_teacher_states: bool = False,
    lookahead_stats: LookaheadStats | None = None,
) -> GenerationOutput:
    """Generate responses for a batch of left-padded prompts under a distillation policy.

    Args:
        student, teacher: Hugging Face causal LMs sharing a tokenizer (any sizes / architectures); the
            model a policy does not use may be None (e.g. the student for `Teacher`).
        input_ids: int64 [B, P] left-padded prompts; attention_mask: [B, P] 0/1 (None: no padding).
        policy: `Student`, `Teacher`, `Mixed`, `SKD` or `AdaSwitch` (default `AdaSwitch()`), or one of
            AdaSwitch's controls `FixedSwitch`, `RandomSwitch`.
        max_new_tokens: N, response length budget; prompt length + N must fit both models' positions.
        eos_token_id, pad_token_id: default to the models' config values; an error if neither has them.
        seed, example_keys: the counter-based RNG's seed and per-row keys (default: row index); pass
            stable keys (e.g. dataset indices) to make a row's tokens independent of its batch.
        lookahead: "auto" (default): the engine chooses, at each host read, the draft length G of the next
            iterations (0 = token by token, or 2, 4, 8) and, under guidance="auto", whether blocks verify the
            switched rows' tokens speculatively, from the forwards it has timed and the drafts the teacher kept
            (`adaswitch.engine.lookahead`); an int G > 0 drafts G student tokens per teacher forward (AdaSwitch,
            SKD), at most max_new_tokens; 0 decodes token by token. The tokens do not depend on G.
        sync_every: iterations between the host's reads of the "all finished" flag. None (default): 16
            on an accelerator, where a read waits for the queued work; 1 on the CPU, where nothing is
            queued, so a read costs nothing and the loop stops each model the step it is no longer needed.
        completions: int64 [B, M] dataset responses (right-padded with pad) for `Mixed` rows that use
            the dataset.
        cuda_graph: capture the per-iteration work in CUDA graphs (CUDA tensors only).
        vocab_size: the tokenizer's vocabulary size (logits are cut to it: no id >= vocab_size is ever
            sampled); default len(tokenizer), else the smaller of the models' output vocabularies (which
            includes the rows of an embedding matrix padded past the tokenizer: pass `tokenizer` or
            vocab_size when the matrices are padded).
        impl: implementation of the fused step op ("auto", "triton", "torch").
        tokenizer: the tokenizer shared by student and teacher (optional): vocab_size defaults to
            len(tokenizer), eos_token_id and pad_token_id to the tokenizer's; an explicit vocab_size
            larger than len(tokenizer) is an error.
        guidance: how the teacher writes its tokens. "auto" (default): speculative where lookahead="auto"
            finds it faster and the teacher is greedy (there it gives step mode's tokens), else step; so "auto"
            never changes a token. "step": one teacher draw per teacher forward (after
            AdaSwitch's switch, and under Teacher). "speculative" (AdaSwitch and its controls, Teacher; needs
            lookahead = G >= 1 and the student): the student keeps drafting G tokens per block and the teacher,
            in its one forward (on the G drafts and the position after them), accepts each draft with
            probability min(1, p_T / p_S) and at the first rejection draws from norm(max(0, p_T - p_S)); a
            row that accepts every draft also takes a bonus token drawn from p_T at the position after the
            last draft (rng stream 5 at that response position) (`adaswitch.ops.fused_speculative`): every
            teacher token still follows the teacher's sampling distribution (temperature / top_k / top_p),
            up to G + 1 per teacher forward (the student then runs G + 1 one-token forwards per block, the
            last one putting the last draft into its cache). Greedy teachers give exactly step mode's
            tokens; sampling teachers the same distribution with other draws. SKD's lookahead already
            verifies G drafts per forward.
        return_teacher_states: also return the teacher's last hidden states at every response position the
            teacher ran on (`teacher_hidden_states`, `teacher_states_mask`), for a loss that would
            otherwise run the teacher again.
        lookahead_stats: with lookahead="auto", what earlier calls measured on this pair (forward timings,
            acceptance; a `LookaheadStats`, updated in place): pass one object to successive calls so each starts
            from it (the Distiller does). None: this call measures from scratch.

    Returns:
        GenerationOutput (fixed shapes [B, P + N] / [B, N]).
    """
    policy = AdaSwitch() if policy is None else policy
    a = check_arguments(student, teacher, input_ids, attention_mask, policy=policy, max_new_tokens=max_new_tokens,
                        eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed, example_keys=example_keys,
                        lookahead=lookahead, sync_every=sync_every, completions=completions, cuda_graph=cuda_graph,
                        vocab_size=vocab_size, tokenizer=tokenizer, guidance=guidance,
                        return_teacher_states=return_teacher_states)

    auto = bool(a.decoding.options)
    if lookahead_stats is not None and not isinstance(lookahead_stats, LookaheadStats):
        raise TypeError(f"lookahead_stats must be an adaswitch.LookaheadStats, got {type(lookahead_stats).__name__}")
    clock = None
    if auto:
        stats = LookaheadStats() if lookahead_stats is None else lookahead_stats
        stats.new_call()
        clock = ForwardClock(stats, input_ids.device)
    # Flash-attn models get the cache's attention for the whole call, and their own back on any exit.
    with contextlib.ExitStack() as attention_scope:
        run = _Run(a.student, a.teacher, input_ids, a.mask, policy, max_new_tokens, a.eos, a.pad, seed, a.keys,
                   a.decoding.lookahead, a.vocab_size, a.completions, impl, attention_scope, a.layouts,
                   a.decoding.guided, return_teacher_states, clock)
        lookaheads = _decode(run, policy, max_new_tokens, a.decoding, a.sync_every, cuda_graph)
        out = run.finish(input_ids, a.mask)
    out.mean_lookahead = sum(lookaheads) / len(lookaheads) if lookaheads else 0.0
    return out


def _decode(run: _Run, policy, max_new_tokens: int, decoding, sync_every: int, cuda_graph: bool) -> list:
    """The decode loop: iterations until every row is done, a host read about every sync_every tokens, where
    lookahead="auto" also picks the next iterations' (G, guidance). Returns the G of each iteration."""
    graphs = _Graphs() if cuda_graph else None
    use_student = run.run_student
    stats = run.clock.stats if run.clock is not None else None
    teacher_only = isinstance(policy, Teacher)  # every live row's tokens are the teacher's
    if stats is not None:
        rows = Rows(not teacher_only, teacher_only, use_student, run.pos.shape[0], max_new_tokens)
        g, guided = choose(stats, list(decoding.options), rows)
    else:
        g, guided = decoding.lookahead, decoding.guided
    budget = max_new_tokens  # iterations that can still change anything (>= 1 token per unfinished row each)
    if isinstance(policy, Mixed) and not run.run_student:
        budget = 0  # every row is the dataset's completion
    # Iterations between host reads: about sync_every tokens. A block is expected to give G tokens; once an
    # interval gave fewer than sync_every tokens (rejections, switched rows), every sync_every iterations.
    interval = -(-sync_every // g) if g else sync_every
    per_block = g > 0
    since_sync, least, lookaheads = 0, 0, []
    while budget > 0:
        first = bool(run.first)  # the first iteration takes the prefill's logits: its own kind, eager
        if g:
            kind, fn = ("block", g, guided, first), functools.partial(run.block, g, guided)
        else:
            kind, fn = ("step", use_student, first), functools.partial(run.step, use_student)
        started = run.clock.start() if stats is not None else None
        if graphs is None:
            fn()
        else:
            graphs(kind, fn)
        lookaheads.append(g)
        if stats is not None:
            key = iteration_key(g, guided, use_student)
            run.clock.stop_iteration(key, started)
            stats.iterations[key] = stats.iterations.get(key, 0) + 1
        budget -= 1
        since_sync += 1
        if budget > 0 and since_sync >= interval:
            flags = run.flags()
            if flags.done:
                break
            budget = max_new_tokens - flags.least
            since_sync, progress, least = 0, flags.least - least, flags.least
            if stats is not None:
                offered, accepted, verified, passed = flags.counts
                stats.drafts = [stats.drafts[0] + offered, stats.drafts[1] + accepted]
                stats.verified = [stats.verified[0] + verified, stats.verified[1] + passed]
                rows = Rows(flags.exploring and not teacher_only, flags.switched or teacher_only, use_student,
                            flags.live, budget)
                options = [o for o in decoding.options if o[0] <= budget and (use_student or o[0] == 0)]
                g, guided = choose(stats, options, rows)
                # step mode with every live row switched: the student is no longer needed (its cache stops)
                use_student = use_student and (g > 0 or rows.exploring)
            elif isinstance(policy, AdaSwitch) and not guided:
                # A switched row gains one token per block, so the run needs as many iterations as in step
                # mode, each costlier: step mode from here on; the student stops once all rows switched.
                g = g if not flags.switched else 0
                use_student = use_student and flags.exploring
            if progress < sync_every or not g:
                per_block = False
            interval = -(-sync_every // g) if g and per_block else sync_every
    return lookaheads
