"""One batch on the device, and what to do when it fails.

:func:`run_pass` is the single torch call of a batch: the rows of its segments are copied once
into one host buffer (pinned when the model is on CUDA) in the model's dtype, moved to the model's
device once (non-blocking from pinned memory), computed under :func:`torch.inference_mode` (every
allow-listed flow computes its log-Jacobian analytically, so none needs autograd) by the model's
packed pass (one ``(B, D + k)`` tensor; traced graphs when the model has them, see
:mod:`service.accel.torchscript`) and copied back to the CPU once.

:func:`compute` adds failure isolation. A batch that raises is retried request by request, so only
the requests whose own rows fail get the error; a CUDA out-of-memory error instead halves the batch
(by rows, cutting a request if need be) and runs the halves one after the other.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from service.serving.batching.config import OUTPUTS, Pass
from service.serving.batching.jobs import Job, Segment

__all__ = ["run_pass", "compute", "is_out_of_memory", "short_message"]

log = logging.getLogger(__name__)

#: ``torch.cuda.OutOfMemoryError`` where this torch has it (CPU builds do too, but never raise it).
_OOM: tuple[type[BaseException], ...] = tuple(
    t for t in (getattr(torch.cuda, "OutOfMemoryError", None), getattr(torch, "OutOfMemoryError", None))
    if isinstance(t, type)
)

Outcome = tuple[Segment, "np.ndarray | Exception"]


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is a device out-of-memory error (then halving the batch may help)."""
    return bool(_OOM) and isinstance(exc, _OOM)


