"""Bad checkpoints and bad output paths: one clear line, exit 2, and never a half-written bundle."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

import vl_export
from vl_export.cli import main
from vl_export.errors import CheckpointError, UnsupportedConfigError
from vl_export.export import checkpoint
from vl_export.spec import ModelSpec


def run_cli(capsys, *argv) -> tuple[int, str]:
    """Exit code and the error line; progress lines may precede it, a traceback may not."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("vl-export: error:")]
    assert len(errors) == (1 if code else 0), err
    return code, errors[0] if errors else ""


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_weights(path, edit):
    from safetensors.torch import load_file, save_file

    state = load_file(path / "model.safetensors")
    edit(state)
    save_file(state, path / "model.safetensors")


def assert_nothing_written(parent, name="bundle"):
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith(name) or p.name.startswith(f".{name}")]
    assert leftovers == []


def test_missing_directory(capsys, tmp_path):
    code, err = run_cli(capsys, "export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "bundle"))
    assert code == 2
    assert "not found" in err and "nope" in err
    assert_nothing_written(tmp_path)


def test_non_internvl_config(capsys, tmp_path):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    code, err = run_cli(capsys, "export", "--model", str(tmp_path / "llama"), "--out", str(tmp_path / "bundle"))
    assert code == 2 and "not an InternVL checkpoint" in err and "LlamaForCausalLM" in err
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(ps_version="v1"), "ps_version 'v1'"),
        (lambda c: c.update(select_layer=-4), "select_layer -4"),
        (lambda c: c.update(template="internlm2-chat"), "template 'internlm2-chat'"),
        # InternLM2 decoders and InternViT-6B's RMSNorm are supported now (tests/test_family.py); other kinds are not.
        (lambda c: c["llm_config"].update(architectures=["Phi3ForCausalLM"], model_type="phi3"), "the language model is phi3"),
        (lambda c: c["vision_config"].update(norm_type="batch_norm"), "norm_type 'batch_norm'"),
        (lambda c: c["llm_config"].update(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope scaling 'dynamic'"),
    ],
)
def test_unsupported_variants_say_what_is_unsupported(tiny, edit, message):
    config = json.loads(json.dumps(tiny["config"]))
    edit(config)
    with pytest.raises(UnsupportedConfigError, match="unsupported InternVL variant") as info:
        ModelSpec.from_config(config)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("mlp1.1.weight"), "missing weight for model.multi_modal_projector.linear_1.weight"),
        (lambda s: s.update({"vision_model.encoder.layers.0.attn.q_norm.weight": torch.ones(32)}), "unexpected weight model.vision_tower.encoder.layer.0.attention.q_norm.weight"),
        (lambda s: s.update({"language_model.model.norm.weight": torch.ones(63)}), "model.language_model.norm.weight has shape (63,)"),
        (lambda s: s.update({"vision_model.encoder.layers.1.attn.qkv.weight": torch.ones(95, 32)}), "not a multiple of 3"),
    ],
)
def test_bad_state_dicts_are_refused_by_name(capsys, tiny, tmp_path, edit, message):
    bad = copy_checkpoint(tiny["original"], tmp_path / "bad")
    edit_weights(bad, edit)
    with pytest.raises(CheckpointError) as info:
        checkpoint.load(bad)
    assert message in str(info.value)
    code, err = run_cli(capsys, "export", "--model", str(bad), "--out", str(tmp_path / "bundle"))
    assert code == 2 and message in err
    assert_nothing_written(tmp_path)


def test_unwritable_output(capsys, tiny, tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    code, err = run_cli(capsys, "export", "--model", str(tiny["original"]), "--out", str(tmp_path / "a_file" / "bundle"))
    assert code == 2 and "cannot write to" in err


def test_existing_output_needs_overwrite(capsys, tiny, tmp_path):
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "keep.txt").write_text("user data")
    code, err = run_cli(capsys, "export", "--model", str(tiny["original"]), "--out", str(tmp_path / "bundle"))
    assert code == 2 and "already exists" in err
    assert (tmp_path / "bundle" / "keep.txt").read_text() == "user data"


def test_a_failure_mid_export_leaves_no_partial_bundle(tiny, tmp_path, monkeypatch):
    from vl_export.export import bundle, onnx_export

    real = onnx_export.export_graph

    def fail_on_decoder(role, *args, **kwargs):
        if role == "decoder":
            raise RuntimeError("simulated exporter crash")
        return real(role, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "export_graph", fail_on_decoder)
    with pytest.raises(RuntimeError, match="simulated"):
        bundle.export_bundle(str(tiny["original"]), tmp_path / "bundle", progress=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_hub_repo_id_resolves_from_the_local_cache(tiny, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub

    snapshot = tmp_path / "hub" / "models--OpenGVLab--InternVL2_5-Tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny["original"], snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert checkpoint.resolve("OpenGVLab/InternVL2_5-Tiny") == snapshot
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        checkpoint.resolve("OpenGVLab/InternVL2_5-1B")


def test_help_version_and_errors_without_traceback(tmp_path):
    exe = [sys.executable, "-m", "vl_export.cli"]
    version = subprocess.run([*exe, "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == f"vl-export {vl_export.__version__}"
    helped = subprocess.run([*exe, "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "export" in helped.stdout
    failed = subprocess.run([*exe, "export", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "b")],
                            capture_output=True, text=True)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines() == [f"vl-export: error: checkpoint {tmp_path / 'missing'} not found: no such directory"]
