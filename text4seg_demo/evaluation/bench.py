"""``text4seg bench``: R-RLE against full-length descriptors, side by side in one run.

Every figure is a ratio of two measurements taken in the same process on the same queries:
the bundled R-RLE and full-length models; constrained against free decoding; a second
question on an image against the first; and R-RLE against full-length text of the
ground-truth masks (under the models' own tokenizer and the released checkpoint's LLaMA
tokenizer) and of the models' own answers (under LLaMA's).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from functools import partial

import numpy as np
from tqdm import tqdm

from ..descriptors import codec, prompts
from ..images import prepare
from ..inference.engine import Text4SegModel
from ..inference.tokens import count_tokens, load_tokenizer
from ..masks import load_mask, to_grid
from ..pipeline import Request, segment
from .manifest import read_manifest


def _mean(values) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def _query(engine, image, expression, constrained=False, jump_forward=False) -> dict:
    result = segment(engine, image, Request(expression=expression, constrained=constrained or jump_forward,
                                            jump_forward=jump_forward))
    return {"generated": result.tokens["generated"], "descriptor": result.tokens["descriptor"],
            "decode_steps": result.tokens["decode_steps"],
            "decode_s": result.timings["decode"], "total_s": result.timings["total"], "ttft_s": result.timings["ttft"],
            "malformed": bool(result.diagnostics), "grid": result.grid, "labels": result.labels,
            "text": result.text, "expression": expression, "image": image}


def _side_by_side(items, *answers, desc: str) -> tuple[list[dict], ...]:
    """Each query through every way of answering (``(image, expression) -> row``) in turn, the one
    going first rotating, so that a change in the machine's load during the run falls on all
    alike (their timings are compared as ratios)."""
    rows: tuple[list[dict], ...] = tuple([] for _ in answers)
    ways = list(zip(answers, rows))
    for i, (image, expression) in enumerate(tqdm(items, desc=desc, unit="query", leave=False)):
        for answer, out in ways[i % len(ways):] + ways[:i % len(ways)]:
            out.append(answer(image, expression))
    return rows


def _summary(rows) -> dict:
    return {"mean_generated_tokens": _mean([r["generated"] for r in rows]),
            "mean_descriptor_tokens": _mean([r["descriptor"] for r in rows]),  # between <seg> and </seg>
            "mean_decode_s": _mean([r["decode_s"] for r in rows]), "mean_total_s": _mean([r["total_s"] for r in rows]),
            "mean_ttft_s": _mean([r["ttft_s"] for r in rows]),
            "decode_tokens_per_s": _mean([r["generated"] / r["decode_s"] for r in rows if r["decode_s"] > 0]),
            "malformed_rate": _mean([r["malformed"] for r in rows])}


def bench(data: str, rrle_model: str = "tiny-rrle", full_model: str = "tiny-full", limit: int | None = 100,
          log=print, browser: bool = False) -> dict:
    from ..inference.loading import load

    queries = read_manifest(data, limit)
    items = [(prepare(q.image, max_side=10**6)[0], q.expression) for q in queries]
    rrle, full = load(rrle_model, log=log), load(full_model, log=log)
    for engine in (rrle, full):  # one warm-up query each, outside the measurement
        segment(engine, items[0][0], Request(expression=items[0][1]))
    rrle_rows, full_rows = _side_by_side(items, partial(_query, rrle), partial(_query, full),
                                         desc="R-RLE and full-length")
    r, f = _summary(rrle_rows), _summary(full_rows)
    truth, llama = _true_texts(queries, rrle.settings.grid), load_tokenizer("llama")
    out = {
        "n": len(items), "models": {"rrle": rrle_model, "full": full_model},
        "token_reduction": 1 - r["mean_generated_tokens"] / f["mean_generated_tokens"],
        "decode_speedup": f["mean_decode_s"] / r["mean_decode_s"],
        "total_speedup": f["mean_total_s"] / r["mean_total_s"],
        "rrle": r, "full": f,
        "ground_truth_llama": _reduction(truth, llama), "ground_truth_own": _reduction(truth, rrle.tokenizer),
        "answers_llama": _reduction({"rrle": _texts(rrle_rows), "full": _texts(full_rows)}, llama),
        "replayed_full": _replayed(rrle, rrle_rows[: min(20, len(rrle_rows))]),
        "constrained": _constrained(rrle, items[: min(20, len(items))]),
        "prefix_cache": _prefix_cache(rrle, items[: min(20, len(items))]),
        "loop_overhead": {fmt: _loop_overhead(engine, items[: min(20, len(items))])
                          for fmt, engine in (("rrle", rrle), ("full", full))},
        "jump_forward": {fmt: _jump_forward(engine, items[: min(20, len(items))])
                         for fmt, engine in (("rrle", rrle), ("full", full))},
        "jump_forward_llama": {grid: _canonical_jump_forward(queries, llama, grid) for grid in (16, 24)},
        "app_streaming": _app_streaming(rrle_model, rrle, queries[: min(20, len(queries))]),
        "app_compare": _app_compare((rrle_model, rrle), (full_model, full), queries[: min(20, len(queries))],
                                    rrle_rows, full_rows),
        "decode_steps": _decode_steps(rrle_model, rrle, items[: min(40, len(items))], log),
    }
    if browser:
        from .browser import page_streaming

        out["page_streaming"] = page_streaming(rrle_model, queries[: min(10, len(queries))])
    return out


def _texts(rows) -> dict[str, list[str]]:
    """A model's whole answers and the descriptors inside them."""
    return {"answers": [row["text"] for row in rows],
            "descriptors": [codec.extract_body(row["text"])[0] for row in rows]}


