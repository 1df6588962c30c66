"""Dynamic batching of generation requests over one :class:`~dyvte.runtime.Pipeline`.

A :class:`Batcher` owns one worker thread. Requests (:class:`Job`) wait in a bounded queue; the
worker takes the oldest one, waits until ``max_wait_s`` after its arrival, or after the end of the
previous batch if it arrived while that one ran (or until ``max_batch`` requests with the same
exit policy are waiting), and runs them as ONE ``Pipeline.run`` call, in which every sample exits
on its own and keeps its own token limit, sampling and stop strings. It waits only while more
requests may come (some are being received, see :meth:`Batcher.arriving`, or the last batch held
several), so a lone client is never delayed.
An answer is therefore the same whether its request ran alone or in a batch.

Streaming and stop strings use ``Pipeline.run``'s ``on_step`` hook: after every generated token
the worker decodes each streaming/stopping row, hands new text to the job's ``on_delta`` and stops
rows whose text reached a stop string. Callbacks run on the worker thread; the HTTP server hands
them to its event loop (``loop.call_soon_threadsafe``).
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

_FINISH_LOCK = threading.Lock()  # Job.finish's check-and-set
log = logging.getLogger("dyvte.serve")

#: A batch of several requests is taken as a sign of load for this long after it ended.
BUSY_MEMORY_S = 1.0


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


def check_request(pipe, request) -> int:
    """Check one :class:`~dyvte.runtime.pipeline.Request` before it is queued (so a bad request
    never fails a batch): the pipeline's own checks (limits, images, tiles), the two limits worded
    for API clients; returns its max_new_tokens."""
    lim = pipe.limits
    try:
        n_new, _ = pipe.check(request)
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
    return n_new


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
    batch_size: int
    queue_s: float
    run_s: float


@dataclass
class Job:
    """One request in the queue. ``on_done(Outcome | Exception)`` is called exactly once;
    ``on_delta(text)`` (streaming) with each new piece of text; both on the worker thread (or
    the submitting thread for errors raised before the job ran)."""

    request: object  # dyvte.runtime.pipeline.Request
    policy: str
    gate_threshold: float
    on_done: Callable
    stop: tuple[str, ...] = ()
    on_delta: Callable | None = None
    deadline: float | None = None  # time.monotonic() seconds
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    truncated: bool = False  # its row was stopped because it was cancelled or ran out of time
    tokens: list = field(default_factory=list)
    tracker: TextTracker | None = None
    _done: bool = False

    @property
    def done(self) -> bool:
        return self._done

    @property
    def key(self):
        return self.policy, self.gate_threshold

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def finish(self, outcome) -> None:
        """Deliver the outcome once (the worker and a cancelling event loop may both call this)."""
        with _FINISH_LOCK:
            if self._done:
                return
            self._done = True
        try:
            self.on_done(outcome)
        except Exception:  # a callback must never kill the worker
            log.exception("job callback failed")


class Batcher:
    """Collects :class:`Job` objects into batches and runs them through ``pipe`` on one thread.

    ``max_batch``: most requests per batch (at most the folder's limit); ``max_wait_s``: how
    long the oldest waiting request waits for others; ``max_queue``: most waiting requests
    (``submit`` raises :class:`QueueFullError` beyond it). ``on_batch(size, seconds)`` is called
    after every batch (metrics).
    """

    def __init__(self, pipe, max_batch: int | None = None, max_wait_s: float = 0.01, max_queue: int = 64,
                 on_batch: Callable | None = None):
        limit = pipe.limits["max_batch"]
        max_batch = limit if max_batch is None else max_batch
        if not 1 <= max_batch <= limit:
            raise InputError(f"max batch must be in [1, {limit}] (this engine folder's limit), got {max_batch}")
        if max_wait_s < 0 or max_queue < 1:
            raise InputError("max wait must be >= 0 and max queue >= 1")
        self.pipe, self.max_batch, self.max_wait_s, self.max_queue = pipe, max_batch, max_wait_s, max_queue
        self.on_batch = on_batch
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._running = 0  # jobs in the batch being run
        self._last_end = 0.0  # when the last batch finished (time.monotonic())
        self._last_size = 0
        self._arriving = 0  # requests being read and encoded, about to be submitted
        self._thread = threading.Thread(target=self._loop, name="dyvte-batcher", daemon=True)
        self._thread.start()

    # -- submitting ----------------------------------------------------------------------------
    def submit(self, job: Job, arrival=None) -> None:
        """Queue ``job`` (``arrival``: from :meth:`arriving`); raises :class:`QueueFullError` or
        :class:`ShuttingDownError`."""
        if job.stop or job.on_delta is not None:
            job.tracker = TextTracker(self.pipe.decode, job.stop)
        with self._cond:
            if arrival and arrival[0]:
                arrival[0] = False
                self._arriving -= 1
            if self._closing:
                raise ShuttingDownError("the server is shutting down; retry on another replica")
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry shortly")
            job.enqueued = time.monotonic()
            self._pending.append(job)
            self._cond.notify_all()

    @contextmanager
    def arriving(self):
        """Count a request as on its way (being read and encoded) until it is submitted (pass
        what this yields to :meth:`submit`) or the block ends, so that a batch about to start
        waits for it (up to the window)."""
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
        """Withdraw ``job`` (timeout, client gone): dropped from the queue, or its row stopped at
        the next token when it is running; ``on_done(error)`` is called now."""
        with self._cond:
            job.cancelled = True
            try:
                self._pending.remove(job)
            except ValueError:
                pass
        job.finish(error)

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        return len(self._pending) + self._running

    # -- shutting down -------------------------------------------------------------------------
    def close(self, timeout: float | None = None) -> bool:
        """Refuse new jobs, finish every queued and running one, stop the worker. Returns
        False when ``timeout`` passed first (then the remaining jobs are failed)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cond:
                left = list(self._pending)
                self._pending.clear()
            for job in left:
                job.finish(ShuttingDownError("the server shut down before this request ran"))
            return False
        return True

    # -- the worker ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except Exception as exc:  # never let the worker die: fail this batch, keep serving
                log.exception("batch failed")
                for job in batch:
                    job.finish(exc)
            finally:
                with self._cond:
                    self._running = 0
                    self._last_end = time.monotonic()

    def _drop_dead(self) -> None:
        """Fail queued jobs that were cancelled or ran out of time (lock held)."""
        now = time.monotonic()
        for job in [j for j in self._pending if j.cancelled or j.expired(now)]:
            self._pending.remove(job)
            job.finish(RequestTimeoutError("the request timed out in the queue"))

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                self._drop_dead()
                if self._pending:
                    break
                if self._closing:
                    return None
                self._cond.wait()
            first = self._pending[0]
            # wait from the oldest request's arrival, or from the end of the last batch when it
            # arrived while that one ran (clients answered by that batch are about to send again),
            # but only while more requests may come: some are arriving, or the last batch (recent)
            # held several. A lone client never waits.
            window_end = max(first.enqueued, self._last_end) + self.max_wait_s
            while not self._closing:
                if sum(1 for j in self._pending if j.key == first.key) >= self.max_batch:
                    break
                now = time.monotonic()
                busy = self._last_size > 1 and now - self._last_end < BUSY_MEMORY_S
                if now >= window_end or not (self._arriving or busy):
                    break
                self._cond.wait(window_end - now)
            batch = [j for j in self._pending if j.key == first.key][: self.max_batch]
            for job in batch:
                self._pending.remove(job)
            self._running = self._last_size = len(batch)
            return batch

    def _run(self, batch: list[Job]) -> None:
        pipe = self.pipe
        start = time.monotonic()

        def on_step(step, tokens, active):
            now = time.monotonic()
            stop = []
            for i, job in enumerate(batch):
                if not active[i]:
                    continue
                job.tokens.append(tokens[i])
                if job.cancelled or job.expired(now):
                    job.truncated = True
                    stop.append(i)
                    continue
                if job.tracker is not None:
                    delta, stopped = job.tracker.update(job.tokens)
                    if delta and job.on_delta is not None:
                        job.on_delta(delta)
                    if stopped:
                        stop.append(i)
            return stop

        policy, threshold = batch[0].key
        try:
            results = pipe.run([j.request for j in batch], policy, threshold, on_step=on_step)
        except InputError as exc:
            if len(batch) == 1:
                batch[0].finish(exc)
                return
            # checked before queueing, so rare: run each alone so only the bad one fails (a job that
            # already streamed text fails too: running it again would send that text twice)
            for job in batch:
                if job.tracker is not None and job.tracker.sent:
                    job.finish(exc)
                    continue
                job.tokens.clear()
                job.truncated = False
                self._run([job])
            return
        run_s = time.monotonic() - start
        if self.on_batch is not None:
            try:
                self.on_batch(len(batch), run_s)
            except Exception:
                log.exception("on_batch callback failed")
        for job, res in zip(batch, results):
            if job.truncated or job.cancelled:
                job.finish(RequestCancelledError("the request was cancelled") if job.cancelled
                           else RequestTimeoutError("the request timed out while generating"))
                continue
            text, finish = res.text, res.finish_reason
            if job.tracker is not None:
                text, rest, stopped = job.tracker.final(res.text)
                if stopped:
                    finish = "stop"
                if rest and job.on_delta is not None:
                    job.on_delta(rest)
                    job.tracker.sent = text
            job.finish(Outcome(res, text, finish, len(batch), start - job.enqueued, run_s))
