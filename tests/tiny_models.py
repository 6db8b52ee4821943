"""Tiny InternVL2.5 checkpoints made on the fly, in both layouts, with the same perturbed weights.

The original layout is written here by hand from the names of InternVL's own modules (InternVisionModel,
mlp1, language_model), independently of the package's rename map, so that loading it proves the map.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from vl_export.export import synthetic_tokenizer
from vl_export.export.random_model import random_model
from vl_export.spec import ModelSpec

TINY_ORIGINAL_CONFIG = {
    "architectures": ["InternVLChatModel"],
    "model_type": "internvl_chat",
    "template": "internvl2_5",
    "downsample_ratio": 0.5,
    "ps_version": "v2",
    "select_layer": -1,
    "force_image_size": 448,
    "dynamic_image_size": True,
    "use_thumbnail": True,
    "min_dynamic_patch": 1,
    "max_dynamic_patch": 12,
    "vision_config": {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": 448,
        "patch_size": 14,
        "num_channels": 3,
        "qkv_bias": True,
        "qk_normalization": False,
        "norm_type": "layer_norm",
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu",
    },
    "llm_config": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 4096,
        "vocab_size": None,  # set from the tokenizer
        "tie_word_embeddings": False,
    },
}


# InternVL2.5-2B/8B/26B's language model, tiny: InternLM2 with 4 query heads per KV head, no bias, dynamic NTK
# rope scaling in the config (as internlm2_5-*-chat ship it), vocabulary from a sentencepiece tokenizer.
TINY_INTERNLM2_LLM = {
    "architectures": ["InternLM2ForCausalLM"],
    "model_type": "internlm2",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "hidden_act": "silu",
    "bias": False,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "rope_scaling": {"type": "dynamic", "factor": 2.0},
    "max_position_embeddings": 4096,
    "vocab_size": None,
    "tie_word_embeddings": False,
}
# InternViT-6B's layer types, tiny: RMSNorm, q/k RMSNorm over all heads, no qkv bias.
TINY_INTERNVIT_6B = {
    **TINY_ORIGINAL_CONFIG["vision_config"],
    "hidden_size": 48,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 3,
    "qkv_bias": False,
    "qk_normalization": True,
    "norm_type": "rms_norm",
}
# Qwen2.5-3B (InternVL2.5-4B) ties lm_head to the embeddings in its own config.
TINY_QWEN_TIED_LLM = {**TINY_ORIGINAL_CONFIG["llm_config"], "tie_word_embeddings": True}


def member_config(vision: dict | None = None, llm: dict | None = None) -> dict:
    config = json.loads(json.dumps(TINY_ORIGINAL_CONFIG))
    if vision is not None:
        config["vision_config"] = json.loads(json.dumps(vision))
    if llm is not None:
        config["llm_config"] = json.loads(json.dumps(llm))
    return config


def internlm2_state_dict(model, num_kv_heads: int) -> dict[str, torch.Tensor]:
    """The language_model.* keys of an InternLM2-based InternVLChatModel, by hand from modeling_internlm2's module
    names: wqkv holds, for each KV head h in turn, the rows of query heads h*groups .. h*groups+groups-1, then k_h, v_h."""
    lm = model.model.language_model
    sd = {"language_model.model.tok_embeddings.weight": lm.embed_tokens.weight,
          "language_model.model.norm.weight": lm.norm.weight,
          "language_model.output.weight": model.lm_head.weight}
    for i, layer in enumerate(lm.layers):
        p = f"language_model.model.layers.{i}."
        a = layer.self_attn
        d = a.head_dim
        groups = a.q_proj.weight.shape[0] // (num_kv_heads * d)
        rows = []
        for h in range(num_kv_heads):
            rows += [a.q_proj.weight[(h * groups + g) * d:(h * groups + g + 1) * d] for g in range(groups)]
            rows += [a.k_proj.weight[h * d:(h + 1) * d], a.v_proj.weight[h * d:(h + 1) * d]]
        sd[p + "attention.wqkv.weight"] = torch.cat(rows)
        sd[p + "attention.wo.weight"] = a.o_proj.weight
        sd[p + "feed_forward.w1.weight"] = layer.mlp.gate_proj.weight
        sd[p + "feed_forward.w3.weight"] = layer.mlp.up_proj.weight
        sd[p + "feed_forward.w2.weight"] = layer.mlp.down_proj.weight
        sd[p + "attention_norm.weight"] = layer.input_layernorm.weight
        sd[p + "ffn_norm.weight"] = layer.post_attention_layernorm.weight
    return sd


def original_state_dict(model) -> dict[str, torch.Tensor]:
    """The InternVLChatModel state dict of a native model, named as InternVL's own modules name them."""
    sd: dict[str, torch.Tensor] = {}
    vt = model.model.vision_tower
    sd["vision_model.embeddings.class_embedding"] = vt.embeddings.cls_token
    sd["vision_model.embeddings.position_embedding"] = vt.embeddings.position_embeddings
    sd["vision_model.embeddings.patch_embedding.weight"] = vt.embeddings.patch_embeddings.projection.weight
    sd["vision_model.embeddings.patch_embedding.bias"] = vt.embeddings.patch_embeddings.projection.bias
    for i, layer in enumerate(vt.encoder.layer):
        p = f"vision_model.encoder.layers.{i}."
        a = layer.attention
        sd[p + "attn.qkv.weight"] = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
        if a.q_proj.bias is not None:  # InternViT-6B has no qkv bias
            sd[p + "attn.qkv.bias"] = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        if not isinstance(a.q_norm, torch.nn.Identity):  # InternViT-6B's qk_normalization
            sd[p + "attn.q_norm.weight"] = a.q_norm.weight
            sd[p + "attn.k_norm.weight"] = a.k_norm.weight
        sd[p + "attn.proj.weight"] = a.projection_layer.weight
        sd[p + "attn.proj.bias"] = a.projection_layer.bias
        sd[p + "ls1"] = layer.lambda_1
        sd[p + "ls2"] = layer.lambda_2
        for ours, theirs in (("norm1", layer.layernorm_before), ("norm2", layer.layernorm_after)):
            sd[p + ours + ".weight"] = theirs.weight
            if getattr(theirs, "bias", None) is not None:  # RMSNorm (InternViT-6B) has none
                sd[p + ours + ".bias"] = theirs.bias
        for fc in ("fc1", "fc2"):
            sd[p + f"mlp.{fc}.weight"] = getattr(layer.mlp, fc).weight
            sd[p + f"mlp.{fc}.bias"] = getattr(layer.mlp, fc).bias
    proj = model.model.multi_modal_projector
    for index, module in (("0", proj.layer_norm), ("1", proj.linear_1), ("3", proj.linear_2)):
        sd[f"mlp1.{index}.weight"] = module.weight
        sd[f"mlp1.{index}.bias"] = module.bias
    if model.config.text_config.model_type == "llama":  # an InternLM2 decoder held in Llama modules
        sd.update(internlm2_state_dict(model, model.config.text_config.num_key_value_heads))
    else:
        for key, value in model.model.language_model.state_dict().items():
            sd["language_model.model." + key] = value
        if not model.config.text_config.tie_word_embeddings:
            sd["language_model.lm_head.weight"] = model.lm_head.weight
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def write_original(model, config: dict, tokenizer_dir: Path, out: Path, state: dict | None = None) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(state if state is not None else original_state_dict(model), out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, out / file.name)
    return out


