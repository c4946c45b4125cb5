"""A model served elsewhere: the Text4Seg question and the image go to an OpenAI-compatible
chat endpoint (``vllm serve``, typically), the answer streams back, and everything after the
text (parse, grid, refine, render, accounting) is the local pipeline's.

The server decides how the prompt is built (its chat template) and batches requests from
many clients; the project's grammar can ride along (``structured_outputs``, xgrammar in vLLM,
as in ``--constrained`` locally). Timings are what a client sees: time to first token and the
stream's rate; token counts come from the server's usage fields, and descriptor costs from its
``/tokenize`` route (vLLM's), else from the bundled LLaMA vocabulary, with a note.
"""

from __future__ import annotations

import base64
import functools
import io
import os
import threading
import time
from collections.abc import Iterator, Sequence

from PIL import Image

from ..descriptors import codec
from ..descriptors.grammar import ebnf
from .engine import Engine, Generation, StreamEvent
from .hub import ModelUnavailable
from .settings import Settings, grid_from_name

SERVER_ENV = "TEXT4SEG_SERVER"
TIMEOUT_S = float(os.environ.get("TEXT4SEG_SERVER_TIMEOUT_S", "300"))


class RemoteError(ModelUnavailable):
    """The server cannot answer as asked; the message says what went wrong and what to do."""


CHOICE = " @ "  # how the app names a served model: "MODEL @ URL"


def servers_from_env() -> list[str]:
    """The servers ``TEXT4SEG_SERVER`` names (comma-separated URLs)."""
    return [url.strip() for url in os.environ.get(SERVER_ENV, "").split(",") if url.strip()]


def parse_choice(name: str) -> tuple[str, str] | None:
    """``(model, url)`` of an app choice ``"MODEL @ URL"``; None for a local model's name."""
    if CHOICE not in name:
        return None
    model, url = name.rsplit(CHOICE, 1)
    return model.strip(), server_root(url)


def served_choices(urls: list[str], log=print) -> list[str]:
    """``"MODEL @ URL"`` for every model the servers serve; a server that does not answer is
    left out with a logged reason (the app starts without it)."""
    choices = []
    for url in urls:
        try:
            choices += [f"{model}{CHOICE}{server_root(url)}" for model in served_models(url, timeout_s=10)]
        except RemoteError as err:
            log(f"left out: {err}")
    return choices


