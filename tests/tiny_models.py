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
        sd[p + "attn.qkv.bias"] = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
        sd[p + "attn.proj.weight"] = a.projection_layer.weight
        sd[p + "attn.proj.bias"] = a.projection_layer.bias
        sd[p + "ls1"] = layer.lambda_1
        sd[p + "ls2"] = layer.lambda_2
        for ours, theirs in (("norm1", layer.layernorm_before), ("norm2", layer.layernorm_after)):
            sd[p + ours + ".weight"] = theirs.weight
            sd[p + ours + ".bias"] = theirs.bias
        for fc in ("fc1", "fc2"):
            sd[p + f"mlp.{fc}.weight"] = getattr(layer.mlp, fc).weight
            sd[p + f"mlp.{fc}.bias"] = getattr(layer.mlp, fc).bias
    proj = model.model.multi_modal_projector
    for index, module in (("0", proj.layer_norm), ("1", proj.linear_1), ("3", proj.linear_2)):
        sd[f"mlp1.{index}.weight"] = module.weight
        sd[f"mlp1.{index}.bias"] = module.bias
    for key, value in model.model.language_model.state_dict().items():
        sd["language_model.model." + key] = value
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


def make_tiny(root: Path, config: dict | None = None, seed: int = 0) -> dict:
    """Tokenizer, native model, and both checkpoint layouts under root; returns what the tests need."""
    config = json.loads(json.dumps(config or TINY_ORIGINAL_CONFIG))
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
        "native": write_native(model, root / "tokenizer", root / "native"),
    }
