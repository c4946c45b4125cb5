import itertools
import random
import string

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from text4seg_demo.descriptors import codec
from text4seg_demo.descriptors.codec import OTHERS, check_label, decode, encode, parse_answer, wrap

HORSE = ["others", "white horse"]


def spec_grid():
    grid = np.zeros((16, 16), dtype=int)
    grid[5:11, 4:10] = 1
    return grid


# --------------------------------------------------------------------------- oracles
# Written from SPEC section 2's prose, independently of the codec.


def rrle_oracle(rows):
    return "\n ".join(
        "| ".join(f"{label} *{len(list(group))}" for label, group in itertools.groupby(row)) for row in rows
    ) + "\n"


def reference_read(answer, h, w):
    """The reference evaluator's reading: tags, split, expand, pad with last / truncate."""
    try:
        body = answer.split("<seg>")[1].split("</seg>")[0]
        cells = []
        for row in body.strip("\n").split("\n "):
            for run in row.split("| "):
                label, count = run.split(" *")
                cells.extend([label.strip()] * int(count))
    except (IndexError, ValueError):
        return None
    if len(cells) < h * w:
        cells += [cells[-1]] * (h * w - len(cells))
    return cells[: h * w]


# --------------------------------------------------------------------------- exact strings


def test_spec_example_rrle_exact():
    plain, target = "others *16", "others *4| white horse *6| others *6"
    expected = (
        "others *16\n others *16\n others *16\n others *16\n others *16\n"
        + f" {target}\n" * 6
        + " others *16\n" * 4 + f" {plain}\n"
    )
    assert encode(spec_grid(), HORSE) == expected


def test_full_and_irle_exact_on_small_grid():
    grid = np.array([[0, 1, 1], [1, 0, 0]])
    labels = ["others", "cat"]
    assert encode(grid, labels, "full") == "others| cat| cat| cat| others| others\n"
    assert encode(grid, labels, "irle") == "others *1| cat *3| others *2\n"
    assert encode(grid, labels, "rrle") == "others *1| cat *2\n cat *1| others *2\n"


def test_wrap_puts_lead_in_on_its_own_line():
    assert wrap("a *1\n", "Sure:") == "Sure:\n<seg>a *1\n</seg>"
    assert wrap("a *1\n") == "<seg>a *1\n</seg>"


def test_encode_rejects_labels_the_grammar_cannot_carry():
    grid = np.zeros((2, 2), dtype=int)
    for bad in ["a|b", "x *2", "two\nlines", " padded", ""]:
        with pytest.raises(ValueError):
            encode(grid, [bad])
    with pytest.raises(ValueError):
        encode(np.full((2, 2), 3), HORSE)


def test_strict_decode_rejects_deviations():
    for body in ["others *16", "others *0\n", "others 16\n", "a *2\n b *3\n", "*3\n"]:
        with pytest.raises(codec.DescriptorError):
            decode(body, "rrle")
    with pytest.raises(codec.DescriptorError):
        decode("a| b| c\n", "full", width=2)


# --------------------------------------------------------------------------- properties

label_text = st.text(alphabet=string.ascii_letters + string.digits + " -'.,()&!?", min_size=1, max_size=14).map(
    str.strip
).filter(lambda s: s and s != OTHERS)


@st.composite
def grids(draw):
    h = draw(st.integers(8, 32))
    w = draw(st.integers(8, 32))
    names = draw(st.lists(label_text, min_size=1, max_size=5, unique=True))
    labels = [OTHERS, *names]
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # blobs and noise: long runs as well as single cells
    grid = rng.integers(0, len(labels), size=(h, w)) * (rng.random((h, w)) < draw(st.floats(0, 1)))
    if draw(st.booleans()):
        grid = np.sort(grid, axis=1)
    return grid.astype(int), labels


@settings(max_examples=150, deadline=None)
@given(grids(), st.sampled_from(codec.FORMATS))
def test_round_trip_exact(case, fmt):
    grid, labels = case
    body = encode(grid, labels, fmt)
    decoded, out_labels = decode(body, fmt, width=grid.shape[1])
    assert decoded.shape == grid.shape
    assert [out_labels[i] for i in decoded.ravel()] == [labels[i] for i in grid.ravel()]
    parsed = parse_answer(wrap(body, "Sure, here it is:"), grid.shape[0], grid.shape[1], fmt=fmt)
    assert parsed.diagnostics == []
    assert [parsed.labels[i] for i in parsed.grid.ravel()] == [labels[i] for i in grid.ravel()]


