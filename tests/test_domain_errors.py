"""One error family, one status table, one validation point.

- Every domain error class (every subclass of :class:`FlowserveError` in the package) has its answer
  in :data:`DOMAIN_ANSWERS` (its own row, or its nearest base's); the rows for lookups, readiness,
  administration and API keys give the answers the HTTP tests pin (status, slug, detail, headers).
- Input is checked once, at the edge (:mod:`service.serving.validation`): the in-process runner
  refuses bad arrays with the same :class:`InvalidInput` (and text) as the HTTP codec, and nothing
  inside checks them again except the model's shape contract, whose violation
  (:class:`ContractError`) is a logged 500 ``internal-error``, never a 400.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

import service
from service.http import problems
from service.http.auth import AdminDisabled, Forbidden, Unauthorized
from service.http.codecs.rows import rows_array
from service.http.problems import DOMAIN_ANSWERS, domain_problem
from service.model.contract import ContractError, check_rows
from service.serving.administration import InvalidName, LoadFailed, NotInRepository, StillLoading
from service.serving.errors import FlowserveError, InvalidField, InvalidInput, NotReady, TooManyRows
from service.serving.inprocess import LocalModel
from service.serving.registry import ModelNotFound, ModelNotReady, ModelState, VersionNotFound
from tests.server import served_in_process


class _Settings:
    max_queue_rows = 100
    request_timeout_s = 2.5


def _all_domain_errors() -> set[type[BaseException]]:
    for info in pkgutil.walk_packages(service.__path__, "service."):
        if not info.name.endswith(".__main__"):  # it runs the command line
            importlib.import_module(info.name)
    found: set[type[BaseException]] = set()
    todo: list[type[BaseException]] = [FlowserveError]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub.__module__.startswith("service.") and sub not in found:
                found.add(sub)
                todo.append(sub)
    return found


def test_every_domain_error_has_an_answer_in_the_table() -> None:
    classes = _all_domain_errors()
    assert {InvalidInput, Unauthorized, ModelNotFound, StillLoading, LoadFailed} <= classes
    bases = {cls for cls in classes if cls.__subclasses__()}
    leaves = classes - bases
    missing = sorted(cls.__qualname__ for cls in leaves
                     if not any(base in DOMAIN_ANSWERS for base in inspect.getmro(cls)))
    assert missing == [], f"domain errors without a row in DOMAIN_ANSWERS: {missing}"
    assert all(issubclass(cls, FlowserveError) for cls in DOMAIN_ANSWERS)


def test_the_app_handles_every_row() -> None:
    app = FastAPI()
    problems.install(app)
    assert set(DOMAIN_ANSWERS) <= set(app.exception_handlers)


@pytest.mark.parametrize("exc, status, slug, detail, headers", [
    (Unauthorized("no Authorization header: this endpoint needs a key", "flowserve"), 401, "unauthorized",
     "no Authorization header: this endpoint needs a key", {"WWW-Authenticate": 'Bearer realm="flowserve"'}),
    (Forbidden("the key is not one of this server's API keys"), 403, "forbidden",
     "the key is not one of this server's API keys", {}),
    (AdminDisabled("administration is disabled"), 403, "admin-disabled", "administration is disabled", {}),
    (ModelNotFound("nope", ["moons"]), 404, "model-not-found", "no model named 'nope'; this server has ['moons']", {}),
    (VersionNotFound("moons", "7", [1, 2]), 404, "version-not-found",
     "model 'moons' has no version '7'; its versions are [1, 2]", {}),
    (ModelNotReady("moons", ModelState.LOADING), 503, "not-ready", "model 'moons' is still loading",
     {"Retry-After": "5"}),
    (ModelNotReady("moons", ModelState.FAILED, "bad file"), 503, "not-ready", "model 'moons' failed to load: bad file",
     {"Retry-After": "30"}),
    (NotReady("the server is starting"), 503, "not-ready", "the server is starting", {"Retry-After": "5"}),
    (StillLoading("model 'm' is still loading"), 503, "not-ready", "model 'm' is still loading", {"Retry-After": "5"}),
    (InvalidName("bad name"), 400, "invalid-input", "bad name", {}),
    (NotInRepository("m", ["moons"]), 404, "model-not-found",
     "the model repository has no model named 'm'; it has ['moons']", {}),
    (LoadFailed("m", "broken", [1]), 409, "load-failed", "model 'm' failed to load: broken; still serving versions [1]",
     {}),
    (InvalidInput("inputs: wrong"), 400, "invalid-input", "inputs: wrong", {}),
    (InvalidField("inputs must hold at least one row"), 422, "invalid-field", "inputs must hold at least one row", {}),
    (TooManyRows("inputs has 9 rows"), 413, "content-too-large", "inputs has 9 rows", {}),
])
def test_the_rows_of_lookups_readiness_admin_keys_and_input(exc: Exception, status: int, slug: str, detail: str,
                                                            headers: dict[str, str]) -> None:
    problem = domain_problem(exc, _Settings(), _Settings.request_timeout_s)
    assert problem is not None
    assert (problem.status, problem.slug, problem.detail, problem.headers) == (status, slug, detail, headers)


def test_lookup_and_admin_answers_name_the_path_parameter() -> None:
    body = domain_problem(VersionNotFound("moons", "7", [1]), _Settings()).body("/v1/models/moons/versions/7")
    assert body["errors"] == [{"loc": ["path", "version"], "msg": "unknown version"}]
    load_failed = domain_problem(LoadFailed("m", "broken", [1, 2]), _Settings()).body()
    assert load_failed["serving"] == [1, 2]


# -- one validation point ------------------------------------------------------------------------
def test_the_in_process_runner_refuses_with_the_edge_s_rules(model_repo: Path) -> None:
    moons, cond = LocalModel.load(model_repo, "moons"), LocalModel.load(model_repo, "cond")
    wide = np.zeros((3, 5))
    with pytest.raises(InvalidInput) as local:
        moons.log_prob(wide)
    with pytest.raises(InvalidInput) as http:  # the codec, on the .npy body of the same rows
        rows_array(wide, moons.feature_names, "inputs")
    assert str(local.value) == str(http.value) == "inputs: each row has 5 values; the model has 2 features ['x0', 'x1']"
    nan = np.array([[0.0, 1.0], [np.nan, 0.5]])
    with pytest.raises(InvalidInput, match=r"inputs row 1 column 0: nan is not finite"):
        moons.inverse(nan)
    with pytest.raises(InvalidInput, match="'moons' is not conditional and takes no context"):
        moons.log_prob(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(InvalidInput, match="'cond' is conditional: context with 3 values"):
        cond.log_prob(np.zeros((2, 2)))
    with pytest.raises(InvalidInput, match="context has 2 rows; expected 1 or 3"):
        cond.log_prob(np.zeros((3, 2)), np.zeros((2, 3)))
    with pytest.raises(InvalidField, match="must hold at least one row"):
        moons.log_prob(np.zeros((0, 2)))
    # the parameters' rules are the v1 schemas' (service.serving.parameters), in the same words as over HTTP
    with pytest.raises(InvalidField, match="^n: Input should be greater than or equal to 1$"):
        moons.sample(0)
    with pytest.raises(InvalidField, match="^temperature: Input should be greater than 0$"):
        moons.sample(3, temperature=0.0)
    with pytest.raises(InvalidField, match="^seed: Input should be less than or equal to 18446744073709551615$"):
        moons.sample(3, seed=1 << 64)
    with pytest.raises(InvalidField, match="^alpha: Input should be less than 1$") as refused:
        moons.score(np.zeros((2, 2)), alpha=1.5)
    assert refused.value.errors == [{"loc": ["body", "alpha"], "msg": "Input should be less than 1"}]
    # what passes the edge is computed: one context row stands for all
    assert cond.log_prob(np.zeros((3, 2)), np.zeros((1, 3))).shape == (3,)


def test_the_model_contract_is_an_assertion_not_a_value_error() -> None:
    check_rows(2, 0, (4, 2), None)
    check_rows(2, 3, (4, 2), (4, 3))
    for rows, context, message in [((4, 3), None, r"shape \(n, 2\)"), ((4,), None, r"shape \(n, 2\)"),
                                   ((4, 2), (4, 1), "takes no context")]:
        with pytest.raises(ContractError, match=message):
            check_rows(2, 0, rows, context)
    with pytest.raises(ContractError, match="needs 3 context features"):
        check_rows(2, 3, (4, 2), None)
    assert issubclass(ContractError, AssertionError) and not issubclass(ContractError, ValueError)
    assert domain_problem(ContractError("x"), _Settings()) is None


def test_a_contract_violation_inside_is_a_logged_500_not_a_400(caplog: pytest.LogCaptureFixture) -> None:
    app = FastAPI()
    problems.install(app)

    @app.post("/inside")
    async def inside() -> Any:  # as the worker refuses rows the edge should have refused
        check_rows(2, 0, (4, 3), None)

    with served_in_process(app, ready_path=None) as url, caplog.at_level(logging.ERROR, logger="flowserve.api"):
        r = httpx.post(url + "/inside", timeout=30.0)
    assert r.status_code == 500, r.text
    assert r.json()["type"] == "urn:flowserve:problem:internal-error"
    assert "shape" not in r.text  # the invariant's text stays in the log
    assert any(isinstance(rec.exc_info[1], ContractError) for rec in caplog.records if rec.exc_info)
