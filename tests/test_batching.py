"""The device worker with real flows: batching, splitting, bounds, deadlines, isolation, shutdown.

Every test drives a real :class:`DeviceWorker` thread from asyncio with real (randomly initialised)
zuko flows. To make "the worker is busy" deterministic, :class:`Instrumented` is the same flow with
a gate: its first batch waits inside the model until the test opens the gate, so everything
submitted meanwhile piles up in the queue exactly as under load. The same wrapper can poison rows
(the flow raises on them) or simulate a CUDA out-of-memory error above a batch size.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch

from service.model.contract import ContractError
from service.serving.batching import (
    BatchingConfig,
    BatchingError,
    ComputeError,
    DeadlineExceeded,
    DeviceWorker,
    Pass,
    QueueFull,
    WorkerStopped,
)
from service.model.density import DensityModel
from service.model.flows import flow_spec
from tests.tolerance import assert_batch_invariant

POISON = 1234.5  # a first coordinate that makes Instrumented raise
FEATURES, CONTEXT = 3, 2


def make_model(name: str = "nsf", context: int = 0, dtype: torch.dtype = torch.float32, seed: int = 0) -> DensityModel:
    torch.manual_seed(seed)
    spec = flow_spec(name, FEATURES, context, transforms=2, hidden_features=[16, 16])
    shift, scale = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.5, 0.5, 2.0])
    return DensityModel(spec, shift, scale).to(dtype).eval().requires_grad_(False)


class Instrumented(DensityModel):
    """The real flow with test controls: a gate that holds the worker inside a batch, poison rows
    that make the flow raise, and a simulated CUDA out-of-memory error above ``oom_above`` rows.
    Records the rows of every call, so a test can prove rows were never computed."""

    def __init__(self, base: DensityModel) -> None:
        super().__init__(base.flow_spec, base.shift, base.scale)
        self.load_state_dict(base.state_dict())
        self.to(base.dtype).eval().requires_grad_(False)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.oom_above: int | None = None
        self.calls: list[np.ndarray] = []
        self._changed = threading.Condition()

    def hold_next_batch(self) -> None:
        self.gate.clear()
        self.entered.clear()

    def _enter(self, x: torch.Tensor) -> None:
        with self._changed:
            self.calls.append(x.cpu().numpy().copy())
            self._changed.notify_all()
        self.entered.set()
        if not self.gate.wait(30):
            raise RuntimeError("test gate never opened")
        if self.oom_above is not None and x.shape[0] > self.oom_above:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (simulated for {x.shape[0]} rows)")
        if bool((x[:, 0] == POISON).any()):
            raise ValueError("poisoned row in the batch\nsecond line of the message")

    def wait_calls(self, count: int) -> None:
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.calls) >= count, timeout=30)

    def computed(self, rows: np.ndarray) -> bool:
        """Whether any call saw any of ``rows`` (as the model's dtype)."""
        wanted = {tuple(r) for r in np.asarray(rows, dtype=np.float32 if self.dtype == torch.float32 else np.float64)}
        return any(tuple(r) in wanted for call in self.calls for r in call)

    def encode(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Any:
        self._enter(x)
        return super().encode(x, context)

    def decode(self, z: torch.Tensor, context: torch.Tensor | None = None) -> Any:
        self._enter(z)
        return super().decode(z, context)


class Recorder:
    """A BatchObserver that keeps everything it is told."""

    def __init__(self) -> None:
        self.batches: list[tuple[Any, Pass, int, int]] = []
        self.waits: list[float] = []
        self.depths: list[int] = []

    def on_batch(self, key: Any, pass_: Pass, rows: int, requests: int, compute_seconds: float) -> None:
        assert compute_seconds >= 0
        self.batches.append((key, pass_, rows, requests))

    def on_dequeue(self, key: Any, pass_: Pass, queue_wait_seconds: float) -> None:
        self.waits.append(queue_wait_seconds)

    def on_queue_depth(self, rows: int) -> None:
        self.depths.append(rows)


@contextmanager
def running(worker: DeviceWorker, held: Instrumented | None = None) -> Iterator[DeviceWorker]:
    """``worker`` started, and always stopped on the way out (without draining: what still waits is
    answered :class:`WorkerStopped`). ``held``'s gate is opened first, so a test that fails while
    the worker is held inside a batch still ends at once instead of waiting out the gate."""
    worker.start()
    try:
        yield worker
    finally:
        if held is not None:
            held.gate.set()
        worker.stop(drain=False, timeout=10)


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))