@settings(max_examples=150, deadline=None)
@given(grids())
def test_rrle_matches_reference_encoder(case):
    grid, labels = case
    rows = [[labels[i] for i in row] for row in grid]
    assert encode(grid, labels, "rrle") == rrle_oracle(rows)


# --------------------------------------------------------------------------- untrusted output


def mutate(text, rng):
    chars = list(text)
    for _ in range(rng.randint(1, 8)):
        op = rng.choice(["del", "ins", "sub", "cut", "dup"])
        if not chars:
            break
        i = rng.randrange(len(chars))
        if op == "del":
            del chars[i]
        elif op == "ins":
            chars.insert(i, rng.choice("|* \n0123456789<>/segothrs" + "\x00é漢"))
        elif op == "sub":
            chars[i] = rng.choice("|*\n 9")
        elif op == "cut":
            chars = chars[:i]
        else:
            chars[i:i] = chars[max(0, i - 20):i]
    return "".join(chars)


@pytest.mark.parametrize("fmt", codec.FORMATS)
def test_parser_survives_fuzzing(fmt):
    rng = random.Random(1234)
    np_rng = np.random.default_rng(1234)
    for trial in range(400):
        h = rng.choice([8, 16, 24])
        grid = (np_rng.random((h, h)) < 0.3).astype(int)
        answer = wrap(encode(grid, HORSE, fmt), "Sure, here is the segmentation mask for 'white horse':")
        text = mutate(answer, rng) if trial % 4 else "".join(rng.choice(string.printable) for _ in range(rng.randint(0, 300)))
        parsed = parse_answer(text, h, fmt=fmt, allowed_labels=["white horse"])
        assert parsed.grid.shape == (h, h)
        assert parsed.grid.min() >= 0 and parsed.grid.max() < len(parsed.labels)
        assert parsed.labels[0] == OTHERS
        assert all(check_label(label) for label in parsed.labels)  # every label can be written back


def test_parser_is_total_on_odd_inputs():
    for text in ["", None, "<seg></seg>", "<seg>", "</seg>", "<seg>others *99999999999999\n</seg>", "\n" * 1000,
                 "<seg>| | |\n</seg>", "<seg> *5\n</seg>", "<seg>x *-3\n</seg>"]:
        parsed = parse_answer(text, 16)
        assert parsed.grid.shape == (16, 16)


def test_reference_padding_and_truncation_reproduced():
    rng = random.Random(7)
    np_rng = np.random.default_rng(7)
    for _ in range(200):
        grid = (np_rng.random((16, 16)) < 0.4).astype(int)
        rows = encode(grid, HORSE).rstrip("\n").split("\n ")
        k = rng.randint(1, 15)
        rows = rows[:k] if rng.random() < 0.5 else rows + rows[:k]  # too few or too many rows
        if rng.random() < 0.5:  # a short row in the middle shifts later cells
            i = rng.randrange(len(rows))
            rows[i] = rows[i].rsplit("| ", 1)[0] if "| " in rows[i] else rows[i]
        answer = "Sure:\n<seg>" + "\n ".join(rows) + "\n</seg>"
        parsed = parse_answer(answer, 16)
        expected = reference_read(answer, 16, 16)
        assert [parsed.labels[i] for i in parsed.grid.ravel()] == expected
        assert {d.code for d in parsed.diagnostics} & {"padded", "truncated_cells", "short_rows"}


def codes(text, **kw):
    return {d.code: d.count for d in parse_answer(text, kw.pop("h", 4), **kw).diagnostics}


