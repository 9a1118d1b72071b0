"""Torch work off the worker thread runs on one intra-op thread and leaves the setting as it was."""

from __future__ import annotations

import threading

import pytest
import torch

from service.accel.threads import one_intra_op_thread
from service.serving.registry import ModelRegistry
from service.model.repository import ModelRepository
from tests.server import ROOT


def test_one_intra_op_thread_inside_and_restored_after_even_on_error() -> None:
    before = torch.get_num_threads()
    with one_intra_op_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="boom"), one_intra_op_thread():
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_loading_a_model_in_a_helper_thread_runs_on_one_thread_and_restores_it() -> None:
    seen: dict[str, object] = {}
    registry = ModelRegistry(ModelRepository(ROOT / "models"), "cpu", ["moons"])
    torch_load = registry.repository.load

    def load(*args: object, **kwargs: object) -> object:  # the real loader, observed from inside
        seen["threads_while_loading"] = torch.get_num_threads()
        return torch_load(*args, **kwargs)

    registry.repository.load = load  # type: ignore[method-assign]

    def helper() -> None:
        torch.set_num_threads(2)
        served = registry.load_version("moons", 1)
        seen["threads_after"] = torch.get_num_threads()
        seen["traced"] = served.model.runner is not None

    thread = threading.Thread(target=helper)
    thread.start()
    thread.join()
    assert seen == {"threads_while_loading": 1, "threads_after": 2, "traced": True}
