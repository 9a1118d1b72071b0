"""The vocabulary of the device worker: the two passes, its configuration and its metrics hook."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Hashable, Protocol

from service.model.density import DECODE_COLUMNS, ENCODE_COLUMNS

__all__ = ["Pass", "BatchingConfig", "BatchObserver"]


class Pass(str, Enum):
    """The two kinds of work a flow does; rows of one pass of one model share batches.

    ``ENCODE`` is :meth:`DensityModel.encode`, ``x → (z, log_det, base_log_prob, log_prob)``, and
    serves ``log_prob``, ``inverse`` and ``score``; ``DECODE`` is :meth:`DensityModel.decode`,
    ``z → (x, log_prob)``, and serves ``forward`` and ``sample``.
    """

    ENCODE = "encode"
    DECODE = "decode"


#: The arrays a request gets back for each pass, in the order the worker packs them.
OUTPUTS: dict[Pass, tuple[str, ...]] = {Pass.ENCODE: ENCODE_COLUMNS, Pass.DECODE: DECODE_COLUMNS}


@dataclass(frozen=True)
class BatchingConfig:
    """How the worker forms batches (Triton's dynamic batcher, sized in rows).

    Attributes:
        max_batch_rows: most rows in one torch call; larger requests are split into chunks.
        max_wait_ms: how long after the oldest waiting request arrived the worker may wait for
            more rows before running a batch that is not yet full (Triton's ``max_queue_delay``);
            0 runs at once.
        max_queue_rows: bound on the rows waiting in all queues of the worker; a request that
            would exceed it is refused at once with :class:`~service.serving.batching.QueueFull`.
        max_batch_ms: time slice of a large request: once the queue's throughput is measured, a
            request that does not fit whole into ``max_batch_ms`` of compute runs in chunks of about
            that long, each in a batch of its own, and goes to the back of its queue after each
            chunk, so a one-row request waits at most about one slice. Small requests still share
            batches of up to ``max_batch_rows``. 0 turns the slice off (chunks of ``max_batch_rows``).
    """

    max_batch_rows: int = 8192
    max_wait_ms: float = 0.0
    max_queue_rows: int = 1_000_000
    max_batch_ms: float = 25.0

    def __post_init__(self) -> None:
        if self.max_batch_rows < 1:
            raise ValueError("max_batch_rows must be >= 1")
        if not self.max_wait_ms >= 0:
            raise ValueError("max_wait_ms must be >= 0")
        if self.max_queue_rows < 1:
            raise ValueError("max_queue_rows must be >= 1")
        if not self.max_batch_ms >= 0:
            raise ValueError("max_batch_ms must be >= 0")


class BatchObserver(Protocol):
    """Metrics hook (the API layer implements it with prometheus-client).

    ``on_batch`` and ``on_dequeue`` are called from the worker thread, ``on_queue_depth`` and
    ``on_model_queue_depth`` from whichever thread changed the depth (the submitting event loop or the worker). Keep them cheap
    and thread-safe; an exception they raise is logged and otherwise ignored.
    """

    def on_batch(self, key: Hashable, pass_: Pass, rows: int, requests: int, compute_seconds: float) -> None:
        """One batch ran: its rows, how many requests they came from, and the seconds it took
        (once per batch taken from a queue; retries after a failure are inside those seconds)."""

    def on_dequeue(self, key: Hashable, pass_: Pass, queue_wait_seconds: float) -> None:
        """A request entered its first batch after waiting ``queue_wait_seconds`` in its queue."""

    def on_queue_depth(self, rows: int) -> None:
        """The total rows waiting in all queues of the worker, after every change."""

    def on_model_queue_depth(self, key: Hashable, pass_: Pass, rows: int) -> None:
        """The rows waiting in the queue of one (key, pass), after every change (optional hook:
        an observer without it is fine). Called with the lock of the worker held: keep it cheap."""
