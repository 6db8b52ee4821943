"""Finding and loading an InternVL2.5 checkpoint (original or transformers layout) into the native torch classes."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from vl_export.errors import CheckpointError
from vl_export.spec import ModelSpec

from . import internlm2
from .tokenizer import image_token_id_of

WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class Checkpoint:
    path: Path
    spec: ModelSpec
    model: torch.nn.Module  # InternVLForConditionalGeneration, fp32, eval mode
    image_token_id: int
    sha256: str


# --- where the checkpoint is -------------------------------------------------------------------------------


def resolve(model: str) -> Path:
    """A local directory, `demo` (the shipped demo model), `random:<preset>`, or a Hugging Face repo id from the cache."""
    if model.startswith("random:"):
        from .random_model import materialize

        return materialize(model.removeprefix("random:"))
    if model == "demo":
        from .demo import CHECKPOINT

        if not (CHECKPOINT / "config.json").is_file():
            raise CheckpointError(f"the demo model is not shipped yet ({CHECKPOINT} has no config.json): train one with "
                                  f"python -m vl_export.export.demo.train --out DIR and pass --model DIR")
        return CHECKPOINT
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{model} is a file; pass the checkpoint directory that holds config.json")
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{model} has no config.json: not a Hugging Face checkpoint directory")
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model) and not model.startswith((".", "/")):
        return _from_hub_cache(model)
    raise CheckpointError(f"checkpoint {model} not found: no such directory")


def _from_hub_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise CheckpointError(
            f"{repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; download it first "
            f"(`hf download {repo_id}`) or pass a local directory"
        )
    try:
        return Path(snapshot_download(repo_id))
    except Exception as exc:  # network errors come in many types; all mean the same to the user
        raise CheckpointError(
            f"{repo_id} is not in the Hugging Face cache and could not be downloaded "
            f"({type(exc).__name__}); pass a local directory or fill the cache on a machine with network"
        ) from None


def read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path / 'config.json'} is not valid JSON: {exc}") from None


# --- reading weights -----------------------------------------------------------------------------------------


def weight_files(path: Path) -> list[Path]:
    for index in WEIGHT_INDEXES:
        if (path / index).is_file():
            shards = sorted(set(json.loads((path / index).read_text())["weight_map"].values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise CheckpointError(f"{path / index} names shards that are not there: {', '.join(missing)}")
            return [path / s for s in shards]
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return [path / name]
    raise CheckpointError(f"{path} holds no weights (looked for {', '.join(WEIGHT_FILES + WEIGHT_INDEXES)})")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        try:
            if file.suffix == ".safetensors":
                part = read_safetensors(file)
            else:
                part = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"cannot read weights {file.name}: {exc}") from None
        state.update(part)
    return state


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """A .safetensors file read tensor by tensor with plain reads into tensors of their own.

    Not memory-mapped (as safetensors' load_file is): every tensor of a mapped file keeps the whole mapping, and
    its pages count in the process's resident memory until the last tensor is gone, so upcasting tensor by tensor
    would free nothing before the end (measured: 5.6 GiB peak to load the 1B instead of 3.6).
    """
    with file.open("rb") as stream:
        header_len = int.from_bytes(stream.read(8), "little")
        header = json.loads(stream.read(header_len))
        start_of_data = 8 + header_len
        state = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            tensor = torch.empty(info["shape"], dtype=_SAFETENSORS_DTYPES[info["dtype"]])
            raw = tensor.reshape(-1).view(torch.uint8).numpy()  # the tensor's own bytes
            if end - begin != raw.nbytes:
                raise CheckpointError(f"{file.name}: {name} holds {end - begin} bytes, its shape needs {raw.nbytes}")
            stream.seek(start_of_data + begin)
            if stream.readinto(memoryview(raw)) != raw.nbytes:
                raise CheckpointError(f"{file.name} is truncated (in {name})")
            state[name] = tensor
    return state


def checkpoint_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    for file in [path / "config.json", *weight_files(path)]:
        digest.update(file.name.encode())
        with file.open("rb") as stream:
            while chunk := stream.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


# --- the original layout, mapped onto the native classes -----------------------------------------------------

# (original name, native name); {n} a layer index, {p} weight|bias, {fc} fc1|fc2, {rest} any suffix.
# Every key must match exactly one row in the direction it is read; anything else is an error, never skipped.
RENAMES: list[tuple[str, str]] = [
    ("vision_model.embeddings.class_embedding", "model.vision_tower.embeddings.cls_token"),
    ("vision_model.embeddings.position_embedding", "model.vision_tower.embeddings.position_embeddings"),
    ("vision_model.embeddings.patch_embedding.{p}", "model.vision_tower.embeddings.patch_embeddings.projection.{p}"),
    ("vision_model.encoder.layers.{n}.attn.proj.{p}", "model.vision_tower.encoder.layer.{n}.attention.projection_layer.{p}"),
    ("vision_model.encoder.layers.{n}.mlp.{fc}.{p}", "model.vision_tower.encoder.layer.{n}.mlp.{fc}.{p}"),
    ("vision_model.encoder.layers.{n}.norm1.{p}", "model.vision_tower.encoder.layer.{n}.layernorm_before.{p}"),
    ("vision_model.encoder.layers.{n}.norm2.{p}", "model.vision_tower.encoder.layer.{n}.layernorm_after.{p}"),
    # InternViT-6B only: RMSNorm of q and k over all heads (qk_normalization).
    ("vision_model.encoder.layers.{n}.attn.{qk}_norm.weight", "model.vision_tower.encoder.layer.{n}.attention.{qk}_norm.weight"),
    ("vision_model.encoder.layers.{n}.ls1", "model.vision_tower.encoder.layer.{n}.lambda_1"),
    ("vision_model.encoder.layers.{n}.ls2", "model.vision_tower.encoder.layer.{n}.lambda_2"),
    ("mlp1.0.{p}", "model.multi_modal_projector.layer_norm.{p}"),
    ("mlp1.1.{p}", "model.multi_modal_projector.linear_1.{p}"),
    ("mlp1.3.{p}", "model.multi_modal_projector.linear_2.{p}"),
    ("language_model.model.{rest}", "model.language_model.{rest}"),
    ("language_model.lm_head.weight", "lm_head.weight"),
]
# InternViT fuses the attention input projection into one matrix whose rows are q, then k, then v.
FUSED_QKV = "vision_model.encoder.layers.{n}.attn.qkv.{p}"
SPLIT_QKV = "model.vision_tower.encoder.layer.{n}.attention.{qkv}_proj.{p}"

_PLACEHOLDERS = {"n": r"\d+", "p": "weight|bias", "fc": "fc1|fc2", "rest": ".+", "qkv": "q|k|v", "qk": "q|k"}


def _compile(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(re.escape(part) if i % 2 == 0 else f"(?P<{part}>{_PLACEHOLDERS[part]})" for i, part in enumerate(parts))
    return re.compile(regex)


def _rename(key: str, rules: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, target in rules:
        if m := pattern.fullmatch(key):
            return target.format(**m.groupdict())
    return None


_TO_NATIVE = [(_compile(src), dst) for src, dst in RENAMES]
_TO_ORIGINAL = [(_compile(dst), src) for src, dst in RENAMES]


def original_to_native(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original-layout state dict and split the fused qkv; an unmapped key is an error."""
    fused = _compile(FUSED_QKV)
    native: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if m := fused.fullmatch(key):
            if tensor.shape[0] % 3:
                raise CheckpointError(f"weight {key} has {tensor.shape[0]} rows, not a multiple of 3 (q|k|v)")
            for qkv, part in zip("qkv", tensor.chunk(3, dim=0)):
                native[SPLIT_QKV.format(qkv=qkv, **m.groupdict())] = part
        elif (name := _rename(key, _TO_NATIVE)) is not None:
            native[name] = tensor
        else:
            raise CheckpointError(f"unexpected weight {key} in the checkpoint: no rule maps it to the model")
    return native


def native_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `original_to_native`, for writing checkpoints in the original layout."""
    split = _compile(SPLIT_QKV)
    original: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if m := split.fullmatch(key):
            groups = m.groupdict()
            parts.setdefault(FUSED_QKV.format(n=groups["n"], p=groups["p"]), {})[groups["qkv"]] = tensor
        elif (name := _rename(key, _TO_ORIGINAL)) is not None:
            original[name] = tensor
        else:
            raise CheckpointError(f"no original-layout name for weight {key}")
    for key, qkv in parts.items():
        original[key] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], dim=0)
    return original


def native_config(spec: ModelSpec, image_token_id: int):
    """The transformers InternVLConfig that holds the same model as `spec`."""
    from transformers import InternVLConfig, InternVLVisionConfig, LlamaConfig, Qwen2Config

    v, t = spec.vision, spec.text
    vision = InternVLVisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        attention_bias=v.qkv_bias,
        norm_type=v.norm_type,
        use_qk_norm=v.qk_normalization,
        image_size=v.image_size,
        patch_size=v.patch_size,
        num_channels=v.num_channels,
        layer_norm_eps=v.layer_norm_eps,
        use_mean_pooling=True,  # InternViT has no final LayerNorm
    )
    dims = dict(
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        head_dim=t.head_dim,
        rms_norm_eps=t.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
        max_position_embeddings=t.max_position_embeddings,
        vocab_size=t.vocab_size,
        tie_word_embeddings=t.tie_word_embeddings,
    )
    # InternLM2 computes what Llama does (export/internlm2.py); Qwen2 is Llama plus a q/k/v bias.
    text = LlamaConfig(**dims, attention_bias=False, mlp_bias=False) if t.family == "internlm2" else Qwen2Config(**dims)
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        image_seq_length=spec.num_image_tokens,
        downsample_ratio=spec.downsample_ratio,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=t.tie_word_embeddings,
    )


def _load_original(path: Path, spec: ModelSpec, image_token_id: int, stored_dtype: bool = False) -> torch.nn.Module:
    from transformers import InternVLForConditionalGeneration

    state = read_state_dict(path)
    if spec.text.family == "internlm2":
        state = internlm2.to_qwen2_names(state, spec.text)
    state = original_to_native(state)
    with torch.device("meta"):
        model = InternVLForConditionalGeneration(native_config(spec, image_token_id))
    expected = {k: p.shape for k, p in model.state_dict().items()}
    if spec.text.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
        state.pop("lm_head.weight", None)
    _check_keys(expected, state)
    model.load_state_dict(state if stored_dtype else _to_fp32(state), strict=False, assign=True)
    if spec.text.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    return model  # built on the meta device to skip random init: `load` computes the rotary tables


def _to_fp32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Upcast tensor by tensor, dropping each stored tensor as it goes: the checkpoint's bf16 copy and the model's
    fp32 copy are never both whole in memory (at 1B that is 1.9 GB less at the peak)."""
    fp32 = {}
    for key in list(state):
        fp32[key] = state.pop(key).float()
    return fp32


def _check_keys(expected: dict[str, torch.Size], state: dict[str, torch.Tensor]) -> None:
    missing = sorted(expected.keys() - state.keys())
    if missing:
        raise CheckpointError(f"missing weight for {missing[0]} ({len(missing)} missing)")
    extra = sorted(state.keys() - expected.keys())
    if extra:
        raise CheckpointError(f"unexpected weight {extra[0]} ({len(extra)} keys the model does not have)")
    for key, shape in expected.items():
        if tuple(state[key].shape) != tuple(shape):
            raise CheckpointError(
                f"weight {key} has shape {tuple(state[key].shape)}, the config implies {tuple(shape)}"
            )


def _load_native(path: Path, stored_dtype: bool = False) -> torch.nn.Module:
    from transformers import InternVLForConditionalGeneration

    try:
        model, info = InternVLForConditionalGeneration.from_pretrained(
            path, dtype="auto" if stored_dtype else torch.float32, output_loading_info=True, local_files_only=True
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"cannot load {path} as InternVLForConditionalGeneration: {exc}") from None
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind, []))
        if keys:
            raise CheckpointError(f"checkpoint {kind.replace('_', ' ')}: {keys[0]} ({len(keys)} in all)")
    return model


