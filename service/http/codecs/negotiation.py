"""``Accept`` negotiation (RFC 9110 §12.5.1): which of the media types we offer the client prefers.

Each offered type gets the quality of the most specific range of the header that matches it
(``application/x-npy`` beats ``application/*`` beats ``*/*``); the offered type with the highest
quality above 0 wins. Ties go to the more specific match, then to the range the client listed
first, then to the order of the offer (JSON first). So a missing header, ``*/*`` or
``application/*`` answer JSON; ``application/x-npz, application/json;q=0.5`` answers ``.npz``;
``application/x-npy;q=0`` refuses ``.npy``. When nothing offered is acceptable the answer is 406
(problem+json, which error answers always are).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from service.http.problems import Problem, field_error

__all__ = ["MediaRange", "negotiate", "parse_accept"]


@dataclass(frozen=True)
class MediaRange:
    """One element of an ``Accept`` header: ``type/subtype;q=...``."""

    type: str
    subtype: str
    q: float
    position: int

    def specificity(self, media: str) -> int:
        """How exactly this range names ``media`` (2: exactly, 1: ``type/*``, 0: ``*/*``); -1: not at all."""
        main, _, sub = media.partition("/")
        if self.type == "*":
            return 0
        if self.type != main:
            return -1
        if self.subtype == "*":
            return 1
        return 2 if self.subtype == sub else -1


def _quality(params: list[str]) -> float:
    for param in params:
        key, _, value = param.partition("=")
        if key.strip().lower() == "q":
            try:
                q = float(value.strip())
            except ValueError:
                return 1.0  # a malformed weight is ignored, as most servers do
            return q if 0.0 <= q <= 1.0 else 1.0
    return 1.0


def parse_accept(header: str | None) -> list[MediaRange]:
    """The media ranges of an ``Accept`` header (``*/*`` when it is absent, empty or unreadable)."""
    if header is None or not header.strip():
        return [MediaRange("*", "*", 1.0, 0)]
    ranges = []
    for position, part in enumerate(header.split(",")):
        media, *params = part.split(";")
        media = media.strip().lower()
        if not media:
            continue
        main, slash, sub = media.partition("/")
        if not slash or not main or not sub or (main == "*" and sub != "*"):
            continue  # not a media range: ignored
        ranges.append(MediaRange(main, sub, _quality(params), position))
    return ranges or [MediaRange("*", "*", 1.0, 0)]  # nothing readable: as if absent


def negotiate(header: str | None, offered: Sequence[str]) -> str:
    """The offered media type the ``Accept`` header prefers; 406 when it accepts none of them."""
    ranges = parse_accept(header)
    best: tuple[float, int, int, int] | None = None
    choice = None
    for rank, media in enumerate(offered):
        matches = [(r.specificity(media), r) for r in ranges]
        matches = [(s, r) for s, r in matches if s >= 0]
        if not matches:
            continue
        specificity, match = max(matches, key=lambda m: (m[0], -m[1].position))
        if match.q <= 0.0:
            continue
        key = (match.q, specificity, -match.position, -rank)
        if best is None or key > best:
            best, choice = key, media
    if choice is None:
        raise Problem(406, "not-acceptable",
                      f"nothing this endpoint answers is acceptable (Accept: {header}); it answers "
                      f"{', '.join(offered)}", errors=[field_error(("header", "accept"), "no acceptable media type")])
    return choice
