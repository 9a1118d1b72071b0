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


def realistic_rows(model: DensityModel, n: int, seed: int = 0, distinct: int = 4096) -> np.ndarray:
    """``n`` rows drawn from the model itself (in-distribution inputs), in the model's dtype.

    ``distinct`` rows are sampled and tiled to ``n``: the cost of a flow does not depend on whether
    rows repeat, and sampling 100,000 rows of a slow model would take longer than the benchmark.
    """
    with torch.inference_mode():
        x = model.sample(min(n, distinct), seed=seed).x.cpu().numpy()
    return np.ascontiguousarray(np.resize(x, (n, x.shape[1])))


def _sync(model: DensityModel) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


def _timed(run: Callable[[], None], warm: Callable[[], None], repeats: int, budget_s: float) -> list[float]:
    """Times of ``run`` after ``warm``: at least one, then more while they stay within ``budget_s``."""
    warm()
    times: list[float] = []
    while len(times) < max(1, repeats) and (not times or sum(times) * (1 + 1 / len(times)) <= budget_s):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return times


def _best(model: DensityModel, n: int, batch_sizes: list[int], chunked: Callable[[int, int], None],
          repeats: int, budget_s: float) -> dict:
    """Best rows/s over ``batch_sizes``; a larger batch is only tried when the smaller took < budget/4."""
    by_batch: dict[str, dict] = {}
    for b in sorted(set(min(b, n) for b in batch_sizes)):
        def run(b: int = b) -> None:
            chunked(n, b)
            _sync(model)

        def warm(b: int = b) -> None:
            chunked(min(n, b), b)
            _sync(model)

        times = _timed(run, warm, repeats, budget_s)
        seconds = statistics.median(times)
        by_batch[str(b)] = {"seconds": seconds, "runs": len(times), "rows_per_s": n / seconds}
        if seconds > budget_s / 4:
            break
    best = max(by_batch.values(), key=lambda r: r["rows_per_s"])
    return {"rows": n, "rows_per_s": best["rows_per_s"], "seconds": best["seconds"], "by_batch": by_batch,
            "threads": torch.get_num_threads(), "device": str(model.device), "dtype": str(model.dtype)}


def log_prob_limit(model: DensityModel, x: np.ndarray, batch_sizes: list[int], repeats: int = 3,
                   budget_s: float = 12.0) -> dict:
    """In-process batched ``log_prob`` throughput over the rows ``x``."""
    xt = torch.as_tensor(x, dtype=model.dtype).to(model.device)

    def chunked(n: int, b: int) -> None:
        with torch.inference_mode():
            for i in range(0, n, b):
                model.log_prob(xt[i : min(i + b, n)])

    return _best(model, xt.shape[0], batch_sizes, chunked, repeats, budget_s)


def sample_limit(model: DensityModel, n: int, batch_sizes: list[int], repeats: int = 3, seed: int = 1,
                 budget_s: float = 12.0) -> dict:
    """In-process sampling throughput: draw ``n`` latents on the CPU, decode them in chunks."""

    def chunked(rows: int, b: int) -> None:
        with torch.inference_mode():
            z = model.draw_latents(rows, seed=seed).to(model.device)
            for i in range(0, rows, b):
                model.decode(z[i : i + b])

    return _best(model, n, batch_sizes, chunked, repeats, budget_s)
