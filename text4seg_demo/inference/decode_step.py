"""Decode steps of a LLaMA-LLaVA on a CPU, without transformers' per-layer machinery.

A decode step of a small model on a CPU is paid mostly in per-operation overhead, not in
arithmetic: transformers' LLaMA layer runs some forty tensor operations and module calls for one
token. :class:`DecodeStep` does the same sums in fewer: the query/key/value and gate/up
projections are each one product, the rotary cosines and sines come from a table made once, and
everything else is the arithmetic of transformers' layer in the same order. Two kinds of weights:

* ``fp32``: the model's own weights, so the logits are transformers' own (the default on a CPU);
* ``int8`` (``--quant 8bit`` on a CPU): each projection as int8 with one scale per output
  channel, a quarter of the bytes, multiplied by torch's int8 weight-only kernel with bf16
  activations; norms, rotary positions, attention and the residual stream stay in fp32. Answers
  can differ from fp32 ones where two tokens are nearly tied (``text4seg bench`` reports how many).

The prompt is still prefilled by transformers, in full precision, into its ``DynamicCache``;
decoding then writes keys and values in place into preallocated buffers (:class:`KVBuffers`).
``compile=True`` (``--compile``) makes each single-token step one ``torch.compile`` graph, which
on a CPU fuses the small operations between the products into generated C++ (it needs a C++
compiler, and compiles for some seconds when the model is loaded).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .devices import decode_threads, intra_op_threads, native_bf16

STATIC_ROPE = ("default", "linear", "llama3")  # rotary angles that do not depend on the length


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Int8Linear:
    """``x @ W.T`` with W as int8 rows and a bf16 scale per row; x (rows x in) and the result in bf16."""

    dtype = torch.bfloat16

    def __init__(self, weight: torch.Tensor):
        weight = weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.weight = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
        self.scale = scale.to(torch.bfloat16)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scale)


class Fp32Linear:
    """``x @ W.T`` in fp32: each output is the dot product transformers' own layer computes."""

    dtype = torch.float32

    def __init__(self, weight: torch.Tensor):
        self.weight = weight.detach().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


LINEARS = {"fp32": Fp32Linear, "int8": Int8Linear}


class KVBuffers:
    """Keys and values of the decode steps: a buffer per layer, written in place and doubled when
    full, where transformers' ``DynamicCache`` makes a new tensor at every step."""

    def __init__(self, cache, spare: int = 256):
        """From the prompt's ``DynamicCache``, with room for ``spare`` more tokens before growing."""
        self.length = cache.get_seq_length()
        self.keys = [self._room(layer.keys, self.length + spare) for layer in cache.layers]
        self.values = [self._room(layer.values, self.length + spare) for layer in cache.layers]

    def _room(self, tensor: torch.Tensor, capacity: int) -> torch.Tensor:
        buffer = tensor.new_zeros(*tensor.shape[:2], capacity, tensor.shape[3])
        buffer[:, :, :self.length] = tensor[:, :, :self.length]
        return buffer

    def get_seq_length(self) -> int:
        return self.length

    def reserve(self, count: int) -> None:
        """Make room for ``count`` more tokens."""
        capacity = self.keys[0].shape[2]
        if self.length + count > capacity:
            grown = max(2 * capacity, self.length + count)
            self.keys = [self._room(k, grown) for k in self.keys]
            self.values = [self._room(v, grown) for v in self.values]

    def crop(self, length: int) -> None:
        """Keep the first ``length`` tokens; a negative ``length`` removes that many (as ``DynamicCache``)."""
        self.length = self.length + length if length < 0 else min(length, self.length)


