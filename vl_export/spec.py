"""ModelSpec: every dimension of an InternVL2.5 model, read once from its config and frozen."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from .errors import CheckpointError, UnsupportedConfigError

Layout = Literal["original", "native"]

ORIGINAL_ARCHITECTURE = "InternVLChatModel"
NATIVE_ARCHITECTURE = "InternVLForConditionalGeneration"
SUPPORTED_TEMPLATES = ("internvl2_5",)
# The language-model families of the InternVL2.5 family: Qwen2.5 (1B, 4B, 38B, 78B) and InternLM2.5 (2B, 8B, 26B).
TextFamily = Literal["qwen2", "internlm2"]


@dataclass(frozen=True)
class VisionSpec:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    layer_norm_eps: float
    qkv_bias: bool
    # InternViT-6B: RMSNorm instead of LayerNorm, and RMSNorm over all heads of q and k before attention.
    norm_type: Literal["layer_norm", "rms_norm"] = "layer_norm"
    qk_normalization: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        """Patches per side of one tile (32 for 448 / 14)."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Tokens per tile out of the ViT: the patches plus CLS (1025)."""
        return self.grid * self.grid + 1


@dataclass(frozen=True)
class TextSpec:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    vocab_size: int
    tie_word_embeddings: bool
    # InternLM2 is the Llama computation (no q/k/v bias, RMSNorm, SwiGLU, rotate-half RoPE) under other weight
    # names, with the q/k/v projections fused per KV head; Qwen2 adds a q/k/v bias.
    family: TextFamily = "qwen2"

    @property
    def attention_bias(self) -> bool:
        return self.family == "qwen2"


