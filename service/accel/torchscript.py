"""Traced passes: a model's packed encode and decode as TorchScript graphs, checked against eager.

Why: a zuko flow runs as hundreds of small torch ops per batch (each coupling layer's MLP, the spline's
bins, the masks). In eager mode every op is dispatched from Python and takes the GIL, so the device
worker's thread competes with the event loop for it: on a loaded 2-core machine, a thread running
eager one-row batches got 2 calls done in 2 s while another thread ran Python, against 178 for the
traced graph (bench/FINDINGS.md §7). A traced graph runs in TorchScript's interpreter, which releases
the GIL for the whole call, and has less per-op overhead (a 32-row moons batch: 0.6 ms against 1.7 ms).

How: TorchScript's tracer records the ops of :meth:`DensityModel.encode_columns` and
:meth:`~DensityModel.decode_columns` once, on the model's device and dtype, for a small example
batch; the batch size stays symbolic (zuko's flows have no data-dependent Python branches: loops run
a fixed number of times, e.g. the ``passes`` of an autoregressive inverse). The graphs run with the
graph executor's optimisations off, so they call the same kernels in the same order as eager code
(no fusion, no re-specialisation per batch size). Each trace is then *checked*: on probe batches of
several sizes, with and without context, its outputs must equal eager's to a few ulps, or the model
stays eager (:class:`TraceMismatch`). Nothing traced is ever saved or loaded: graphs are rebuilt from
the verified safetensors weights at every load, so no TorchScript archive (a code format) is read.

Memory: :func:`torch.jit.trace` is *not* used, because it never gives memory back. Tracing a module
makes a TorchScript class for it and each submodule (a new mangled name per trace) and compiles the
traced ``forward`` as a method of that class, and all of these are registered in torch's one
process-wide compilation unit (``torch.jit._state._python_cu``), which nothing ever empties but
``torch._C._jit_clear_class_registry()`` (every class of the process at once, which would leave the
models still served pointing at freed functions). Dropping the traced module frees its weights but
not its graphs: a reload of the test ``moons`` cost ~30 MB for good (100 reloads: 1.2 -> 4.3 GB).
So the graph is recorded with the tracer itself (``torch._C._create_graph_by_tracing``, what
``torch.jit._get_trace_graph`` uses) with the pass's parameters and buffers as *graph inputs*, and
compiled as a function of a :class:`torch._C.CompilationUnit` that only this :class:`TracedPasses`
holds: dropping the model drops the runner, its compilation unit, its graphs and executor plans.
Calling it runs the same interpreter as a traced method (the GIL released for the call), with the
weights passed in as arguments (the same tensors the module holds: no copy).

``torch.jit`` is deprecated in favour of ``torch.compile``/``torch.export``; neither runs a whole
graph without the GIL here without a C++ toolchain at serve time, so it is used where available and
the service falls back to eager code (``FLOWSERVE_TORCHSCRIPT=false``, or any tracing failure).
"""

from __future__ import annotations

import logging
import warnings
from typing import Callable

import torch
from torch import Tensor, nn

from service.model.density import DensityModel

# The tracer warns on zuko's shape reads ("iterating over a tensor..."); every trace is checked against
# eager on probe batches of several sizes (_check), so the warning says nothing here. A process-wide
# filter for that one category: warnings.catch_warnings() around the trace is not thread-safe, and
# with models loading in several threads it let the warnings through.
warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)

__all__ = ["TracedGraph", "TracedPasses", "TraceMismatch", "trace_passes", "try_trace"]

log = logging.getLogger(__name__)

#: Batch sizes the traces are checked on (1 and odd sizes catch broadcasting and shape constants).
PROBE_ROWS = (1, 3, 64)
#: Traces use an example batch of this many rows (not 1, so that no size-1 broadcasting is baked in).
EXAMPLE_ROWS = 7


class TraceMismatch(RuntimeError):
    """A traced pass did not reproduce the eager pass on the probe batches."""


class _Pass(nn.Module):
    """One packed pass of ``model`` as a module, so that tracing sees its weights as parameters."""

    def __init__(self, model: DensityModel, decode: bool) -> None:
        super().__init__()
        self.model = model
        self.decode = decode

    def forward(self, rows: Tensor, context: Tensor | None = None) -> Tensor:
        if self.decode:
            return self.model.decode_columns(rows, context)
        return self.model.encode_columns(rows, context)


