import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from PIL import Image

from text4seg_demo.app import handlers, layout

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "synthetic" / "images" / "000007.png"  # its query: the blue square


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    demo = layout.build_demo("tiny-rrle")
    port = free_port()
    layout.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, show_error=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server, verbose=False)


def call(client, image, expression, **kwargs):
    return client.predict(handle_file(str(image)) if image else None, expression, api_name="/segment", **kwargs)


def error_of(client, image, expression, **kwargs):
    with pytest.raises(Exception) as err:
        call(client, image, expression, **kwargs)
    return str(err.value)


def test_segment_returns_a_well_formed_result(client):
    result = call(client, EXAMPLE, "the blue square", refine="grabcut")
    assert len(result["grid"]) == 16 and all(len(r) == 16 for r in result["grid"])
    assert result["labels"][0] == "others" and "the blue square" in result["labels"]
    assert "<seg>" in result["text"] and result["diagnostics"] == []
    assert result["tokens"]["generated"] > 0 and result["tokens"]["full"] > result["tokens"]["rrle"]
    assert {"ttft", "decode", "total", "refine"} <= set(result["timings"])
    assert result["model"] == "tiny-rrle" and result["device"] == "cpu" and result["quant"] == "fp32"
    assert result["refine"]["refiner"] == "grabcut"


def test_compare_is_an_api_endpoint_with_the_pages_figures(client):
    record = client.predict(handle_file(str(EXAMPLE)), "the blue square", api_name="/compare")
    assert set(record) == {"rrle", "full", "first", "token_reduction", "decode_speedup"}
    assert record["full"]["generated_tokens"] > record["rrle"]["generated_tokens"] > 0
    assert record["full"]["source"] == "written by tiny-full"


def test_the_apis_are_mcp_tools_described_by_their_docstrings(server):
    import json
    from urllib.request import urlopen

    with urlopen(server + "gradio_api/mcp/schema", timeout=30) as response:
        tools = {tool["name"]: tool for tool in json.load(response)}
    assert {"segment", "compare"} <= set(tools)
    assert "label per image patch" in tools["segment"]["description"]
    assert {"image", "expression", "refine"} <= set(tools["segment"]["inputSchema"]["properties"])


def test_bad_inputs_get_messages_and_the_app_stays_up(client, tmp_path):
    assert "no image given" in error_of(client, None, "the star")
    assert "expression is empty" in error_of(client, EXAMPLE, "   ")
    assert "characters long" in error_of(client, EXAMPLE, "the red circle " * 30)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert "not a readable image" in error_of(client, tmp_path / "broken.png", "the star")
    assert "tiny-rrle" in error_of(client, EXAMPLE, "the star", model="nobody/no-such-model")
    assert "grabcut" in error_of(client, EXAMPLE, "the star", refine="sam")  # no SAM weights offline
    assert call(client, EXAMPLE, "the star", refine="none")["labels"][0] == "others"  # still up


def test_odd_images_are_handled_and_said(client, tmp_path):
    base = Image.open(EXAMPLE).convert("RGB")
    huge = base.resize((5000, 3000))
    huge.save(tmp_path / "huge.png")
    assert any("downscaled" in n for n in call(client, tmp_path / "huge.png", "the star", refine="none")["notes"])
    base.convert("L").save(tmp_path / "gray.png")
    assert any("grayscale" in n for n in call(client, tmp_path / "gray.png", "the star", refine="none")["notes"])
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(tmp_path / "rgba.png")
    assert any("transparent" in n for n in call(client, tmp_path / "rgba.png", "the star", refine="none")["notes"])
    deep = (np.asarray(base.convert("L")).astype(np.uint16) * 257)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert any("rescaled" in n for n in call(client, tmp_path / "deep.png", "the star", refine="none")["notes"])
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise
    base.save(tmp_path / "rotated.jpg", exif=exif)
    rotated = call(client, tmp_path / "rotated.jpg", "the star", refine="none")
    assert any("EXIF" in n for n in rotated["notes"])


@pytest.mark.slow
def test_out_of_memory_is_a_message(tmp_path, monkeypatch):
    def exhausted(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(handlers, "segment", exhausted)
    demo = layout.build_demo("tiny-rrle")
    port = free_port()
    layout.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, show_error=True, quiet=True)
    try:
        message = error_of(Client(f"http://127.0.0.1:{port}/", verbose=False), EXAMPLE, "the star")
        assert "out of memory" in message and "freed" in message
    finally:
        demo.close()


@pytest.mark.slow
def test_twenty_requests_from_four_threads_all_complete(client, server):
    expressions = ["the blue square", "the star", "all circles", "the small square"] * 5

    def one(expression):
        local = Client(server, verbose=False) if threading.current_thread() is not threading.main_thread() else client
        return call(local, EXAMPLE, expression, refine="none")

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, expressions))
    assert len(results) == 20
    assert [r["labels"][1] for r in results] == expressions


@pytest.mark.browser
def test_browser_runs_an_example_and_renders_everything(server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    chromium = "/usr/bin/chromium"
    if not os.path.exists(chromium):
        pytest.fail("Debian chromium is not installed: .ci/run installs it (apt-get install chromium)")
    shot = Path(os.environ.get("TEXT4SEG_SCREENSHOT", tmp_path / "app.png"))
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.goto(server, wait_until="networkidle")
        page.get_by_text("Synthetic scenes").wait_for()
        page.get_by_text("the blue square", exact=True).first.click()
        # an example fills the inputs through a round trip of its own: a run clicked before it lands
        # would segment nothing
        playwright.expect(page.locator("#expression input")).to_have_value("the blue square", timeout=30_000)
        page.locator("#image img").first.wait_for(timeout=30_000)
        page.locator("#run").click()
        page.locator("#metrics").get_by_text("generated tokens").wait_for(timeout=120_000)
        assert page.locator("#grid img").count() >= 1
        assert page.locator("#refined img").count() >= 1
        assert "R-RLE vs full" in page.locator("#metrics").inner_text()
        assert page.locator("#answer").inner_text().count("others") >= 1
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 20_000


@pytest.mark.browser
def test_the_browser_bench_reads_each_answers_decode_time_off_the_page():
    pytest.importorskip("playwright.sync_api")
    from text4seg_demo.evaluation.browser import page_streaming
    from text4seg_demo.evaluation.manifest import read_manifest

    queries = read_manifest(ROOT / "examples" / "synthetic", limit=2)
    report = page_streaming("tiny-rrle", queries)
    assert report["n"] == 2 and report["mean_decode_s_streamed"] > 0 and report["mean_decode_s"] > 0
    assert report["overhead"] == pytest.approx(report["mean_decode_s_streamed"] / report["mean_decode_s"])