def write_native(model, tokenizer_dir: Path, out: Path) -> Path:
    """transformers' own save_pretrained, plus tokenizer.json as -hf checkpoints ship it."""
    from transformers import AutoTokenizer

    model.save_pretrained(out)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, out / file.name)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    assert (out / "tokenizer.json").is_file()
    return out


def make_tiny(root: Path, config: dict | None = None, seed: int = 0, native: bool = True) -> dict:
    """Tokenizer, native model, and both checkpoint layouts under root; returns what the tests need."""
    config = json.loads(json.dumps(config or TINY_ORIGINAL_CONFIG))
    if config["llm_config"]["model_type"] == "internlm2":
        specials = synthetic_tokenizer.write_internlm2_files(root / "tokenizer")
    else:
        specials = synthetic_tokenizer.write_slow_files(root / "tokenizer")
    config["llm_config"]["vocab_size"] = max(specials.values()) + 1
    spec = ModelSpec.from_config(config)
    model = random_model(spec, specials["<IMG_CONTEXT>"], seed)
    model.config._attn_implementation = "eager"
    for sub in (model.model.vision_tower, model.model.language_model):
        sub.config._attn_implementation = "eager"
    return {
        "config": config,
        "spec": spec,
        "specials": specials,
        "model": model,
        "original": write_original(model, config, root / "tokenizer", root / "original"),
        "native": write_native(model, root / "tokenizer", root / "native") if native else None,
    }


def add_decoder_variant(checkpoint_dir, bundle, out, make, file: str):
    """`bundle` copied to `out` plus `make(ck, path) -> GraphEntry`'s decoder as its ONNX Runtime variant, hashed (it
    is checked at load), as a quantized build ships it (here in fp32, to compare with the other fp32 graphs)."""
    import dataclasses
    import shutil

    from vl_export.export.bundle import load_checkpoint, with_hashes
    from vl_export.manifest import Manifest

    shutil.copytree(bundle, out)
    entry = make(load_checkpoint(str(checkpoint_dir), lambda _: None), out / file)
    manifest = Manifest.load(out)
    manifest.graphs.append(with_hashes(dataclasses.replace(entry, backends=("onnxruntime",)), out))
    manifest.save(out)
    return out


def add_gqa_decoder(checkpoint_dir, bundle, out, form: str = "gqa", kv_dtype: str = "float32"):
    """The decoder built from the weights (export/graphs_gqa.py) in `form` (GroupQueryAttention, or stacked-group
    attention) with a `kv_dtype` cache as `bundle`'s ONNX Runtime variant."""
    from vl_export.export.graphs_gqa import build_gqa_decoder

    return add_decoder_variant(checkpoint_dir, bundle, out,
                               lambda ck, path: build_gqa_decoder(ck.model, ck.spec, path, form=form, kv_dtype=kv_dtype),
                               f"decoder.ort-{form}.onnx")


def add_inplace_decoder(checkpoint_dir, bundle, out):
    """The torch-exported in-place decoder (export/graphs_inplace.py) as `bundle`'s ONNX Runtime variant."""
    from vl_export.export.graphs_inplace import export_inplace_decoder

    return add_decoder_variant(checkpoint_dir, bundle, out,
                               lambda ck, path: export_inplace_decoder(ck.model, ck.spec, "fp32", path),
                               "decoder.ort-inplace.onnx")
