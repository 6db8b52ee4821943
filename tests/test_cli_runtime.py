"""`vl-export run` and `vl-export chat` on a tiny bundle: the library's answer, printed as promised."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from vl_export.cli import main
from vl_export.runtime import GenerationConfig, Pipeline
from vl_export.runtime.interactive import chat_loop


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (600, 1000, 3), dtype=np.uint8)).save(path)
    return path


def test_run_json_is_one_line_with_the_pipeline_answer(capsys, bundle_fp32, picture):
    code = main(["run", "--bundle", str(bundle_fp32), "--image", str(picture), "--prompt", "Describe.",
                 "--max-new-tokens", "12", "--json"])
    out = capsys.readouterr().out
    assert code == 0 and out.count("\n") == 1
    data = json.loads(out)
    want = Pipeline.from_bundle(bundle_fp32).chat("Describe.", images=str(picture), generation=GenerationConfig(max_new_tokens=12))
    assert data["token_ids"] == want.token_ids and data["text"] == want.text
    assert data["timings"]["tiles"] == 7 and data["timings"]["vision_ms"] > 0 and data["timings"]["new_tokens"] == 12


def test_run_stream_prints_the_same_text(capsys, bundle_fp32, picture):
    main(["run", "--bundle", str(bundle_fp32), "--image", str(picture), "--prompt", "Describe.", "--max-new-tokens", "12"])
    plain = capsys.readouterr().out
    main(["run", "--bundle", str(bundle_fp32), "--image", str(picture), "--prompt", "Describe.", "--max-new-tokens", "12", "--stream"])
    streamed = capsys.readouterr().out
    assert streamed.strip() == plain.strip() and plain.strip()


def test_run_sampling_flags_and_seed(capsys, bundle_fp32, picture):
    args = ["run", "--bundle", str(bundle_fp32), "--image", str(picture), "--prompt", "Describe.", "--max-new-tokens", "16", "--json"]

    def ids(*extra):
        main(args + list(extra))
        return json.loads(capsys.readouterr().out)["token_ids"]

    greedy = ids()
    assert ids("--temperature", "1.3", "--seed", "3") == ids("--temperature", "1.3", "--seed", "3")
    assert ids("--temperature", "1.3", "--seed", "3") != greedy
    assert ids("--top-k", "1", "--seed", "9") == greedy  # top-k 1 is greedy


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image", "/nope/missing.png"], "image /nope/missing.png not found"),
        (["--backend", "fastest"], "unknown backend 'fastest'"),
        (["--max-new-tokens", "0"], "max_new_tokens must be at least 1"),
        (["--backend", "onnxruntime", "--device", "cuda"], "no CUDAExecutionProvider"),
    ],
)
def test_run_bad_input_is_one_line_exit_2(capsys, bundle_fp32, extra, message):
    code = main(["run", "--bundle", str(bundle_fp32), "--prompt", "Hi", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("vl-export: error:") and message in err and "\n" not in err


def test_run_missing_bundle(capsys, tmp_path):
    assert main(["run", "--bundle", str(tmp_path / "nothing"), "--prompt", "Hi"]) == 2
    assert capsys.readouterr().err.strip() == f"vl-export: error: bundle {tmp_path / 'nothing'} not found: no such directory"


def test_chat_keeps_history_and_images(bundle_fp32, picture):
    pipe = Pipeline.from_bundle(bundle_fp32)
    config = GenerationConfig(max_new_tokens=6)
    script = f"/image {picture}\nWhat is it?\nAnd the colour?\n/image /missing.png\n/exit\n"
    out = io.StringIO()
    assert chat_loop(pipe, config, stdin=io.StringIO(script), stdout=out) == 0
    first = pipe.chat("What is it?", images=[str(picture)], generation=config)
    second = pipe.chat("And the colour?", images=[str(picture)], history=first.history, generation=config)
    transcript = out.getvalue()
    assert "(image 1 attached)" in transcript
    assert f"> {first.text}\n" in transcript and f"> {second.text}\n" in transcript
    assert "error: image /missing.png not found" in transcript