def _true_texts(queries, grid: int) -> dict[str, dict[str, list[str]]]:
    """Each query's ground-truth mask written as R-RLE and as full-length descriptors, alone and
    as the whole answer a perfect model would generate (lead-in and ``<seg>`` tags included)."""
    texts = {fmt: {"answers": [], "descriptors": []} for fmt in ("rrle", "full")}
    for q in queries:
        cells = to_grid(load_mask(q.mask).astype(np.uint8), grid).astype(int)
        for fmt, out in texts.items():
            body = codec.encode(cells, [codec.OTHERS, q.expression], fmt)
            out["descriptors"].append(body)
            out["answers"].append(prompts.answer(q.expression, body))
    return texts


def _reduction(texts: dict[str, dict[str, list[str]]], tokenizer) -> dict:
    """Mean token counts of R-RLE and full-length texts under one tokenizer: whole answers
    (comparable with ``token_reduction``) and descriptors alone (the paper's measure)."""
    out = {}
    for part in ("answers", "descriptors"):
        rrle = _mean([count_tokens(tokenizer, t) for t in texts["rrle"][part]])
        full = _mean([count_tokens(tokenizer, t) for t in texts["full"][part]])
        out[part] = {"mean_tokens_rrle": rrle, "mean_tokens_full": full, "token_reduction": 1 - rrle / full,
                     "decode_speedup_at_equal_token_cost": full / rrle}
    return out


def _replayed(engine, rows) -> dict:
    """The full-length text of the R-RLE model's own grids, force-decoded through it."""
    decode, tokens = [], []
    for row in rows:
        answer = codec.wrap(codec.encode(row["grid"], row["labels"], "full"), "Sure:")
        question = engine.question(row["expression"])
        gen = engine.replay(row["image"], question, answer)
        decode.append(gen.timings["decode"])
        tokens.append(gen.tokens["generated"])
    own = _mean([r["decode_s"] for r in rows])
    return {"replayed": True, "n": len(rows), "mean_tokens": _mean(tokens), "mean_decode_s": _mean(decode),
            "decode_speedup": _mean(decode) / own}


def _loop_overhead(engine, items) -> dict:
    """What the decode loop costs beyond the model: each answer's decode time against the bare
    forward passes over the same text right after it (:meth:`Text4SegModel.replay`), per token."""
    loop, bare = [], []
    for image, expression in items:
        row = _query(engine, image, expression)
        replayed = engine.replay(image, engine.question(expression), row["text"])
        loop.append(row["decode_s"] / max(1, row["generated"]))
        bare.append(replayed.timings["decode"] / max(1, replayed.tokens["generated"] - 1))
    return {"n": len(items), "loop_s_per_token": _mean(loop), "forward_s_per_token": _mean(bare),
            "overhead": _mean(loop) / _mean(bare)}


