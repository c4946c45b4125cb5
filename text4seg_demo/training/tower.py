"""The tiny models' first stage: teaching the vision tower shape kinds (``train-tiny --stage tower``).

Trained end to end as a LLaVA, a from-scratch tower learns colours at once but never the shape
kind, which every expression except ``all <colour> shapes`` needs: after three CPU-hours of
LLaVA training a linear probe reads no kind from it at all. Taught directly, it does learn
kinds, but only from many scenes: with dense labels (the kind and colour of the shape under
each patch centre) a linear head reaches about 0.8 kind accuracy on shape patches after some
100k generated scenes. Tower steps are cheap next to LLaVA steps, so this stage spends them
here. Besides the per-patch loss, each shape's patch features are averaged and classified as
a whole, which makes every patch of a shape carry its kind sooner, the small ones above all.

The stage writes ``OUT/checkpoint.pt`` (resumable with ``--resume``) and ``OUT/log.jsonl``;
``train-tiny --init OUT`` starts a LLaVA stage from its tower. ``--init RUN`` goes on training the
tower of a later stage instead of a fresh one (``--image-size``: on more pixels per patch), its head
first fitted to that tower (:func:`fit_head` says why).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..inference.devices import choose_device, describe
from ..inference.settings import write_record
from ..masks import to_grid
from . import synth, tiny
from .steps import Run, cosine, descend

COLOURS = list(synth.COLOURS)
BACKGROUND_WEIGHT = 0.3  # most patches are background: weigh them down in the per-patch losses
SMALL = 4  # patches: a shape covering at most this many counts as small in the accuracies


@dataclass
class TowerConfig:
    out: str
    grid: int = 16
    steps: int | None = 2800  # 90k scenes: about 75 minutes on a 2-core CPU
    minutes: float | None = None  # a wall-clock cap besides (or instead of) the steps
    batch: int = 32  # per scene as sample-efficient as 64, and 1.5x faster on a 2-core CPU
    lr: float = 1e-3
    warmup: int = 100
    anneal: bool = False  # after the warm-up, lower the rate along steps by a half cosine (else constant)
    pool_weight: float = 1.0
    seed: int = 0
    eval_every_min: float = 10.0
    eval_scenes: int = 200
    workers: int = 0
    init: str | None = None  # go on training the tower of this run, tower stage or saved model
    image_size: int = tiny.IMAGE_SIZE  # input side: 16 x 16 patches of image_size / 16 px (an init's are resized)
    vision_layers: int | None = None  # None: init's, else tiny.VISION_LAYERS (a shallower init is deepened)
    fit_scenes: int = 256  # given init, the head is first fitted to its tower on this many scenes (fit_head)


def patch_labels(visible: np.ndarray, shapes: list, grid: int) -> np.ndarray:
    """Per patch of a ``grid x grid`` layout: the kind (1 + index in SHAPES), colour (1 + index
    in COLOURS) and 1-based index of the shape under its centre, 0 for background; 3 x grid²."""
    owner = to_grid(visible, grid).reshape(-1)
    table = np.array([[0, 0, 0]] + [[1 + synth.SHAPES.index(s.kind), 1 + COLOURS.index(s.colour), i]
                                    for i, s in enumerate(shapes, start=1)])
    return table[owner].T


def scenes(maker: synth.SceneMaker, n: int, processor, grid: int):
    """``n`` generated scenes as (pixels, labels): labels are n x 3 x grid² (see :func:`patch_labels`)."""
    pixels, labels = [], []
    for _ in range(n):
        image, visible, shapes = maker.scene(synth.KINDS[int(maker.rng.integers(len(synth.KINDS)))])
        pixels.append(processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0])
        labels.append(patch_labels(visible, shapes, grid))
    return torch.stack(pixels), torch.from_numpy(np.stack(labels))


class PatchHead(nn.Module):
    """Training-only: kind (background + 4) and colour (background + 6) logits per feature."""

    def __init__(self, hidden: int):
        super().__init__()
        self.kind = nn.Linear(hidden, 1 + len(synth.SHAPES))
        self.colour = nn.Linear(hidden, 1 + len(COLOURS))


def features(tower, pixels: torch.Tensor, grid: int) -> torch.Tensor:
    """The patch features a LLaVA reads (last layer, class token dropped)."""
    return tower(pixel_values=pixels).last_hidden_state[:, -grid * grid:]


def losses(tower, head: PatchHead, pixels, labels, grid: int, pool_weight: float) -> torch.Tensor:
    return head_losses(head, features(tower, pixels, grid), labels, pool_weight)


def head_losses(head: PatchHead, h: torch.Tensor, labels, pool_weight: float) -> torch.Tensor:
    """Per-patch kind and colour losses on features ``h``, plus the kind of each shape's mean feature."""
    kind, colour, instance = labels[:, 0], labels[:, 1], labels[:, 2]
    w_kind = torch.tensor([BACKGROUND_WEIGHT] + [1.0] * len(synth.SHAPES), device=h.device)
    w_colour = torch.tensor([BACKGROUND_WEIGHT] + [1.0] * len(COLOURS), device=h.device)
    loss = F.cross_entropy(head.kind(h).flatten(0, 1), kind.flatten(), weight=w_kind)
    loss = loss + F.cross_entropy(head.colour(h).flatten(0, 1), colour.flatten(), weight=w_colour)
    # each shape's mean feature must name its kind too
    members = F.one_hot(instance, int(instance.max()) + 1)[..., 1:].float()  # B x patches x shapes
    count = members.sum(1)
    pooled = torch.einsum("bps,bpd->bsd", members, h) / count.clamp(min=1)[..., None]
    shape_kind = torch.zeros_like(count, dtype=torch.long).scatter_reduce(
        1, (instance - 1).clamp(min=0), kind, reduce="amax")
    present = count > 0
    return loss + pool_weight * F.cross_entropy(head.kind(pooled[present]), shape_kind[present])


