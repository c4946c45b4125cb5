"""Original-LLaVA checkpoints (``model_type: llava_llama``) -> transformers' LLaVA.

The released Text4Seg checkpoint is in the LLaVA code base's layout: a Llama with the
projector under ``model.mm_projector`` and (usually) the CLIP tower under
``model.vision_tower.vision_tower``, a tokenizer without an image token, and the vision
tower's identity in ``mm_vision_tower``. This module rewrites it as a
``LlavaForConditionalGeneration`` directory that ``from_pretrained`` loads directly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..descriptors import prompts
from .settings import Settings, grid_from_name

VISION_PREFIX = "model.vision_tower.vision_tower."
KEY_RULES = (  # (source pattern, target) applied in order, first match wins
    (r"^model\.mm_projector\.0\.", "model.multi_modal_projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "model.multi_modal_projector.linear_2."),
    (r"^model\.vision_tower\.vision_tower\.(vision_model\.)?", "model.vision_tower."),
    (r"^model\.", "model.language_model."),
    (r"^lm_head\.", "lm_head."),
)


class ConversionError(RuntimeError):
    """The checkpoint cannot be turned into a transformers LLaVA; the message says why."""


def is_original_llava(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    data = json.loads(config.read_text())
    return data.get("model_type") == "llava_llama" or "LlavaLlamaForCausalLM" in data.get("architectures", [])


def rename_key(key: str) -> str | None:
    for pattern, target in KEY_RULES:
        if re.match(pattern, key):
            return re.sub(pattern, target, key, count=1)
    return None


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory: safetensors shards, or PyTorch ``.bin`` files."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    if files:
        from safetensors.torch import load_file

        for f in files:
            state.update(load_file(str(f)))
        return state
    for f in sorted(path.glob("*.bin")):
        if "training_args" in f.name:
            continue
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    if not state:
        raise ConversionError(f"no weights (*.safetensors or *.bin) in {path}")
    return state


def _vision_source(config: dict, root: Path, download: bool) -> Path | None:
    """A local directory for ``mm_vision_tower``: a path, or a hub id found in the cache
    (or fetched, when ``download``)."""
    tower = config.get("mm_vision_tower") or config.get("vision_tower")
    if not tower:
        return None
    for candidate in (Path(tower), root / tower):
        if candidate.is_dir():
            return candidate
    from .hub import ModelUnavailable, resolve

    try:
        return resolve(tower, download=download)
    except ModelUnavailable:
        if download:
            raise
        return None


def _vision_config_from_weights(state: dict[str, torch.Tensor]):
    """Rebuild a CLIPVisionConfig from tensor shapes (for a checkpoint that carries its tower)."""
    from transformers import CLIPVisionConfig

    patch = state["model.vision_tower.embeddings.patch_embedding.weight"]
    positions = state["model.vision_tower.embeddings.position_embedding.weight"].shape[0]
    layers = 1 + max(int(m.group(1)) for k in state if (m := re.search(r"vision_tower\.encoder\.layers\.(\d+)\.", k)))
    hidden = patch.shape[0]
    side = int(round((positions - 1) ** 0.5))
    return CLIPVisionConfig(hidden_size=hidden, patch_size=patch.shape[-1], image_size=side * patch.shape[-1],
                            num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                            intermediate_size=state["model.vision_tower.encoder.layers.0.mlp.fc1.weight"].shape[0])


def convert(src: str | Path, dst: str | Path, log=print) -> Path:
    """Convert the original-LLaVA checkpoint ``src`` into a transformers directory ``dst``."""
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessor,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    projector = config.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise ConversionError(f"projector {projector!r} is not supported (transformers' LLaVA has a 2-layer GELU MLP)")
    layer = config.get("mm_vision_select_layer", -2)
    if config.get("mm_vision_select_feature", "patch") != "patch":
        raise ConversionError("only mm_vision_select_feature='patch' (CLS token dropped) is supported")

    log(f"reading weights from {src}")
    raw = load_state_dict(src)
    state = {}
    for key, tensor in raw.items():
        if key.startswith("model.vision_tower.") and not key.startswith(VISION_PREFIX):
            continue
        new = rename_key(key)
        if new is not None:
            state[new] = tensor
    has_tower = any(k.startswith("model.vision_tower.") for k in state)
    if has_tower:  # the checkpoint's own tower; its config from a local copy, else from the shapes
        tower_dir = _vision_source(config, src, download=False)
        vision_config = _load_vision_config(tower_dir) if tower_dir else _vision_config_from_weights(state)
    else:
        tower_dir = _vision_source(config, src, download=True)
        if tower_dir is None:
            raise ConversionError("the checkpoint has no vision tower weights and no mm_vision_tower to take them from")
        vision_config = _load_vision_config(tower_dir)
        state.update(_tower_weights(tower_dir))
        log(f"vision tower weights from {tower_dir}")

    tokenizer = AutoTokenizer.from_pretrained(src)
    if prompts.IMAGE not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [prompts.IMAGE]})
    image_id = tokenizer.convert_tokens_to_ids(prompts.IMAGE)
    text_fields = {k: config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                                          "num_key_value_heads", "rms_norm_eps", "rope_theta", "max_position_embeddings",
                                          "hidden_act", "vocab_size", "bos_token_id", "eos_token_id",
                                          "pad_token_id", "tie_word_embeddings", "rope_scaling") if k in config}
    text_config = LlamaConfig(**text_fields)
    n_patches = (vision_config.image_size // vision_config.patch_size) ** 2
    llava_config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=image_id,
                               image_seq_length=n_patches, vision_feature_layer=layer,
                               vision_feature_select_strategy="default", projector_hidden_act="gelu",
                               tie_word_embeddings=text_config.tie_word_embeddings)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(llava_config)
    expected = set(model.state_dict())
    if text_config.tie_word_embeddings:
        expected.discard("lm_head.weight")
        state.pop("lm_head.weight", None)
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ConversionError(f"weights do not match the LLaVA layout: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, assign=True, strict=False)
    if len(tokenizer) > text_config.vocab_size:
        _grow_vocab(model, len(tokenizer))
    model.config.text_config.vocab_size = model.get_input_embeddings().weight.shape[0]
    model.tie_weights()

    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst, safe_serialization=True)
    _name_vision_keys_in_full(dst)
    size = vision_config.image_size
    images = CLIPImageProcessor(size={"height": size, "width": size}, do_center_crop=False,
                                crop_size={"height": size, "width": size}, resample=2)
    # the processor and chat template let a server (``vllm serve``) build the checkpoint's own prompt
    LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=vision_config.patch_size,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   image_token=prompts.IMAGE, chat_template=prompts.LLAVA_V1_CHAT_TEMPLATE).save_pretrained(dst)
    Settings(grid_from_name(src.name) or 16, "rrle", "llava_v1").write(dst, converted_from=str(src))
    log(f"converted model written to {dst}")
    return dst


def _name_vision_keys_in_full(dst: Path) -> None:
    """Write the tower's weights as ``vision_tower.vision_model.*``, the llava-hf names that vLLM
    and transformers both load (transformers 5 saves them as ``vision_tower.*``)."""
    from safetensors.torch import load_file, save_file

    def renamed(key: str) -> str:
        return re.sub(r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model.", key)

    for shard in sorted(dst.glob("*.safetensors")):
        state = load_file(str(shard))
        save_file({renamed(k): v for k, v in state.items()}, str(shard), metadata={"format": "pt"})
    index = dst / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {renamed(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))


def _load_vision_config(tower_dir: Path):
    from transformers import AutoConfig, CLIPVisionConfig

    config = AutoConfig.from_pretrained(tower_dir)
    return config.vision_config if hasattr(config, "vision_config") else CLIPVisionConfig.from_dict(config.to_dict())


def _tower_weights(tower_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in load_state_dict(tower_dir).items():
        key = re.sub(r"^(model\.vision_tower\.|vision_tower\.)?(vision_model\.)?", "", key, count=1)
        if re.match(r"^(embeddings|encoder|pre_layrnorm|post_layernorm)\.", key):
            out["model.vision_tower." + key] = tensor
    if not out:
        raise ConversionError(f"no CLIP vision weights (vision_model.*) in {tower_dir}")
    return out


def _grow_vocab(model, new_size: int) -> None:
    """Add rows for new tokens (the image token), initialised to the mean embedding like
    transformers' own LLaVA conversion; the image row is never generated (it is masked)."""
    old = model.get_input_embeddings().weight.data
    mean = old.float().mean(0, keepdim=True).to(old.dtype)
    model.resize_token_embeddings(new_size, mean_resizing=False)
    model.get_input_embeddings().weight.data[old.shape[0]:] = mean
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr():
        output.weight.data[old.shape[0]:] = output.weight.data[: old.shape[0]].float().mean(0).to(old.dtype)
