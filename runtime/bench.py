"""Timing a bundle on one backend: vision per tile, projector, time to first token per tile count, decode speed.

Run as `python -m vl_export.runtime.bench ...` by `vl-export bench`, one process per side, so that the peak
resident memory of each side is its own; prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from vl_export.errors import InputError

from .pipeline import Pipeline
from .preprocess import TilingConfig, preprocess
from .sampling import GenerationConfig

QUESTION = "Describe the image in detail."


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
    decode = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    image = image_with_tiles(1, pipe.tiling)
    speeds = [pipe.chat(QUESTION, images=image, generation=decode).timings.decode_tokens_per_s for _ in range(runs + 1)][1:]
    result["decode_tokens_per_s"] = summary(speeds)
    result["new_tokens"] = new_tokens
    result["model_bytes"] = sum(f.stat().st_size for f in bundle.iterdir() if f.suffix in (".onnx", ".data", ".npy"))
    result["peak_rss_mib"] = peak_rss_mib()
    return result


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
