"""Caches keyed by image content, shared by the engine (image features, prompt prefixes) and the
refiners (SAM image embeddings): another question on the same picture skips the encoders."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from PIL import Image


class LRUCache(OrderedDict):
    """A small least-recently-used map for caches keyed by image content."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get(self, key):
        if key in self:
            self.move_to_end(key)
            return super().__getitem__(key)
        return None

    def put(self, key, value):
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


def image_key(image: Image.Image) -> str:
    """A content hash of an image: equal pixels, equal key."""
    digest = hashlib.sha1(image.tobytes())
    digest.update(f"{image.mode}{image.size}".encode())
    return digest.hexdigest()
