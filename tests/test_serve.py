"""`vl-export serve` on a tiny bundle, driven by the official openai client: the runtime's answers, over HTTP.

Each answer is compared with Pipeline.chat on the same bundle (greedy, same images and conversation), also when
requests decode together in the engine's batch; bad requests get OpenAI-shaped 4xx errors and the server keeps
serving; the queue bound, the timeout and a client's disconnect are shown on a server whose engine can be held at
a gate; a repeated conversation reports its cached prompt tokens; /metrics speaks Prometheus.
"""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from vl_export.cli import main
from vl_export.runtime import GenerationConfig, Pipeline
from vl_export.runtime.openai_schema import Limits, OpenAIError, parse_chat_request
from vl_export.runtime.server import BackgroundServer, ServerConfig, engine_queue

MODEL = "tiny-internvl"
LIMITS = Limits(max_body_bytes=2_000_000, max_image_bytes=400_000, max_tokens=256)


def png(width, height, seed) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}


def user(text, *images) -> dict:
    return {"role": "user", "content": [*(image_part(i) for i in images), {"type": "text", "text": text}]}


PICTURE = png(224, 224, 1)  # one tile: 256 image tokens; about 150 kB of noise
WIDE = png(448, 224, 2)  # two tiles + thumbnail


@pytest.fixture(scope="module")
def pipe(bundle_fp32):
    return Pipeline.from_bundle(bundle_fp32, threads=1)


@pytest.fixture(scope="module")
def server(bundle_fp32):
    config = ServerConfig(MODEL, port=0, max_queue=8, timeout_s=60, limits=LIMITS)
    with BackgroundServer([Pipeline.from_bundle(bundle_fp32, threads=1)], config) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="x", max_retries=0, timeout=60)


def greedy(n) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=n)


# --- answers equal the runtime's ------------------------------------------------------------------------------


def test_non_streamed_answer_equals_pipeline_greedy(client, pipe):
    want = pipe.chat("Describe the image.", images=PICTURE, generation=greedy(16))
    got = client.chat.completions.create(model=MODEL, messages=[user("Describe the image.", PICTURE)], max_tokens=16)
    assert got.object == "chat.completion" and got.model == MODEL and len(got.choices) == 1
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == "length" and want.finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.timings.prompt_tokens, 16)
    assert got.usage.total_tokens == want.timings.prompt_tokens + 16


def test_streamed_chunks_add_up_to_the_pipeline_answer(client, pipe, server):
    want = pipe.chat("Describe the image.", images=PICTURE, generation=greedy(16))
    chunks = list(client.chat.completions.create(model=MODEL, messages=[user("Describe the image.", PICTURE)],
                                                 max_tokens=16, stream=True, stream_options={"include_usage": True}))
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert "".join(content) == want.text and len(content) > 1
    assert chunks[-2].choices[0].finish_reason == "length" and chunks[-2].choices[0].delta.content is None
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    # The wire format itself: `data: {json}\n\n` events ending with `data: [DONE]`.
    body = {"model": MODEL, "messages": [user("Describe the image.", PICTURE)], "max_tokens": 4, "stream": True}
    raw = httpx.post(server + "/v1/chat/completions", json=body, timeout=60)
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    events = raw.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: {") for e in events[:-2])
    assert json.loads(events[-3][6:])["choices"][0]["finish_reason"] == "length"


def test_multi_image_answer_equals_pipeline(client, pipe):
    want = pipe.chat("Compare the two images.", images=[PICTURE, WIDE], generation=greedy(12))
    got = client.chat.completions.create(model=MODEL, messages=[user("Compare the two images.", PICTURE, WIDE)], max_tokens=12)
    assert got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == want.timings.prompt_tokens  # 1 + 3 tiles of image tokens


def test_multi_turn_with_an_image_in_the_first_turn_equals_chat_with_history(client, pipe):
    system = "You answer briefly."
    first = pipe.chat("Describe the image.", images=PICTURE, generation=greedy(8), system_message=system)
    want = pipe.chat("And the colours?", images=[PICTURE], history=first.history, generation=greedy(12), system_message=system)
    messages = [{"role": "system", "content": system}, user("Describe the image.", PICTURE),
                {"role": "assistant", "content": first.text}, {"role": "user", "content": "And the colours?"}]
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12)
    assert got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == want.timings.prompt_tokens


