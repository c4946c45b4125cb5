"""The remote backend's client against a scripted OpenAI-compatible server: what it sends, how
it streams, and the message for each way a server can fail. ``vllm serve`` itself: tests/remote."""

import json
import socket
from pathlib import Path

import numpy as np
import pytest
from openai_stub import Script, serving
from PIL import Image

from text4seg_demo.cli import main
from text4seg_demo.descriptors import codec
from text4seg_demo.descriptors.grammar import ebnf
from text4seg_demo.inference.remote import RemoteError, RemoteModel
from text4seg_demo.pipeline import Request, segment, segment_stream

ROOT = Path(__file__).resolve().parents[2]
EXPRESSION = "the red circle"


def _answer(grid: int = 16) -> str:
    cells = np.zeros((grid, grid), int)
    cells[2:6, 3:9] = 1
    return codec.wrap(codec.encode(cells, [codec.OTHERS, EXPRESSION], "rrle"), f"Sure, '{EXPRESSION}':")


def _image():
    return Image.new("RGB", (64, 48), (200, 30, 30))


def test_a_served_answer_streams_through_the_pipeline_with_the_servers_counts():
    script = Script("text4seg-llava-7b-p16", _answer())
    with serving(script) as url:
        engine = RemoteModel(url + "/v1/")
        items = list(segment_stream(engine, _image(), Request(expression=EXPRESSION, constrained=True)))
    events, result = items[:-1], items[-1]
    assert "".join(e.delta for e in events) == result.text == _answer()
    assert max(len(e.rows) for e in events if not e.done) == 16  # rows arrive as they complete
    expected = np.zeros((16, 16), int)
    expected[2:6, 3:9] = 1
    assert (result.grid == expected).all() and not result.diagnostics
    assert result.tokens["generated"] == len(range(0, len(_answer()), 7))  # the server's usage, not a recount
    assert result.tokens["prompt"] == 40
    assert 0 <= result.timings["ttft"] <= result.timings["total"]
    sent = script.requests[0]
    assert sent["model"] == "text4seg-llava-7b-p16" and sent["temperature"] == 0.0 and sent["stream"]
    assert sent["structured_outputs"]["grammar"] == ebnf(16, 16, [EXPRESSION], "rrle")
    image, question = sent["messages"][0]["content"]
    assert image["image_url"]["url"].startswith("data:image/png;base64,")
    assert question["text"] == engine.question(EXPRESSION)


def test_free_decoding_sends_no_grammar_and_a_token_budget():
    script = Script("m-p16", _answer())
    with serving(script) as url:
        segment(RemoteModel(url), _image(), Request(expression=EXPRESSION))
    assert "structured_outputs" not in script.requests[0] and script.requests[0]["max_tokens"] > 0


def test_a_server_that_ignores_the_grammar_is_named_in_the_notes():
    broken = _answer().replace("others *", "the blue square *", 1)
    with serving(Script("m-p16", broken)) as url:
        result = segment(RemoteModel(url), _image(), Request(expression=EXPRESSION, constrained=True))
    assert result.diagnostics
    assert any("did not follow the grammar" in note for note in result.notes)


def test_a_server_serving_another_model_is_refused_with_what_it_serves():
    with serving(Script("text4seg-llava-7b-p24", _answer())) as url, \
            pytest.raises(RemoteError, match="serves text4seg-llava-7b-p24, not 'tiny-rrle'"):
        RemoteModel(url, "tiny-rrle")


def test_an_unreachable_server_and_a_slow_one_get_their_own_messages():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RemoteError, match="cannot connect to the server at http://127.0.0.1"):
        RemoteModel(f"http://127.0.0.1:{port}")
    with serving(Script("m", _answer(), delay_s=1.5)) as url:
        engine = RemoteModel(url, timeout_s=0.5)
        with pytest.raises(RemoteError, match="did not answer within"):
            segment(engine, _image(), Request(expression=EXPRESSION))
    with pytest.raises(RemoteError, match="not a server URL"):
        RemoteModel("localhost:8000")


def test_without_a_tokenize_route_costs_are_counted_with_the_llama_vocabulary():
    with serving(Script("m-p16", _answer(), tokenize=False)) as url:
        result = segment(RemoteModel(url), _image(), Request(expression=EXPRESSION, constrained=True))
    assert result.tokens["rrle"] < result.tokens["full"]
    assert any("LLaMA vocabulary" in note for note in result.notes)


def test_jump_forward_is_refused_on_a_server():
    with serving(Script("m-p16", _answer())) as url, pytest.raises(ValueError, match="jump-forward"):
        segment(RemoteModel(url), _image(), Request(expression=EXPRESSION, constrained=True, jump_forward=True))


def test_segment_and_eval_run_on_servers_from_the_command_line(tmp_path, capsys):
    image = tmp_path / "red.png"
    _image().save(image)
    with serving(Script("m-p16", _answer())) as one, serving(Script("m-p16", _answer())) as two:
        assert main(["segment", str(image), EXPRESSION, "--server", one, "--constrained",
                     "--json", str(tmp_path / "out.json")]) == 0
        doc = json.loads((tmp_path / "out.json").read_text())
        assert doc["model"] == "m-p16" and doc["quant"] == "server" and not doc["diagnostics"]
        rows = tmp_path / "rows.jsonl"
        assert main(["eval", "--data", str(ROOT / "examples" / "synthetic"), "--limit", "6", "--server", one,
                     "--server", two, "--concurrency", "3", "--rows", str(rows)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "m-p16" and report["n"] == 6
    lines = [json.loads(line) for line in rows.read_text().splitlines()]
    assert sorted(r["index"] for r in lines) == list(range(6)) and {r["model"] for r in lines} == {"m-p16"}


def test_concurrency_without_a_server_is_refused(capsys):
    assert main(["eval", "--data", str(ROOT / "examples" / "synthetic"), "--concurrency", "4"]) == 2
    assert "--concurrency keeps requests in flight on --server" in capsys.readouterr().err
