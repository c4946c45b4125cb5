"""The app's actions as plain Python, without a server or a browser."""

import threading
import time
from fnmatch import fnmatch
from pathlib import Path

import pytest
from PIL import Image

from text4seg_demo.app.handlers import Demo, UserError, decoupled
from text4seg_demo.app.hosting import Limits
from text4seg_demo.inference.engine import StreamEvent

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "synthetic" / "images" / "000007.png"


@pytest.fixture(scope="module")
def demo():
    return Demo("tiny-rrle")


def test_a_run_streams_rows_then_shows_everything(demo, monkeypatch):
    monkeypatch.setattr(demo, "refresh_s", 0.01)  # a refresh every few tokens on any machine
    updates = list(demo.analyse(str(EXAMPLE), "the blue square", refine="grabcut"))
    assert updates[0]["status"].startswith("Generating") and updates[0]["compare"] is None
    streamed = [u["grid"] for u in updates[1:-1] if "grid" in u]
    assert streamed  # the grid fills in while the model writes
    final = updates[-1]
    assert "well-formed" in final["status"] and "grammar on" in final["status"]  # the bundled model's default
    picture, annotations = final["grid"]
    assert [label for _, label in annotations] == ["the blue square"]
    assert "grammar-constrained" in final["metrics"] and "R-RLE vs full" in final["metrics"]
    assert {Path(f).name for f in final["downloads"]} >= {"mask_coarse.png", "mask_refined.png", "result.json"}
    coarse, refined = final["masks"]
    assert coarse.size == refined.size == picture.size


def test_free_decoding_is_one_value_away(demo):
    final = list(demo.analyse(str(EXAMPLE), "the blue square", constrained=False, refine="none"))[-1]
    assert "grammar off" in final["status"] and "free (unconstrained)" in final["metrics"]


def test_compare_sets_both_formats_side_by_side(demo):
    final = list(demo.analyse(str(EXAMPLE), "the blue square", fmt_choice="Compare both", refine="none"))[-1]
    table = final["compare"]["table"]
    assert list(table["format"]) == ["R-RLE", "Full-length"]
    assert table["tokens"][1] > 2 * table["tokens"][0] and (table["decode ms"] > 0).all()
    assert "written by `tiny-full`" in final["compare"]["note"] and "after a warm-up" in final["compare"]["note"]


def test_bad_input_ends_in_a_message_not_an_exception(demo, tmp_path):
    assert "no image given" in list(demo.analyse(None, "the star"))[-1]["status"]
    assert "expression is empty" in list(demo.analyse(str(EXAMPLE), "  "))[-1]["status"]
    assert "class names" in list(demo.analyse(str(EXAMPLE), "", mode="Multi-class"))[-1]["status"]
    (tmp_path / "fake.png").write_text("not an image")
    assert "not a readable image" in list(demo.analyse(str(tmp_path / "fake.png"), "the star"))[-1]["status"]


def test_the_api_answers_json_and_refuses_bad_requests_with_messages(demo):
    result = demo.segment_api(str(EXAMPLE), "the blue square", refine="none")
    assert result["labels"] == ["others", "the blue square"] and result["constrained"] is True
    assert result["diagnostics"] == [] and len(result["grid"]) == 16
    with pytest.raises(UserError, match="expression is empty"):
        demo.segment_api(str(EXAMPLE), "")


def test_the_page_sees_the_latest_state_at_most_every_refresh():
    page_woke = threading.Event()

    def model():  # two bursts of 24 events; between them it waits (a test device) for the page
        for k in range(48):
            if k == 24:
                page_woke.wait(5)
            yield StreamEvent("x", "x" * k, [])
        yield "result"

    seen, start = [], time.monotonic()
    for item in decoupled(model(), every_s=0.5):
        seen.append(item)
        page_woke.set()
    assert seen[-1] == "result"
    shown = [len(e.text) for e in seen[:-1]]
    assert shown[0] == 23  # the newest of the first burst, the 23 older ones skipped
    assert shown == sorted(set(shown)) and len(shown) <= 2  # never an older state, one refresh per burst
    assert time.monotonic() - start >= 0.5 * len(shown)  # the page waits a refresh between its wake-ups