def test_sampling_seed_and_stop_reach_the_runtime(client, pipe):
    sampled = GenerationConfig(max_new_tokens=12, temperature=1.3, top_p=0.9, top_k=0, seed=7)
    want = pipe.chat("Tell me a story.", generation=sampled)
    got = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
                                         max_completion_tokens=12, temperature=1.3, top_p=0.9, seed=7)
    assert got.choices[0].message.content == want.text
    full = pipe.chat("Describe the image.", images=PICTURE, generation=greedy(16)).text
    stop = full[4:7]
    cut = client.chat.completions.create(model=MODEL, messages=[user("Describe the image.", PICTURE)], max_tokens=16, stop=[stop])
    assert cut.choices[0].message.content == full[: full.find(stop)].strip() and cut.choices[0].finish_reason == "stop"


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL and health["workers"] == 1


# --- bad requests ---------------------------------------------------------------------------------------------


def test_bad_requests_get_4xx_in_openai_shape_and_the_server_keeps_serving(client, pipe, server):
    def post(body, **kwargs):
        return httpx.post(server + "/v1/chat/completions", timeout=60, **({"json": body} if body is not None else kwargs))

    good = [user("Describe the image.", PICTURE)]
    big = png(500, 500, 3)  # about 750 kB of noise, over the 400 kB limit
    cases = [
        (post(None, content=b'{"model": "tiny-internvl", "messages": ['), 400, "not valid JSON"),
        (post({"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not-base64@@"}}]}]}), 400, "not valid base64"),
        (post({"model": MODEL, "messages": [user("What?", big)]}), 400, "over this server's limit of 400000"),
        (post({"model": "gpt-4o", "messages": good}), 404, "The model `gpt-4o` does not exist"),
        (post({"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}), 400, "remote image URLs are not fetched"),
        (post({"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "/etc/hosts"}}]}]}), 400, "--allow-local-files"),
        (post({"model": MODEL, "messages": good, "n": 2}), 400, "n must be 1"),
        (post({"model": MODEL, "messages": good, "max_tokens": 5000}), 400, "max_tokens must be in [1, 256]"),
        (post({"model": MODEL, "messages": [{"role": "user", "content": "word " * 5000}]}), 400, "over the model's context"),
        (post(None, content=b"x" * 2_500_000), 413, "over this server's limit"),
    ]
    for response, status, message in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert message in error["message"] and set(error) == {"message", "type", "param", "code"}
    # The same refusals reach the openai client as its typed errors.
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model=MODEL, messages=good, n=2, max_tokens=4)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=good, max_tokens=4)
    want = pipe.chat("Describe the image.", images=PICTURE, generation=greedy(8))
    assert client.chat.completions.create(model=MODEL, messages=good, max_tokens=8).choices[0].message.content == want.text


# --- concurrency -----------------------------------------------------------------------------------------------


def test_concurrent_clients_each_get_their_own_answer(client, pipe):
    prompts = [("Tell me a story.", None), ("What is this?", PICTURE), ("Hello", None), ("Name a colour.", WIDE),
               ("Count to three.", None), ("Describe.", PICTURE), ("Why is the sky blue?", None), ("Hi there", None)]
    want = [pipe.chat(q, images=im, generation=greedy(12)).text for q, im in prompts]
    assert len(set(want)) >= 4  # distinct answers, so a mix-up would show

    def ask(i):
        question, picture = prompts[i]
        messages = [user(question, picture) if picture else {"role": "user", "content": question}]
        if i % 2:  # half of them stream
            stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream)
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12).choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, range(len(prompts)))) == want


