"""The serving loop: one worker thread drives the runtime's step-level scheduler for many clients.

Front ends (:mod:`dyvte.serving.server`, :mod:`dyvte.serving.triton`) turn each request into a
:class:`Job` (a checked :class:`~dyvte.runtime.scheduler.Sequence` and callbacks) and
:meth:`Worker.submit` it from any thread. The worker thread loops: take the jobs submitted since
the last step (they join the batch at this step), apply cancellations and deadlines, then run ONE
:meth:`Scheduler.step` holding the pipeline's lock, and deliver what finished. So a request starts
at the next step, however long the others run, and a finished one frees its row and KV cache at
once; every answer is the one it would get alone (the scheduler's contract).

* **Queue**: at most ``max_queue`` jobs wait for admission (the scheduler admits by rows and KV
  budget); more raise :class:`QueueFullError` (HTTP 503 + Retry-After).
* **Gathering**: only when nothing runs, a first request waits up to ``max_wait_s`` for others
  that are being received (:meth:`Worker.arriving`) so that they are prefilled together; a lone
  request never waits, and a request arriving while others run joins at the next step.
* **Streaming and stop strings**: each row's ``on_token`` feeds a :class:`TextTracker`, which
  hands new final text to ``on_delta`` and stops the row at a stop string.
* **Cancellation**: :meth:`Worker.cancel` (client gone, timeout) answers the job at once; its row
  leaves the batch at the next step. Deadlines are enforced by the worker too, and a job may
  carry ``is_cancelled`` (polled, for Triton's request cancellation).
* **Drain**: :meth:`Worker.close` refuses new jobs, finishes every accepted one, then stops.

Callbacks run on the worker thread (or on the caller's for errors raised before a job runs); the
HTTP server hands them to its event loop with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

from dyvte.errors import DyvteError, InputError, MaxTokensError, PromptTooLongError  # noqa: F401 (re-exported)

log = logging.getLogger("dyvte.serve")
_FINISH_LOCK = threading.Lock()  # Job.finish's check-and-set

#: How often jobs' ``is_cancelled`` callbacks are polled (seconds).
CANCEL_POLL_S = 0.1


class ServiceUnavailableError(DyvteError):
    """The server cannot take the request now (queue full, shutting down): retry later."""


class QueueFullError(ServiceUnavailableError):
    pass


class ShuttingDownError(ServiceUnavailableError):
    pass


class RequestTimeoutError(DyvteError):
    """A request did not finish within its time limit."""


class RequestCancelledError(DyvteError):
    """The client went away before its request finished."""


def make_sequence(pipe, request, plan):
    """The checked :class:`~dyvte.runtime.scheduler.Sequence` of one pipeline
    :class:`~dyvte.runtime.pipeline.Request` (checked before it is queued, so a bad request never
    fails others): the pipeline's own checks, with the two limits worded for API clients."""
    lim = pipe.limits
    try:
        return pipe.sequence(request, plan)
    except MaxTokensError:
        raise MaxTokensError(f"max_tokens must be in [1, {lim['max_new_tokens']}] (this engine folder's limit), "
                             f"got {request.max_new_tokens}") from None
    except PromptTooLongError:
        n_prompt = len(request.input_ids)
        if n_prompt > lim["max_input_len"]:
            raise PromptTooLongError(f"the prompt has {n_prompt} tokens (images included); this engine folder takes "
                                     f"at most {lim['max_input_len']}: shorten the messages or send fewer images") from None
        raise PromptTooLongError(f"the prompt ({n_prompt} tokens) + max_tokens exceeds the model's "
                                 f"{pipe.manifest.text['max_position_embeddings']} positions; shorten the prompt or "
                                 "lower max_tokens") from None