class DecodeStep:
    """``step(tokens, cache, positions)``: next-token logits after each of ``tokens`` (n x V), their
    keys and values written into ``cache`` (:class:`KVBuffers` of the prompt's cache)."""

    def __init__(self, model, weights: str = "fp32", compile: bool = False):
        linear = LINEARS[weights]
        self.weights, self.dtype = weights, linear.dtype
        lm = model.model.language_model
        self.eps = lm.config.rms_norm_eps
        self.embed, self.norm = lm.embed_tokens.weight.detach(), lm.norm.weight.detach()
        self.head = linear(model.lm_head.weight)
        self.layers = []
        for layer in lm.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append({
                "norm_in": layer.input_layernorm.weight.detach(),
                "norm_post": layer.post_attention_layernorm.weight.detach(),
                "qkv": self._fused(attn.q_proj, attn.k_proj, attn.v_proj),
                "heads": (attn.q_proj.weight.shape[0] // attn.head_dim, attn.k_proj.weight.shape[0] // attn.head_dim),
                "o": linear(attn.o_proj.weight), "head_dim": attn.head_dim, "scale": attn.scaling,
                "gate_up": self._fused(mlp.gate_proj, mlp.up_proj),
                "down": linear(mlp.down_proj.weight), "inner": mlp.gate_proj.weight.shape[0]})
        self.rotary = lm.rotary_emb
        self._angles(lm.config.max_position_embeddings)
        self._one_token, self.compiled = self._layers, compile
        if compile:
            self._compile(decode_threads(model))

    def _compile(self, threads: int | None) -> None:
        """One token's step as one graph, compiled now on a dummy cache. The cache's lengths are
        symbolic, so every answer reuses it; what the graph is guarded on is kept as the answers
        will have it: the engine's decode threads, and inputs that are neither views nor grad."""
        self._one_token = torch.compile(self._layers, dynamic=True)
        kv_heads, head_dim = self.layers[0]["heads"][1], self.layers[0]["head_dim"]
        keys, values = ([torch.zeros(1, kv_heads, 16, head_dim) for _ in self.layers] for _ in range(2))
        with torch.no_grad(), intra_op_threads(threads):
            self._one_token(*(t[:1].clone() for t in (self.embed, self.cos, self.sin)), keys, values, 8, 9)

    def _fused(self, *projections: nn.Linear):
        """One product for projections of the same input. In fp32 the model's own projections
        become views of the fused matrix, so that no weight is stored twice (the 7B on a CPU)."""
        weight = torch.cat([p.weight.detach() for p in projections])
        if self.weights == "fp32":
            for p, part in zip(projections, weight.split([p.weight.shape[0] for p in projections])):
                p.weight.data = part
        return LINEARS[self.weights](weight)

    def _angles(self, count: int) -> None:
        """cos and sin of positions 0..count-1 (position x dim), by the model's rotary module."""
        cos, sin = self.rotary(self.embed[None, :1], torch.arange(count)[None])
        self.cos, self.sin = cos[0], sin[0]

    @staticmethod
    def unsupported(model, weights: str = "fp32") -> str | None:
        """Why this model cannot decode this way (None when it can): a LLaVA whose language model
        is a plain fp32 LLaMA on the CPU, the bundled models' and the released checkpoint's shape."""
        lm = getattr(getattr(model, "model", None), "language_model", None)
        config = getattr(lm, "config", None)
        if config is None or config.model_type != "llama" or not hasattr(model, "lm_head"):
            return "it is not a LLaVA with a LLaMA language model"
        biased = getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)
        if config.hidden_act != "silu" or biased:
            return "its LLaMA has biases or another activation"
        if getattr(lm.rotary_emb, "rope_type", "default") not in STATIC_ROPE:
            return "its rotary angles change with the length"
        linears = [m for layer in lm.layers for m in layer.modules() if isinstance(m, nn.Linear)]
        if not all(type(m) is nn.Linear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"
                   for m in [*linears, model.lm_head]):
            return "its weights are not plain fp32 tensors on the CPU"
        if weights == "int8" and not native_bf16():
            return "this CPU has no bf16 instructions for the int8 kernel"
        return None

    @torch.no_grad()
    def __call__(self, tokens: list[int], cache: KVBuffers, positions: list[int] | None = None) -> torch.Tensor:
        n, past = len(tokens), cache.length
        where = list(positions) if positions is not None else list(range(past, past + n))
        if (last := max(where)) >= len(self.cos):
            self._angles(2 * last)
        where = torch.tensor(where)
        h = F.embedding(torch.tensor(tokens), self.embed)  # the residual stream: tokens x hidden, fp32
        cache.reserve(n)
        if n == 1:  # one token sees the whole cache
            logits = self._one_token(h, self.cos[where], self.sin[where], cache.keys, cache.values, past, past + 1)
        else:  # several see it and the ones before them
            mask = torch.ones(n, past + n, dtype=torch.bool).tril(past)
            logits = self._layers(h, self.cos[where], self.sin[where], cache.keys, cache.values, past, past + n, mask)
        cache.length = past + n
        return logits

    def _layers(self, h, cos, sin, keys, values, start: int, end: int, mask=None) -> torch.Tensor:
        """The layers over the new tokens ``h`` (at cache slots start..end-1) and the head: their logits."""
        n, width, dtype = h.shape[0], (h.shape[-1],), self.dtype
        cos, sin = cos[:, None], sin[:, None]  # over (token, head, dim)
        for i, w in enumerate(self.layers):
            q_heads, kv_heads = w["heads"]
            qkv = w["qkv"](F.rms_norm(h, width, w["norm_in"], self.eps).to(dtype)).float().view(n, -1, w["head_dim"])
            qk = _rotate(qkv[:, :q_heads + kv_heads], cos, sin).transpose(0, 1)[None]  # queries and keys at once
            keys[i][:, :, start:end] = qk[:, q_heads:]
            values[i][:, :, start:end] = qkv[:, q_heads + kv_heads:].transpose(0, 1)[None]
            out = F.scaled_dot_product_attention(qk[:, :q_heads], keys[i][:, :, :end], values[i][:, :, :end],
                                                 attn_mask=mask, scale=w["scale"], enable_gqa=True)
            h = h + w["o"](out[0].transpose(0, 1).reshape(n, -1).to(dtype))  # fp32 + bf16 stays fp32
            gate, up = w["gate_up"](F.rms_norm(h, width, w["norm_post"], self.eps).to(dtype)).split(w["inner"], -1)
            h = h + w["down"](F.silu(gate) * up)
        return self.head(F.rms_norm(h, width, self.norm, self.eps).to(dtype)).float()