def test_a_repeated_conversation_reports_cached_tokens_and_answers_the_same(client, pipe):
    fresh = png(448, 224, 11)  # an image no other test sent: nothing of this conversation is cached yet
    first_q, second_q = user("What is in the picture?", fresh), {"role": "user", "content": "And its colours?"}
    first = client.chat.completions.create(model=MODEL, messages=[first_q], max_tokens=10)
    # Other tests' requests share the system prompt with it, never its image's 768 tokens.
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens - 768
    answer = first.choices[0].message.content
    messages = [first_q, {"role": "assistant", "content": answer}, second_q]
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10)
    history = [("<image>\nWhat is in the picture?", answer)]
    want = pipe.chat("And its colours?", images=[fresh], history=history, generation=greedy(10))
    assert second.choices[0].message.content == want.text
    # The first round (its 768 image tokens among them) comes from the cache; the new question does not.
    assert first.usage.prompt_tokens <= second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, stream=True,
                                            stream_options={"include_usage": True})
    usage = [c.usage for c in stream if c.usage is not None]
    assert usage[0].prompt_tokens_details.cached_tokens >= second.usage.prompt_tokens_details.cached_tokens


def test_metrics_count_requests_tokens_latencies_and_caches(client, server):
    before = metric_values(httpx.get(server + "/metrics").text)
    fresh = png(224, 224, 12)  # new to the server: its image tokens are in no cache
    client.chat.completions.create(model=MODEL, messages=[user("Describe the image.", fresh)], max_tokens=5)
    text = httpx.get(server + "/metrics").text
    after = metric_values(text)
    grew = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    assert grew['vl_export_requests_total{outcome="completed"}'] == 1
    assert grew["vl_export_generated_tokens_total"] == 5
    assert grew["vl_export_time_to_first_token_seconds_count"] == 1
    assert grew["vl_export_inter_token_latency_seconds_count"] == 4
    assert (grew["vl_export_image_cache_hits_total"], grew["vl_export_image_cache_misses_total"]) == (0, 1)
    assert grew["vl_export_cached_prompt_tokens_total"] > 0  # the system prompt, shared with earlier requests
    assert after["vl_export_kv_cache_bytes"] > 0 and after["vl_export_queue_depth"] == 0
    assert "# TYPE vl_export_time_to_first_token_seconds histogram" in text