@dataclass(frozen=True)
class ModelSpec:
    layout: Layout
    vision: VisionSpec
    text: TextSpec
    downsample_ratio: float
    template: str
    use_thumbnail: bool
    min_dynamic_patch: int
    max_dynamic_patch: int
    dynamic_image_size: bool

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def shuffle_factor(self) -> int:
        """Pixel-unshuffle block side: 2 for downsample_ratio 0.5."""
        return round(1 / self.downsample_ratio)

    @property
    def num_image_tokens(self) -> int:
        """LLM tokens per tile (256 for InternVL2.5)."""
        return (self.vision.grid // self.shuffle_factor) ** 2

    @property
    def projector_in(self) -> int:
        """Width of a pixel-unshuffled feature (4096 for InternVL2.5-1B)."""
        return self.vision.hidden_size * self.shuffle_factor**2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        data = dict(data)
        return cls(vision=VisionSpec(**data.pop("vision")), text=TextSpec(**data.pop("text")), **data)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelSpec:
        """Read an original (InternVLChatModel) or native (InternVLForConditionalGeneration) config.json."""
        architectures = config.get("architectures") or []
        model_type = config.get("model_type")
        if ORIGINAL_ARCHITECTURE in architectures or model_type == "internvl_chat":
            return _from_original(config)
        if NATIVE_ARCHITECTURE in architectures or model_type == "internvl":
            return _from_native(config)
        found = ", ".join(architectures) or model_type or "nothing"
        raise CheckpointError(
            f"not an InternVL checkpoint: config.json names {found}; expected "
            f"{ORIGINAL_ARCHITECTURE} (original layout) or {NATIVE_ARCHITECTURE} (transformers layout)"
        )


def _require(config: dict[str, Any], key: str, where: str) -> Any:
    if key not in config:
        raise CheckpointError(f"config.json is missing {where}{key}")
    return config[key]


def _refuse_unless(ok: bool, what: str) -> None:
    if not ok:
        raise UnsupportedConfigError(f"unsupported InternVL variant: {what}")


def _text_family(text: dict[str, Any]) -> TextFamily:
    architectures = text.get("architectures") or []
    model_type = text.get("model_type")
    if model_type == "qwen2" or "Qwen2ForCausalLM" in architectures:
        return "qwen2"
    if model_type == "internlm2" or "InternLM2ForCausalLM" in architectures:
        return "internlm2"
    raise UnsupportedConfigError(
        f"unsupported InternVL variant: the language model is {model_type or architectures or 'not named'} "
        f"(supported: Qwen2 as in InternVL2.5-1B/4B/38B/78B, InternLM2 as in InternVL2.5-2B/8B/26B)"
    )


def _rope_theta(text: dict[str, Any], family: TextFamily) -> float:
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    # InternLM2.5 configs carry {"type": "dynamic", "factor": 2.0}: its dynamic NTK rotary embedding changes
    # the base only once a sequence exceeds max_position_embeddings and is the plain rotary embedding up to
    # there. The exported graph computes the plain one and the runtime caps the context at
    # max_position_embeddings (manifest max_context), so every context it accepts is computed exactly.
    plain = rope_type == "default" or (family == "internlm2" and rope_type == "dynamic")
    _refuse_unless(plain, f"rope scaling {rope_type!r} for a {family} language model (only the default RoPE"
                          + (", or InternLM2's dynamic NTK up to max_position_embeddings" if family == "internlm2" else "") + ")")
    return float(rope.get("rope_theta", text.get("rope_theta", 10000.0)))


def _text_spec(text: dict[str, Any], where: str, tie_word_embeddings: bool) -> TextSpec:
    family = _text_family(text)
    rope_theta = _rope_theta(text, family)
    _refuse_unless(not text.get("use_sliding_window", False), "sliding-window attention in the language model")
    _refuse_unless(text.get("hidden_act", "silu") == "silu", f"language-model activation {text.get('hidden_act')!r}")
    if family == "internlm2":
        _refuse_unless(not text.get("bias", False), "an InternLM2 language model with bias (InternLM2.5 has none)")
    hidden = int(_require(text, "hidden_size", where))
    heads = int(_require(text, "num_attention_heads", where))
    kv_heads = int(text.get("num_key_value_heads") or heads)
    _refuse_unless(heads % kv_heads == 0, f"{heads} attention heads over {kv_heads} KV heads")
    return TextSpec(
        hidden_size=hidden,
        intermediate_size=int(_require(text, "intermediate_size", where)),
        num_layers=int(_require(text, "num_hidden_layers", where)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(text.get("head_dim") or hidden // heads),
        rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        max_position_embeddings=int(_require(text, "max_position_embeddings", where)),
        vocab_size=int(_require(text, "vocab_size", where)),
        tie_word_embeddings=tie_word_embeddings,
        family=family,
    )


def _vision_spec(vision: dict[str, Any], where: str, qkv_bias_key: str, image_size: int) -> VisionSpec:
    norm_type = vision.get("norm_type", "layer_norm")
    _refuse_unless(norm_type in ("layer_norm", "rms_norm"), f"vision norm_type {norm_type!r} (layer_norm or rms_norm)")
    _refuse_unless(vision.get("hidden_act", "gelu") == "gelu", f"vision activation {vision.get('hidden_act')!r}")
    patch = vision.get("patch_size", 14)
    patch = int(patch[0] if isinstance(patch, (list, tuple)) else patch)
    hidden = int(_require(vision, "hidden_size", where))
    return VisionSpec(
        hidden_size=hidden,
        intermediate_size=int(_require(vision, "intermediate_size", where)),
        num_layers=int(_require(vision, "num_hidden_layers", where)),
        num_heads=int(_require(vision, "num_attention_heads", where)),
        image_size=image_size,
        patch_size=patch,
        num_channels=int(vision.get("num_channels", 3)),
        layer_norm_eps=float(vision.get("layer_norm_eps", 1e-6)),
        qkv_bias=bool(vision.get(qkv_bias_key, True)),
        norm_type=norm_type,
        qk_normalization=bool(vision.get("qk_normalization", vision.get("use_qk_norm", False))),
    )


def _check_grid(spec: ModelSpec) -> ModelSpec:
    factor = spec.shuffle_factor
    _refuse_unless(
        abs(1 / factor - spec.downsample_ratio) < 1e-9 and spec.vision.grid % factor == 0,
        f"downsample_ratio {spec.downsample_ratio} with a {spec.vision.grid}x{spec.vision.grid} patch grid",
    )
    _refuse_unless(spec.vision.image_size % spec.vision.patch_size == 0, "image size not a multiple of the patch size")
    return spec


def _from_original(config: dict[str, Any]) -> ModelSpec:
    _refuse_unless(config.get("ps_version", "v1") == "v2", f"ps_version {config.get('ps_version', 'v1')!r} (only v2)")
    _refuse_unless(config.get("select_layer", -1) == -1, f"select_layer {config.get('select_layer')} (only -1)")
    template = config.get("template", "internvl2_5")
    _refuse_unless(template in SUPPORTED_TEMPLATES, f"template {template!r} (supported: {', '.join(SUPPORTED_TEMPLATES)})")
    vision = _require(config, "vision_config", "")
    text = _require(config, "llm_config", "")
    image_size = int(config.get("force_image_size") or vision.get("image_size", 448))
    return _check_grid(
        ModelSpec(
            layout="original",
            vision=_vision_spec(vision, "vision_config.", "qkv_bias", image_size),
            # The original model is a plain Qwen2ForCausalLM: its own config decides the tying.
            text=_text_spec(text, "llm_config.", bool(text.get("tie_word_embeddings", False))),
            downsample_ratio=float(config.get("downsample_ratio", 0.5)),
            template=template,
            use_thumbnail=bool(config.get("use_thumbnail", True)),
            min_dynamic_patch=int(config.get("min_dynamic_patch", 1)),
            max_dynamic_patch=int(config.get("max_dynamic_patch", 12)),
            dynamic_image_size=bool(config.get("dynamic_image_size", True)),
        )
    )


def _from_native(config: dict[str, Any]) -> ModelSpec:
    layer = config.get("vision_feature_layer", -1)
    _refuse_unless(layer == -1, f"vision_feature_layer {layer} (only -1)")
    strategy = config.get("vision_feature_select_strategy", "default")
    _refuse_unless(strategy == "default", f"vision_feature_select_strategy {strategy!r} (only 'default')")
    _refuse_unless(config.get("projector_hidden_act", "gelu") == "gelu", "projector activation other than gelu")
    vision = _require(config, "vision_config", "")
    _refuse_unless(vision.get("use_mean_pooling", True), "a vision tower with a final LayerNorm (use_mean_pooling false)")
    text = _require(config, "text_config", "")
    image_size = vision.get("image_size", 448)
    image_size = int(image_size[0] if isinstance(image_size, (list, tuple)) else image_size)
    return _check_grid(
        ModelSpec(
            layout="native",
            vision=_vision_spec(vision, "vision_config.", "attention_bias", image_size),
            # transformers ties lm_head by the top-level flag, whatever text_config says.
            text=_text_spec(text, "text_config.", bool(config.get("tie_word_embeddings", True))),
            downsample_ratio=float(config.get("downsample_ratio", 0.5)),
            template="internvl2_5",
            use_thumbnail=True,
            min_dynamic_patch=1,
            max_dynamic_patch=12,
            dynamic_image_size=True,
        )
    )
