"""Position ids for the answer: natural, or aligned with the image grid.

A full-length answer writes cell k at a fixed distance from image token k, so a small model
can learn to copy labels with one relative-position attention pattern. An R-RLE answer loses
that alignment: where a row's runs sit in the text depends on every earlier count. The
``grid`` scheme restores it without changing a single character of the answer: a descriptor
token's rotary position is that of ``<seg>`` plus the number of grid cells the answer covers
once the token is read. The token that must name the next label, or the length of the run
starting at cell k, then sits exactly where a full-length answer about cell k would.

Both the trainer and the backend call :class:`AnswerPositions`, so the two cannot disagree.
This module imports no torch.
"""

from __future__ import annotations

import copy
import re

from ..descriptors.codec import CLOSE_TAG, OPEN_TAG

SCHEMES = ("natural", "grid")
FORMATS = ("rrle", "full")  # the formats whose covered cells the grid scheme counts
# Every count written so far, a half-written run included (`others *13|` before its space): not
# codec.split_run, which reads whole runs. The bundled models were trained on this reading.
_COUNT = re.compile(r"\*\s*(\d+)")


class _Coverage:
    """:func:`cells_covered` of a body fed a piece at a time: a finished row is counted once, so a
    decode step reads only the row being written."""

    def __init__(self, width: int, height: int, fmt: str):
        if fmt not in FORMATS:
            raise ValueError(f"grid positions support the rrle and full formats, not {fmt!r}")
        self.width, self.height, self.fmt = width, height, fmt
        self.finished = 0  # rrle: rows ended by a line break; full: cells ended by a separator
        self.row = ""  # rrle: the row being written

    def feed(self, piece: str) -> int:
        if self.fmt == "rrle":
            *ended, self.row = (self.row + piece).split("\n")
            self.finished += len(ended)
            current = sum(int(n) for n in _COUNT.findall(self.row))
            covered = self.finished * self.width + min(current, self.width)
        else:
            self.finished += piece.count("|") + piece.count("\n")
            covered = self.finished
        return min(covered, self.width * self.height)


def cells_covered(body: str, width: int, height: int, fmt: str) -> int:
    """How many grid cells (row-major) a partial descriptor body has finished describing."""
    return _Coverage(width, height, fmt).feed(body)


class AnswerPositions:
    """The rotary position of each answer token, fed one growing answer text at a time (each
    text extends the one before; only what it adds is read)."""

    def __init__(self, start: int, grid: int, fmt: str, scheme: str = "natural"):
        if scheme not in SCHEMES:
            raise ValueError(f"unknown position scheme {scheme!r}; expected one of {SCHEMES}")
        self.grid, self.fmt, self.scheme = grid, fmt, scheme
        self.next = start  # natural position of the next token
        self.anchor: int | None = None  # position of <seg>, once it has been written
        self._read = 0  # the body is counted up to here
        self._closed = False  # </seg> has been written: natural positions again
        self._coverage = _Coverage(grid, grid, fmt) if scheme == "grid" else None

    def fork(self) -> AnswerPositions:
        """A copy that can place tokens ahead without changing this one."""
        twin = copy.copy(self)
        twin._coverage = copy.copy(self._coverage)
        return twin

    def advance(self, text: str) -> int:
        """Position of the token whose arrival made the answer read ``text``."""
        position = self.next
        if self.scheme == "grid" and not self._closed:
            if self.anchor is None:
                opened = text.find(OPEN_TAG)
                if opened >= 0:
                    self.anchor, self._read = position, opened + len(OPEN_TAG)
            elif CLOSE_TAG in text[max(0, self._read - len(CLOSE_TAG) + 1):]:
                self._closed = True
            else:
                position = self.anchor + self._coverage.feed(text[self._read:])
                self._read = len(text)
        self.next = position + 1
        return position
