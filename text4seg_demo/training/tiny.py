"""The bundled tiny Text4Seg models: a transformers-native LLaVA small enough for a CPU.

Architecture: a CLIP-style vision tower reading an image as 16 x 16 patches (224 px in 14 px
patches by default; ``--image-size`` gives more pixels to the same 16 x 16 vision tokens), a
2-layer MLP projector and a small Llama. The tokenizer is a byte-level BPE with the domain's
fixed strings added as whole tokens: each expression, the counts `` *N`` and the separators. A
separator joins the piece before it in both formats alike (``LABEL| `` in full-length
descriptors, `` *N| `` and `` *N\\n `` closing an R-RLE run), so neither format pays a token per
separator. It still encodes any text, and decodes exactly.
Its ``words`` variant spells expressions in words (``the``, `` red``, `` circle``); measured, a
model learns to ground them more slowly.
"""

from __future__ import annotations

from pathlib import Path

from ..descriptors import prompts
from ..descriptors.codec import OTHERS, ROW_SEP, RUN_SEP
from ..inference.settings import read_record, write_record
from .synth import BACKGROUNDS, expressions

IMAGE_SIZE, VISION_GRID = 224, 16  # default input side; vision tokens per side at any input size
VISION_LAYERS = 4  # the tower's default depth
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


TOKENIZER_SUMMARY = {  # the tokenizer variants (``label_tokens``), as a model card names them
    "whole": "each expression, `LABEL| `, ` *N`, ` *N| `, ` *N\\n `, `| ` and `\\n ` as whole tokens",
    "words": "expressions in words; `others`, `others| `, ` *N`, ` *N| `, ` *N\\n `, `| ` and `\\n ` as whole tokens",
}
LABEL_TOKENS = tuple(TOKENIZER_SUMMARY)


def domain_pieces(label_tokens: str = "whole", max_count: int = 64) -> list[str]:
    """Strings that become single tokens: separators, counts alone and closing their run
    (`` *N| ``, `` *N\\n ``), labels and ``LABEL| `` (with ``label_tokens="words"`` the only such
    label is ``others``)."""
    if label_tokens not in LABEL_TOKENS:
        raise ValueError(f"label_tokens must be one of {LABEL_TOKENS}, not {label_tokens!r}")
    labels = [OTHERS, *(expressions() if label_tokens == "whole" else [])]
    counts = [f" *{n}" for n in range(1, max_count + 1)]
    closing = [f"{count}{sep}" for count in counts for sep in (RUN_SEP, ROW_SEP)]
    return ["<seg>", "</seg>", RUN_SEP, ROW_SEP, *counts, *closing, *labels, *(f"{label}{RUN_SEP}" for label in labels)]


def build_tokenizer(corpus: list[str], vocab_size: int = 600, label_tokens: str = "whole"):
    """Train the byte-level BPE on ``corpus`` and add the domain pieces and ``<image>``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    tok.add_tokens([AddedToken(p, normalized=False) for p in domain_pieces(label_tokens)])
    tok.add_special_tokens([AddedToken(prompts.IMAGE, normalized=False, special=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL, extra_special_tokens={"image_token": prompts.IMAGE})


def training_corpus() -> list[str]:
    """Questions and lead-ins for every expression: the text the BPE merges are learnt from."""
    texts = []
    for expression in expressions():
        texts += [prompts.question(expression, i) for i in range(len(prompts.QUESTIONS))]
        texts += [prompts.lead_in(expression, i) for i in range(len(prompts.LEAD_INS))]
    texts += [prompts.prompt("", style) for style in prompts.TEMPLATES]
    return texts


def build_model(tokenizer, vision_hidden=192, vision_layers=VISION_LAYERS, text_hidden=256, text_layers=4, seed=0,
                image_size=IMAGE_SIZE):
    """A freshly initialised tiny LLaVA for ``tokenizer``."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=vision_hidden // 64,
                              image_size=image_size, patch_size=image_size // VISION_GRID, projection_dim=vision_hidden)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=int(text_hidden * 2.75),
                       num_hidden_layers=text_layers, num_attention_heads=text_hidden // 64,
                       num_key_value_heads=text_hidden // 64, max_position_embeddings=1024,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids(prompts.IMAGE),
                         image_seq_length=VISION_GRID ** 2, vision_feature_layer=-1,
                         vision_feature_select_strategy="default", tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config)


