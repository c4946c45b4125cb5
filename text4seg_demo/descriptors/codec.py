"""Semantic descriptors: the text that Text4Seg models read and write.

A descriptor gives one label per image patch of an H x W grid. Three body formats exist
(see docs/formats.md for the exact grammar):

* ``rrle`` -- row-wise run-length encoding, the format the released checkpoints emit:
  ``others *16\\n others *4| white horse *6| others *6\\n ...\\n``
* ``full`` -- all H*W labels joined by ``| ``
* ``irle`` -- one run-length sequence over the row-major label list

A whole model answer is ``LEAD-IN\\n<seg>BODY</seg>``. Model output is untrusted:
:func:`parse_answer` turns *any* text into an H x W grid plus diagnostics and never raises.

This module deliberately imports neither torch nor PIL so the CLI starts fast.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

OTHERS = "others"
FORMATS = ("rrle", "full", "irle")
REPAIRS = ("reference", "rows")  # how parse_answer mends a malformed answer
OPEN_TAG, CLOSE_TAG = "<seg>", "</seg>"
RUN_SEP, ROW_SEP, COUNT_SEP = "| ", "\n ", " *"

_RUN = re.compile(r"^(?P<label>.*?) ?\*(?P<count>\d+)$")


def split_run(text: str) -> tuple[str, int] | None:
    """``LABEL *COUNT`` read leniently as (label, count), the label unstripped; None when it is no
    run. The one reading of a run that the parser, the positions and the answer view share."""
    match = _RUN.match(text)
    return None if match is None else (match["label"], int(match["count"]))
_FORBIDDEN = ("|", "*", "\n", "\r", "<seg>", "</seg>")


class DescriptorError(ValueError):
    """A descriptor that does not follow the exact grammar (strict decoding only)."""


def check_label(label: str) -> str:
    """Return ``label`` if it can be written into a descriptor unambiguously, else raise."""
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"a label must be a non-empty string, got {label!r}")
    if label != label.strip():
        raise ValueError(f"label {label!r} has leading or trailing whitespace")
    bad = _reserved_piece(label)
    if bad is not None:
        raise ValueError(f"label {label!r} contains {bad!r}, which the descriptor grammar reserves")
    return label


def _reserved_piece(label: str) -> str | None:
    """The first piece of the grammar (`|`, ` *`, `<seg>`...) that ``label`` holds, if any."""
    return next((s for s in _FORBIDDEN if s in label), None)


# --------------------------------------------------------------------------- encoding


def _label_rows(grid: np.ndarray, labels: Sequence[str]) -> list[list[str]]:
    grid = np.asarray(grid)
    if grid.ndim != 2 or grid.size == 0:
        raise ValueError(f"grid must be a non-empty 2-D array, got shape {grid.shape}")
    for label in labels:
        check_label(label)
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be unique, got {list(labels)}")
    if grid.min() < 0 or grid.max() >= len(labels):
        raise ValueError(f"grid ids must lie in [0, {len(labels)}), got [{grid.min()}, {grid.max()}]")
    return [[labels[i] for i in row] for row in grid.tolist()]


def _runs(cells: Sequence[str]) -> list[str]:
    runs, start = [], 0
    for i in range(1, len(cells) + 1):
        if i == len(cells) or cells[i] != cells[start]:
            runs.append(f"{cells[start]}{COUNT_SEP}{i - start}")
            start = i
    return runs


def encode(grid: np.ndarray, labels: Sequence[str], fmt: str = "rrle") -> str:
    """Encode an H x W grid of label ids (indices into ``labels``) as a descriptor body."""
    rows = _label_rows(grid, labels)
    if fmt == "rrle":
        return ROW_SEP.join(RUN_SEP.join(_runs(row)) for row in rows) + "\n"
    flat = [cell for row in rows for cell in row]
    if fmt == "full":
        return RUN_SEP.join(flat) + "\n"
    if fmt == "irle":
        return RUN_SEP.join(_runs(flat)) + "\n"
    raise ValueError(f"unknown descriptor format {fmt!r}; expected one of {FORMATS}")


def wrap(body: str, lead_in: str = "") -> str:
    """A whole answer: optional lead-in line, then ``<seg>BODY</seg>``."""
    return f"{lead_in}\n{OPEN_TAG}{body}{CLOSE_TAG}" if lead_in else f"{OPEN_TAG}{body}{CLOSE_TAG}"


# --------------------------------------------------------------------------- strict decoding


def _strict_run(text: str) -> tuple[str, int]:
    label, sep, count = text.rpartition(COUNT_SEP)
    if not sep or not count.isdigit() or int(count) < 1 or not label:
        raise DescriptorError(f"malformed run {text!r}: expected 'LABEL *COUNT'")
    return label, int(count)


def decode(body: str, fmt: str = "rrle", width: int | None = None) -> tuple[np.ndarray, list[str]]:
    """Decode a well-formed body exactly; raise :class:`DescriptorError` on any deviation.

    ``width`` is needed for ``full`` and ``irle`` (no row breaks); ``rrle`` infers it.
    Returns ``(grid, labels)`` with ``labels[0] == "others"``.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown descriptor format {fmt!r}; expected one of {FORMATS}")
    if not body.endswith("\n") or body.endswith("\n\n"):
        raise DescriptorError("a body ends with exactly one newline")
    text = body[:-1]
    if fmt == "rrle":
        rows = []
        for line in text.split(ROW_SEP):
            cells = []
            for run in line.split(RUN_SEP):
                label, count = _strict_run(run)
                cells.extend([label] * count)
            rows.append(cells)
        widths = {len(r) for r in rows}
        if len(widths) != 1 or (width is not None and widths != {width}):
            raise DescriptorError(f"rows have unequal or unexpected widths: {sorted(widths)}")
        cells, width = [c for r in rows for c in r], len(rows[0])
    else:
        if "\n" in text:
            raise DescriptorError(f"a {fmt} body has no row breaks")
        if width is None:
            raise ValueError(f"decoding {fmt} needs the grid width")
        if fmt == "full":
            cells = text.split(RUN_SEP)
        else:
            cells = []
            for run in text.split(RUN_SEP):
                label, count = _strict_run(run)
                cells.extend([label] * count)
        if len(cells) % width:
            raise DescriptorError(f"{len(cells)} labels do not fill rows of width {width}")
    for label in cells:
        try:
            check_label(label)
        except ValueError as err:
            raise DescriptorError(str(err)) from None
    labels = _label_order(cells)
    index = {label: i for i, label in enumerate(labels)}
    grid = np.array([index[c] for c in cells], dtype=np.int32).reshape(-1, width)
    return grid, labels


