"""Paired per-step timing of ONNX Runtime's in-place decoder graphs, as the README's "The stacked decoder, measured"
table was made: every graph loaded at once, the prompt read through the runtime's own session (chunked where the
form reads in chunks), then rounds of decode steps stepped in turn, so a slow moment of the machine falls on every
graph alike. Random prompt embeddings: speed does not depend on the values.

The load order matters: on this VM a graph loaded first stepped up to 1-2 ms slower (of ~10) after 150 tokens than
the same graph loaded last (README, "INT8 decoder default and the fp16 KV cache"). So `time` runs twice, each in a
fresh process, the graphs loaded in the order given and then reversed, and reports both and their mean.

Make the graphs (each form and KV cache dtype; INT4, INT8 and INT8 dynamic, as builds quantize them) from a
checkpoint, then time them:

    python benchmarks/decoder_steps.py build --model random:internvl2_5-1b --out decoders
    python benchmarks/decoder_steps.py time --bundle bundles/1b-int4 decoders/gqa-int4.onnx decoders/stacked-int4.onnx \\
        --contexts 150,367,1903

`--bundle` is any bundle of the same model (for the decoder's dimensions); a file's form is the part of its name
before the first "-". A folder made by `python -m vl_export.export.genai_peer build` is stepped too, beside ours, as
onnxruntime-genai runs its graph (past and present bound to one buffer, GroupQueryAttention), fed fixed token ids:

    python benchmarks/decoder_steps.py time --bundle bundles/1b-int4 bundles/1b-int4/decoder.ort-int4.onnx genai-int4 \
        --contexts 67,1903
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def build(model: str, out: Path) -> None:
    from vl_export.calibration import int4
    from vl_export.export.bundle import load_checkpoint
    from vl_export.export.decoder_variants import INT4_BLOCK_SIZE, ort_int8
    from vl_export.export.graphs_gqa import KV_DTYPES, build_gqa_decoder

    out.mkdir(parents=True, exist_ok=True)
    ck = load_checkpoint(model, print, stored_dtype=True)
    for form, dtypes in KV_DTYPES.items():
        for kv in dtypes:
            name = form if kv == "float32" else f"{form}-fp16kv"
            build_gqa_decoder(ck.model, ck.spec, out / f"{name}-int8.onnx", ort_int8("matmul-nbits").make, form, kv)
            build_gqa_decoder(ck.model, ck.spec, out / f"{name}-int8dynamic.onnx", ort_int8("dynamic").make, form, kv)
            fp32 = out / f"{name}-fp32.onnx"
            build_gqa_decoder(ck.model, ck.spec, fp32, form=form, kv_dtype=kv)
            int4.matmul_nbits(fp32, out / f"{name}-int4.onnx", block_size=INT4_BLOCK_SIZE, lm_head="int4")
            for path in out.glob(f"{fp32.name}*"):
                path.unlink()
            print(f"built {name}", flush=True)


class GenaiGraph:
    """onnxruntime-genai's model.onnx stepped as its generator steps it: one (1, kv, capacity, d) buffer per KV tensor
    bound as past and present, an attention mask of the length so far, token ids in (the embeddings given are only
    counted: the graph embeds its own ids)."""

    def __init__(self, folder: Path, threads: int):
        import json

        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
        decoder = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
        self.layers, self.kv_heads = decoder["num_hidden_layers"], decoder["num_key_value_heads"]
        self.head_size = decoder["head_size"]
        self.past_len = 0

    def reset(self, batch: int, capacity: int) -> None:
        self.binding = self.session.io_binding()
        self.kv = [np.zeros((batch, self.kv_heads, capacity, self.head_size), np.float32)
                   for _ in range(2 * self.layers)]
        for i, buffer in enumerate(self.kv):
            name = f"{i // 2}.{('key', 'value')[i % 2]}"
            self.binding.bind_cpu_input(f"past_key_values.{name}", buffer)
            self.binding.bind_output(f"present.{name}", "cpu", 0, np.float32, list(buffer.shape), buffer.ctypes.data)
        self.past_len = 0

    def forward(self, inputs_embeds, attention_mask, position_ids, logits_positions) -> None:
        s = inputs_embeds.shape[1]
        self.past_len += s
        ids = (np.arange(s, dtype=np.int64)[None] * 7919) % 100_000  # as genai_peer.bench's fixed prompt
        self.binding.bind_cpu_input("input_ids", ids)
        self.binding.bind_cpu_input("attention_mask", np.ones((1, self.past_len), np.int64))
        self.binding.bind_output("logits")
        self.session.run_with_iobinding(self.binding)


def timed(bundle: Path, files: list[Path], contexts: list[int], rounds: int, steps: int, threads: int) -> dict:
    """{context: {name: (ms a step, median of the rounds; prefill s, best of 2)}}, the graphs loaded in `files`'
    order; each context's lines printed as it finishes."""
    import onnx

    from vl_export.export.graphs_inplace import inplace_io
    from vl_export.manifest import GraphEntry, Manifest
    from vl_export.runtime.backends.ort import OrtBackend

    spec = Manifest.load(bundle).model
    backend = OrtBackend(threads=threads, spin="decoder")
    names = [f.name if [g.name for g in files].count(f.name) == 1 else f"{f.parent.name}/{f.name}" for f in files]

    def opened(f: Path):
        cache = next(i for i in onnx.load(str(f), load_external_data=False).graph.input if i.name.startswith("past_"))
        fp16 = cache.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
        inputs, outputs = inplace_io(spec, "fp16" if fp16 else "fp32")  # fp16: the cache's dtype only
        return backend.open_decoder(f.parent, GraphEntry(role="decoder", file=f.name, precision="fp32", inputs=inputs,
                                                         outputs=outputs, form=_form(f), backends=("onnxruntime",)))

    decoders = {name: GenaiGraph(f, threads) if f.is_dir() else opened(f) for name, f in zip(names, files)}
    hidden = spec.text.hidden_size
    rng = np.random.default_rng(0)
    results = {}
    for context in contexts:
        prompt = (rng.standard_normal((1, context, hidden)) * 0.02).astype(np.float32)
        prefill = {name: [] for name in decoders}
        for _ in range(2):
            for name, d in decoders.items():
                d.reset(1, context + rounds * steps + 1)
                start = time.perf_counter()
                d.forward(prompt, np.ones((1, context), np.int64), np.arange(context)[None], np.array([[context - 1]]))
                prefill[name].append(time.perf_counter() - start)
        step = (rng.standard_normal((1, 1, hidden)) * 0.02).astype(np.float32)
        per_round = {name: [] for name in decoders}
        for _ in range(rounds):
            for name, d in decoders.items():
                times = []
                for _ in range(steps):
                    total = d.past_len + 1
                    start = time.perf_counter()
                    d.forward(step, np.ones((1, total), np.int64), np.array([[total - 1]]), np.zeros((1, 1), np.int64))
                    times.append(time.perf_counter() - start)
                per_round[name].append(float(np.median(times)) * 1e3)
        results[context] = {name: (float(np.median(per_round[name])), min(prefill[name])) for name in decoders}
        for name in decoders:
            rounds_ms = " ".join(f"{ms:.1f}" for ms in per_round[name])
            print(f"after {context} tokens: {name}: {np.median(per_round[name]):.2f} ms a step (rounds {rounds_ms}), "
                  f"prefill {min(prefill[name]):.2f} s", flush=True)
    return results


