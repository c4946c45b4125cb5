"""What the demo does, in plain Python: run a question, stream the answer into the grid, compare
the two formats, answer the API. Every function returns plain values (text, pictures, tables,
dicts keyed by what the page shows), so it is tested without a browser; ``layout.py`` only
declares the components and wires them to these."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import queue
import resource
import shutil
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from .. import export, render
from ..descriptors import codec
from ..images import BadImage, prepare
from ..inference.engine import StreamEvent
from ..inference.hub import DEFAULT_MODEL, ModelUnavailable, resolve
from ..inference.loading import load
from ..inference.remote import RemoteModel, parse_choice, served_choices, servers_from_env
from ..pipeline import Request, Result, segment, segment_stream
from ..refine import RefinerError, build_refiner
from .hosting import Limits

FORMATS = {"R-RLE": "rrle", "Full-length": "full", "Compare both": "compare"}
USER_ERRORS = (ValueError, BadImage, ModelUnavailable, RefinerError)
OUT_OF_MEMORY = (MemoryError, torch.cuda.OutOfMemoryError)
WARNING = "⚠ "  # starts every message about a failure; a text glyph, so any font draws it
FULL_PARTNER = {"tiny-rrle": "tiny-full"}  # the model that writes full-length descriptors natively
RRLE_PARTNER = {v: k for k, v in FULL_PARTNER.items()}
MAX_POINTS = 100  # SAM point prompts per side
# Grammar-constrained decoding is on by default for the bundled models: it costs them no measurable time a
# token (`text4seg bench`, `constrained`) and every answer is well formed.
CONSTRAINED_BY_DEFAULT = frozenset(FULL_PARTNER) | frozenset(RRLE_PARTNER)


class UserError(ValueError):
    """A request that cannot be served as given; the message says what to do instead."""


def constrained_default(model: str) -> bool:
    return model in CONSTRAINED_BY_DEFAULT


class Models:
    """Loaded models by (name, precision); at most ``size`` kept, one load at a time."""

    def __init__(self, size: int = 2, loaded: dict | None = None):
        """``loaded``: models already in memory, by (name, precision), served without a second load."""
        self.size, self._models, self._lock = size, OrderedDict(loaded or {}), threading.Lock()

    def get(self, name: str, quant: str):
        key = (name, quant)
        with self._lock:
            if key not in self._models:
                served = parse_choice(name)
                self._models[key] = (RemoteModel(served[1], served[0]) if served
                                     else load(name, quant=quant, log=lambda m: print(m, flush=True)))
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


def choose_default(requested: str | None = None, served: list[str] = ()) -> tuple[str, str]:
    """The model to start on, and a sentence saying why. ``served``: the models on the host's
    servers (``served_choices``), the first of which is the default when nothing is asked for."""
    requested = requested or os.environ.get("TEXT4SEG_MODEL")
    if requested:
        return requested, f"Running **{requested}** (chosen with TEXT4SEG_MODEL or --model)."
    if served:
        model, url = parse_choice(served[0])
        return served[0], f"Running **{model}** on the server at {url} (TEXT4SEG_SERVER)."
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


# --------------------------------------------------------------------------- what the page shows


def metrics_table(result: Result, peak: str) -> str:
    t, k = result.timings, result.tokens
    rows = [
        ("model", f"`{result.model}`"), ("device / precision", f"{result.device} / {result.quant}"),
        ("decoding", "grammar-constrained" if result.constrained else "free (unconstrained)"),
        ("generated tokens", k["generated"]),
        ("descriptor tokens, R-RLE vs full", f"{k['rrle']} vs {k['full']} ({k['reduction']:.0%} fewer with R-RLE)"),
        ("time to first token", f"{t.get('ttft', 0):.3f} s"), ("decode", f"{t.get('decode', 0):.3f} s"),
        ("tokens / s", k.get("per_second", "–")),
        ("refine", f"{t['refine']:.3f} s ({result.refine.get('refiner')})" if "refine" in t else "–"),
        ("total", f"{t.get('total', 0):.3f} s"), ("peak memory", peak),
    ]
    text = "| measure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)
    if result.diagnostics:
        text += "\n\n**The answer was repaired:** " + "; ".join(d.message for d in result.diagnostics)
    if result.notes:
        text += "\n\n" + " ".join(f"_{n}._" for n in result.notes)
    return text


def peak_memory() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB (GPU)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process)"


def status_line(result: Result) -> str:
    fg = int((result.grid > 0).sum())
    state = f"{WARNING}repaired answer" if result.diagnostics else "✓ well-formed answer"
    grammar = "grammar on" if result.constrained else "grammar off"
    return f"{state} ({grammar}) · {fg} of {result.grid.size} patches labelled · {result.timings.get('total', 0):.2f} s"


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


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_LIBC = _libc()


def release_memory() -> None:
    """Hand the memory freed by a request back to the system. A server runs requests on whichever
    worker thread is free, and glibc keeps a heap per thread: without this, a long-running app
    holds the high-water mark of every thread's heap."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


