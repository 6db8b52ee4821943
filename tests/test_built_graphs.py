"""The decoder, vision encoder and projector built from the weights (export/graphs_portable.py) against what they
replace: torch.onnx's export of graphs.Decoder / graphs.VisionEncoder / graphs.Projector, and those wrappers run in
torch. Both decoder families
(Qwen2 with q/k/v biases, InternLM2 without), both vision encoders (InternViT-300M: LayerNorm, qkv bias;
InternViT-6B: RMSNorm, q/k norm, no bias), fp32 and fp16; the decoder with a past, a left-padded row and two logits
positions per row."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from vl_export.export.bundle import load_checkpoint
from vl_export.export.graphs import Decoder, Projector, VisionEncoder
from vl_export.export.onnx_export import export_graph, graph_io


@pytest.fixture(scope="module")
def members(tiny, tmp_path_factory):
    """Checkpoints: the session's tiny model (Qwen2 + InternViT-300M) and InternLM2 + InternViT-6B."""
    from tiny_models import TINY_INTERNLM2_LLM, TINY_INTERNVIT_6B, make_tiny, member_config

    other = make_tiny(tmp_path_factory.mktemp("internlm2-vit6b"), member_config(TINY_INTERNVIT_6B, TINY_INTERNLM2_LLM),
                      native=False)
    return {"qwen2+vit300m": tiny["original"], "internlm2+vit6b": other["original"]}


def _feeds(role: str, spec, precision: str) -> dict[str, np.ndarray]:
    inputs = graph_io(role, spec, precision)[0]
    rng = np.random.default_rng(7)
    if role in ("vision_encoder", "projector"):
        return {inputs[0].name: rng.standard_normal((2, *inputs[0].shape[1:])).astype(np.float32)}
    # Two rows after a 3-position past: the first left-padded (its first key masked), logits at two positions.
    t = spec.text
    feeds = {"inputs_embeds": rng.standard_normal((2, 5, t.hidden_size)).astype(np.float32),
             "attention_mask": np.array([[0] + [1] * 7, [1] * 8], np.int64),
             "position_ids": np.array([[2, 3, 4, 5, 6], [3, 4, 5, 6, 7]], np.int64),
             "logits_positions": np.array([[3, 4], [0, 4]], np.int64)}
    for t_in in inputs[4:]:
        feeds[t_in.name] = rng.standard_normal((2, t.num_kv_heads, 3, t.head_dim)).astype(t_in.dtype)
    return feeds


def _run(path, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [o.name for o in session.get_outputs()], session.run(None, feeds)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("member", ["qwen2+vit300m", "internlm2+vit6b"])
@pytest.mark.parametrize("role", ["decoder", "vision_encoder", "projector"])
def test_built_graph_is_the_exported_graph(members, tmp_path, role, member, precision):
    """Same inputs, outputs, dtypes and names as torch.onnx's export, and the same outputs to within float rounding
    (measured: equal to the bit on these feeds); the torch wrapper agrees within fp32 rounding (fp32) or fp16
    rounding of the matmuls (fp16)."""
    import onnx

    paths = {}
    for how in ("built", "exported"):
        ck = load_checkpoint(str(members[member]), lambda _: None)
        (tmp_path / how).mkdir()
        entry = export_graph(role, ck.model, ck.spec, precision, tmp_path / how, torch_exporter=how == "exported")
        paths[how] = tmp_path / how / entry.file
    graphs = {how: onnx.load(str(p)).graph for how, p in paths.items()}
    assert [(v.name, v.type) for v in graphs["built"].input] == [(v.name, v.type) for v in graphs["exported"].input]
    assert [(v.name, v.type) for v in graphs["built"].output] == [(v.name, v.type) for v in graphs["exported"].output]
    feeds = _feeds(role, ck.spec, precision)
    names, built = _run(paths["built"], feeds)
    _, exported = _run(paths["exported"], feeds)
    for name, got, want in zip(names, built, exported):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 if precision == "fp32" else 2e-3, err_msg=name)

    ck = load_checkpoint(str(members[member]), lambda _: None)
    ck.model.float()
    dtype = torch.float16 if precision == "fp16" else torch.float32
    wrapper = {"decoder": Decoder, "vision_encoder": VisionEncoder, "projector": Projector}[role](ck.model, ck.spec, dtype).eval()
    with torch.no_grad():
        torch_out = wrapper(*[torch.from_numpy(feeds[n]) for n in feeds])
    torch_out = [t.float().numpy() for t in (torch_out if isinstance(torch_out, tuple) else (torch_out,))]
    scale = float(np.abs(torch_out[0]).max())
    assert scale > 0.1  # outputs that say something
    limit = 1e-5 if precision == "fp32" else 2e-2  # fp16: torch's and ONNX Runtime's fp16 matmuls round apart
    for got, want in zip(built, torch_out):
        assert float(np.abs(got.astype(np.float32) - want).max()) <= limit * max(1.0, scale)