def test_the_model_runs_ahead_of_the_page():
    finished = threading.Event()

    def model():
        for k in range(48):
            yield StreamEvent("x", "x" * k, [])
        yield "result"
        finished.set()

    seen = list(decoupled(model(), every_s=0.5))
    assert finished.is_set() and seen == ["result"]  # all 49 items made before the page's first wake-up,
    # which then shows the result alone: the events it superseded are skipped


def test_an_error_in_the_model_reaches_the_page():
    def failing():
        yield StreamEvent("x", "x", [])
        raise MemoryError("out of memory")

    with pytest.raises(MemoryError):
        list(decoupled(failing()))


def test_a_public_demo_refuses_other_models_before_touching_them(monkeypatch):
    from text4seg_demo.app import handlers

    public = Demo("tiny-rrle", Limits(public=True, max_pixels=10_000, max_file_mb=1.0, max_new_tokens=50))
    touched = []
    monkeypatch.setattr(handlers, "load", lambda name, **kwargs: touched.append(name))
    monkeypatch.setattr(handlers, "prepare", lambda *args, **kwargs: touched.append("image"))
    for model in ("someone/a-huge-model", "/etc", "../assets/tiny-rrle"):
        status = list(public.analyse(str(EXAMPLE), "the blue square", name=model))[-1]["status"]
        assert "serves only tiny-rrle, tiny-full, text4seg-llava-7b-p24" in status
        with pytest.raises(UserError, match="serves only"):
            public.segment_api(str(EXAMPLE), "the blue square", model=model)
    assert touched == []  # refused before any download or file access


def test_a_demo_holds_uploads_and_answers_to_the_hosts_limits(tmp_path):
    strict = Demo("tiny-rrle", Limits(public=True, max_pixels=10_000, max_file_mb=0.5, max_new_tokens=40))
    with pytest.raises(UserError, match="million pixels"):
        strict.segment_api(str(EXAMPLE), "the blue square")  # 10k pixels allowed
    (tmp_path / "big.png").write_bytes(b"\x89PNG" + bytes(600_000))
    with pytest.raises(UserError, match="up to 0.5 MB"):
        strict.segment_api(str(tmp_path / "big.png"), "the blue square")
    Image.new("RGB", (64, 64), "white").save(tmp_path / "small.png")
    result = strict.segment_api(str(tmp_path / "small.png"), "the blue square", max_new_tokens=10_000,
                                constrained=False, refine="none")
    assert result["tokens"]["generated"] <= 40  # the host's cap, not the visitor's 10k
    with pytest.raises(UserError, match="must be positive"):
        strict.segment_api(str(tmp_path / "small.png"), "the blue square", max_new_tokens=-5)


def test_a_space_receives_the_app_and_nothing_of_training_data_or_caches(tmp_path):
    from huggingface_hub.utils import filter_repo_objects

    from text4seg_demo.app.hosting import SPACE_EXCLUDE, SPACE_INCLUDE

    root = Path(__file__).resolve().parents[2]
    files = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".git" not in p.parts]
    sent = set(filter_repo_objects(files, allow_patterns=list(SPACE_INCLUDE), ignore_patterns=list(SPACE_EXCLUDE)))
    assert {"app.py", "requirements.txt", "README.md", "assets/tiny-rrle/model.safetensors",
            "assets/tiny-full/model.safetensors", "examples/synthetic/manifest.jsonl"} <= sent
    package = {f for f in files if f.startswith("text4seg_demo/") and f.endswith(".py")}
    assert package <= sent
    assert not [f for f in sent if f.split("/")[0] in ("runs", "data", "tests", "docs") or "__pycache__" in f
                or f.endswith(".pyc")]
    # every binary file a Space receives is kept in Git LFS, as the Hub requires
    lfs = [line.split()[0] for line in (root / ".gitattributes").read_text().splitlines() if "filter=lfs" in line]
    binary = [f for f in sent if b"\0" in (root / f).read_bytes()[:8000]]
    assert {"assets/tiny-rrle/model.safetensors", "examples/synthetic/images/000007.png"} <= set(binary)
    assert [f for f in binary if not any(fnmatch(Path(f).name, pattern) for pattern in lfs)] == []
    command = (root / "README.md").read_text().split("## Deploy", 1)[1]
    assert all(f'--include "{pattern}"' in command for pattern in SPACE_INCLUDE)
    assert all(f'--exclude "{pattern}"' in command for pattern in SPACE_EXCLUDE)


