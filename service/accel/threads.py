"""Torch work off the device worker's thread runs on one intra-op thread.

Every thread that starts an OpenMP parallel region (torch splits large element-wise ops and
matrix products over its intra-op threads) keeps its own pool of OpenMP threads for the life of
the process. Once the pooled threads outnumber the cores, libgomp stops spinning between regions,
and every parallel region of the device worker then waits for a futex wake-up of its helpers. On
the 2-core VM, a 100,000-row moons request computed in 0.38-0.50 s while the model loader's and the
latent sampler's threads held pools, against 0.27-0.38 s (as fast as in-process) without them
(bench/FINDINGS.md §4). So the model loader (:mod:`service.serving.registry`) and the per-request latent
draw (:mod:`service.serving.operations`) run their torch work inside :func:`one_intra_op_thread`, and only
the device worker uses torch's threads.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Iterator

import torch

__all__ = ["one_intra_op_thread", "torch_threads"]


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run the block on ``count`` torch intra-op threads (``None``: unchanged), restored after.

    ``torch.set_num_threads`` sets the calling thread's OpenMP and MKL thread counts and the
    default that threads which have not run torch yet start from; the device worker sets its own
    count before every batch that needs another one (:mod:`service.serving.batching.compute`).
    """
    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def one_intra_op_thread() -> AbstractContextManager[None]:
    """Run the block on one torch intra-op thread (the calling thread's setting; restored after)."""
    return torch_threads(1)
