"""The page's streamed answers measured where people see them: the app served by its web server
and driven by a real browser (Playwright with Chromium), against the same questions answered
unstreamed by the same server's ``segment`` API, taking turns (``text4seg bench --browser``)."""

from __future__ import annotations

import re
import shutil
import socket

from .manifest import Query

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium() -> str:
    found = next((path for path in map(shutil.which, CHROMIUM) if path), None)
    if found is None:
        raise RuntimeError("--browser needs Chromium (Debian: apt-get install chromium)")
    return found


def page_streaming(model: str, queries: list[Query]) -> dict:
    """Decode seconds the page reports for each query, streamed into the browser, against the
    ``segment`` API's for the same question on the same server, the one going first alternating.
    The browser shares the machine with the server, as it does when the demo runs locally."""
    try:
        from gradio_client import Client, handle_file
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        raise RuntimeError("--browser needs Playwright and gradio_client (pip install -r requirements-test.txt)") \
            from err
    from ..app import layout
    from .bench import _side_by_side

    demo = layout.build_demo(model)
    port = _free_port()
    layout.launch(demo, mcp=False, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    client = Client(url, verbose=False)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=_chromium(), args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1500, "height": 1000})

            def on_page(_, query: Query) -> float:
                page.goto(url, wait_until="networkidle")  # a fresh page: its figures are this run's
                page.locator("#image input[type=file]").set_input_files(str(query.image))
                page.locator("#expression textarea, #expression input").first.fill(query.expression)
                page.locator("#run").click()
                metrics = page.locator("#metrics")
                metrics.get_by_text("generated tokens").wait_for(timeout=300_000)
                return float(re.search(r"decode\s+([\d.]+) s", metrics.inner_text()).group(1))

            def by_api(_, query: Query) -> float:
                result = client.predict(handle_file(str(query.image)), query.expression, refine="none",
                                        api_name="/segment")
                return result["timings"]["decode"]

            on_page(None, queries[0])  # warm-up: the page, the server and the model
            by_api(None, queries[0])
            streamed, unstreamed = _side_by_side([(None, q) for q in queries], on_page, by_api, desc="page and API")
            browser.close()
    finally:
        demo.close()
    return {"n": len(queries), "mean_decode_s_streamed": sum(streamed) / len(streamed),
            "mean_decode_s": sum(unstreamed) / len(unstreamed), "overhead": sum(streamed) / sum(unstreamed)}
