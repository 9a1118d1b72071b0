"""The device worker: one thread that runs every batch of the models on one device.

Requests arrive from the asyncio event loop through :meth:`DeviceWorker.submit`, which puts a job
at the tail of its (key, pass) queue and awaits an asyncio future. The worker thread (the only
place torch runs) loops:

1. sleep on a condition variable while every queue is empty (no polling);
2. pick the queue whose head job has waited longest (since it arrived, or since it went back to
   the tail after its last chunk); with ``max_wait_ms > 0`` and a batch that is not yet full, wait
   until ``arrival + max_wait_ms`` (or the head's deadline) for more rows;
3. take the queue's jobs in order up to ``max_batch_rows`` rows (continuous batching: whatever
   piled up while the previous batch ran forms the next one). Jobs whose deadline has passed are
   answered :class:`DeadlineExceeded` here and never computed. A *large* job, one with more rows
   left than fit into the time slice (``max_batch_ms`` at the queue's measured
   :class:`~.throughput.BulkRate`), runs one chunk of about a slice in a batch of its own; with the
   slice off, a job too large for the room left is cut to fill it;
4. compute the batch (:func:`compute.compute`: one torch call, failure isolation, OOM halving);
5. scatter each segment's rows back to its job and answer finished jobs with one
   ``loop.call_soon_threadsafe`` per event loop onto their futures. A cut job with rows left goes
   to the tail of its queue (round robin): everything that arrived while its chunk ran goes
   first, and since its wait restarts, other queues' heads go before it too. So a one-row request
   beside a million-row one waits about one slice, not the whole million.

Admission (:meth:`DeviceWorker.submit`, :meth:`DeviceWorker.reserve`) refuses at once, never
computing anything: past the bound in rows over all queues, :class:`QueueFull` with an estimate of
when room will be free; a request whose own rows, at its queue's measured rate, take longer than
its deadline allows, :class:`WontFinish` (waiting would not help); one that would finish in time
only if nothing were queued ahead of it, :class:`QueueFull`. Under round robin the work done
before a job of ``n`` rows finishes is its own ``n`` rows plus at most ``min(r_j, n)`` of every job
``j`` already waiting, bounded per queue by ``min(rows, n * jobs)``. Before a queue's throughput
is measured on a full batch, a request is admitted (its first chunk is then at most
:data:`PROBE_ROWS` rows, which measures it).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Hashable

import numpy as np
import torch

from service.serving.batching.compute import compute, short_message
from service.serving.batching.config import BatchingConfig, BatchObserver, Pass
from service.serving.batching.errors import ComputeError, DeadlineExceeded, QueueFull, WontFinish, WorkerStopped
from service.model.contract import ContractError
from service.serving.batching.jobs import Job, JobQueue, Segment, assemble, check_rows, empty_result
from service.serving.batching.throughput import BULK_ROWS, RETRY_AFTER_BOUNDS, BulkRate, Throughput

if TYPE_CHECKING:
    from service.model.density import DensityModel

__all__ = ["DeviceWorker", "Reservation", "PROBE_ROWS"]

#: full batches a measured rate must rest on before it may stop a job between its chunks
DECIDING_BATCHES = 4

log = logging.getLogger(__name__)

#: With the time slice on, the most rows a large job runs in one chunk before its queue's
#: throughput has been measured (the chunk that measures it).
PROBE_ROWS = 256


class Reservation:
    """Rows admitted against a worker's bound before they exist (from :meth:`DeviceWorker.reserve`).

    ``sample`` reserves its ``n`` rows, then draws the latents, then passes the reservation to
    :meth:`DeviceWorker.submit`, which turns it into queued rows. :meth:`release` gives the rows
    back unused (idempotent; a no-op once submitted); it is also a context manager that releases.
    """

    def __init__(self, worker: "DeviceWorker", key: Hashable, pass_: Pass, rows: int) -> None:
        self.worker, self.key, self.pass_, self.rows = worker, key, pass_, int(rows)
        self.held = True  # guarded by the worker's lock

    def release(self) -> None:
        self.worker._release(self)

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class _Batch:
    key: Hashable
    pass_: Pass
    model: Any
    segments: list[Segment] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)  # queue waits of the jobs that started here
    full: bool = False  # taking stopped at a limit (rows or slice), not because the queue ran out

    @property
    def rows(self) -> int:
        return sum(len(s) for s in self.segments)

    @property
    def jobs(self) -> list[Job]:
        return list(dict.fromkeys(s.job for s in self.segments))


_Answer = tuple[Job, "dict[str, np.ndarray] | BaseException"]


def _settle_all(settled: list[tuple[asyncio.Future, Any]]) -> None:
    """Runs on the jobs' event loop: resolve each future unless it was cancelled meanwhile."""
    for future, answer in settled:
        if future.done():
            continue
        if isinstance(answer, BaseException):
            future.set_exception(answer)
        else:
            future.set_result(answer)