def _label_order(cells: Iterable[str], known: Sequence[str] = ()) -> list[str]:
    """``others`` first, then ``known`` labels, then the rest in order of first appearance."""
    order = dict.fromkeys([OTHERS, *known])
    order.update(dict.fromkeys(cells))
    return list(order)


# --------------------------------------------------------------------------- lenient parsing


@dataclass(frozen=True)
class Diagnostic:
    """One kind of problem found in a model answer, with how often it occurred."""

    code: str
    count: int
    message: str

    def to_dict(self) -> dict:
        return {"code": self.code, "count": self.count, "message": self.message}


@dataclass
class ParsedAnswer:
    """What a model answer means: an H x W grid of ids into ``labels`` and what was repaired."""

    grid: np.ndarray
    labels: list[str]
    diagnostics: list[Diagnostic] = field(default_factory=list)
    body: str = ""
    fmt: str = "rrle"

    def mask(self) -> np.ndarray:
        """Binary foreground grid: any label other than ``others``."""
        return self.grid != self.labels.index(OTHERS)

    def to_dict(self) -> dict:
        return {
            "grid": self.grid.tolist(),
            "labels": list(self.labels),
            "diagnostics": [d.to_dict() for d in self.diagnostics],
        }


def extract_body(text: str) -> tuple[str, list[Diagnostic], bool]:
    """The text between the first ``<seg>`` and the next ``</seg>``.

    Returns ``(body, diagnostics, closed)``. Without an opening tag the whole text is taken
    (a model may skip the tags); without a closing tag everything after ``<seg>`` is taken.
    """
    diags = []
    start = text.find(OPEN_TAG)
    if start < 0:
        diags.append(Diagnostic("missing_open_tag", 1, "no <seg> tag: read the whole answer as the body"))
        body = text
    else:
        body = text[start + len(OPEN_TAG):]
    end = body.find(CLOSE_TAG)
    if end < 0:
        diags.append(Diagnostic("unclosed_tag", 1, "no </seg> tag: the answer may be cut off"))
        return body, diags, False
    return body[:end], diags, True


def _split_runs(line: str) -> list[str]:
    return [part.strip() for part in line.split("|")]


