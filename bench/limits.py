r"""The model limit: what the model itself does in-process, with no HTTP and no batching worker.

For ``n`` rows and batch size ``b``, the rows are cut into ``⌈n / b⌉`` chunks and each chunk goes
through :meth:`DensityModel.log_prob` (or, for sampling, :meth:`DensityModel.draw_latents` for all
``n`` on the CPU and :meth:`DensityModel.decode` per chunk, as the server does) under
``torch.inference_mode()``, in the model's dtype, on the server's device.

Threads: a short probe (two batches) runs at each torch intra-op thread count offered (the
server's, i.e. torch's default in a fresh process, and 1), and the limit is measured at the faster
one, so the limit is never lower than what the server's own setting would give. The limit is the
best rows/s over the batch sizes tried (the server's ``max_batch_rows``, and ``n`` in one call when
time allows), each the median of up to ``repeats`` timed runs after a warm-up.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from service.density import DensityModel
from service.repository import ModelRepository

__all__ = ["load_model", "realistic_rows", "Limit", "encode_limit", "decode_limit"]

Chunked = Callable[[int, int], None]  # (rows, batch size) -> run that many rows in chunks


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


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sync(model: DensityModel) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)


class Limit:
    """One pass of one model, ready to be probed and measured."""

    def __init__(self, model: DensityModel, chunked: Chunked, max_rows: int) -> None:
        self.model = model
        self.chunked = chunked
        self.max_rows = max_rows

    def _run(self, rows: int, b: int) -> float:
        t0 = time.perf_counter()
        self.chunked(rows, b)
        _sync(self.model)
        return time.perf_counter() - t0

    def probe(self, batch: int, thread_counts: list[int]) -> dict:
        """Rows/s over one batch (after a smaller warm-up) at each thread count; the best count."""
        rows = min(self.max_rows, batch)
        by_threads = {}
        for t in sorted(set(thread_counts)):
            with _threads(t):
                self._run(max(1, rows // 8), batch)
                by_threads[str(t)] = rows / self._run(rows, batch)
        best = max(by_threads, key=by_threads.__getitem__)
        return {"rows": rows, "rows_per_s_by_threads": by_threads, "threads": int(best),
                "rows_per_s": by_threads[best]}

    def measure(self, n: int, batch_sizes: list[int], threads: int, repeats: int, budget_s: float) -> dict:
        """Best rows/s over ``batch_sizes`` for ``n`` rows; a larger batch only while time allows."""
        by_batch: dict[str, dict] = {}
        with _threads(threads):
            for b in sorted(set(min(b, n) for b in batch_sizes)):
                self._run(min(n, b), b)  # warm-up
                times: list[float] = []
                while len(times) < max(1, repeats) and (not times or sum(times) * (1 + 1 / len(times)) <= budget_s):
                    times.append(self._run(n, b))
                seconds = statistics.median(times)
                by_batch[str(b)] = {"seconds": seconds, "runs": len(times), "rows_per_s": n / seconds}
                if seconds > budget_s / 4:
                    break
        best = max(by_batch.values(), key=lambda r: r["rows_per_s"])
        return {"rows": n, "rows_per_s": best["rows_per_s"], "seconds": best["seconds"], "by_batch": by_batch,
                "threads": threads, "device": str(self.model.device), "dtype": str(self.model.dtype)}


def encode_limit(model: DensityModel, x: np.ndarray) -> Limit:
    """In-process batched ``log_prob`` over the rows ``x`` (the first ``n`` of them when measuring ``n``)."""
    xt = torch.as_tensor(x, dtype=model.dtype).to(model.device)

    def chunked(n: int, b: int) -> None:
        with torch.inference_mode():
            for i in range(0, n, b):
                model.log_prob(xt[i : min(i + b, n)])

    return Limit(model, chunked, xt.shape[0])


def decode_limit(model: DensityModel, max_rows: int, seed: int = 1) -> Limit:
    """In-process sampling: draw ``n`` latents on the CPU (as the server does), decode them in chunks."""

    def chunked(n: int, b: int) -> None:
        with torch.inference_mode():
            z = model.draw_latents(n, seed=seed).to(model.device)
            for i in range(0, n, b):
                model.decode(z[i : i + b])

    return Limit(model, chunked, max_rows)
