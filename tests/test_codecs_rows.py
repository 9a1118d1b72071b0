"""Rows of numbers from parsed bodies (service.http.codecs.rows), in process: values, statuses, messages.

Every check calls :func:`rows_array` / :func:`describe_names` directly on the values a JSON or
binary body parses to, and asserts the array it returns or the answer of the domain error it
raises (:class:`~service.serving.errors.InvalidInput` and its subclasses), as the status table
:data:`~service.http.problems.DOMAIN_ANSWERS` makes it: status, ``type`` slug, detail and the
``errors`` locations - the same answers the API gives over HTTP.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import pytest

from service.http.codecs.rows import describe_names, rows_array
from service.http.problems import MAX_ERRORS, Problem, domain_problem
from service.serving.errors import InvalidInput

NAMES = ["x0", "x1"]


def problem(call: Callable[[], Any]) -> Problem:
    with pytest.raises(InvalidInput) as raised:
        call()
    answer = domain_problem(raised.value, None)
    assert answer is not None
    return answer


def locs(p: Problem) -> list[list[Any]]:
    assert p.errors is not None
    return [e["loc"] for e in p.errors]


# -- names ---------------------------------------------------------------------------------------
def test_describe_names_in_full_up_to_eight_then_a_short_range() -> None:
    assert describe_names(["x0", "x1"]) == "['x0', 'x1']"
    eight = [f"f{i}" for i in range(8)]
    assert describe_names(eight) == "[" + ", ".join(repr(n) for n in eight) + "]"
    assert describe_names([f"pixel{i}" for i in range(64)]) == "['pixel0', 'pixel1', ..., 'pixel63']"


# -- what is accepted ----------------------------------------------------------------------------
def test_rows_become_float64_exactly() -> None:
    got = rows_array([[0.5, 1], [-2.25, 3e-300]], NAMES, "inputs")
    assert got.dtype == np.float64 and got.shape == (2, 2)
    np.testing.assert_array_equal(got, np.array([[0.5, 1.0], [-2.25, 3e-300]]))


def test_booleans_count_as_one_and_zero() -> None:
    got = rows_array([[True, 0.5], [False, 2]], NAMES, "context")
    np.testing.assert_array_equal(got, [[1.0, 0.5], [0.0, 2.0]])


def test_records_are_put_in_the_names_order_whatever_the_key_order() -> None:
    got = rows_array([{"x1": 2.0, "x0": 1.0}, {"x0": -1, "x1": 0.25}], NAMES, "inputs")
    np.testing.assert_array_equal(got, [[1.0, 2.0], [-1.0, 0.25]])
    one = rows_array([{"only": 4}], ["only"], "inputs")
    np.testing.assert_array_equal(one, [[4.0]])


def test_single_row_ok_takes_a_bare_row_or_record_as_one_row() -> None:
    np.testing.assert_array_equal(rows_array([1.5, 2], NAMES, "context", single_row_ok=True), [[1.5, 2.0]])
    np.testing.assert_array_equal(rows_array({"x1": 3, "x0": 4}, NAMES, "context", single_row_ok=True), [[4.0, 3.0]])
    # a list of rows is still a list of rows
    assert rows_array([[1, 2], [3, 4]], NAMES, "context", single_row_ok=True).shape == (2, 2)


def test_integers_beyond_int64_are_read_value_by_value() -> None:
    got = rows_array([[2**70, 1]], NAMES, "inputs")
    assert got[0, 0] == float(2**70) and got[0, 1] == 1.0


def test_numpy_arrays_of_any_real_dtype_become_float64() -> None:
    for array in (np.array([[1, 2]], dtype=np.int16), np.array([[True, False]]),
                  np.array([[0.5, -1.5]], dtype=np.float16), np.array([[0.1, 0.2]], dtype=np.float32)):
        got = rows_array(array, NAMES, "inputs")
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, array.astype(np.float64))
    flat = rows_array(np.array([1.0, 2.0]), NAMES, "context", single_row_ok=True)
    assert flat.shape == (1, 2)


# -- what is refused -----------------------------------------------------------------------------
def test_not_a_list_is_422_naming_the_json_type() -> None:
    p = problem(lambda: rows_array("0.5, 1.0", NAMES, "inputs"))
    assert (p.status, p.slug) == (422, "invalid-field")
    assert p.detail == "inputs must be a list of rows, got string '0.5, 1.0'"
    assert locs(p) == [["body", "inputs"]]
    assert problem(lambda: rows_array({"x0": 1}, NAMES, "inputs")).detail == "inputs must be a list of rows, got an object"
    assert problem(lambda: rows_array(None, NAMES, "latents")).detail == "latents must be a list of rows, got null"


def test_no_rows_is_422() -> None:
    p = problem(lambda: rows_array([], NAMES, "inputs"))
    assert (p.status, p.detail) == (422, "inputs must hold at least one row")
    assert problem(lambda: rows_array(np.zeros((0, 2)), NAMES, "inputs")).status == 422


def test_more_rows_than_the_server_takes_is_413() -> None:
    p = problem(lambda: rows_array([[0, 0]] * 3, NAMES, "inputs", max_rows=2))
    assert (p.status, p.slug) == (413, "content-too-large")
    assert p.detail == "inputs has 3 rows; this server takes at most 2 per request"
    assert rows_array([[0, 0]] * 2, NAMES, "inputs", max_rows=2).shape == (2, 2)
    q = problem(lambda: rows_array(np.zeros((5, 2)), NAMES, "inputs", max_rows=4))
    assert (q.status, q.detail) == (413, "inputs has 5 rows; this server takes at most 4 per request")


def test_a_flat_list_of_numbers_says_to_wrap_rows_in_brackets() -> None:
    p = problem(lambda: rows_array([0.5, 1.0], NAMES, "inputs"))
    assert (p.status, p.slug) == (400, "invalid-input")
    assert p.detail == ("inputs: expected a list of rows, got a flat list of numbers; wrap each row in brackets, "
                        "e.g. [[..., ...]]")
    wide = problem(lambda: rows_array([1, 2, 3, 4, 5], ["a", "b", "c", "d"], "inputs"))
    assert wide.detail.endswith("e.g. [[..., ..., ..., ...]]")


def test_every_row_of_the_wrong_width_names_the_features() -> None:
    p = problem(lambda: rows_array([[1, 2, 3], [4, 5, 6]], NAMES, "inputs"))
    assert (p.status, p.slug) == (400, "invalid-input")
    assert p.detail == "inputs: each row has 3 values; the model has 2 features ['x0', 'x1']"
    c = problem(lambda: rows_array([[1]], NAMES, "context"))
    assert c.detail == "context: each row has 1 values; the model has 2 context features ['x0', 'x1']"
    a = problem(lambda: rows_array(np.zeros((2, 3)), NAMES, "inputs"))
    assert a.detail == "inputs: each row has 3 values; the model has 2 features ['x0', 'x1']"


def test_ragged_rows_name_the_row() -> None:
    p = problem(lambda: rows_array([[1, 2], [1, 2, 3], [4, 5]], NAMES, "inputs"))
    assert (p.status, p.slug) == (400, "invalid-input")
    assert p.detail == "inputs row 1: row has 3 values; the model has 2 features ['x0', 'x1']"
    assert locs(p) == [["body", "inputs", 1]]


def test_wrong_types_in_cells_are_422_and_null_is_400() -> None:
    p = problem(lambda: rows_array([[1, "a"]], NAMES, "inputs"))
    assert (p.status, p.slug) == (422, "invalid-field")
    assert p.detail == "inputs row 0 column 1: expected a number, got string 'a'"
    assert locs(p) == [["body", "inputs", 0, 1]]
    n = problem(lambda: rows_array([[1, 2], [None, 3]], NAMES, "inputs"))
    assert (n.status, n.slug) == (400, "invalid-input")
    assert n.detail == "inputs row 1 column 0: null is not a number: data must be finite numbers"


def test_a_row_that_is_not_a_list_is_named() -> None:
    number = problem(lambda: rows_array([[1, 2], 3], NAMES, "inputs"))
    assert number.status == 400
    assert number.detail == "inputs row 1: expected a row (a list of 2 numbers), got a number"
    mixed = problem(lambda: rows_array([[1, 2], {"x0": 1, "x1": 2}], NAMES, "inputs"))
    assert mixed.status == 422
    assert mixed.detail == "inputs row 1: expected a list of numbers (rows and records cannot be mixed)"


def test_non_finite_values_are_400_with_every_place_listed() -> None:
    p = problem(lambda: rows_array([[1.0, float("inf")], [float("nan"), 0.0]], NAMES, "inputs"))
    assert (p.status, p.slug) == (400, "invalid-input")
    assert p.detail == "inputs row 0 column 1: inf is not finite: data must be finite numbers (2 non-finite values)"
    assert locs(p) == [["body", "inputs", 0, 1], ["body", "inputs", 1, 0]]
    r = problem(lambda: rows_array([{"x0": 0.0, "x1": float("-inf")}], NAMES, "inputs"))
    assert locs(r) == [["body", "inputs", 0, "x1"]]
    assert r.detail == "inputs row 0 key 'x1': -inf is not finite: data must be finite numbers (1 non-finite values)"
    a = problem(lambda: rows_array(np.array([[0.0, 1.0], [np.nan, 2.0]], dtype=np.float32), NAMES, "inputs"))
    assert a.status == 400 and locs(a) == [["body", "inputs", 1, 0]]
    assert a.detail.startswith("inputs row 1 column 0: nan is not finite")


def test_records_with_unknown_and_missing_names_list_both() -> None:
    p = problem(lambda: rows_array([{"x0": 1, "x1": 2}, {"x0": 1, "y": 2}], NAMES, "inputs"))
    assert (p.status, p.slug) == (400, "invalid-input")
    assert p.detail == ("inputs row 1 key 'y': unknown feature name 'y'; the names are ['x0', 'x1'] "
                        "(2 problems in inputs)")
    assert locs(p) == [["body", "inputs", 1, "y"], ["body", "inputs", 1, "x1"]]
    assert p.errors is not None and p.errors[1]["msg"] == "missing feature 'x1'"


def test_records_and_rows_cannot_be_mixed() -> None:
    p = problem(lambda: rows_array([{"x0": 1, "x1": 2}, [1, 2]], NAMES, "inputs"))
    assert p.status == 422
    assert p.detail == "inputs row 1: expected an object keyed by feature name (as row 0 is), got a list"


def test_many_problems_are_cut_to_max_errors_and_counted() -> None:
    count = MAX_ERRORS + 5
    p = problem(lambda: rows_array([[None, 1.0]] * count, NAMES, "inputs"))
    assert p.errors is not None and len(p.errors) == MAX_ERRORS
    assert p.detail.endswith(f"({count} problems in inputs; the first {MAX_ERRORS} are listed)")
    assert locs(p)[-1] == ["body", "inputs", MAX_ERRORS - 1, 0]


def test_numbers_too_large_for_a_float_are_400() -> None:
    p = problem(lambda: rows_array([[10**400, 1]], NAMES, "inputs"))
    assert (p.status, p.slug) == (400, "invalid-input")
    assert p.detail.startswith("inputs could not be read as numbers: ")


def test_arrays_of_the_wrong_rank_or_dtype_are_400() -> None:
    rank = problem(lambda: rows_array(np.zeros((2, 2, 2)), NAMES, "inputs"))
    assert (rank.status, rank.detail) == (400, "inputs must be 2-D (rows, 2), got shape (2, 2, 2)")
    flat = problem(lambda: rows_array(np.zeros(2), NAMES, "inputs"))  # a bare row only where single_row_ok
    assert flat.detail == "inputs must be 2-D (rows, 2), got shape (2,)"
    text = problem(lambda: rows_array(np.array([["a", "b"]]), NAMES, "inputs"))
    assert (text.status, text.detail) == (400, "inputs must hold numbers, got dtype <U1")