def _sweep(root: Path, age_s: float = 900) -> None:
    """Delete result folders older than ``age_s``: nothing a user sent is kept for long."""
    now = time.time()
    for child in root.iterdir() if root.exists() else []:
        if now - child.stat().st_mtime > age_s:
            shutil.rmtree(child, ignore_errors=True)


REFRESH_S = 0.25  # how often the page shows a streaming answer's latest state


def decoupled(stream: Iterator, every_s: float = REFRESH_S) -> Iterator:
    """``stream`` run in a worker thread at full speed, seen as the page can show it: every
    ``every_s`` seconds its newest streamed event (older ones are skipped), and what else it
    yields (its result) in order, as soon as it ends. The page's work stays out of the model's
    time: nothing waits for the page, and the page wakes a few times a second rather than once
    per token. An exception in the stream is raised here."""
    items: queue.SimpleQueue = queue.SimpleQueue()
    ended = threading.Event()

    def work():
        try:
            for item in stream:
                items.put(item)
        except BaseException as err:  # handed to the consumer, which raises it
            items.put(err)
        finally:
            ended.set()

    def partial(item) -> bool:
        return isinstance(item, StreamEvent) and not item.done

    threading.Thread(target=work, daemon=True).start()
    while True:
        finished = ended.wait(every_s)  # once set, everything the stream made is in the queue
        batch = []
        while not items.empty():
            batch.append(items.get_nowait())
        for item in batch:
            if isinstance(item, BaseException):
                raise item
        yield from (item for item in batch if not partial(item))
        if batch and partial(batch[-1]):
            yield batch[-1]
        if finished:
            return


def _side_record(result, source: str) -> dict:
    """One side of a comparison: tokens generated and inside the descriptors, time to first token
    and decode seconds (model work only), and who wrote it (its own model, or replayed)."""
    tokens, timings = result.tokens, result.timings
    return {"generated_tokens": tokens["generated"], "descriptor_tokens": tokens.get("descriptor"),
            "ttft_s": round(timings.get("ttft", 0.0), 4), "decode_s": round(timings["decode"], 4),
            "source": source, "replayed": bool(getattr(result, "replayed", False))}


def partial_grid(rows: list[list[str]], labels: list[str], size: int) -> np.ndarray:
    """The rows written so far as label ids on a ``size x size`` grid; the rest is background."""
    grid = np.zeros((size, size), dtype=np.int32)
    for r, row in enumerate(rows[:size]):
        grid[r, : len(row[:size])] = [labels.index(c) if c in labels else 0 for c in row[:size]]
    return grid


# --------------------------------------------------------------------------- the demo


