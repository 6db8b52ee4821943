"""Timing a bundle on one backend: vision per tile, projector, time to first token per tile count, decode speed.

Run as `python -m vl_export.runtime.bench ...` by `vl-export bench`, one process per side, so that the peak
resident memory of each side is its own; prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from vl_export.errors import InputError

from .pipeline import Pipeline
from .preprocess import TilingConfig, preprocess
from .sampling import GenerationConfig

QUESTION = "Describe the image in detail."
# The short text prompt decode is measured after: 150 tokens with InternVL2.5-1B's template and system message.
TEXT_QUESTION = "Write a short story about a lighthouse keeper who finds a message in a bottle."
TEXT_CONTEXT = "text"


def summary(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "runs": len(samples)}


def timed(fn: Callable[[], object], runs: int, warmup: int = 1) -> list[float]:
    """Milliseconds per call over `runs` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return samples


def image_with_tiles(tiles: int, tiling: TilingConfig = TilingConfig()) -> Image.Image:
    """A random image whose dynamic tiling gives exactly `tiles` tiles (thumbnail included)."""
    size = tiling.image_size
    if tiles == 1:
        cols = rows = 1
    else:
        grids = [(c, (tiles - 1) // c) for c in range(1, tiles) if (tiles - 1) % c == 0 and c >= (tiles - 1) // c]
        if not grids or tiles - 1 > tiling.max_tiles:
            raise ValueError(f"no grid gives {tiles} tiles with max {tiling.max_tiles}")
        cols, rows = min(grids, key=lambda g: g[0] - g[1])
    pixels = np.random.default_rng(tiles).integers(0, 256, (rows * size, cols * size, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    got = len(preprocess(image, tiling))
    if got != tiles:
        raise ValueError(f"a {cols}x{rows} image tiles into {got}, not {tiles}")
    return image


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not getrusage: exec keeps the parent's high-water mark there."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux; includes the parent on macOS


def bench_bundle(bundle: Path, tiles: list[int], new_tokens: int, runs: int, backend: str = "onnxruntime",
                 **backend_options) -> dict:
    pipe = Pipeline.from_bundle(bundle, backend=backend, **backend_options)
    one_tile = preprocess(image_with_tiles(1), pipe.tiling)  # (1, 3, 448, 448)
    features = pipe.vision.run({"pixel_values": one_tile})["vision_features"]
    result = {
        "side": "ours",
        "backend": pipe.backend.describe(),
        "precision": {g.role: g.precision for g in pipe.manifest.graphs},
        "vision_ms_per_tile": summary(timed(lambda: pipe.vision.run({"pixel_values": one_tile}), runs)),
        "projector_ms_per_tile": summary(timed(lambda: pipe.projector.run({"vision_features": features}), runs)),
        "ttft_ms": {},
        "prompt_tokens": {},
    }
    first_token = GenerationConfig(max_new_tokens=1)
    for count in tiles:
        image = image_with_tiles(count, pipe.tiling)
        samples = []
        for i in range(runs + 1):  # the first is the warm-up
            r = pipe.chat(QUESTION, images=image, generation=first_token)
            if i:
                samples.append(r.timings.ttft_ms)
        result["ttft_ms"][str(count)] = summary(samples)
        result["prompt_tokens"][str(count)] = r.timings.prompt_tokens
    # Decode after each stated context: the short text prompt, then each tile count's image prompt.
    decode = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    result["decode_tokens_per_s"], result["decode_context_tokens"] = {}, {}
    for context in [TEXT_CONTEXT, *map(str, tiles)]:
        question, images = (TEXT_QUESTION, None) if context == TEXT_CONTEXT else (QUESTION, image_with_tiles(int(context), pipe.tiling))
        done = [pipe.chat(question, images=images, generation=decode).timings for _ in range(runs + 1)][1:]
        result["decode_tokens_per_s"][context] = summary([t.decode_tokens_per_s for t in done])
        result["decode_context_tokens"][context] = done[0].prompt_tokens
    result["new_tokens"] = new_tokens
    result["model_bytes"] = sum(f.stat().st_size for f in bundle.iterdir() if f.suffix in (".onnx", ".data", ".npy"))
    result["decoder_weight_bytes"] = graph_bytes(bundle, pipe.manifest.graph("decoder", pipe.backends["decoder"].name).file)
    result["peak_rss_mib"] = peak_rss_mib()  # before the triad, whose three 128 MiB arrays are not the model's
    result["memory_bandwidth_gb_s"] = triad_bandwidth_gb_s(options_threads(backend_options))
    return result


def graph_bytes(bundle: Path, file: str) -> int:
    """Bytes of one graph's file and its external data: what a decode step reads once (weights dominate it)."""
    return sum(f.stat().st_size for f in bundle.glob(file + "*"))


def options_threads(options: dict) -> int:
    return int(options.get("threads") or os.cpu_count() or 1)


def triad_bandwidth_gb_s(threads: int, mib: int = 128, runs: int = 5) -> float:
    """STREAM's triad, a = b + s*c, over three arrays of `mib` MiB each (far beyond any cache), on `threads`
    threads (numpy releases the GIL). Each thread works in chunks small enough that the intermediate s*c stays in
    its cache, so memory sees STREAM's traffic: read b and c, write a. Best of `runs`, in GB/s (1e9 bytes)."""
    n = mib * 2**20 // 8
    a, b, c = np.zeros(n), np.ones(n), np.full(n, 2.0)
    chunk = 32 * 1024  # 256 KiB of float64
    bounds = np.linspace(0, n, threads + 1).astype(int)

    def work(lo: int, hi: int) -> None:
        for start in range(lo, hi, chunk):
            end = min(start + chunk, hi)
            np.multiply(c[start:end], 3.0, out=a[start:end])
            np.add(a[start:end], b[start:end], out=a[start:end])

    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(runs):
            start = time.perf_counter()
            list(pool.map(work, bounds[:-1], bounds[1:]))
            best = min(best, time.perf_counter() - start)
    return 3 * n * 8 / best / 1e9


def parse_options(pairs: list[str]) -> dict:
    """`key=value` backend options; integers become ints."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"backend option {pair!r} is not key=value")
        options[key.replace("-", "_")] = int(value) if value.isdigit() else value
    return options


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vl_export.runtime.bench")
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tiles", default="1,7")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--option", action="append", default=[], help="backend option key=value")
    args = parser.parse_args(argv)
    options = {"threads": args.threads} if args.threads else {}
    options.update(parse_options(args.option))
    tiles = [int(t) for t in args.tiles.split(",")]
    print(json.dumps(bench_bundle(Path(args.bundle), tiles, args.new_tokens, args.runs, args.backend, **options)))


if __name__ == "__main__":
    main()
