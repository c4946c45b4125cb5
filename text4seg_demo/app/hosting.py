"""What a public demo allows its visitors: which models, how large an upload, how long an
answer, how long a request, how many waiting. A Hugging Face Space (``SPACE_ID`` set), ``python
app.py --public`` or ``TEXT4SEG_PUBLIC=1`` is public: visitors pick only the presets and the
models the host lists, and every request is checked before anything is downloaded or read.
Elsewhere only the size limits apply. Each limit is an environment variable of the host."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..inference.hub import PRESETS
from ..inference.remote import parse_choice, server_root, servers_from_env
from ..inference.settings import grid_from_name

# What a Hugging Face Space receives (`hf upload --repo-type space USER/NAME . --include ... --exclude ...`,
# README *Deploy*): the app, its package, the bundled weights and the examples; never training
# runs, data sets, tests or caches.
SPACE_INCLUDE = (".gitattributes", "app.py", "requirements.txt", "README.md", "text4seg_demo/*", "assets/*", "examples/*")
SPACE_EXCLUDE = ("*__pycache__*", "*.pyc")

# ZeroGPU holds a GPU for the duration a request declares. A request declares what its answer
# needs: the released 7B in 4-bit writes about 0.5 LLaMA tokens a cell in R-RLE and 2 in
# full-length text, at about 30 ms a token, after a few seconds of image encoding and prefill.
GPU_BASE_S, GPU_TOKEN_S = 10.0, 0.03
TOKENS_PER_CELL = {"rrle": 0.5, "full": 2.0}


@dataclass(frozen=True)
class Limits:
    public: bool = False
    allowed_models: tuple[str, ...] = tuple(PRESETS)  # in public mode; the presets and TEXT4SEG_ALLOWED_MODELS
    max_pixels: int = 50_000_000  # TEXT4SEG_MAX_PIXELS: larger images are refused before they are decoded
    max_file_mb: float = 25.0  # TEXT4SEG_MAX_FILE_MB
    max_new_tokens: int = 8192  # TEXT4SEG_MAX_NEW_TOKENS: the cap of an answer's budget
    time_limit_s: int = 300  # TEXT4SEG_TIME_LIMIT_S: per request
    queue_size: int = 64  # TEXT4SEG_QUEUE_SIZE: requests waiting; more are turned away at once

    @classmethod
    def from_env(cls, public: bool = False) -> Limits:
        env = os.environ
        public = public or bool(env.get("SPACE_ID")) or env.get("TEXT4SEG_PUBLIC", "") not in ("", "0")
        extra = tuple(m.strip() for m in env.get("TEXT4SEG_ALLOWED_MODELS", "").split(",") if m.strip())
        defaults = cls()
        return cls(public=public, allowed_models=tuple(dict.fromkeys([*PRESETS, *extra])),
                   max_pixels=int(env.get("TEXT4SEG_MAX_PIXELS", defaults.max_pixels)),
                   max_file_mb=float(env.get("TEXT4SEG_MAX_FILE_MB", defaults.max_file_mb)),
                   max_new_tokens=int(env.get("TEXT4SEG_MAX_NEW_TOKENS", defaults.max_new_tokens)),
                   time_limit_s=int(env.get("TEXT4SEG_TIME_LIMIT_S", defaults.time_limit_s)),
                   queue_size=int(env.get("TEXT4SEG_QUEUE_SIZE", defaults.queue_size)))

    def model(self, name: str) -> str:
        """``name`` if visitors may use it; a public demo refuses anything else with a message
        (a served model only on a server the host named in TEXT4SEG_SERVER)."""
        served = parse_choice(name)
        hosted = served is not None and served[1] in {server_root(url) for url in servers_from_env()}
        if self.public and name not in self.allowed_models and not hosted:
            raise ValueError(f"this public demo serves only {', '.join(self.allowed_models)}; run the project "
                             f"yourself to try {name[:80]!r}")
        return name

    def upload(self, path) -> None:
        """Refuse an upload larger than the host allows, before it is read."""
        if isinstance(path, (str, Path)) and Path(path).is_file():
            size_mb = Path(path).stat().st_size / 2**20
            if size_mb > self.max_file_mb:
                raise ValueError(f"the file is {size_mb:.0f} MB; this demo takes images up to "
                                 f"{self.max_file_mb:g} MB")

    def new_tokens(self, requested: int | None) -> int | None:
        """The answer budget a visitor asked for, within the host's cap; refused when not positive."""
        if requested is None:
            return None
        if requested < 1:
            raise ValueError(f"max new tokens must be positive, got {requested}")
        return min(requested, self.max_new_tokens)


def gpu_seconds(model: str, fmt: str = "rrle", grid: int | None = None, max_new_tokens: int | None = None) -> int:
    """The GPU seconds a request declares on ZeroGPU: its answer's expected length at its grid and
    format (``compare``: both answers), within its token budget, rounded up."""
    cells = (grid or grid_from_name(model) or 16) ** 2
    formats = ("rrle", "full") if fmt == "compare" else (fmt if fmt in TOKENS_PER_CELL else "rrle",)
    tokens = [cells * TOKENS_PER_CELL[f] for f in formats]
    if max_new_tokens:
        tokens = [min(t, max_new_tokens) for t in tokens]
    return int(-(-(GPU_BASE_S + GPU_TOKEN_S * sum(tokens)) // 1))
