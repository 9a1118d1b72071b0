"""A model from the repository, run in this process: what the CLI uses when no ``--url`` is given.

:class:`LocalModel` answers the operations of API.md on numpy rows through the server's own code
without its event loop or worker thread: one :func:`service.serving.batching.compute.run_pass` per call
(the torch call the device worker makes for a batch), the latents of
:meth:`DensityModel.draw_latents` for ``sample``, and :func:`service.serving.operations.anomaly_scores`
for ``score``. So it gives the server's numbers; the caller chooses the chunks of rows (and shows
progress over them). Results are float64 arrays, as the client returns them.

Its public methods are an edge, like the HTTP API's: they check their arguments with the API's
own rules (:mod:`service.serving.validation`; a refusal is an
:class:`~service.serving.errors.InvalidInput`, a ``ValueError`` naming the field, row and column),
then compute on the checked arrays without checking again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.model.artifact import LoadedArtifact
from service.serving.batching import Pass
from service.serving.batching.compute import run_pass
from service.serving.batching.jobs import unpack
from service.serving import validation
from service.serving.operations import anomaly_scores
from service.serving.registry import ModelKey, ServedModel
from service.serving.table import FORWARD, INVERSE, LOG_PROB, SAMPLE
from service.model.repository import ModelRepository

__all__ = ["LocalModel"]


class LocalModel:
    """One loaded model version and its operations on numpy rows ``(B, D)`` (context ``(B, C)``)."""

    def __init__(self, artifact: LoadedArtifact) -> None:
        self.served = ServedModel(artifact, ModelKey(artifact.name, artifact.version, 0))

    @classmethod
    def load(cls, model_dir: Path | str, name: str, version: int | None = None,
             device: torch.device | str = "cpu") -> "LocalModel":
        """Load and verify ``name`` (its latest version unless ``version``) from the repository ``model_dir``."""
        return cls(ModelRepository(model_dir).load(name, version, device=device))

    # -- metadata ---------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.served.name

    @property
    def version(self) -> int:
        return self.served.version

    @property
    def feature_names(self) -> list[str]:
        return list(self.served.feature_names)

    @property
    def context_names(self) -> list[str]:
        return list(self.served.context_names)

    # -- the edge: checks (service.serving.validation), then the pass on checked arrays ----------
    def _rows(self, rows: np.ndarray, field: str) -> np.ndarray:
        return validation.array_rows(np.asarray(rows), self.served.feature_names, field)

    def _context(self, context: np.ndarray | None, rows: int) -> np.ndarray | None:
        """``context`` as ``rows`` checked rows (one row stands for all and is repeated), or ``None``."""
        served = self.served
        if not validation.takes_context(served.name, served.context_names, context is not None, broadcast=True):
            return None
        ctx = validation.array_rows(np.atleast_2d(np.asarray(context)), served.context_names, "context")
        ctx = validation.context_rows(ctx, rows, broadcast=True)
        return np.repeat(ctx, rows, axis=0) if ctx.shape[0] != rows else ctx

    def _checked(self, rows: np.ndarray, context: np.ndarray | None, field: str) -> tuple[np.ndarray, np.ndarray | None]:
        block = self._rows(rows, field)
        return block, self._context(context, block.shape[0])

    def _pass(self, pass_: Pass, block: np.ndarray, ctx: np.ndarray | None) -> dict[str, np.ndarray]:
        """One pass on checked rows and context."""
        packed = run_pass(self.served.model, pass_, [block], None if ctx is None else [ctx])
        return {k: v.astype(np.float64) for k, v in unpack(packed, pass_, self.served.features).items()}

    def _encode(self, inputs: np.ndarray, context: np.ndarray | None) -> dict[str, np.ndarray]:
        return self._pass(Pass.ENCODE, *self._checked(inputs, context, "inputs"))

    # -- operations -------------------------------------------------------------------------------
    def log_prob(self, inputs: np.ndarray, context: np.ndarray | None = None) -> np.ndarray:
        """``log p(x)`` of each row."""
        return LOG_PROB.select(self._encode(inputs, context))["log_prob"]

    def inverse(self, inputs: np.ndarray, context: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``x → z``: ``latents``, ``log_det``, ``base_log_prob`` and ``log_prob = base_log_prob + log_det``."""
        return INVERSE.select(self._encode(inputs, context))

    def forward(self, latents: np.ndarray, context: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``z → x``: ``outputs`` and the log-density of each output."""
        return FORWARD.select(self._pass(FORWARD.pass_, *self._checked(latents, context, "latents")))

    def score(self, inputs: np.ndarray, context: np.ndarray | None = None,
              alpha: float | None = None) -> dict[str, Any]:
        """``log_prob``, ``score``, conformal ``p_value``, ``is_anomaly`` and ``threshold``, as ``/score``."""
        if self.served.calibration is None:
            anomaly_scores(np.empty(0), self.served, alpha)  # raises NoCalibration, naming the model
        validation.check_alpha(alpha)
        return anomaly_scores(self.log_prob(inputs, context), self.served, alpha)

    def explain(self, inputs: np.ndarray, context: np.ndarray | None = None) -> dict[str, Any]:
        """Per-feature ``contributions``, ``log_prob``, ``method`` and ``exact``, as ``/explain``."""
        import asyncio

        from service.serving.operations import explain

        block, ctx = self._checked(inputs, context, "inputs")
        return asyncio.run(explain(_Direct(self), self.served, block.astype(np.float32),
                                   None if ctx is None else ctx.astype(np.float32)))

    def sample(self, n: int, seed: int | None = None, temperature: float = 1.0,
               context: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``n`` rows as ``/sample`` draws them: ``samples``, ``log_prob`` and ``latents``.

        ``context`` is one row (used for every sample) or ``n`` rows; the same ``seed`` gives the
        same rows as the server.
        """
        validation.check_sample(n, temperature, seed)
        ctx = self._context(context, n)
        z = self.served.model.draw_latents(n, seed, temperature).numpy()
        out = self._pass(SAMPLE.pass_, z.astype(np.float64), ctx)
        return SAMPLE.select({**out, "z": z.astype(np.float64)})


class _Direct:
    """The worker's ``submit`` for :meth:`LocalModel.explain`: the pass run at once, in this thread, on
    the rows :func:`~service.serving.operations.explain` made from checked ones (not checked again)."""

    def __init__(self, local: LocalModel) -> None:
        self.local = local

    async def submit(self, key: Any, model: Any, pass_: Pass, rows: np.ndarray, context: np.ndarray | None = None,
                     deadline: float | None = None) -> dict[str, np.ndarray]:
        return self.local._pass(pass_, rows, context)
