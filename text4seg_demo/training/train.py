"""Training the tiny Text4Seg models from scratch on the synthetic domain (``text4seg train-tiny``).

Plain next-token training collapses to all-``others`` answers: nothing makes the language
model read the image. The recipe therefore adds two training-only heads whose losses shape
the hidden states the answer is generated from (neither is used at inference):

* a *patch head* on the image positions: the question comes before the image in the tiny
  models' template, so each image position can see the expression and is taught whether its
  patch belongs to the target;
* a *row head* on the answer positions: from the state that predicts the next descriptor
  token it must recover that token's grid row (index and foreground cells), which is
  exactly the read-out the answer needs.

A from-scratch tower never learns the shape kinds this way, so the recipe starts with a tower
stage (``tower.py``) and trains this one from it with the tower frozen (``--init TOWER
--freeze-tower``).

Everything is resumable: ``--resume`` continues from ``OUT/checkpoint.pt`` with the same
data stream (``steps.py``), and every evaluation is appended to ``OUT/log.jsonl``.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..descriptors import codec, prompts
from ..evaluation.metrics import iou
from ..inference.attention import image_block_mask
from ..inference.devices import choose_device, describe, native_bf16
from ..inference.positions import AnswerPositions
from ..inference.settings import Settings, read_record
from ..masks import to_grid
from . import synth, tiny, tower
from .steps import Run, cosine, descend

PROMPT_STYLE = "question_first"
POS_WEIGHT = 3.0  # target patches are few: weigh them up in the auxiliary losses


@dataclass
class TrainConfig:
    out: str
    fmt: str = "rrle"
    grid: int = 16
    minutes: float | None = None  # wall-clock cap; 60 when no steps are given
    batch: int = 16
    lr: float = 2e-3
    warmup: int = 100
    seed: int = 0
    patch_weight: float = 1.0
    row_weight: float = 1.0
    eval_every_min: float = 10.0
    eval_queries: int = 48  # 0: no held-out evaluation
    text_layers: int = 6
    bf16: bool | None = None  # bf16 autocast; None: where the CPU computes bf16 natively (else it is ~15x slower)
    init: str | None = None  # start from another run's weights (a curriculum), not from scratch
    positions: str = "grid"  # or "natural": answer tokens aligned with their image cells (positions.py)
    steps: int | None = None  # stop after this many steps (the cosine schedule spans them)
    workers: int = 0  # processes building batches (steps.py)
    freeze_tower: bool = False  # keep the vision tower as it starts (after a tower stage: see tower.py)
    label_tokens: str = "words"  # expressions spelt in words, or each one "whole" token (tiny.py)
    image_attention: str = "bidirectional"  # or "causal": image tokens see the whole image (attention.py)
    contrast: bool = True  # queries in contrasting pairs on one image (synth.samples)
    colour_rivals: bool = True  # colour-and-shape and absent queries that the shape kind alone cannot answer
    focus: str | None = "side,size"  # query kinds (synth.KINDS, comma-separated) drawn more often than the rest
    focus_share: float = 0.4  # the share of scenes made for ``focus``; the rest draw a kind uniformly
    warm_heads: int = 0  # first steps that move only the training heads (see train)
    image_size: int = tiny.IMAGE_SIZE  # the tower's input side, in 16 x 16 patches (an init's are resized: fit_tower)
    vision_layers: int | None = None  # None: the starting tower's depth (a shallower one is deepened: fit_tower)
    perception: float = 0.0  # weight of the tower stage's kind and colour loss, on as many extra scenes; 0: none
    tower: str | None = None  # the vision tower from this run instead of init's (a tower stage that went on from it)
    size_skew: float = 1.0  # training shape sizes over the domain's range as u ** size_skew: above 1, more small ones
    backgrounds: tuple[str, ...] = synth.BACKGROUNDS  # the background families training scenes are drawn on
    ema: float = 0.0  # decay of a moving average of the weights that the stage exports instead; 0: none


class AuxHeads(nn.Module):
    """Training-only heads: patch membership at image positions, row read-out at answer positions
    and, given ``vision_hidden``, the tower stage's kind and colour head on the tower's features
    (``--perception``: the sparse answer loss alone teaches small shapes' kinds slowly)."""

    def __init__(self, hidden: int, grid: int, vision_hidden: int | None = None):
        super().__init__()
        self.patch = nn.Linear(hidden, 1)
        self.row_cells = nn.Linear(hidden, grid)
        self.row_index = nn.Linear(hidden, grid + 1)
        self.perception = tower.PatchHead(vision_hidden) if vision_hidden else None

    @classmethod
    def of_run(cls, model, cfg: TrainConfig) -> AuxHeads:
        """The heads a run with ``cfg`` trains beside ``model``."""
        return cls(model.config.text_config.hidden_size, cfg.grid,
                   model.config.vision_config.hidden_size if cfg.perception else None)


def encode_example(tokenizer, processor, image, expression, mask, fmt, grid, rng: random.Random,
                   positions: str = "natural"):
    """Token ids, position ids, loss targets and pixels for one (image, expression, mask) triple."""
    cells = to_grid(mask, grid).astype(bool)
    body = codec.encode(cells.astype(int), [codec.OTHERS, expression], fmt)
    prompt = prompts.prompt(prompts.question(expression, None, rng), PROMPT_STYLE)
    answer = prompts.answer(expression, body) + tokenizer.eos_token
    before, after = prompt.split(prompts.IMAGE)
    image_id = tokenizer.convert_tokens_to_ids(prompts.IMAGE)
    n_image = grid * grid
    head = tokenizer(before, add_special_tokens=False)["input_ids"] + [image_id] * n_image
    head += tokenizer(after, add_special_tokens=False)["input_ids"]
    enc = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
    ids = head + enc["input_ids"]
    labels = [-100] * len(head) + enc["input_ids"]
    scheme = AnswerPositions(len(head), grid, fmt, positions)
    position_ids = list(range(len(head))) + [scheme.advance(answer[:end]) for _, end in enc["offset_mapping"]]

    # grid row of every answer token (-1 outside the body), and LM weights: non-empty rows count more
    body_start = answer.index("<seg>") + len("<seg>")
    rows = []
    for start, _ in enc["offset_mapping"]:
        k = start - body_start
        if k < 0 or k >= len(body):
            rows.append(-1)
        elif fmt == "rrle":
            rows.append(min(body[:k].count("\n"), grid - 1))
        else:
            rows.append(min(body[:k].count("|") // grid, grid - 1))
    weights = [0.0] * len(head)
    previous = -1
    for r in rows:
        w = 1.0
        if r >= 0 and cells[r].any():
            w = 5.0 if r != previous else 2.0
        weights.append(w)
        previous = r
    # the row head at position t reads the row of token t + 1
    next_rows = [-1] * len(head) + rows[1:] + [-1]
    next_rows[len(head) - 1] = rows[0]
    pixels = processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]
    return {"ids": ids, "positions": position_ids, "labels": labels, "weights": weights, "next_rows": next_rows,
            "image_start": len(tokenizer(before, add_special_tokens=False)["input_ids"]),
            "cells": cells, "pixels": pixels}


def scene_maker(seed, cfg: TrainConfig) -> synth.SceneMaker:
    """The training scenes: the stated domain, with shape sizes skewed as ``cfg.size_skew`` says,
    on the background families of ``cfg.backgrounds``."""
    return synth.SceneMaker(seed, replace(synth.DOMAIN, size_skew=cfg.size_skew, backgrounds=cfg.backgrounds))


def batch_triples(maker: synth.SceneMaker, cfg: TrainConfig) -> list:
    """One batch of (image, expression, mask) triples: scenes of a kind drawn uniformly, or
    ``cfg.focus`` for a ``cfg.focus_share`` of them, with their pairs under ``cfg.contrast``."""
    triples, kinds = [], cfg.focus.split(",") if cfg.focus else []
    while len(triples) < cfg.batch:
        focus = kinds[int(maker.rng.integers(len(kinds)))] if kinds and maker.rng.random() < cfg.focus_share else None
        triples += synth.samples(maker, focus, contrast=cfg.contrast, colour_rivals=cfg.colour_rivals)
    return triples[:cfg.batch]


def collate(examples, pad_id):
    n = max(len(e["ids"]) for e in examples)

    def pad(key, value):
        return torch.tensor([e[key] + [value] * (n - len(e[key])) for e in examples])

    return {
        "input_ids": pad("ids", pad_id), "position_ids": pad("positions", 0), "labels": pad("labels", -100),
        "weights": pad("weights", 0.0),
        "next_rows": pad("next_rows", -1),
        "attention_mask": torch.tensor([[1] * len(e["ids"]) + [0] * (n - len(e["ids"])) for e in examples]),
        "pixel_values": torch.stack([e["pixels"] for e in examples]),
        "image_start": torch.tensor([e["image_start"] for e in examples]),
        "cells": torch.tensor(np.stack([e["cells"] for e in examples])),
    }


def forward(model, batch, grid: int, image_attention: str = "causal"):
    """The model on a collated batch, with every hidden state, under the run's attention scheme."""
    mask = batch["attention_mask"]
    if image_attention == "bidirectional":
        mask = image_block_mask(mask.shape[1], batch["image_start"].tolist(), grid * grid, torch.float32, mask.device)
    return model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
                 pixel_values=batch["pixel_values"], output_hidden_states=True)


def losses(model, heads, batch, grid, image_attention: str = "causal"):
    out = forward(model, batch, grid, image_attention)
    logits = out.logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    weights = batch["weights"][:, 1:] * (targets != -100)
    device = weights.device
    ce = F.cross_entropy(logits.transpose(1, 2), targets.clamp(min=0), reduction="none")
    lm = (ce * weights).sum() / weights.sum()

    states = out.hidden_states
    mid = states[len(states) // 2].float()
    idx = batch["image_start"][:, None] + torch.arange(grid * grid, device=device)[None]
    image_states = torch.gather(mid, 1, idx[..., None].expand(-1, -1, mid.shape[-1]))
    cells = batch["cells"].flatten(1).float()
    pos_weight = torch.tensor(POS_WEIGHT, device=device)
    patch = F.binary_cross_entropy_with_logits(heads.patch(image_states).squeeze(-1), cells, pos_weight=pos_weight)

    last = states[-1].float()
    rows = batch["next_rows"]
    sel = rows >= 0
    row_states = last[sel]
    row_targets = rows[sel]
    owner = torch.arange(rows.shape[0], device=device)[:, None].expand_as(rows)[sel]
    row_cells = batch["cells"].float()[owner, row_targets]
    row = F.binary_cross_entropy_with_logits(heads.row_cells(row_states), row_cells, pos_weight=pos_weight)
    row = row + F.cross_entropy(heads.row_index(row_states), row_targets)
    return lm, patch, row


def rates(step: int, cfg: TrainConfig, total: int) -> tuple[float, float]:
    """Learning rates of the model and of the training heads at ``step`` of ``total``.

    A trained model with fresh heads: while the heads learn to read it, their gradients would
    rewrite it, so for ``cfg.warm_heads`` steps the model stands still (its optimiser statistics
    fill), then warms up as a stage does rather than taking the full rate at once."""
    heads = cfg.lr * cosine(step, cfg.warmup, total)
    if step < cfg.warm_heads:
        return 0.0, heads
    return cfg.lr * cosine(step - cfg.warm_heads, cfg.warmup, total - cfg.warm_heads), heads


def _settings(cfg: TrainConfig) -> Settings:
    """How a model of this run speaks, as its ``text4seg.json`` will say."""
    return Settings(cfg.grid, cfg.fmt, PROMPT_STYLE, positions=cfg.positions, image_attention=cfg.image_attention)


def _engine(model, tokenizer, processor, cfg: TrainConfig):
    """The model in training, wrapped for greedy answers as the app would give them."""
    from ..inference.engine import Text4SegModel

    return Text4SegModel(model, tokenizer, processor, _settings(cfg), cache_images=0)


@torch.no_grad()
def grid_ciou(model, tokenizer, processor, queries, cfg: TrainConfig) -> dict:
    """Greedy answers for held-out queries, scored on the grid: cIoU and malformed rate."""
    from ..evaluation.evaluate import grid_scores

    scores = grid_scores(_engine(model, tokenizer, processor, cfg), queries)
    model.train()
    return scores


def held_out(n: int, seed: int = 10**6):
    maker = synth.SceneMaker(seed)
    return [synth.sample(maker, synth.KINDS[i % len(synth.KINDS)]) for i in range(n)]


def _init_source(init: str) -> Path:
    """The directory ``--init`` names: a run, a saved model or a bundled preset."""
    from ..inference.hub import PRESETS

    return Path(PRESETS[init].source) if init in PRESETS else Path(init)


def _initialise(model, heads, init: str, tokenizer) -> str:
    """Load the starting weights of a curriculum stage; say where they came from."""
    source = _init_source(init)
    if (source / "checkpoint.pt").exists():
        start = torch.load(source / "checkpoint.pt", weights_only=False, map_location="cpu")
        if "tower" in start:  # a tower stage (tower.py): the rest starts afresh
            model.model.vision_tower.load_state_dict(fit_tower(start["tower"], model.model.vision_tower))
            return f"vision tower initialised from the tower stage {init} (step {start['step']})"
        _load_weights(model, stage_weights(start), init)
        heads.load_state_dict({**heads.state_dict(), **_answer_heads(start["heads"])})
        return f"initialised from the run {init} (step {start['step']}, {start['config']['fmt']})"
    if (source / "model.safetensors").exists():
        from transformers import LlavaForConditionalGeneration

        from ..inference.tokens import load_tokenizer

        saved = LlavaForConditionalGeneration.from_pretrained(source, dtype=torch.float32)
        added = _load_weights(model, saved.state_dict(), init, load_tokenizer(source), tokenizer)
        return (f"initialised from the saved model {source} (training heads start afresh"
                + (f"; {added} new tokens start as the mean of the pieces they replace)" if added else ")"))
    raise FileNotFoundError(f"--init {init}: no checkpoint.pt or model.safetensors in {source}")


def tower_weights(init: str) -> dict:
    """The vision tower's weights in the tower stage, run or saved model that ``init`` names."""
    source = _init_source(init)
    if (source / "checkpoint.pt").exists():
        start = torch.load(source / "checkpoint.pt", weights_only=False, map_location="cpu")
        if "tower" in start:
            return start["tower"]
        prefix = "model.vision_tower."
        return {key[len(prefix):]: value for key, value in stage_weights(start).items() if key.startswith(prefix)}
    if (source / "model.safetensors").exists():
        from transformers import LlavaForConditionalGeneration

        return LlavaForConditionalGeneration.from_pretrained(source, dtype=torch.float32).model.vision_tower.state_dict()
    raise FileNotFoundError(f"{init}: no checkpoint.pt or model.safetensors in {source} to take a vision tower from")


def starting_depth(source: str | None) -> int:
    """The depth of the tower a stage starts from: ``source``'s, or the default for a fresh one."""
    return encoder_depth(tower_weights(source)) if source else tiny.VISION_LAYERS


def stage_weights(state: dict) -> dict:
    """The model weights a LLaVA stage's checkpoint stands for: the moving average where the stage
    kept one (``--ema``), else its last step's."""
    if "ema" not in state:
        return state["model"]
    return {key.removeprefix("module."): value for key, value in state["ema"].items() if key.startswith("module.")}


def _answer_heads(weights: dict) -> dict:
    """A run's training heads but the perception head, which every stage fits anew (train)."""
    return {key: value for key, value in weights.items() if not key.startswith("perception.")}


EMBEDDINGS = ("model.language_model.embed_tokens.weight", "lm_head.weight")  # tied: one matrix


def fit_tower(weights: dict, model) -> dict:
    """``weights`` made fit for ``model``'s vision tower, when that one is finer or deeper.

    A finer tower's patches are ``f`` times as wide, over ``f`` times as many pixels: each kernel
    weight is spread over the ``f x f`` pixels that its one pixel became, divided by ``f²``, so a
    patch reads the same average colours as before. A deeper tower gets its extra encoder layers
    on top, each a copy of the last one with its two output projections at zero: a residual
    layer that adds nothing, so the model answers as it did (area resizing aside), free to learn
    the finer detail or to use the extra layers."""
    ours = model.state_dict()
    fitted = dict(weights)
    for key in (k for k in weights if k.endswith("patch_embedding.weight") and k in ours):
        kernel, target = weights[key], ours[key].shape
        if kernel.shape != target:
            f = target[-1] // kernel.shape[-1]
            if f * kernel.shape[-1] != target[-1]:
                raise ValueError(f"a {kernel.shape[-1]} px patch embedding cannot become a {target[-1]} px one: "
                                 "give an --image-size that is a whole multiple of the starting model's")
            fitted[key] = kernel.repeat_interleave(f, -2).repeat_interleave(f, -1) / f**2
    return _deepen(fitted, ours)


LAYER = re.compile(r"(.*encoder\.layers\.)(\d+)\.(.*)")  # the vision tower's: Llama's layers are no encoder's
SILENT = ("self_attn.out_proj.", "mlp.fc2.")  # a layer whose outputs are zero adds nothing to the residual


def encoder_depth(weights: dict) -> int:
    """How many vision encoder layers ``weights`` hold."""
    return 1 + max((int(m[2]) for m in map(LAYER.fullmatch, weights) if m), default=-1)


def _deepen(weights: dict, ours: dict) -> dict:
    """``weights`` with as many vision encoder layers as ``ours``, new ones silent (see :func:`fit_tower`)."""
    have, want = encoder_depth(weights), encoder_depth(ours)
    if have > want:
        raise ValueError(f"the starting weights have a {have}-layer vision tower, this run's has {want}: "
                         f"give --vision-layers {have} or more")
    deepened = dict(weights)
    for key, value in weights.items():
        m = LAYER.fullmatch(key)
        if m and int(m[2]) == have - 1:
            for layer in range(have, want):
                silent = m[3].startswith(SILENT)
                deepened[f"{m[1]}{layer}.{m[3]}"] = torch.zeros_like(value) if silent else value.clone()
    return deepened


def _load_weights(model, weights: dict, init: str, theirs=None, ours=None) -> int:
    """Load a whole model's weights; return how many tokens ``ours`` adds to ``theirs``, the
    tokenizer they were trained with. A token they lack starts as the mean of the rows of the
    pieces ``theirs`` writes it with: it reads about as they did, and as its logit is their
    mean it cannot outscore them, so greedy answers are unchanged until training moves it."""
    weights = fit_tower(weights, model)
    old = weights[EMBEDDINGS[0]]
    size = model.state_dict()[EMBEDDINGS[0]].shape[0]
    if old.shape[0] == size:
        model.load_state_dict(weights)
        return 0
    if theirs is None or not set(theirs.get_vocab()) <= set(ours.get_vocab()):
        raise ValueError(f"--init {init} has a {old.shape[0]}-token vocabulary, this run's tokenizer {size}: "
                         f"give the --label-tokens it was trained with ({' or '.join(tiny.LABEL_TOKENS)})")
    known, rows = theirs.get_vocab(), old.new_empty(size, old.shape[1])
    for token, i in ours.get_vocab().items():
        if token in known:
            rows[i] = old[known[token]]
        else:
            rows[i] = old[theirs(ours.convert_tokens_to_string([token]), add_special_tokens=False)["input_ids"]].mean(0)
    model.load_state_dict({**weights, **dict.fromkeys(EMBEDDINGS, rows)})
    return size - len(known)


def _training_record(init: str | None) -> dict | None:
    """The training record of the run, tower stage or saved model that ``init`` names, if any."""
    source = _init_source(init) if init else None
    saved = source and (read_record(source) or read_record(source / "model"))
    return saved.get("training", {}) if saved else None


def _lineage(init: str | None) -> list[dict]:
    """The training records of the runs a model's weights started from, oldest first."""
    training = _training_record(init)
    if training is None:
        return []
    earlier = training.get("lineage") or _lineage(training.get("init"))
    return [*earlier, {k: v for k, v in training.items() if k != "lineage"}]


def _tower_stage(tower: str | None) -> list[dict]:
    """The record of the tower stage that ``--tower`` took its tower from (it ran after ``--init``'s
    stages and went on from one of them, so only its own record is new); none for a saved model."""
    training = _training_record(tower)
    return [training] if training and training.get("stage") == "tower" else []


def train(cfg: TrainConfig, resume: bool = False, log=print) -> Path:
    """Run (or continue) a LLaVA stage up to ``cfg.steps`` (or ``cfg.minutes``); return its model."""
    run = Run(cfg.out, resume)
    torch.manual_seed(cfg.seed)
    state = run.state
    if state is not None:
        steps = cfg.steps if cfg.steps is not None else state["config"].get("steps")  # kept unless given
        cfg = TrainConfig(**{**state["config"], "minutes": cfg.minutes, "steps": steps, "out": cfg.out,
                             "workers": cfg.workers})
    if cfg.vision_layers is None:
        cfg.vision_layers = starting_depth(cfg.tower or cfg.init)
    device = choose_device()
    tokenizer = tiny.build_tokenizer(tiny.training_corpus(), label_tokens=cfg.label_tokens)
    processor = tiny.build_image_processor(cfg.image_size)
    model = tiny.build_model(tokenizer, text_layers=cfg.text_layers, seed=cfg.seed, image_size=cfg.image_size,
                             vision_layers=cfg.vision_layers)
    heads = AuxHeads.of_run(model, cfg)
    if state is None and cfg.init:
        log(_initialise(model, heads, cfg.init, tokenizer))
    if state is None and cfg.tower:
        model.model.vision_tower.load_state_dict(fit_tower(tower_weights(cfg.tower), model.model.vision_tower))
        log(f"vision tower from {cfg.tower}")
    model.to(device)
    heads.to(device)
    if state is None and heads.perception is not None:
        loss = tower.fit_head(model.model.vision_tower, heads.perception, processor, cfg.grid,
                              synth.SceneMaker(cfg.seed + 10**5))
        log(f"perception head fitted to the starting tower (loss {loss:.3f})")
    model.model.vision_tower.requires_grad_(not cfg.freeze_tower)
    # A low-rate stage moves some answers right and others wrong; --ema makes its result the weights
    # averaged over its last steps instead (training log: tried, not adopted).
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema)) if cfg.ema else None
    groups = [[p for p in module.parameters() if p.requires_grad] for module in (model, heads)]
    params = [*groups[0], *groups[1]]
    opt = torch.optim.AdamW([{"params": group} for group in groups], lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    if state is not None:
        model.load_state_dict(state["model"])
        heads.load_state_dict(state["heads"])
        opt.load_state_dict(state["opt"])
        if averaged is not None:
            averaged.load_state_dict(state["ema"])
        log(f"resumed at step {run.step} ({run.minutes():.1f} min)")
    if cfg.bf16 is None:
        cfg.bf16 = device.type == "cpu" and native_bf16()
    queries = held_out(cfg.eval_queries)
    budget = cfg.minutes if cfg.minutes else (None if cfg.steps is not None else 60.0)
    est_total = cfg.steps if cfg.steps is not None else max(run.step + 1, int(budget * 30))  # re-estimated as we go
    log(f"{cfg.fmt} stage on {device}, {'bf16 autocast' if cfg.bf16 else 'fp32'}: batch {cfg.batch}, "
        + (f"up to step {cfg.steps}" if cfg.steps is not None else f"{budget:g} min"))
    model.train()

    def checkpoint():
        run.save(model=model.state_dict(), heads=heads.state_dict(), opt=opt.state_dict(), config=asdict(cfg),
                 device=device.type, hardware=describe(device),
                 **({"ema": averaged.state_dict()} if averaged is not None else {}))
        exported = averaged.module if averaged is not None else model
        run.record(grid_ciou(exported, tokenizer, processor, queries, cfg) if queries else {}, log)

    def make(numpy_rng, rng):
        maker = scene_maker(numpy_rng, cfg)
        batch = collate([encode_example(tokenizer, processor, *triple, cfg.fmt, cfg.grid, rng, cfg.positions)
                         for triple in batch_triples(maker, cfg)], tokenizer.pad_token_id)
        if cfg.perception:  # drawn after the batch, which stays as it would be without them
            batch["scene_pixels"], batch["scene_labels"] = tower.scenes(maker, cfg.batch, processor, cfg.grid)
        return batch

    for batch in run.batches(make, cfg.seed, cfg.steps, cfg.workers, budget, cfg.eval_every_min, checkpoint):
        batch = {key: value.to(device) for key, value in batch.items()}
        opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = rates(run.step, cfg, est_total)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            lm, patch, row = losses(model, heads, batch, cfg.grid, cfg.image_attention)
            perception = (tower.losses(model.model.vision_tower, heads.perception, batch["scene_pixels"],
                                       batch["scene_labels"], cfg.grid, tower.TowerConfig.pool_weight)
                          if cfg.perception else torch.zeros(()))
        loss = lm + cfg.patch_weight * patch + cfg.row_weight * row + cfg.perception * perception
        descend(opt, params, loss)
        if averaged is not None:
            averaged.update_parameters(model)
        done, minutes = run.step + 1, run.minutes()
        if cfg.steps is None:
            est_total = max(done + 1, int(done * budget / max(minutes, 1e-6)))
        if done % 20 == 0:
            log(f"step {done} {minutes:.1f} min lm {lm.item():.4f} patch {patch.item():.4f} row {row.item():.4f}"
                + (f" perception {perception.item():.4f}" if cfg.perception else ""))
    return export(run.out)


def _load_run(run: str | Path):
    """A run's checkpoint, config, tokenizer and model with the trained weights."""
    state = torch.load(Path(run) / "checkpoint.pt", weights_only=False, map_location="cpu")
    cfg = TrainConfig(**state["config"])
    tokenizer = tiny.build_tokenizer(tiny.training_corpus(), label_tokens=cfg.label_tokens)
    model = tiny.build_model(tokenizer, text_layers=cfg.text_layers, seed=cfg.seed, image_size=cfg.image_size,
                             vision_layers=encoder_depth(state["model"]))
    model.load_state_dict(stage_weights(state))
    return state, cfg, tokenizer, model


@torch.no_grad()
def probe(run: str | Path, n: int = 32) -> dict:
    """Where a run's grounding lives, teacher-forced on held-out queries: the patch head's cIoU
    at the image positions, the row head's cIoU on the row being written, and how often the
    row head knows which row that is; then what the vision tower alone tells (:func:`tower_probe`)."""
    state, cfg, tokenizer, model = _load_run(run)
    processor = tiny.build_image_processor(cfg.image_size)
    heads = AuxHeads.of_run(model, cfg)
    heads.load_state_dict(state["heads"])
    model.eval()
    rng, counts = random.Random(0), np.zeros(6)
    for image, expression, mask in held_out(n):
        batch = collate([encode_example(tokenizer, processor, image, expression, mask, cfg.fmt, cfg.grid, rng,
                                        cfg.positions)], tokenizer.pad_token_id)
        states = forward(model, batch, cfg.grid, cfg.image_attention).hidden_states
        start = int(batch["image_start"][0])
        patch = heads.patch(states[len(states) // 2][0, start:start + cfg.grid ** 2]).squeeze(-1) > 0
        truth = batch["cells"][0].flatten()
        rows = batch["next_rows"][0]
        last = states[-1][0][rows >= 0]
        cells = heads.row_cells(last) > 0
        row_truth = batch["cells"][0][rows[rows >= 0]]
        counts += [(patch & truth).sum(), (patch | truth).sum(), (cells & row_truth).sum(), (cells | row_truth).sum(),
                   (heads.row_index(last).argmax(-1) == rows[rows >= 0]).sum(), len(last)]
    return {"step": state["step"], "patch_head_ciou": counts[0] / max(counts[1], 1),
            "row_head_ciou": counts[2] / max(counts[3], 1), "row_index_accuracy": counts[4] / max(counts[5], 1),
            **colour_pairs(model, tokenizer, processor, cfg),
            **(_expression_similarity(model, tokenizer) if cfg.label_tokens == "whole" else {}),
            **tower.tower_probe(model, processor, cfg.grid)}


@torch.no_grad()
def colour_pairs(model, tokenizer, processor, cfg: TrainConfig, n: int = 30, seed: int = 5000) -> dict:
    """Whether the model reads the colour word: greedy answers to `the red circle` and `the blue
    circle` on scenes holding both (:meth:`synth.SceneMaker.scene` with ``colour_rivals``). A model
    that reads only the shape kind answers both alike. Returns the share of pairs answered alike
    (answers overlapping at IoU > 0.5) and the share of their queries answered right (IoU >= 0.5)."""
    from ..evaluation.evaluate import grid_answers

    pairs = []
    for k in range(n * 2):
        maker = synth.SceneMaker(seed + k)
        image, visible, shapes = maker.scene("colour_shape", colour_rivals=True)
        by_kind: dict[str, list] = {}
        for q in maker.candidates(shapes, visible)["colour_shape"]:
            by_kind.setdefault(q.expression.split()[-1], []).append(q)
        twins = next((qs[:2] for qs in by_kind.values() if len(qs) > 1), [])
        pairs += [(image, q.expression, q.mask(visible)) for q in twins]
        if len(pairs) == 2 * n:
            break
    answers = [parsed.mask() for parsed in grid_answers(_engine(model, tokenizer, processor, cfg), pairs)]
    truths = [to_grid(mask.astype(np.uint8), cfg.grid).astype(bool) for *_, mask in pairs]
    alike = [iou(a, b) > 0.5 for a, b in zip(answers[::2], answers[1::2])]
    return {"colour_pairs": len(alike), "colour_pairs_alike": float(np.mean(alike)),
            "colour_pairs_right": float(np.mean([iou(a, t) >= 0.5 for a, t in zip(answers, truths)]))}


def _expression_similarity(model, tokenizer) -> dict:
    """Mean cosine similarity of the embedding rows of whole-expression tokens (`the red circle`)
    that differ only in colour, and of those that differ only in kind: what each token encodes."""
    rows = model.get_input_embeddings().weight.detach().float()

    def row(colour, kind):
        return rows[tokenizer.convert_tokens_to_ids(f"the {colour} {kind}")]

    def mean_cosine(pairs):
        return float(np.mean([F.cosine_similarity(row(*a), row(*b), dim=0).item() for a, b in pairs]))

    colours = list(synth.COLOURS)
    return {"expression_cosine_other_colour": mean_cosine(
                [((a, k), (b, k)) for k in synth.SHAPES for i, a in enumerate(colours) for b in colours[i + 1:]]),
            "expression_cosine_other_kind": mean_cosine(
                [((c, a), (c, b)) for c in colours for i, a in enumerate(synth.SHAPES) for b in synth.SHAPES[i + 1:]])}


def export(run: str | Path) -> Path:
    """Write ``RUN/model`` (a loadable model directory) from ``RUN/checkpoint.pt``."""
    run = Path(run)
    state, cfg, tokenizer, model = _load_run(run)
    curve = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    settings = {**_settings(cfg).to_dict(),
                "training": {**asdict(cfg), "steps": state["step"], "minutes": round(state["elapsed"] / 60, 1),
                             "device": state.get("device", "cpu"),
                             "hardware": state.get("hardware") or describe(torch.device(state.get("device", "cpu"))),
                             "generator": tiny.GENERATOR,
                             "lineage": [*_lineage(cfg.init), *_tower_stage(cfg.tower)]},
                "metrics": {k: v for k, v in curve[-1].items() if k not in ("step", "minutes")} if curve else {}}
    return tiny.save_pretrained(model, tokenizer, run / "model", settings)
