"""What a submitted request can be answered with instead of its rows.

Each maps to one HTTP answer in the API layer, which is the only place that knows about HTTP:

| error              | meaning                                                            | HTTP |
|--------------------|--------------------------------------------------------------------|------|
| ``QueueFull``      | refused at once: the queue's bound in rows would be exceeded       | 503 + ``Retry-After`` |
| ``DeadlineExceeded``| the deadline passed before the request's rows ran; never computed | 504  |
| ``WorkerStopped``  | the worker is draining or stopped and accepts nothing new          | 503  |
| ``ComputeError``   | this request's own rows failed to compute (isolated from neighbours)| 500 |
"""

from __future__ import annotations

__all__ = ["BatchingError", "QueueFull", "DeadlineExceeded", "WorkerStopped", "ComputeError"]


class BatchingError(Exception):
    """Base class of every error the device worker answers a request with."""


class QueueFull(BatchingError):
    """The worker's queue bound in rows would be exceeded; retry after ``retry_after`` seconds."""

    def __init__(self, retry_after: float, message: str | None = None) -> None:
        self.retry_after = float(retry_after)
        super().__init__(message or f"queue is full; retry after about {self.retry_after:.2f} s")


class DeadlineExceeded(BatchingError):
    """The request's deadline passed before its rows were computed; they never will be."""


class WorkerStopped(BatchingError):
    """The worker is draining or stopped and does not accept (or no longer runs) this request."""


class ComputeError(BatchingError):
    """This request's own rows failed to compute, alone; the message is the model's error, short."""