def _constrained(engine, items) -> dict:
    rows, free = _side_by_side(items, partial(_query, engine, constrained=True), partial(_query, engine),
                               desc="constrained and free")
    c_tok = _mean([r["decode_s"] / max(1, r["generated"]) for r in rows])
    f_tok = _mean([r["decode_s"] / max(1, r["generated"]) for r in free])
    return {"n": len(rows), "per_token_decode_overhead": c_tok / f_tok,
            "total_overhead": _mean([r["total_s"] for r in rows]) / _mean([r["total_s"] for r in free]),
            "malformed_rate": _mean([r["malformed"] for r in rows])}


def _jump_forward(engine, items) -> dict:
    """Constrained decoding with and without jump-forward, taking turns: decode steps (forward
    passes), decode time, and whether the two answers are the same text."""
    jumped, plain = _side_by_side(items, partial(_query, engine, jump_forward=True),
                                  partial(_query, engine, constrained=True), desc="jump-forward and plain constrained")
    return {"n": len(items), "mean_decode_steps": _mean([r["decode_steps"] for r in jumped]),
            "mean_decode_steps_plain": _mean([r["decode_steps"] for r in plain]),
            "steps_ratio": _mean([r["decode_steps"] for r in plain]) / _mean([r["decode_steps"] for r in jumped]),
            "decode_speedup": _mean([r["decode_s"] for r in plain]) / _mean([r["decode_s"] for r in jumped]),
            "same_text": _mean([a["text"] == b["text"] for a, b in zip(jumped, plain)])}


def _decode_steps(model: str, engine, items, log) -> dict | None:
    """The R-RLE model's decode steps on a CPU, every way taking turns on the same queries:
    transformers' own forward, the project's fp32 steps (the default), ``--quant 8bit`` and
    ``--quant 8bit --compile``; decode tokens a second, the speed-up over transformers' forward,
    and how many answers are the default's. None where the engine does not decode that way."""
    from ..inference.loading import load

    if engine.decode_step is None or engine.decode_step.weights != "fp32":
        return None
    transformers_forward = copy.copy(engine)  # the same model and caches, decoding through transformers
    transformers_forward.decode_step = None
    ways = {"transformers": transformers_forward, "fp32": engine}
    int8 = load(model, quant="8bit", log=log)
    if int8.decode_step is not None:
        ways["int8"] = int8
        compiled = load(model, quant="8bit", compile=True, log=log)
        if compiled.decode_step.compiled:
            ways["int8_compiled"] = compiled
    for way in ways.values():  # warm-ups (and the compile) outside the measurement
        _query(way, *items[0])
    rows = dict(zip(ways, _side_by_side(items, *(partial(_query, way) for way in ways.values()),
                                        desc="decode steps")))
    rate = {name: _summary(rows[name])["decode_tokens_per_s"] for name in ways}
    return {"n": len(items), "decode_tokens_per_s": rate,
            "speedup": {name: rate[name] / rate["transformers"] for name in ways},
            "same_text": {name: _mean([a["text"] == b["text"] for a, b in zip(rows[name], rows["fp32"])])
                          for name in ways}}


def _app_streaming(model: str, engine, queries) -> dict:
    """The app's run (the answer decoded in a worker thread while the page's updates are drawn)
    against the same question answered unstreamed, taking turns: the decode time the page
    reports against the model's own. Both decode with ``engine``, as the app does by default."""
    from ..app.handlers import Demo, Models, constrained_default

    demo = Demo(model, models=Models(loaded={(model, "auto"): engine}))
    constrained = constrained_default(model)

    def page(image, query):
        result = list(demo.analyse(str(query.image), query.expression, refine="none"))[-1]["result"]
        return {"decode_s": result.timings["decode"], "text": result.text}

    def plain(image, query):
        result = segment(engine, image, Request(query.expression, constrained=constrained))
        return {"decode_s": result.timings["decode"], "text": result.text}

    page(None, queries[0])  # warm-up
    items = [(prepare(q.image, max_side=10**6)[0], q) for q in queries]
    streamed, unstreamed = _side_by_side(items, page, plain, desc="the app's stream and unstreamed")
    return {"n": len(items), "mean_decode_s_streamed": _mean([r["decode_s"] for r in streamed]),
            "mean_decode_s": _mean([r["decode_s"] for r in unstreamed]),
            "overhead": _mean([r["decode_s"] for r in streamed]) / _mean([r["decode_s"] for r in unstreamed]),
            "same_text": _mean([a["text"] == b["text"] for a, b in zip(streamed, unstreamed)])}