class TextTracker:
    """The visible text of one generating row: stop strings cut it, and only text that cannot
    change any more (no partial character, no trailing space, no possible stop-string start) is
    streamed. ``sent`` is always a prefix of the final text."""

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()):
        self.decode, self.stop, self.sent = decode, tuple(s for s in stop if s), ""

    def cut(self, text: str) -> tuple[str, bool]:
        """``text`` up to the first stop string, and whether one was found."""
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return (text[: min(hits)], True) if hits else (text, False)

    def update(self, tokens: list[int]) -> tuple[str, bool]:
        """New streamable text after ``tokens`` (all generated so far), and whether to stop."""
        text, stopped = self.cut(self.decode(tokens).lstrip())
        if stopped:
            return "", True  # the rest is sent by final()
        end = len(text)
        for s in self.stop:  # hold back the longest tail that may still grow into a stop string
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    end = min(end, len(text) - k)
                    break
        safe = text[:end].rstrip().rstrip("\ufffd").rstrip()  # no trailing space or partial character
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return "", False
        delta, self.sent = safe[len(self.sent):], safe
        return delta, False

    def final(self, text: str) -> tuple[str, str, bool]:
        """(final text, the part not streamed yet, stopped by a stop string) of a row's answer."""
        text, stopped = self.cut(text.strip())
        text = text.rstrip()
        rest = text[len(self.sent):] if text.startswith(self.sent) else ""
        return text, rest, stopped


@dataclass
class Outcome:
    """What a finished :class:`Job` returns: the pipeline's Result with the final text."""

    result: object  # dyvte.runtime.pipeline.Result
    text: str
    finish_reason: str  # "eos" | "length" | "stop"
    batch_size: int  # most rows in one step the request took part in
    queue_s: float  # arrival to the start of its prefill
    run_s: float  # start of its prefill to its last token


@dataclass(eq=False)
class Job:
    """One request for the worker. ``on_done(Outcome | Exception)`` is called exactly once;
    ``on_delta(text)`` (streaming) with each new piece of final text; both on the worker thread
    (or the calling thread for errors raised before the job ran). ``deadline``: time.monotonic()
    seconds; ``is_cancelled()``: polled, True cancels the job."""

    seq: object  # dyvte.runtime.scheduler.Sequence (make_sequence)
    on_done: Callable
    stop: tuple[str, ...] = ()
    on_delta: Callable | None = None
    deadline: float | None = None
    is_cancelled: Callable | None = None
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    tracker: TextTracker | None = None
    _done: bool = False

    @property
    def done(self) -> bool:
        return self._done

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def finish(self, outcome) -> None:
        """Deliver the outcome once (the worker and a cancelling thread may both call this)."""
        with _FINISH_LOCK:
            if self._done:
                return
            self._done = True
        try:
            self.on_done(outcome)
        except Exception:  # a callback must never kill the worker
            log.exception("job callback failed")