class TracedGraph:
    """One traced pass as a function of ``(rows[, context], *weights)`` in a compilation unit of its own.

    Calling it passes ``weights`` (the pass's parameters and buffers, the very tensors the model
    holds) after the rows, so the graph holds no reference to the model and nothing global holds
    the graph: it is freed with this object.
    """

    def __init__(self, unit: torch._C.CompilationUnit, function: Callable[..., Tensor],
                 weights: tuple[Tensor, ...]) -> None:
        self._unit = unit  # owns the function (the function's handle also keeps it alive)
        self._function = function
        self._weights = weights

    def __call__(self, *rows: Tensor) -> Tensor:
        return self._function(*rows, *self._weights)


class TracedPasses:
    """The packed passes of one model as traced graphs (a :class:`~service.model.density.PassRunner`)."""

    def __init__(self, encode: Callable[..., Tensor], decode: Callable[..., Tensor], conditional: bool) -> None:
        self._encode = encode
        self._decode = decode
        self._conditional = conditional

    def _run(self, graph: Callable[..., Tensor], rows: Tensor, context: Tensor | None) -> Tensor:
        with torch.jit.optimized_execution(False):  # the eager kernels, in eager's order
            return graph(rows, context) if self._conditional else graph(rows)

    def encode(self, x: Tensor, context: Tensor | None) -> Tensor:
        return self._run(self._encode, x, context)

    def decode(self, z: Tensor, context: Tensor | None) -> Tensor:
        return self._run(self._decode, z, context)


def _example(model: DensityModel, rows: int, seed: int) -> tuple[Tensor, Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, model.features, generator=gen, dtype=torch.float64)
    c = None
    if model.context_features:
        c = torch.randn(rows, model.context_features, generator=gen, dtype=torch.float64)
        c = c.to(model.dtype).to(model.device)
    return x.to(model.dtype).to(model.device), c


def _tolerance(dtype: torch.dtype) -> float:
    return 64 * torch.finfo(dtype).eps


def _check(model: DensityModel, runner: TracedPasses) -> None:
    """Raise :class:`TraceMismatch` unless ``runner`` equals eager on every probe batch."""
    tol = _tolerance(model.dtype)
    for i, rows in enumerate(PROBE_ROWS):
        x, c = _example(model, rows, seed=1000 + i)
        x = model.from_standardised(x)  # data rows in the model's units (inside its bounds) for encode
        z, _ = _example(model, rows, seed=2000 + i)
        for name, eager, traced, inputs in (
            ("encode", model.encode_columns, runner.encode, x),
            ("decode", model.decode_columns, runner.decode, z),
        ):
            want, got = eager(inputs, c), traced(inputs, c)
            if got.shape != want.shape:
                raise TraceMismatch(f"traced {name} gave shape {tuple(got.shape)} for {tuple(want.shape)}")
            try:
                torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True)
            except AssertionError as e:
                raise TraceMismatch(f"traced {name} differs from eager on {rows} rows: {e}") from None


def _trace_pass(module: nn.Module, rows: tuple[Tensor, ...], name: str) -> TracedGraph:
    """Record ``module(*rows)`` as a graph of ``(*rows, *weights)`` and compile it in a private unit.

    The parameters and buffers are traced as inputs (not as attributes of a scripted module), so the
    graph holds none of them and nothing outside the returned object holds the graph.
    """
    weights = tuple(module.parameters()) + tuple(module.buffers())  # each tensor once (torch dedups)
    n = len(rows)

    def call(*args: Tensor) -> Tensor:
        return module(*args[:n])

    lookup = torch.jit._trace._create_interpreter_name_lookup_fn()
    graph, _ = torch._C._create_graph_by_tracing(call, [*rows, *weights], lookup, True, False)
    unit = torch._C.CompilationUnit()
    return TracedGraph(unit, unit.create_function(name, graph), weights)


def trace_passes(model: DensityModel) -> TracedPasses:
    """Trace ``model``'s packed encode and decode on its device and dtype, and check them.

    Raises:
        TraceMismatch: a trace does not reproduce eager on the probe batches.
        RuntimeError: tracing itself failed.
    """
    x, c = _example(model, EXAMPLE_ROWS, seed=0)
    inputs = (x, c) if model.context_features else (x,)
    graphs = []
    with torch.inference_mode(False), torch.no_grad():
        for decode in (False, True):
            graphs.append(_trace_pass(_Pass(model, decode).eval(), inputs, "decode" if decode else "encode"))
    runner = TracedPasses(graphs[0], graphs[1], conditional=bool(model.context_features))
    with torch.inference_mode():
        _check(model, runner)
    return runner


def try_trace(model: DensityModel, label: str = "model") -> bool:
    """Use traced passes for ``model`` when they trace and check; else keep it eager (and log why)."""
    try:
        model.use_runner(trace_passes(model))
        return True
    except Exception as e:  # noqa: BLE001 - eager is always correct: never fail a load over this
        model.use_runner(None)
        log.warning("%s stays eager: tracing its passes failed: %s", label, e)
        return False
