"""How fast the worker computes rows: the estimates its scheduling and admission rest on.

Two estimates, both written by the worker thread after each batch:

- :class:`Throughput`, one per worker: an exponential moving average of rows per second over every
  batch, :math:`r \\leftarrow (1-\\alpha) r + \\alpha\\,\\text{rows}/\\text{seconds}`; it only sizes the
  ``retry_after`` of a full queue.
- :class:`BulkRate`, one per (key, pass) queue: the rows per second of that model's pass on *full*
  batches (batches cut by ``max_batch_rows`` or the time slice, or of at least
  :data:`BULK_ROWS` rows), as the **maximum** over the last :data:`BULK_KEEP` of them. Small
  batches are left out because their fixed cost dominates (a one-row batch says nothing about a
  million rows); the maximum, not a mean, because a batch can only be slowed down, never sped up,
  by what else the machine does (the event loop holding the GIL, another process): one stalled
  batch must not make the service refuse requests it would finish. A real slow-down shows in every
  batch and replaces the old maximum after :data:`BULK_KEEP` batches. The first full batch is not
  counted: it pays one-time costs (lazy initialisation, allocator growth, first kernel launches;
  measured here: 64 rows of a fresh flow took 1.8 s, the next 64 rows 8 ms), and a rate that low
  would refuse requests the model finishes easily.
"""

from __future__ import annotations

from collections import deque

__all__ = ["BULK_KEEP", "BULK_ROWS", "RETRY_AFTER_BOUNDS", "BulkRate", "Throughput"]

#: Bounds on the ``retry_after`` estimate of :class:`~.errors.QueueFull`, in seconds.
RETRY_AFTER_BOUNDS = (0.05, 300.0)

#: A batch of at least this many rows counts as full for :class:`BulkRate` even when uncut.
BULK_ROWS = 256

#: How many recent full batches :class:`BulkRate` keeps.
BULK_KEEP = 8


class Throughput:
    """Exponential moving average of rows computed per second, over every batch."""

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.rows_per_second: float | None = None

    def update(self, rows: int, seconds: float) -> None:
        rate = rows / max(seconds, 1e-6)
        old = self.rows_per_second
        self.rows_per_second = rate if old is None else (1 - self.alpha) * old + self.alpha * rate

    def seconds_for(self, rows: int) -> float:
        """Estimated seconds to compute ``rows`` rows (1 s before anything ran), within the bounds."""
        low, high = RETRY_AFTER_BOUNDS
        rate = self.rows_per_second
        estimate = 1.0 if not rate else rows / rate
        return min(high, max(low, estimate))


class BulkRate:
    """Rows per second of one (key, pass) on full batches: the best of the last ``keep``."""

    def __init__(self, keep: int = BULK_KEEP) -> None:
        self._recent: deque[float] = deque(maxlen=keep)
        self.rows_per_second: float | None = None
        self._warm = False

    def update(self, rows: int, seconds: float) -> None:
        if not self._warm:
            self._warm = True  # the first full batch: one-time costs, not the rate (module docstring)
            return
        self._recent.append(rows / max(seconds, 1e-6))
        self.rows_per_second = max(self._recent)

    @property
    def measurements(self) -> int:
        """How many full batches the rate rests on (at most ``keep``)."""
        return len(self._recent)

    def seconds_for(self, rows: int) -> float | None:
        """Estimated seconds of compute for ``rows`` rows; ``None`` before any full batch ran."""
        rate = self.rows_per_second
        return None if rate is None else rows / rate

    def rows_in(self, seconds: float) -> int | None:
        """Rows computed in ``seconds`` (at least 1); ``None`` before any full batch ran."""
        rate = self.rows_per_second
        return None if rate is None else max(1, int(rate * seconds))
