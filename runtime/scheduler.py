"""Step-level scheduling of generation requests over one engine folder (in-flight batching).

The scheduler decides, once per iteration, which rows decode, which requests start their prefill
and how far prefills advance; the dispatcher (:mod:`dyvte.runtime.dispatch`: :class:`Prefill`,
:class:`DecodeBatch`) runs that plan on the runner. Front ends (``Pipeline.run``, the HTTP
server and the Triton model in :mod:`dyvte.serving`) only add, cancel and step. Contract:

* :meth:`Scheduler.add` queues a :class:`Sequence` (a checked request, its token plan, token limit
  and sampling); :meth:`Scheduler.cancel` ends one (a waiting one is dropped, a running or
  prefilling one leaves the batch at the next step).
* :meth:`Scheduler.step` runs ONE iteration, in this order:

  1. **leave**: cancelled rows leave the decode batch (rows that finish leave at the end of the
     step they finish in); their cache rows and their KV reservation are freed at once;
  2. **decode**: every row of the decode batch generates one token (one call per segment lane);
  3. **prefill**: prefills under way advance, oldest first, one segment at a time; then waiting
     requests are **admitted**, oldest first (a request that does not fit blocks those behind it,
     so none starves), and prefilled together as one batch in which each row exits and prunes on
     its own. A row whose prefill is done gets its first token and joins the decode batch.

  It returns the sequences that finished in the step (cancelled rows that left in it included)
  and records what it did in :attr:`Scheduler.last` (:class:`StepStats`).
* **Admission** needs, for each request: a row (at most ``max_batch`` rows decode or prefill at
  once: the engines' batch limit) and, with a ``kv_budget``, its KV cache bytes. A request's
  cache holds its tokens in every layer: ``(tokens present + max_new - 1) x layers`` token-layers
  of ``2 x kv_heads x head_dim x dtype size`` bytes each. Before prefill its exit layer and
  pruning are unknown, so it reserves the worst case (every prompt token in every layer); when its
  prefill ends, the reservation shrinks to its segments' real token counts (text-only segments
  after an exit, fewer visual tokens after pruning), so an exited request admits others sooner.
  Padding (rows of a lane are right-aligned to its longest) and a backend's capacity rounding
  come on top: :meth:`cache_bytes` is what the caches really hold. A request whose worst case
  exceeds the whole budget is refused by :meth:`check` / :meth:`add` (:class:`KVBudgetError`).
* **Prefill work per step** is bounded by ``prefill_tokens`` (prompt tokens through the whole
  model; counted in token-layers, padding included, as :meth:`Prefill.next_cost` does): a step
  runs a prefill's next segment only while it fits what is left of ``prefill_tokens x L``, and
  admits waiting requests only while their whole prefill fits. At least one segment runs in every
  step that has prefill pending, so a prompt longer than the bound is prefilled over several
  steps, at segment boundaries, while the decode batch keeps generating one token per step; the
  exit and pruning decisions stay exactly those of an unsplit prefill. ``None``: no bound.
* Each sequence's ``on_token(seq, token)`` is called after each of its tokens and may return True
  to stop it (stop strings); tokens, logits, exit layer, gate probabilities, finish reason and
  timings are on the :class:`Sequence`.

A row's answer does not depend on what else runs: padding is masked and each row samples from its
own generator, so it is the same alone, in a batch, or joining one mid-way. The scheduler is not
thread-safe; one thread drives it (``Pipeline.run`` under the pipeline's lock, or a server's
worker, which holds that lock around each step).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from dyvte.errors import InputError

from .dispatch import DecodeBatch, Dispatcher, Prefill, make_batch
from .plan import RowPlan
from .sampling import SamplingParams, make_generator, sample

_ids = itertools.count()


class KVBudgetError(InputError):
    """A request whose KV cache could never fit the scheduler's budget."""


@dataclass(eq=False)  # compared by identity
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
    finish: str | None = None  # "eos" | "length" | "stop" | "cancelled"
    timings: dict = field(default_factory=dict)
    batch_size: int = 0  # rows prefilled together with it
    peak_batch: int = 0  # most rows in one step it took part in (its prefill batch or a decode batch)
    kv_reserved: int = 0  # bytes of the scheduler's KV budget it holds
    next_position: int = 0
    generator: object = None
    arrived: float = field(default_factory=time.perf_counter)
    prefill_at: float | None = None  # its prefill started
    first_token_at: float | None = None

    @property
    def done(self) -> bool:
        return self.finish is not None


