"""Every consumer of an operation reads :data:`service.serving.table.TABLE`.

The v1 endpoints, the operation router's matching, the ``.npy`` answers' main field, the documented
request / answer / parameter models, the OpenAPI paths, ``/v2``'s outputs, the in-process runner
and the math in :mod:`service.serving.operations` all give the table's operations and fields.
The client distribution does not import the service (by design); its methods are checked here
against the table instead.
"""

from __future__ import annotations

import inspect

from flowserve_client.calls import Operations

from service.http import create_app
from service.http.codecs import binary
from service.http.router import match_operation
from service.http.routes import v2
from service.http.routes.operations import ENDPOINTS
from service.http.schemas import PARAMS, REQUEST_MODELS, RESPONSE_MODELS
from service.serving import operations
from service.serving.batching.config import OUTPUTS as PASS_OUTPUTS
from service.serving.inprocess import LocalModel
from service.serving.table import BY_NAME, NAMES, TABLE
from service.settings import load_settings


def test_the_table_names_each_operation_once() -> None:
    assert len(NAMES) == len(TABLE) == len(set(NAMES)) == 6
    for op in TABLE:
        assert op.main_answer in op.answer_fields, op.name
        assert BY_NAME[op.name] is op


def test_the_math_is_the_function_named_after_each_operation() -> None:
    for op in TABLE:
        assert op.compute is getattr(operations, op.name) and inspect.iscoroutinefunction(op.compute)


def test_internal_names_are_the_passes_outputs_or_the_operations_own() -> None:
    own = {"score", "p_value", "is_anomaly", "contributions"}  # computed by score / explain, not by a pass
    for op in TABLE:
        for _, internal in op.fields:
            assert internal in PASS_OUTPUTS[op.pass_] or internal in own or (op.name == "sample" and internal == "z")


def test_v1_endpoints_router_and_binary_answers_follow_the_table() -> None:
    assert tuple(e.name for e in ENDPOINTS) == NAMES
    assert binary.MAIN_FIELD == {op.name: op.main_answer for op in TABLE}
    for op in TABLE:
        assert match_operation(f"/v1/models/m/{op.name}")[2].op is op
        assert match_operation(f"/v1/models/m/versions/3/{op.name}")[2].op is op
    assert match_operation("/v1/models/m/sixth") is None


def test_documented_models_cover_the_table() -> None:
    assert set(PARAMS) == set(REQUEST_MODELS) == set(RESPONSE_MODELS) == set(NAMES)
    for op in TABLE:
        answer = set(RESPONSE_MODELS[op.name].model_fields)
        assert set(op.answer_fields) <= answer, op.name
        request = set(REQUEST_MODELS[op.name].model_fields)
        assert set(op.arrays) <= request and set(PARAMS[op.name].model_fields) <= request, op.name


def test_openapi_paths_are_the_tables() -> None:
    doc = create_app(load_settings(device="cpu")).openapi()
    ops = {path.rsplit("/", 1)[1] for path in doc["paths"] if path.startswith("/v1/models/{name}/")
           and "post" in doc["paths"][path]}
    assert ops == set(NAMES)
    for op in TABLE:
        post = doc["paths"][f"/v1/models/{{name}}/{op.name}"]["post"]
        assert post["summary"] == op.summary
        assert ("409" in post["responses"]) == op.needs_calibration
        assert post["requestBody"]["required"] == (op.main_input is not None)


def test_v2_outputs_are_fields_of_table_operations() -> None:
    assert set(v2.OUTPUTS) | set(v2.SCORE_OUTPUTS) == set(v2.OUTPUT_OPERATIONS)
    for name, op in v2.OUTPUT_OPERATIONS.items():
        assert name in op.answer_fields or (name == "threshold" and op.name == "score"), name
        assert (name in v2.SCORE_OUTPUTS) == op.needs_calibration


def test_in_process_runner_and_client_have_every_operation() -> None:
    for op in TABLE:
        assert callable(getattr(LocalModel, op.name)), op.name
        # the client keeps its own list (it does not import the service): it must still have every one
        assert callable(getattr(Operations, op.name)), op.name
