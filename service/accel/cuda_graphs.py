"""CUDA graphs for small batches: one captured graph per (pass, bucket of rows), replayed.

Why: a flow's pass is hundreds of small kernels. On a GPU each launch costs the CPU several
microseconds, so on an H200, before graphs, one-row ``log_prob`` requests took 5.9 ms (p50, 163
requests/s at concurrency 1) whatever the model: the device idles while the CPU launches. A CUDA
graph records the launches once and replays them with one call (``bench/FINDINGS.md``, section 10,
has the figures of both runs; that first run's report was replaced in ``bench/results`` by the run
with graphs, ``2026-11-28-cuda.md``).

How: batches of up to ``max_rows`` rows are padded to the next power of two (a *bucket*: one
graph per power of two up to ``max_rows``, and padding is under half of any replayed batch); the
first batch of each (pass, bucket) captures the wrapped runner's pass on static input buffers
(after warm-up runs on a side stream, as :func:`torch.cuda.graph` requires),
then every batch of that bucket copies its rows into the buffers, zero-fills the padding rows
(rows are independent: padding changes a real row's result only by float round-off) and replays. All graphs of a
model share one memory pool. Each capture is *checked* on the batch that triggered it: the replayed
rows must equal the wrapped runner's own result for those rows up to float round-off (padding
changes the matrix shapes, so the kernels may sum in another order; see :func:`_close`), or the
model stops using graphs and logs why. Larger batches, where launches no longer matter, go to the wrapped runner.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from service.model.density import DensityModel, PassRunner

__all__ = ["GraphedPasses", "EagerPasses", "use_cuda_graphs"]

log = logging.getLogger(__name__)

#: Largest batch replayed from a graph (buckets 1, 2, 4, ..., this); larger batches run directly.
MAX_GRAPH_ROWS = 4096


class EagerPasses:
    """The model's own eager packed passes, as a :class:`~service.model.density.PassRunner`."""

    def __init__(self, model: DensityModel) -> None:
        self._model = model

    def encode(self, x: Tensor, context: Tensor | None) -> Tensor:
        return self._model.encode_columns(x, context)

    def decode(self, z: Tensor, context: Tensor | None) -> Tensor:
        return self._model.decode_columns(z, context)


@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    rows: Tensor
    context: Tensor | None
    out: Tensor


def _bucket(rows: int) -> int:
    return 1 << max(0, rows - 1).bit_length()


class GraphedPasses:
    """Replays captured CUDA graphs for batches up to ``max_rows`` rows; else calls ``inner``."""

    def __init__(self, model: DensityModel, inner: PassRunner, max_rows: int = MAX_GRAPH_ROWS) -> None:
        self._model = model
        self._inner = inner
        self._max_rows = max_rows
        self._graphs: dict[tuple[str, int], _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self._broken: str | None = None

    @property
    def broken(self) -> str | None:
        """Why graphs were given up for this model (``None`` while they are in use)."""
        return self._broken

    def encode(self, x: Tensor, context: Tensor | None) -> Tensor:
        return self._run("encode", x, context)

    def decode(self, z: Tensor, context: Tensor | None) -> Tensor:
        return self._run("decode", z, context)

    def _pass(self, name: str, rows: Tensor, context: Tensor | None) -> Tensor:
        return getattr(self._inner, name)(rows, context)

    def _run(self, name: str, rows: Tensor, context: Tensor | None) -> Tensor:
        b = rows.shape[0]
        if self._broken is not None or b == 0 or b > self._max_rows or rows.device.type != "cuda":
            return self._pass(name, rows, context)
        key = (name, _bucket(b))
        graph = self._graphs.get(key)
        if graph is None:
            try:
                graph = self._capture(name, key[1], rows, context)
            except Exception as e:  # noqa: BLE001 - the wrapped runner is always correct
                self._give_up(f"capturing the {name} graph for {key[1]} rows failed: {e}")
                return self._pass(name, rows, context)
            self._graphs[key] = graph
            out = self._replay(graph, rows, context)
            want = self._pass(name, rows, context)
            if not _close(out, want):
                self._give_up(f"the {name} graph for {key[1]} rows differs from the direct pass")
                return want
            return out
        return self._replay(graph, rows, context)

    @staticmethod
    def _replay(graph: _Graph, rows: Tensor, context: Tensor | None) -> Tensor:
        b = rows.shape[0]
        graph.rows[:b].copy_(rows)
        graph.rows[b:].zero_()
        if graph.context is not None and context is not None:
            graph.context[:b].copy_(context)
            graph.context[b:].zero_()
        graph.graph.replay()
        return graph.out[:b].clone()  # the next replay overwrites the static output

    def _capture(self, name: str, bucket: int, rows: Tensor, context: Tensor | None) -> _Graph:
        static_rows = torch.zeros((bucket, rows.shape[1]), dtype=rows.dtype, device=rows.device)
        static_context = None
        if context is not None:
            static_context = torch.zeros((bucket, context.shape[1]), dtype=context.dtype, device=context.device)
        side = torch.cuda.Stream(device=rows.device)
        side.wait_stream(torch.cuda.current_stream(rows.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up off the capturing stream (allocator, lazy initialisation)
                self._pass(name, static_rows, static_context)
        torch.cuda.current_stream(rows.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = self._pass(name, static_rows, static_context)
        return _Graph(graph, static_rows, static_context, out)

    def _give_up(self, why: str) -> None:
        self._broken = why
        self._graphs.clear()
        log.warning("%s: CUDA graphs disabled for this model, batches run directly", why)


def _close(got: Tensor, want: Tensor) -> bool:
    """Equal up to float round-off. Padding a batch changes the matrix shapes, and cuBLAS may then
    sum in another order (as it may for any two batch sizes on a GPU): on the H200, digits' 1000
    rows padded to 1024 differed by up to 9.2e-5 in float32 (bench/cuda_check.py), beyond a few ulps
    but far below the model's own error. The bound is the square root of the dtype's machine epsilon, relative
    and absolute (3.5e-4 in float32, 1.5e-8 in float64)."""
    tol = float(torch.finfo(want.dtype).eps) ** 0.5
    return got.shape == want.shape and bool(torch.allclose(got, want, rtol=tol, atol=tol, equal_nan=True))


def use_cuda_graphs(model: DensityModel) -> bool:
    """Wrap ``model``'s packed passes (traced or eager) in :class:`GraphedPasses` when it is on CUDA."""
    if model.device.type != "cuda" or not torch.cuda.is_available():
        return False
    inner = model.runner if model.runner is not None else EagerPasses(model)
    model.use_runner(GraphedPasses(model, inner))
    return True