class _Reader:
    """Collects cells and counts problems while reading runs leniently."""

    def __init__(self, cap: int):
        self.cap = cap  # no run may expand past this many cells (hostile counts)
        self.malformed: list[str] = []
        self.empty_labels = 0

    def run(self, text: str) -> list[str]:
        if not text:
            return []
        run = split_run(text)
        if run is None or run[1] < 1:
            self.malformed.append(text)
            return []
        label = run[0].strip()
        if not label:
            self.empty_labels += 1
            return []
        if not self._writable(label, text):
            return []
        return [label] * min(run[1], self.cap)

    def label(self, text: str) -> list[str]:
        if not text:
            self.empty_labels += 1
            return []
        return [text] if self._writable(text, text) else []

    def _writable(self, label: str, text: str) -> bool:
        """A label holding a piece of the grammar (a second `<seg>`, ` *3` in a full-length cell)
        could not be written back: its ``text`` is a malformed run rather than a label."""
        if _reserved_piece(label) is None:
            return True
        self.malformed.append(text)
        return False


def _count_note(code: str, n: int, message: str) -> list[Diagnostic]:
    return [Diagnostic(code, n, message)] if n else []


def _rows_of(body: str, fmt: str, reader: _Reader) -> list[list[str]]:
    """Read the body into rows of cells (``full``/``irle`` give one row)."""
    lines = body.split("\n")
    if lines and lines[-1].strip() == "":
        lines.pop()
    if fmt == "rrle":
        return [[c for part in _split_runs(line) for c in reader.run(part)] for line in lines]
    parts = [p for line in lines for p in _split_runs(line)]
    if parts and parts[-1] == "" and len(parts) > 1:
        parts.pop()  # a dangling separator
    read = reader.run if fmt == "irle" else reader.label
    return [[c for part in parts for c in read(part)]]


def parse_answer(
    text: str,
    height: int,
    width: int | None = None,
    fmt: str = "rrle",
    allowed_labels: Sequence[str] | None = None,
    repair: str = "reference",
) -> ParsedAnswer:
    """Turn any model answer into an ``height x width`` grid; never raises. Every label it
    returns passes :func:`check_label`, so the grid can always be encoded again.

    ``repair="reference"`` reproduces the reference evaluator: all cells are read in order,
    the list is padded with its last label or truncated to H*W. ``repair="rows"`` repairs
    each R-RLE row on its own, which keeps later rows aligned when one row is short.
    Every repair is reported in ``diagnostics``.
    """
    width = height if width is None else width
    if fmt not in FORMATS:
        raise ValueError(f"unknown descriptor format {fmt!r}; expected one of {FORMATS}")
    if repair not in REPAIRS:
        raise ValueError(f"unknown repair {repair!r}; expected 'reference' or 'rows'")
    total = height * width
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    body, diags, closed = extract_body(text)
    reader = _Reader(cap=total)
    rows = _rows_of(body, fmt, reader)

    if not closed and body and not body.endswith("\n"):
        diags.append(Diagnostic("truncated", 1, "the text ends inside a row: its last run may be cut short"))
    diags += _count_note("malformed_runs", len(reader.malformed),
                         f"{len(reader.malformed)} malformed run(s) skipped, e.g. {reader.malformed[:1]!r}")
    diags += _count_note("empty_labels", reader.empty_labels, f"{reader.empty_labels} empty label(s) skipped")
    if fmt == "rrle":
        short = [i for i, r in enumerate(rows) if len(r) < width]
        long = [i for i, r in enumerate(rows) if len(r) > width]
        diags += _count_note("short_rows", len(short), f"{len(short)} row(s) with fewer than {width} cells: {short[:8]}")
        diags += _count_note("long_rows", len(long), f"{len(long)} row(s) with more than {width} cells: {long[:8]}")
        diags += _count_note("too_many_rows", max(0, len(rows) - height), f"{len(rows)} rows for a grid of {height}")
        diags += _count_note("too_few_rows", max(0, height - len(rows)), f"{len(rows)} rows for a grid of {height}")

    cells = _repair(rows, height, width, repair if fmt == "rrle" else "reference", diags)
    labels = _label_order(cells)
    if allowed_labels is not None:
        allowed = {OTHERS, *allowed_labels}
        unknown = [c for c in cells if c not in allowed]
        diags += _count_note("unknown_labels", len(unknown),
                             f"{len(unknown)} cell(s) carry labels outside the allowed set: "
                             f"{sorted(set(unknown))[:5]}")
        labels = _label_order(cells, [lab for lab in allowed_labels if lab != OTHERS])
    index = {label: i for i, label in enumerate(labels)}
    grid = np.array([index[c] for c in cells], dtype=np.int32).reshape(height, width)
    return ParsedAnswer(grid=grid, labels=labels, diagnostics=diags, body=body, fmt=fmt)


