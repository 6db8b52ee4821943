"""Which decoder graphs a quantized build ships beside the portable one, and from what source.

ONNX Runtime's decoder variants (INT8 and INT4 MatMulNBits, or dynamic INT8) are made from a decoder with an
in-place cache built from the weights while the torch model is still loaded (graphs_gqa.py), in its "stacked" form:
attention over each KV head's stacked query group (MultiHeadAttention), which reads the cache once per KV head. It
replaced the GroupQueryAttention form (which reads it once per query head; older bundles ship it and the runtime
still runs it) because it decodes faster after an image prompt: 7-9% per step after 1,903 positions, the same after
367, 0.4-0.6 ms slower after 150, its chunked prefill within 4% (README, "The stacked decoder"). The
GroupQueryAttention form had
replaced the torch-exported in-place decoder (graphs_inplace.py) for being faster per step at both precisions.
The portable decoders (weight-only INT8 or blocked INT4 Q/DQ, for OpenVINO and TensorRT) keep today's
concatenating graph. The INT4 settings below were chosen by measurement (README, "INT4 blocks of 128"): blocks of
128 with clip-searched scales (calibration/int4.py) take 24-33% less time per decode step than blocks of 32 after a
short prompt and 15-21% less after 7 tiles (MatMulNBits reads 4.25 instead of 5 bits a weight and does a quarter of
the per-block work), at the demo model's task accuracy; symmetric; accuracy level 4 (int8 compute), the fastest
level here; lm_head 4-bit (`--int4-lm-head int8` makes it 8-bit, for logits closer to fp32; `--int4-block 32` for
blocks of 32). ONNX Runtime's INT8 decoder is 8-bit MatMulNBits by default (README, "INT8 decoder default and
the fp16 KV cache"): against dynamic INT8 (MatMulInteger), on the same-size 1B in one end-to-end run, 62.7 against
49.0 tok/s after a short prompt and 60.0 against 43.2 after 7 tiles, logits closer to fp32 (cosine mean 0.9992 against 0.9956, top-1 0.92 against
0.82), but it reads a prompt ~65% slower (ONNX Runtime's 8-bit MatMulNBits kernel on many rows runs at 1/1.5-1/1.9
of MLAS's int8 GEMM); `--ort-int8-decoder dynamic` keeps the faster prefill for long prompts and short answers.
These decoders' KV cache is fp16 (ORT_KV_DTYPE): per step, both load orders, 13% less time at INT4 after 1,903
positions (3% at INT8, within that run's noise) and 0.2-0.5 ms less after 150; half the cache memory; logits
against fp32 unchanged at these precisions (INT8 cosine mean 0.99921 against 0.99919 with an fp32 cache).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from vl_export.errors import InputError
from vl_export.files import Progress, step
from vl_export.manifest import GraphEntry

INPLACE = "decoder (in-place cache)"  # the step name of the in-place fp32 source in build.quantize_bundle
ORT_DECODER_FORM = "stacked"  # graphs_gqa.FORMS: the form of ONNX Runtime's decoder variants
ORT_KV_DTYPE = "float16"  # and their KV cache (graphs_gqa._StackedAttention; module docstring)
INPLACE_FILE = "decoder.inplace-fp32.onnx"  # staged only during the build
ORT_INT8_NBITS_RECIPE = "matmul-nbits-int8-block128-level4"  # the manifest recipe of ort_int8("matmul-nbits")'s decoder
ORT_INT8_DYNAMIC_RECIPE = "dynamic-int8-w7-lm-head-nbits8-block128"  # and of ort_int8("dynamic")'s
ORT_INT8_DECODERS = ("matmul-nbits", "dynamic")  # build --ort-int8-decoder
ORT_INT8_DECODER = "matmul-nbits"  # the default (module docstring)
INT4_BLOCK_SIZE = 128
INT4_ACCURACY_LEVEL = 4
INT4_SCALE_SEARCH = True  # calibration/int4.py's clip search of each block's scale
INT4_HEAD_RECIPES = {"int4": "int4", "int8": "nbits8"}  # recipe suffix of ONNX Runtime's INT4 decoder, by lm_head
INT4_LM_HEAD = "int4"


@dataclass(frozen=True)
class Quantized:
    """A quantized decoder written as it is built from the weights (graph_builder.WeightGraph.save's `quantize`): the
    same file the quantizer would make from the full-precision graph (a test holds them equal byte for byte), without
    writing and reading back that graph (2 GB for each 1B decoder: 5-6 s of a build apiece)."""

    file: str
    recipe: str
    make: Callable  # graph_builder.Quantizer
    backends: tuple[str, ...] | None = None

    def entry(self, built: GraphEntry) -> GraphEntry:
        return dataclasses.replace(built, file=self.file, precision="int8", recipe=self.recipe, backends=self.backends)


def weight_only_int8() -> Quantized:
    """The portable INT8 decoder (any backend)."""
    from vl_export.calibration.quantize import weight_only_int8_model

    return Quantized("decoder.int8.onnx", "weight-only-int8", weight_only_int8_model)


def ort_int8(kind: str | None = None) -> Quantized:
    """ONNX Runtime's INT8 decoder, from the in-place decoder (graphs_gqa.py). `kind` (ORT_INT8_DECODERS; None:
    ORT_INT8_DECODER): "matmul-nbits", every weight 8-bit MatMulNBits (symmetric blocks of 128, accuracy level 4);
    "dynamic", dynamic INT8 (MatMulInteger, 7-bit per-channel weights) with the lm_head 8-bit MatMulNBits
    (calibration/dynamic.py's HEAD_BLOCK): a faster prefill, a slower and less exact decode (module docstring)."""
    from vl_export.calibration.dynamic import HEAD_BLOCK, dynamic_int8_model, matmul_nbits8_model

    if (kind or ORT_INT8_DECODER) == "matmul-nbits":
        return Quantized("decoder.ort-int8.onnx", ORT_INT8_NBITS_RECIPE, matmul_nbits8_model, ("onnxruntime",))
    return Quantized("decoder.ort-int8.onnx", ORT_INT8_DYNAMIC_RECIPE, partial(dynamic_int8_model, head_block=HEAD_BLOCK),
                     ("onnxruntime",))


def ort_int8_from_file(kind: str | None = None) -> tuple[str, Callable[[Path, Path], object]]:
    """(recipe, make) of ort_int8(kind) from an fp32 decoder file (builds whose decoder recipe calibrates on that
    file)."""
    from vl_export.calibration.quantize import of_file

    made = ort_int8(kind)
    return made.recipe, of_file(made.make)


def check_int4(config) -> None:
    if config.backend == "tensorrt":
        raise InputError("--precision int4 is not built for TensorRT: its blocked INT4 Q/DQ decoder was not checked "
                         "on a GPU here (build --backend ort and use the decoder with OpenVINO or ONNX Runtime)")
    from vl_export.calibration.int4 import BLOCK_SIZES, LM_HEAD_BITS

    if config.int4_lm_head not in (None, *LM_HEAD_BITS):
        raise InputError(f"--int4-lm-head {config.int4_lm_head!r} is not one of {', '.join(LM_HEAD_BITS)}")
    if config.int4_block not in (None, *BLOCK_SIZES):
        raise InputError(f"--int4-block {config.int4_block!r} is not one of {', '.join(map(str, BLOCK_SIZES))}")
    if config.decoder_recipe != "weight-only":
        raise InputError(f"--decoder-recipe {config.decoder_recipe} is an INT8 recipe; int4 decoders are weight-only")


def export_inplace_source(ck, staging: Path, backend: str, progress: Progress,
                          quantized: Quantized | None = None) -> GraphEntry | None:
    """The fp32 source of ONNX Runtime's decoder variants (None when the build is not for ONNX Runtime): the in-place
    decoder built from the weights (graphs_gqa.py, ORT_DECODER_FORM), for both decoder families; with `quantized`,
    that variant itself, written straight from the weights."""
    if backend != "onnxruntime":
        return None
    from .bundle import with_hashes
    from .graphs_gqa import build_gqa_decoder

    what = f"{quantized.recipe}, straight from the weights" if quantized else "fp32"
    form = ORT_DECODER_FORM
    with step(progress, f"building the decoder with stacked-group attention and an in-place KV cache (for ONNX "
                        f"Runtime; {what})"):
        if quantized is None:
            return build_gqa_decoder(ck.model, ck.spec, staging / INPLACE_FILE, form=form, kv_dtype=ORT_KV_DTYPE)
        return with_hashes(quantized.entry(build_gqa_decoder(ck.model, ck.spec, staging / quantized.file,
                                                             quantized.make, form, ORT_KV_DTYPE)), staging)


def int4_steps(inplace: GraphEntry | None, lm_head: str | None = None, block: int | None = None) -> list[tuple]:
    """quantize_bundle steps (source, file, recipe, backends, make) for an INT4 decoder."""
    from vl_export.calibration import int4

    lm_head = lm_head or INT4_LM_HEAD
    b, search = block or INT4_BLOCK_SIZE, INT4_SCALE_SEARCH
    scales = "-mse" if search else ""
    steps = [("decoder", "decoder.int4.onnx", f"weight-only-int4-block{b}{scales}", None,
              partial(int4.blocked_qdq, block_size=b, search=search))]
    if inplace is not None:
        steps.append((INPLACE, "decoder.ort-int4.onnx",
                      f"matmul-nbits-int4-block{b}{scales}-level{INT4_ACCURACY_LEVEL}-lm-head-{INT4_HEAD_RECIPES[lm_head]}",
                      ("onnxruntime",), partial(int4.matmul_nbits, block_size=b, accuracy_level=INT4_ACCURACY_LEVEL,
                                                search=search, lm_head=lm_head)))
    return steps
