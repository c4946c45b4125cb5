"""Counting descriptor tokens under a model's own tokenizer."""

from __future__ import annotations

import copy
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


def continuation_tokens(tokenizer, text: str, forced: str) -> list[int]:
    """The tokens that ``forced`` adds after ``text``, as a whole tokenisation of the two would
    write them: the last characters of ``text`` are tokenised with it, so that a SentencePiece
    word-initial space or a merge across the boundary comes out as in context. Empty when no
    short context splits cleanly at the boundary (the caller then has nothing to propose)."""
    for k in (12, 8, 4, 2, 1):
        tail = text[-k:]
        before = tokenizer(tail, add_special_tokens=False)["input_ids"]
        both = tokenizer(tail + forced, add_special_tokens=False)["input_ids"]
        if both[:len(before)] == before and len(both) > len(before):
            return both[len(before):]
    return []


class IncrementalDecoder:
    """The text of a growing answer, one token at a time, with constant work per token.

    Each step decodes only the tokens since the last settled boundary, against the same tokens
    without the new one, as streaming servers do: a character split across tokens waits until it
    is whole, and a SentencePiece word-initial space comes out as a whole decode gives it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self._prefix = 0  # decoding restarts here: a boundary that is settled
        self._read = 0  # tokens up to here are already in ``text``

    def fork(self) -> IncrementalDecoder:
        """A copy that can read tokens ahead without changing this one."""
        twin = copy.copy(self)
        twin.ids = list(self.ids)
        return twin

    def add(self, token: int) -> str:
        """Append ``token``; return the text it completes (empty while a character is unfinished)."""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        delta = after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta
