"""``python -m bench.cuda_check``: the CUDA path's checks, run on a GPU machine before the benchmark.

For each default model on ``cuda``: the traced passes must equal eager (``trace_passes`` checks
that at load and raises otherwise); the CUDA-graph passes must equal the traced ones for batch
sizes around and between the buckets, encode and decode, with context for conditional models; and
the latency of a one-row pass is timed three ways (eager, traced, graphed; median of 200 calls with
a device synchronisation each). Prints one JSON object and exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from service.accel.cuda_graphs import EagerPasses, GraphedPasses
from service.model.repository import ModelRepository
from service.accel.torchscript import trace_passes

SIZES = (1, 2, 3, 7, 33, 100, 1000, 4096, 5000)


def _inputs(model, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, model.features, generator=gen, dtype=torch.float64).to(model.dtype).cuda()
    c = None
    if model.context_features:
        c = torch.randn(rows, model.context_features, generator=gen, dtype=torch.float64).to(model.dtype).cuda()
    return x, c


def _latency_ms(fn, x, c, calls: int = 200) -> float:
    times = []
    for i in range(calls + 10):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(x, c)
        torch.cuda.synchronize()
        if i >= 10:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-dir", type=Path, default=Path("models"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("cuda_check: torch sees no CUDA device", file=sys.stderr)
        return 2
    repo = ModelRepository(args.model_dir)
    report: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "models": {}}
    ok = True
    with torch.inference_mode():
        for name in repo.names():
            model = repo.load(name, device="cuda").model
            entry: dict = {}
            traced = trace_passes(model)  # raises TraceMismatch if the CUDA trace differs from eager
            graphed = GraphedPasses(model, traced)
            worst = 0.0
            for i, rows in enumerate(SIZES):
                x, c = _inputs(model, rows, seed=i)
                x_data = x * model.scale + model.shift
                for pass_name, inputs in (("encode", x_data), ("decode", x)):
                    want = getattr(traced, pass_name)(inputs, c)
                    got = getattr(graphed, pass_name)(inputs, c)
                    got_again = getattr(graphed, pass_name)(inputs, c)  # a replay, not the capture
                    diff = float(torch.nan_to_num((got_again - want).abs()).max())
                    worst = max(worst, diff)
                    tol = float(torch.finfo(model.dtype).eps) ** 0.5 * max(1.0, float(want.abs().max()))
                    if got.shape != want.shape or diff > tol or not torch.equal(got, got_again):
                        ok = False
                        entry.setdefault("failures", []).append(f"{pass_name} {rows} rows: max |diff| {diff:.3g}")
            entry["graphs_broken"] = graphed.broken
            ok = ok and graphed.broken is None
            entry["max_abs_diff_graphed_vs_traced"] = worst
            x1, c1 = _inputs(model, 1, seed=99)
            eager = EagerPasses(model)
            entry["one_row_encode_ms"] = {
                "eager": _latency_ms(eager.encode, x1, c1),
                "traced": _latency_ms(traced.encode, x1, c1),
                "graphed": _latency_ms(graphed.encode, x1, c1),
            }
            entry["one_row_decode_ms"] = {
                "eager": _latency_ms(eager.decode, x1, c1),
                "traced": _latency_ms(traced.decode, x1, c1),
                "graphed": _latency_ms(graphed.decode, x1, c1),
            }
            report["models"][name] = entry
    report["ok"] = ok
    text = json.dumps(report, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
