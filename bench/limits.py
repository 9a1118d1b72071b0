r"""The model limit: what the model itself does in-process, with no HTTP and no batching worker.

For ``n`` rows and batch size ``b``, the rows are cut into ``⌈n / b⌉`` chunks and each chunk goes
through :meth:`DensityModel.log_prob` (or, for sampling, :meth:`DensityModel.draw_latents` for all
``n`` on the CPU and :meth:`DensityModel.decode` per chunk, as the server does) under
``torch.inference_mode()``, in the model's dtype, with the server's torch thread count. The limit
is the best rows/s over the batch sizes tried (the server's ``max_batch_rows`` and ``n`` in one
call), the median of ``repeats`` timed runs after one warm-up run.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from service.density import DensityModel
from service.repository import ModelRepository

__all__ = ["load_model", "log_prob_limit", "sample_limit", "realistic_rows"]


def load_model(model_dir: Path | str, name: str) -> DensityModel:
    """The model as the server loads it (latest version, CPU)."""
    return ModelRepository(model_dir).load(name).model


def realistic_rows(model: DensityModel, n: int, seed: int = 0) -> np.ndarray:
    """``n`` rows drawn from the model itself (in-distribution inputs), in the model's dtype."""
    with torch.inference_mode():
        return model.sample(n, seed=seed).x.cpu().numpy()


def _timed(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _best(n: int, batch_sizes: list[int], make: Callable[[int], Callable[[], None]], repeats: int) -> dict:
    by_batch = {}
    for b in sorted(set(min(b, n) for b in batch_sizes)):
        seconds = _timed(make(b), repeats)
        by_batch[str(b)] = {"seconds": seconds, "rows_per_s": n / seconds}
    best = max(by_batch.values(), key=lambda r: r["rows_per_s"])
    return {"rows": n, "rows_per_s": best["rows_per_s"], "seconds": best["seconds"], "by_batch": by_batch,
            "threads": torch.get_num_threads()}


def log_prob_limit(model: DensityModel, x: np.ndarray, batch_sizes: list[int], repeats: int = 3) -> dict:
    """In-process batched ``log_prob`` throughput over the rows ``x``."""
    xt = torch.as_tensor(x, dtype=model.dtype, device=model.device)

    def make(b: int) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                for i in range(0, xt.shape[0], b):
                    model.log_prob(xt[i : i + b])
        return run

    return _best(xt.shape[0], batch_sizes, make, repeats)


def sample_limit(model: DensityModel, n: int, batch_sizes: list[int], repeats: int = 3, seed: int = 1) -> dict:
    """In-process sampling throughput: draw ``n`` latents on the CPU, decode them in chunks."""

    def make(b: int) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                z = model.draw_latents(n, seed=seed).to(model.device)
                for i in range(0, n, b):
                    model.decode(z[i : i + b])
        return run

    return _best(n, batch_sizes, make, repeats)
