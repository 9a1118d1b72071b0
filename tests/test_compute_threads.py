"""The device worker's thread count follows the request, not the chunk the time slice cut from it.

A bulk request runs in chunks of about one time slice; counting each chunk's rows put a 100,000-row
moons sample on one thread in ~3,300-row chunks (2.57 s of compute for three samples, against
1.65 s on two threads). Small requests keep one thread (service/serving/batching/compute.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from service.model.repository import ModelRepository
from service.serving.batching import compute as compute_module
from service.serving.batching.config import Pass
from service.serving.batching.jobs import Job, Segment


def _segment(model: object, request_rows: int, chunk_rows: int) -> Segment:
    rows = np.random.default_rng(0).standard_normal((request_rows, 2)).astype(np.float32)
    job = Job(key="moons", pass_=Pass.DECODE, model=model, rows=rows, context=None, n=request_rows,
              deadline=None, loop=None, future=None, enqueued_at=0.0, queue=None)  # type: ignore[arg-type]
    return Segment.of(job, 0, chunk_rows)


def test_a_chunk_of_a_bulk_request_runs_on_all_threads_and_a_small_batch_on_one(model_repo: Path) -> None:
    model = ModelRepository(model_repo).load("moons").model
    before = torch.get_num_threads()
    try:
        small = compute_module.SINGLE_THREAD_ROWS // 4
        (segment, out), = compute_module.compute(model, Pass.DECODE, [_segment(model, 100_000, small)])
        assert torch.get_num_threads() == compute_module._THREADS
        assert not isinstance(out, BaseException) and out.shape == (small, 3)

        (segment, out), = compute_module.compute(model, Pass.DECODE, [_segment(model, small, small)])
        assert torch.get_num_threads() == 1
        assert not isinstance(out, BaseException)
    finally:
        torch.set_num_threads(before)
        compute_module._threads_now = 0
