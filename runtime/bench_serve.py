"""`vl-export bench-serve`: N concurrent streaming clients against the engine over loopback HTTP.

Each level of concurrency starts its N clients at once, each with its own image and question and the same
max_tokens; reported per level: aggregate generated tokens/s (time to first token included), steady decode
tokens/s (while every stream of the level is decoding: from the last first token to the first last token), and
p50/p95 time to first token and inter-token latency (gaps between streamed chunks; a chunk is one step's text, so
a token whose text is held back, such as trailing whitespace, arrives with the next). Then a conversation's second round:
its time to first token with the conversation KV cache, and on a server without it. Clients use only the standard
library, so the numbers are the server's.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from PIL import Image

from .backends import serving_options
from .bench import image_with_tiles, peak_rss_mib
from .pipeline import Pipeline
from .server import BackgroundServer, ServerConfig

QUESTIONS = ("Describe the image.", "What colours do you see?", "Is there any text?", "What is in the corner?",
             "Describe the texture.", "What stands out?", "Name three things here.", "What is the mood?")


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def noise(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q% of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(len(ordered) * q / 100) - 1)] if ordered else float("nan")


def user(text: str, image: bytes | None) -> dict:
    if image is None:
        return {"role": "user", "content": text}
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}


def stream_chat(url: str, model: str, messages: list, max_tokens: int) -> dict:
    """One streaming request: when it was sent, when each content chunk arrived, the answer, the usage."""
    body = json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True,
                       "stream_options": {"include_usage": True}}).encode()
    parsed = urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=1200)
    sent = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise RuntimeError(f"the server answered {response.status}: {response.read()[:300]!r}")
    arrivals, text, usage = [], [], None
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[len("data: "):])
        if event.get("usage"):
            usage = event["usage"]
        for choice in event.get("choices", []):
            if choice["delta"].get("content"):
                arrivals.append(time.perf_counter())
                text.append(choice["delta"]["content"])
    connection.close()
    return {"sent": sent, "arrivals": arrivals, "text": "".join(text), "usage": usage}


def run_level(url: str, model: str, streams: int, max_tokens: int, image_size: tuple[int, int], seed: int) -> dict:
    """`streams` clients at once, each its own image and question."""
    requests = [[user(QUESTIONS[i % len(QUESTIONS)], png(noise(*image_size, seed + i)))] for i in range(streams)]
    with ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(lambda m: stream_chat(url, model, m, max_tokens), requests))
    start = min(r["sent"] for r in results)
    end = max(r["arrivals"][-1] for r in results)
    tokens = [r["usage"]["completion_tokens"] for r in results]
    ttft = [r["arrivals"][0] - r["sent"] for r in results]
    gaps = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:])]
    # The window in which every stream decodes; chunks in it are scaled to tokens stream by stream.
    low, high = max(r["arrivals"][0] for r in results), min(r["arrivals"][-1] for r in results)
    in_window = sum(sum(low < t <= high for t in r["arrivals"]) * n / len(r["arrivals"]) for r, n in zip(results, tokens))
    # Gaps inside that window: decode steps with no newcomer's images or prefill beside them.
    steady_gaps = [b - a for r in results for a, b in zip(r["arrivals"], r["arrivals"][1:]) if low <= a and b <= high]
    return {"streams": streams, "generated_tokens": sum(tokens),
            "aggregate_tok_s": sum(tokens) / (end - start),
            "steady_tok_s": in_window / (high - low) if high > low else float("nan"),
            "steady_window_s": max(high - low, 0.0),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
            "itl_p50_ms": percentile(gaps, 50) * 1000, "itl_p95_ms": percentile(gaps, 95) * 1000,
            "steady_itl_p95_ms": percentile(steady_gaps, 95) * 1000 if steady_gaps else float("nan")}


# A plain answer that survives detokenize -> tokenize unchanged with any real tokenizer. The random-weight benchmark
# models answer with ids of their placeholder vocabulary, whose text ("<unused_123>...") re-tokenizes to ~14x as many
# tokens, so a client sending that answer back makes round 2 prefill it again: a property of those models, not of
# the cache. Round 2 is therefore also timed with this answer as the history (round 1's prompt cached, the answer and
# the question prefilled): the work a real model's follow-up costs at most.
PLAIN_ANSWER = ("The image shows a grid of coloured squares on a light background. Most of the squares are red, blue "
                "or green, and a few in the lower right corner are yellow. There is no text in the picture.")


def conversation(url: str, model: str, image: bytes, max_tokens: int, plain_history: bool = False) -> dict:
    """Two rounds about one image: the second's time to first token, and how many of its prompt tokens were cached.
    With `plain_history` the second round is also sent with PLAIN_ANSWER as round 1's answer."""
    first_q = user("Describe the image.", image)
    one = stream_chat(url, model, [first_q], max_tokens)

    def second(answer: str) -> dict:
        two = stream_chat(url, model, [first_q, {"role": "assistant", "content": answer},
                                       user("What else do you notice?", None)], max_tokens)
        return {"ttft_s": two["arrivals"][0] - two["sent"], "prompt_tokens": two["usage"]["prompt_tokens"],
                "cached_tokens": (two["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)}

    two = second(one["text"])
    out = {"round1_ttft_s": one["arrivals"][0] - one["sent"], "round2_ttft_s": two["ttft_s"],
           "round2_prompt_tokens": two["prompt_tokens"], "round2_cached_tokens": two["cached_tokens"]}
    if plain_history:
        plain = second(PLAIN_ANSWER)
        out.update({"plain_round2_ttft_s": plain["ttft_s"], "plain_round2_prompt_tokens": plain["prompt_tokens"],
                    "plain_round2_cached_tokens": plain["cached_tokens"]})
    return out


def bench_serve(bundle: Path, concurrency: list[int], max_tokens: int = 64, image_size: tuple[int, int] = (448, 448),
                conversation_tiles: int = 7, max_batch: int | None = None, kv_cache_mb: float = 256.0,
                backend: str = "onnxruntime", **backend_options) -> dict:
    pipe = Pipeline.from_bundle(bundle, backend=backend, **serving_options(backend, backend_options))
    model = Path(bundle).resolve().name
    max_batch = max_batch or max(concurrency)

    def config(kv_mb: float, image_mb: float) -> ServerConfig:
        return ServerConfig(model, port=0, max_queue=max(16, max(concurrency)), timeout_s=3600, max_batch=max_batch,
                            kv_cache_mb=kv_mb, image_cache_mb=image_mb)

    report = {"bundle": str(bundle), "backend": pipe.backend.describe(), "max_batch": max_batch,
              "max_tokens": max_tokens, "image": list(image_size), "kv_cache_mb": kv_cache_mb, "levels": []}
    # Every image is new to the server (no cache hits inside the levels): seeds differ per level and client.
    with BackgroundServer([pipe], config(kv_cache_mb, 0)) as url:
        stream_chat(url, model, [user("Hello", None)], 4)  # warm-up, not counted
        for level, streams in enumerate(concurrency):
            report["levels"].append(run_level(url, model, streams, max_tokens, image_size, seed=1000 * (level + 1)))
        talk = png(image_with_tiles(conversation_tiles, pipe.tiling))
        report["conversation"] = {"tiles": conversation_tiles,
                                  "with_reuse": conversation(url, model, talk, max_tokens, plain_history=True)}
    with BackgroundServer([pipe], config(0, 0)) as url:
        report["conversation"]["without_reuse"] = conversation(url, model, talk, max_tokens)
    report["peak_rss_mib"] = peak_rss_mib()
    return report


def table(report: dict) -> str:
    base = report["levels"][0]
    lines = [f"max_batch {report['max_batch']}, {report['max_tokens']} tokens per stream, image "
             f"{report['image'][0]}x{report['image'][1]}",
             "| streams | aggregate tok/s | steady decode tok/s (window s) | x first row | TTFT p50 s | TTFT p95 s | "
             "ITL p50 ms | ITL p95 ms | steady ITL p95 ms |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in report["levels"]:
        lines.append(f"| {row['streams']} | {row['aggregate_tok_s']:.1f} | {row['steady_tok_s']:.1f} "
                     f"({row['steady_window_s']:.1f}) | {row['steady_tok_s'] / base['steady_tok_s']:.2f} | {row['ttft_p50_s']:.2f} | "
                     f"{row['ttft_p95_s']:.2f} | {row['itl_p50_ms']:.0f} | {row['itl_p95_ms']:.0f} | "
                     f"{row.get('steady_itl_p95_ms', float('nan')):.0f} |")
    talk = report["conversation"]
    with_, without = talk["with_reuse"], talk["without_reuse"]
    lines.append(f"conversation about a {talk['tiles']}-tile image: round 1 TTFT {with_['round1_ttft_s']:.2f} s; "
                 f"round 2 TTFT {with_['round2_ttft_s']:.2f} s with reuse ({with_['round2_cached_tokens']} of "
                 f"{with_['round2_prompt_tokens']} prompt tokens cached), {without['round2_ttft_s']:.2f} s without "
                 f"({with_['round2_ttft_s'] / with_['round1_ttft_s']:.3f} of round 1)")
    if "plain_round2_ttft_s" in with_:
        lines.append(f"  round 2 with a plain-text answer as history: TTFT {with_['plain_round2_ttft_s']:.2f} s "
                     f"({with_['plain_round2_cached_tokens']} of {with_['plain_round2_prompt_tokens']} prompt tokens "
                     f"cached; {with_['plain_round2_ttft_s'] / with_['round1_ttft_s']:.3f} of round 1)")
    lines.append(f"peak RSS {report['peak_rss_mib']:.0f} MiB (KV cache budget {report['kv_cache_mb']:g} MB)")
    return "\n".join(lines)
