"""The ``text4seg`` command line. Heavy modules are imported inside each command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 640x480, got {text!r}") from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f"a size must be positive, got {text!r}")
    return w, h


def _grid(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 256:
        raise argparse.ArgumentTypeError(f"grid size must be between 1 and 256, got {value}")
    return value


def _kinds(text: str) -> str | None:
    from .training.synth import KINDS

    if text == "none":
        return None
    unknown = [k for k in text.split(",") if k not in KINDS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown query kind {unknown[0]!r}: choose from {', '.join(KINDS)}")
    return text


def _some_kinds(text: str) -> tuple[str, ...]:
    kinds = _kinds(text)
    if kinds is None:
        raise argparse.ArgumentTypeError("give at least one query kind")
    return tuple(kinds.split(","))


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a share must be between 0 and 1, got {value}")
    return value


def _skew(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"a size skew must be a positive number (1: uniform sizes), got {value}")
    return value


def _decay(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"a decay must be at least 0 and under 1 (0: no average), got {value}")
    return value


def _backgrounds(text: str) -> tuple[str, ...]:
    from .training.synth import BACKGROUNDS

    families = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [f for f in families if f not in BACKGROUNDS]
    if not families or unknown:
        raise argparse.ArgumentTypeError(f"background families are a comma-separated list of {', '.join(BACKGROUNDS)}; "
                                         f"got {text!r}")
    return families


def _image_size(text: str) -> int:
    from .training.tiny import VISION_GRID

    value = int(text)
    if value <= 0 or value % VISION_GRID:
        raise argparse.ArgumentTypeError(f"the image size must be a positive multiple of {VISION_GRID} "
                                         f"({VISION_GRID} x {VISION_GRID} patches), got {value}")
    return value


def _layers(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"a tower has at least one layer, got {value}")
    return value


# --------------------------------------------------------------------------- descriptors


def cmd_descriptors_encode(args) -> int:
    from .descriptors import codec
    from .masks import load_mask, to_grid

    codec.check_label(args.label)
    tokenizer = _tokenizer(args)
    for path in args.masks:
        grid = to_grid(load_mask(path), args.grid).astype(bool).astype(int)
        body = codec.encode(grid, [codec.OTHERS, args.label], args.format)
        text = codec.wrap(body) if args.wrap else body
        record = {"mask": str(path), "text": text}
        if tokenizer is not None:
            from .inference.tokens import count_tokens

            record["tokens"] = count_tokens(tokenizer, body)
        if args.jsonl:
            print(json.dumps(record))
        else:
            sys.stdout.write(text)
            if "tokens" in record:
                print(f"{path}: {record['tokens']} tokens", file=sys.stderr)
    return 0


def cmd_descriptors_decode(args) -> int:
    from .descriptors import codec

    text = sys.stdin.read()
    parsed = codec.parse_answer(text, args.grid, fmt=args.format, repair=args.repair)
    result = parsed.to_dict()
    tokenizer = _tokenizer(args)
    if tokenizer is not None:
        from .inference.tokens import count_tokens

        result["tokens"] = count_tokens(tokenizer, parsed.body)
    if args.out:
        from .export import save_binary_png
        from .masks import to_image

        w, h = args.size or (args.grid, args.grid)
        save_binary_png(to_image(parsed.mask(), h, w), args.out)
    print(json.dumps(result))
    return 0


def _tokenizer(args):
    if not args.tokenizer:
        return None
    from .inference.tokens import load_tokenizer

    return load_tokenizer(args.tokenizer)


# --------------------------------------------------------------------------- models


def _servers(args) -> list[str]:
    from .inference.remote import servers_from_env

    return args.server or servers_from_env()


def _connect(args) -> list:
    """One engine for each server of ``--server`` (or ``TEXT4SEG_SERVER``), all serving one model."""
    from .inference.remote import RemoteError, RemoteModel

    engines = [RemoteModel(url, args.model, grid=getattr(args, "grid", None)) for url in _servers(args)]
    if len({e.name for e in engines}) > 1:
        raise RemoteError(f"the servers serve different models ({', '.join(e.name for e in engines)}): "
                          "choose one with --model")
    return engines


def _load_model(args):
    """The model of ``--model``: on the server given, else loaded here."""
    from .inference.hub import DEFAULT_MODEL
    from .inference.loading import load

    if _servers(args):
        engines = _connect(args)
        if len(engines) > 1:
            raise ValueError(f"{args.command} asks one server; `eval` spreads queries over several")
        return engines[0]
    return load(args.model or DEFAULT_MODEL, quant=args.quant, device=args.device,
                adapter=getattr(args, "adapter", None), grid=getattr(args, "grid", None), compile=args.compile,
                log=lambda m: print(m, file=sys.stderr))


def cmd_segment(args) -> int:
    from .export import save_binary_png
    from .images import prepare
    from .pipeline import Request, segment

    image, notes = prepare(args.image)
    engine = _load_model(args)
    refiner = _refiner(args)
    request = Request(expression=args.expression, classes=args.classes, fmt=args.format, grid=args.grid,
                      constrained=args.constrained or args.jump_forward, jump_forward=args.jump_forward,
                      max_new_tokens=args.max_new_tokens, sam_points=args.points,
                      seed=args.seed)
    result = segment(engine, image, request, refiner)
    result.notes[:0] = notes
    doc = result.to_json()
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    else:
        print(json.dumps(doc, indent=2))
    if args.mask:
        final = result.refined if result.refined is not None else result.coarse
        save_binary_png(final > 0, args.mask)
    for d in result.diagnostics:
        print(f"warning: {d.message}", file=sys.stderr)
    return 0


def _refiner(args):
    if args.refine in (None, "none"):
        return None
    from .refine import build_refiner

    return build_refiner(args.refine, device=args.device, checkpoint=args.sam_checkpoint)


def cmd_convert_llava(args) -> int:
    from .inference.convert import convert

    convert(args.src, args.dst, log=lambda m: print(m, file=sys.stderr))
    return 0


def cmd_synth(args) -> int:
    from tqdm import tqdm

    from .training.synth import SPLITS, make_dataset

    with tqdm(total=args.n_images, desc=f"synth ({args.split})", unit="image") as bar:
        manifest = make_dataset(args.out, args.n_images, args.seed, args.queries_per_image,
                                progress=lambda n: bar.update(1), domain=SPLITS[args.split],
                                kinds=args.kinds)
    print(f"{sum(1 for _ in open(manifest))} queries written to {manifest}", file=sys.stderr)
    return 0


def _training_options(parser) -> None:
    """Where and how a training command runs, the same for one stage and the whole recipe."""
    parser.add_argument("--workers", type=int, default=0,
                        help="processes that build batches (default 0: best on a 2-core CPU; use more beside a GPU)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the training process")
    parser.add_argument("--eval-every", type=float, default=10, help="minutes between held-out evaluations")


def _given(**options) -> dict:
    """The options the user set: the rest keep each training stage's own defaults."""
    return {name: value for name, value in options.items() if value is not None}


