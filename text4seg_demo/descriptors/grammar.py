"""Grammars that make a model's answer a well-formed descriptor (constrained decoding).

The EBNF is compiled by xgrammar against the model's tokenizer; at every step the tokens
that would leave the grammar are masked out of the logits. R-RLE rows are counted exactly:
the rule ``rN`` is "the rest of a row that still needs N cells", so every row sums to W.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from .codec import OTHERS, check_label

LEAD_IN_CHARS = 100


def lead_chars(labels: Sequence[str]) -> int:
    """Room for a free lead-in sentence, which usually repeats the expression."""
    return LEAD_IN_CHARS + max(len(label) for label in labels)


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def ebnf(height: int, width: int, labels: Sequence[str], fmt: str = "rrle") -> str:
    """The answer grammar: a free one-line lead-in, then ``<seg>`` BODY ``</seg>``."""
    labels = list(dict.fromkeys([OTHERS, *labels]))
    for label in labels:
        check_label(label)
    lines = [
        'root ::= lead "\\n<seg>" body "</seg>"',
        f"lead ::= [^\\n<]{{0,{lead_chars(labels)}}}",
        "label ::= " + " | ".join(_literal(label) for label in labels),
    ]
    if fmt == "rrle":
        lines.append(f'body ::= r{width} ("\\n " r{width}){{{height - 1}}} "\\n"')
        for need in range(1, width + 1):
            alts = [f'label " *{k}| " r{need - k}' for k in range(1, need)] + [f'label " *{need}"']
            lines.append(f"r{need} ::= " + " | ".join(alts))
    elif fmt == "full":
        lines.append(f'body ::= label ("| " label){{{height * width - 1}}} "\\n"')
    else:
        raise ValueError(f"constrained decoding supports 'rrle' and 'full', not {fmt!r}")
    return "\n".join(lines) + "\n"


def grammar_char_budget(height: int, width: int, labels: Sequence[str], fmt: str = "rrle") -> int:
    """The longest answer the grammar admits, in characters: a bound on tokens under any tokenisation."""
    longest = max([OTHERS, *labels], key=len)
    run = len(longest) + len(f" *{width}| ")
    per_row = width * run if fmt == "rrle" else width * (len(longest) + 2)
    return lead_chars([OTHERS, *labels]) + len("\n<seg></seg>") + height * (per_row + 2) + 1


class GrammarConstraint:
    """Masks logits step by step so that generation follows :func:`ebnf`."""

    def __init__(self, tokenizer, vocab_size: int, grammar: str):
        import xgrammar as xgr

        self._xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                  stop_token_ids=[tokenizer.eos_token_id])
        compiled = xgr.GrammarCompiler(info, cache_enabled=False).compile_grammar(grammar)
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, info.vocab_size)

    def mask(self, logits):
        """Forbid, in place, every token the grammar does not allow next (logits: 1 x V)."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        device = logits.device
        if device.type == "cpu":
            self._xgr.apply_token_bitmask_inplace(logits, self.bitmask)
        else:
            self._xgr.apply_token_bitmask_inplace(logits, self.bitmask.to(device))
        return logits

    def accept(self, token_id: int) -> None:
        if not self.matcher.accept_token(token_id):
            raise RuntimeError(f"token {token_id} was not allowed by the grammar")

    def forced(self) -> str:
        """The text the grammar allows as the only continuation from here (may be empty)."""
        return self.matcher.find_jump_forward_string()

    @property
    def finished(self) -> bool:
        return self.matcher.is_terminated()
