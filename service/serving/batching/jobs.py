"""Requests as the worker sees them: jobs in per-(model, pass) FIFO queues, cut into segments.

A :class:`Job` is one submitted request of ``n`` rows. The worker hands its rows to batches in
order, as :class:`Segment` s ``[start, stop)``: a small job fits whole into one batch beside
others, a job larger than ``max_batch_rows`` is cut into chunks that run in consecutive batches.
The job is answered once every row has come back (the parts are put back in row order), or as soon
as it fails, expires or is dropped; it is never answered twice.

The fields that change (``queued``, ``taken``, ``in_flight``, ``closed``, ``drop_reason``) are
guarded by the worker's lock; ``parts`` and ``done_rows`` are touched by the worker thread alone.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Hashable

import numpy as np
import torch

from service.model import contract
from service.serving.batching.config import OUTPUTS, Pass

__all__ = ["Job", "Segment", "JobQueue", "check_rows", "numpy_dtype", "empty_result", "unpack", "assemble"]


@dataclass(eq=False)
class Job:
    """One request: its rows, where to answer it, and how far the worker has got with it."""

    key: Hashable
    pass_: Pass
    model: Any
    rows: np.ndarray
    context: np.ndarray | None
    n: int  # rows of the request
    deadline: float | None  # time.monotonic() seconds
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    enqueued_at: float
    queue: "JobQueue"
    queued: int = 0  # rows still waiting in the queue (counted against the bound)
    taken: int = 0  # rows handed to batches so far
    in_flight: bool = False  # a segment of it is in the batch computing now
    started: bool = False  # it has entered a batch at least once
    closed: bool = False  # answered, withdrawn or dropped: no rows will be taken any more
    drop_reason: BaseException | None = None  # drop the rest of it once the batch computing it ends
    done_rows: int = 0
    parts: list[tuple[int, np.ndarray]] = field(default_factory=list)
    ready_at: float = 0.0  # when it last joined the tail of its queue (arrival, or after a chunk)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and self.deadline <= now


@dataclass(frozen=True, eq=False)
class Segment:
    """Rows ``[start, stop)`` of a job, as they go into one batch (views, not copies)."""

    job: Job
    start: int
    stop: int
    rows: np.ndarray
    context: np.ndarray | None

    @classmethod
    def of(cls, job: Job, start: int, stop: int) -> "Segment":
        context = None if job.context is None else job.context[start:stop]
        return cls(job, start, stop, job.rows[start:stop], context)

    def __len__(self) -> int:
        return self.stop - self.start

    def cut(self, at: int) -> tuple["Segment", "Segment"]:
        """Split after ``at`` rows of this segment."""
        mid = self.start + at
        return Segment.of(self.job, self.start, mid), Segment.of(self.job, mid, self.stop)


class JobQueue:
    """The queue of one (key, pass), first in first out, except that a job cut into chunks goes
    back to the tail after each chunk (round robin); ``rows`` counts the rows still waiting in it."""

    def __init__(self, key: Hashable, pass_: Pass) -> None:
        self.key = key
        self.pass_ = pass_
        self.jobs: deque[Job] = deque()
        self.rows = 0

    def head(self) -> Job | None:
        """The oldest job still waiting (closed jobs are dropped here, lazily)."""
        while self.jobs and self.jobs[0].closed:
            self.jobs.popleft()
        return self.jobs[0] if self.jobs else None


def numpy_dtype(dtype: torch.dtype) -> np.dtype:
    """The numpy dtype of a torch dtype (float32 → float32, float64 → float64, ...)."""
    return torch.empty((), dtype=dtype).numpy().dtype


def check_rows(model: Any, rows: Any, context: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """``rows`` (and ``context``) as real-valued arrays that keep ``model``'s contract
    (:func:`service.model.contract.check_rows`: ``(n, D)``, context ``(n, C)`` or ``None``).

    The edge validated the request's input, so a request that breaks this is a bug of its caller
    (:class:`~service.model.contract.ContractError`); it is refused here, alone, because its rows
    could not even be concatenated with their batch neighbours'.
    """
    rows = np.asarray(rows)
    context = None if context is None else np.asarray(context)
    contract.check_rows(int(model.features), int(model.context_features), rows.shape,
                        None if context is None else context.shape)
    for array in (rows, context):
        if array is not None and array.dtype.kind not in "fiu":
            raise contract.ContractError(f"rows and context must be real numbers, got dtype {array.dtype}")
    return rows, context


def empty_result(model: Any, pass_: Pass) -> dict[str, np.ndarray]:
    """The answer to a request of zero rows, without running the model."""
    dtype = numpy_dtype(model.dtype)
    vector, *scalars = OUTPUTS[pass_]
    result = {vector: np.empty((0, model.features), dtype=dtype)}
    result.update({name: np.empty((0,), dtype=dtype) for name in scalars})
    return result


def unpack(packed: np.ndarray, pass_: Pass, features: int) -> dict[str, np.ndarray]:
    """Split packed columns ``[z | x (D columns), scalar, ...]`` into fresh contiguous arrays."""
    vector, *scalars = OUTPUTS[pass_]
    result = {vector: np.ascontiguousarray(packed[:, :features])}
    for i, name in enumerate(scalars):
        result[name] = np.ascontiguousarray(packed[:, features + i])
    return result


def assemble(job: Job) -> dict[str, np.ndarray]:
    """Put a finished job's parts back in row order and unpack them."""
    parts = sorted(job.parts, key=lambda part: part[0])
    packed = parts[0][1] if len(parts) == 1 else np.concatenate([p for _, p in parts])
    job.parts.clear()
    return unpack(packed, job.pass_, int(job.model.features))