def build_image_processor(image_size: int = IMAGE_SIZE):
    """Stretch to a square (no crop), CLIP normalisation: the reference's preprocessing."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"height": image_size, "width": image_size}, do_center_crop=False,
                              crop_size={"height": image_size, "width": image_size}, resample=2)


def save_pretrained(model, tokenizer, out: str | Path, settings: dict) -> Path:
    """Write weights (fp16), config, tokenizer, processor and the Text4Seg settings file."""

    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)  # half the size; loaded back as fp32
    tokenizer.save_pretrained(out)
    build_image_processor(model.config.vision_config.image_size).save_pretrained(out)
    write_record(out, settings)
    return out


FIXED_QUERIES_SEED, FIXED_QUERIES = 777, 20
GENERATOR = "crowds"  # the scenes stages train on now (synth.DOMAIN); stage records say which they saw
EARLIER_GENERATORS = {  # what a card says of a stage that saw another generator
    None: "scenes of the earlier generator (dull solid, gradient and noisy backgrounds only)",
    "domain-wide": "scenes of the first domain-wide generator (textures at 12-80 px, 1-6 shapes a scene)",
    "domain-wide-2": "scenes of the domain-wide generator before shades (each colour one RGB triple)",
    "shades": "scenes of the domain-wide generator before crowds (shapes kept apart, none cut by the edge)",
}


def _fixed_queries_domain():
    """The generator's ranges when the cards' check was defined: a wider generator must not move
    the queries a card's figure is checked on."""
    import dataclasses

    from .synth import DOMAIN

    return dataclasses.replace(DOMAIN, texture_period=(12, 80), shapes=(1, 6), shades=False, spacing=(0.85, 0.85),
                               edge=0.0)


def fixed_queries():
    """The 20 held-out queries every bundled model card states its grid cIoU on."""
    from .synth import KINDS, SceneMaker, sample

    maker = SceneMaker(FIXED_QUERIES_SEED, _fixed_queries_domain())
    return [sample(maker, KINDS[i % len(KINDS)]) for i in range(FIXED_QUERIES)]


def fixed_grid_ciou(engine) -> float:
    """Grid cIoU of a loaded model on :func:`fixed_queries` (greedy, unconstrained)."""
    from ..evaluation.evaluate import grid_scores

    return grid_scores(engine, fixed_queries())["grid_ciou"]


def _shown(path: str) -> str:
    """A recorded run path as a card shows it: relative to the project, not to one machine."""
    import os

    return os.path.relpath(path) if os.path.isabs(path) and Path(path).is_relative_to(Path.cwd()) else path


def _total_minutes(training: dict) -> float:
    return training["minutes"] + sum(stage["minutes"] for stage in training.get("lineage", []))


def stage_flags(t: dict) -> str:
    """The ``train-tiny`` options of a stage (its recorded ``TrainConfig``) that shape its weights."""
    flags = [f"--lr {t['lr']}", f"--positions {t.get('positions', 'natural')}",
             f"--label-tokens {t.get('label_tokens', 'whole')}",
             f"--image-attention {t.get('image_attention', 'causal')}"]
    if t.get("freeze_tower"):
        flags.append("--freeze-tower")
    flags += [("--" if t.get(key) else "--no-") + flag for flag, key in (("contrast", "contrast"),
                                                                         ("colour-rivals", "colour_rivals"))]
    flags.append(f"--focus {t['focus']} --focus-share {t['focus_share']}" if t.get("focus") else "--focus none")
    if t.get("warm_heads"):
        flags.append(f"--warm-heads {t['warm_heads']}")
    if t.get("image_size", IMAGE_SIZE) != IMAGE_SIZE:
        flags.append(f"--image-size {t['image_size']}")
    if t.get("vision_layers") not in (None, VISION_LAYERS):  # None: the starting tower's
        flags.append(f"--vision-layers {t['vision_layers']}")
    if t.get("tower"):
        flags.append(f"--tower {_shown(t['tower'])}")
    if t.get("perception"):
        flags.append(f"--perception {t['perception']}")
    if t.get("size_skew", 1.0) != 1.0:
        flags.append(f"--size-skew {t['size_skew']}")
    if tuple(t.get("backgrounds", BACKGROUNDS)) != BACKGROUNDS:
        flags.append(f"--backgrounds {','.join(t['backgrounds'])}")
    if t.get("ema"):
        flags.append(f"--ema {t['ema']}")
    return " ".join(flags)


def _stage_summary(stage: dict) -> str:
    where = f" on {stage.get('hardware') or stage.get('device', 'cpu')}"
    if stage.get("generator") != GENERATOR:
        where += ", " + EARLIER_GENERATORS.get(stage.get("generator"), EARLIER_GENERATORS[None])
    if stage.get("stage") == "tower":
        layers = stage.get("vision_layers")
        deeper = f" ({layers} layers)" if layers not in (None, VISION_LAYERS) else ""
        return (f"tower stage{deeper}, {stage['steps']} steps of {stage['batch']} scenes in {stage['minutes']} min"
                f"{where}")
    if stage["steps"] == 0:
        return f"{stage['fmt']}, the tokenizer extended, no steps"
    return f"{stage['fmt']}, {stage['steps']} steps in {stage['minutes']} min{where} (`{stage_flags(stage)}`)"