def metric_values(text: str) -> dict[str, float]:
    """Prometheus text format -> {'name{labels}': value}."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_a_request_that_cannot_fit_the_context_gets_400_before_any_work(gated, pipe):
    config = ServerConfig(MODEL, port=0, max_queue=2, timeout_s=60, limits=Limits(max_tokens=10_000))
    with gated.server(config) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5000)
        assert "over the model's context of 4096" in refused.value.body["message"]
        health = httpx.get(url + "/health").json()
        assert (health["failed"], health["completed"]) == (1, 0)
        got = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert got.choices[0].message.content == pipe.chat("Hi", generation=greedy(4)).text


class Gated:
    """Servers whose engine can be held before each step (a busy engine) and slowed between steps."""

    def __init__(self, pipe):
        self.pipe, self.gate, self.delay_s = pipe, threading.Event(), 0.0
        self.gate.set()

    def server(self, config: ServerConfig) -> BackgroundServer:
        queue = engine_queue(self.pipe, config)
        step = queue.engine.step

        def gated_step():
            self.gate.wait()
            time.sleep(self.delay_s)
            step()

        queue.engine.step = gated_step
        return BackgroundServer([], config, queue=queue)


@pytest.fixture(scope="module")
def gated(bundle_fp32):
    return Gated(Pipeline.from_bundle(bundle_fp32, threads=1))


def wait_for(url, predicate, timeout_s=10.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        health = httpx.get(url + "/health").json()
        if predicate(health):
            return health
        assert time.monotonic() < deadline, health
        time.sleep(0.02)


def test_a_full_queue_gets_429_and_queued_requests_still_finish(gated, pipe):
    config = ServerConfig(MODEL, port=0, max_queue=1, timeout_s=60, limits=LIMITS, max_batch=1)
    with gated.server(config) as url, ThreadPoolExecutor(2) as pool:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)

        def ask(question):
            return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                                  max_tokens=8).choices[0].message.content

        gated.gate.clear()
        try:
            running = pool.submit(ask, "Hello")
            wait_for(url, lambda h: h["running"] == 1)
            queued = pool.submit(ask, "Tell me a story.")
            wait_for(url, lambda h: h["queued"] == 1)
            with pytest.raises(openai.RateLimitError) as refused:
                ask("Hi there")
            assert refused.value.status_code == 429 and "queue limit 1" in refused.value.body["message"]
        finally:
            gated.gate.set()
        assert running.result() == pipe.chat("Hello", generation=greedy(8)).text
        assert queued.result() == pipe.chat("Tell me a story.", generation=greedy(8)).text
        assert wait_for(url, lambda h: h["running"] == 0)["rejected"] == 1


def test_a_request_past_its_timeout_gets_504(gated):
    config = ServerConfig(MODEL, port=0, max_queue=2, timeout_s=1.0, limits=LIMITS)
    with gated.server(config) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        gated.gate.clear()
        try:
            start = time.monotonic()
            with pytest.raises(openai.APIStatusError) as timed_out:
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=8)
            assert timed_out.value.status_code == 504 and "timeout of 1 s" in timed_out.value.body["message"]
            assert 1.0 <= time.monotonic() - start < 5
        finally:
            gated.gate.set()
        # The engine drops the abandoned job at its next step instead of decoding all of it.
        assert wait_for(url, lambda h: h["running"] == 0 and h["cancelled"] + h["timed_out"] == 1)["completed"] == 0


def test_a_client_that_disconnects_stops_its_generation(gated, pipe):
    config = ServerConfig(MODEL, port=0, max_queue=2, timeout_s=60, limits=LIMITS)
    with gated.server(config) as url:
        gated.delay_s = 0.02  # 200 tokens would take 4 s
        try:
            body = {"model": MODEL, "messages": [user("Describe the image.", PICTURE)], "max_tokens": 200, "stream": True}
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
                lines = response.iter_lines()
                assert '"role": "assistant"' in next(lines)
                start = time.monotonic()
            health = wait_for(url, lambda h: h["cancelled"] == 1, timeout_s=3)
            assert health["completed"] == 0 and time.monotonic() - start < 3
        finally:
            gated.delay_s = 0.0
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        got = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=8)
        assert got.choices[0].message.content == pipe.chat("Hello", generation=greedy(8)).text


# --- request mapping (pure) ------------------------------------------------------------------------------------


def parse(**body):
    return parse_chat_request({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **body}, MODEL, LIMITS)


def test_sampling_parameters_map_to_generation_config():
    assert parse().generation == GenerationConfig(max_new_tokens=256)  # absent: greedy, up to the cap
    assert parse(temperature=0, top_p=0.5).generation.greedy
    sampled = parse(temperature=0.7, max_tokens=9, max_completion_tokens=5, seed=3, stop="END").generation
    assert (sampled.temperature, sampled.top_p, sampled.top_k, sampled.max_new_tokens, sampled.seed, sampled.stop) == (0.7, 1.0, 0, 5, 3, ("END",))
    assert parse(top_p=0.8).generation == GenerationConfig(max_new_tokens=256, temperature=1.0, top_p=0.8, top_k=0)


def test_conversation_maps_to_system_history_and_question_with_image_markers():
    call = parse_chat_request({"messages": [
        {"role": "system", "content": "Be brief."},
        user("First?", PICTURE, WIDE), {"role": "assistant", "content": "One."},
        user("Second?", PICTURE), {"role": "assistant", "content": [{"type": "text", "text": "Two."}]},
        {"role": "user", "content": "Third?"}, {"role": "user", "content": "Really?"}]}, MODEL, LIMITS)
    assert call.system_message == "Be brief." and call.images == [PICTURE, WIDE, PICTURE]
    assert call.history == [("Image-1: <image>\nImage-2: <image>\nFirst?", "One."), ("<image>\nSecond?", "Two.")]
    assert call.question == "Third?\nReally?"


@pytest.mark.parametrize("body, message", [
    ({"messages": [{"role": "assistant", "content": "Hi"}]}, "must start with a user message"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}, "last message must be from the user"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "role 'tool' is not supported"),
    ({"messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "function"}]}, "tools is not supported"),
    ({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": True}, "max_tokens must be an integer"),
    ({"messages": [{"role": "user", "content": "Hi"}], "temperature": 3}, "temperature must be in [0, 2]"),
    ({"messages": [{"role": "user", "content": "Hi"}], "stop": ["a", "b", "c", "d", "e"]}, "at most 4 strings"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]},
     "not a readable image"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "got type 'input_audio'"),
])
def test_requests_the_server_cannot_honour_are_refused_by_name(body, message):
    with pytest.raises(OpenAIError, match=message.replace("[", r"\[").replace("]", r"\]")) as refused:
        parse_chat_request(body, MODEL, LIMITS)
    assert refused.value.status == 400


def test_local_files_only_when_allowed(tmp_path):
    path = tmp_path / "p.png"
    path.write_bytes(PICTURE)
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": f"file://{path}"}}]}]}
    with pytest.raises(OpenAIError, match="--allow-local-files"):
        parse_chat_request(body, MODEL, LIMITS)
    assert parse_chat_request(body, MODEL, LIMITS, allow_local_files=tmp_path).images == [PICTURE]


# --- the command and the optional dependency ------------------------------------------------------------------


def test_serve_command_passes_its_flags_to_the_server(monkeypatch, bundle_fp32, tmp_path):
    import vl_export.runtime.server as server_module

    seen = {}
    monkeypatch.setattr(server_module, "run_server", lambda pipelines, config: seen.update(pipelines=pipelines, config=config))
    assert main(["serve", "--bundle", str(bundle_fp32), "--port", "9001", "--max-queue", "3", "--timeout", "7",
                 "--allow-local-files", str(tmp_path), "--max-image-bytes", "1000", "--max-tokens", "64", "--threads", "1",
                 "--max-batch", "6", "--kv-cache-mb", "32", "--image-cache-mb", "0", "--prefill-chunk", "128"]) == 0
    config = seen["config"]
    assert (config.model_id, config.port, config.max_queue, config.timeout_s, config.allow_local_files) == ("fp32", 9001, 3, 7.0, str(tmp_path))
    assert (config.max_batch, config.kv_cache_mb, config.image_cache_mb, config.prefill_chunk) == (6, 32.0, 0.0, 128)
    assert (config.limits.max_image_bytes, config.limits.max_tokens) == (1000, 64)
    assert [type(p).__name__ for p in seen["pipelines"]] == ["Pipeline"]


@pytest.mark.parametrize("flags, message", [(["--max-batch", "0"], "--max-batch must be at least 1, got 0"),
                                            (["--kv-cache-mb", "-1"], "--kv-cache-mb must be >= 0")])
def test_serve_refuses_engine_flags_it_cannot_use(bundle_fp32, capsys, flags, message):
    assert main(["serve", "--bundle", str(bundle_fp32), *flags]) == 2
    assert message in capsys.readouterr().err


def test_the_runtime_imports_without_fastapi_and_the_server_says_what_to_install():
    code = ("import sys; sys.modules['fastapi'] = sys.modules['uvicorn'] = None\n"
            "import vl_export.runtime, vl_export.runtime.server as s\n"
            "from vl_export.errors import VlExportError\n"
            "try:\n    s.create_app(None, s.ServerConfig('m'))\nexcept VlExportError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'vl-export[serve]'" in out