class Worker:
    """Drives one :class:`~dyvte.runtime.scheduler.Scheduler` over ``pipe`` on its own thread
    (see module docstring).

    ``max_batch``: most rows at once (default: the folder's limit); ``max_queue``: most jobs
    waiting for admission; ``kv_budget``: KV cache bytes admitted rows may reserve (None: rows
    only); ``prefill_tokens``: prefill work per step (the scheduler's bound; None: none);
    ``max_wait_s``: the gathering window when idle. ``on_step(stats, worker)`` is called after
    every step with its :class:`~dyvte.runtime.scheduler.StepStats` (metrics).
    """

    def __init__(self, pipe, max_batch: int | None = None, max_queue: int = 64, kv_budget: int | None = None,
                 prefill_tokens: int | None = None, max_wait_s: float = 0.0, on_step: Callable | None = None):
        if max_wait_s < 0 or max_queue < 1:
            raise InputError("max wait must be >= 0 and max queue >= 1")
        self.pipe, self.max_queue, self.max_wait_s, self.on_step = pipe, max_queue, max_wait_s, on_step
        self._options = (max_batch, kv_budget, prefill_tokens)
        self.scheduler = pipe.scheduler(*self._options)  # validates
        self.max_batch = self.scheduler.max_batch
        self._cond = threading.Condition()
        self._inbox: deque[Job] = deque()  # submitted, not yet handed to the scheduler
        self._cancels: list[Job] = []
        self._jobs: dict[int, Job] = {}  # sequence id -> job, for every job handed to the scheduler
        self._closing = self._abort = False
        self._arriving = 0
        self._next_poll = 0.0
        #: the state after the last step (read by metrics and /health from other threads)
        self.snapshot = {"running": 0, "prefilling": 0, "waiting": 0, "kv_reserved_bytes": 0, "kv_cache_bytes": 0}
        self._thread = threading.Thread(target=self._loop, name="dyvte-worker", daemon=True)
        self._thread.start()

    # -- submitting ----------------------------------------------------------------------------
    def check(self, seq) -> None:
        """Raise now if ``seq`` could never be admitted (its worst-case KV cache exceeds the budget)."""
        self.scheduler.check(seq)

    def submit(self, job: Job, arrival=None) -> None:
        """Queue ``job`` (``arrival``: from :meth:`arriving`); raises :class:`QueueFullError`,
        :class:`ShuttingDownError` or :class:`~dyvte.runtime.scheduler.KVBudgetError`."""
        self.submit_many([job], arrival)

    def submit_many(self, jobs: list[Job], arrival=None) -> None:
        """Queue ``jobs`` together (all or none), so that they are admitted in the same step."""
        for job in jobs:
            self.check(job.seq)
            if job.stop or job.on_delta is not None:
                job.tracker = TextTracker(self.pipe.decode, job.stop)
            job.seq.on_token = self._on_token(job)
        with self._cond:
            if arrival and arrival[0]:
                arrival[0] = False
                self._arriving -= 1
            if self._closing:
                raise ShuttingDownError("the server is shutting down; retry on another replica")
            if self.queue_depth + len(jobs) > self.max_queue:
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry shortly")
            now = time.monotonic()
            for job in jobs:
                job.enqueued = now
                self._inbox.append(job)
            self._cond.notify_all()

    @contextmanager
    def arriving(self):
        """Count a request as on its way (being read and encoded) until it is submitted (pass
        what this yields to :meth:`submit`) or the block ends, so that an idle worker about to
        start waits for it (up to the window)."""
        arrival = [True]
        with self._cond:
            self._arriving += 1
        try:
            yield arrival
        finally:
            with self._cond:
                if arrival[0]:
                    arrival[0] = False
                    self._arriving -= 1
                    self._cond.notify_all()

    def cancel(self, job: Job, error: Exception) -> None:
        """Withdraw ``job`` (timeout, client gone): ``on_done(error)`` is called now, and its row
        leaves the batch (or the queue) at the next step."""
        with self._cond:
            job.cancelled = True
            try:
                self._inbox.remove(job)
            except ValueError:
                self._cancels.append(job)
            self._cond.notify_all()
        job.finish(error)

    @property
    def queue_depth(self) -> int:
        """Jobs waiting for admission."""
        return len(self._inbox) + len(self.scheduler.waiting)

    @property
    def in_flight(self) -> int:
        """Jobs accepted and not answered yet (waiting, prefilling or decoding)."""
        return len(self._inbox) + len(self._jobs)

    # -- shutting down -------------------------------------------------------------------------
    def close(self, timeout: float | None = None) -> bool:
        """Refuse new jobs, finish every accepted one, stop the worker. Returns False when
        ``timeout`` passed first (then the remaining jobs are failed)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            return True
        with self._cond:
            self._abort = True
            self._cond.notify_all()
        self._thread.join(30)
        return False

    # -- the worker thread ---------------------------------------------------------------------
    def _on_token(self, job: Job):
        def on_token(seq, token) -> bool:
            tr = job.tracker
            if tr is None:
                return False
            delta, stopped = tr.update(seq.tokens)
            if delta and job.on_delta is not None:
                job.on_delta(delta)
            return stopped

        return on_token

    def _loop(self) -> None:
        try:
            while True:
                self._poll_cancelled()
                with self._cond:
                    if not self._intake():
                        return
                try:
                    with self.pipe.lock:
                        finished = self.scheduler.step()
                except Exception as exc:  # never let the worker die: fail the rows in flight, keep serving
                    log.exception("scheduler step failed")
                    self._reset(exc)
                    continue
                self._deliver(finished)
                self._publish()
        finally:
            with self._cond:
                left = list(self._inbox) + list(self._jobs.values())
                self._inbox.clear()
                self._jobs.clear()
            for job in left:
                job.finish(ShuttingDownError("the server shut down before this request finished"))
            with self.pipe.lock:
                self.scheduler.close()

    def _intake(self) -> bool:
        """(cond held) Hand new jobs and cancellations to the scheduler, enforce deadlines, and
        wait while there is nothing to do; False when the worker should stop."""
        sched = self.scheduler
        while True:
            if self._abort:
                return False
            while self._inbox:
                job = self._inbox.popleft()
                try:
                    sched.add(job.seq)
                except DyvteError as exc:  # checked at submit; kept for safety
                    job.finish(exc)
                    continue
                self._jobs[job.seq.id] = job
            for job in self._cancels:
                if sched.cancel(job.seq):  # it was waiting: gone now
                    self._jobs.pop(job.seq.id, None)
            self._cancels.clear()
            now = time.monotonic()
            for job in [j for j in self._jobs.values() if j.expired(now) and not j.seq.done]:
                queued = any(s is job.seq for s in sched.waiting)
                if sched.cancel(job.seq):
                    self._jobs.pop(job.seq.id, None)
                job.finish(RequestTimeoutError("the request timed out in the queue" if queued
                                               else "the request timed out while generating"))
            if sched.idle:
                if self._closing:
                    return False
                self._cond.wait(self._wait_s())
                continue
            if not sched.running and not sched.prefilling and self._arriving and self.max_wait_s > 0 \
                    and not self._closing:
                first = self._jobs.get(sched.waiting[0].id) if sched.waiting else None
                end = (first.enqueued if first else now) + self.max_wait_s
                if now < end and len(sched.waiting) < self.max_batch:  # gather requests being received
                    self._cond.wait(end - now)
                    continue
            return True

    def _wait_s(self) -> float | None:
        """How long an idle worker may sleep: until the next deadline or cancellation poll."""
        ends = [j.deadline for j in self._jobs.values() if j.deadline is not None]
        if any(j.is_cancelled is not None for j in self._jobs.values()):
            ends.append(self._next_poll)
        return max(0.0, min(ends) - time.monotonic()) if ends else None

    def _poll_cancelled(self) -> None:
        """Cancel jobs whose ``is_cancelled`` says so (at most every CANCEL_POLL_S)."""
        now = time.monotonic()
        if now < self._next_poll:
            return
        self._next_poll = now + CANCEL_POLL_S
        with self._cond:
            polled = [j for j in self._jobs.values() if j.is_cancelled is not None and not j.done]
        for job in polled:
            try:
                gone = bool(job.is_cancelled())
            except Exception:  # a broken callback must not stop the worker
                gone = False
            if gone:
                self.cancel(job, RequestCancelledError("the request was cancelled"))

    def _deliver(self, finished: list) -> None:
        with self._cond:
            jobs = [(s, self._jobs.pop(s.id, None)) for s in finished]
        for seq, job in jobs:
            if job is None or seq.finish == "cancelled":
                continue  # answered when it was cancelled
            try:
                job.finish(self._outcome(job, seq))
            except Exception as exc:  # e.g. the tokenizer failed on its tokens
                log.exception("could not answer a finished request")
                job.finish(exc)

    def _outcome(self, job: Job, seq) -> Outcome:
        res = self.pipe.result(seq)
        text, finish = res.text, res.finish_reason
        if job.tracker is not None:
            text, rest, stopped = job.tracker.final(res.text)
            if stopped:
                finish = "stop"
            if rest and job.on_delta is not None:
                job.on_delta(rest)
                job.tracker.sent = text
        t = res.timings
        run_s = t.get("prefill_s", 0.0) + t.get("decode_s", 0.0)
        return Outcome(res, text, finish, max(seq.peak_batch, 1), t.get("queue_s", 0.0), run_s)

    def _reset(self, exc: Exception) -> None:
        """After a failed step: fail the rows that were in flight, keep the waiting ones, start a
        fresh scheduler (the old one's state is unknown)."""
        old = self.scheduler
        waiting = list(old.waiting)
        old.waiting.clear()
        with self._cond:
            failed = [j for sid, j in self._jobs.items() if not any(s.id == sid for s in waiting)]
            for j in failed:
                self._jobs.pop(j.seq.id, None)
        for job in failed:
            job.finish(exc)
        with self.pipe.lock:
            try:
                old.close()
            except Exception:
                log.exception("could not free the failed scheduler's caches")
            self.scheduler = self.pipe.scheduler(*self._options)
        for s in waiting:
            self.scheduler.add(s)

    def _publish(self) -> None:
        sched = self.scheduler
        st = sched.last
        self.snapshot = {"running": st.running, "prefilling": st.prefilling, "waiting": st.waiting,
                         "kv_reserved_bytes": st.kv_reserved, "kv_cache_bytes": sched.cache_bytes()}
        if self.on_step is not None:
            try:
                self.on_step(st, self)
            except Exception:
                log.exception("on_step callback failed")
