"""The public app under load through its API: 200 requests from 8 threads, bad input mixed in."""

import gc
import io
import json
import struct
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

from text4seg_demo.app import layout
from text4seg_demo.masks import load_mask, to_grid

ROOT = Path(__file__).resolve().parents[2]
SYNTHETIC = ROOT / "examples" / "synthetic"


def resident_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def bomb_png(path: Path, side: int = 40000) -> Path:
    """A PNG whose header says ``side`` x ``side`` (1.6 billion pixels) in a few bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def cases(tmp: Path) -> list[tuple[str, tuple, dict, object]]:
    """(name, (image, expression), options, expected): expected is a truth mask path (or None for
    an empty answer) for a good request, else a piece of the message a bad one must get."""
    rows = [json.loads(line) for line in (SYNTHETIC / "manifest.jsonl").read_text().splitlines()]
    good = [(f"good {r['expression']}", (SYNTHETIC / r["image"], r["expression"]), {}, SYNTHETIC / r["mask"])
            for r in rows[:4]]
    base = Image.open(SYNTHETIC / rows[0]["image"]).convert("RGB")
    (tmp / "text.png").write_text("this is not a picture")
    png = io.BytesIO()
    base.save(png, "PNG")
    (tmp / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    Image.new("RGB", (1, 1), "red").save(tmp / "one.png")
    Image.fromarray(np.asarray(base.convert("L")).astype(np.uint16) * 257).save(tmp / "deep.png")
    base.convert("CMYK").save(tmp / "cmyk.jpg")
    base.save(tmp / "anim.gif", save_all=True, append_images=[base.rotate(90)], duration=100, loop=0)
    image, expression = good[0][1]
    odd = [  # unusual but valid: answered, with a note where something was changed
        ("16-bit PNG", (tmp / "deep.png", expression), {}, "rescaled"),
        ("CMYK JPEG", (tmp / "cmyk.jpg", expression), {}, "CMYK"),
        ("animated GIF", (tmp / "anim.gif", expression), {}, "first frame"),
        ("1 x 1 image", (tmp / "one.png", expression), {}, ""),
        ("huge budget", (image, expression), {"max_new_tokens": 10**12}, ""),
    ]
    bad = [
        ("empty expression", (image, "  "), {}, "expression is empty"),
        ("10k-character expression", (image, "x" * 10_000), {}, "characters long"),
        ("<seg> in the expression", (image, "the <seg> circle"), {}, "reserves"),
        ("a run in the expression", (image, "the red *3 circle"), {}, "reserves"),
        ("text named .png", (tmp / "text.png", expression), {}, "not a readable image"),
        ("truncated PNG", (tmp / "truncated.png", expression), {}, "not a readable image"),
        ("40000 x 40000 PNG", (bomb_png(tmp / "bomb.png"), expression), {}, "downscale it first"),
        ("unknown refiner", (image, expression), {"refine": "magic"}, "unknown refiner"),
        ("forbidden model", (image, expression), {"model": "someone/huge-model"}, "serves only"),
        ("a server path as model", (image, expression), {"model": "/etc"}, "serves only"),
        ("negative budget", (image, expression), {"max_new_tokens": -5}, "must be positive"),
        ("negative points", (image, expression), {"points": -3}, "between 1 and"),
        ("huge seed", (image, expression), {"seed": 10**30}, "seed must be"),
    ]
    return good + [(n, a, o, ("note", e)) for n, a, o, e in odd] + [(n, a, o, ("error", e)) for n, a, o, e in bad]


@pytest.mark.slow
def test_two_hundred_requests_with_bad_input_mixed_in_lose_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXT4SEG_PUBLIC", "1")
    demo = layout.build_demo("tiny-rrle")
    port = layout_port()
    layout.launch(demo, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    server = f"http://127.0.0.1:{port}/"
    try:
        catalogue = cases(tmp_path)
        plan = [catalogue[i % len(catalogue)] for i in range(200)]

        clients = threading.local()  # one API client per sending thread, as a real caller keeps

        def send(case):
            name, (image, expression), options, expected = case
            if not hasattr(clients, "client"):
                clients.client = Client(server, verbose=False)
            client = clients.client
            try:
                result = client.predict(handle_file(str(image)), expression, api_name="/segment",
                                        **{"refine": "none", **options})
                return name, expected, result, None
            except Exception as err:  # the API's error, with the app's message
                return name, expected, None, str(err)

        with ThreadPoolExecutor(8) as pool:  # two warm-up rounds, then the measured run
            list(pool.map(send, catalogue * 2))
            gc.collect()
            warm = resident_mb()
            answers = list(pool.map(send, plan))
        gc.collect()
        after = resident_mb()

        assert len(answers) == 200  # none lost
        for name, expected, result, error in answers:
            if isinstance(expected, tuple) and expected[0] == "error":
                assert error is not None and expected[1] in error, (name, error)
            elif isinstance(expected, tuple):
                assert error is None and result["labels"][0] == "others", (name, error)
                assert not expected[1] or any(expected[1] in note for note in result["notes"]), (name, result["notes"])
            else:  # good: answered right, on the grid
                assert error is None, (name, error)
                truth = to_grid(load_mask(expected).astype(np.uint8), 16).astype(bool)
                answer = np.asarray(result["grid"]) > 0
                iou = (answer & truth).sum() / max((answer | truth).sum(), 1)
                assert (iou >= 0.5) if truth.any() else not answer.any(), (name, iou)
        assert Client(server, verbose=False).predict(handle_file(str(catalogue[0][1][0])), catalogue[0][1][1],
                                                     api_name="/segment", refine="none")["labels"][0] == "others"
        print(f"\nresident memory: {warm:.0f} MB after the warm-up, {after:.0f} MB after 200 requests")
        assert after <= 1.15 * warm, (warm, after)  # no growth per request
    finally:
        demo.close()


def layout_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
