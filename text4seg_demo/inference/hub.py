"""Where models come from: the presets (bundled tiny models, the released checkpoint), local
directories and Hugging Face hub ids, and the cache that downloads and conversions share."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .settings import Settings

ASSETS = Path(__file__).resolve().parents[2] / "assets"


@dataclass(frozen=True)
class Preset:
    source: str  # a directory under assets/ or a hub id
    settings: Settings | None  # None: read from the model's text4seg.json
    about: str


PRESETS = {
    # the bundled models' settings are in their own text4seg.json
    "tiny-rrle": Preset(str(ASSETS / "tiny-rrle"), None,
                        "bundled tiny model, R-RLE, synthetic shapes domain (CPU, offline)"),
    "tiny-full": Preset(str(ASSETS / "tiny-full"), None,
                        "bundled tiny model, full-length descriptors, synthetic shapes domain (CPU, offline)"),
    "text4seg-llava-7b-p24": Preset("lmc22/text4seg-llava-7b-p24", Settings(24, "rrle", "llava_v1"),
                                    "the released Text4Seg LLaVA-1.5-7B checkpoint, 24 x 24 grid (GPU recommended)"),
}
DEFAULT_MODEL = "tiny-rrle"


class ModelUnavailable(RuntimeError):
    """A model that cannot be had right now; the message names it and says what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("TEXT4SEG_CACHE", Path.home() / ".cache" / "text4seg"))


def resolve(name: str, download: bool = True) -> Path:
    """A local directory for a preset, a local path or a Hugging Face hub id.

    Hub downloads show progress bars; offline without a cached copy the error says what to do.
    """
    source = PRESETS[name].source if name in PRESETS else name
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if name in PRESETS and source.startswith(str(ASSETS)):
        raise ModelUnavailable(f"the bundled model {name!r} is missing from {path}; reinstall the project")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        raise ModelUnavailable(f"{name!r} is neither a local directory nor a Hugging Face hub id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        if not download:
            raise ModelUnavailable(f"{source} is not in the local Hugging Face cache") from None
    try:
        return Path(snapshot_download(source))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as err:
        raise ModelUnavailable(
            f"cannot download {source}: {type(err).__name__}. Connect to the internet (or set HF_ENDPOINT to a "
            f"mirror) and run `huggingface-cli download {source}`, pass a local directory with --model, or use "
            f"the bundled offline model with --model {DEFAULT_MODEL}."
        ) from None
