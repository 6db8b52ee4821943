"""Checkpoints with random weights in the original layout: `random:internvl2_5-1b` (same size as the real
model, for benchmarks) and `random:tiny` (seconds to export, for smoke tests)."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from vl_export.errors import CheckpointError
from vl_export.spec import ModelSpec

from . import synthetic_tokenizer
from . import internlm2
from .checkpoint import native_config, native_to_original

PRESET_DIR = Path(__file__).parent / "presets"


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def preset_config(name: str) -> dict:
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise CheckpointError(f"unknown random model 'random:{name}' (presets: {', '.join(presets())})")
    return json.loads(path.read_text())


def cache_root() -> Path:
    return Path(os.environ.get("VL_EXPORT_CACHE", Path.home() / ".cache" / "vl-export"))


def perturb_(model: nn.Module, seed: int) -> nn.Module:
    """Give every parameter distinct random values at a sane scale, so that any wrong mapping shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name and leaf == "weight":
                param.copy_(1.0 + 0.1 * noise)
            elif "embed_tokens" in name:  # unit-scale token embeddings, so text weighs as much as image features
                param.copy_(noise)
            elif leaf.startswith("lambda_"):
                param.copy_(0.1 + 0.02 * noise)
            elif leaf == "bias" or param.dim() < 2 or "embedding" in name or "cls_token" in name:
                param.copy_(0.05 * noise)
            else:  # a matrix or a conv kernel: unit-variance outputs
                param.copy_(noise / math.sqrt(param[0].numel()))
    return model


def random_model(spec: ModelSpec, image_token_id: int, seed: int = 0) -> nn.Module:
    from transformers import InternVLForConditionalGeneration

    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(native_config(spec, image_token_id))
    return perturb_(model, seed).eval()


def write_original_checkpoint(model: nn.Module, config: dict, out_dir: Path, dtype=torch.bfloat16) -> None:
    """config.json + model.safetensors in the original InternVLChatModel layout."""
    from safetensors.torch import save_file

    state = native_to_original(model.state_dict())
    if config["llm_config"].get("tie_word_embeddings"):
        state.pop("language_model.lm_head.weight", None)
    text = ModelSpec.from_config(config).text
    if text.family == "internlm2":
        state = internlm2.to_internlm2_names(state, text)
    state = {k: v.detach().to(dtype).contiguous() for k, v in state.items()}
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def create(name: str, out_dir: Path, seed: int = 0) -> Path:
    """Write preset `name` with random weights and a synthetic tokenizer to out_dir."""
    config = preset_config(name)
    config.pop("_note", None)
    text = config["llm_config"]
    if text.get("model_type") == "internlm2":  # InternVL's 9 tokens follow the sentencepiece model's pieces
        pieces = None if text.get("vocab_size") is None else text["vocab_size"] - len(synthetic_tokenizer.INTERNVL_SPECIALS)
        specials = synthetic_tokenizer.write_internlm2_files(out_dir, num_pieces=pieces)
    else:
        first_special = None if text.get("vocab_size") is None else text["vocab_size"] - 31
        specials = synthetic_tokenizer.write_slow_files(out_dir, first_special_id=first_special)
    text["vocab_size"] = max(specials.values()) + 1
    spec = ModelSpec.from_config(config)
    model = random_model(spec, specials["<IMG_CONTEXT>"], seed)
    write_original_checkpoint(model, config, out_dir)
    return out_dir


def materialize(name: str) -> Path:
    """The cached checkpoint for `random:<name>`, created on first use (atomically)."""
    target = cache_root() / "random" / name
    if (target / "model.safetensors").is_file():
        return target
    preset_config(name)  # unknown names fail before any work
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        create(name, staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
