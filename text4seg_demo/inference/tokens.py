"""Counting descriptor tokens under a model's own tokenizer."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from .hub import ASSETS

LLAMA_VOCAB = ASSETS / "llama-vocab" / "ggml-vocab-llama-spm.gguf"
ALIASES = {"llama": LLAMA_VOCAB}


@lru_cache(maxsize=8)
def load_tokenizer(source: str | Path):
    """A tokenizer from a model directory, a ``.gguf`` file, or ``llama`` (the bundled
    LLaMA/Vicuna vocabulary of the released LLaVA checkpoint)."""
    from transformers import AutoTokenizer

    path = Path(ALIASES.get(str(source), source))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {path}")
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs and not any(path.glob("tokenizer*")):
            return AutoTokenizer.from_pretrained(str(path), gguf_file=ggufs[0].name)
        return AutoTokenizer.from_pretrained(str(path))
    raise FileNotFoundError(f"no tokenizer at {source}: give a model directory, a .gguf file or 'llama'")


def count_tokens(tokenizer, text: str) -> int:
    """Tokens the text costs on its own (no BOS/EOS), as the model would generate it."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])