@dataclass
class StepStats:
    """What one :meth:`Scheduler.step` did, and the state it left."""

    seconds: float = 0.0
    decoded: int = 0  # rows that got a token from the decode batch
    prefilled: int = 0  # rows whose prefill ended (they got their first token)
    prefill_work: int = 0  # token-layers of prefill run (padding included)
    finished: int = 0
    running: int = 0  # rows in the decode batch
    prefilling: int = 0  # rows whose prefill is under way
    waiting: int = 0
    kv_reserved: int = 0  # bytes reserved by admitted rows

    @property
    def tokens(self) -> int:
        """Tokens generated in the step."""
        return self.decoded + self.prefilled


@dataclass
class _PrefillJob:
    prefill: Prefill
    seqs: list


class Scheduler:
    """Runs :class:`Sequence` objects through a :class:`~dyvte.runtime.dispatch.Dispatcher`
    step by step (see module docstring). ``kv_budget``: bytes of KV cache admitted rows may
    reserve (None: no limit but ``max_batch``); ``prefill_tokens``: bound on prefill work per
    step, in prompt tokens through every layer (None: none)."""

    def __init__(self, dispatcher: Dispatcher, eos_ids, max_batch: int, image_token_id: int, family,
                 vision_meta: dict, kv_budget: int | None = None, prefill_tokens: int | None = None):
        if int(max_batch) < 1:
            raise InputError(f"max_batch must be at least 1, got {max_batch}")
        if kv_budget is not None and int(kv_budget) < 1:
            raise InputError(f"the KV cache budget must be a positive number of bytes, got {kv_budget}")
        if prefill_tokens is not None and int(prefill_tokens) < 1:
            raise InputError(f"prefill tokens per step must be at least 1, got {prefill_tokens}")
        self.d = dispatcher
        self.runner = dispatcher.runner
        self.eos = set(int(e) for e in eos_ids)
        self.max_batch = int(max_batch)
        self.image_token_id, self.family, self.vision_meta = image_token_id, family, vision_meta
        self.kv_budget = None if kv_budget is None else int(kv_budget)
        self.num_layers = dispatcher.manifest.num_layers
        self.prefill_budget = None if prefill_tokens is None else int(prefill_tokens) * self.num_layers
        t = dispatcher.manifest.text
        itemsize = torch.empty((), dtype=self.runner.dtype).element_size()
        #: bytes one token's keys and values take in one layer
        self.token_layer_bytes = 2 * int(t["num_kv_heads"]) * int(t["head_dim"]) * itemsize
        self.waiting: deque[Sequence] = deque()
        self.prefilling: list[_PrefillJob] = []
        self.running: dict[int, Sequence] = {}  # id -> sequence in the decode batch
        self.batch = DecodeBatch(dispatcher)
        self.kv_reserved = 0
        self.steps = 0
        self.last = StepStats()

    # -- KV accounting ----------------------------------------------------------------------------
    def kv_bytes(self, seq: Sequence) -> int:
        """Worst-case KV bytes of ``seq``: every prompt token and every generated one but the last
        in every layer (no exit, no pruning)."""
        return (len(seq.input_ids) + seq.max_new - 1) * self.num_layers * self.token_layer_bytes

    def kv_bytes_planned(self, seq: Sequence) -> int:
        """KV bytes of ``seq`` once its prefill decided its exit and pruning (per segment: the
        tokens present in it, plus the tokens it will generate)."""
        n = seq.max_new - 1
        return sum((tokens + n) * (b - a) for tokens, (a, b) in zip(seq.segment_tokens, self.d.segments)) \
            * self.token_layer_bytes

    def check(self, seq: Sequence) -> None:
        """Raise :class:`KVBudgetError` when ``seq`` could never be admitted (thread-safe)."""
        if self.kv_budget is not None and self.kv_bytes(seq) > self.kv_budget:
            need = self.kv_bytes(seq)
            raise KVBudgetError(f"this request may need {need / 2**20:.1f} MiB of KV cache ({len(seq.input_ids)} "
                                f"prompt tokens + {seq.max_new} new through {self.num_layers} layers); the "
                                f"budget is {self.kv_budget / 2**20:.1f} MiB: shorten the prompt, lower the token "
                                "limit or raise the budget")

    def _release(self, seq: Sequence, keep: int = 0) -> None:
        self.kv_reserved -= seq.kv_reserved - keep
        seq.kv_reserved = keep

    # -- requests ---------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> Sequence:
        """Queue ``seq`` (raises :class:`KVBudgetError` if it can never fit the budget)."""
        self.check(seq)
        self.waiting.append(seq)
        return seq

    def cancel(self, seq: Sequence) -> bool:
        """End ``seq`` now (finish reason "cancelled"): a waiting one is dropped (returns True), a
        running or prefilling one leaves the batch at the next step (returns False)."""
        if not seq.done:
            seq.finish = "cancelled"
            self._finish_timings(seq, time.perf_counter())
        if seq in self.waiting:
            self.waiting.remove(seq)
            return True
        return False

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running and not self.prefilling

    @property
    def rows(self) -> int:
        """Rows decoding or prefilling."""
        return len(self.running) + sum(len(j.seqs) for j in self.prefilling)

    def cache_bytes(self) -> int:
        """Bytes the KV caches hold now (decode lanes and prefills under way, padding included)."""
        held = sum(self.runner.cache_nbytes(e.cache) for j in self.prefilling for entries in j.prefill.entries
                   for e in entries)
        return self.batch.cache_bytes() + held

    # -- one iteration ----------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Leave, decode, prefill: one iteration (see module docstring). Returns the sequences
        finished in it (cancelled ones whose rows left in it included)."""
        t0 = time.perf_counter()
        stats = StepStats()
        finished = self._leave()
        if len(self.batch):
            stats.decoded = len(self.batch)
            finished += self._decode()
        finished += self._prefill(stats)
        finished += self._leave()  # rows that finished in this step free their places now
        self.steps += 1
        stats.seconds = time.perf_counter() - t0
        stats.finished = len(finished)
        stats.running, stats.waiting, stats.kv_reserved = len(self.running), len(self.waiting), self.kv_reserved
        stats.prefilling = sum(len(j.seqs) for j in self.prefilling)
        self.last = stats
        return finished

    def admit(self, work_left: int | None = None, progressed: bool = False) -> list[Sequence]:
        """Waiting sequences to prefill now, oldest first, while rows, KV budget and prefill work
        (``work_left`` token-layers; at least one sequence unless ``progressed``) allow; reserves
        their worst-case KV bytes."""
        room = self.max_batch - self.rows
        out, longest = [], 0
        while self.waiting and len(out) < room:
            s = self.waiting[0]
            need = self.kv_bytes(s)
            if self.kv_budget is not None and self.kv_reserved + need > self.kv_budget:
                break
            if work_left is not None:
                cost = (len(out) + 1) * max(longest, len(s.input_ids)) * self.num_layers  # padded
                if cost > work_left and (out or progressed):
                    break
            self.waiting.popleft()
            s.kv_reserved = need
            self.kv_reserved += need
            longest = max(longest, len(s.input_ids))
            out.append(s)
        return out

    def _leave(self) -> list[Sequence]:
        gone = [s for s in self.running.values() if s.done]
        if gone:
            self.batch.leave([s.id for s in gone])
            for s in gone:
                del self.running[s.id]
                self._release(s)
        return [s for s in gone if s.finish == "cancelled"]

    def _prefill(self, stats: StepStats) -> list[Sequence]:
        """Advance prefills under way, then admit and start new ones, within the step's bound."""
        finished = []
        budget = self.prefill_budget
        for job in list(self.prefilling):
            if all(s.done for s in job.seqs):  # every row cancelled: drop the work
                finished += self._drop(job)
        jobs = list(self.prefilling)
        while True:
            for job in jobs:
                while not job.prefill.done:
                    cost = job.prefill.next_cost()
                    if budget is not None and stats.prefill_work and stats.prefill_work + cost > budget:
                        return finished
                    job.prefill.step()
                    stats.prefill_work += cost
                self.prefilling.remove(job)
                stats.prefilled += sum(1 for s in job.seqs if not s.done)
                finished += self._join(job)
            left = None if budget is None else budget - stats.prefill_work
            if left is not None and left <= 0:
                return finished
            admitted = self.admit(left, bool(stats.prefill_work))
            if not admitted:
                return finished
            jobs = [self._start(admitted)]

    def _start(self, seqs: list[Sequence]) -> _PrefillJob:
        runner = self.runner
        now = time.perf_counter()
        batch = make_batch([s.input_ids.long() for s in seqs], [s.vision for s in seqs], self.image_token_id,
                           runner.device, self.family, self.vision_meta)
        for i, s in enumerate(seqs):
            s.prefill_at = now
            s.next_position = int(batch.next_positions[i])
            s.batch_size = len(seqs)
            s.peak_batch = max(s.peak_batch, len(seqs))
        job = _PrefillJob(self.d.prefill(batch, [s.plan for s in seqs], [s.max_new for s in seqs]), seqs)
        self.prefilling.append(job)
        return job

    def _drop(self, job: _PrefillJob) -> list[Sequence]:
        """Abandon a prefill under way (its caches and reservations are freed); returns its rows."""
        self.prefilling.remove(job)
        for entries in job.prefill.entries:
            for e in entries:
                self.runner.release_cache(e.cache)
        for s in job.seqs:
            self._release(s)
        return list(job.seqs)

    def _join(self, job: _PrefillJob) -> list[Sequence]:
        """A finished prefill: first tokens, then its rows join the decode batch (and rows done at
        their first token leave at once: one mechanism for both)."""
        runner, p, seqs = self.runner, job.prefill, job.seqs
        logits = runner.head(p.last)[:, -1].float()  # [B,V]
        for i, s in enumerate(seqs):
            s.generator = make_generator(s.sampling, runner.device)
            s.exit_layer, s.gate_probs, s.segment_tokens = p.exit_layers[i], p.gate_probs[i], p.tokens[i]
        tokens = sample(logits, [(s.sampling, s.generator) for s in seqs])
        runner.synchronize()
        now = time.perf_counter()
        for s in seqs:
            s.timings.update(queue_s=s.prefill_at - s.arrived, vision_s=p.vision_s, prefill_s=now - s.prefill_at,
                             prompt_tokens=len(s.input_ids))
            s.first_token_at = now
        finished = self._record(seqs, tokens, logits)
        self.batch.join(p, [s.id for s in seqs], [max(s.max_new - 1, 0) for s in seqs])
        self.batch.leave([s.id for s in seqs if s.done])
        for s in seqs:
            if s.done:
                self._release(s)
            else:
                self._release(s, min(s.kv_reserved, self.kv_bytes_planned(s)))  # what the exit saves
                self.running[s.id] = s
        return finished + [s for s in seqs if s.finish == "cancelled"]

    def _decode(self) -> list[Sequence]:
        runner = self.runner
        seqs = [self.running[s] for s in self.batch.slots]
        n = len(seqs)
        last = torch.tensor([s.tokens[-1] for s in seqs], dtype=torch.int64, device=runner.device)
        rows = self.family.rope_rows
        positions = torch.tensor([s.next_position + len(s.tokens) - 1 for s in seqs], dtype=torch.int64,
                                 device=runner.device)[:, None, None].expand(n, 1, rows)  # [n,1,R]
        hidden = self.batch.step(runner.embed(last[:, None]), positions)
        logits = runner.head(hidden)[:, -1].float()
        tokens = sample(logits, [(s.sampling, s.generator) for s in seqs])
        for s in seqs:
            s.peak_batch = max(s.peak_batch, n)
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
            if s.done:  # the callback cancelled it
                continue
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
        for s in list(self.waiting) + list(self.running.values()) + [s for j in self.prefilling for s in j.seqs]:
            self.cancel(s)
        for job in list(self.prefilling):
            self._drop(job)
        self.waiting.clear()
        self.running.clear()
        self.batch.close()
        self.kv_reserved = 0
