"""Aggregate throughput of the Ray Serve application: 1 replica x 2 threads vs 2 replicas x 1 thread, at 4 and 8
concurrent clients, in one run on one local Ray cluster. Each client holds its own conversation about its own
image (so the cache-affine router spreads them by key), streams every answer, and sends `--rounds` rounds (each
later round carries a fixed plain-text answer as history: the random-weight models' own answers do not survive
detokenize -> tokenize).

    python benchmarks/serve_replicas.py --bundle BUNDLE [--clients 4,8] [--rounds 3] [--max-tokens 32]

Prints one JSON line per (layout, clients): completion tokens/s over the wall time, p50/p95 time to first token.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from vl_export.runtime.bench_serve import PLAIN_ANSWER
from vl_export.runtime.openai_schema import Limits
from vl_export.runtime.ray_config import AppSettings, ScaleSettings
from vl_export.runtime.replica import ReplicaSettings
from vl_export.runtime.server import ServerConfig
from vl_export.runtime.server_load import noise_png, percentile

LAYOUTS = {"1 replica x 2 threads": (1, 2), "2 replicas x 1 thread": (2, 1)}


def conversation(url: str, model: str, image: bytes, rounds: int, max_tokens: int) -> list[tuple[float, int]]:
    """(seconds to first token, completion tokens) per round of one client's conversation."""
    import base64

    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}},
        {"type": "text", "text": "Describe the image."}]}]
    out = []
    for i in range(rounds):
        start, first, text, tokens = time.perf_counter(), None, "", 0
        for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, stream=True,
                                                    stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter() - start
            text += "".join(c.delta.content or "" for c in chunk.choices)
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        out.append((first if first is not None else time.perf_counter() - start, tokens))
        # The random-weight benchmark models answer in placeholder tokens whose text re-tokenizes ~14x longer; a
        # plain answer stands in for it as history, as a real model's answer would (see bench_serve.PLAIN_ANSWER).
        messages += [{"role": "assistant", "content": PLAIN_ANSWER}, {"role": "user", "content": f"And then? ({i})"}]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--clients", default="4,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    import ray

    from vl_export.runtime import ray_serve

    bundle = str(Path(args.bundle).resolve())
    model = Path(bundle).name
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        for layout, (replicas, threads) in LAYOUTS.items():
            settings = AppSettings(ReplicaSettings(bundle, "onnxruntime", {"threads": threads}, max_queue=16),
                                   ScaleSettings(replicas=replicas, cpus_per_replica=threads, max_ongoing_requests=16),
                                   ServerConfig(model, port=port, max_queue=16, timeout_s=600, limits=Limits()))
            url = ray_serve.start(settings)
            conversation(url, model, noise_png("448x448", 99), 1, 4)  # warm-up, not counted
            for clients in (int(c) for c in args.clients.split(",")):
                images = [noise_png("448x448", seed) for seed in range(clients)]
                start = time.perf_counter()
                with ThreadPoolExecutor(clients) as pool:
                    rounds = [r for rs in pool.map(lambda im: conversation(url, model, im, args.rounds, args.max_tokens),
                                                   images) for r in rs]
                wall_s = time.perf_counter() - start
                ttft_ms = [seconds * 1000 for seconds, _ in rounds]
                print(json.dumps({"layout": layout, "clients": clients, "requests": len(rounds),
                                  "requests_per_s": round(len(rounds) / wall_s, 2),
                                  "completion_tokens_per_s": round(sum(t for _, t in rounds) / wall_s, 1),
                                  "ttft_p50_ms": round(statistics.median(ttft_ms), 1),
                                  "ttft_p95_ms": round(percentile(ttft_ms, 95), 1), "wall_s": round(wall_s, 2)}),
                      flush=True)
            ray_serve.serve.delete(ray_serve.APP_NAME)  # frees its CPUs: an in-place update would wait for them
    finally:
        ray_serve.stop(own_cluster=True)


if __name__ == "__main__":
    main()
