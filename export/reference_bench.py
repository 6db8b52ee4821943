"""Timing the PyTorch reference (transformers, eager mode, fp32) the way `vl-export bench` times a bundle.

Run as `python -m vl_export.export.reference_bench ...` in its own process; prints one JSON object with the
same fields as vl_export.runtime.bench.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from vl_export.runtime.bench import QUESTION, TEXT_CONTEXT, TEXT_QUESTION, image_with_tiles, peak_rss_mib, summary, timed
from vl_export.runtime.preprocess import TilingConfig

from .reference import Reference


def bench_reference(model: str, tiles: list[int], new_tokens: int, runs: int, threads: int | None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    ref = Reference(model, attention="sdpa")  # transformers' default, what a user of PyTorch gets
    m = ref.model.model
    tiling = TilingConfig(ref.spec.image_size, 1, ref.spec.max_dynamic_patch, ref.spec.use_thumbnail)
    one_tile, _ = ref.pixel_values([image_with_tiles(1, tiling)])

    def projector_input() -> torch.Tensor:
        features = m.vision_tower(pixel_values=one_tile).last_hidden_state[:, 1:, :]
        side = int(features.shape[1] ** 0.5)
        shuffled = m.pixel_shuffle(features.reshape(1, side, side, -1), scale_factor=m.config.downsample_ratio)
        return shuffled.reshape(1, -1, shuffled.shape[-1])

    with torch.no_grad():
        shuffled = projector_input()
        result = {
            "side": "pytorch",
            "backend": {"backend": "pytorch-eager", "torch": torch.__version__, "threads": torch.get_num_threads()},
            "vision_ms_per_tile": summary(timed(lambda: m.vision_tower(pixel_values=one_tile), runs)),
            "projector_ms_per_tile": summary(timed(lambda: m.multi_modal_projector(shuffled), runs)),
            "ttft_ms": {},
            "prompt_tokens": {},
        }
    def first_token(image) -> list[int]:  # preprocessing and tokenisation included, as in chat()
        pixel_values, counts = ref.pixel_values([image])
        return ref.generate(ref.prompt_ids(QUESTION, counts), pixel_values, 1)

    for count in tiles:
        image = image_with_tiles(count, tiling)
        result["ttft_ms"][str(count)] = summary(timed(lambda: first_token(image), runs))
        result["prompt_tokens"][str(count)] = len(ref.prompt_ids(QUESTION, [count]))
    result["decode_tokens_per_s"], result["decode_context_tokens"] = {}, {}
    for context in [TEXT_CONTEXT, *map(str, tiles)]:  # decode after each stated context, as runtime.bench does
        if context == TEXT_CONTEXT:
            pixel_values, ids = None, ref.prompt_ids(TEXT_QUESTION, [])
        else:
            pixel_values, counts = ref.pixel_values([image_with_tiles(int(context), tiling)])
            ids = ref.prompt_ids(QUESTION, counts)
        speeds = []
        for i in range(runs + 1):  # the first is the warm-up
            start = time.perf_counter()
            ref.generate(ids, pixel_values, 1)
            first = time.perf_counter() - start
            start = time.perf_counter()
            ref.generate(ids, pixel_values, new_tokens, ignore_eos=True)
            total = time.perf_counter() - start
            if i:
                speeds.append((new_tokens - 1) / max(total - first, 1e-9))
        result["decode_tokens_per_s"][context] = summary(speeds)
        result["decode_context_tokens"][context] = len(ids)
    result["new_tokens"] = new_tokens
    result["model_bytes"] = sum(p.numel() * p.element_size() for p in ref.model.parameters())
    result["peak_rss_mib"] = peak_rss_mib()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vl_export.export.reference_bench")
    parser.add_argument("--model", required=True)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tiles", default="1,7")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    tiles = [int(t) for t in args.tiles.split(",")]
    print(json.dumps(bench_reference(args.model, tiles, args.new_tokens, args.runs, args.threads)))


if __name__ == "__main__":
    main()
