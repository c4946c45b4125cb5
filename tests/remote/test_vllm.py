"""The remote backend against a real ``vllm serve``: a random-weight LLaVA in the released
checkpoint's original layout, converted by ``text4seg convert-llava`` and served as README's
*Scaling out* says. Needs vLLM in its own environment (``bash .ci/vllm-env``, then
``TEXT4SEG_VLLM_PYTHON=.venv-vllm/bin/python``); ``.ci/run`` runs this as its own step."""

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from fakes import noise_image, write_original_llava

from text4seg_demo.cli import main
from text4seg_demo.inference.convert import convert
from text4seg_demo.inference.loading import load
from text4seg_demo.inference.remote import RemoteModel, _data_url

VLLM_PYTHON = os.environ.get("TEXT4SEG_VLLM_PYTHON")
VLLM_PYTHON = VLLM_PYTHON and os.path.abspath(VLLM_PYTHON)  # not resolved: the venv is its link
pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not VLLM_PYTHON, reason="needs TEXT4SEG_VLLM_PYTHON (.ci/vllm-env)")]
ROOT = Path(__file__).resolve().parents[2]
NAME = "text4seg-tiny-llava-p16"
# vLLM's CPU attention wants a head size of 32 or more: the language model is a little wider than tests' usual
TEXT = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2, "num_key_value_heads": 2}


def serve_command(model: Path, port: int) -> list[str]:
    """README's `vllm serve` for the tiny model; on a CPU build the `vllm` script is missing, so the
    same entry point is started as a module, eager (no graph capture) and with a small KV cache."""
    return [VLLM_PYTHON, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", str(model),
            "--served-model-name", NAME, "--max-model-len", "2048", "--port", str(port),
            "--dtype", "float32", "--enforce-eager", "--gpu-memory-utilization", "0.15"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    original, _ = write_original_llava(root, text=TEXT)
    model = convert(original, root / NAME, log=lambda m: None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 420
    with open(root / "serve.log", "w") as log:
        process = subprocess.Popen(serve_command(model, port), stdout=log, stderr=subprocess.STDOUT, cwd=root)
        try:
            while True:
                if process.poll() is not None or time.time() > deadline:
                    pytest.fail("vllm serve did not start:\n" + (root / "serve.log").read_text()[-3000:])
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(2)
            yield url, model
        finally:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()


def test_the_server_builds_the_prompt_the_local_engine_builds(server):
    url, model = server
    local = load(str(model), log=lambda m: None)
    question = local.question("the red circle")
    before, after = local._prompt_ids(question)
    image_tokens = local.image_features(noise_image(0)).shape[0]
    message = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_url(noise_image(0))}},
                                           {"type": "text", "text": question}]}
    served = httpx.post(url + "/tokenize", json={"model": NAME, "messages": [message], "add_generation_prompt": True},
                        timeout=60).json()["tokens"]
    assert served == before + [local.image_token_id] * image_tokens + after


@pytest.mark.parametrize("grid", [16, 24])
def test_constrained_answers_are_well_formed_and_stream_as_they_end(server, grid, tmp_path):
    url, _ = server
    engine = RemoteModel(url, grid=grid)
    question = engine.question("the red circle")
    events = list(engine.stream(noise_image(grid), question, ["the red circle"], constrained=True))
    final = events[-1].generation
    assert "".join(e.delta for e in events) == final.text
    image = tmp_path / "noise.png"
    noise_image(grid).save(image)
    out = tmp_path / "answer.json"
    assert main(["segment", str(image), "the red circle", "--server", url, "--constrained", "--grid", str(grid),
                 "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["diagnostics"] == [] and len(doc["grid"]) == grid and all(len(row) == grid for row in doc["grid"])
    assert doc["text"] == final.text  # greedy: the same answer through the CLI
    assert doc["tokens"]["generated"] > 0 and doc["tokens"]["rrle"] > 0


def test_eval_keeps_requests_in_flight_and_gets_more_done(server, tmp_path, capsys):
    url, _ = server
    reports = {}
    for concurrency in (1, 4):
        rows = tmp_path / f"rows-{concurrency}.jsonl"
        assert main(["eval", "--data", str(ROOT / "examples" / "synthetic"), "--limit", "8", "--server", url,
                     "--constrained", "--concurrency", str(concurrency), "--rows", str(rows)]) == 0
        reports[concurrency] = json.loads(capsys.readouterr().out)
        assert len(rows.read_text().splitlines()) == 8
    assert reports[1]["malformed_rate"] == reports[4]["malformed_rate"] == 0.0
    assert reports[4]["grid_ciou"] == pytest.approx(reports[1]["grid_ciou"])  # the same greedy answers
    speedup = reports[4]["throughput"]["queries_per_s"] / reports[1]["throughput"]["queries_per_s"]
    print(f"eval through vllm serve: {reports[1]['throughput']} sequential, {reports[4]['throughput']} "
          f"with 4 in flight: {speedup:.2f}x")
    assert speedup > 1.0


def test_the_app_offers_the_served_model_and_answers_on_it(server, monkeypatch):
    from text4seg_demo.app.handlers import Demo
    from text4seg_demo.app.hosting import Limits

    url, _ = server
    monkeypatch.setenv("TEXT4SEG_SERVER", url)
    demo = Demo(None, Limits(public=True))  # starts on the host's served model
    name = demo.model_name
    assert name == f"{NAME} @ {url}"
    final = list(demo.analyse(str(ROOT / "examples" / "synthetic" / "images" / "000000.png"), "the green square",
                              name=name, constrained=True, refine="grabcut"))[-1]
    result = final["result"]
    assert result.model == NAME and result.quant == "server" and not result.diagnostics
    assert result.refined is not None and final["grid"] is not None