def fit_head(tower, head: PatchHead, processor, grid: int, maker: synth.SceneMaker, n: int = 256,
             steps: int = 300, pool_weight: float = TowerConfig.pool_weight) -> float:
    """Fit ``head`` to a trained ``tower``'s frozen features of ``n`` scenes; return its final loss.

    A stage that adds the tower's own loss (``train-tiny --perception``) starts with this: a fresh
    head on features of a large scale reads them badly, and its large first losses would rewrite
    the tower before the head had learnt to read it."""
    device = next(tower.parameters()).device
    pixels, labels = scenes(maker, n, processor, grid)
    with torch.no_grad():
        h = torch.cat([features(tower, pixels[i:i + 32].to(device), grid) for i in range(0, n, 32)]).float()
    labels = labels.to(device)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = head_losses(head, h, labels, pool_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


@torch.no_grad()
def accuracy(tower, head: PatchHead, pixels, labels, grid: int) -> dict:
    """Kind and colour accuracy on shape patches; 'small' is patches of :data:`SMALL` shapes."""
    h = torch.cat([features(tower, pixels[i:i + 50], grid) for i in range(0, len(pixels), 50)])
    kind, colour, instance = labels[:, 0], labels[:, 1], labels[:, 2]
    on_shape = kind > 0
    sizes = torch.stack([torch.bincount(row, minlength=grid * grid + 1) for row in instance])
    small = on_shape & (torch.gather(sizes, 1, instance) <= SMALL)
    right = head.kind(h).argmax(-1) == kind
    return {"kind_accuracy": right[on_shape].float().mean().item(),
            "small_kind_accuracy": right[small].float().mean().item(),
            "colour_accuracy": (head.colour(h).argmax(-1) == colour)[on_shape].float().mean().item()}


def _probe_patches(model, processor, grid: int, maker: synth.SceneMaker, n: int):
    """The tower's features of the shape patches of ``n`` scenes (the feature layer a LLaVA reads),
    their kind and colour (0-based) and whether their shape is :data:`SMALL`."""
    features, labels = [], []
    for i in range(n):
        image, visible, shapes = maker.scene(synth.KINDS[i % len(synth.KINDS)])
        pixels = processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"]
        states = model.model.vision_tower(pixels.to(model.dtype), output_hidden_states=True).hidden_states
        kind, colour, instance = patch_labels(visible, shapes, grid)
        on_shape = kind > 0
        small = np.bincount(instance, minlength=len(shapes) + 1)[instance] <= SMALL
        features.append(states[model.config.vision_feature_layer][0, -grid * grid:][torch.from_numpy(on_shape)].float())
        labels.append(torch.from_numpy(np.stack([kind - 1, colour - 1, small])[:, on_shape]))
    return torch.cat(features), torch.cat(labels, 1)


@torch.no_grad()
def tower_probe(model, processor, grid: int, n_fit: int = 400, n_test: int = 100, seed: int = 4242) -> dict:
    """What a LLaVA's vision tower alone knows of each patch: the accuracy of linear probes,
    fitted on its frozen features of generated scenes, for the kind and the colour of the shape
    under the patch centre (shape patches only), each beside the share of the commonest class,
    which a probe reaches by guessing; then the same probes on :data:`SMALL` shapes
    and on scenes of the shifted split's generator, which the probes never saw either."""
    fit_x, fit_y = _probe_patches(model, processor, grid, synth.SceneMaker(seed), n_fit)
    tests = {"": _probe_patches(model, processor, grid, synth.SceneMaker(seed + 1), n_test),
             "shifted_": _probe_patches(model, processor, grid, synth.SceneMaker(seed + 1, synth.SHIFTED), n_test)}
    mean, std = fit_x.mean(0), fit_x.std(0) + 1e-6
    fit_x = (fit_x - mean) / std
    accuracy = {}
    torch.manual_seed(seed)
    for row, (name, classes) in enumerate((("shape", len(synth.SHAPES)), ("colour", len(COLOURS)))):
        linear = nn.Linear(fit_x.shape[1], classes)
        with torch.enable_grad():
            opt = torch.optim.Adam(linear.parameters(), lr=1e-2)
            for _ in range(300):
                loss = F.cross_entropy(linear(fit_x), fit_y[row])
                opt.zero_grad()
                loss.backward()
                opt.step()
        for split, (x, y) in tests.items():
            right = linear((x - mean) / std).argmax(-1) == y[row]
            small = y[2].bool()
            accuracy[f"tower_{split}{name}_accuracy"] = right.float().mean().item()
            accuracy[f"tower_{split}{name}_accuracy_small"] = right[small].float().mean().item()
            accuracy[f"tower_{split}{name}_commonest"] = y[row].bincount().max().item() / y.shape[1]
    return accuracy


def train_tower(cfg: TowerConfig, resume: bool = False, log=print) -> Path:
    """Run (or continue) the tower stage up to ``cfg.steps`` (or ``cfg.minutes``); return OUT."""
    run = Run(cfg.out, resume)
    state = run.state
    if state is not None:
        cfg = TowerConfig(**{**state["config"], "steps": cfg.steps, "minutes": cfg.minutes, "out": cfg.out,
                             "workers": cfg.workers})
    if cfg.anneal and cfg.steps is None:
        raise ValueError("an annealed tower stage lowers its rate along its steps: give it --steps")
    if cfg.vision_layers is None:
        from .train import starting_depth  # train imports this module

        cfg.vision_layers = starting_depth(cfg.init)
    device = choose_device()
    torch.manual_seed(cfg.seed)
    tower = tiny.build_model(tiny.build_tokenizer(tiny.training_corpus()), seed=cfg.seed,
                             image_size=cfg.image_size, vision_layers=cfg.vision_layers).model.vision_tower
    head = PatchHead(tower.config.hidden_size)
    tower.to(device)
    head.to(device)
    params = list(tower.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    processor = tiny.build_image_processor(cfg.image_size)
    if state is not None:
        tower.load_state_dict(state["tower"])
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        log(f"resumed at step {run.step} ({run.minutes():.1f} min)")
    elif cfg.init:
        from .train import fit_tower, tower_weights  # train imports this module

        tower.load_state_dict(fit_tower(tower_weights(cfg.init), tower))
        loss = fit_head(tower, head, processor, cfg.grid, synth.SceneMaker(cfg.seed + 10**5),
                        n=cfg.fit_scenes, pool_weight=cfg.pool_weight)
        log(f"tower of {cfg.init}, its head fitted (loss {loss:.3f})")
    log(f"tower stage on {device}: batch {cfg.batch}, up to step {cfg.steps}"
        + (f", at most {cfg.minutes} min" if cfg.minutes else ""))
    held_out = [t.to(device) for t in scenes(synth.SceneMaker(10**6 + 1), cfg.eval_scenes, processor, cfg.grid)]

    def checkpoint():
        run.save(tower=tower.state_dict(), head=head.state_dict(), opt=opt.state_dict(), config=asdict(cfg))
        tower.eval()
        run.record({"scenes": run.step * cfg.batch, **accuracy(tower, head, *held_out, cfg.grid)}, log)
        tower.train()

    def make(numpy_rng, _):
        return scenes(synth.SceneMaker(numpy_rng), cfg.batch, processor, cfg.grid)

    tower.train()
    for pixels, labels in run.batches(make, cfg.seed, cfg.steps, cfg.workers, cfg.minutes, cfg.eval_every_min,
                                      checkpoint):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * (cosine(run.step, cfg.warmup, cfg.steps) if cfg.anneal
                                    else min(1.0, (run.step + 1) / cfg.warmup))
        loss = losses(tower, head, pixels.to(device), labels.to(device), cfg.grid, cfg.pool_weight)
        descend(opt, params, loss)
        done = run.step + 1
        if done % 20 == 0:
            log(f"tower step {done} ({done * cfg.batch} scenes) {run.minutes():.1f} min loss {loss.item():.4f}")
    record = {**asdict(cfg), "stage": "tower", "device": device.type, "hardware": describe(device),
              "generator": tiny.GENERATOR, "steps": run.step,
              "scenes": run.step * cfg.batch, "minutes": round(run.minutes(), 1)}
    write_record(run.out, {"training": record})
    return run.out
