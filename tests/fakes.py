"""Tiny random checkpoints that tests write to a temp dir: nothing comes from a hub or a cache."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from text4seg_demo.inference.tokens import LLAMA_VOCAB

CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=56,
            patch_size=14, projection_dim=32)
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0)


def noise_image(seed: int = 0, size: tuple[int, int] = (80, 60)):
    """A random RGB picture of ``size`` (width, height): input for random-weight models."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def llama_tokenizer():
    return AutoTokenizer.from_pretrained(str(LLAMA_VOCAB.parent), gguf_file=LLAMA_VOCAB.name)


def write_sentencepiece_tokenizer(path: Path) -> Path:
    """The LLaMA vocabulary in the released checkpoint's tokenizer files: a SentencePiece
    ``tokenizer.model`` (built from the bundled GGUF vocabulary) and a ``LlamaTokenizer`` config."""
    from gguf import GGUFReader
    from sentencepiece import sentencepiece_model_pb2 as spm

    fields = GGUFReader(str(LLAMA_VOCAB)).fields

    def values(name):
        return [fields[name].parts[i] for i in fields[name].data]

    model = spm.ModelProto()
    for piece, score, kind in zip(values("tokenizer.ggml.tokens"), values("tokenizer.ggml.scores"),
                                  values("tokenizer.ggml.token_type")):
        model.pieces.add(piece=bytes(piece).decode(), score=float(score[0]), type=int(kind[0]))
    trainer = model.trainer_spec
    trainer.model_type, trainer.vocab_size = spm.TrainerSpec.BPE, len(model.pieces)
    trainer.byte_fallback, trainer.split_digits = True, True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = 0, 1, 2, -1
    normalizer = model.normalizer_spec
    normalizer.name, normalizer.add_dummy_prefix, normalizer.remove_extra_whitespaces = "identity", True, False
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(model.SerializeToString())
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False, "model_max_length": 2048}))
    return path


def write_tiny_clip(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    CLIPVisionModel(CLIPVisionConfig(**CLIP)).save_pretrained(path)
    return path


def write_original_llava(root: Path, vision_in_checkpoint: bool = True, seed: int = 0, sentencepiece: bool = False,
                         text: dict | None = None):
    """A random LLaVA-1.5-style checkpoint in the original code base's layout.

    Returns ``(directory, reference)`` where ``reference`` is a transformers LLaVA built
    directly from the same weights (its image token appended at the end of the vocabulary).
    The tokenizer is the LLaMA vocabulary, as ``tokenizer.json`` or, with ``sentencepiece``, as a
    ``tokenizer.model`` alone like the released checkpoint's. ``text`` overrides the language
    model's shape (``LLAMA``).
    """
    text = {**LLAMA, **(text or {})}
    tower = write_tiny_clip(root / "tiny-clip", seed)
    ckpt = root / "text4seg-tiny-llava-p24"
    if sentencepiece:
        tokenizer = AutoTokenizer.from_pretrained(write_sentencepiece_tokenizer(ckpt))
    else:
        tokenizer = llama_tokenizer()
    vocab = len(tokenizer)
    torch.manual_seed(seed + 1)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**CLIP),
                         text_config=LlamaConfig(vocab_size=vocab + 1, **text), image_token_index=vocab,
                         image_seq_length=16, vision_feature_layer=-2, vision_feature_select_strategy="default")
    reference = LlavaForConditionalGeneration(config).eval()
    reference.model.vision_tower.load_state_dict(CLIPVisionModel.from_pretrained(tower).state_dict())

    original = {}
    for key, tensor in reference.state_dict().items():
        if key.startswith("model.language_model."):
            key = "model." + key[len("model.language_model."):]
        elif key.startswith("model.multi_modal_projector.linear_1."):
            key = key.replace("model.multi_modal_projector.linear_1.", "model.mm_projector.0.")
        elif key.startswith("model.multi_modal_projector.linear_2."):
            key = key.replace("model.multi_modal_projector.linear_2.", "model.mm_projector.2.")
        elif key.startswith("model.vision_tower."):
            if not vision_in_checkpoint:
                continue
            key = "model.vision_tower.vision_tower.vision_model." + key[len("model.vision_tower."):]
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            tensor = tensor[:vocab]  # the original tokenizer has no image token
        original[key] = tensor.clone().contiguous()

    ckpt.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    names = sorted(original)
    half = len(names) // 2
    save_file({k: original[k] for k in names[:half]}, str(ckpt / "model-00001-of-00002.safetensors"))
    save_file({k: original[k] for k in names[half:]}, str(ckpt / "model-00002-of-00002.safetensors"))
    if not sentencepiece:
        tokenizer.save_pretrained(ckpt)
    (ckpt / "config.json").write_text(json.dumps({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "vocab_size": vocab,
        **text, "hidden_act": "silu", "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "mm_vision_tower": str(tower), "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": CLIP["hidden_size"],
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "image_aspect_ratio": "pad",
    }, indent=2))
    return ckpt, reference


# A Qwen-style chat template: the image placeholder, then the question, then the assistant turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIAL = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>"]


def write_tiny_qwen2_vl(path: Path, seed: int = 0) -> Path:
    """A random Qwen2-VL (multimodal rotary positions, dynamic image resolution) with its processor."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    from text4seg_demo.training import tiny

    tokenizer = tiny.build_tokenizer(tiny.training_corpus())
    tokenizer.add_special_tokens({"additional_special_tokens": QWEN_SPECIAL})
    tokenizer.image_token = "<|image_pad|>"
    ids = dict(zip(QWEN_SPECIAL, tokenizer.convert_tokens_to_ids(QWEN_SPECIAL)))
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), **LLAMA, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_chans=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(config).save_pretrained(path)
    Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112),
                     tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
                     chat_template=CHAT_TEMPLATE).save_pretrained(path)
    return path
