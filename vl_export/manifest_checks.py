"""A manifest is untrusted input: every field's type and range, every named file inside the bundle, hashes well formed.

Checked on the raw JSON before any dataclass is built, so a hostile or careless manifest is refused with one line
naming the field (`graphs[2].file`, `preprocessing.max_tiles`), never a traceback or a hang further on.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from .errors import BundleError

SHA256 = re.compile(r"[0-9a-f]{64}")
ROLES = ("vision_encoder", "projector", "decoder")
PRECISIONS = ("fp32", "fp16", "int8", "int4")
FLOAT_DTYPES = ("float32", "float16")
REQUIRED_TOKENS = ("<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>")
END_OF_TEXT_TOKENS = ("<|endoftext|>", "</s>")  # Qwen2's end of text, InternLM2's: one of them must be named
# GraphEntry.form values: ONNX Runtime decoders built from the weights (export/graphs_gqa.py); gqa: with
# GroupQueryAttention, stacked: with attention as MatMuls over each KV head's stacked query group.
GRAPH_FORMS = ("gqa", "stacked")
FORM_KV_DTYPES = {"gqa": ("float32",), "stacked": ("float32", "float16")}  # the cache's dtypes each form is built with
SYMBOLIC_AXES = ("tiles", "batch", "seq", "past", "total", "num_logits", "capacity")
# Far beyond any InternVL2.5 (12 tiles of 448, 32k context) yet small enough that nothing downstream hangs or
# asks the allocator for terabytes: the tiling search is O(max_tiles log max_tiles), the KV cache is per position.
MAX_TILES = 256
MAX_IMAGE_SIZE = 4096
MAX_CONTEXT = 1 << 20
MAX_DIM = 1 << 20  # any width, vocabulary or layer count
GRAPH_IO = {
    "vision_encoder": (("pixel_values",), ("vision_features",)),
    "projector": (("vision_features",), ("image_embeds",)),
    "decoder": (("inputs_embeds", "attention_mask", "position_ids", "logits_positions"), ("logits",)),
}


def fail(field: str, problem: str) -> BundleError:
    return BundleError(f"manifest field {field} {problem}")


def integer(data: dict, key: str, where: str, low: int, high: int) -> int:
    value = data.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise fail(f"{where}{key}", f"must be an integer, got {value!r:.60}")
    if not low <= value <= high:
        raise fail(f"{where}{key}", f"must be in [{low}, {high}], got {value}")
    return value


def mapping(value: Any, field: str) -> dict:
    if not isinstance(value, dict):
        raise fail(field, f"must be an object, got {type(value).__name__}")
    return value


def text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise fail(field, f"must be a string, got {type(value).__name__}")
    return value


def inside(bundle: Path, name: Any, field: str) -> Path:
    """The real path of a file the manifest names; it must be a relative path that stays (symlinks resolved) in the bundle."""
    name = text(name, field)
    if not name or "\0" in name or Path(name).is_absolute():
        raise fail(field, f"{name!r:.80} must be a relative path inside the bundle")
    root = Path(os.path.realpath(bundle))
    real = Path(os.path.realpath(root / name))
    if root not in real.parents:
        raise fail(field, f"{name!r:.80} points outside the bundle")
    return real


def check_raw(data: dict, bundle: Path) -> None:
    """Everything Manifest.from_dict and the runtime rely on, checked on the decoded JSON."""
    model = mapping(data.get("model"), "model")
    vision, text_model = mapping(model.get("vision"), "model.vision"), mapping(model.get("text"), "model.text")
    for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "patch_size", "num_channels"):
        integer(vision, key, "model.vision.", 1, MAX_DIM)
    integer(vision, "image_size", "model.vision.", 1, MAX_IMAGE_SIZE)
    for key in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
        integer(text_model, key, "model.text.", 1, MAX_DIM)
    ratio = model.get("downsample_ratio")
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio <= 1:
        raise fail("model.downsample_ratio", f"must be a number in (0, 1], got {ratio!r:.40}")

    pre = mapping(data.get("preprocessing"), "preprocessing")
    image_size = integer(pre, "image_size", "preprocessing.", 1, MAX_IMAGE_SIZE)
    if image_size != vision["image_size"]:
        raise fail("preprocessing.image_size", f"is {image_size} but the vision encoder takes {vision['image_size']}")
    min_tiles = integer(pre, "min_tiles", "preprocessing.", 1, MAX_TILES)
    integer(pre, "max_tiles", "preprocessing.", min_tiles, MAX_TILES)
    if not isinstance(pre.get("use_thumbnail"), bool):
        raise fail("preprocessing.use_thumbnail", "must be true or false")
    for key in ("mean", "std"):
        if key in pre:
            values = pre[key]
            if (not isinstance(values, list) or len(values) != 3
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
                    or (key == "std" and min(values) <= 0)):
                raise fail(f"preprocessing.{key}", "must be three finite numbers (std above zero)")
    integer(data, "max_context", "", 2, MAX_CONTEXT)
    text(data.get("system_message"), "system_message")
    if data.get("template", "internvl2_5") != "internvl2_5":
        raise fail("template", f"{data.get('template')!r:.40} is not supported (only internvl2_5)")

    tokens = mapping(data.get("special_tokens"), "special_tokens")
    for token in REQUIRED_TOKENS:
        if token not in tokens:
            raise fail("special_tokens", f"lacks {token}")
    if not any(token in tokens for token in END_OF_TEXT_TOKENS):
        raise fail("special_tokens", f"lacks an end-of-text token ({' or '.join(END_OF_TEXT_TOKENS)})")
    for token in tokens:
        integer(tokens, token, "special_tokens.", 0, MAX_DIM * 4)

    embed = mapping(data.get("embed_tokens"), "embed_tokens")
    inside(bundle, embed.get("file"), "embed_tokens.file")
    if embed.get("dtype") not in FLOAT_DTYPES:
        raise fail("embed_tokens.dtype", f"must be float32 or float16, got {embed.get('dtype')!r:.40}")
    shape = embed.get("shape")
    if (not isinstance(shape, list) or len(shape) != 2
            or not all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= MAX_DIM * 4 for d in shape)):
        raise fail("embed_tokens.shape", f"must be [rows, hidden] of positive integers, got {shape!r:.60}")
    if shape[1] != text_model["hidden_size"]:
        raise fail("embed_tokens.shape", f"has width {shape[1]} but the decoder's hidden size is {text_model['hidden_size']}")
    for token, token_id in tokens.items():
        if token_id >= shape[0]:
            raise fail(f"special_tokens.{token}", f"is {token_id}, beyond the embedding table's {shape[0]} rows")
    inside(bundle, data.get("tokenizer", "tokenizer.json"), "tokenizer")
    if data.get("engines") is not None:
        inside(bundle, data["engines"], "engines")

    graphs = data.get("graphs")
    if not isinstance(graphs, list):
        raise fail("graphs", "must be a list")
    for i, graph in enumerate(graphs):
        check_graph(mapping(graph, f"graphs[{i}]"), f"graphs[{i}]", bundle, model)
    for role in ROLES:
        if not any(g["role"] == role and g.get("backends") is None for g in graphs):
            raise fail("graphs", f"has no {role} graph for every backend")


def check_graph(graph: dict, where: str, bundle: Path, model: dict) -> None:
    role = graph.get("role")
    if role not in ROLES:
        raise fail(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r:.40}")
    real = inside(bundle, graph.get("file"), f"{where}.file")
    data_file = real.parent / (real.name + ".data")
    if os.path.lexists(data_file):  # ONNX external data beside the graph: inside the bundle, and hashed
        inside(bundle, str(Path(graph["file"] + ".data")), f"{where}.file's external data")
        if not SHA256.fullmatch(str(graph.get("data_sha256"))):
            raise fail(f"{where}.data_sha256", "must be 64 lowercase hex characters (the graph has external data)")
    elif graph.get("data_sha256") is not None:
        raise fail(f"{where}.data_sha256", f"is set but {graph['file']}.data is missing")
    if not isinstance(graph.get("sha256"), str) or not SHA256.fullmatch(graph["sha256"]):
        raise fail(f"{where}.sha256", f"must be 64 lowercase hex characters, got {graph.get('sha256')!r:.80}")
    if graph.get("precision") not in PRECISIONS:
        raise fail(f"{where}.precision", f"must be one of {', '.join(PRECISIONS)}, got {graph.get('precision')!r:.40}")
    backends = graph.get("backends")
    if backends is not None and (not isinstance(backends, list) or not all(isinstance(b, str) for b in backends)):
        raise fail(f"{where}.backends", "must be null or a list of backend names")
    if graph.get("recipe") is not None:
        text(graph["recipe"], f"{where}.recipe")
    inputs = tensors(graph.get("inputs"), f"{where}.inputs")
    outputs = tensors(graph.get("outputs"), f"{where}.outputs")
    want_in, want_out = GRAPH_IO[role]
    for names, want, field in ((inputs, want_in, "inputs"), (outputs, want_out, "outputs")):
        missing = [n for n in want if n not in names]
        if missing:
            raise fail(f"{where}.{field}", f"lacks {missing[0]} (is this the {role} graph?)")
    if role == "decoder":
        check_kv(inputs, outputs, where, mapping(model.get("text"), "model.text"))
    if graph.get("form") is not None:
        check_form(graph, inputs, outputs, where)


def check_form(graph: dict, inputs: dict, outputs: dict, where: str) -> None:
    """A gqa or stacked decoder (export/graphs_gqa.py) has the in-place decoder's IO (check_kv holds it to that once it has
    write_positions), a cache of one dtype its form takes, past and present alike (the runtime binds them to one
    buffer), and runs only on ONNX Runtime (its attention, norms and rotary are
    com.microsoft operators)."""
    form = graph["form"]
    if form not in GRAPH_FORMS:
        raise fail(f"{where}.form", f"must be null or one of {', '.join(GRAPH_FORMS)}, got {form!r:.40}")
    if graph["role"] != "decoder" or "write_positions" not in inputs:
        raise fail(f"{where}.form", f"is {form} but the graph is not an in-place decoder ({graph['role']})")
    if graph.get("backends") != ["onnxruntime"]:
        raise fail(f"{where}.backends", f"must be [\"onnxruntime\"] for a {form} decoder, got {graph.get('backends')!r:.60}")
    kv = [t for tensors_ in (inputs, outputs) for name, t in tensors_.items()
          if name.startswith(("past_key_values.", "present."))]
    allowed = FORM_KV_DTYPES[form]
    if any(t["dtype"] != kv[0]["dtype"] for t in kv) or kv[0]["dtype"] not in allowed:
        raise fail(f"{where}.inputs", f"a {form} decoder's cache is {' or '.join(allowed)}, one dtype for every tensor")


def tensors(value: Any, field: str) -> dict[str, dict]:
    if not isinstance(value, list) or not value:
        raise fail(field, "must be a non-empty list of tensors")
    out = {}
    for j, t in enumerate(value):
        t = mapping(t, f"{field}[{j}]")
        name = text(t.get("name"), f"{field}[{j}].name")
        text(t.get("dtype"), f"{field}[{j}].dtype")
        shape = t.get("shape")
        if not isinstance(shape, list) or not all(
                (isinstance(d, int) and not isinstance(d, bool) and 0 < d <= MAX_DIM * 4) or d in SYMBOLIC_AXES
                for d in shape):
            raise fail(f"{field}[{j}].shape", f"must list positive sizes or axis names, got {shape!r:.60}")
        out[name] = t
    return out


def check_kv(inputs: dict, outputs: dict, where: str, text_model: dict) -> None:
    """The decoder's cache tensors: one key and one value per layer, (batch, kv_heads, past|total, head_dim); a
    decoder whose cache is updated in place (export/graphs_inplace.py) has (batch, kv_heads, capacity, head_dim)
    for both, and a `write_positions` input."""
    layers, heads, dim = text_model["num_layers"], text_model["num_kv_heads"], text_model["head_dim"]
    inplace = "write_positions" in inputs
    past_axis, present_axis = ("capacity", "capacity") if inplace else ("past", "total")
    for prefix, axis, tensors_, field in (("past_key_values", past_axis, inputs, "inputs"),
                                          ("present", present_axis, outputs, "outputs")):
        names = [n for n in tensors_ if n.startswith(prefix + ".")]
        if len(names) != 2 * layers:
            raise fail(f"{where}.{field}", f"has {len(names)} {prefix} tensors, the model's {layers} layers need {2 * layers}")
        for name in names:
            t = tensors_[name]
            if t["dtype"] not in FLOAT_DTYPES:
                raise fail(f"{where}.{field}.{name}.dtype", f"must be float32 or float16, got {t['dtype']!r:.40}")
            if t["shape"] != ["batch", heads, axis, dim]:
                raise fail(f"{where}.{field}.{name}.shape", f"must be [batch, {heads}, {axis}, {dim}], got {t['shape']!r:.60}")
