"""``Accept`` negotiation (service.http.codecs.negotiation), in process: RFC 9110 §12.5.1 preference rules."""

from __future__ import annotations

import pytest

from service.http.codecs.negotiation import MediaRange, negotiate, parse_accept
from service.http.problems import Problem

JSON, NPY, NPZ = "application/json", "application/x-npy", "application/x-npz"
OFFER = [JSON, NPY, NPZ]


@pytest.mark.parametrize("header", [None, "", "   ", "*/*", "application/*", "garbage", "*/json, , ;q=1"])
def test_absent_wildcard_or_unreadable_headers_answer_the_first_offer(header: str | None) -> None:
    assert negotiate(header, OFFER) == JSON
    assert negotiate(header, [NPZ, JSON]) == NPZ  # the offer's order breaks the tie


def test_parse_accept_reads_types_qualities_and_positions() -> None:
    ranges = parse_accept("Application/X-NPY;q=0.4, text/*, */*;q=0.1, nonsense, */bad")
    assert ranges == [MediaRange("application", "x-npy", 0.4, 0), MediaRange("text", "*", 1.0, 1),
                      MediaRange("*", "*", 0.1, 2)]
    assert parse_accept(None) == [MediaRange("*", "*", 1.0, 0)]
    # a malformed or out-of-range weight is ignored (taken as 1), as most servers do
    assert [r.q for r in parse_accept("a/b;q=abc, c/d;q=5, e/f;Q=0.25")] == [1.0, 1.0, 0.25]


def test_specificity_of_a_range() -> None:
    assert MediaRange("application", "x-npy", 1.0, 0).specificity(NPY) == 2
    assert MediaRange("application", "*", 1.0, 0).specificity(NPY) == 1
    assert MediaRange("*", "*", 1.0, 0).specificity(NPY) == 0
    assert MediaRange("text", "*", 1.0, 0).specificity(NPY) == -1
    assert MediaRange("application", "json", 1.0, 0).specificity(NPY) == -1


def test_highest_quality_wins() -> None:
    assert negotiate("application/x-npz, application/json;q=0.5", OFFER) == NPZ
    assert negotiate("application/json;q=0.2, application/x-npy;q=0.9, application/x-npz;q=0.5", OFFER) == NPY


def test_the_most_specific_matching_range_gives_the_quality() -> None:
    # npy gets 0.9 from its own range although application/* says 0.5
    assert negotiate("application/*;q=0.5, application/x-npy;q=0.9", OFFER) == NPY
    # npy is refused by name (q=0), so */* cannot bring it back: JSON although npy is offered first
    assert negotiate("application/x-npy;q=0, */*", [NPY, JSON]) == JSON


def test_equal_quality_goes_to_the_more_specific_then_the_first_listed() -> None:
    assert negotiate("*/*, application/x-npz", OFFER) == NPZ
    assert negotiate("application/x-npy, application/json", OFFER) == NPY
    assert negotiate("application/json, application/x-npy", [NPY, JSON]) == JSON


def test_nothing_acceptable_is_406_naming_the_header_and_the_offer() -> None:
    for header in ("text/html", "application/x-npy;q=0", "application/*;q=0"):
        with pytest.raises(Problem) as raised:
            negotiate(header, [JSON, NPY])
        p = raised.value
        assert (p.status, p.slug) == (406, "not-acceptable")
        assert p.detail == (f"nothing this endpoint answers is acceptable (Accept: {header}); "
                            "it answers application/json, application/x-npy")
        assert p.errors == [{"loc": ["header", "accept"], "msg": "no acceptable media type"}]
