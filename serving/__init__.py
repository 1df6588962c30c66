"""Serving: front ends over the runtime's step-level scheduler (``dyvte.serving``).

    serving/worker.py      the serving loop: one thread drives :class:`dyvte.runtime.scheduler.Scheduler`
                           for many clients (jobs, bounded queue, deadlines, cancellation, streaming
                           text and stop strings, drain); both front ends use it
    serving/server.py      ``dyvte serve``: the OpenAI-compatible HTTP front (FastAPI + uvicorn):
                           request parsing, images, errors, metrics
    serving/triton.py      ``dyvte triton-repo``: the Triton repository writer and the python-backend
                           model's logic (requests handed to the same worker, answered from its thread)
    serving/assets/model.py  the python-backend model file copied into repositories

Calls go one way, as in vLLM (entrypoints -> scheduler -> model runner): a front end turns requests
into :class:`~dyvte.serving.worker.Job` objects; the worker steps the scheduler
(``dyvte.runtime.scheduler``, which decides per step who decodes, who is admitted and how far
prefills go); the scheduler has the dispatcher (``dyvte.runtime.dispatch``) run that step on a
backend. The scheduler stays in the runtime, because ``Pipeline.run`` drives it too and it is
usable from Python without a server; everything here is about clients.
"""

from __future__ import annotations

from dyvte.errors import InputError

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_size(text) -> int | None:
    """A byte size: an integer, or a number with a unit (``512MiB``, ``2GiB``, ``1.5G``; K/M/G/T
    are binary, KB/MB/GB/TB decimal). None, "" and "none" give None."""
    if text is None or isinstance(text, int) and not isinstance(text, bool):
        return text
    s = str(text).strip().lower().replace(" ", "")
    if s in ("", "none"):
        return None
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    try:
        value = float(num) * _UNITS[unit]
    except (ValueError, KeyError):
        raise InputError(f"{text!r} is not a size; write bytes or a number with a unit, e.g. 512MiB or 2GiB") from None
    if value < 1:
        raise InputError(f"size {text!r} must be at least 1 byte")
    return int(value)
