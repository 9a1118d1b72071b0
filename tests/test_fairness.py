"""Fair scheduling and honest admission in the device worker (issue 9, items 3 and 4(b)).

Mechanism, not timing: which rows each model call saw, in what order; what is refused at once and
what was never computed or drawn. A wrapper of the real flow records every call and can hold one
call (by its index) inside the model, so "a huge job is running" is a fact, not a race; another
sleeps a fixed time per row, so its measured throughput has a known upper bound.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from service.serving import operations
from service.model.artifact import LoadedArtifact
from service.serving.batching import BatchingConfig, DeviceWorker, Pass, QueueFull, WontFinish
from service.model.density import DensityModel
from service.serving.registry import ModelRegistry, ServedModel
from service.model.repository import ModelRepository
from tests.server import start_server
from tests.test_batching import FEATURES, Instrumented, Recorder, assert_same, direct, make_model, run, spin, start_held



class Recording(DensityModel):
    """The real flow; records the rows of every call and holds call number ``hold_at`` (0-based)
    until :attr:`gate` opens; ``seconds_per_row`` makes each call sleep that long per row."""

    def __init__(self, base: DensityModel, seconds_per_row: float = 0.0) -> None:
        super().__init__(base.flow_spec, base.shift, base.scale)
        self.load_state_dict(base.state_dict())
        self.to(base.dtype).eval().requires_grad_(False)
        self.calls: list[np.ndarray] = []
        self.hold_at: int | None = None
        self.held = threading.Event()
        self.gate = threading.Event()
        self.seconds_per_row = seconds_per_row
        self.draws = 0

    def _enter(self, x: torch.Tensor) -> None:
        self.calls.append(x.cpu().numpy().copy())
        if self.hold_at is not None and len(self.calls) - 1 == self.hold_at:
            self.held.set()
            assert self.gate.wait(30), "test gate never opened"
        if self.seconds_per_row:
            time.sleep(self.seconds_per_row * x.shape[0])

    def encode(self, x: torch.Tensor, context: torch.Tensor | None = None) -> Any:
        self._enter(x)
        return super().encode(x, context)

    def decode(self, z: torch.Tensor, context: torch.Tensor | None = None) -> Any:
        self._enter(z)
        return super().decode(z, context)

    def draw_latents(self, n: int, seed: int | None = None, temperature: float = 1.0) -> torch.Tensor:
        self.draws += 1
        return super().draw_latents(n, seed, temperature)

    def computed_any(self, mark: float) -> bool:
        """Whether any call saw a row whose first coordinate is ``mark``."""
        return any(np.any(np.isclose(c[:, 0], mark)) for c in self.calls)

    def owner(self, call: np.ndarray, marks: dict[str, float]) -> set[str]:
        """Which jobs a call's rows came from: each job's rows carry its own first coordinate."""
        return {name for name, mark in marks.items() if np.any(np.isclose(call[:, 0], mark))}


def marked(n: int, mark: float, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).normal(size=(n, FEATURES))
    rows[:, 0] = mark
    return rows


# -- the scheduling ----------------------------------------------------------------------------------
@pytest.mark.parametrize("max_batch_ms", [1000.0, 0.0], ids=["slice", "no-slice"])
def test_one_row_job_runs_after_at_most_one_more_chunk_of_a_huge_job(max_batch_ms: float) -> None:
    async def main() -> None:
        model = Recording(make_model())
        # slice of 1000 ms: chunks are max_batch_rows (64) whatever the measured rate, but large jobs run alone
        worker = DeviceWorker("cpu", BatchingConfig(max_batch_rows=64, max_batch_ms=max_batch_ms))
        worker.start()
        huge, one = marked(64 * 40, 3.0, 1), marked(1, -7.0, 2)
        try:
            model.hold_at = 2  # the huge job's third chunk
            huge_task = asyncio.create_task(worker.submit("m", model, Pass.ENCODE, huge))
            assert await asyncio.to_thread(model.held.wait, 30)
            one_task = asyncio.create_task(worker.submit("m", model, Pass.ENCODE, one))
            await spin()
            assert worker.queued_rows() == 64 * 37 + 1  # the huge job's rest and the one row wait
            model.gate.set()
            got_one = await one_task
            got_huge = await huge_task
        finally:
            model.gate.set()
            worker.stop(drain=False, timeout=10)
        owners = [model.owner(c, {"huge": 3.0, "one": -7.0}) for c in model.calls]
        first_one = next(i for i, o in enumerate(owners) if "one" in o)
        assert first_one == 3  # the call right after the chunk that was running when it arrived
        if max_batch_ms:
            assert owners[3] == {"one"}  # with the slice a large job runs alone: the row does not wait for it
        assert len(model.calls) == 41  # 40 chunks of the huge job and no more than one extra call
        assert_same(got_one, direct(model, Pass.ENCODE, one))
        assert_same(got_huge, direct(model, Pass.ENCODE, huge))

    run(main())


@pytest.mark.parametrize("keys", [("m", "m"), ("a", "b")], ids=["same-queue", "two-queues"])
def test_two_large_jobs_take_turns(keys: tuple[str, str]) -> None:
    async def main() -> None:
        model, rec = Recording(make_model()), Recorder()
        held = Instrumented(make_model())
        worker = DeviceWorker("cpu", BatchingConfig(max_batch_rows=32, max_batch_ms=1000.0), rec)
        worker.start()
        a, b = marked(32 * 6, 5.0, 3), marked(32 * 6, -5.0, 4)
        try:
            blocker = await start_held(worker, held, key="held")
            tasks = [asyncio.create_task(worker.submit(k, model, Pass.DECODE, x)) for k, x in zip(keys, (a, b))]
            await spin()
            held.gate.set()
            got = await asyncio.gather(*tasks)
            await blocker
        finally:
            held.gate.set()
            worker.stop(drain=False, timeout=10)
        owners = [model.owner(c, {"a": 5.0, "b": -5.0}) for c in model.calls]
        assert owners == [{"a"}, {"b"}] * 6  # round robin, one chunk each, never both in one call
        assert_same(got[0], direct(model, Pass.DECODE, a))
        assert_same(got[1], direct(model, Pass.DECODE, b))

    run(main())


def test_chunks_follow_the_time_slice_once_the_rate_is_measured() -> None:
    async def main() -> None:
        # 1 ms per row: a 20 ms slice holds at most 20 rows whatever the flow itself costs
        model = Recording(make_model(), seconds_per_row=1e-3)
        worker = DeviceWorker("cpu", BatchingConfig(max_batch_rows=4096, max_batch_ms=20.0))
        worker.start()
        try:
            await worker.submit("m", model, Pass.ENCODE, marked(600, 1.0, 5))
        finally:
            worker.stop(timeout=30)
        sizes = [len(c) for c in model.calls]
        # probe chunks while nothing is measured (the first full batch is warm-up and not counted),
        # not max_batch_rows; then chunks of the slice
        assert sizes[:2] == [256, 256]
        assert sum(sizes) == 600 and all(s <= 20 for s in sizes[2:])
        rate = worker.rows_per_second("m", Pass.ENCODE)
        assert rate is not None and rate <= 1000.0  # never faster than the sleep allows

    run(main())


# -- admission -----------------------------------------------------------------------------------------
def test_refused_up_front_when_its_own_rows_cannot_finish_before_the_deadline() -> None:
    async def main() -> None:
        model = Recording(make_model(), seconds_per_row=1e-4)  # at most 10,000 rows/s
        worker = DeviceWorker("cpu", BatchingConfig(max_batch_rows=512))
        worker.start()
        try:
            # nothing measured yet: admitted (the next test: stopped between chunks once the rate says it cannot finish)
            assert worker.rows_per_second("m", Pass.ENCODE) is None
            await worker.submit("m", model, Pass.ENCODE, marked(4096, 0.5, 6))  # enough full batches to decide on
            rate = worker.rows_per_second("m", Pass.ENCODE)
            assert rate is not None and rate <= 10_000
            calls = len(model.calls)
            too_many = marked(20_000, 2.5, 7)  # at least 2 s of compute
            started = time.monotonic()
            with pytest.raises(WontFinish) as refused:
                await worker.submit("m", model, Pass.ENCODE, too_many, deadline=time.monotonic() + 1.0)
            assert time.monotonic() - started < 0.5  # at once, not at the deadline
            assert refused.value.seconds >= 2.0 and refused.value.rows_per_second == rate
            assert "rows/s" in str(refused.value)
            assert len(model.calls) == calls and not model.computed_any(2.5)
            assert worker.queued_rows() == 0

            # a big job queued ahead: rows that would fit alone are refused 503 (retry), a single row is not
            ahead = asyncio.create_task(worker.submit("m", model, Pass.ENCODE, marked(20_000, 4.5, 8)))
            await spin()
            with pytest.raises(QueueFull) as full:
                await worker.submit("m", model, Pass.ENCODE, marked(5_000, 6.5, 9), deadline=time.monotonic() + 0.9)
            assert full.value.reason and "ahead" in full.value.reason and full.value.retry_after > 0
            assert not model.computed_any(6.5)
            one = await worker.submit("m", model, Pass.ENCODE, marked(1, 8.5, 10), deadline=time.monotonic() + 1.0)
            assert one["log_prob"].shape == (1,)
            assert not ahead.done()  # the single row was answered while the big job still ran
            ahead.cancel()
        finally:
            worker.stop(drain=False, timeout=10)

    run(main())


def test_admitted_before_a_rate_was_known_stops_once_it_cannot_finish() -> None:
    """A job admitted on a fresh worker (no rate yet) whose deadline turns out too short is answered
    :class:`WontFinish` between its chunks as soon as the measured rate says so, not computed until
    its deadline and then dropped."""
    async def main() -> None:
        model = Recording(make_model(), seconds_per_row=2e-4)  # at most 5,000 rows/s: 20,000 rows >= 4 s
        worker = DeviceWorker("cpu", BatchingConfig(max_batch_rows=512))
        worker.start()
        try:
            assert worker.rows_per_second("m", Pass.ENCODE) is None
            started = time.monotonic()
            with pytest.raises(WontFinish) as late:
                await worker.submit("m", model, Pass.ENCODE, marked(20_000, 0.5, 11), deadline=started + 2.0)
            elapsed = time.monotonic() - started
            computed = sum(len(c) for c in model.calls)
            assert elapsed < 2.0, f"answered after {elapsed:.2f} s, at or past the deadline"
            assert 0 < computed < 20_000 and late.value.rows == 20_000 - computed
            assert "rows/s" in str(late.value) and worker.queued_rows() == 0
        finally:
            worker.stop(drain=False, timeout=10)

    run(main())


def test_a_rate_from_too_few_batches_refuses_nothing() -> None:
    """A model's first chunks are small (256 rows) and slower per row than the slices after them: a
    rate resting on fewer than DECIDING_BATCHES full batches admits (a 1e6-row moons sample that
    finishes in 9 s was refused at once on a rate from two 256-row chunks)."""
    from service.serving.batching.worker import DECIDING_BATCHES

    async def main() -> None:
        model = Recording(make_model(), seconds_per_row=1e-4)
        worker = DeviceWorker("cpu", BatchingConfig(max_batch_rows=512))
        worker.start()
        try:
            await worker.submit("m", model, Pass.ENCODE, marked(700, 0.5, 12))  # the warm-up batch + one
            assert worker._rates[("m", Pass.ENCODE)].measurements < DECIDING_BATCHES
            calls = len(model.calls)
            with pytest.raises(WontFinish):  # admitted: refused only once enough batches say so
                await worker.submit("m", model, Pass.ENCODE, marked(20_000, 2.5, 13), deadline=time.monotonic() + 1.0)
            assert model.computed_any(2.5) and len(model.calls) > calls
        finally:
            worker.stop(drain=False, timeout=10)

    run(main())


def test_reservation_counts_against_the_bound_and_is_given_back() -> None:
    async def main() -> None:
        model = make_model()
        worker = DeviceWorker("cpu", BatchingConfig(max_queue_rows=1000))
        worker.start()
        try:
            held = worker.reserve("m", Pass.DECODE, 600)
            assert worker.reserved_rows() == 600
            with pytest.raises(QueueFull):
                worker.reserve("m", Pass.DECODE, 500)
            with pytest.raises(QueueFull):
                await worker.submit("m", model, Pass.DECODE, np.zeros((500, FEATURES)))
            with pytest.raises(ValueError, match="reservation"):  # wrong row count: refused, and given back
                await worker.submit("m", model, Pass.DECODE, np.zeros((5, FEATURES)), reservation=held)
            assert worker.reserved_rows() == 0
            with worker.reserve("m", Pass.DECODE, 600) as again:
                out = await worker.submit("m", model, Pass.DECODE, np.zeros((600, FEATURES)), reservation=again)
                assert out["x"].shape == (600, FEATURES)
            assert worker.reserved_rows() == 0 and worker.queued_rows() == 0
            with worker.reserve("m", Pass.DECODE, 1000):
                pass  # released unused on leaving
            assert worker.reserved_rows() == 0
        finally:
            worker.stop()

    run(main())


def _served_moons(model_dir: Path) -> tuple[ServedModel, Recording]:
    served = ModelRegistry(ModelRepository(model_dir), "cpu").load_version("moons", 1)
    counting = Recording(served.model)
    artifact = LoadedArtifact(served.artifact.path, served.artifact.manifest, counting)
    return ServedModel(artifact, served.key), counting


def test_sample_is_admitted_before_it_draws(model_repo: Path) -> None:
    served, model = _served_moons(model_repo)

    async def main() -> None:
        held = Instrumented(make_model())
        worker = DeviceWorker("cpu", BatchingConfig(max_queue_rows=1000))
        worker.start()
        try:
            blocker = await start_held(worker, held, key="held")
            first = asyncio.create_task(operations.sample(worker, served, 1000, seed=11))
            while worker.queued_rows() < 1000:  # drawn and queued behind the held batch
                await asyncio.sleep(0.01)
            for seed in (12, 13):
                with pytest.raises(QueueFull):
                    await operations.sample(worker, served, 1000, seed=seed)
            assert model.draws == 1  # the refused ones drew nothing
            assert worker.reserved_rows() == 0 and worker.queued_rows() == 1000
            held.gate.set()
            out = await first
            await blocker
            # the same seed, alone: bit-identical latents, the same rows whatever the batching
            again = await operations.sample(worker, served, 1000, seed=11)
        finally:
            held.gate.set()
            worker.stop(drain=False, timeout=10)
        assert np.array_equal(out["latents"], again["latents"])
        assert np.array_equal(out["latents"], served.model.draw_latents(1000, 11).numpy())
        assert_same({"x": out["samples"]}, {"x": again["samples"]})

    run(main())


# -- through HTTP ----------------------------------------------------------------------------------------
def test_one_row_request_is_answered_while_a_big_sample_runs(model_repo: Path, tmp_path: Path) -> None:
    # a deadline long enough for the big sample on a busy 2-core machine: this checks order, not speed
    server = start_server(model_repo, tmp_path, max_batch_ms=10, request_timeout_s=300)
    try:
        url = f"{server.url}/v1/models/moons"
        results: dict[str, Any] = {}

        def big() -> None:
            with httpx.Client(timeout=300) as c:
                r = c.post(f"{url}/sample", json={"n": 150_000, "seed": 1}, headers={"Accept": "application/x-npy"})
                results["big"] = (r.status_code, time.monotonic())

        thread = threading.Thread(target=big)
        thread.start()
        answered = []
        with httpx.Client(timeout=60) as c:
            deadline = time.monotonic() + 60
            while server.metric("flowserve_queue_rows") < 1 and thread.is_alive() and time.monotonic() < deadline:
                time.sleep(0.02)  # the big sample is queued (its chunks are running)
            assert thread.is_alive(), "the big sample finished before the probe could start"
            for _ in range(5):
                r = c.post(f"{url}/log_prob", json={"inputs": [[0.5, 0.25]]})
                assert r.status_code == 200, r.text
                answered.append(time.monotonic())
        thread.join(300)
        status, big_done = results["big"]
        assert status == 200
        assert max(answered) < big_done  # every one-row answer came while the big sample still ran
    finally:
        server.terminate()