def cmd_train_tiny(args) -> int:
    import torch

    from .training.train import TrainConfig, train

    torch.set_num_threads(args.threads)
    if args.stage == "tower":
        from .training.tower import TowerConfig, train_tower

        cfg = TowerConfig(out=str(args.out), grid=args.grid, seed=args.seed, eval_every_min=args.eval_every,
                          minutes=args.minutes, workers=args.workers, image_size=args.image_size,
                          vision_layers=args.vision_layers, init=str(args.init) if args.init else None,
                          anneal=args.anneal, **_given(steps=args.steps, batch=args.batch, lr=args.lr))
        train_tower(cfg, resume=args.resume, log=lambda m: print(m, file=sys.stderr, flush=True))
        print(f"tower written to {args.out / 'checkpoint.pt'}; start a LLaVA stage with --init {args.out}",
              file=sys.stderr)
        return 0
    cfg = TrainConfig(out=str(args.out), fmt=args.format, grid=args.grid, seed=args.seed, steps=args.steps,
                      minutes=args.minutes, workers=args.workers, eval_every_min=args.eval_every,
                      eval_queries=args.eval_queries,
                      **_given(batch=args.batch, lr=args.lr, backgrounds=args.backgrounds),
                      init=str(args.init) if args.init else None, positions=args.positions,
                      freeze_tower=args.freeze_tower, label_tokens=args.label_tokens,
                      image_attention=args.image_attention, contrast=args.contrast,
                      colour_rivals=args.colour_rivals, focus=args.focus, focus_share=args.focus_share,
                      warm_heads=args.warm_heads, image_size=args.image_size, vision_layers=args.vision_layers,
                      perception=args.perception,
                      tower=str(args.tower) if args.tower else None, size_skew=args.size_skew, ema=args.ema,
                      bf16={"auto": None, "bf16": True, "fp32": False}[args.precision])
    path = train(cfg, resume=args.resume, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"model written to {path}", file=sys.stderr)
    return 0