def _same_file_content(a, b) -> None:
    """Two ONNX files that hold the same model: nodes, initializers (in order, byte for byte), value types, the rest."""
    import onnx

    a, b = onnx.load(str(a)), onnx.load(str(b))
    assert [n.SerializeToString() for n in a.graph.node] == [n.SerializeToString() for n in b.graph.node]
    assert [t.name for t in a.graph.initializer] == [t.name for t in b.graph.initializer]
    assert all(x.SerializeToString() == y.SerializeToString() for x, y in zip(a.graph.initializer, b.graph.initializer))
    assert [v.SerializeToString() for v in a.graph.value_info] == [v.SerializeToString() for v in b.graph.value_info]
    a.graph.ClearField("initializer")
    b.graph.ClearField("initializer")
    assert a.SerializeToString() == b.SerializeToString()


@pytest.mark.parametrize("member", ["qwen2+vit300m", "internlm2+vit6b"])
def test_decoders_quantized_as_they_are_built_are_the_quantizers_files(members, tmp_path, member):
    """A build writes its calibration-free INT8 decoders straight from the weights (decoder_variants.Quantized): the
    files are those the quantizers make from the written fp32 graphs, byte for byte."""
    from vl_export.calibration import quantize
    from vl_export.export.decoder_variants import ort_int8, ort_int8_from_file, weight_only_int8
    from vl_export.export.graphs_gqa import build_gqa_decoder

    ck = load_checkpoint(str(members[member]), lambda _: None, stored_dtype=True)
    export_graph("decoder", ck.model, ck.spec, "fp32", tmp_path)
    quantize.weight_only_int8(tmp_path / "decoder.onnx", tmp_path / "from-file.int8.onnx")
    entry = export_graph("decoder", ck.model, ck.spec, "fp32", tmp_path, quantized=weight_only_int8())
    assert (entry.file, entry.precision, entry.recipe) == ("decoder.int8.onnx", "int8", "weight-only-int8")
    _same_file_content(tmp_path / "from-file.int8.onnx", tmp_path / entry.file)

    build_gqa_decoder(ck.model, ck.spec, tmp_path / "gqa.onnx", form="stacked")
    layers = ck.spec.text.num_layers
    for kind, recipe, nbits in (("matmul-nbits", "matmul-nbits-int8-block128-level4", 5 * layers + 1),
                                ("dynamic", "dynamic-int8-w7-lm-head-nbits8-block128", 1)):  # 1: the lm_head
        ort_int8_from_file(kind)[1](tmp_path / "gqa.onnx", tmp_path / f"gqa-from-file-{kind}.int8.onnx")
        made = ort_int8(kind)
        entry = made.entry(build_gqa_decoder(ck.model, ck.spec, tmp_path / made.file, made.make, "stacked"))
        assert (entry.precision, entry.recipe, entry.backends, entry.form) == ("int8", recipe, ("onnxruntime",), "stacked")
        assert [n.op_type for n in onnx.load(str(tmp_path / made.file)).graph.node].count("MatMulNBits") == nbits
        _same_file_content(tmp_path / f"gqa-from-file-{kind}.int8.onnx", tmp_path / made.file)
