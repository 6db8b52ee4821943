"""Session fixtures: one tiny model in both layouts, and the bundles exported from it."""

from __future__ import annotations

import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    from tiny_models import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def bundle_fp32(tiny, tmp_path_factory):
    from vl_export.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "fp32"
    export_bundle(str(tiny["original"]), out, precision="fp32", progress=lambda _: None)
    return out


@pytest.fixture(scope="session")
def bundle_fp16(tiny, tmp_path_factory):
    from vl_export.export.bundle import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "fp16"
    export_bundle(str(tiny["original"]), out, precision="fp16", progress=lambda _: None)
    return out


@pytest.fixture(scope="session")
def bundle_gqa(tiny, bundle_fp32, tmp_path_factory):
    from tiny_models import add_gqa_decoder

    return add_gqa_decoder(tiny["original"], bundle_fp32, tmp_path_factory.mktemp("bundles") / "gqa")


@pytest.fixture(scope="session")
def bundle_stacked(tiny, bundle_fp32, tmp_path_factory):
    from tiny_models import add_gqa_decoder

    return add_gqa_decoder(tiny["original"], bundle_fp32, tmp_path_factory.mktemp("bundles") / "stacked", "stacked")


@pytest.fixture(scope="session")
def bundle_stacked_fp16(tiny, bundle_fp32, tmp_path_factory):
    """bundle_fp32 with the stacked-group decoder on an fp16 KV cache (as builds ship their quantized decoders)."""
    from tiny_models import add_gqa_decoder

    return add_gqa_decoder(tiny["original"], bundle_fp32, tmp_path_factory.mktemp("bundles") / "stacked-fp16", "stacked",
                           "float16")


@pytest.fixture(scope="session")
def internlm2_stacked_bundles(internlm2_gqa_bundles):
    """The InternLM2 tiny model's fp32 bundle, and that bundle with the stacked-group decoder."""
    from tiny_models import add_gqa_decoder

    fp32 = internlm2_gqa_bundles[0]
    root = fp32.parent
    return fp32, add_gqa_decoder(root / "original", fp32, root / "stacked", "stacked")


@pytest.fixture(scope="session")
def internlm2_gqa_bundles(tmp_path_factory):
    """An InternLM2 tiny model (the 2B's decoder family): its fp32 bundle, and that bundle with the GQA decoder."""
    from tiny_models import TINY_INTERNLM2_LLM, add_gqa_decoder, make_tiny, member_config

    from vl_export.export.bundle import export_bundle

    root = tmp_path_factory.mktemp("internlm2-gqa")
    tiny = make_tiny(root, member_config(llm=TINY_INTERNLM2_LLM), native=False)
    export_bundle(str(tiny["original"]), root / "fp32", precision="fp32", progress=lambda _: None)
    return root / "fp32", add_gqa_decoder(tiny["original"], root / "fp32", root / "gqa")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """random:<preset> checkpoints go to a per-session cache, never the user's."""
    os.environ["VL_EXPORT_CACHE"] = str(tmp_path_factory.mktemp("vl-export-cache"))
