"""What a submitted request can be answered with instead of its rows.

Each maps to one HTTP answer in the API layer, which is the only place that knows about HTTP:

| error              | meaning                                                            | HTTP |
|--------------------|--------------------------------------------------------------------|------|
| ``QueueFull``      | refused at once: the queue's bound in rows would be exceeded, or the work queued ahead would not leave it time to finish before its deadline | 503 + ``Retry-After`` |
| ``WontFinish``     | refused at once: its own rows alone take longer than its deadline allows, at the measured throughput | 413 |
| ``DeadlineExceeded``| the deadline passed before the request's rows ran; never computed | 504  |
| ``WorkerStopped``  | the worker is draining or stopped and accepts nothing new          | 503  |
| ``ComputeError``   | this request's own rows failed to compute (isolated from neighbours)| 500 |
"""

from __future__ import annotations

from service.serving.errors import FlowserveError

__all__ = ["BatchingError", "QueueFull", "WontFinish", "DeadlineExceeded", "WorkerStopped", "ComputeError"]


class BatchingError(FlowserveError):
    """Base class of every error the device worker answers a request with."""


class QueueFull(BatchingError):
    """The worker's queue bound in rows would be exceeded, or the work ahead is too much for the
    request's deadline; retry after ``retry_after`` seconds. ``reason`` says which when it is the
    latter (``None`` for the bound)."""

    def __init__(self, retry_after: float, message: str | None = None) -> None:
        self.retry_after = float(retry_after)
        self.reason = message
        super().__init__(message or f"queue is full; retry after about {self.retry_after:.2f} s")


class WontFinish(BatchingError):
    """The request's own rows take longer than its deadline allows, at the throughput measured for
    its model and pass: refused at once (never computed), since waiting would not help.

    Attributes: ``seconds`` (the estimated compute), ``rows_per_second`` (the measured rate),
    ``budget`` (seconds left before the deadline when it was refused), ``rows``.
    """

    def __init__(self, rows: int, seconds: float, rows_per_second: float, budget: float) -> None:
        self.rows, self.seconds = int(rows), float(seconds)
        self.rows_per_second, self.budget = float(rows_per_second), float(budget)
        super().__init__(
            f"{self.rows} rows would take about {self.seconds:.1f} s to compute at the measured "
            f"{self.rows_per_second:,.0f} rows/s, more than the {self.budget:.1f} s left before the deadline"
        )


class DeadlineExceeded(BatchingError):
    """The request's deadline passed before its rows were computed; they never will be."""


class WorkerStopped(BatchingError):
    """The worker is draining or stopped and does not accept (or no longer runs) this request."""


class ComputeError(BatchingError):
    """This request's own rows failed to compute, alone; the message is the model's error, short."""
