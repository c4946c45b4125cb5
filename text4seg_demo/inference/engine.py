"""The generation engine: one image and one question in, a streamed descriptor answer out.

A :class:`Text4SegModel` wraps a LLaVA-style ``LlavaForConditionalGeneration`` with its
tokenizer, image processor and Text4Seg settings, and decodes greedily with its own loop so
that every phase is timed, rows can be streamed as they complete, a grammar can constrain the
answer, and work shared between questions on one image is reused:

* image features (vision tower + projector) are cached by image content;
* the key/value cache of the prompt up to and including the image is cached too, so a second
  question on the same image only prefills the question (when the template puts the image
  first, as the released checkpoint's does).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..caching import LRUCache, image_key
from ..descriptors import codec, prompts
from ..descriptors.grammar import GrammarConstraint, ebnf, grammar_char_budget
from .attention import image_block_mask
from .decode_step import KVBuffers
from .devices import decode_threads, intra_op_threads
from .positions import AnswerPositions
from .settings import Settings
from .tokens import IncrementalDecoder, continuation_tokens, count_tokens


@dataclass
class Generation:
    """A finished answer with its accounting (seconds and token counts)."""

    text: str
    token_ids: list[int]
    timings: dict
    tokens: dict
    constrained: bool = False
    replayed: bool = False


@dataclass
class StreamEvent:
    """One step of a streamed answer: the new text and the grid rows finished so far."""

    delta: str
    text: str
    rows: list[list[str]]
    done: bool = False
    generation: Generation | None = None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Engine:
    """What the pipeline asks of a model, local or served: how it speaks (``settings``), its
    question, a streamed greedy answer (:meth:`stream`) and token counts under its tokenizer."""

    settings: Settings
    name: str = ""
    quant: str = "fp32"
    notes: list[str]

    def question(self, expression: str | None = None, classes: Sequence[str] | None = None) -> str:
        if classes:
            return prompts.semantic_question(list(classes))
        return prompts.question(expression, self.settings.question_template)

    def max_new_tokens(self, labels: Sequence[str], fmt: str | None = None, grid: int | None = None) -> int:
        """Enough tokens for the costliest answer this grid and these labels allow, no more.

        The worst case is measured with the model's own tokenizer: the longest label
        alternating with ``others`` in every cell, plus the longest lead-in.
        """
        fmt, grid = fmt or self.settings.fmt, grid or self.settings.grid
        longest = max([codec.OTHERS, *labels], key=self.count_tokens)
        names = [codec.OTHERS, longest] if longest != codec.OTHERS else [codec.OTHERS, "x"]
        worst = (np.indices((grid, grid)).sum(0) % 2).astype(int)
        body = codec.encode(worst, names, fmt)
        lead = max(range(len(prompts.LEAD_INS)), key=lambda i: self.count_tokens(prompts.lead_in(longest, i)))
        return self.count_tokens(prompts.answer(longest, body, lead)) + 8

    def stream(self, image: Image.Image, question: str, labels: Sequence[str], **options) -> Iterator[StreamEvent]:
        raise NotImplementedError

    def generate(self, image: Image.Image, question: str, labels: Sequence[str], **kwargs) -> Generation:
        """The non-streaming form of :meth:`stream`."""
        for event in self.stream(image, question, labels, **kwargs):
            if event.done:
                return event.generation
        raise RuntimeError("generation ended without a final event")

    def count_tokens(self, text: str) -> int:
        raise NotImplementedError

    def clear_caches(self) -> None:
        """Forget what was kept between questions (nothing, unless a subclass keeps something)."""


class Text4SegModel(Engine):
    """A loaded Text4Seg checkpoint, ready to answer segmentation questions."""

    def __init__(self, model, tokenizer, processor, settings: Settings, name: str = "", quant: str = "fp32",
                 cache_images: int = 4, decode_step=None):
        """``decode_step``: what feeds tokens after the prompt instead of the model's own forward
        (:class:`~text4seg_demo.inference.decode_step.DecodeStep`)."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.processor = processor
        self.settings = settings
        self.name = name
        self.quant = quant
        self.image_token_id = getattr(model.config, "image_token_index", None) or model.config.image_token_id
        self._features = LRUCache(cache_images)
        self._prefixes = LRUCache(cache_images)
        self.stats = {"feature_hits": 0, "prefix_hits": 0}
        self.notes: list[str] = []  # what loading had to change (precision fallbacks)
        self.memory_bytes = model.get_memory_footprint()
        self.decode_step = decode_step
        self.decode_threads = decode_threads(model) if self.device.type == "cpu" else None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ prompt

    def _prompt_ids(self, question: str) -> tuple[list[int], list[int]]:
        text = prompts.prompt(question, self.settings.prompt_style)
        before, after = text.split(prompts.IMAGE)
        encode = lambda s: self.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        bos = [self.tokenizer.bos_token_id] if self._wants_bos() else []
        return bos + encode(before), encode(after)

    def _wants_bos(self) -> bool:
        return self.settings.prompt_style == "llava_v1" and self.tokenizer.bos_token_id is not None

    # ------------------------------------------------------------------ image

    def pixel_values(self, image: Image.Image) -> torch.Tensor:
        pixels = self.processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, self.model.dtype if self.model.dtype.is_floating_point else torch.float32)

    @torch.no_grad()
    def image_features(self, image: Image.Image, timings: dict | None = None, key: str | None = None) -> torch.Tensor:
        """Projected image tokens (n_image_tokens x hidden), cached by image content (``key``)."""
        key = key or image_key(image)
        cached = self._features.get(key)
        timings = timings if timings is not None else {}
        if cached is not None:
            self.stats["feature_hits"] += 1
            timings.update(preprocess=0.0, encode=0.0)
            return cached
        t0 = time.perf_counter()
        pixels = self.pixel_values(image)
        t1 = time.perf_counter()
        out = self.model.model.get_image_features(pixel_values=pixels.to(self._vision_dtype()), return_dict=True)
        features = out.pooler_output
        features = torch.cat(list(features), dim=0) if isinstance(features, (list, tuple)) else features.reshape(
            -1, features.shape[-1])
        _sync(self.device)
        timings.update(preprocess=t1 - t0, encode=time.perf_counter() - t1)
        self._features.put(key, features)
        return features

    def _vision_dtype(self) -> torch.dtype:
        return next(self.model.model.vision_tower.parameters()).dtype

    # ------------------------------------------------------------------ decoding

    def _embed(self, ids: list[int]) -> torch.Tensor:
        table = self.model.get_input_embeddings()
        return table(torch.tensor([ids], device=self.device))

    @torch.no_grad()
    def _prefill(self, image: Image.Image, question: str, timings: dict):
        """Run the prompt through the model; return (logits of the next token, cache, prompt token counts)."""
        from transformers import DynamicCache

        before, after = self._prompt_ids(question)
        content = image_key(image)
        features = self.image_features(image, timings, key=content)
        t0 = time.perf_counter()
        key = (content, tuple(before))
        cache = self._prefixes.get(key)
        if cache is not None:
            self.stats["prefix_hits"] += 1
            cache = copy.deepcopy(cache)
        else:
            cache = DynamicCache(config=self.model.config)
            text = self._embed(before)
            prefix = torch.cat([text, features[None].to(text.dtype)], dim=1)
            mask = None
            if self.settings.image_attention == "bidirectional":
                mask = image_block_mask(prefix.shape[1], [len(before)], features.shape[0], prefix.dtype, self.device)
            self.model(inputs_embeds=prefix, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=1)
            self._prefixes.put(key, copy.deepcopy(cache))
        out = self.model(inputs_embeds=self._embed(after), cache=cache, use_cache=True, logits_to_keep=1)
        if self.decode_step is not None:
            cache = KVBuffers(cache)
        _sync(self.device)
        timings["prefill"] = time.perf_counter() - t0
        counts = {"prompt": len(before) + features.shape[0] + len(after), "image": features.shape[0]}
        return out.logits[:, -1].float(), cache, counts

    def _forward(self, tokens: list[int], cache, positions: list[int] | None = None) -> torch.Tensor:
        """Feed ``tokens`` after the cache in one pass; the next-token logits after each (n x V).
        ``positions`` overrides the model's own positions for them."""
        with intra_op_threads(self.decode_threads):
            if self.decode_step is not None:
                return self.decode_step(tokens, cache, positions)
            extra = {} if positions is None else {"position_ids": torch.tensor([positions], device=self.device)}
            out = self.model(input_ids=torch.tensor([tokens], device=self.device), cache=cache, use_cache=True,
                             **extra)
            return out.logits[0].float()

    def _choose(self, logits: torch.Tensor, constraint) -> int:
        """The greedy token of one row of logits (1 x V), never the image token, inside the grammar."""
        logits[:, self.image_token_id] = float("-inf")
        if constraint is not None:
            constraint.mask(logits)
        return int(logits.argmax(-1))

    @torch.no_grad()
    def stream(self, image: Image.Image, question: str, labels: Sequence[str], *, fmt: str | None = None,
               grid: int | None = None, max_new_tokens: int | None = None,
               constrained: bool = False, jump_forward: bool = False) -> Iterator[StreamEvent]:
        """Greedy answer, yielded as text deltas with the grid rows completed so far.

        ``labels`` are the foreground labels the answer may use (the expression, or the classes).
        ``jump_forward`` (with ``constrained``): where the grammar forces the next text (the ` *`
        after a label, separators, the rest of a label, ``</seg>``), its tokens ride along with
        the chosen token in the same forward pass and are kept as far as the model's own greedy
        choice agrees with them, so the answer is the one plain constrained decoding writes,
        in fewer decode steps (``tokens["decode_steps"]``, forward passes after the prompt).
        """
        if jump_forward and not constrained:
            raise ValueError("jump-forward decoding follows the grammar: it needs constrained decoding")
        fmt, grid = fmt or self.settings.fmt, grid or self.settings.grid
        if max_new_tokens:
            budget = max_new_tokens
        elif constrained:  # any tokenisation is possible under a grammar: bound by characters
            budget = grammar_char_budget(grid, grid, labels, fmt)
        else:
            budget = self.max_new_tokens(labels, fmt, grid)
        timings: dict = {}
        t_start = time.perf_counter()
        constraint = None
        if constrained:
            t0 = time.perf_counter()
            constraint = GrammarConstraint(self.tokenizer, self.model.config.get_text_config().vocab_size,
                                           ebnf(grid, grid, labels, fmt))
            timings["grammar"] = time.perf_counter() - t0
        logits, cache, counts = self._prefill(image, question, timings)
        positions = AnswerPositions(counts["prompt"], grid, fmt, "grid") if self.settings.positions == "grid" else None
        decoder, rows = IncrementalDecoder(self.tokenizer), codec.RowStream(grid, fmt)
        ids, eos, steps = decoder.ids, self.tokenizer.eos_token_id, 0

        def take(token: int) -> tuple[StreamEvent | None, bool]:
            """Append a chosen token: the event it makes, and whether the answer is finished."""
            if constraint is not None:
                constraint.accept(token)
            if token == eos:
                return None, True
            delta = decoder.add(token)
            closed = codec.CLOSE_TAG in decoder.text[-(len(delta) + len(codec.CLOSE_TAG)):] if delta else False
            event = StreamEvent(delta, decoder.text, rows.feed(delta)) if delta else None
            return event, closed or (constraint is not None and constraint.finished) or len(ids) >= budget

        t_decode = time.perf_counter()
        finished = budget <= 0
        while not finished:
            token = self._choose(logits, constraint)
            event, finished = take(token)
            if event:
                yield event
            if finished:
                break
            feed, where = [token], [positions.advance(decoder.text)] if positions else None
            draft = continuation_tokens(self.tokenizer, decoder.text, constraint.forced()) if jump_forward else []
            if draft and where is not None:
                ahead, ahead_positions = decoder.fork(), positions.fork()
                for proposed in draft:
                    ahead.add(proposed)
                    where.append(ahead_positions.advance(ahead.text))
            out = self._forward(feed + draft, cache, where)
            steps += 1
            kept = 0
            for proposed in draft:  # keep the forced tokens as long as greedy decoding would write them
                if self._choose(out[kept:kept + 1], constraint) != proposed:
                    break
                event, finished = take(proposed)
                if positions:
                    positions.advance(decoder.text)
                kept += 1
                if event:
                    yield event
                if finished:
                    break
            if kept < len(draft):
                cache.crop(-(len(draft) - kept))  # a negative count removes that many tokens
            logits = out[kept:kept + 1]
        _sync(self.device)
        timings["decode"] = time.perf_counter() - t_decode
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        timings["ttft"] = timings.get("preprocess", 0) + timings.get("encode", 0) + timings["prefill"]
        timings["total"] = time.perf_counter() - t_start
        tokens = {**counts, "generated": len(ids), "decode_steps": steps}
        generation = Generation(text=text, token_ids=ids, timings=timings, tokens=tokens, constrained=constrained)
        yield StreamEvent("", text, codec.completed_rows(text, grid, fmt), done=True, generation=generation)

    @torch.no_grad()
    def replay(self, image: Image.Image, question: str, answer: str) -> Generation:
        """Force-decode ``answer`` token by token: the real cost of writing it with this model.

        Used for the full-length side of an R-RLE-only checkpoint, which would not write it
        itself; the result is marked ``replayed``.
        """
        timings: dict = {}
        t_start = time.perf_counter()
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        _, cache, counts = self._prefill(image, question, timings)
        t0 = time.perf_counter()
        for token in ids[:-1]:  # the model's own positions: only the cost is measured
            self._forward([token], cache)
        _sync(self.device)
        timings["decode"] = time.perf_counter() - t0
        timings["ttft"] = timings.get("preprocess", 0) + timings.get("encode", 0) + timings["prefill"]
        timings["total"] = time.perf_counter() - t_start
        tokens = {**counts, "generated": len(ids)}
        return Generation(text=answer, token_ids=ids, timings=timings, tokens=tokens, replayed=True)

    def count_tokens(self, text: str) -> int:
        return count_tokens(self.tokenizer, text)

    def clear_caches(self) -> None:
        self._features.clear()
        self._prefixes.clear()