def short_message(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's text, at most ``limit`` characters (its type if empty)."""
    text = str(exc).strip()
    text = text.splitlines()[0] if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


#: numpy's name for each model dtype (rows are gathered in numpy on the CPU).
_NUMPY_DTYPES: dict[torch.dtype, type] = {torch.float32: np.float32, torch.float64: np.float64}


def _to_device(parts: list[np.ndarray], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Concatenate row blocks into one host tensor of ``dtype`` and move it to ``device`` once.

    On the CPU the rows are gathered by numpy into a fresh array that torch then shares: no torch
    op runs, so the worker does not give up the GIL here (each time it does, it waits for the
    event loop to hand it back; see :mod:`service.accel.torchscript`).
    """
    total = sum(int(p.shape[0]) for p in parts)
    width = int(parts[0].shape[1])
    pinned = device.type == "cuda"
    if pinned or dtype not in _NUMPY_DTYPES:
        host = torch.empty((total, width), dtype=dtype, pin_memory=pinned)
        view = host.numpy()
    else:
        view = np.empty((total, width), dtype=_NUMPY_DTYPES[dtype])
        host = torch.from_numpy(view)
    at = 0
    for part in parts:  # one copy per block, casting to the model's dtype row by row
        view[at : at + part.shape[0]] = part
        at += part.shape[0]
    return host.to(device, non_blocking=True) if pinned else host


#: On the CPU, a batch of fewer rows than this runs on one intra-op thread; larger ones on all of
#: torch's threads (its default, or ``OMP_NUM_THREADS``). A small batch gains nothing from a second
#: OpenMP thread, and while the event loop and the clients keep the other cores busy, every parallel
#: region waits for a thread that is not running: on 2 cores under load, a one-row moons
#: ``log_prob`` took 16 ms on 2 threads and 0.4 ms on one (bench/FINDINGS.md). Batches of 8192 rows
#: (bulk requests, when the event loop is idle) still gain from every core. What counts is the
#: *request*: every chunk of a request of at least this many rows runs on all threads, however few
#: rows the time slice gives the chunk. Counting the chunk instead, a 100,000-row moons sample ran
#: in ~3,300-row slices on one thread (the rate measured on one thread sized the next slices, so it
#: never grew past 4096 rows): 2.57 s of compute for three samples, against 1.65 s on two threads.
SINGLE_THREAD_ROWS = 4096
_THREADS = torch.get_num_threads()
_threads_now = 0  # what the worker last set (0: nothing yet, so its first batch sets it)


def _set_intra_op_threads(device: torch.device, rows: int) -> None:
    """One torch thread for a small CPU batch (see :data:`SINGLE_THREAD_ROWS`), else all of them.

    The setting stays until a batch needs the other one, so a run of small batches pays nothing.
    """
    global _threads_now
    if device.type != "cpu":
        return
    want = 1 if rows < SINGLE_THREAD_ROWS else _THREADS
    if want != _threads_now:
        torch.set_num_threads(want)
        _threads_now = want


def run_pass(model: Any, pass_: Pass, rows: list[np.ndarray], context: list[np.ndarray] | None,
             request_rows: int = 0) -> np.ndarray:
    """Run one pass over the concatenated row blocks; return packed CPU columns ``[z|x, scalars...]``.

    For ``ENCODE`` the columns are ``z`` (D), ``log_det``, ``base_log_prob``, ``log_prob``; for
    ``DECODE`` they are ``x`` (D), ``log_prob``. All in the model's dtype. ``request_rows``: the rows
    of the largest request the blocks belong to, when a block is a chunk of it (the thread count
    follows the larger of it and the batch's rows, :data:`SINGLE_THREAD_ROWS`).
    """
    device, dtype = torch.device(model.device), model.dtype
    x = _to_device(rows, device, dtype)
    c = None if context is None else _to_device(context, device, dtype)
    b = x.shape[0]
    _set_intra_op_threads(device, max(b, request_rows))
    with torch.inference_mode():
        if pass_ is Pass.ENCODE:
            packed = model.encode_packed(x, c)
        else:
            packed = model.decode_packed(x, c)
        if packed.device.type != "cpu" or packed.dtype != dtype:
            packed = packed.to(dtype).cpu()  # the one device-to-host copy of the batch
    out = packed.numpy()
    if out.shape != (b, model.features + len(OUTPUTS[pass_]) - 1):
        raise RuntimeError(f"model returned columns of shape {out.shape} for {b} rows")
    return out


def _by_job(segments: list[Segment]) -> list[list[Segment]]:
    groups: dict[Job, list[Segment]] = {}
    for segment in segments:
        groups.setdefault(segment.job, []).append(segment)
    return list(groups.values())


def _halve(segments: list[Segment]) -> tuple[list[Segment], list[Segment]]:
    """Split segments into two lists of about half the rows each, cutting one segment if needed."""
    half = sum(len(s) for s in segments) // 2
    first: list[Segment] = []
    at = 0
    for i, segment in enumerate(segments):
        if at + len(segment) <= half:
            first.append(segment)
            at += len(segment)
            continue
        if at == half:
            return first, segments[i:]
        left, right = segment.cut(half - at)
        return first + [left], [right] + segments[i + 1 :]
    return first, []


def _release_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def compute(model: Any, pass_: Pass, segments: list[Segment]) -> list[Outcome]:
    """Compute a batch; each segment gets its packed rows, or the exception its own rows raised."""
    try:
        context = None if segments[0].context is None else [s.context for s in segments]
        packed = run_pass(model, pass_, [s.rows for s in segments], context,
                          request_rows=max(s.job.n for s in segments))
    except Exception as exc:  # noqa: BLE001 - any model error is isolated, never fatal
        if is_out_of_memory(exc):
            _release_cached_memory()
            rows = sum(len(s) for s in segments)
            if rows > 1:
                log.warning("out of memory on a batch of %d rows; halving it", rows)
                first, second = _halve(segments)
                return compute(model, pass_, first) + compute(model, pass_, second)
        else:
            groups = _by_job(segments)
            if len(groups) > 1:
                return [outcome for group in groups for outcome in compute(model, pass_, group)]
        return [(segment, exc) for segment in segments]
    outcomes: list[Outcome] = []
    at = 0
    for segment in segments:
        outcomes.append((segment, packed[at : at + len(segment)]))
        at += len(segment)
    return outcomes