def test_each_problem_is_reported_with_counts():
    assert codes("others *4\n others *4\n others *4\n others *4\n") == {"missing_open_tag": 1, "unclosed_tag": 1}
    assert codes("<seg>others *4\n others *4\n others *4\n others *4\n") == {"unclosed_tag": 1}
    assert codes("<seg>others *4\n others *4\n others *4\n others *2") == {
        "unclosed_tag": 1, "truncated": 1, "short_rows": 1, "padded": 2}
    assert codes("<seg>others *4\n others *2\n others *4\n others *5\n</seg>") == {
        "short_rows": 1, "long_rows": 1, "padded": 1}  # 15 cells read in order
    assert codes("<seg>others *4\n others *4\n</seg>") == {"too_few_rows": 2, "padded": 8}
    assert codes("<seg>" + "others *4\n " * 5 + "\n</seg>")["too_many_rows"] == 2
    assert codes("<seg>others *4\n oth*ers\n others *x| others *4\n others *4\n</seg>")["malformed_runs"] == 2
    assert codes("<seg>others *4\n *4\n others *4\n others *4\n</seg>")["empty_labels"] == 1
    assert codes("<seg>others *4\n <seg>others *4\n others *4\n others *4\n</seg>")["malformed_runs"] == 1
    assert codes("<seg>others| others *2| others| others\n</seg>", h=2, fmt="full")["malformed_runs"] == 1
    assert codes("<seg>others *2| dog *2\n others *4\n others *4\n others *4\n</seg>",
                 allowed_labels=["cat"]) == {"unknown_labels": 2}
    assert codes("no descriptors here") == {"missing_open_tag": 1, "unclosed_tag": 1, "truncated": 1,
                                            "malformed_runs": 1, "short_rows": 1, "too_few_rows": 3,
                                            "no_cells": 1}


def test_row_repair_keeps_later_rows_aligned():
    answer = "<seg>others *4\n dog *2\n others *1| dog *3\n others *4\n</seg>"
    ref = parse_answer(answer, 4)
    rows = parse_answer(answer, 4, repair="rows")
    assert rows.grid.tolist() == [[0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 0]]
    assert ref.grid.tolist() != rows.grid.tolist()
    assert {d.code for d in rows.diagnostics} == {"short_rows", "padded"}


def test_others_is_always_background_id_zero():
    parsed = parse_answer("<seg>cat *4\n cat *4\n</seg>", 2, 4)
    assert parsed.labels == ["others", "cat"] and parsed.mask().all()


def test_full_length_parse_accepts_reference_style():
    grid = spec_grid()
    answer = wrap(encode(grid, HORSE, "full"))
    parsed = parse_answer(answer, 16, fmt="full")
    assert parsed.diagnostics == [] and (parsed.grid == grid).all()
    short = parse_answer(answer.replace("| others\n</seg>", "\n</seg>"), 16, fmt="full")
    assert {d.code: d.count for d in short.diagnostics} == {"padded": 1}


# --------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("fmt", codec.FORMATS)
def test_completed_rows_grow_monotonically_to_the_final_grid(fmt):
    grid = spec_grid()
    grid[12, 3] = 1
    answer = wrap(encode(grid, HORSE, fmt), "Sure:")
    final = [[HORSE[i] for i in row] for row in grid]
    seen = 0
    for end in range(len(answer) + 1):
        rows = codec.completed_rows(answer[:end], 16, fmt)
        assert rows == final[: len(rows)]
        assert len(rows) >= seen
        seen = len(rows)
    assert seen == 16


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(codec.FORMATS), st.integers(0, 2**16), st.lists(st.integers(1, 9), min_size=1, max_size=400),
       st.sampled_from(["", "|", "\n", " *3", "x", "</seg>", "<seg>", "||", "\n\n"]), st.integers(0, 10**6))
def test_a_row_stream_reads_each_piece_once_and_agrees_with_completed_rows(fmt, bits, sizes, noise, at):
    grid = np.array([(bits >> (i % 16)) & 1 for i in range(256)]).reshape(16, 16)
    answer = wrap(encode(grid, HORSE, fmt), "Sure:")
    at %= len(answer) + 1
    answer = answer[:at] + noise + answer[at:]  # malformed answers stream like well-formed ones
    stream, end = codec.RowStream(16, fmt), 0
    for size in sizes:
        piece, end = answer[end:end + size], end + size
        assert stream.feed(piece) == codec.completed_rows(answer[:end], 16, fmt)
        if end >= len(answer):
            break