def cmd_rebuild_tiny(args) -> int:
    import torch

    from .training.recipe import rebuild
    from .training.tiny import write_card

    torch.set_num_threads(args.threads)
    last = rebuild(args.format, args.out, tower=args.tower, until=args.until, workers=args.workers,
                   eval_every_min=args.eval_every, log=lambda m: print(m, file=sys.stderr, flush=True))
    if (last / "model").exists():
        write_card(last)
        print(f"model and card in {last / 'model'}; to bundle it: cp {last / 'model'}/* assets/tiny-{args.format}/",
              file=sys.stderr)
    return 0


def cmd_probe(args) -> int:
    from .training.train import probe

    print(json.dumps(probe(args.run)))
    return 0


def cmd_card(args) -> int:
    from .training.tiny import write_card

    print(f"model card written to {write_card(args.run) / 'README.md'}", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from .evaluation.evaluate import Replica, evaluate
    from .inference.hub import DEFAULT_MODEL

    if args.oracle and args.workers > 1:
        raise ValueError("--workers runs model replicas; --oracle has no model")
    if args.concurrency > 1 and not _servers(args):
        raise ValueError("--concurrency keeps requests in flight on --server; a local model runs one at a time "
                         "(use --workers for replicas here)")
    if args.workers > 1:  # each worker loads its own model and refiner
        engine, refiner = None, None
        replica = Replica(args.model or DEFAULT_MODEL, args.quant, args.device, args.adapter, args.grid, args.refine,
                          args.sam_checkpoint, args.compile)
    elif _servers(args):
        engine, refiner, replica = _connect(args), _refiner(args), None
    else:
        engine, refiner, replica = None if args.oracle else _load_model(args), _refiner(args), None
    report = evaluate(engine, args.data, refiner=refiner, constrained=args.constrained, limit=args.limit,
                      grid=args.grid or 16, rows=args.rows, resume=args.resume, replica=replica, workers=args.workers,
                      concurrency=args.concurrency)
    _emit(report, args.json, drop=("queries",))
    return 0


def cmd_data_refcoco(args) -> int:
    from tqdm import tqdm

    from .datasets.refer import convert

    with tqdm(desc=f"{args.dataset}/{args.split}", unit="referent") as bar:
        done = convert(args.refer, args.images, args.dataset, args.split, args.out, progress=lambda: bar.update(1))
    print(done.summary(), file=sys.stderr)
    return 0


def cmd_data_train_json(args) -> int:
    from tqdm import tqdm

    from .datasets.conversations import write_training_json

    with tqdm(desc="conversations", unit="query") as bar:
        written = write_training_json(args.manifest, args.out, args.grid, args.format, args.style, args.seed,
                                      progress=lambda: bar.update(1))
    skipped = "".join(f"; skipped {n} {why}" for why, n in written.skipped.items())
    print(f"{written.records} {args.style} conversations written to {written.path}{skipped}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    from .evaluation.bench import bench

    report = bench(args.data, args.rrle_model, args.full_model, limit=args.limit,
                   log=lambda m: print(m, file=sys.stderr), browser=args.browser)
    _emit(report, args.json)
    return 0


def _emit(report: dict, path: Path | None, drop=()) -> None:
    """The whole report to ``path``; to stdout the report without bulky per-query fields."""
    if path:
        Path(path).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k not in drop}, indent=2))