def write_card(run: str | Path) -> Path:
    """The model card of a finished run's ``model/``: data, size, steps, time, metrics, attempts.

    It is titled with the preset the run's format is bundled as (``tiny-rrle``, ``tiny-full``)."""
    import json

    from ..inference.loading import load

    run = Path(run)
    model_dir = run / "model"
    settings = read_record(model_dir)
    engine = load(str(model_dir), log=lambda m: None)
    settings.setdefault("metrics", {})["fixed20_grid_ciou"] = round(fixed_grid_ciou(engine), 4)
    write_record(model_dir, settings)
    params = sum(p.numel() for p in engine.model.parameters())
    vision = engine.model.config.vision_config
    records = map(json.loads, filter(str.strip, (run / "log.jsonl").read_text().splitlines()))
    evaluations = [r for r in records if "grid_ciou" in r]  # none from a stage run with --eval-queries 0
    t = settings["training"]
    name = f"tiny-{settings['format']}"
    lines = [
        f"# {name}: a tiny Text4Seg model ({'R-RLE' if settings['format'] == 'rrle' else 'full-length'} descriptors)",
        "",
        "Trained from scratch by text4seg-demo on its synthetic shapes domain (`text4seg synth`), "
        "speaking the released checkpoint's language: the SPEC's question templates, the lead-in "
        "`Sure, here is the segmentation mask for '<expression>':`, `<seg>` wrapping, `others` for background, "
        f"a {settings['grid']} x {settings['grid']} grid. Prompt template: `{settings['prompt_style']}` "
        "(the question before the image).",
        "",
        "- architecture: transformers `LlavaForConditionalGeneration`, CLIP-style tower "
        f"192 x {vision.num_hidden_layers} layers at {vision.image_size} px / {vision.patch_size} px patches, "
        f"2-layer MLP projector, Llama 256 x {t['text_layers']} layers; {params / 1e6:.2f}M parameters",
        f"- tokenizer: byte-level BPE, {TOKENIZER_SUMMARY[t.get('label_tokens', 'whole')]}",
        (f"- training: {t['steps']} steps of batch {t['batch']} (fresh synthetic samples, seed {t['seed']}), AdamW "
         f"{t['lr']}, {'bf16 autocast' if t['bf16'] else 'fp32'}, {t['minutes']} minutes wall time "
         f"on {t.get('hardware') or t.get('device', 'cpu')}, with training-only patch and row heads "
         "(see `text4seg_demo/training/train.py`)" if t["steps"] else
         "- training: none in this stage, which gave the weights before it a tokenizer with more tokens, each "
         "new one starting as the mean of the pieces it replaces (greedy answers unchanged)"),
        f"- command: `text4seg train-tiny --out RUN --format {settings['format']} --grid {settings['grid']} "
        f"--steps {t['steps']}{' --init INIT_RUN' if t.get('init') else ''} {stage_flags(t)}`",
        *([f"- a curriculum: this stage started from the weights of `{_shown(t['init'])}` as they were then; earlier "
           "stages, oldest first: "
           + "; ".join(_stage_summary(stage) for stage in t.get("lineage", []))
           + f". Training time of the weights in all: {_total_minutes(t):.0f} minutes"]
          if t.get("init") else []),
        *(["- answer positions: `grid` (`text4seg_demo/inference/positions.py`): each descriptor token's rotary position is "
           "that of `<seg>` plus the grid cells written so far, so the token that starts the run at cell k sits "
           "where a full-length answer would name cell k; the text is unchanged"]
          if settings.get("positions") == "grid" else []),
        *(["- image attention: `bidirectional` (`text4seg_demo/inference/attention.py`): the image tokens see one another "
           "in both directions, the text is causal"]
          if settings.get("image_attention") == "bidirectional" else []),
        f"- grid cIoU on the 20 fixed queries of `tiny.fixed_queries()`: {settings['metrics']['fixed20_grid_ciou']}",
        f"- rebuild by the shipped recipe: `text4seg rebuild-tiny --format {settings['format']} --out DIR` "
        "(`docs/training.md` of the project); every training attempt and its numbers: `docs/training-log.md`",
    ]
    if evaluations:
        lines += ["", "Held-out grid cIoU during training (greedy answers to generated queries):", "",
                  "| step | minutes | grid cIoU | malformed |", "|---|---|---|---|",
                  *[f"| {c['step']} | {c['minutes']} | {c['grid_ciou']:.3f} | {c['malformed_rate']:.3f} |"
                    for c in evaluations]]
    (model_dir / "README.md").write_text("\n".join(lines) + "\n")
    return model_dir