async def spin() -> None:
    """Let every ready task run up to its first real wait (submit enqueues before it waits)."""
    for _ in range(5):
        await asyncio.sleep(0)


def direct(model: DensityModel, pass_: Pass, rows: np.ndarray, context: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The model's own answer for one request computed alone."""
    x = torch.as_tensor(rows, dtype=model.dtype)
    c = None if context is None else torch.as_tensor(context, dtype=model.dtype)
    with torch.inference_mode():
        if pass_ is Pass.ENCODE:
            out = model.encode(x, c)
            return {k: getattr(out, k).numpy() for k in ("z", "log_det", "base_log_prob", "log_prob")}
        out = model.decode(x, c)
        return {k: getattr(out, k).numpy() for k in ("x", "log_prob")}


def assert_same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert got[name].dtype == want[name].dtype, name
        assert_batch_invariant(got[name], want[name], err_msg=name)


async def start_held(worker: DeviceWorker, model: Instrumented, key: Any = "m") -> asyncio.Task:
    """Start a one-row request whose batch holds the worker inside the model until the gate opens."""
    model.hold_next_batch()
    blocker = asyncio.create_task(worker.submit(key, model, Pass.ENCODE, np.full((1, FEATURES), -0.5)))
    assert await asyncio.to_thread(model.entered.wait, 30)
    return blocker


def test_concurrent_single_rows_share_one_batch() -> None:
    async def main() -> None:
        model, rec = Instrumented(make_model()), Recorder()
        with running(DeviceWorker("cpu", BatchingConfig(), rec), held=model) as worker:
            blocker = await start_held(worker, model)
            rows = np.random.default_rng(0).normal(size=(200, FEATURES))
            tasks = [asyncio.create_task(worker.submit("m", model, Pass.ENCODE, rows[i : i + 1])) for i in range(200)]
            await spin()
            assert worker.queued_rows() == 200 and rec.depths[-1] == 200
            model.gate.set()
            results = await asyncio.gather(*tasks)
            await blocker
        # the held batch, then every request that piled up meanwhile in a single batch
        assert [b[2:] for b in rec.batches] == [(1, 1), (200, 200)]
        assert len(rec.waits) == 201 and all(w >= 0 for w in rec.waits)
        assert rec.depths[-1] == 0 and worker.queued_rows() == 0
        for i, result in enumerate(results):
            assert_same(result, direct(model, Pass.ENCODE, rows[i : i + 1]))

    run(main())


@pytest.mark.parametrize("name", ["nsf", "maf"])
def test_results_do_not_depend_on_batching_both_passes_with_context(name: str) -> None:
    async def main() -> None:
        base = make_model(name, context=CONTEXT, seed=1)
        model, rec = Instrumented(base), Recorder()
        rng = np.random.default_rng(1)
        sizes = [1, 7, 40, 3, 1, 25, 2]
        requests = [
            (pass_, rng.normal(size=(n, FEATURES)).astype(dtype), rng.normal(size=(n, CONTEXT)))
            for n in sizes
            for pass_, dtype in ((Pass.ENCODE, np.float64), (Pass.DECODE, np.float32))
        ]
        with running(DeviceWorker("cpu", BatchingConfig(max_batch_rows=32), rec), held=model) as worker:
            model.hold_next_batch()
            blocker = asyncio.create_task(
                worker.submit("c", model, Pass.ENCODE, np.zeros((1, FEATURES)), np.zeros((1, CONTEXT)))
            )
            assert await asyncio.to_thread(model.entered.wait, 30)
            tasks = [asyncio.create_task(worker.submit("c", model, p, x, c)) for p, x, c in requests]
            await spin()
            model.gate.set()
            results = await asyncio.gather(*tasks)
            await blocker
        for (pass_, x, c), result in zip(requests, results):
            assert_same(result, direct(base, pass_, x, c))
        # rows of many requests shared batches, never more than max_batch_rows, never mixing passes
        assert all(rows <= 32 for _, _, rows, _ in rec.batches)
        assert len(rec.batches) < len(requests)
        assert sum(rows for _, _, rows, _ in rec.batches) == 1 + 2 * sum(sizes)

    run(main())


def test_large_request_is_split_and_reassembled_in_order() -> None:
    async def main() -> None:
        model, rec = Instrumented(make_model()), Recorder()
        # the time slice off (chunks of max_batch_rows, whatever the measured rate): tests/test_fairness.py has it on
        rng = np.random.default_rng(2)
        big, small = rng.normal(size=(100, FEATURES)), rng.normal(size=(5, FEATURES))
        with running(DeviceWorker("cpu", BatchingConfig(max_batch_rows=16, max_batch_ms=0), rec), held=model) as worker:
            blocker = await start_held(worker, model)
            big_task = asyncio.create_task(worker.submit("m", model, Pass.DECODE, big))
            small_task = asyncio.create_task(worker.submit("m", model, Pass.DECODE, small))
            await spin()
            model.gate.set()
            got_big, got_small = await asyncio.gather(big_task, small_task)
            await blocker
        # round robin: one chunk of the big request, then it goes behind the small one, whose 5 rows
        # lead the next batch (the big one fills the room left); then the big request's last 73 rows
        assert [b[2:] for b in rec.batches[1:]] == [(16, 1), (16, 2)] + [(16, 1)] * 4 + [(9, 1)]
        assert_same(got_big, direct(model, Pass.DECODE, big))
        assert_same(got_small, direct(model, Pass.DECODE, small))

    run(main())


def test_queue_bound_refuses_at_once_with_retry_after() -> None:
    async def main() -> None:
        model = Instrumented(make_model())
        with running(DeviceWorker("cpu", BatchingConfig(max_queue_rows=10)), held=model) as worker:
            blocker = await start_held(worker, model)
            assert worker.queued_rows() == 0  # the held batch's row is no longer waiting
            waiting = asyncio.create_task(worker.submit("m", model, Pass.ENCODE, np.ones((10, FEATURES))))
            await spin()
            assert worker.queued_rows() == 10
            with pytest.raises(QueueFull) as refused:
                await worker.submit("other", model, Pass.DECODE, np.ones((1, FEATURES)))
            assert refused.value.retry_after > 0
            assert isinstance(refused.value, BatchingError)
            assert worker.queued_rows() == 10
            model.gate.set()
            assert (await waiting)["log_prob"].shape == (10,)
            await blocker
            # room again once the queue drained
            assert (await worker.submit("other", model, Pass.DECODE, np.ones((1, FEATURES))))["x"].shape == (1, FEATURES)

    run(main())


def test_deadline_while_queued_is_answered_and_never_computed() -> None:
    async def main() -> None:
        model = Instrumented(make_model())
        late = np.full((3, FEATURES), 7.25)
        with running(DeviceWorker("cpu"), held=model) as worker:
            with pytest.raises(DeadlineExceeded):  # already past: refused at once
                await worker.submit("m", model, Pass.ENCODE, late, deadline=time.monotonic() - 1)
            blocker = await start_held(worker, model)
            with pytest.raises(DeadlineExceeded):
                await worker.submit("m", model, Pass.ENCODE, late, deadline=time.monotonic() + 0.05)
            # answered while the worker was still held in the earlier batch, and dropped from the queue
            assert not model.gate.is_set() and worker.queued_rows() == 0
            model.gate.set()
            await blocker
            after = await worker.submit("m", model, Pass.ENCODE, np.zeros((2, FEATURES)))
            assert after["z"].shape == (2, FEATURES)
        assert not model.computed(late)
        assert len(model.calls) == 2

    run(main())


def test_deadline_found_passed_by_the_worker_skips_the_job() -> None:
    async def main() -> None:
        model, rec = Instrumented(make_model()), Recorder()
        late, fine = np.full((2, FEATURES), 7.25), np.full((1, FEATURES), 0.25)
        with running(DeviceWorker("cpu", BatchingConfig(), rec), held=model) as worker:
            blocker = await start_held(worker, model)
            late_task = asyncio.create_task(worker.submit("m", model, Pass.ENCODE, late, deadline=time.monotonic() + 0.02))
            fine_task = asyncio.create_task(worker.submit("m", model, Pass.ENCODE, fine))
            await spin()
            # Block the event loop so that only the worker can notice the deadline: let it pass,
            # open the gate, and wait until the worker has taken the next batch.
            time.sleep(0.05)
            model.gate.set()
            model.wait_calls(2)
            assert worker.queued_rows() == 0  # the late job left the queue through the worker
            with pytest.raises(DeadlineExceeded):
                await late_task
            assert_same(await fine_task, direct(model, Pass.ENCODE, fine))
            await blocker
        assert not model.computed(late)
        assert [b[2:] for b in rec.batches] == [(1, 1), (1, 1)]

    run(main())


def test_cancelled_request_is_dropped_before_it_runs() -> None:
    async def main() -> None:
        model = Instrumented(make_model())
        gone = np.full((4, FEATURES), 3.125)
        with running(DeviceWorker("cpu"), held=model) as worker:
            blocker = await start_held(worker, model)
            task = asyncio.create_task(worker.submit("m", model, Pass.DECODE, gone))
            await spin()
            assert worker.queued_rows() == 4
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert worker.queued_rows() == 0
            model.gate.set()
            await blocker
            await worker.submit("m", model, Pass.DECODE, np.zeros((1, FEATURES)))
        assert not model.computed(gone)

    run(main())


def test_failing_rows_fail_alone_and_neighbours_succeed() -> None:
    async def main() -> None:
        model, rec = Instrumented(make_model()), Recorder()
        rng = np.random.default_rng(3)
        good_a, good_b = rng.normal(size=(4, FEATURES)), rng.normal(size=(2, FEATURES))
        bad = rng.normal(size=(3, FEATURES))
        bad[1, 0] = POISON
        with running(DeviceWorker("cpu", BatchingConfig(), rec), held=model) as worker:
            blocker = await start_held(worker, model)
            tasks = [asyncio.create_task(worker.submit("m", model, Pass.ENCODE, x)) for x in (good_a, bad, good_b)]
            await spin()
            model.gate.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            await blocker
            # the worker carries on after a failure
            assert_same(await worker.submit("m", model, Pass.ENCODE, good_b), direct(model, Pass.ENCODE, good_b))
        assert_same(results[0], direct(model, Pass.ENCODE, good_a))
        assert_same(results[2], direct(model, Pass.ENCODE, good_b))
        assert isinstance(results[1], ComputeError)
        assert str(results[1]) == "poisoned row in the batch"  # the model's message, first line only
        assert rec.batches[1][2:] == (9, 3)  # one batch, retried request by request inside it

    run(main())


def test_out_of_memory_halves_the_batch() -> None:
    async def main() -> None:
        model = Instrumented(make_model())
        rng = np.random.default_rng(4)
        requests = [rng.normal(size=(3, FEATURES)) for _ in range(10)]
        with running(DeviceWorker("cpu"), held=model) as worker:
            blocker = await start_held(worker, model)
            model.oom_above = 8
            tasks = [asyncio.create_task(worker.submit("m", model, Pass.ENCODE, x)) for x in requests]
            await spin()
            model.gate.set()
            results = await asyncio.gather(*tasks)
            await blocker
            model.oom_above = 0  # not even one row fits: then the request fails, alone
            with pytest.raises(ComputeError, match="out of memory"):
                await worker.submit("m", model, Pass.ENCODE, requests[0])
            model.oom_above = None
        for x, result in zip(requests, results):
            assert_same(result, direct(model, Pass.ENCODE, x))
        sizes = [len(call) for call in model.calls[1:]]
        assert sizes[:3] == [30, 15, 7]  # halved until it fit, requests cut where needed
        assert sum(s for s in sizes if s <= 8) >= 30

    run(main())


def test_stop_with_drain_finishes_accepted_work_and_refuses_new() -> None:
    async def main() -> None:
        model = Instrumented(make_model())
        rng = np.random.default_rng(5)
        accepted = [rng.normal(size=(n, FEATURES)) for n in (1, 6, 2)]
        with running(DeviceWorker("cpu", BatchingConfig(max_batch_rows=4)), held=model) as worker:
            blocker = await start_held(worker, model)
            tasks = [asyncio.create_task(worker.submit("m", model, Pass.DECODE, x)) for x in accepted]
            await spin()
            stopping = asyncio.create_task(asyncio.to_thread(worker.stop, True, 30))
            while worker.accepting:  # stop() flips this at once, before it waits for the drain
                await asyncio.sleep(0.001)
            with pytest.raises(WorkerStopped):
                await worker.submit("m", model, Pass.DECODE, np.zeros((1, FEATURES)))
            model.gate.set()
            results = await asyncio.gather(*tasks)
            await stopping
            await blocker
            assert not worker.running and not worker.accepting
            for x, result in zip(accepted, results):
                assert_same(result, direct(model, Pass.DECODE, x))
            with pytest.raises(WorkerStopped):
                await worker.submit("m", model, Pass.ENCODE, np.zeros((1, FEATURES)))

    run(main())


def test_stop_without_drain_answers_waiting_requests_worker_stopped() -> None:
    async def main() -> None:
        model = Instrumented(make_model())
        waiting_rows = np.full((2, FEATURES), 5.5)
        with running(DeviceWorker("cpu"), held=model) as worker:
            blocker = await start_held(worker, model)
            waiting = asyncio.create_task(worker.submit("m", model, Pass.ENCODE, waiting_rows))
            await spin()
            stopping = asyncio.create_task(asyncio.to_thread(worker.stop, False, 30))
            with pytest.raises(WorkerStopped):
                await waiting
            assert not model.gate.is_set()  # answered while the worker was still busy
            model.gate.set()
            assert (await blocker)["log_prob"].shape == (1,)  # the batch already running still finishes
            await stopping
            assert not worker.running and worker.queued_rows() == 0
            assert not model.computed(waiting_rows)

    run(main())


def test_max_wait_grows_a_batch_until_full_and_stop_flushes_it() -> None:
    async def main() -> None:
        model, rec = make_model(), Recorder()
        rows = np.random.default_rng(6).normal(size=(8, FEATURES))
        with running(DeviceWorker("cpu", BatchingConfig(max_batch_rows=8, max_wait_ms=60_000), rec)) as worker:
            # a full batch runs without waiting out max_wait_ms
            results = await asyncio.gather(*(worker.submit("m", model, Pass.ENCODE, rows[i : i + 1]) for i in range(8)))
            assert [b[2:] for b in rec.batches] == [(8, 8)]
            for i, result in enumerate(results):
                assert_same(result, direct(model, Pass.ENCODE, rows[i : i + 1]))
            # a partial batch waits, until stop(drain=True) flushes it
            partial = asyncio.create_task(worker.submit("m", model, Pass.ENCODE, rows[:3]))
            await spin()
            assert worker.queued_rows() == 3
            await asyncio.to_thread(worker.stop, True, 30)
            assert_same(await partial, direct(model, Pass.ENCODE, rows[:3]))
            assert [b[2:] for b in rec.batches] == [(8, 8), (3, 1)]

    run(main())


def test_float64_model_keys_and_passes_use_separate_queues() -> None:
    async def main() -> None:
        m32, m64, rec = make_model(seed=7), make_model("realnvp", dtype=torch.float64, seed=8), Recorder()
        held = Instrumented(m32)
        x = np.random.default_rng(7).normal(size=(5, FEATURES))
        with running(DeviceWorker(torch.device("cpu"), BatchingConfig(), rec), held=held) as worker:
            blocker = await start_held(worker, held, key="held")
            jobs = [("a", m32, Pass.ENCODE), ("b", m64, Pass.ENCODE), ("a", m32, Pass.DECODE), ("b", m64, Pass.DECODE)]
            tasks = [asyncio.create_task(worker.submit(k, m, p, x)) for k, m, p in jobs for _ in range(2)]
            await spin()
            held.gate.set()
            results = await asyncio.gather(*tasks)
            await blocker
        for (key, model, pass_), result in zip([j for j in jobs for _ in range(2)], results):
            assert_same(result, direct(model, pass_, x))
        # each (key, pass) queue formed one batch of its two requests, oldest head first
        assert [(b[0], b[1], b[2], b[3]) for b in rec.batches[1:]] == [(k, p, 10, 2) for k, _, p in jobs]

    run(main())


def test_bad_shapes_zero_rows_and_not_started() -> None:
    async def main() -> None:
        plain, conditional = make_model(), make_model("maf", context=CONTEXT)
        worker = DeviceWorker("cpu")
        with pytest.raises(WorkerStopped):
            await worker.submit("m", plain, Pass.ENCODE, np.zeros((1, FEATURES)))
        with running(worker):
            with pytest.raises(ContractError, match=r"shape \(n, 3\)"):
                await worker.submit("m", plain, Pass.ENCODE, np.zeros((2, FEATURES + 1)))
            with pytest.raises(ContractError, match="takes no context"):
                await worker.submit("m", plain, Pass.ENCODE, np.zeros((2, FEATURES)), np.zeros((2, CONTEXT)))
            with pytest.raises(ContractError, match="context must have shape"):
                await worker.submit("c", conditional, Pass.ENCODE, np.zeros((2, FEATURES)), np.zeros((2, CONTEXT + 1)))
            with pytest.raises(ContractError, match="needs 2 context"):
                await worker.submit("c", conditional, Pass.DECODE, np.zeros((2, FEATURES)))
            assert worker.queued_rows() == 0
            empty = await worker.submit("m", plain, Pass.ENCODE, np.zeros((0, FEATURES)))
            assert {k: v.shape for k, v in empty.items()} == {
                "z": (0, FEATURES), "log_det": (0,), "base_log_prob": (0,), "log_prob": (0,)
            }
            assert all(v.dtype == np.float32 for v in empty.values())
        with pytest.raises(RuntimeError):
            worker.start()

    run(main())


def test_observer_that_raises_does_not_break_the_worker() -> None:
    class Broken:
        def on_batch(self, *args: Any) -> None:
            raise RuntimeError("metrics down")

        on_dequeue = on_queue_depth = on_batch

    async def main() -> None:
        model = make_model()
        x = np.random.default_rng(9).normal(size=(4, FEATURES))
        with running(DeviceWorker("cpu", BatchingConfig(), Broken())) as worker:  # type: ignore[arg-type]
            assert_same(await worker.submit("m", model, Pass.ENCODE, x), direct(model, Pass.ENCODE, x))

    run(main())
