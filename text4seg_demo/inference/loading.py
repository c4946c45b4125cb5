"""Finding, converting and loading Text4Seg checkpoints: presets, hub ids and local directories."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

from .devices import choose_device, plan_precision
from .engine import ChatTemplateModel, Text4SegModel
from .hub import DEFAULT_MODEL, PRESETS, ModelUnavailable, cache_dir, resolve
from .settings import SETTINGS_FILE, Settings, grid_from_name


def infer_settings(name: str, directory: Path) -> Settings:
    """The preset's settings, else the directory's ``text4seg.json``, else guessed from the name."""
    if name in PRESETS and PRESETS[name].settings is not None:
        return PRESETS[name].settings
    saved = Settings.read(directory)
    if saved is not None:
        return saved
    grid = grid_from_name(name) or grid_from_name(directory.name)
    return Settings(grid or 16, "full" if "full" in name else "rrle", "llava_v1")


def _quant_kwargs(quant: str, device) -> dict:
    import torch
    from transformers import BitsAndBytesConfig

    if quant in ("4bit", "8bit"):
        # vision towers and projectors stay unquantised (LLaVA and InternVL names, then Qwen2-VL's)
        skip = ["model.vision_tower", "model.multi_modal_projector", "model.visual", "lm_head"]
        if quant == "4bit":
            compute = torch.float16 if device.type == "cuda" else torch.float32
            config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                        bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=skip)
        else:
            config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
        dtype = torch.float16 if device.type == "cuda" else torch.float32
        return {"quantization_config": config, "dtype": dtype, "device_map": {"": str(device)}}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[quant]
    return {"dtype": dtype}


def _model_class(directory: Path, name: str, llava: bool):
    """LLaVA's own class for LLaVA checkpoints, else whatever image-text-to-text class the
    checkpoint's config maps to (Qwen2-VL, Qwen2.5-VL, InternVL, ...)."""
    from transformers import AutoConfig, AutoModelForImageTextToText, LlavaForConditionalGeneration

    if llava:
        return LlavaForConditionalGeneration
    try:
        config = AutoConfig.from_pretrained(directory)
    except (ValueError, KeyError) as err:
        raise ModelUnavailable(f"transformers does not know the architecture of {name}: {err}") from None
    if type(config) not in AutoModelForImageTextToText._model_mapping:
        raise ModelUnavailable(f"{name} is a {config.model_type!r} model, which transformers cannot load as an "
                               "image-text-to-text model; use a LLaVA, Qwen2-VL, Qwen2.5-VL or InternVL checkpoint")
    return AutoModelForImageTextToText


def converted_dir(src: Path) -> Path:
    """Where the transformers copy of an original-LLaVA checkpoint is kept."""
    stamp = hashlib.sha1(f"{src.resolve()}:{(src / 'config.json').stat().st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "converted" / f"{src.name}-{stamp}"


def load(name: str = DEFAULT_MODEL, quant: str = "auto", device: str | None = None, adapter: str | None = None,
         grid: int | None = None, fmt: str | None = None, prompt_style: str | None = None, compile: bool = False,
         log=print) -> Text4SegModel:
    """Load a model by preset name, hub id or directory, ready to answer.

    Original-LLaVA checkpoints are converted once and cached; precision requests that the
    machine cannot serve fall back with a note in ``model.notes``. ``compile``: the CPU's decode
    steps (:mod:`~text4seg_demo.inference.decode_step`) as one ``torch.compile`` graph each.
    """
    from .convert import convert, is_original_llava

    directory = resolve(name)
    settings = infer_settings(name, directory)
    if is_original_llava(directory):
        target = converted_dir(directory)
        if not (target / SETTINGS_FILE).is_file():
            log(f"converting {name} to the transformers LLaVA layout (once) into {target}")
            convert(directory, target, log=log)
        directory = target
    settings = replace(settings, **{k: v for k, v in (("grid", grid), ("fmt", fmt), ("prompt_style", prompt_style))
                                    if v is not None})
    torch_device = choose_device(device)
    served, note = plan_precision(quant, torch_device)
    notes = [f"--quant {quant}{'' if served == quant else f' served as {served}'}: {note}"] if note else []
    llava = json.loads((directory / "config.json").read_text()).get("model_type") == "llava"
    model_class = _model_class(directory, name, llava)
    int8_decode = served == "8bit" and torch_device.type == "cpu"  # fp32 weights, int8 copies for decoding
    kwargs = _quant_kwargs("fp32" if int8_decode else served, torch_device)
    try:
        model = model_class.from_pretrained(directory, **kwargs)
    except (ImportError, RuntimeError, ValueError) as err:
        if served not in ("4bit", "8bit"):
            raise
        notes.append(f"{served} failed ({err}); loaded in fp32 instead")
        served = "fp32"
        model = model_class.from_pretrained(directory, **_quant_kwargs("fp32", torch_device))
    if "device_map" not in kwargs:
        model = model.to(torch_device)
    if adapter:
        from peft import PeftModel

        log(f"merging the adapter {adapter}")
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    decode_step = None
    if torch_device.type == "cpu" and served in ("fp32", "8bit"):
        from .decode_step import DecodeStep
        from .devices import cpp_compiler

        weights = "int8" if served == "8bit" else "fp32"
        reason = DecodeStep.unsupported(model, weights)
        if reason is None:
            compiled = compile and cpp_compiler() is not None
            if compiled:
                log("compiling the decode step (torch.compile, once per load)")
            decode_step = DecodeStep(model, weights, compile=compiled)
        elif served == "8bit":
            notes.append(f"8-bit decoding on the CPU is for LLaMA-LLaVA checkpoints, and {reason}; served in fp32")
            served = "fp32"
    if compile and (decode_step is None or not decode_step.compiled):
        notes.append("--compile is for the decode steps of a LLaMA-LLaVA on a CPU with a C++ compiler "
                     "(for torch.compile); decoding uncompiled")
    if llava:
        from transformers import AutoImageProcessor, AutoTokenizer

        engine = Text4SegModel(model, AutoTokenizer.from_pretrained(directory),
                               AutoImageProcessor.from_pretrained(directory), settings, name=name, quant=served,
                               decode_step=decode_step)
    else:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(directory)
        engine = ChatTemplateModel(model, processor.tokenizer, processor, replace(settings, prompt_style="chat"),
                                   name=name, quant=served)
    engine.notes = notes
    for line in notes:
        log(line)
    return engine