class Demo:
    """The app's state (loaded models and refiners, a scratch folder for downloads) and its actions."""

    def __init__(self, default_model: str | None = None, limits: Limits | None = None, models: Models | None = None):
        self.limits = limits or Limits.from_env()
        self.served = served_choices(servers_from_env())  # "MODEL @ URL" for each model on TEXT4SEG_SERVER
        self.model_name, self.model_note = choose_default(default_model, self.served)
        self.models, self.refiners = models or Models(), Refiners()
        try:  # load at start-up (on ZeroGPU too), so the first request does not wait for it
            self.models.get(self.model_name, "auto")
        except (ModelUnavailable, OSError, RuntimeError, ValueError) as err:
            self.model_note += (f"\n\n{WARNING}{self.model_name} could not be loaded: {err}. "
                                "Pick another model under *Advanced*.")
        self.scratch = Path(tempfile.mkdtemp(prefix="text4seg-results-"))
        self.refresh_s = REFRESH_S  # the page's refresh interval while an answer streams
        self._comparisons, self._warmed = 0, weakref.WeakSet()  # Compare both: whose turn goes first; warmed models

    def request(self, expression: str | None, mode: str, classes: str | None, fmt: str | None, grid, constrained,
                points, seed, max_new, model: str) -> Request:
        """A validated request from the page's or the API's values; bad values raise with a message."""
        if not 1 <= int(points) <= MAX_POINTS:
            raise UserError(f"SAM points per side must be between 1 and {MAX_POINTS}, got {points}")
        if not 0 <= int(seed) < 2**32:
            raise UserError(f"the seed must be between 0 and 2^32 - 1, got {seed}")
        class_list = [c.strip() for c in (classes or "").replace("|", ",").split(",") if c.strip()]
        if mode == "Multi-class" and not class_list:
            raise UserError("multi-class mode needs class names, e.g. 'cat, grass, sky'")
        request = Request(expression=(expression or "").strip(), classes=class_list if mode == "Multi-class" else None,
                          fmt=fmt, grid=int(grid) if grid else None,
                          constrained=constrained_default(model) if constrained is None else bool(constrained),
                          max_new_tokens=self.limits.new_tokens(int(max_new) if max_new else None),
                          sam_points=int(points), seed=int(seed))
        request.labels()  # validates, with a message for people
        return request

    def _image(self, source):
        """The upload as an RGB image with notes, within the host's limits."""
        self.limits.upload(source)
        return prepare(source, max_pixels=self.limits.max_pixels)

    def _out_of_memory(self, err) -> str:
        """Free what can be freed and say what to try instead."""
        self.models.drop_caches()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return (f"out of memory ({type(err).__name__}); memory was freed. Try a smaller image, 4-bit precision "
                "or the tiny model")

    def _run(self, engine, image, request, refiner) -> Result:
        try:
            return segment(engine, image, request, refiner)
        except OUT_OF_MEMORY as err:
            raise UserError(self._out_of_memory(err)) from None
        finally:
            release_memory()

    def analyse(self, image_path, expression, mode="Referring", classes="", name=None, quant="auto",
                fmt_choice="R-RLE", grid=None, constrained=None, refine="auto", points=10, seed=0,
                max_new=None) -> Iterator[dict]:
        """The page's run: dicts of what changed, keyed by what the page shows (``status``,
        ``answer``, ``grid``, ``colours``, ``masks``, ``metrics``, ``downloads``, ``compare``; the last
        also holds the ``result``).
        The answer streams into the grid row by row; bad input ends with a ``status`` message."""
        name = name or self.model_name
        fmt = FORMATS.get(fmt_choice, "rrle")
        if fmt == "compare":  # R-RLE first, by the R-RLE sibling of a full-length model
            name = RRLE_PARTNER.get(name, name)
        try:
            self.limits.model(name)
            image, notes = self._image(image_path)
            request = self.request(expression, mode, classes, "rrle" if fmt == "compare" else fmt, grid, constrained,
                                   points, seed, max_new, name)
            engine = self.models.get(name, quant)
            refiner = self.refiners.get(refine)
        except USER_ERRORS as err:
            yield {"status": f"{WARNING}{err}"}
            return
        except (OSError, RuntimeError) as err:
            yield {"status": f"{WARNING}could not load what was asked for: {err}. Pick another model or refiner."}
            return
        yield {"status": "Generating…" + (" " + "; ".join(notes) if notes else ""), "compare": None}
        result, rows_shown = None, -1
        labels = [codec.OTHERS, *request.labels()]
        size = request.grid or engine.settings.grid
        try:
            for item in decoupled(segment_stream(engine, image, request, refiner), self.refresh_s):
                if isinstance(item, StreamEvent) and not item.done:
                    update = {"answer": render.highlight(item.text, labels)}
                    if len(item.rows) != rows_shown:  # redraw the grid only when a row completes
                        rows_shown = len(item.rows)
                        update["grid"] = render.grid_view(image, partial_grid(item.rows, labels, size), labels,
                                                          rows_done=rows_shown)
                    yield update
                elif isinstance(item, Result):
                    result = item
        except OUT_OF_MEMORY as err:
            yield {"status": f"{WARNING}{self._out_of_memory(err)}."}
            return
        except USER_ERRORS as err:
            yield {"status": f"{WARNING}{err}"}
            return
        result.notes[:0] = notes
        _sweep(self.scratch)
        release_memory()
        final = {
            "status": status_line(result), "colours": render.colour_map(result.labels),
            "answer": render.highlight(result.text, result.labels),
            "grid": render.grid_view(image, result.grid, result.labels),
            "masks": (render.overlay(image, result.coarse),
                      render.overlay(image, result.refined if result.refined is not None else result.coarse)),
            "metrics": metrics_table(result, peak_memory()),
            "downloads": write_downloads(result, self.scratch / f"{time.time_ns()}"),
            "result": result,
        }
        if fmt == "compare":
            try:
                final["compare"] = self.compare(engine, name, quant, image, request, result)
            except USER_ERRORS as err:
                final["status"] += f" · {WARNING}the full-length side failed: {err}"
        yield final

    def compare(self, engine, name, quant, image, request, rrle_result) -> dict:
        """The same input written as full-length descriptors: by the full-length model where one
        exists, else by replaying the full-length text of this grid through this model. Both
        sides are measured alike for the figures: unstreamed, each model warmed up once outside
        the measurement, caches cleared before each, the side going first alternating between
        comparisons. Returns the full-length grid view, a sentence, a table of tokens and decode
        milliseconds, and the ``record`` the ``compare`` API returns (the same figures)."""
        if isinstance(engine, RemoteModel):
            raise UserError("the full-length side is written or replayed by a local model; a served model "
                            "answers in one format at a time (pick R-RLE or Full-length)")
        partner = FULL_PARTNER.get(name)
        if partner:
            full_engine = self.models.get(partner, quant)
            full_request = Request(**{**request.__dict__, "fmt": "full"})

            def full_side():
                return self._run(full_engine, image, full_request, None)

            source, how = f"written by {partner}", f"written by `{partner}`"
        else:
            full_engine = engine
            question = engine.question(request.labels()[0], request.classes)
            body = codec.encode(rrle_result.grid, rrle_result.labels, "full")

            def full_side():
                replay = engine.replay(image, question, codec.wrap(body, "Sure:"))
                replay.tokens["descriptor"] = engine.count_tokens(body)
                return replay

            source = "replayed through this model"
            how = "**replayed**: the full-length text of this grid force-decoded through the model"
        sides = {"rrle": lambda: self._run(engine, image, request, None), "full": full_side}
        for side_engine in (engine, full_engine):
            self._warm_up(side_engine)
        order = ["rrle", "full"] if self._comparisons % 2 == 0 else ["full", "rrle"]
        self._comparisons += 1
        measured = {}
        for key in order:
            for side_engine in (engine, full_engine):
                side_engine.clear_caches()  # both sides encode the image and prefill alike
            measured[key] = sides[key]()
        record = {"rrle": _side_record(measured["rrle"], "written by its own model"),
                  "full": _side_record(measured["full"], source), "first": order[0]}
        record["token_reduction"] = round(1 - record["rrle"]["generated_tokens"]
                                          / max(1, record["full"]["generated_tokens"]), 3)
        record["decode_speedup"] = round(record["full"]["decode_s"] / max(record["rrle"]["decode_s"], 1e-9), 2)
        table = pd.DataFrame([(f, record[k]["generated_tokens"], round(record[k]["decode_s"] * 1000, 1))
                              for f, k in (("R-RLE", "rrle"), ("Full-length", "full"))],
                             columns=["format", "tokens", "decode ms"])
        shown = measured["full"] if partner else rrle_result
        first = "R-RLE" if order[0] == "rrle" else "full-length"
        return {"grid": render.grid_view(image, shown.grid, shown.labels),
                "note": f"Full-length side {how}. Both measured unstreamed after a warm-up, {first} first this "
                        f"time. R-RLE used {record['token_reduction']:.0%} fewer tokens and decoded "
                        f"{record['decode_speedup']:.1f}x faster.",
                "table": table, "record": record}

    def _warm_up(self, engine) -> None:
        """One short answer on a blank picture, once per loaded model: the first call's one-off
        costs (allocations, kernel choices) stay out of any measurement."""
        if engine in self._warmed:
            return
        blank = Image.new("RGB", (64, 64), "gray")
        engine.generate(blank, engine.question("the object"), ["the object"], max_new_tokens=4)
        engine.clear_caches()
        self._warmed.add(engine)

    def compare_api(self, image_file, expression: str, model: str = "", quant: str = "auto") -> dict:
        """The ``compare`` API: what *Compare both* shows, as JSON (see :func:`_side_record`)."""
        final = list(self.analyse(image_file, expression, name=model or None, quant=quant,
                                  fmt_choice="Compare both", constrained=False, refine="none"))[-1]
        if not final.get("compare"):
            raise UserError(final["status"].removeprefix(WARNING))
        return final["compare"]["record"]

    def segment_api(self, image_file, expression: str, classes: str = "", fmt: str = "",
                    constrained: bool | None = None, refine: str = "auto", points: int = 10, seed: int = 0,
                    max_new_tokens: int = 0, model: str = "", quant: str = "auto") -> dict:
        """The ``segment`` API: the same JSON as ``text4seg segment --json``; a request that cannot
        be served raises :class:`UserError` with what to do."""
        name = model or self.model_name
        try:
            self.limits.model(name)
            image, notes = self._image(image_file)
            request = self.request(expression, "Multi-class" if classes else "Referring", classes, fmt or None, None,
                                   constrained, points, seed, max_new_tokens, name)
            engine, refiner = self.models.get(name, quant), self.refiners.get(refine)
        except USER_ERRORS as err:
            raise UserError(str(err)) from None
        except (OSError, RuntimeError) as err:
            raise UserError(f"could not load what was asked for: {err}. Pick another model or refiner.") from None
        try:
            result = self._run(engine, image, request, refiner)
        except USER_ERRORS as err:
            raise UserError(str(err)) from None
        result.notes[:0] = notes
        return result.to_json()
