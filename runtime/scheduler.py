"""Step-level scheduling of generation requests over one engine folder (in-flight batching).

Contract (the shape of vLLM v1's scheduler):

* :meth:`Scheduler.add` queues a :class:`Sequence` (a checked request, its token plan, token limit
  and sampling); :meth:`Scheduler.cancel` ends one (it leaves the batch at the next step).
* :meth:`Scheduler.step` runs ONE iteration: finished and cancelled rows leave the decode batch;
  every decoding row generates one token; then waiting requests are admitted (at most
  ``max_batch`` rows in all) and prefilled together, each exiting and pruning on its own, and join
  the decode batch with their first token. Every running request thus gets one token per step.
  It returns the sequences that finished in this step.
* Each sequence's ``on_token(seq, token)`` is called after each of its tokens and may return True
  to stop it (stop strings); tokens, logits, exit layer, gate probabilities, finish reason and
  timings are on the :class:`Sequence`.

A row's answer does not depend on what else runs: padding is masked and each row samples from its
own generator, so it is the same alone, in a batch, or joining one mid-way. The scheduler is not
thread-safe; one thread drives it (``Pipeline.run`` under the pipeline's lock, or a server's worker).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from .dispatch import DecodeBatch, Dispatcher, make_batch
from .plan import RowPlan
from .sampling import SamplingParams, make_generator, sample

_ids = itertools.count()


@dataclass
class Sequence:
    """One request inside the scheduler and what it has generated so far."""

    input_ids: torch.Tensor  # [T] int64
    vision: object  # dyvte.families.Vision or None (checked by Pipeline.check)
    plan: RowPlan
    max_new: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    return_logits: bool = False
    on_token: Callable | None = None  # (seq, token) -> True to stop
    id: int = field(default_factory=lambda: next(_ids))
    # -- state ------------------------------------------------------------------------------------
    tokens: list = field(default_factory=list)
    logits: list = field(default_factory=list)  # [V] float32 per token when return_logits
    exit_layer: int | None = None
    gate_probs: dict = field(default_factory=dict)
    segment_tokens: list = field(default_factory=list)  # tokens present in each segment at prefill
    finish: str | None = None  # "eos" | "length" | "stop" | "cancelled" | "error"
    error: BaseException | None = None
    timings: dict = field(default_factory=dict)
    batch_size: int = 0  # rows prefilled together with it
    next_position: int = 0
    generator: object = None
    arrived: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    @property
    def done(self) -> bool:
        return self.finish is not None


class Scheduler:
    """Runs :class:`Sequence` objects through a :class:`~dyvte.runtime.dispatch.Dispatcher`
    step by step (see module docstring)."""

    def __init__(self, dispatcher: Dispatcher, eos_ids, max_batch: int, image_token_id: int, family,
                 vision_meta: dict):
        self.d = dispatcher
        self.runner = dispatcher.runner
        self.eos = set(int(e) for e in eos_ids)
        self.max_batch = int(max_batch)
        self.image_token_id, self.family, self.vision_meta = image_token_id, family, vision_meta
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # id -> sequence in the decode batch
        self.batch = DecodeBatch(dispatcher)
        self.steps = 0

    # -- requests ---------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> Sequence:
        self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> None:
        """End ``seq`` now (finish reason "cancelled"); it leaves the batch at the next step."""
        if not seq.done:
            seq.finish = "cancelled"
            self._finish_timings(seq, time.perf_counter())
        if seq in self.waiting:
            self.waiting.remove(seq)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    # -- one iteration ----------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Leave, admit + prefill, decode: one iteration (see module docstring). Returns the
        sequences finished in it (cancelled ones included)."""
        finished = self._leave()
        if len(self.batch):
            finished += self._decode()
        admitted = self.admit()
        if admitted:
            finished += self._prefill(admitted)
        self.steps += 1
        return finished

    def admit(self) -> list[Sequence]:
        """Waiting sequences to prefill now: oldest first, while the batch has room."""
        room = self.max_batch - len(self.running)
        out = []
        while self.waiting and len(out) < room:
            out.append(self.waiting.popleft())
        return out

    def _leave(self) -> list[Sequence]:
        gone = [s for s in self.running.values() if s.done]
        if gone:
            self.batch.leave([s.id for s in gone])
            for s in gone:
                del self.running[s.id]
        return [s for s in gone if s.finish == "cancelled"]

    def _prefill(self, seqs: list[Sequence]) -> list[Sequence]:
        runner = self.runner
        runner.synchronize()
        t0 = time.perf_counter()
        batch = make_batch([s.input_ids.long() for s in seqs], [s.vision for s in seqs], self.image_token_id,
                           runner.device, self.family, self.vision_meta)
        job = self.d.prefill(batch, [s.plan for s in seqs], [s.max_new for s in seqs]).run()
        logits = runner.head(job.last)[:, -1].float()  # [B,V]
        for i, s in enumerate(seqs):
            s.generator = make_generator(s.sampling, runner.device)
            s.exit_layer, s.gate_probs, s.segment_tokens = job.exit_layers[i], job.gate_probs[i], job.tokens[i]
            s.next_position = int(batch.next_positions[i])
            s.batch_size = len(seqs)
        tokens = sample(logits, [(s.sampling, s.generator) for s in seqs])
        runner.synchronize()
        t1 = time.perf_counter()
        for s in seqs:
            s.timings.update(queue_s=t0 - s.arrived, vision_s=job.vision_s, prefill_s=t1 - t0,
                             prompt_tokens=len(s.input_ids))
            s.first_token_at = t1
        finished = self._record(seqs, tokens, logits)
        # every row joins, and rows done at their first token leave at once (one mechanism for both)
        self.batch.join(job, [s.id for s in seqs], [max(s.max_new - 1, 0) for s in seqs])
        self.batch.leave([s.id for s in seqs if s.done])
        self.running.update((s.id, s) for s in seqs if not s.done)
        return finished

    def _decode(self) -> list[Sequence]:
        runner = self.runner
        seqs = [self.running[s] for s in self.batch.slots]
        last = torch.tensor([s.tokens[-1] for s in seqs], dtype=torch.int64, device=runner.device)
        rows = self.family.rope_rows
        positions = torch.tensor([s.next_position + len(s.tokens) - 1 for s in seqs], dtype=torch.int64,
                                 device=runner.device)[:, None, None].expand(len(seqs), 1, rows)  # [n,1,R]
        hidden = self.batch.step(runner.embed(last[:, None]), positions)
        logits = runner.head(hidden)[:, -1].float()
        tokens = sample(logits, [(s.sampling, s.generator) for s in seqs])
        return self._record(seqs, tokens, logits)

    def _record(self, seqs: list[Sequence], tokens, logits) -> list[Sequence]:
        """Append each row's token; finish rows by EOS, stop request or token limit."""
        now = time.perf_counter()
        finished = []
        toks = tokens.tolist()
        for i, (s, tok) in enumerate(zip(seqs, toks)):
            if s.done:  # cancelled while this step ran
                continue
            s.tokens.append(tok)
            if s.return_logits:
                s.logits.append(logits[i].cpu())
            stop = bool(s.on_token(s, tok)) if s.on_token is not None else False
            if tok in self.eos:
                s.finish = "eos"
            elif stop:
                s.finish = "stop"
            elif len(s.tokens) >= s.max_new:
                s.finish = "length"
            if s.done:
                self._finish_timings(s, now)
                finished.append(s)
        return finished

    @staticmethod
    def _finish_timings(s: Sequence, now: float) -> None:
        decode_s = now - s.first_token_at if s.first_token_at is not None else 0.0
        decoded = max(len(s.tokens) - 1, 0)
        s.timings.update(decode_s=decode_s, total_s=s.timings.get("prefill_s", 0.0) + decode_s,
                         new_tokens=len(s.tokens),
                         decode_tokens_per_s=decoded / decode_s if decoded and decode_s > 0 else 0.0)
        p = s.timings.get("prefill_s", 0.0)
        s.timings["prefill_tokens_per_s"] = len(s.input_ids) / p if p > 0 else 0.0

    def run_until_done(self) -> None:
        """Step until nothing waits or runs."""
        while not self.idle:
            self.step()

    def close(self) -> None:
        """Cancel everything and free the caches."""
        for s in list(self.waiting) + list(self.running.values()):
            self.cancel(s)
        self.waiting.clear()
        self.running.clear()
        self.batch.close()