def test_the_compare_api_returns_what_the_page_shows(demo):
    record = demo.compare_api(str(EXAMPLE), "the blue square")
    rrle, full = record["rrle"], record["full"]
    assert rrle["source"] == "written by its own model" and full["source"] == "written by tiny-full"
    assert not rrle["replayed"] and not full["replayed"]
    assert full["generated_tokens"] > 3 * rrle["generated_tokens"] > 0
    assert full["descriptor_tokens"] > rrle["descriptor_tokens"] > 0 and rrle["ttft_s"] > 0
    assert record["token_reduction"] == round(1 - rrle["generated_tokens"] / full["generated_tokens"], 3)
    assert record["decode_speedup"] == round(full["decode_s"] / rrle["decode_s"], 2)
    # measured alike, unstreamed: the side going first alternates from one comparison to the next
    assert demo.compare_api(str(EXAMPLE), "the blue square")["first"] != record["first"]
    with pytest.raises(UserError, match="expression is empty"):
        demo.compare_api(str(EXAMPLE), "")



def test_a_zerogpu_request_declares_the_seconds_its_answer_needs():
    from text4seg_demo.app.hosting import gpu_seconds

    released = "text4seg-llava-7b-p24"  # a 24 x 24 grid, from its name
    assert gpu_seconds(released, "rrle") < gpu_seconds(released, "full") < gpu_seconds(released, "compare")
    assert gpu_seconds(released, "rrle") > gpu_seconds("tiny-rrle", "rrle")  # 576 cells against 256
    assert gpu_seconds(released, "full", max_new_tokens=50) < gpu_seconds(released, "full")  # within its budget
    assert gpu_seconds(released, "compare") < 120  # the fixed duration it replaces


def test_a_model_on_the_hosts_server_is_a_choice_and_other_servers_are_refused(monkeypatch):
    import numpy as np
    from openai_stub import Script, serving

    from text4seg_demo.descriptors import codec

    cells = np.zeros((16, 16), int)
    cells[3, 4] = 1
    answer = codec.wrap(codec.encode(cells, ["others", "the blue square"], "rrle"), "Sure:")
    with serving(Script("text4seg-llava-7b-p16", answer)) as url:
        monkeypatch.setenv("TEXT4SEG_SERVER", url)
        public = Demo(None, Limits(public=True))  # starts on the host's served model
        name, note = public.model_name, public.model_note
        assert name == f"text4seg-llava-7b-p16 @ {url}" and url in note
        update = list(public.analyse(str(EXAMPLE), "the blue square", name=name, refine="none"))[-1]
        assert update["result"].grid.sum() == 1 and update["result"].model == "text4seg-llava-7b-p16"
        assert public.segment_api(str(EXAMPLE), "the blue square", model=name, refine="none")["quant"] == "server"
        compared = list(public.analyse(str(EXAMPLE), "the blue square", name=name, fmt_choice="Compare both",
                                       refine="none"))[-1]
        assert "the full-length side failed" in compared["status"] and compared.get("compare") is None
        elsewhere = "text4seg-llava-7b-p16 @ http://127.0.0.1:9"
        assert "serves only" in list(public.analyse(str(EXAMPLE), "the blue square", name=elsewhere))[-1]["status"]
