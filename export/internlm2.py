"""InternLM2 language models (InternVL2.5-2B/8B/26B) in their original layout, renamed onto transformers' Llama.

InternLM2 is the Llama computation under other names: RMSNorm before attention and MLP, rotate-half RoPE
(inv_freq = 1 / theta^(2i/d), cos/sin of cat(freqs, freqs)), grouped-query attention scaled by 1/sqrt(d),
SwiGLU w2(silu(w1 x) * w3 x), no biases anywhere (config `bias: false`), a final RMSNorm and an untied `output`
head. So its weights load into `LlamaForCausalLM`-shaped modules (inside InternVLForConditionalGeneration) and
the Decoder graph wrapper runs them unchanged, with no q/k/v bias. The one structural difference is `wqkv`: its
rows are grouped per KV head, [q x groups, k, v] for each KV head (modeling_internlm2.py:
`rearrange(qkv, 'b q (h gs d) -> b q h gs d', gs=2 + groups)`), so query head h*groups+g reads KV head h,
the same pairing as Llama's repeat_kv.
"""

from __future__ import annotations

import re

import torch

from vl_export.errors import CheckpointError
from vl_export.spec import TextSpec

# (InternLM2 name under language_model., the Qwen2/Llama name under language_model. that the main table reads)
RENAMES: list[tuple[str, str]] = [
    ("model.tok_embeddings.weight", "model.embed_tokens.weight"),
    ("model.norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("model.layers.{n}.attention.wo.weight", "model.layers.{n}.self_attn.o_proj.weight"),
    ("model.layers.{n}.feed_forward.w1.weight", "model.layers.{n}.mlp.gate_proj.weight"),
    ("model.layers.{n}.feed_forward.w3.weight", "model.layers.{n}.mlp.up_proj.weight"),
    ("model.layers.{n}.feed_forward.w2.weight", "model.layers.{n}.mlp.down_proj.weight"),
    ("model.layers.{n}.attention_norm.weight", "model.layers.{n}.input_layernorm.weight"),
    ("model.layers.{n}.ffn_norm.weight", "model.layers.{n}.post_attention_layernorm.weight"),
]
FUSED_QKV = "model.layers.{n}.attention.wqkv.weight"
SPLIT_QKV = "model.layers.{n}.self_attn.{qkv}_proj.weight"
PREFIX = "language_model."


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{n}"), r"(?P<n>\d+)"))


def _rename(name: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, target in rules:
        if m := pattern.fullmatch(name):
            return target.format(**m.groupdict())
    return None


_TO_LLAMA = [(_pattern(src), dst) for src, dst in RENAMES]
_TO_INTERNLM2 = [(_pattern(dst), src) for src, dst in RENAMES]


def split_wqkv(wqkv: torch.Tensor, text: TextSpec, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """wqkv (kv_heads*(groups+2)*d, hidden) -> q (heads*d, hidden), k and v (kv_heads*d, hidden)."""
    groups, d = text.num_heads // text.num_kv_heads, text.head_dim
    rows = text.num_kv_heads * (groups + 2) * d
    if tuple(wqkv.shape) != (rows, text.hidden_size):
        raise CheckpointError(f"weight {key} has shape {tuple(wqkv.shape)}, the config implies {(rows, text.hidden_size)}")
    per_head = wqkv.reshape(text.num_kv_heads, groups + 2, d, text.hidden_size)  # (kv_heads, [q.., k, v], d, hidden)
    q = per_head[:, :groups].reshape(text.num_heads * d, text.hidden_size)  # query head h*groups+g
    k = per_head[:, groups].reshape(text.num_kv_heads * d, text.hidden_size)
    v = per_head[:, groups + 1].reshape(text.num_kv_heads * d, text.hidden_size)
    return q, k, v


def fuse_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text: TextSpec) -> torch.Tensor:
    """The inverse of `split_wqkv`."""
    groups, d = text.num_heads // text.num_kv_heads, text.head_dim
    q = q.reshape(text.num_kv_heads, groups, d, -1)  # (kv_heads, groups, d, hidden)
    k = k.reshape(text.num_kv_heads, 1, d, -1)
    v = v.reshape(text.num_kv_heads, 1, d, -1)
    return torch.cat([q, k, v], dim=1).reshape(-1, q.shape[-1])  # (kv_heads*(groups+2)*d, hidden)


def to_qwen2_names(state: dict[str, torch.Tensor], text: TextSpec) -> dict[str, torch.Tensor]:
    """Rename the `language_model.*` keys of an InternLM2-based InternVLChatModel to the Qwen2-based names the
    main table maps (q/k/v split out of wqkv); other keys pass through. An unmapped language-model key is an error."""
    fused = _pattern(FUSED_QKV)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if not key.startswith(PREFIX):
            out[key] = tensor
            continue
        name = key.removeprefix(PREFIX)
        if m := fused.fullmatch(name):
            for qkv, part in zip("qkv", split_wqkv(tensor, text, key)):
                out[PREFIX + SPLIT_QKV.format(n=m["n"], qkv=qkv)] = part
            continue
        if (target := _rename(name, _TO_LLAMA)) is None:
            raise CheckpointError(f"unexpected weight {key} in the InternLM2 checkpoint: no rule maps it to the model")
        out[PREFIX + target] = tensor
    return out


def to_internlm2_names(state: dict[str, torch.Tensor], text: TextSpec) -> dict[str, torch.Tensor]:
    """The inverse of `to_qwen2_names`, for writing InternLM2-based checkpoints in the original layout."""
    split = re.compile(r"model\.layers\.(?P<n>\d+)\.self_attn\.(?P<qkv>[qkv])_proj\.weight")
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if not key.startswith(PREFIX):
            out[key] = tensor
            continue
        name = key.removeprefix(PREFIX)
        if m := split.fullmatch(name):
            parts.setdefault(m["n"], {})[m["qkv"]] = tensor
            continue
        if (target := _rename(name, _TO_INTERNLM2)) is None:
            raise CheckpointError(f"no InternLM2 name for weight {key}")
        out[PREFIX + target] = tensor
    for n, qkv in parts.items():
        out[PREFIX + FUSED_QKV.format(n=n)] = fuse_wqkv(qkv["q"], qkv["k"], qkv["v"], text)
    return out

