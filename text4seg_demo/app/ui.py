"""The Gradio demo: input on the left, the model's patch grid in the middle, the refined mask
on the right, and everything measured on the way."""

from __future__ import annotations

import gc
import json
import os
import resource
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import torch

from .. import export, render
from ..descriptors import codec
from ..evaluation.manifest import read_manifest
from ..images import BadImage, prepare
from ..inference.engine import StreamEvent
from ..inference.hub import DEFAULT_MODEL, PRESETS, ModelUnavailable, resolve
from ..inference.loading import QUANTS, load
from ..pipeline import Request, Result, segment, segment_stream
from ..refine import REFINERS, RefinerError, build_refiner

PAPER = "https://arxiv.org/abs/2410.09855"
CSS = """
#answer { max-height: 280px; overflow-y: auto; }
#metrics table { font-size: 0.9em; }
"""
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FORMATS = {"R-RLE": "rrle", "Full-length": "full", "Compare both": "compare"}
USER_ERRORS = (ValueError, BadImage, ModelUnavailable, RefinerError)
OUT_OF_MEMORY = (MemoryError, torch.cuda.OutOfMemoryError)
FULL_PARTNER = {"tiny-rrle": "tiny-full"}  # the model that writes full-length descriptors natively
RRLE_PARTNER = {v: k for k, v in FULL_PARTNER.items()}


try:  # Hugging Face ZeroGPU: a GPU is attached only inside functions marked with spaces.GPU
    import spaces

    on_gpu = spaces.GPU(duration=120)
except ImportError:
    def on_gpu(fn):
        return fn


class Models:
    """Loaded models by (name, precision); at most ``size`` kept, one load at a time."""

    def __init__(self, size: int = 2):
        self.size, self._models, self._lock = size, OrderedDict(), threading.Lock()

    def get(self, name: str, quant: str):
        key = (name, quant)
        with self._lock:
            if key not in self._models:
                self._models[key] = load(name, quant=quant, log=lambda m: print(m, flush=True))
                while len(self._models) > self.size:
                    self._models.popitem(last=False)
            self._models.move_to_end(key)
            return self._models[key]

    def drop_caches(self) -> None:
        for engine in self._models.values():
            engine.clear_caches()


class Refiners:
    def __init__(self):
        self._built, self._lock = {}, threading.Lock()

    def get(self, name: str):
        if name == "none":
            return None
        with self._lock:
            if name not in self._built:
                self._built[name] = build_refiner(name)
            return self._built[name]


def choose_default(requested: str | None = None) -> tuple[str, str]:
    """The model to start on, and a sentence saying why."""
    requested = requested or os.environ.get("TEXT4SEG_MODEL")
    if requested:
        return requested, f"Running **{requested}** (chosen with TEXT4SEG_MODEL or --model)."
    if torch.cuda.is_available():
        try:
            resolve("text4seg-llava-7b-p24")
            return "text4seg-llava-7b-p24", "Running the released **Text4Seg LLaVA-1.5-7B** (24 x 24 grid) in 4-bit on the GPU."
        except ModelUnavailable as err:
            reason = f"the 7B checkpoint could not be had ({err})"
    else:
        reason = "there is no GPU"
    return DEFAULT_MODEL, (f"Running the bundled **tiny R-RLE** model because {reason}. It knows only coloured "
                           "shapes (try the synthetic examples); pick `text4seg-llava-7b-p24` under *Advanced* on a GPU "
                           "machine for real photos.")


# --------------------------------------------------------------------------- formatting


def metrics_table(result: Result, peak: str) -> str:
    t, k = result.timings, result.tokens
    rows = [
        ("model", f"`{result.model}`"), ("device / precision", f"{result.device} / {result.quant}"),
        ("generated tokens", k["generated"]),
        ("descriptor tokens, R-RLE vs full", f"{k['rrle']} vs {k['full']} ({k['reduction']:.0%} fewer with R-RLE)"),
        ("time to first token", f"{t.get('ttft', 0):.3f} s"), ("decode", f"{t.get('decode', 0):.3f} s"),
        ("tokens / s", k.get("per_second", "–")),
        ("refine", f"{t['refine']:.3f} s ({result.refine.get('refiner')})" if "refine" in t else "–"),
        ("total", f"{t.get('total', 0):.3f} s"), ("peak memory", peak),
    ]
    text = "| | |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    if result.diagnostics:
        text += "\n\n**The answer was repaired:** " + "; ".join(d.message for d in result.diagnostics)
    if result.notes:
        text += "\n\n" + " ".join(f"_{n}._" for n in result.notes)
    return text


def peak_memory() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (GPU)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process)"


