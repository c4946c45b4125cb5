"""Decode steps of a LLaMA-LLaVA with 8-bit weights on a CPU (``--quant 8bit`` there).

One decode step reads every weight of the language model once to write one token, so on a CPU
its time is set by how many bytes the weights take, not by arithmetic: fp32 weights make the
bundled models memory-bound at a few hundred tokens a second. Here each projection is kept as
int8 with one scale per output channel (a quarter of the bytes) and multiplied by torch's int8
weight-only kernel with bf16 activations; norms, rotary positions, attention and the residual
stream stay in fp32, and the prompt is still prefilled by transformers in full precision. The
query/key/value and gate/up projections are each one product. Answers can differ from fp32 ones
where two tokens are nearly tied (``text4seg bench`` reports how many do).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .devices import native_bf16


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Int8Linear:
    """``x @ W.T`` with W as int8 rows and a bf16 scale per row; x (rows x in) and the result in bf16."""

    def __init__(self, weight: torch.Tensor):
        weight = weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.weight = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(torch.bfloat16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scale)


class Int8DecodeStep:
    """``step(tokens, cache, positions)``: next-token logits after each of ``tokens`` (n x V),
    written into transformers' ``DynamicCache`` like its own forward."""

    def __init__(self, model):
        lm = model.model.language_model
        self.rotary, self.eps = lm.rotary_emb, lm.config.rms_norm_eps
        self.embed, self.norm = lm.embed_tokens.weight, lm.norm.weight
        self.head = Int8Linear(model.lm_head.weight)
        self.layers = []
        for layer in lm.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append({
                "norm_in": layer.input_layernorm.weight, "norm_post": layer.post_attention_layernorm.weight,
                "qkv": Int8Linear(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])),
                "heads": (attn.q_proj.weight.shape[0] // attn.head_dim, attn.k_proj.weight.shape[0] // attn.head_dim),
                "o": Int8Linear(attn.o_proj.weight), "head_dim": attn.head_dim, "scale": attn.scaling,
                "gate_up": Int8Linear(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])),
                "down": Int8Linear(mlp.down_proj.weight), "inner": mlp.gate_proj.weight.shape[0]})

    @staticmethod
    def unsupported(model) -> str | None:
        """Why this model cannot decode this way (None when it can): a LLaVA whose language model
        is a plain fp32 LLaMA on the CPU, the bundled models' and the released checkpoint's shape."""
        lm = getattr(getattr(model, "model", None), "language_model", None)
        config = getattr(lm, "config", None)
        if config is None or config.model_type != "llama" or not hasattr(model, "lm_head"):
            return "it is not a LLaVA with a LLaMA language model"
        if config.hidden_act != "silu" or getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            return "its LLaMA has biases or another activation"
        linears = [m for layer in lm.layers for m in layer.modules() if isinstance(m, nn.Linear)]
        if not all(type(m) is nn.Linear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"
                   for m in [*linears, model.lm_head]):
            return "its weights are not plain fp32 tensors on the CPU"
        if not native_bf16():
            return "this CPU has no bf16 instructions for the int8 kernel"
        return None

    @torch.no_grad()
    def __call__(self, tokens: list[int], cache, positions: list[int] | None = None) -> torch.Tensor:
        n, past = len(tokens), cache.get_seq_length()
        where = positions if positions is not None else range(past, past + n)
        h = F.embedding(torch.tensor(tokens), self.embed)  # the residual stream: tokens x hidden, fp32
        cos, sin = self.rotary(h[None], torch.tensor([list(where)]))
        cos, sin = cos[0, :, None], sin[0, :, None]  # over (token, head, dim)
        # one token sees the whole cache; several see it and the ones before them
        mask = None if n == 1 else torch.ones(n, past + n, dtype=torch.bool).tril(past)
        width, bf16 = (h.shape[-1],), torch.bfloat16
        for i, w in enumerate(self.layers):
            q_heads, kv_heads = w["heads"]
            qkv = w["qkv"](F.rms_norm(h, width, w["norm_in"], self.eps).to(bf16)).float().view(n, -1, w["head_dim"])
            qk = _rotate(qkv[:, :q_heads + kv_heads], cos, sin).transpose(0, 1)[None]  # queries and keys at once
            k, v = cache.update(qk[:, q_heads:], qkv[:, q_heads + kv_heads:].transpose(0, 1)[None], i)
            out = F.scaled_dot_product_attention(qk[:, :q_heads], k, v, attn_mask=mask, scale=w["scale"],
                                                 enable_gqa=True)
            h = h + w["o"](out[0].transpose(0, 1).reshape(n, -1).to(bf16))  # fp32 + bf16 stays fp32
            gate, up = w["gate_up"](F.rms_norm(h, width, w["norm_post"], self.eps).to(bf16)).split(w["inner"], -1)
            h = h + w["down"](F.silu(gate) * up)
        return self.head(F.rms_norm(h, width, self.norm, self.eps).to(bf16)).float()
