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

from ..descriptors.codec import CLOSE_TAG, OPEN_TAG, RUN_SEP, split_run

SCHEMES = ("natural", "grid")
FORMATS = ("rrle", "full")  # the formats whose covered cells the grid scheme counts


def cells_covered(body: str, width: int, height: int, fmt: str) -> int:
    """How many grid cells (row-major) a partial descriptor body has finished describing."""
    if fmt == "rrle":
        rows = body.split("\n")
        current = sum(run[1] for part in rows[-1].split(RUN_SEP) if (run := split_run(part)))
        covered = (len(rows) - 1) * width + min(current, width)
    elif fmt == "full":
        covered = body.count("|") + body.count("\n")
    else:
        raise ValueError(f"grid positions support the rrle and full formats, not {fmt!r}")
    return min(covered, width * height)


class AnswerPositions:
    """The rotary position of each answer token, fed one growing answer text at a time."""

    def __init__(self, start: int, grid: int, fmt: str, scheme: str = "natural"):
        if scheme not in SCHEMES:
            raise ValueError(f"unknown position scheme {scheme!r}; expected one of {SCHEMES}")
        self.grid, self.fmt, self.scheme = grid, fmt, scheme
        self.next = start  # natural position of the next token
        self.anchor: int | None = None  # position of <seg>, once it has been written

    def advance(self, text: str) -> int:
        """Position of the token whose arrival made the answer read ``text``."""
        position = self.next
        if self.scheme == "grid":
            opened = text.find(OPEN_TAG)
            if self.anchor is None and opened >= 0:
                self.anchor = position
            elif self.anchor is not None and CLOSE_TAG not in text[opened:]:
                body = text[opened + len(OPEN_TAG):]
                position = self.anchor + cells_covered(body, self.grid, self.grid, self.fmt)
        self.next = position + 1
        return position
