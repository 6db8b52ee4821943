"""onnxruntime-genai's own INT4 build of the same language model, as a decode peer for `vl-export bench`.

`build`: the checkpoint's Qwen2 language model saved as a Hugging Face Qwen2ForCausalLM, then onnxruntime-genai's
model builder (`-p int4 -e cpu`: MatMulNBits weights, GroupQueryAttention with its KV cache). `bench` (run in its
own process by vl_export/bench.py): greedy decode after a prompt of the same length as ours, timed like ours:
(N - 1) / (time of the last token - time of the first).

    python -m vl_export.export.genai_peer build --model random:internvl2_5-1b --out genai-int4
    python -m vl_export.export.genai_peer build --model random:internvl2_5-1b --out genai-int4-b128 --block-size 128

`--block-size` passes the builder's own `--extra_options block_size=N` (its default is 32; ours is 128, README "INT4
blocks of 128"), so that the peer can be timed at our block size too.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vl_export.errors import BackendUnavailableError, VlExportError


def build(model: str, out: Path, precision: str = "int4", block_size: int | None = None) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from .bundle import load_checkpoint

    ck = load_checkpoint(model, lambda _: None)
    text = ck.model.config.text_config
    with tempfile.TemporaryDirectory(prefix="vl-export-genai-") as tmp:
        hf = Path(tmp) / "hf"
        lm = Qwen2ForCausalLM(Qwen2Config(**text.to_dict()))
        lm.model.load_state_dict(ck.model.model.language_model.state_dict())
        lm.lm_head.load_state_dict(ck.model.lm_head.state_dict())
        lm.to(torch.float32).save_pretrained(hf)
        del lm, ck
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out),
               "-p", precision, "-e", "cpu", "-c", str(Path(tmp) / "cache")]
        if block_size is not None:
            cmd += ["--extra_options", f"block_size={block_size}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise VlExportError(f"onnxruntime-genai's builder failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")


def bench(model_dir: Path, prompt_tokens: int, new_tokens: int, runs: int, threads: int | None) -> dict:
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise BackendUnavailableError("the onnxruntime-genai peer needs onnxruntime-genai installed") from None
    from vl_export.runtime.bench import peak_rss_mib, summary

    if threads:  # the builder writes no thread count; set it as ours is set
        path = model_dir / "genai_config.json"
        config = json.loads(path.read_text())
        config["model"]["decoder"].setdefault("session_options", {})["intra_op_num_threads"] = threads
        config["model"]["decoder"]["session_options"]["inter_op_num_threads"] = 1
        path.write_text(json.dumps(config, indent=2))
    model = og.Model(str(model_dir))
    vocab = json.loads((model_dir / "genai_config.json").read_text())["model"]["vocab_size"]
    ids = [(i * 7919) % min(vocab, 100_000) for i in range(prompt_tokens)]  # a fixed prompt of the stated length
    speeds = []
    for i in range(runs + 1):  # the first is the warm-up
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=prompt_tokens + new_tokens, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids)
        stamps = []
        while not generator.is_done() and len(stamps) < new_tokens:
            generator.generate_next_token()
            stamps.append(time.perf_counter())
        if i and len(stamps) > 1:
            speeds.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
        del generator
    return {"side": "onnxruntime-genai", "version": og.__version__, "prompt_tokens": prompt_tokens,
            "decode_tokens_per_s": summary(speeds), "new_tokens": new_tokens, "peak_rss_mib": peak_rss_mib(),
            "decoder_weight_bytes": sum(f.stat().st_size for f in model_dir.glob("*.onnx*"))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vl_export.export.genai_peer")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--block-size", type=int, choices=(16, 32, 64, 128, 256), default=None)
    p = sub.add_parser("bench")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--prompt-tokens", type=int, default=67)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.model, Path(args.out), block_size=args.block_size)
    else:
        print(json.dumps(bench(Path(args.model_dir), args.prompt_tokens, args.new_tokens, args.runs, args.threads)))


if __name__ == "__main__":
    main()