def _app_compare(rrle: tuple, full: tuple, queries, rrle_rows, full_rows) -> dict:
    """*Compare both* through the app's ``compare`` API on the first queries against this bench's
    own decode speed-up on the same queries: the page's ratio should be the bench's."""
    from ..app.handlers import Demo, Models

    demo = Demo(rrle[0], models=Models(loaded={(rrle[0], "auto"): rrle[1], (full[0], "auto"): full[1]}))
    records = [demo.compare_api(str(q.image), q.expression) for q in tqdm(queries, desc="the app's compare",
                                                                            unit="query", leave=False)]
    app = _mean([r["full"]["decode_s"] for r in records]) / _mean([r["rrle"]["decode_s"] for r in records])
    n = len(records)
    own = _mean([r["decode_s"] for r in full_rows[:n]]) / _mean([r["decode_s"] for r in rrle_rows[:n]])
    return {"n": n, "decode_speedup_app": app, "decode_speedup_bench": own, "ratio": app / own,
            "sources": sorted({r["full"]["source"] for r in records})}


def _canonical_jump_forward(queries, tokenizer, grid: int) -> dict:
    """Decode steps of a model that writes each ground-truth R-RLE answer token for token as
    ``tokenizer`` splits it (what training teaches), under the grammar with and without
    jump-forward: the grammar and the tokenizer alone decide what jump-forward saves."""
    from ..descriptors.grammar import GrammarConstraint, ebnf
    from ..inference.tokens import continuation_tokens

    plain, jumped = [], []
    for q in queries:
        cells = to_grid(load_mask(q.mask).astype(np.uint8), grid).astype(int)
        answer = prompts.answer(q.expression, codec.encode(cells, [codec.OTHERS, q.expression], "rrle")).lstrip()
        ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
        constraint = GrammarConstraint(tokenizer, len(tokenizer), ebnf(grid, grid, [q.expression], "rrle"))
        steps, i = 0, 0
        while i < len(ids):
            constraint.accept(ids[i])  # the model's own step
            i += 1
            if i == len(ids):
                break
            steps += 1
            for proposed in continuation_tokens(tokenizer, tokenizer.decode(ids[:i]), constraint.forced()):
                if i == len(ids) or proposed != ids[i]:
                    break
                constraint.accept(proposed)
                i += 1
        plain.append(len(ids) - 1)
        jumped.append(steps)
    return {"n": len(queries), "mean_tokens": _mean([p + 1 for p in plain]), "mean_decode_steps": _mean(jumped),
            "mean_decode_steps_plain": _mean(plain), "steps_ratio": _mean(plain) / _mean(jumped)}


def _prefix_cache(engine, items) -> dict:
    """Time to first token for a first question on an image against a second, different one.

    Measured with the model's own template (question first: only the image features can be
    reused) and, for timing only, with the released checkpoint's image-first ``llava_v1``
    template on the same weights, where the whole prefix up to the image is reused.
    """
    out = {"n": len(items)}
    for style in dict.fromkeys([engine.settings.prompt_style, "llava_v1"]):
        timed = Text4SegModel(engine.model, engine.tokenizer, engine.processor,
                              replace(engine.settings, prompt_style=style), name=engine.name)
        cold, warm = [], []
        for image, expression in items:
            timed.clear_caches()
            cold.append(segment(timed, image, Request(expression=expression, max_new_tokens=1)).timings["ttft"])
            warm.append(segment(timed, image, Request(expression=_other(expression),
                                                      max_new_tokens=1)).timings["ttft"])
        out[style] = {"cold_ttft_s": _mean(cold), "warm_ttft_s": _mean(warm), "speedup": _mean(cold) / _mean(warm)}
    return out


def _other(expression: str) -> str:
    return "all triangles" if expression != "all triangles" else "all circles"