def server_root(url: str) -> str:
    """The server's root URL: ``http://host:8000`` for ``http://host:8000/v1/`` as for itself."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise RemoteError(f"{url!r} is not a server URL: give one like http://localhost:8000")
    return url.removesuffix("/v1")


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class RemoteModel(Engine):
    """One model on one OpenAI-compatible server. Thread-safe: ``eval --concurrency`` shares it."""

    quant = "server"

    def __init__(self, url: str, model: str | None = None, grid: int | None = None, fmt: str | None = None,
                 timeout_s: float = TIMEOUT_S):
        self.url, self.timeout_s = server_root(url), timeout_s
        self.client = _client(self.url, timeout_s)
        served = served_models(self.url, timeout_s)
        if model is None:
            if len(served) != 1:
                raise RemoteError(f"the server at {self.url} serves {len(served)} models ({', '.join(served)}): "
                                  "choose one with --model")
            model = served[0]
        elif model not in served:
            raise RemoteError(f"the server at {self.url} serves {', '.join(served)}, not {model!r}: pass "
                              f"--model {served[0]}, or point --server at a server of {model!r}")
        self.name = model
        name = model.rstrip("/").rsplit("/", 1)[-1]
        self.settings = Settings(grid or grid_from_name(name) or 16, fmt or ("full" if "full" in name else "rrle"),
                                 "chat")
        self.notes: list[str] = []
        self._cached_count = functools.lru_cache(maxsize=4096)(self._count)  # a budget asks the same texts often
        self._fallback = None  # a local tokenizer, when the server cannot count tokens
        self._lock = threading.Lock()

    @property
    def device(self) -> str:
        return self.url

    # ------------------------------------------------------------------ answering

    def stream(self, image: Image.Image, question: str, labels: Sequence[str], *, fmt: str | None = None,
               grid: int | None = None, max_new_tokens: int | None = None, constrained: bool = False,
               jump_forward: bool = False) -> Iterator[StreamEvent]:
        """The server's greedy answer, streamed; the same events as a local model's."""
        import openai

        if jump_forward:
            raise ValueError("jump-forward decoding belongs to the local decode loop; on a server, leave it off "
                             "(constrained decoding alone works)")
        fmt, grid = fmt or self.settings.fmt, grid or self.settings.grid
        # under the grammar the answer ends itself; the server then allows what its context has left
        budget = max_new_tokens or (None if constrained else self.max_new_tokens(labels, fmt, grid))
        timings: dict = {}
        t_start = time.perf_counter()
        content = [{"type": "image_url", "image_url": {"url": _data_url(image)}}, {"type": "text", "text": question}]
        extra = {"structured_outputs": {"grammar": ebnf(grid, grid, labels, fmt)}} if constrained else {}
        timings["preprocess"] = time.perf_counter() - t_start
        text, rows, usage, t_first = "", codec.RowStream(grid, fmt), None, None
        try:
            chunks = self.client.chat.completions.create(
                model=self.name, messages=[{"role": "user", "content": content}], max_tokens=budget, temperature=0.0,
                stream=True, stream_options={"include_usage": True}, extra_body=extra)
            for chunk in chunks:
                usage = chunk.usage or usage
                delta = chunk.choices[0].delta.content if chunk.choices else None
                if not delta:
                    continue
                if t_first is None:
                    t_first = time.perf_counter()
                text += delta
                yield StreamEvent(delta, text, rows.feed(delta))
        except openai.BadRequestError as err:
            raise RemoteError(self._refused(err, budget)) from None
        except openai.APIError as err:  # refused, unreachable, or failed mid-answer
            raise RemoteError(_unreachable(self.url, self.timeout_s, err)) from None
        t_end = time.perf_counter()
        t_first = t_first or t_end
        timings.update(encode=0.0, prefill=t_first - t_start - timings["preprocess"], decode=t_end - t_first,
                       total=t_end - t_start)
        timings["ttft"] = t_first - t_start
        generated = usage.completion_tokens if usage else self.count_tokens(text)
        tokens = {"prompt": usage.prompt_tokens if usage else None, "generated": generated}
        if constrained:
            self._check_grammar(text, grid, fmt, labels)
        generation = Generation(text=text, token_ids=[], timings=timings, tokens=tokens, constrained=constrained)
        yield StreamEvent("", text, codec.completed_rows(text, grid, fmt), done=True, generation=generation)

    def _refused(self, err, budget: int | None) -> str:
        message = _message(err)
        if "context length" in message or "max_model_len" in message or "maximum model length" in message:
            return (f"the server's context is too short for this answer (up to {budget} new tokens after the image "
                    f"and question): restart it with a larger --max-model-len. The server said: {message}")
        return f"the server at {self.url} refused the request: {message}"

    def _check_grammar(self, text: str, grid: int, fmt: str, labels: Sequence[str]) -> None:
        """A server that ignores ``structured_outputs`` answers as if free: say so, once."""
        parsed = codec.parse_answer(text, grid, fmt=fmt, allowed_labels=list(labels))
        note = (f"the server at {self.url} did not follow the grammar (its answer has {len(parsed.diagnostics)} "
                "problems): it may not support structured_outputs (vLLM 0.10 or newer does); answers are free")
        if parsed.diagnostics and note not in self.notes:
            self.notes.append(note)

    # ------------------------------------------------------------------ tokens

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` costs under the served model's tokenizer (no special tokens)."""
        return self._cached_count(text)

    def _count(self, text: str) -> int:
        import httpx

        if self._fallback is None:
            try:
                reply = httpx.post(self.url + "/tokenize", json={"model": self.name, "prompt": text,
                                                                 "add_special_tokens": False}, timeout=30)
                if reply.status_code == 200:
                    return int(reply.json()["count"])
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            with self._lock:
                if self._fallback is None:
                    from .tokens import load_tokenizer

                    self._fallback = load_tokenizer("llama")
                    self.notes.append(f"the server at {self.url} does not count tokens (/tokenize): descriptor "
                                      "costs are counted with the LLaMA vocabulary instead")
        from .tokens import count_tokens

        return count_tokens(self._fallback, text)


def _client(url: str, timeout_s: float):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=os.environ.get("OPENAI_API_KEY", "none"), timeout=timeout_s,
                         max_retries=0)


def served_models(url: str, timeout_s: float = TIMEOUT_S) -> list[str]:
    """The ids of the models the server at ``url`` serves."""
    url = server_root(url)
    try:
        models = _client(url, timeout_s).models.list().data
    except Exception as err:  # noqa: BLE001 - every failure here means the same to the user
        raise RemoteError(_unreachable(url, timeout_s, err)) from None
    if not models:
        raise RemoteError(f"the server at {url} serves no model")
    return [m.id for m in models]


def _unreachable(url: str, timeout_s: float, err: Exception) -> str:
    import openai

    if isinstance(err, openai.APITimeoutError):
        return (f"the server at {url} did not answer within {timeout_s:.0f} s; it may still be loading the model, "
                "or too busy (raise TEXT4SEG_SERVER_TIMEOUT_S)")
    if isinstance(err, openai.APIConnectionError):
        return f"cannot connect to the server at {url}: start it (README, *Scaling out*) or check the URL and port"
    if isinstance(err, openai.APIStatusError):
        return f"the server at {url} answered {err.status_code}: {_message(err)}"
    return f"the server at {url} failed: {type(err).__name__}: {err}"


def _message(err) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        return str(body.get("message") or body.get("error", {}).get("message") or body)[:500]
    return str(err)[:500]

