"""The three exported graphs as tiny torch modules whose forward is exactly the graph's signature.

Each wrapper reads the weights of the loaded InternVLForConditionalGeneration and spells its forward out in
plain ops, so that the exported ONNX holds only standard operators (no fused attention, no cache objects) and
so that the precision of every op is decided here: in fp16 graphs the matmuls and the KV cache are fp16, while
LayerNorm, RMSNorm, softmax and the residual stream stay fp32 (FP16 residual sums and norms are where ViTs lose
accuracy).

The decoder's and the vision encoder's graphs are built from the weights op for op (graphs_portable.py) rather than
exported: `Decoder` and `VisionEncoder` here are their statement, and the reference tests hold the built graphs to
(torch.onnx's export of them, output for output). The projector is exported from `Projector`.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from vl_export.spec import ModelSpec


def matmul_weights_to(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of `module` whose Linear and Conv2d weights are `dtype`; norms and embeddings keep fp32."""
    if dtype == torch.float32:
        return module
    module = copy.deepcopy(module)
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Conv2d)):
            sub.to(dtype)
    return module


def _linear(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """Run `layer` in its weights' dtype; the caller decides what dtype the result goes on in."""
    return F.linear(x.to(layer.weight.dtype), layer.weight, layer.bias)


def _layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x.float(), norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x


def _norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """InternViT-300M uses LayerNorm, InternViT-6B RMSNorm; both in fp32."""
    return _layer_norm(x, norm) if isinstance(norm, nn.LayerNorm) else _rms_norm(x, norm)


class VisionEncoder(nn.Module):
    """pixel_values (tiles, 3, 448, 448) fp32 -> vision_features (tiles, 1025, 1024) fp32, CLS first."""

    def __init__(self, model: nn.Module, spec: ModelSpec, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.tower = matmul_weights_to(model.model.vision_tower, dtype)
        self.num_heads = spec.vision.num_heads
        self.head_dim = spec.vision.head_dim
        self.qk_normalization = spec.vision.qk_normalization

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        emb = self.tower.embeddings
        conv = emb.patch_embeddings.projection
        x = F.conv2d(pixel_values.to(conv.weight.dtype), conv.weight, conv.bias, stride=conv.stride)
        x = x.float().flatten(2).transpose(1, 2)  # (tiles, 1024, C)
        cls = emb.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + emb.position_embeddings  # (tiles, 1025, C)
        for layer in self.tower.encoder.layer:
            x = x + layer.lambda_1 * self._attention(_norm(x, layer.layernorm_before), layer.attention).float()
            h = _linear(_norm(x, layer.layernorm_after), layer.mlp.fc1)
            x = x + layer.lambda_2 * _linear(F.gelu(h), layer.mlp.fc2).float()
        return x

    def _attention(self, x: torch.Tensor, attn: nn.Module) -> torch.Tensor:
        tiles, n, c = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (tiles, n, C) -> (tiles, heads, n, d)
            return t.reshape(tiles, n, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = _linear(x, attn.q_proj), _linear(x, attn.k_proj), _linear(x, attn.v_proj)
        if self.qk_normalization:  # InternViT-6B: RMSNorm over all heads of q and of k, in fp32
            q, k = _rms_norm(q, attn.q_norm).to(v.dtype), _rms_norm(k, attn.k_norm).to(v.dtype)
        q, k, v = heads(q), heads(k), heads(v)
        scores = torch.matmul(q, k.transpose(2, 3)) * attn.scale  # (tiles, heads, n, n)
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(tiles, n, c)  # (tiles, n, C)
        return _linear(out, attn.projection_layer)


class Projector(nn.Module):
    """vision_features (tiles, 1025, C) -> image_embeds (tiles, 256, H): drop CLS, pixel unshuffle v2, mlp1."""

    def __init__(self, model: nn.Module, spec: ModelSpec, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.mlp = matmul_weights_to(model.model.multi_modal_projector, dtype)
        self.grid = spec.vision.grid
        self.factor = spec.shuffle_factor

    def forward(self, vision_features: torch.Tensor) -> torch.Tensor:
        tiles, c = vision_features.shape[0], vision_features.shape[2]
        g, r = self.grid, self.factor
        x = vision_features[:, 1:, :].reshape(tiles, g, g, c)  # (tiles, w, h, C)
        # InternVL's pixel_shuffle, ps_version v2: view -> permute -> view -> permute back.
        x = x.reshape(tiles, g, g // r, c * r).permute(0, 2, 1, 3)  # (tiles, h/r, w, C*r)
        x = x.reshape(tiles, g // r, g // r, c * r * r).permute(0, 2, 1, 3)  # (tiles, w/r, h/r, C*r*r)
        x = x.reshape(tiles, (g // r) * (g // r), c * r * r)  # (tiles, 256, 4C)
        x = _layer_norm(x, self.mlp.layer_norm)
        x = F.gelu(_linear(x, self.mlp.linear_1))
        return _linear(x, self.mlp.linear_2).float()


class Decoder(nn.Module):
    """One graph for prefill and decode steps, with the KV cache as explicit inputs and outputs.

    inputs_embeds (b, s, H), attention_mask (b, past+s) int64 1/0, position_ids (b, s) int64,
    logits_positions (b, k) int64 -- which of the s positions get logits: [[s-1]] for generation,
    arange(s) for full logits -- and past_key_values.{i}.key|value (b, kv_heads, past, d)
    -> logits (b, k, vocab) fp32 and present.{i}.key|value (b, kv_heads, past+s, d).
    """

    def __init__(self, model: nn.Module, spec: ModelSpec, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.lm = matmul_weights_to(model.model.language_model, dtype)
        self.lm_head = matmul_weights_to(model.lm_head, dtype)
        self.kv_dtype = dtype
        t = spec.text
        self.num_heads, self.num_kv_heads, self.head_dim = t.num_heads, t.num_kv_heads, t.head_dim
        self.groups = t.num_heads // t.num_kv_heads  # query heads per KV head
        self.register_buffer("inv_freq", model.model.language_model.rotary_emb.inv_freq.float().clone(), persistent=False)

    def forward(self, inputs_embeds, attention_mask, position_ids, logits_positions, *past_key_values):
        b, s, _ = inputs_embeds.shape
        past_len = past_key_values[0].shape[2]
        mask = self._attention_bias(attention_mask, s, past_len).repeat(1, 1, self.groups, 1)  # (b, 1, groups*s, past+s)
        cos, sin = self._rope(position_ids)  # (b, 1, s, d)
        x = inputs_embeds.float()
        presents = []
        for i, layer in enumerate(self.lm.layers):
            attn_out, key, value = self._attention(
                _rms_norm(x, layer.input_layernorm), layer.self_attn, cos, sin, mask,
                past_key_values[2 * i], past_key_values[2 * i + 1],
            )
            presents += [key, value]
            x = x + attn_out.float()
            h = _rms_norm(x, layer.post_attention_layernorm).to(layer.mlp.gate_proj.weight.dtype)
            x = x + _linear(F.silu(_linear(h, layer.mlp.gate_proj)) * _linear(h, layer.mlp.up_proj), layer.mlp.down_proj).float()
        x = _rms_norm(x, self.lm.norm)
        index = logits_positions.unsqueeze(-1).expand(-1, -1, x.shape[-1])  # (b, k, H)
        logits = _linear(torch.gather(x, 1, index), self.lm_head).float()  # (b, k, vocab)
        return (logits, *presents)

    def _attention_bias(self, attention_mask: torch.Tensor, s: int, past_len) -> torch.Tensor:
        total = attention_mask.shape[1]
        query_at = torch.arange(s, device=attention_mask.device) + past_len  # (s,)
        key_at = torch.arange(total, device=attention_mask.device)  # (past+s,)
        causal = key_at.unsqueeze(0) <= query_at.unsqueeze(1)  # (s, past+s)
        allowed = causal.unsqueeze(0) & attention_mask.unsqueeze(1).bool()  # (b, s, past+s)
        # The most negative float, as transformers uses: a fully masked (padding) row softmaxes to uniform, not NaN.
        blocked = torch.tensor(torch.finfo(torch.float32).min, dtype=torch.float32)
        return torch.where(allowed, torch.tensor(0.0), blocked).unsqueeze(1)

    def _rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.unsqueeze(-1).float() * self.inv_freq  # (b, s, d/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (b, s, d)
        return emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)

    def _attention(self, x, attn, cos, sin, mask, past_key, past_value):
        b, s, _ = x.shape

        def heads(t: torch.Tensor, n: int) -> torch.Tensor:  # (b, s, n*d) -> (b, n, s, d)
            return t.reshape(b, s, n, self.head_dim).transpose(1, 2)

        q = _rotate(heads(_linear(x, attn.q_proj), self.num_heads).float(), cos, sin)
        k = _rotate(heads(_linear(x, attn.k_proj), self.num_kv_heads).float(), cos, sin)
        v = heads(_linear(x, attn.v_proj), self.num_kv_heads)
        key = torch.cat([past_key, k.to(self.kv_dtype)], dim=2)  # (b, kv_heads, past+s, d)
        value = torch.cat([past_value, v.to(self.kv_dtype)], dim=2)
        # Grouped-query attention without repeating the cache: the query heads that share a KV head are
        # stacked along the sequence axis, (b, kv_heads, groups*s, d), and meet that head's keys in one matmul.
        # Repeating K and V to all heads instead materialises groups x the cache at every step (7x for Qwen2.5-
        # 0.5B), which dominated decode time at long contexts (OpenVINO: 9 tok/s at 1,900 tokens of context).
        # The mask is tiled to the stacked rows instead (once per forward, not per layer), which keeps the plain
        # matmul-scale-add-softmax-matmul pattern that OpenVINO fuses into one attention kernel at prefill.
        q = q.reshape(b, self.num_kv_heads, self.groups * s, self.head_dim).to(key.dtype)
        scores = torch.matmul(q, key.transpose(2, 3)) * attn.scaling  # (b, kv_heads, groups*s, past+s)
        probs = torch.softmax(scores.float() + mask, dim=-1).to(value.dtype)
        out = torch.matmul(probs, value).reshape(b, self.num_heads, s, self.head_dim)  # (b, heads, s, d)
        out = out.transpose(1, 2).reshape(b, s, -1)  # (b, s, heads*d)
        return _linear(out, attn.o_proj), key, value


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
