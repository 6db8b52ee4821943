"""The portable decoder built from the weights (export/graphs_portable.py) against what it replaces: torch.onnx's
export of graphs.Decoder, and graphs.Decoder itself run in torch. Both decoder families (Qwen2 with q/k/v biases,
InternLM2 without), fp32 and fp16, a cache with a past, a left-padded row and two logits positions per row."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vl_export.export.bundle import load_checkpoint
from vl_export.export.graphs import Decoder
from vl_export.export.onnx_export import export_graph, graph_io


@pytest.fixture(scope="module")
def internlm2_tiny(tmp_path_factory):
    from tiny_models import TINY_INTERNLM2_LLM, make_tiny, member_config

    return make_tiny(tmp_path_factory.mktemp("internlm2-portable"), member_config(llm=TINY_INTERNLM2_LLM), native=False)


def _feeds(spec, precision: str) -> dict[str, np.ndarray]:
    """Two rows after a 3-position past: the first left-padded (its first key masked), logits at two positions."""
    t = spec.text
    inputs = graph_io("decoder", spec, precision)[0]
    rng = np.random.default_rng(7)
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


@pytest.mark.parametrize("member, precision", [("qwen2", "fp32"), ("qwen2", "fp16"), ("internlm2", "fp32"),
                                               ("internlm2", "fp16")])
def test_built_decoder_is_the_exported_decoder(tiny, internlm2_tiny, tmp_path, member, precision):
    """Same inputs, outputs, dtypes and names as torch.onnx's export of graphs.Decoder, and the same outputs to within
    float rounding (measured: equal to the bit on these feeds); graphs.Decoder in torch agrees within fp32 rounding
    (fp32) or fp16 rounding of the matmuls (fp16)."""
    import onnx

    ck_dir = (tiny if member == "qwen2" else internlm2_tiny)["original"]
    paths = {}
    for how in ("built", "exported"):
        ck = load_checkpoint(str(ck_dir), lambda _: None)
        (tmp_path / how).mkdir()
        export_graph("decoder", ck.model, ck.spec, precision, tmp_path / how, torch_exporter=how == "exported")
        paths[how] = tmp_path / how / "decoder.onnx"
    graphs = {how: onnx.load(str(p)).graph for how, p in paths.items()}
    assert [(v.name, v.type) for v in graphs["built"].input] == [(v.name, v.type) for v in graphs["exported"].input]
    assert [(v.name, v.type) for v in graphs["built"].output] == [(v.name, v.type) for v in graphs["exported"].output]
    feeds = _feeds(ck.spec, precision)
    names, built = _run(paths["built"], feeds)
    _, exported = _run(paths["exported"], feeds)
    assert names[0] == "logits" and len(names) == 1 + 2 * ck.spec.text.num_layers
    for name, got, want in zip(names, built, exported):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 if precision == "fp32" else 2e-3, err_msg=name)

    ck = load_checkpoint(str(ck_dir), lambda _: None)
    ck.model.float()
    dtype = torch.float16 if precision == "fp16" else torch.float32
    with torch.no_grad():
        torch_out = Decoder(ck.model, ck.spec, dtype).eval()(*[torch.from_numpy(feeds[n]) for n in feeds])
    logits = torch_out[0].numpy()
    scale = float(np.abs(logits).max())
    assert scale > 0.1  # logits that say something
    limit = 1e-5 if precision == "fp32" else 2e-2  # fp16: torch's and ONNX Runtime's fp16 matmuls round apart
    assert float(np.abs(built[0] - logits).max()) <= limit * scale
    for got, want in zip(built[1:], torch_out[1:]):
        assert float(np.abs(got.astype(np.float32) - want.float().numpy()).max()) <= limit * max(1.0, scale)