class ChatTemplateModel(Text4SegModel):
    """A transformers-native VLM (Qwen2-VL, Qwen2.5-VL, InternVL, ...) driven through its
    processor's chat template.

    The processor decides how many image tokens an image becomes and the model its own
    (possibly multimodal) positions, so the prompt is prefilled in one call; the decode loop,
    streaming, grammar and accounting are the LLaVA engine's. Nothing is cached between
    questions: these models' image tokens depend on the processor's resizing.
    """

    @torch.no_grad()
    def _prefill(self, image: Image.Image, question: str, timings: dict):
        from transformers import DynamicCache

        t0 = time.perf_counter()
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self.processor(text=[text], images=[image.convert("RGB")], return_tensors="pt").to(self.device)
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        t1 = time.perf_counter()
        cache = DynamicCache(config=self.model.config)
        out = self.model(**inputs, cache=cache, use_cache=True, logits_to_keep=1)
        _sync(self.device)
        # the vision encoder runs inside this one call: its time is part of prefill
        timings.update(preprocess=t1 - t0, encode=0.0, prefill=time.perf_counter() - t1)
        ids = inputs["input_ids"][0]
        counts = {"prompt": int(ids.numel()), "image": int((ids == self.image_token_id).sum())}
        return out.logits[:, -1].float(), cache, counts
