"""Which tokens an image token may attend to: causal, or the whole image (``image_attention``).

A causal language model reads the image in raster order, so an image token never sees the
patches below it or later in its row. Whether a star is *the star on the left* or *the small
star* depends on the other star, which half of the time comes later: at the image positions
the answer to such an expression cannot be known. With ``bidirectional`` attention inside the
image block (as Gemma 3 and PaliGemma do for their image tokens) every image token sees every
other, and the text stays causal. It is a setting of the tiny models (``text4seg.json``): the
bundled ones use it, the released checkpoint is causal. From a tower stage it learnt more slowly
than causal attention; once a model reads its words, it is what taught the position words
(docs/training-log.md, *Reading the position word*).

Both the trainer and the backend build the mask here, so the two cannot disagree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads only when a mask is built: the scheme names stay cheap to import
    import torch

SCHEMES = ("causal", "bidirectional")


def image_block_mask(length: int, image_starts: list[int], image_tokens: int, dtype: torch.dtype,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """An additive ``(batch, 1, length, length)`` mask: causal, except that the ``image_tokens``
    tokens from each row's ``image_starts`` entry attend to one another in both directions.

    Right padding needs nothing more: real tokens never reach the pads after them."""
    import torch

    position = torch.arange(length, device=device)
    allowed = (position[None, :] <= position[:, None]).expand(len(image_starts), length, length).clone()
    for row, start in enumerate(image_starts):
        allowed[row, start:start + image_tokens, start:start + image_tokens] = True
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
