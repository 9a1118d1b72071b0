"""Continuous batching of flow passes on one device (Triton's dynamic batcher, sized in rows).

``DeviceWorker`` owns one thread that runs every torch call for the models on its device.
Requests (``submit``, awaited from asyncio) wait in one FIFO queue per (model key, :class:`Pass`);
whenever the thread is free it takes everything waiting in the queue whose head is oldest, up to
``max_batch_rows`` rows, runs it as one batch and scatters the rows back to each request. The
queue is bounded in rows (:class:`QueueFull`), every request may carry a deadline
(:class:`DeadlineExceeded`, never computed), and a failing batch is retried request by request so
only the requests whose own rows fail get :class:`ComputeError`. Batching knows nothing of HTTP.

Modules: :mod:`.config` (``Pass``, ``BatchingConfig``, ``BatchObserver``), :mod:`.errors`,
:mod:`.jobs` (requests, segments, queues), :mod:`.compute` (one batch on the device, failure
isolation), :mod:`.worker` (the thread and its scheduling).
"""

from service.serving.batching.config import BatchingConfig, BatchObserver, Pass
from service.serving.batching.errors import BatchingError, ComputeError, DeadlineExceeded, QueueFull, WontFinish, WorkerStopped
from service.serving.batching.worker import DeviceWorker, Reservation

__all__ = [
    "BatchObserver",
    "BatchingConfig",
    "BatchingError",
    "ComputeError",
    "DeadlineExceeded",
    "DeviceWorker",
    "Pass",
    "QueueFull",
    "Reservation",
    "WontFinish",
    "WorkerStopped",
]
