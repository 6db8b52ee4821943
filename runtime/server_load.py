"""A bounded local load on `vl-export serve`: N clients, M requests, requests/s and latency percentiles.

    python -m vl_export.runtime.server_load --bundle B [--clients 4] [--requests 40] [--max-tokens 16] [--image 448x448]
    python -m vl_export.runtime.server_load --url http://127.0.0.1:8000 --model M ...

Without --url it serves the bundle in this process (one worker) on a free local port. Clients use only the
standard library, so the numbers are the server's, not a client library's.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def noise_png(size: str, seed: int = 0) -> bytes:
    import numpy as np
    from PIL import Image

    width, height = (int(v) for v in size.lower().split("x"))
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q% of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(len(ordered) * q / 100) - 1)]


def run_load(url: str, model: str, clients: int, requests: int, max_tokens: int, image: bytes | None) -> dict:
    content: list | str = "Describe the image." if image else "Tell me a story."
    if image:
        content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}},
                   {"type": "text", "text": content}]
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}).encode()

    def one(_) -> tuple[float, int]:
        request = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=600) as response:
            answer = json.load(response)
        return time.perf_counter() - start, answer["usage"]["completion_tokens"]

    one(None)  # warm-up, not counted
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall_s = time.perf_counter() - start
    latencies_ms = [seconds * 1000 for seconds, _ in results]
    return {"clients": clients, "requests": requests, "max_tokens": max_tokens, "image_bytes": len(image) if image else 0,
            "wall_s": round(wall_s, 3), "requests_per_s": round(requests / wall_s, 2),
            "completion_tokens_per_s": round(sum(t for _, t in results) / wall_s, 1),
            "p50_ms": round(percentile(latencies_ms, 50), 1), "p95_ms": round(percentile(latencies_ms, 95), 1),
            "mean_ms": round(statistics.fmean(latencies_ms), 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vl_export.runtime.server_load", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="serve this bundle in-process (when --url is not given)")
    parser.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--model", default=None, help="model id (default: the bundle directory's name)")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--threads", type=int, default=None, help="backend CPU threads (in-process server)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--image", default=None, help="send a noise PNG of this size, e.g. 448x448 (default: text only)")
    args = parser.parse_args(argv)
    image = noise_png(args.image) if args.image else None
    if args.url:
        report = run_load(args.url.rstrip("/"), args.model, args.clients, args.requests, args.max_tokens, image)
    else:
        from pathlib import Path

        from .pipeline import Pipeline
        from .server import BackgroundServer, ServerConfig

        if not args.bundle:
            parser.error("give --bundle or --url")
        model = args.model or Path(args.bundle).resolve().name
        options = {"threads": args.threads} if args.threads else {}
        pipe = Pipeline.from_bundle(args.bundle, backend=args.backend, **options)
        with BackgroundServer([pipe], ServerConfig(model, port=0, max_queue=max(16, args.clients))) as url:
            report = run_load(url, model, args.clients, args.requests, args.max_tokens, image)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