# --------------------------------------------------------------------------- parser


def _refine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--refine", default="none",
                   help="none, auto, grabcut, sam (ViT-H), sam-vit_l, sam-vit_b or sam-lite (experimental)")
    p.add_argument("--sam-checkpoint", help="a local SAM checkpoint file instead of the cached download")


def _model_options(p: argparse.ArgumentParser) -> None:
    from .inference.devices import QUANTS
    from .inference.hub import DEFAULT_MODEL, PRESETS

    p.add_argument("--model", help=f"preset ({', '.join(PRESETS)}), hub id or local directory (default "
                                   f"{DEFAULT_MODEL}); with --server, the served model's name (default: its only one)")
    p.add_argument("--server", action="append", metavar="URL",
                   help="an OpenAI-compatible server (vllm serve) answers instead of a local model; default: "
                        "$TEXT4SEG_SERVER. eval takes several (repeat the option)")
    p.add_argument("--quant", default="auto", choices=QUANTS,
                   help="auto: 4-bit nf4 on CUDA, full precision on CPU")
    p.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--compile", action="store_true",
                   help="on a CPU, each decode step of a LLaMA-LLaVA as one torch.compile graph, compiled when the "
                        "model loads (seconds; needs a C++ compiler): 1.7x the tokens/s of --quant 8bit")
    p.add_argument("--adapter", help="a PEFT LoRA adapter directory to merge into the model")