def load(path: Path, stored_dtype: bool = False) -> Checkpoint:
    """Load either layout into InternVLForConditionalGeneration (eval, eager attention), in fp32, or with
    `stored_dtype` in the dtype the checkpoint stores (bf16 for the released ones) for the exporter, which upcasts
    each graph's weights to fp32 just before exporting it (`to_full_precision`): the whole model is never held in
    fp32, and the upcast is exact, so the graphs are the same."""
    spec = ModelSpec.from_config(read_config(path))
    image_token_id = image_token_id_of(path)
    if spec.layout == "original":
        model = _load_original(path, spec, image_token_id, stored_dtype)
    else:
        model = _load_native(path, stored_dtype)
    # The rotary tables are computed buffers, not weights: computed here in fp32 for either layout (the original
    # layout's model is built on the meta device; a native checkpoint loaded in bf16 would hold them in bf16).
    lm = model.model.language_model
    lm.rotary_emb = type(lm.rotary_emb)(lm.config)
    if spec.vision.qk_normalization:  # transformers builds q_norm/k_norm with eps 1e-6; InternViT uses layer_norm_eps
        for layer in model.model.vision_tower.encoder.layer:
            layer.attention.q_norm.variance_epsilon = layer.attention.k_norm.variance_epsilon = spec.vision.layer_norm_eps
    model.config._attn_implementation = "eager"
    for sub in (model.model.vision_tower, model.model.language_model):
        sub.config._attn_implementation = "eager"
    model.eval().requires_grad_(False)
    return Checkpoint(path=path, spec=spec, model=model, image_token_id=image_token_id, sha256=checkpoint_sha256(path))

