"""`vl-export verify` passes good bundles and names the stage of a broken one; `vl-export bench` reports every figure."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from vl_export.cli import main
from vl_export.export.verify import THRESHOLDS, verify_bundle
from vl_export.files import file_sha256
from vl_export.manifest import Manifest


@pytest.fixture(scope="module")
def reference(tiny):
    from vl_export.export.reference import Reference

    return Reference(str(tiny["original"]))


def stage_rows(report, stage):
    return [r for r in report["stages"] if r["stage"] == stage]


@pytest.mark.parametrize("fixture", ["bundle_fp32", "bundle_fp16"])
def test_verify_passes_good_bundles(request, tiny, reference, fixture):
    bundle = request.getfixturevalue(fixture)
    report = verify_bundle(bundle, str(tiny["original"]), new_tokens=12, reference=reference, progress=lambda _: None)
    assert report["passed"], [r for r in report["stages"] if not r["pass"]]
    assert report["precision"] == fixture.split("_")[1]
    assert {r["stage"] for r in report["stages"]} == {
        "pixel_values", "prompt_ids", "vision_features", "image_embeds", "inputs_embeds", "prefill_logits",
        "teacher_forced_top1", "greedy"}
    assert len(report["cases"]) == 4  # two built-in images x two prompts
    assert stage_rows(report, "pixel_values")[0]["value"] <= 1e-6


def perturbed_copy(bundle, tmp_path):
    broken = shutil.copytree(bundle, tmp_path / "broken")
    model = onnx.load(str(broken / "projector.onnx"))
    biggest = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    weights = numpy_helper.to_array(biggest)
    noise = np.random.default_rng(0).standard_normal(weights.shape).astype(weights.dtype) * weights.std()
    biggest.CopyFrom(numpy_helper.from_array(weights + noise, biggest.name))
    onnx.save(model, str(broken / "projector.onnx"))
    # Hashed again: a bundle whose files are what its manifest says, yet wrong (a bad export), is verify's to catch;
    # a file changed behind the manifest's back is refused at load (tests/test_untrusted_bundle.py).
    manifest = Manifest.load(broken)
    manifest.graphs = [dataclasses.replace(g, sha256=file_sha256(broken / g.file)) if g.file == "projector.onnx" else g
                       for g in manifest.graphs]
    manifest.save(broken)
    return broken


def test_verify_fails_a_perturbed_projector_at_the_image_embeds(capsys, tiny, bundle_fp32, tmp_path):
    broken = perturbed_copy(bundle_fp32, tmp_path)
    code = main(["verify", "--bundle", str(broken), "--model", str(tiny["original"]), "--new-tokens", "8",
                 "--json", str(tmp_path / "report.json")])
    captured = capsys.readouterr()
    assert code == 1
    assert "vl-export: error: the bundle does not match the reference" in captured.err
    report = json.loads((tmp_path / "report.json").read_text())
    failed = {r["stage"] for r in report["stages"] if not r["pass"]}
    assert "image_embeds" in failed and "vision_features" not in failed and "pixel_values" not in failed
    assert "| image_embeds | cosine |" in captured.out and "FAILED: " in captured.out
    assert stage_rows(report, "vision_features")[0]["value"] >= THRESHOLDS["fp32"].feature_cosine


def test_verify_threshold_overrides_and_usage_errors(capsys, tiny, bundle_fp32):
    code = main(["verify", "--bundle", str(bundle_fp32), "--model", str(tiny["original"]), "--threshold", "speed=3"])
    assert code == 2 and "unknown threshold 'speed'" in capsys.readouterr().err


def test_bench_reports_every_figure_and_ratios(capsys, tiny, bundle_fp32, tmp_path):
    out = tmp_path / "bench.json"
    code = main(["bench", "--bundle", str(bundle_fp32), "--reference", str(tiny["original"]), "--tiles", "1,3",
                 "--new-tokens", "8", "--runs", "1", "--threads", "1", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert len(report["ours"]) == 1 and report["ours"][0]["bundle"] == str(bundle_fp32)
    for figures in (report["ours"][0], report["pytorch"]):
        for stat in (figures["vision_ms_per_tile"], figures["projector_ms_per_tile"], *figures["decode_tokens_per_s"].values()):
            assert stat["median"] > 0 and stat["min"] <= stat["median"] <= stat["max"]
        # decode after each stated context: the short text prompt and each tile count's prompt
        assert set(figures["decode_tokens_per_s"]) == {"text", "1", "3"}
        assert figures["decode_context_tokens"]["3"] == figures["prompt_tokens"]["3"]
        assert figures["decode_context_tokens"]["text"] < figures["prompt_tokens"]["1"]
        assert set(figures["ttft_ms"]) == {"1", "3"} and all(v["median"] > 0 for v in figures["ttft_ms"].values())
        assert figures["peak_rss_mib"] > 0 and figures["model_bytes"] > 0
        assert figures["prompt_tokens"]["3"] == figures["prompt_tokens"]["1"] + 2 * 256  # two more tiles
    ours = report["ours"][0]
    assert ours["prompt_tokens"] == report["pytorch"]["prompt_tokens"]
    r = report["ratios"][0]
    assert r["vision_speedup"] == pytest.approx(
        report["pytorch"]["vision_ms_per_tile"]["median"] / ours["vision_ms_per_tile"]["median"])
    assert r["decode_speedup_3"] == pytest.approx(
        ours["decode_tokens_per_s"]["3"]["median"] / report["pytorch"]["decode_tokens_per_s"]["3"]["median"])
    assert ours["memory_bandwidth_gb_s"] > 0 and ours["decoder_weight_bytes"] > 0
    assert "weights-read bound" in capsys.readouterr().out
    assert {"ttft_speedup_1_tiles", "ttft_speedup_3_tiles", "peak_rss_ratio", "projector_speedup"} <= set(r)