class DeviceWorker:
    """Batches and runs every pass of the models on one device, in one dedicated thread.

    Arguments:
        device: the device whose models this worker runs (models are placed there by the caller;
            the worker moves rows to each model's own ``device``).
        config: batch size, optional wait and queue bound.
        observer: metrics hook, see :class:`BatchObserver`.
    """

    def __init__(
        self,
        device: torch.device | str = "cpu",
        config: BatchingConfig = BatchingConfig(),
        observer: BatchObserver | None = None,
    ) -> None:
        self._device = torch.device(device)
        self._config = config
        self._observer = observer
        self._cond = threading.Condition()
        self._queues: dict[tuple[Hashable, Pass], JobQueue] = {}
        self._queued_rows = 0
        self._reserved_rows = 0  # admitted by reserve(), not yet submitted
        self._accepting = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._throughput = Throughput()
        self._rates: dict[tuple[Hashable, Pass], BulkRate] = {}  # outlives the (deleted when empty) queues
        # seconds of one batch of each (key, pass), any size (EMA), and when the running batch began
        self._batch_seconds: dict[tuple[Hashable, Pass], float] = {}
        self._running: tuple[tuple[Hashable, Pass], float] | None = None

    # -- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread; from now on :meth:`submit` accepts work. Starts once only."""
        with self._cond:
            if self._thread is not None or self._stopping:
                raise RuntimeError("a DeviceWorker can be started once only")
            self._thread = threading.Thread(target=self._run, name=f"flowserve-worker-{self._device}", daemon=True)
            self._accepting = True
        self._thread.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop accepting work at once, then end the thread (blocks until it ends or ``timeout``).

        With ``drain=True`` everything already accepted is computed and answered first. With
        ``drain=False``, or when ``timeout`` runs out while draining, the requests still waiting are
        answered :class:`WorkerStopped`; the batch computing at that moment still finishes and
        answers its requests. From the event loop, call it via ``asyncio.to_thread`` so the loop can
        keep delivering results while it drains.
        """
        with self._cond:
            self._accepting = False
            self._stopping = True
            answers = [] if drain else self._drop_waiting("the worker stopped before this request ran")
            self._cond.notify_all()
        self._deliver(answers)
        thread = self._thread
        if thread is None or thread is threading.current_thread():
            return
        thread.join(timeout)
        if thread.is_alive():
            with self._cond:
                answers = self._drop_waiting("the worker stopped (drain timed out) before this request ran")
                self._cond.notify_all()
            self._deliver(answers)

    @property
    def accepting(self) -> bool:
        """Whether :meth:`submit` accepts new requests (started and not stopping)."""
        return self._accepting

    @property
    def running(self) -> bool:
        """Whether the worker thread is alive."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def config(self) -> BatchingConfig:
        return self._config

    def queued_rows(self) -> int:
        """Rows waiting in all queues (rows in the batch computing now are not counted)."""
        return self._queued_rows

    def reserved_rows(self) -> int:
        """Rows held by reservations not yet submitted (they count against the bound too)."""
        return self._reserved_rows

    def rows_per_second(self, key: Hashable, pass_: Pass) -> float | None:
        """The measured throughput of one (key, pass) on full batches (``None``: not measured yet)."""
        rate = self._rates.get((key, Pass(pass_)))
        return None if rate is None else rate.rows_per_second

    # -- admission (event loop side) -------------------------------------------------------------
    def reserve(self, key: Hashable, pass_: Pass, rows: int, deadline: float | None = None) -> Reservation:
        """Admit ``rows`` rows of one pass before they exist, so that nothing is drawn for a
        request that would be refused. Same checks and errors as :meth:`submit` (``QueueFull``,
        ``WontFinish``, ``DeadlineExceeded``, ``WorkerStopped``), at once; pass the reservation
        to :meth:`submit` with exactly that many rows, or :meth:`Reservation.release` it."""
        pass_ = Pass(pass_)
        n = int(rows)
        if n < 1:
            raise ValueError(f"a reservation needs at least one row, got {n}")
        with self._cond:
            self._admit(key, pass_, n, deadline, time.monotonic())
            self._reserved_rows += n
        return Reservation(self, key, pass_, n)

    def _release(self, reservation: Reservation) -> None:
        with self._cond:
            if reservation.held:
                reservation.held = False
                self._reserved_rows -= reservation.rows

    def wait_estimate(self, rows: int = 1) -> float:
        """Seconds of compute ahead of a new request of ``rows`` rows, under round robin: what is
        left of the batch running now, then for each queue with rows waiting its turn,
        ``max(min(rows waiting, rows * jobs waiting) / measured rate, one batch of that queue)``
        (a queue of small jobs is one batch; rates and batch times not measured yet count 0).
        Unlike ``queued_rows() / rate`` it does not make a one-row request wait for a million-row
        one, which it does not (module docstring)."""
        with self._cond:
            return self._ahead_seconds(max(1, int(rows)))

    def _ahead_seconds(self, n: int) -> float:
        ahead = 0.0
        if self._running is not None:
            which, began = self._running
            ahead += max(0.0, self._batch_seconds.get(which, 0.0) - (time.perf_counter() - began))
        for (k, p), queue in self._queues.items():
            if not queue.rows:
                continue
            rate = self._rates.get((k, p))
            bulk = 0.0 if rate is None else rate.seconds_for(min(queue.rows, n * len(queue.jobs))) or 0.0
            ahead += max(bulk, self._batch_seconds.get((k, p), 0.0))
        return ahead

    def _cannot_finish(self, job: Job, now: float) -> WontFinish | None:
        """For a job cut into chunks, between its chunks: :class:`WontFinish` when even the best
        measured rate cannot start its last rows before the deadline (it was admitted before a rate
        was known, or the machine slowed down), so no more of it is computed in vain; else ``None``.
        A chunk that starts before the deadline is let finish, hence the one slice of slack. The
        rate must rest on :data:`DECIDING_BATCHES` full batches: the first chunks of a job on a
        fresh model are small (256 rows) and several times slower per row than the time slices
        that follow (moons: 32k against 125k rows/s), and would stop jobs that finish in time."""
        if job.deadline is None:
            return None
        rate = self._rates.get((job.key, job.pass_))
        if rate is None or rate.measurements < DECIDING_BATCHES:
            return None
        left = job.n - job.done_rows
        seconds = None if rate is None else rate.seconds_for(left)
        budget = job.deadline - now
        if seconds is None or seconds <= budget + self._config.max_batch_ms / 1000.0:
            return None
        return WontFinish(left, seconds, rate.rows_per_second, budget)  # type: ignore[union-attr, arg-type]

    def _admit(self, key: Hashable, pass_: Pass, n: int, deadline: float | None, now: float) -> None:
        """Refuse ``n`` new rows of (key, pass) at once, or return (lock held; module docstring)."""
        if not self._accepting:
            raise WorkerStopped("the worker is not accepting requests")
        if deadline is not None and deadline <= now:
            raise DeadlineExceeded("the deadline had passed when the request was submitted")
        rate = self._rates.get((key, pass_))
        if rate is not None and rate.measurements < DECIDING_BATCHES:
            rate = None  # too few full batches to refuse on (see _cannot_finish): admit
        own = None if (deadline is None or rate is None) else rate.seconds_for(n)
        budget = 0.0 if deadline is None else deadline - now
        if own is not None and own > budget:
            raise WontFinish(n, own, rate.rows_per_second, budget)  # type: ignore[union-attr, arg-type]
        waiting = self._queued_rows + self._reserved_rows
        if waiting + n > self._config.max_queue_rows:
            raise QueueFull(self._throughput.seconds_for(waiting + n - self._config.max_queue_rows))
        if own is None:
            return
        ahead = self._ahead_seconds(n)
        if own + ahead > budget:
            low, high = RETRY_AFTER_BOUNDS
            raise QueueFull(
                min(high, max(low, own + ahead - budget)),
                f"the work queued ahead (about {ahead:.1f} s) leaves these {n} rows (about {own:.1f} s) "
                f"no time to finish in the {budget:.1f} s before their deadline",
            )

    # -- submitting (event loop side) ------------------------------------------------------------
    async def submit(
        self,
        key: Hashable,
        model: DensityModel,
        pass_: Pass,
        rows: np.ndarray,
        context: np.ndarray | None = None,
        deadline: float | None = None,
        reservation: Reservation | None = None,
    ) -> dict[str, np.ndarray]:
        """Queue ``rows`` for one pass of ``model`` and await their results.

        Arguments:
            key: names the model's queue (e.g. ``(name, version)``); jobs of one key and pass share
                batches, so one key must always mean the same model.
            model: a :class:`~service.model.density.DensityModel` already on this worker's device.
            pass_: :class:`Pass` ``ENCODE`` or ``DECODE``.
            rows: ``(n, D)`` real numbers on the CPU (read until the request completes: do not
                modify them meanwhile); cast to the model's dtype.
            context: ``(n, C)`` context rows for a conditional model, else ``None``.
            deadline: ``time.monotonic()`` seconds after which the rows must not start computing.
            reservation: from :meth:`reserve` for these rows (same key, pass and row count): they
                were admitted then and are not checked again (except for a passed deadline and a
                worker that stopped meanwhile); the reservation is used up either way.

        Returns:
            CPU arrays in the model's dtype, row ``i`` of each from row ``i`` of ``rows``:
            ``ENCODE`` → ``z, log_det, base_log_prob, log_prob``; ``DECODE`` → ``x, log_prob``.

        Raises:
            ContractError: at once, if ``rows``/``context`` do not have the shapes the model needs (a bug
                of the caller: the edge validates input).
            WorkerStopped: at once, when the worker is not accepting; later, if it stops without
                draining before the request ran.
            QueueFull: at once, if the queue bound in rows would be exceeded, or the rows queued
                ahead would not leave the request time to finish before its deadline.
            WontFinish: at once, if the request's own rows take longer than its deadline allows
                at the measured throughput of its (key, pass).
            DeadlineExceeded: at the deadline if the request has not started (it is then dropped,
                never computed), or at once if the deadline has already passed. A request whose
                rows are computing at the deadline gets its result; one split into chunks whose
                deadline passes between chunks is answered this, its remaining rows never computed.
            ComputeError: the request's own rows failed to compute.
        """
        pass_ = Pass(pass_)
        if reservation is not None and (reservation.key != key or reservation.pass_ is not pass_
                                        or reservation.rows != np.shape(rows)[0]):
            reservation.release()
            raise ValueError(f"the reservation is for {reservation.rows} rows of {reservation.pass_.value} "
                             f"on {reservation.key!r}, not for these rows")
        try:
            rows, context = check_rows(model, rows, context)
        except ContractError:
            if reservation is not None:
                reservation.release()
            raise
        if rows.shape[0] == 0:
            if not self._accepting:
                raise WorkerStopped("the worker is not accepting requests")
            return empty_result(model, pass_)
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        job = self._enqueue(key, model, pass_, rows, context, deadline, loop, future, reservation)
        # one timer per request (no wait_for/shield: they add two futures, a task step and callbacks)
        timer = None if deadline is None else loop.call_later(max(0.0, deadline - time.monotonic()), self._expire, job)
        try:
            return await future
        except asyncio.CancelledError:
            with self._cond:
                self._withdraw(job, WorkerStopped("the request was cancelled"))
            if future.done() and not future.cancelled():
                future.exception()  # answered just as it was cancelled: nobody will read it
            future.cancel()
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _expire(self, job: Job) -> None:
        """The deadline timer of ``job`` (on its event loop): answer 504 unless its rows started.

        A job whose rows are computing gets its result (they started in time); a job cut into
        chunks is answered by the worker between chunks (:meth:`_execute`).
        """
        with self._cond:
            dropped = self._withdraw(job, None)
        if dropped and not job.future.done():
            job.future.set_exception(DeadlineExceeded("the deadline passed while the request was queued"))

    def _enqueue(
        self,
        key: Hashable,
        model: Any,
        pass_: Pass,
        rows: np.ndarray,
        context: np.ndarray | None,
        deadline: float | None,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future,
        reservation: Reservation | None = None,
    ) -> Job:
        n = int(rows.shape[0])
        with self._cond:
            now = time.monotonic()
            if reservation is not None and reservation.held:
                reservation.held = False  # its rows become queued rows below, or are given back
                self._reserved_rows -= n
                if not self._accepting:
                    raise WorkerStopped("the worker is not accepting requests")
                if deadline is not None and deadline <= now:
                    raise DeadlineExceeded("the deadline passed before the request could be queued")
            else:
                self._admit(key, pass_, n, deadline, now)
            queue = self._queues.get((key, pass_))
            if queue is None:
                queue = self._queues[(key, pass_)] = JobQueue(key, pass_)
            job = Job(
                key=key, pass_=pass_, model=model, rows=rows, context=context, n=n, deadline=deadline,
                loop=loop, future=future, enqueued_at=now, queue=queue, queued=n, ready_at=now,
            )
            queue.jobs.append(job)
            queue.rows += n
            self._queued_rows += n
            self._report_depth(queue)
            self._cond.notify()
        return job

    # -- bookkeeping (lock held) -----------------------------------------------------------------
    def _close(self, job: Job) -> bool:
        """Mark ``job`` answered: take its waiting rows off the queue. False if it already was."""
        if job.closed:
            return False
        job.closed = True
        if job.queued:
            job.queue.rows -= job.queued
            self._queued_rows -= job.queued
            job.queued = 0
            self._report_depth(job.queue)
        return True

    def _withdraw(self, job: Job, reason: BaseException | None) -> bool:
        """Drop ``job`` if none of its rows is computing now; else have the rest dropped after."""
        if job.closed:
            return False
        if job.in_flight:
            if reason is not None:
                job.drop_reason = reason
            return False
        self._close(job)
        return True

    def _drop_waiting(self, message: str) -> list[_Answer]:
        """Answer every job that is waiting with :class:`WorkerStopped`."""
        answers: list[_Answer] = []
        for queue in self._queues.values():
            for job in queue.jobs:
                if job.in_flight and not job.closed:
                    job.drop_reason = WorkerStopped(message)
                elif self._close(job):
                    answers.append((job, WorkerStopped(message)))
        return answers

    def _report_depth(self, queue: JobQueue | None = None) -> None:
        self._notify("on_queue_depth", self._queued_rows)
        if queue is not None:
            self._notify("on_model_queue_depth", queue.key, queue.pass_, queue.rows)

    def _notify(self, hook: str, *args: Any) -> None:
        if self._observer is None:
            return
        try:
            method = getattr(self._observer, hook, None)
            if method is not None:
                method(*args)
        except Exception:  # noqa: BLE001 - metrics must never break serving
            log.exception("batch observer %s raised", hook)

    # -- the worker thread -----------------------------------------------------------------------
    def _run(self) -> None:
        batch: _Batch | None = None
        try:
            if self._device.type == "cuda" and self._device.index is not None:
                torch.cuda.set_device(self._device)  # allocations of this thread default to its device
            while True:
                answers: list[_Answer] = []
                with self._cond:
                    batch = self._next_batch(answers)
                self._deliver(answers)
                if batch is None:
                    return
                if batch.segments:  # empty when it only answered expired jobs
                    self._execute(batch)
                batch = None
        except BaseException:
            log.exception("device worker %s crashed", self._device)
            with self._cond:
                self._accepting = False
                self._stopping = True
                answers = self._drop_waiting("the device worker crashed")
                for job in batch.jobs if batch is not None else []:
                    if self._close(job):
                        answers.append((job, WorkerStopped("the device worker crashed")))
            self._deliver(answers)
            raise

    def _oldest_queue(self) -> JobQueue | None:
        """The queue whose head has waited longest since it joined the tail (empty queues go)."""
        oldest: JobQueue | None = None
        for name, queue in list(self._queues.items()):
            head = queue.head()
            if head is None:
                del self._queues[name]
            elif oldest is None or head.ready_at < oldest.jobs[0].ready_at:
                oldest = queue
        return oldest

    def _wait_left(self, queue: JobQueue, now: float) -> float:
        """Seconds to wait for more rows before running ``queue``'s batch (0: run it now)."""
        if self._config.max_wait_ms <= 0 or self._stopping or queue.rows >= self._config.max_batch_rows:
            return 0.0
        head = queue.jobs[0]
        if head.started:  # the rest of a job cut into chunks: it has waited its turn already
            return 0.0
        until = head.enqueued_at + self._config.max_wait_ms / 1000.0
        if head.deadline is not None:
            until = min(until, head.deadline)
        return until - now

    def _next_batch(self, answers: list[_Answer]) -> _Batch | None:
        """Block until a batch can run and take it (None: stopping and nothing left)."""
        while True:
            queue = self._oldest_queue()
            if queue is None:
                if self._stopping:
                    return None
                self._cond.wait()
                continue
            now = time.monotonic()
            wait = self._wait_left(queue, now)
            if wait > 0:
                self._cond.wait(wait)
                continue
            batch = self._take(queue, now, answers)
            if batch.segments or answers:  # deliver expired jobs' answers now, not with the next batch
                return batch

    def _slice_rows(self, queue: JobQueue) -> int | None:
        """Rows of one chunk of a large job of ``queue``: ``max_batch_ms`` at its measured rate
        (:data:`PROBE_ROWS` before it is measured), at most ``max_batch_rows``; ``None``: slice off."""
        if self._config.max_batch_ms <= 0:
            return None
        rate = self._rates.get((queue.key, queue.pass_))
        rows = None if rate is None else rate.rows_in(self._config.max_batch_ms / 1000.0)
        return min(self._config.max_batch_rows, PROBE_ROWS if rows is None else rows)

    def _take(self, queue: JobQueue, now: float, answers: list[_Answer]) -> _Batch:
        """Take up to ``max_batch_rows`` rows from the head of ``queue`` (expired jobs are answered).

        A large job (more rows left than one slice) runs one slice of its rows in a batch of its
        own: taking stops before it when the batch already holds rows. Without a slice it is cut
        to fill the room left, as any job too large for it.
        """
        limit = self._config.max_batch_rows
        slice_rows = self._slice_rows(queue)
        batch = _Batch(queue.key, queue.pass_, None)
        rows = 0
        while True:
            if rows >= limit:
                batch.full = True
                break
            job = queue.head()
            if job is None:
                break
            if batch.model is None:
                batch.model = job.model
            elif job.model is not batch.model:
                break  # one torch call runs one model
            if job.expired(now):
                self._close(job)
                answers.append((job, DeadlineExceeded("the deadline passed before the request's rows ran")))
                continue
            left = job.n - job.taken
            if slice_rows is not None and left > slice_rows:
                if rows:
                    batch.full = True
                    break  # the rows taken so far do not wait for a slice of it
                k = slice_rows
                batch.full = True
            else:
                k = min(left, limit - rows)
            batch.segments.append(Segment.of(job, job.taken, job.taken + k))
            if not job.started:
                job.started = True
                batch.waits.append(now - job.enqueued_at)
            job.taken += k
            job.queued -= k
            job.in_flight = True
            queue.rows -= k
            self._queued_rows -= k
            rows += k
            if job.taken == job.n:
                queue.jobs.popleft()
            else:
                batch.full = True
                break  # cut: the batch is full (by rows or slice); the rest goes to the tail after it
        if batch.segments:
            self._report_depth(queue)
        return batch

    def _execute(self, batch: _Batch) -> None:
        """Compute one batch outside the lock, then scatter its rows and answer finished jobs."""
        for wait in batch.waits:
            self._notify("on_dequeue", batch.key, batch.pass_, wait)
        rows, jobs = batch.rows, batch.jobs
        started = time.perf_counter()
        which = (batch.key, batch.pass_)
        self._running = (which, started)
        try:
            outcomes = compute(batch.model, batch.pass_, batch.segments)
        except Exception as exc:  # noqa: BLE001 - a bug here must not kill the thread
            log.exception("batch of %d rows failed outside the model", rows)
            outcomes = [(segment, exc) for segment in batch.segments]
        seconds = time.perf_counter() - started
        self._running = None
        old = self._batch_seconds.get(which)
        self._batch_seconds[which] = seconds if old is None else 0.8 * old + 0.2 * seconds
        self._throughput.update(rows, seconds)
        if (batch.full or rows >= BULK_ROWS) and not any(isinstance(o, BaseException) for _, o in outcomes):
            self._rates.setdefault((batch.key, batch.pass_), BulkRate()).update(rows, seconds)
        self._notify("on_batch", batch.key, batch.pass_, rows, len(jobs), seconds)

        answers: list[_Answer] = []
        finished: list[Job] = []
        with self._cond:
            for segment, outcome in outcomes:
                job = segment.job
                if job.closed:
                    continue
                if isinstance(outcome, BaseException):
                    self._close(job)
                    error = ComputeError(short_message(outcome))
                    error.__cause__ = outcome
                    answers.append((job, error))
                else:
                    job.parts.append((segment.start, outcome))
                    job.done_rows += len(segment)
            now = time.monotonic()
            for job in jobs:
                job.in_flight = False
                if job.closed:
                    continue
                if job.done_rows == job.n:
                    self._close(job)
                    finished.append(job)
                elif job.drop_reason is not None:
                    self._close(job)
                    answers.append((job, job.drop_reason))
                elif job.expired(now):
                    self._close(job)
                    answers.append((job, DeadlineExceeded("the deadline passed before the rest of its rows ran")))
                elif (late := self._cannot_finish(job, now)) is not None:
                    self._close(job)  # stop now rather than compute until the deadline and drop it all
                    answers.append((job, late))
                elif job.taken < job.n:
                    self._to_tail(job, now)
        for job in finished:
            try:
                answers.append((job, assemble(job)))
            except Exception as exc:  # noqa: BLE001
                answers.append((job, ComputeError(short_message(exc))))
        self._deliver(answers)

    @staticmethod
    def _to_tail(job: Job, now: float) -> None:
        """Round robin (lock held): a job with rows left after its chunk goes behind every job
        that arrived meanwhile, and its wait restarts, so other queues' heads go before it too."""
        jobs = job.queue.jobs
        if jobs and jobs[0] is job:
            jobs.popleft()
        else:
            jobs.remove(job)
        jobs.append(job)
        job.ready_at = now

    @staticmethod
    def _deliver(answers: list[_Answer]) -> None:
        """Resolve the answered jobs' futures: one wake-up of each event loop, not one per job."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, Any]]] = {}
        for job, answer in answers:
            job.rows = job.context = None  # type: ignore[assignment]  # free the request's rows
            by_loop.setdefault(job.loop, []).append((job.future, answer))
        for loop, settled in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle_all, settled)
            except RuntimeError:  # the event loop is closed: nobody is waiting any more
                pass