def both_orders(bundle: Path, files: list[Path], contexts: list[int], rounds: int, steps: int, threads: int) -> None:
    """timed() in a fresh process with the files in the given order, then reversed; each graph's mean of the two."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    runs = []
    for order in (files, files[::-1]):
        print(f"load order: {', '.join(str(f) for f in order)}", flush=True)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs.append(pool.submit(timed, bundle, order, contexts, rounds, steps, threads).result())
    print("both orders (given / reversed -> mean):")
    for context in contexts:
        for name, (ms, prefill) in runs[0][context].items():
            ms2, prefill2 = runs[1][context][name]
            print(f"after {context} tokens: {name}: {ms:.2f} / {ms2:.2f} -> {(ms + ms2) / 2:.2f} ms a step, "
                  f"prefill {prefill:.2f} / {prefill2:.2f} -> {(prefill + prefill2) / 2:.2f} s", flush=True)


def _form(f: Path) -> str:
    """A graph's form: the bundle's manifest says it for a bundle's own decoder, else the name's first part."""
    from vl_export.manifest import Manifest

    if (f.parent / "manifest.json").exists():
        entry = next((g for g in Manifest.load(f.parent).graphs if g.file == f.name), None)
        if entry is not None and entry.form:
            return entry.form
    return f.name.split("-")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build")
    b.add_argument("--model", required=True)
    b.add_argument("--out", type=Path, required=True)
    t = sub.add_parser("time")
    t.add_argument("--bundle", type=Path, required=True)
    t.add_argument("files", type=Path, nargs="+")
    t.add_argument("--contexts", default="150,367,1903")
    t.add_argument("--rounds", type=int, default=4)
    t.add_argument("--steps", type=int, default=32)
    t.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.command == "build":
        build(args.model, args.out)
    else:
        both_orders(args.bundle, args.files, [int(c) for c in args.contexts.split(",")], args.rounds, args.steps,
                    args.threads)


if __name__ == "__main__":
    main()