def build_parser() -> argparse.ArgumentParser:
    from .descriptors import codec
    from .inference.attention import SCHEMES as ATTENTION_SCHEMES
    from .inference.positions import FORMATS as POSITION_FORMATS
    from .inference.positions import SCHEMES as POSITION_SCHEMES
    from .training.recipe import NAMES as RECIPE_STAGES
    from .training.synth import KINDS, SPLITS
    from .training.tiny import LABEL_TOKENS

    parser = argparse.ArgumentParser(prog="text4seg", description="Text4Seg: segmentation as text generation.")
    commands = parser.add_subparsers(dest="command", required=True)

    desc = commands.add_parser("descriptors", help="encode masks as semantic descriptors, or decode them")
    desc_cmds = desc.add_subparsers(dest="action", required=True)
    tok_help = "count tokens with this tokenizer: a model directory, a .gguf file, or 'llama' (bundled LLaMA vocabulary)"

    enc = desc_cmds.add_parser("encode", help="mask PNG(s) -> descriptor body")
    enc.add_argument("masks", nargs="+", type=Path, help="mask images; a pixel > 0 is the target")
    enc.add_argument("--grid", type=_grid, default=16, help="patches per side (default 16)")
    enc.add_argument("--format", choices=codec.FORMATS, default="rrle")
    enc.add_argument("--label", required=True, help="the target's label, e.g. the referring expression")
    enc.add_argument("--wrap", action="store_true", help="wrap the body in <seg>...</seg>")
    enc.add_argument("--jsonl", action="store_true", help='one JSON line per mask: {"mask", "text"[, "tokens"]}')
    enc.add_argument("--tokenizer", help=tok_help)
    enc.set_defaults(func=cmd_descriptors_encode)

    dec = desc_cmds.add_parser("decode", help="answer or body on stdin -> JSON grid, labels, diagnostics")
    dec.add_argument("--grid", type=_grid, default=16, help="patches per side (default 16)")
    dec.add_argument("--format", choices=codec.FORMATS, default="rrle")
    dec.add_argument("--repair", choices=codec.REPAIRS, default="reference",
                     help="how to repair bad row lengths: like the reference evaluator, or row by row")
    dec.add_argument("--out", type=Path, help="also write the binary mask as a PNG")
    dec.add_argument("--size", type=_size, help="size of --out as WIDTHxHEIGHT (default: the grid)")
    dec.add_argument("--tokenizer", help=tok_help)
    dec.set_defaults(func=cmd_descriptors_decode)

    seg = commands.add_parser("segment", help="segment what an expression refers to in an image")
    seg.add_argument("image", type=Path)
    seg.add_argument("expression", nargs="?", default="", help="the referring expression")
    seg.add_argument("--classes", nargs="+", help="multi-class question instead: the class names")
    _model_options(seg)
    seg.add_argument("--grid", type=_grid, help="override the model's grid size")
    seg.add_argument("--format", choices=codec.FORMATS, help="override the model's descriptor format")
    seg.add_argument("--constrained", action="store_true", help="grammar-constrained decoding: always well formed")
    seg.add_argument("--jump-forward", action="store_true",
                     help="constrained decoding that feeds the text the grammar forces without a step per token "
                          "(the same answer in fewer decode steps; implies --constrained)")
    seg.add_argument("--max-new-tokens", type=int, help="default: the worst case for the grid and labels")
    _refine_options(seg)
    seg.add_argument("--points", type=int, default=10, help="SAM point prompts per side (default 10)")
    seg.add_argument("--seed", type=int, default=0)
    seg.add_argument("--json", type=Path, help="write the result JSON here instead of stdout")
    seg.add_argument("--mask", type=Path, help="write the final binary mask PNG here")
    seg.set_defaults(func=cmd_segment)

    syn = commands.add_parser("synth", help="write a synthetic referring-segmentation set with a manifest")
    syn.add_argument("--out", type=Path, required=True)
    syn.add_argument("--n-images", type=int, default=500)
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--queries-per-image", type=int, default=2)
    syn.add_argument("--split", choices=list(SPLITS), default="domain",
                     help="domain: the stated domain the models train on; shifted: other ranges inside it "
                          "(bold textures, small shapes, crowded scenes), never trained on")
    syn.add_argument("--kinds", type=_some_kinds, default=KINDS,
                     help="make the scenes for these query kinds in turn, comma-separated (default: all); each "
                          "scene's first query is of its kind where it has one, so with --queries-per-image 1 the "
                          "set measures those kinds on more queries than a mixed one")
    syn.set_defaults(func=cmd_synth)

    tt = commands.add_parser("train-tiny", help="train a tiny Text4Seg model from scratch on the synthetic domain")
    tt.add_argument("--out", type=Path, required=True, help="run directory (checkpoint, log.jsonl, model/)")
    tt.add_argument("--stage", choices=("llava", "tower"), default="llava",
                    help="tower: first teach the vision tower shape kinds and colours per patch "
                         "(dense labels); llava: train the whole model to write descriptors (default)")
    tt.add_argument("--format", choices=POSITION_FORMATS, default="rrle")
    _training_options(tt)
    tt.add_argument("--grid", type=_grid, default=16)
    tt.add_argument("--steps", type=int, help="stop after this many optimiser steps (default: 2800 tower; "
                                              "llava: none); steps, unlike minutes, mean the same on any machine")
    tt.add_argument("--minutes", type=float, help="wall-clock cap of this run (default: 60 llava without --steps)")
    tt.add_argument("--batch", type=int, help="default: 16 for the llava stage, 32 for the tower stage")
    tt.add_argument("--lr", type=float, help="default: 2e-3 for the llava stage, 1e-3 for the tower stage")
    tt.add_argument("--seed", type=int, default=0)
    tt.add_argument("--eval-queries", type=int, default=48,
                    help="held-out queries of each evaluation of a llava stage (0: none)")
    tt.add_argument("--positions", choices=POSITION_SCHEMES, default="grid",
                    help="answer position ids: natural, or grid (each descriptor token placed at its image cell)")
    tt.add_argument("--label-tokens", choices=LABEL_TOKENS, default="words",
                    help="expressions in the tokenizer: words shared by every expression, or each one whole token")
    tt.add_argument("--image-attention", choices=ATTENTION_SCHEMES, default="bidirectional",
                    help="bidirectional: the image tokens see the whole image, not only the patches before them")
    tt.add_argument("--contrast", action=argparse.BooleanOptionalAction, default=True,
                    help="pair each query with another of its kind on the same image that has other targets "
                         "(the small square with the large one): only the words tell them apart")
    tt.add_argument("--colour-rivals", action=argparse.BooleanOptionalAction, default=True,
                    help="colour-and-shape and absent scenes hold a kind in two colours, so that the colour "
                         "word decides (the red circle beside a blue one)")
    tt.add_argument("--focus", type=_kinds, default="side,size",
                    help=f"make a share of the scenes (--focus-share) for these query kinds, comma-separated "
                         f"(of {', '.join(KINDS)}; default side,size; 'none' for no focus)")
    tt.add_argument("--focus-share", type=_share, default=0.4, help="share of scenes made for --focus (default 0.4)")
    tt.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                    help="auto: bf16 autocast where the CPU has bf16 instructions, else fp32")
    tt.add_argument("--warm-heads", type=int, default=0, metavar="STEPS",
                    help="first steps that train only the training heads: for --init from a saved model, whose "
                         "heads start afresh (default 0)")
    tt.add_argument("--image-size", type=_image_size, default=224, metavar="PX",
                    help="the vision tower's input side, a multiple of 16: 16 x 16 patches of PX/16 px. Above the "
                         "--init model's, its patch embedding is resized to answer as before (default 224)")
    tt.add_argument("--vision-layers", type=_layers, default=None, metavar="N",
                    help="the vision tower's encoder layers. Above the starting tower's, the extra layers go on top, "
                         "each adding nothing at first, so the model answers as before (default: as many as the "
                         "tower of --tower or --init has, 4 for a fresh one)")
    tt.add_argument("--perception", type=float, default=0.0, metavar="WEIGHT",
                    help="go on teaching the vision tower shape kinds and colours per patch, with the tower stage's "
                         "loss on as many extra scenes as the batch, at this weight (default 0: no such loss)")
    tt.add_argument("--size-skew", type=_skew, default=1.0, metavar="S",
                    help="draw shape sizes over the domain's 5-40%% of the short side as u ** S for uniform u: "
                         "above 1, more small shapes, which the models read worst (default 1: uniform)")
    tt.add_argument("--ema", type=_decay, default=0.0, metavar="DECAY",
                    help="keep a moving average of the weights (each step moves it 1 - DECAY of the way) and "
                         "export it instead of the last step's weights (default 0: none)")
    tt.add_argument("--backgrounds", type=_backgrounds, default=None, metavar="FAMILIES",
                    help="draw training scenes on these background families only, comma-separated, each with all "
                         "of the domain's colours and texture periods (default: every family, "
                         "solid,gradient,noisy,stripes,checks,blotches)")
    tt.add_argument("--anneal", action="store_true",
                    help="tower stage: lower the rate along --steps by a half cosine to a tenth, as a llava stage "
                         "does (default: constant after the warm-up)")
    tt.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    tt.add_argument("--init", type=Path, help="start from another run's checkpoint: a tower stage, or a LLaVA stage (e.g. R-RLE "
                                              "after full-length); with --stage tower, go on training its vision tower")
    tt.add_argument("--tower", type=Path, metavar="RUN",
                    help="take the vision tower from this run instead of --init's: a tower stage that went on "
                         "training it (--stage tower --init ...)")
    tt.add_argument("--freeze-tower", action="store_true",
                    help="keep the vision tower fixed (after --init from a tower stage, so its shape kinds survive)")
    tt.set_defaults(func=cmd_train_tiny)

    rb = commands.add_parser("rebuild-tiny", help="train a bundled tiny model by the shipped recipe, every stage in "
                                                  "order (resumes where a stopped rebuild left off)")
    rb.add_argument("--format", choices=POSITION_FORMATS, default="rrle")
    rb.add_argument("--out", type=Path, required=True, help="folder of the stages' run directories")
    rb.add_argument("--tower", type=Path, help="a finished tower stage to start from (it serves both formats)")
    rb.add_argument("--until", choices=RECIPE_STAGES, help="stop after this stage (default: the last)")
    _training_options(rb)
    rb.set_defaults(func=cmd_rebuild_tiny)

    pr = commands.add_parser("probe", help="where a training run's checkpoint grounds (training heads, teacher-forced) "
                                           "and what its vision tower tells apart (linear probes), as JSON")
    pr.add_argument("run", type=Path, help="a train-tiny run directory")
    pr.set_defaults(func=cmd_probe)

    ca = commands.add_parser("card", help="(re)write a finished run's model card and fixed-query metric")
    ca.add_argument("run", type=Path, help="a train-tiny run directory with model/")
    ca.set_defaults(func=cmd_card)

    ev = commands.add_parser("eval", help="score a model on a manifest (cIoU, gIoU, grid cIoU, malformed rate)")
    ev.add_argument("--data", type=Path, required=True, help="directory with manifest.jsonl")
    _model_options(ev)
    _refine_options(ev)
    ev.add_argument("--constrained", action="store_true")
    ev.add_argument("--limit", type=int, help="only the first N queries")
    ev.add_argument("--oracle", action="store_true",
                    help="no model: the truth taken to the grid is the coarse mask (measures a refiner alone)")
    ev.add_argument("--grid", type=_grid, help="grid the evaluation runs at (default: the model's own; "
                                                "16 for --oracle)")
    ev.add_argument("--json", type=Path, help="write the full report (with per-query rows) here")
    ev.add_argument("--rows", type=Path, help="stream each query's row to this JSONL file as it is done")
    ev.add_argument("--resume", action="store_true", help="keep the rows already in --rows and skip their queries")
    ev.add_argument("--workers", type=int, default=1,
                    help="score queries on N model replicas in N processes (one per GPU in turn; default 1)")
    ev.add_argument("--concurrency", type=int, default=1,
                    help="with --server: keep N requests in flight, spread over the servers (default 1)")
    ev.set_defaults(func=cmd_eval)

    from .datasets.conversations import STYLES
    from .datasets.refer import DATASETS

    data = commands.add_parser("data", help="standard datasets in, Text4Seg training data out")
    data_cmds = data.add_subparsers(dest="action", required=True)
    ref = data_cmds.add_parser("refcoco", help="a RefCOCO-family split as a manifest (one query per sentence)",
                               description="Reads REFER/DATASET/instances.json with refs(unc).p, refs(umd).p "
                                           "(refcocog) or grefs(unc).json (grefcoco), and COCO's train2014 images.")
    ref.add_argument("--refer", type=Path, required=True, help="the folder holding refcoco/, refcoco+/, ...")
    ref.add_argument("--images", type=Path, required=True, help="COCO's train2014 image folder")
    ref.add_argument("--dataset", choices=list(DATASETS), required=True)
    ref.add_argument("--split", required=True, help="train, val, testA, testB (refcocog: train, val, test)")
    ref.add_argument("--out", type=Path, required=True, help="directory for manifest.jsonl and masks/")
    ref.set_defaults(func=cmd_data_refcoco)
    tj = data_cmds.add_parser("train-json", help="Text4Seg training conversations from a manifest")
    tj.add_argument("--manifest", type=Path, required=True, help="directory with manifest.jsonl")
    tj.add_argument("--grid", type=_grid, default=16)
    tj.add_argument("--format", choices=codec.FORMATS, default="rrle")
    tj.add_argument("--style", choices=STYLES, default="llava", help="LLaVA conversations or ms-swift messages")
    tj.add_argument("--seed", type=int, default=0, help="seed of the question and lead-in draws")
    tj.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    tj.set_defaults(func=cmd_data_train_json)

    be = commands.add_parser("bench", help="R-RLE vs full-length, constrained decoding and caches, as ratios")
    be.add_argument("--data", type=Path, required=True, help="directory with manifest.jsonl")
    be.add_argument("--rrle-model", default="tiny-rrle")
    be.add_argument("--full-model", default="tiny-full")
    be.add_argument("--limit", type=int, default=100, help="queries to run (default 100)")
    be.add_argument("--json", type=Path)
    be.add_argument("--browser", action="store_true",
                    help="also time the page's streamed answers in Chromium against the segment API (Playwright)")
    be.set_defaults(func=cmd_bench)

    conv = commands.add_parser("convert-llava", help="convert an original-LLaVA checkpoint to transformers' layout")
    conv.add_argument("src", type=Path)
    conv.add_argument("dst", type=Path)
    conv.set_defaults(func=cmd_convert_llava)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as err:
        print(f"text4seg {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