def _repair(rows: list[list[str]], height: int, width: int, repair: str, diags: list[Diagnostic]) -> list[str]:
    total = height * width
    if repair == "rows":
        fill = next((r[-1] for r in reversed(rows) if r), OTHERS)
        fixed, padded, cut = [], 0, 0
        for row in rows[:height]:
            pad = row[-1] if row else fill
            cut += max(0, len(row) - width)
            padded += max(0, width - len(row))
            fixed.extend((row + [pad] * width)[:width])
        padded += total - len(fixed)
        cut += sum(len(r) for r in rows[height:])
        cells = fixed + [fill] * (total - len(fixed))
    else:
        cells = [c for r in rows for c in r]
        if not cells:
            diags.append(Diagnostic("no_cells", 1, "nothing readable: every patch set to 'others'"))
            return [OTHERS] * total
        padded, cut = max(0, total - len(cells)), max(0, len(cells) - total)
        cells = (cells + [cells[-1]] * padded)[:total]
    diags += _count_note("padded", padded, f"{padded} missing cell(s) filled with the last label")
    diags += _count_note("truncated_cells", cut, f"{cut} extra cell(s) dropped")
    return cells


def completed_rows(prefix: str, width: int, fmt: str = "rrle") -> list[list[str]]:
    """Rows of labels that a growing answer prefix has finished (for streaming).

    An R-RLE row counts once its line break has arrived; ``full`` and ``irle`` rows count
    once ``width`` cells are followed by a separator. A short or long R-RLE row is padded
    with its last label or clipped, as ``parse_answer(..., repair="rows")`` reads it.
    """
    start = prefix.find(OPEN_TAG)
    if start < 0:
        return []
    body = prefix[start + len(OPEN_TAG):]
    end = body.find(CLOSE_TAG)
    if end >= 0:
        body = body[:end] + ("" if body[:end].endswith("\n") else "\n")
    reader = _Reader(cap=width * 64)
    if fmt == "rrle":
        done = body[: body.rfind("\n") + 1]
        rows = _rows_of(done, fmt, reader)
        return [(r + [r[-1] if r else OTHERS] * width)[:width] for r in rows]
    cut = body.rfind("|")
    done = body if end >= 0 else body[:cut + 1] if cut >= 0 else ""
    cells = _rows_of(done, fmt, reader)[0]
    return [cells[i:i + width] for i in range(0, len(cells) - width + 1, width)]


class RowStream:
    """:func:`completed_rows` of an answer that grows piece by piece, with constant work per
    piece: each character is read once (the settled part of the body is never parsed again), so
    streaming a long answer costs what parsing it once does."""

    def __init__(self, width: int, fmt: str = "rrle"):
        self.width, self.fmt = width, fmt
        self.text = ""
        self.rows: list[list[str]] = []
        self.closed = False  # ``</seg>`` has arrived: nothing after it is read
        self._body: int | None = None  # where the body starts in ``text``
        self._read = 0  # the body is parsed up to here
        self._cells: list[str] = []  # full-length cells not yet in a whole row
        self._reader = _Reader(cap=width * 64)

    def feed(self, piece: str) -> list[list[str]]:
        """Add ``piece`` to the answer; return the rows finished so far (a new list each time)."""
        start = len(self.text)
        self.text += piece
        if self.closed:
            return list(self.rows)
        if self._body is None:
            opened = self.text.find(OPEN_TAG, max(0, start - len(OPEN_TAG)))
            if opened < 0:
                return []
            self._body = self._read = opened + len(OPEN_TAG)
        end = self.text.find(CLOSE_TAG, max(self._read, start - len(CLOSE_TAG)))
        if end >= 0:
            self.closed = True
            settled = self.text[self._read:end]
            if self.fmt == "rrle" and not settled.endswith("\n") and (settled or self._read == self._body):
                settled += "\n"  # the last row ends with the tag, as in completed_rows
            self._read = end
        else:
            cut = self.text.rfind("\n" if self.fmt == "rrle" else "|", self._read)
            settled = self.text[self._read:cut + 1] if cut >= 0 else ""
            self._read += len(settled)
        if settled:
            self._take(settled)
        return list(self.rows)

    def _take(self, settled: str) -> None:
        read = _rows_of(settled, self.fmt, self._reader)
        if self.fmt == "rrle":
            self.rows += [(r + [r[-1] if r else OTHERS] * self.width)[:self.width] for r in read]
            return
        self._cells += read[0]
        whole = len(self._cells) - len(self._cells) % self.width
        self.rows += [self._cells[i:i + self.width] for i in range(0, whole, self.width)]
        del self._cells[:whole]

