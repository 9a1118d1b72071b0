r"""The model limit: what the model itself does in-process, with no HTTP and no batching worker.

For ``n`` rows and batch size ``b``, the rows are cut into ``⌈n / b⌉`` chunks and each chunk goes
through :meth:`DensityModel.encode_packed` (or, for sampling, :meth:`DensityModel.draw_latents` for
all ``n`` on the CPU and :meth:`DensityModel.decode_packed` per chunk, as the server does) under
``torch.inference_mode()``, in the model's dtype, on the server's device, with the model traced as
the server traces it by default (:mod:`service.accel.torchscript`), so both run the same graphs.

The limit is the fastest run over torch intra-op thread counts (the server's, i.e. torch's default
in a fresh process, and 1), batch sizes (the server's ``max_batch_rows``, and ``n`` in one call when
time allows) and up to ``repeats`` timed runs each after a warm-up: the best the model does
in-process, so never lower than what the server's own thread setting would give.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from service.accel.threads import torch_threads
from service.model.density import DensityModel
from service.serving.registry import ModelRegistry
from service.model.repository import ModelRepository

__all__ = ["load_model", "realistic_rows", "Limit", "encode_limit", "decode_limit"]

Chunked = Callable[[int, int], None]  # (rows, batch size) -> run that many rows in chunks


def load_model(model_dir: Path | str, name: str, device: torch.device | str = "cpu") -> DensityModel:
    """The model as the server loads it by default (latest version, on ``device``, the registry's
    load: traced passes, CUDA graphs on a GPU)."""
    repository = ModelRepository(model_dir)
    return ModelRegistry(repository, device).load_version(name, max(repository.versions(name))).model


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

    def probe(self, batch: int) -> float:
        """Rows/s over one batch (after a smaller warm-up), one thread: to size the measured runs."""
        rows = min(self.max_rows, batch)
        with torch_threads(1):
            self._run(max(1, rows // 8), batch)
            return rows / self._run(rows, batch)

    def measure(self, n: int, batch_sizes: list[int], thread_counts: list[int], repeats: int,
                budget_s: float) -> dict:
        """The best rows/s for ``n`` rows over thread counts, batch sizes and up to ``repeats`` runs each.

        Each (threads, batch size) pair gets a warm-up and then timed runs while they fit in
        ``budget_s``; a larger batch size is skipped once one run takes more than ``budget_s / 2``.
        The limit is the fastest run: noise from a shared machine only ever slows a run down.
        """
        runs: dict[str, list[float]] = {}
        for t in sorted(set(thread_counts)):
            with torch_threads(t):
                for b in sorted(set(min(b, n) for b in batch_sizes)):
                    self._run(min(n, b), b)  # warm-up
                    times: list[float] = []
                    while len(times) < max(1, repeats) and (not times or sum(times) * (1 + 1 / len(times)) <= budget_s):
                        times.append(self._run(n, b))
                    runs[f"threads={t},batch={b}"] = times
                    if min(times) > budget_s / 2:
                        break
        best_key = min(runs, key=lambda k: min(runs[k]))
        seconds = min(runs[best_key])
        return {
            "rows": n, "rows_per_s": n / seconds, "seconds": seconds, "best": best_key,
            "rows_per_s_by_config": {k: n / min(v) for k, v in runs.items()},
            "seconds_by_config": runs, "device": str(self.model.device), "dtype": str(self.model.dtype),
        }


def encode_limit(model: DensityModel, x: np.ndarray) -> Limit:
    """In-process batched ``log_prob`` over the rows ``x`` (the first ``n`` of them when measuring ``n``)."""
    xt = torch.as_tensor(x, dtype=model.dtype).to(model.device)

    def chunked(n: int, b: int) -> None:
        with torch.inference_mode():
            for i in range(0, n, b):
                model.encode_packed(xt[i : min(i + b, n)])

    return Limit(model, chunked, xt.shape[0])


def decode_limit(model: DensityModel, max_rows: int, seed: int = 1) -> Limit:
    """In-process sampling: draw ``n`` latents on the CPU (as the server does), decode them in chunks."""

    def chunked(n: int, b: int) -> None:
        with torch.inference_mode():
            z = model.draw_latents(n, seed=seed).to(model.device)
            for i in range(0, n, b):
                model.decode_packed(z[i : i + b])

    return Limit(model, chunked, max_rows)