def write_downloads(result: Result, root: Path) -> list[str]:
    """Mask PNGs, COCO RLE JSON, descriptor text and metrics JSON for one result."""
    root.mkdir(parents=True, exist_ok=True)
    files = [export.save_binary_png(result.coarse > 0, root / "mask_coarse.png")]
    if result.refined is not None:
        files.append(export.save_binary_png(result.refined > 0, root / "mask_refined.png"))
    final = result.refined if result.refined is not None else result.coarse
    (root / "mask_coco_rle.json").write_text(json.dumps(export.coco_json(final, result.labels)))
    (root / "descriptors.txt").write_text(result.text)
    (root / "result.json").write_text(json.dumps(result.to_json(), indent=2))
    files += [root / "mask_coco_rle.json", root / "descriptors.txt", root / "result.json"]
    return [str(f) for f in files]


def _sweep(root: Path, age_s: float = 900) -> None:
    """Delete result folders older than ``age_s``: nothing a user sent is kept for long."""
    now = time.time()
    for child in root.iterdir() if root.exists() else []:
        if now - child.stat().st_mtime > age_s:
            shutil.rmtree(child, ignore_errors=True)


# --------------------------------------------------------------------------- app


def build_demo(default_model: str | None = None) -> gr.Blocks:
    model_name, model_note = choose_default(default_model)
    models, refiners = Models(), Refiners()
    try:  # load at start-up (on ZeroGPU too), so the first request does not wait for it
        models.get(model_name, "auto")
    except (ModelUnavailable, OSError, RuntimeError, ValueError) as err:
        model_note += f"\n\n⚠️ {model_name} could not be loaded: {err}. Pick another model under *Advanced*."
    scratch = Path(tempfile.mkdtemp(prefix="text4seg-results-"))

    def parse_request(expression, mode, classes, fmt, grid, constrained, refine, points, seed, max_new):
        class_list = [c.strip() for c in (classes or "").replace("|", ",").split(",") if c.strip()]
        if mode == "Multi-class" and not class_list:
            raise ValueError("multi-class mode needs class names, e.g. 'cat, grass, sky'")
        request = Request(expression=(expression or "").strip(), classes=class_list if mode == "Multi-class" else None,
                          fmt=fmt, grid=int(grid) if grid else None, constrained=bool(constrained),
                          max_new_tokens=int(max_new) if max_new else None, sam_points=int(points),
                          seed=int(seed))
        request.labels()  # validates, with a message for people
        return request

    def out_of_memory(err) -> str:
        """Free what can be freed and say what to try instead."""
        models.drop_caches()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return (f"out of memory ({type(err).__name__}); memory was freed. Try a smaller image, 4-bit precision "
                "or the tiny model")

    def run_one(engine, image, request, refiner):
        try:
            return segment(engine, image, request, refiner)
        except OUT_OF_MEMORY as err:
            raise ValueError(out_of_memory(err)) from None

    def analyse(image_path, expression, mode, classes, name, quant, fmt_choice, grid, constrained, refine, points,
                seed, max_new):
        """The UI's run: stream the answer into the grid, then show masks, metrics and files."""
        fmt = FORMATS.get(fmt_choice, "rrle")
        if fmt == "compare":  # R-RLE first, by the R-RLE sibling of a full-length model
            name = RRLE_PARTNER.get(name, name)
        try:
            image, notes = prepare(image_path)
            request = parse_request(expression, mode, classes, "rrle" if fmt == "compare" else fmt, grid, constrained,
                                    refine, points, seed, max_new)
            engine = models.get(name, quant)
            refiner = refiners.get(refine)
        except USER_ERRORS as err:
            yield {status: f"⚠️ {err}"}
            return
        except (OSError, RuntimeError) as err:
            yield {status: f"⚠️ could not load what was asked for: {err}. Pick another model or refiner."}
            return
        yield {status: "Generating…" + (" " + "; ".join(notes) if notes else ""), compare_box: gr.update(visible=False)}
        result, rows_shown = None, -1
        labels = [codec.OTHERS, *request.labels()]
        size = request.grid or engine.settings.grid
        try:
            for item in segment_stream(engine, image, request, refiner):
                if isinstance(item, StreamEvent) and not item.done:
                    update = {answer: render.highlight(item.text, labels)}
                    if len(item.rows) != rows_shown:  # redraw the grid only when a row completes
                        rows_shown = len(item.rows)
                        partial = np.zeros((size, size), dtype=np.int32)
                        for r, row in enumerate(item.rows[:size]):
                            partial[r, : len(row)] = [labels.index(c) if c in labels else 0 for c in row[:size]]
                        update[grid_view] = render.grid_view(image, partial, labels, rows_done=rows_shown)
                    yield update
                elif isinstance(item, Result):
                    result = item
        except OUT_OF_MEMORY as err:
            yield {status: f"⚠️ {out_of_memory(err)}."}
            return
        except USER_ERRORS as err:
            yield {status: f"⚠️ {err}"}
            return
        result.notes[:0] = notes
        _sweep(scratch)
        files = write_downloads(result, scratch / f"{time.time_ns()}")
        colours = render.colour_map(result.labels)
        updates = {
            status: _status_line(result),
            answer: gr.update(value=render.highlight(result.text, result.labels), color_map=colours),
            grid_view: gr.update(value=render.grid_view(image, result.grid, result.labels), color_map=colours),
            masks: (render.overlay(image, result.coarse), render.overlay(image, result.refined)
                    if result.refined is not None else render.overlay(image, result.coarse)),
            metrics: metrics_table(result, peak_memory()), downloads: files,
        }
        if fmt == "compare":
            updates.update(compare(engine, name, quant, image, request, result))
        yield updates

    def compare(engine, name, quant, image, request, rrle_result):
        """The same input written as full-length descriptors: by the full-length model where one
        exists, else by replaying the full-length text through this model."""
        partner = FULL_PARTNER.get(name)
        request = Request(**{**request.__dict__, "fmt": "full"})
        if partner:
            full = run_one(models.get(partner, quant), image, request, None)
            side, how = full, f"written by `{partner}`"
            full_tokens, full_decode = full.tokens["generated"], full.timings["decode"]
        else:
            question = engine.question(request.labels()[0], request.classes)
            answer_text = codec.wrap(codec.encode(rrle_result.grid, rrle_result.labels, "full"), "Sure:")
            replay = engine.replay(image, question, answer_text)
            side, how = rrle_result, "**replayed**: the full-length text of this grid force-decoded through the model"
            full_tokens, full_decode = replay.tokens["generated"], replay.timings["decode"]
        rows = [("R-RLE", rrle_result.tokens["generated"], rrle_result.timings["decode"]),
                ("Full-length", full_tokens, full_decode)]
        table = pd.DataFrame([(f, t, s * 1000) for f, t, s in rows], columns=["format", "tokens", "decode ms"])
        return {compare_box: gr.update(visible=True),
                compare_grid: render.grid_view(image, side.grid, side.labels),
                compare_note: f"Full-length side {how}. R-RLE used {1 - rows[0][1] / max(1, rows[1][1]):.0%} fewer "
                              f"tokens and decoded {rows[1][2] / max(rows[0][2], 1e-9):.1f}x faster.",
                compare_table: table, tokens_chart: table, time_chart: table}

    def api_segment(image_file, expression, classes="", fmt="", constrained=False, refine="auto", points=10,
                    seed=0, max_new_tokens=0, model="", quant="auto"):
        """The ``segment`` API: the same JSON as ``text4seg segment --json``."""
        try:
            image, notes = prepare(image_file)
            mode = "Multi-class" if classes else "Referring"
            request = parse_request(expression, mode, classes, fmt or None, None, constrained, refine, points, seed,
                                    max_new_tokens)
            engine = models.get(model or model_name, quant)
            result = run_one(engine, image, request, refiners.get(refine))
        except USER_ERRORS as err:
            raise gr.Error(str(err)) from None
        result.notes[:0] = notes
        return result.to_json()

    with gr.Blocks(title="Text4Seg demo", delete_cache=(600, 900)) as demo:
        gr.Markdown(
            "# Text4Seg: segmentation by writing text\n"
            f"A multimodal LLM answers *where is X?* with **one label per image patch**, compressed row by row "
            f"(R-RLE); SAM-style refinement then sharpens that coarse patch mask into a pixel mask. "
            f"[Paper]({PAPER}) · Left: your input · middle: the model's raw patch grid · right: the refined mask.\n\n"
            + model_note)
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                image_in = gr.Image(label="Image", type="filepath", image_mode=None,
                                    sources=["upload", "clipboard", "webcam"], height=300)
                mode = gr.Radio(["Referring", "Multi-class"], value="Referring", label="Question")
                expression = gr.Textbox(label="Referring expression", placeholder="e.g. the red circle", max_lines=1)
                classes = gr.Textbox(label="Classes (multi-class mode)", placeholder="cat, grass, sky", visible=False)
                run = gr.Button("Segment", variant="primary", elem_id="run")
                with gr.Accordion("Advanced", open=False):
                    model_in = gr.Dropdown(list(dict.fromkeys([model_name, *PRESETS])), value=model_name,
                                           allow_custom_value=True, label="Model (preset, hub id or directory)")
                    quant = gr.Dropdown(list(QUANTS), value="auto", label="Precision")
                    fmt_in = gr.Radio(list(FORMATS), value="R-RLE", label="Descriptor format")
                    grid_in = gr.Number(value=None, precision=0, label="Grid size (empty: the model's own)")
                    constrained = gr.Checkbox(label="Grammar-constrained decoding (always well formed)")
                    refine = gr.Dropdown([r for r in REFINERS], value="auto", label="Refiner")
                    points = gr.Slider(1, 30, value=10, step=1, label="SAM points per side")
                    seed = gr.Number(value=0, precision=0, label="Seed")
                    max_new = gr.Number(value=None, precision=0, label="Max new tokens (empty: worst case)")
            with gr.Column(scale=1, min_width=300):
                answer = gr.HighlightedText(label="Raw answer (labels colour-linked to the grid)",
                                            combine_adjacent=False, show_legend=True, elem_id="answer")
                grid_view = gr.AnnotatedImage(label="Patch grid (hover a patch for its label)", elem_id="grid")
            with gr.Column(scale=1, min_width=300):
                masks = gr.ImageSlider(label="Coarse ⟷ refined mask (drag to compare)", type="pil", elem_id="refined")
                status = gr.Markdown(elem_id="status")
                metrics = gr.Markdown(elem_id="metrics")
                downloads = gr.File(label="Downloads", file_count="multiple", elem_id="downloads")
        with gr.Group(visible=False) as compare_box:
            gr.Markdown("### R-RLE vs full-length on this input")
            with gr.Row():
                compare_grid = gr.AnnotatedImage(label="Full-length descriptors")
                with gr.Column():
                    compare_note = gr.Markdown()
                    compare_table = gr.Dataframe(interactive=False)
                    with gr.Row():
                        tokens_chart = gr.BarPlot(x="format", y="tokens", color="format", title="Generated tokens")
                        time_chart = gr.BarPlot(x="format", y="decode ms", color="format", title="Decode time (ms)")
        synthetic = read_manifest(EXAMPLES / "synthetic")
        gr.Examples([[str(q.image), q.expression] for q in synthetic], [image_in, expression],
                    label="Synthetic scenes (the domain of the bundled tiny models; never trained on)")
        photos = sorted((EXAMPLES / "photos").glob("*.jpg"))
        if photos:
            gr.Examples([[str(p), _example_expression(p)] for p in photos], [image_in, expression],
                        label="Photos (for the released 7B checkpoint)")

        mode.change(lambda m: (gr.update(visible=m == "Multi-class"), gr.update(visible=m == "Referring")), mode,
                    [classes, expression], api_visibility="private")
        inputs = [image_in, expression, mode, classes, model_in, quant, fmt_in, grid_in, constrained, refine, points,
                  seed, max_new]
        outputs = [status, answer, grid_view, masks, metrics, downloads, compare_box, compare_grid, compare_note,
                   compare_table, tokens_chart, time_chart]
        analyse, api_segment = on_gpu(analyse), on_gpu(api_segment)
        run.click(analyse, inputs, outputs, api_visibility="private")
        expression.submit(analyse, inputs, outputs, api_visibility="private")

        api_image = gr.File(visible=False, type="filepath")
        api_classes = gr.Textbox(visible=False, value="")
        api_format = gr.Textbox(visible=False, value="")
        api_constrained = gr.Checkbox(visible=False, value=False)
        api_refine = gr.Textbox(visible=False, value="auto")
        api_points = gr.Number(visible=False, value=10, precision=0)
        api_seed = gr.Number(visible=False, value=0, precision=0)
        api_max = gr.Number(visible=False, value=0, precision=0)
        api_model = gr.Textbox(visible=False, value="")
        api_quant = gr.Textbox(visible=False, value="auto")
        api_out = gr.JSON(visible=False)
        api_button = gr.Button(visible=False)
        api_button.click(api_segment, [api_image, expression, api_classes, api_format, api_constrained, api_refine,
                                       api_points, api_seed, api_max, api_model, api_quant], api_out,
                         api_name="segment")
    demo.queue(default_concurrency_limit=1, max_size=64)
    return demo


def launch(demo: gr.Blocks, **kwargs):
    """Start the server with the demo's styling (Gradio 6 takes CSS at launch)."""
    return demo.launch(css=CSS, **kwargs)


def _status_line(result: Result) -> str:
    fg = int((result.grid > 0).sum())
    state = "⚠️ repaired answer" if result.diagnostics else "✅ well-formed answer"
    return f"{state} · {fg} of {result.grid.size} patches labelled · {result.timings.get('total', 0):.2f} s"


def _example_expression(path: Path) -> str:
    side = path.with_suffix(".txt")
    return side.read_text().strip() if side.is_file() else ""
