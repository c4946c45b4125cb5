"""The Gradio page: input on the left, the model's patch grid in the middle, the refined mask on
the right, and everything measured on the way. Components and wiring only; what each action
does lives in ``handlers.py``."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
from gradio.data_classes import FileData

from ..evaluation.manifest import read_manifest
from ..inference.devices import QUANTS
from ..inference.hub import PRESETS
from ..refine import REFINERS
from .handlers import FORMATS, Demo, UserError, constrained_default
from .hosting import Limits, gpu_seconds

PAPER = "https://arxiv.org/abs/2410.09855"
CSS = """
#answer { max-height: 280px; overflow-y: auto; }
#metrics table { font-size: 0.9em; }
"""
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


try:  # Hugging Face ZeroGPU: a GPU is attached only inside functions marked with spaces.GPU, for the
    import spaces  # seconds that ``seconds`` (called with the function's own arguments) declares

    def on_gpu(fn, seconds):
        return spaces.GPU(duration=seconds)(fn)
except ImportError:
    def on_gpu(fn, seconds):
        return fn


def build_demo(default_model: str | None = None, public: bool = False) -> gr.Blocks:
    """The page on ``default_model``; ``public`` (or a Space) limits what visitors may ask for."""
    limits = Limits.from_env(public)
    demo_state = Demo(default_model, limits)
    served = demo_state.served
    models = [*limits.allowed_models, *served] if limits.public else [demo_state.model_name, *PRESETS, *served]

    with gr.Blocks(title="Text4Seg demo", delete_cache=(600, 900)) as demo:
        gr.Markdown(
            "# Text4Seg: segmentation by writing text\n"
            f"A multimodal LLM answers *where is X?* with **one label per image patch**, compressed row by row "
            f"(R-RLE); SAM-style refinement then sharpens that coarse patch mask into a pixel mask. "
            f"[Paper]({PAPER}) · Left: your input · middle: the model's raw patch grid · right: the refined mask.\n\n"
            + demo_state.model_note)
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=300):
                image_in = gr.Image(label="Image", type="filepath", image_mode=None,
                                    sources=["upload", "clipboard", "webcam"], height=300, elem_id="image")
                mode = gr.Radio(["Referring", "Multi-class"], value="Referring", label="Question")
                expression = gr.Textbox(label="Referring expression", placeholder="e.g. the red circle", max_lines=1,
                                        elem_id="expression")
                classes = gr.Textbox(label="Classes (multi-class mode)", placeholder="cat, grass, sky", visible=False)
                constrained = gr.Checkbox(value=constrained_default(demo_state.model_name),
                                          label="Grammar-constrained decoding (always well formed; untick to see "
                                                "the model's raw behaviour)")
                run = gr.Button("Segment", variant="primary", elem_id="run")
                with gr.Accordion("Advanced", open=False):
                    model_in = gr.Dropdown(list(dict.fromkeys(models)), value=demo_state.model_name,
                                           allow_custom_value=not limits.public,
                                           label="Model" if limits.public else "Model (preset, hub id, directory or MODEL @ SERVER_URL)")
                    quant = gr.Dropdown(list(QUANTS), value="auto", label="Precision")
                    fmt_in = gr.Radio(list(FORMATS), value="R-RLE", label="Descriptor format")
                    grid_in = gr.Number(value=0, precision=0, minimum=0, label="Grid size (0: the model's own)")
                    refine = gr.Dropdown([r for r in REFINERS], value="auto", label="Refiner")
                    points = gr.Slider(1, 30, value=10, step=1, label="SAM points per side")
                    seed = gr.Number(value=0, precision=0, label="Seed")
                    max_new = gr.Number(value=0, precision=0, minimum=0, label="Max new tokens (0: the most a grid's answer can take)")
            with gr.Column(scale=1, min_width=300):
                answer = gr.HighlightedText(label="Raw answer (labels colour-linked to the grid)",
                                            combine_adjacent=False, show_legend=True, elem_id="answer")
                grid_view = gr.AnnotatedImage(label="Patch grid (hover a patch for its label)", elem_id="grid")
            with gr.Column(scale=1, min_width=300):
                masks = gr.ImageSlider(label="Coarse ⟷ refined mask (drag to compare)", type="pil", elem_id="refined")
                status = gr.Markdown(elem_id="status")
                metrics = gr.Markdown(elem_id="metrics")
                downloads = gr.File(label="Downloads", file_count="multiple", elem_id="downloads")
                gr.DeepLinkButton(value="Copy a link to this result", copied_value="Link copied")
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

        def shown(update: dict) -> dict:
            """A handler's plain update as component updates."""
            out = {}
            colours = update.get("colours")
            for key, component in (("status", status), ("metrics", metrics), ("masks", masks),
                                   ("downloads", downloads)):
                if key in update:
                    out[component] = update[key]
            for key, component in (("answer", answer), ("grid", grid_view)):
                if key in update:
                    out[component] = gr.update(value=update[key], color_map=colours) if colours else update[key]
            if "compare" in update:
                side = update["compare"]
                out[compare_box] = gr.update(visible=side is not None)
                if side is not None:
                    top = lambda column: [0, max(1.0, float(side["table"][column].max()) * 1.15)]  # noqa: E731
                    out.update({compare_grid: side["grid"], compare_note: side["note"], compare_table: side["table"],
                                tokens_chart: gr.update(value=side["table"], y_lim=top("tokens")),
                                time_chart: gr.update(value=side["table"], y_lim=top("decode ms"))})
            return out

        def analyse(*values):
            for update in demo_state.analyse(*values):
                yield shown(update)

        def segment(image: FileData, expression: str, classes: str = "", fmt: str = "",
                    constrained: bool | None = None, refine: str = "auto", points: int = 10, seed: int = 0,
                    max_new_tokens: int = 0, model: str = "", quant: str = "auto") -> dict:
            """Segment what a referring expression names in an image, by a Text4Seg model writing one
            label per image patch; returns the grid, labels, answer text, token counts and timings.

            Args:
                image: the picture (PNG, JPEG or WebP)
                expression: what to segment, e.g. "the red circle"
                classes: comma-separated class names for a multi-class question instead
                fmt: descriptor format, "rrle" or "full" (empty: the model's own)
                constrained: grammar-constrained decoding (empty: on for the bundled models)
                refine: none, auto, grabcut, sam, sam-vit_l, sam-vit_b or sam-lite
                points: SAM point prompts per side
                seed: seed of the SAM point sampling
                max_new_tokens: answer budget (0: the worst case for the grid)
                model: a preset name (empty: the app's model)
                quant: auto, 4bit, 8bit, bf16, fp16 or fp32
            """
            path = image.get("path") if isinstance(image, dict) else image  # FileData arrives as its dict
            try:
                return demo_state.segment_api(path, expression, classes, fmt, constrained, refine, points, seed,
                                              max_new_tokens, model, quant)
            except UserError as err:
                raise gr.Error(str(err)) from None

        def compare(image: FileData, expression: str, model: str = "", quant: str = "auto") -> dict:
            """R-RLE against full-length descriptors on one image and expression, as *Compare both*
            shows it: for each side the generated and descriptor tokens, time to first token and
            decode seconds (model work only) and who wrote it (its own model, or replayed), then
            the token reduction and the decode speed-up.

            Args:
                image: the picture (PNG, JPEG or WebP)
                expression: what to segment, e.g. "the red circle"
                model: a preset name (empty: the app's model)
                quant: auto, 4bit, 8bit, bf16, fp16 or fp32
            """
            path = image.get("path") if isinstance(image, dict) else image
            try:
                return demo_state.compare_api(path, expression, model, quant)
            except UserError as err:
                raise gr.Error(str(err)) from None

        inputs = [image_in, expression, mode, classes, model_in, quant, fmt_in, grid_in, constrained, refine, points,
                  seed, max_new]
        outputs = [status, answer, grid_view, masks, metrics, downloads, compare_box, compare_grid, compare_note,
                   compare_table, tokens_chart, time_chart]
        analyse = on_gpu(analyse, lambda image, expression, mode, classes, model, quant, fmt, grid, *rest:
                         gpu_seconds(model or demo_state.model_name, FORMATS.get(fmt, "rrle"), grid, rest[-1]))
        mode.change(lambda m: (gr.update(visible=m == "Multi-class"), gr.update(visible=m == "Referring")), mode,
                    [classes, expression], api_visibility="private")
        model_in.change(lambda m: gr.update(value=constrained_default(m)), model_in, constrained,
                        api_visibility="private")
        for trigger in (run.click, expression.submit):  # a small progress timer: the page's drawing costs the model
            trigger(analyse, inputs, outputs, api_visibility="private", time_limit=limits.time_limit_s,
                    show_progress="minimal")
        gr.api(on_gpu(segment, lambda image, expression, classes="", fmt="", constrained=None, refine="auto",
                      points=10, seed=0, max_new_tokens=0, model="", quant="auto":
                      gpu_seconds(model or demo_state.model_name, fmt or "rrle", None, max_new_tokens)),
               api_name="segment", time_limit=limits.time_limit_s)
        gr.api(on_gpu(compare, lambda image, expression, model="", quant="auto":
                      gpu_seconds(model or demo_state.model_name, "compare")),
               api_name="compare", time_limit=limits.time_limit_s)
    demo.queue(default_concurrency_limit=1, max_size=limits.queue_size)
    return demo


def launch(demo: gr.Blocks, mcp: bool = True, **kwargs):
    """Start the server with the demo's styling (Gradio 6 takes CSS at launch); with ``mcp``, the
    ``segment`` and ``compare`` APIs are also MCP tools (their docstrings describe them), served
    at ``/gradio_api/mcp/``."""
    return demo.launch(css=CSS, mcp_server=mcp, **kwargs)


def _example_expression(path: Path) -> str:
    side = path.with_suffix(".txt")
    return side.read_text().strip() if side.is_file() else ""
