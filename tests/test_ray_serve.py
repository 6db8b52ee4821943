"""`serve --replicas`: the OpenAI API as a Ray Serve application, on a real local Ray cluster (loopback only).

One cluster for the whole module (starting Ray costs most of its time): 2 engine replicas with 1 thread each on the
tiny bundle. Answers are compared with the single-process server's for the same requests; the headers name the
replica that served each one; a replica is killed mid-request and the service carries on.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from test_serve import LIMITS, MODEL, png, user  # noqa: E402

from vl_export.runtime.openai_schema import Limits  # noqa: E402
from vl_export.runtime.pipeline import Pipeline  # noqa: E402
from vl_export.runtime.replica import ReplicaSettings  # noqa: E402
from vl_export.runtime.routing import rank_replicas, routing_key  # noqa: E402
from vl_export.runtime.server import BackgroundServer, ServerConfig  # noqa: E402

LONG_LIMITS = Limits(max_body_bytes=LIMITS.max_body_bytes, max_image_bytes=LIMITS.max_image_bytes, max_tokens=2000)
IMAGES = [png(224, 224, seed) for seed in (11, 12, 13, 14)]
QUESTIONS = ["Describe the image.", "What is in the picture?", "Name the colours.", "What do you see?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_processes(session_name: str) -> list[int]:
    """PIDs whose command line names this Ray session (GCS, raylet, workers, the Serve actors)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if session_name.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def ray_url(bundle_fp32):
    from vl_export.runtime import ray_serve
    from vl_export.runtime.ray_config import AppSettings, ScaleSettings

    settings = AppSettings(
        ReplicaSettings(str(bundle_fp32), "onnxruntime", {"threads": 1}, max_queue=8),
        ScaleSettings(replicas=2, cpus_per_replica=1, overloaded_at=8, health_check_period_s=2,
                                graceful_shutdown_timeout_s=5),
        ServerConfig(MODEL, port=free_port(), max_queue=8, timeout_s=60, limits=LONG_LIMITS))
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, log_to_driver=False)
    session = Path(ray._private.worker._global_node.get_session_dir_path()).name
    try:
        yield ray_serve.start(settings)
    finally:
        ray_serve.stop(own_cluster=True)
        deadline = time.monotonic() + 20
        while ray_processes(session) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ray_processes(session) == [], "Ray processes left behind"


@pytest.fixture(scope="module")
def single(bundle_fp32):
    config = ServerConfig(MODEL, port=0, max_queue=8, timeout_s=60, limits=LONG_LIMITS)
    with BackgroundServer([Pipeline.from_bundle(bundle_fp32, threads=1)], config) as url:
        yield url


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)


def ask(url: str, messages: list, max_tokens: int = 12, stream: bool = False) -> tuple[str, dict]:
    """(answer, x-vl-export-* headers) through the openai client, streamed or not."""
    raw = client(url).chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                                                 stream=stream)
    headers = {k[len("x-vl-export-"):]: v for k, v in raw.headers.items() if k.startswith("x-vl-export-")}
    reply = raw.parse()
    if stream:
        return "".join(c.choices[0].delta.content or "" for c in reply if c.choices), headers
    return reply.choices[0].message.content, headers


def live_engine_replicas() -> set[str]:
    return {name.split("#")[-1] for name in (a["name"] for a in ray.util.list_named_actors(all_namespaces=True))
            if name.startswith("SERVE_REPLICA::") and "#Engine#" in name}


def engine_running(app: str = "vl-export") -> int:
    return serve.status().applications[app].deployments["Engine"].replica_states.get("RUNNING", 0)


def test_conversations_answer_as_the_single_process_server_and_come_back_to_their_replica(ray_url, single):
    firsts = [[user(q, image)] for q, image in zip(QUESTIONS, IMAGES)]

    def first_round(i):
        return ask(ray_url, firsts[i], stream=bool(i % 2)), ask(single, firsts[i])[0]

    with ThreadPoolExecutor(4) as pool:
        round1 = list(pool.map(first_round, range(4)))
    assert [got for (got, _), _want in round1] == [want for _, want in round1]
    assert len({want for _, want in round1}) >= 2  # distinct answers, so a mix-up would show

    seconds = [[*firsts[i], {"role": "assistant", "content": round1[i][1]}, {"role": "user", "content": "And then?"}]
               for i in range(4)]

    def second_round(i):
        return ask(ray_url, seconds[i], stream=not i % 2), ask(single, seconds[i])[0]

    with ThreadPoolExecutor(4) as pool:
        round2 = list(pool.map(second_round, range(4)))
    assert [got for (got, _), _want in round2] == [want for _, want in round2]
    for i in range(4):
        (_, first_headers), (_, second_headers) = round1[i][0], round2[i][0]
        # The key is the first turn's image: the same in both rounds, so the same replica serves both.
        assert first_headers["routing-key"] == second_headers["routing-key"] == routing_key(
            "<image>\n" + QUESTIONS[i], [IMAGES[i]], [], None)
        assert second_headers["replica"] == first_headers["replica"] and second_headers["affinity"] == "hit"
    # The second round, asked again, finds its conversation's KV on the replica it is routed to: everything but
    # the last answer and the new question is cached (the image's tokens included, which only that replica has).
    again = client(ray_url).chat.completions.create(model=MODEL, messages=seconds[0], max_tokens=4)
    assert again.usage.prompt_tokens - again.usage.prompt_tokens_details.cached_tokens <= 48
    health = httpx.get(ray_url + "/health").json()
    assert health["affinity"]["hit"] >= 5 and health["affinity"]["miss"] == 0
    assert health["completed"] >= 9 and health["cancelled"] == 0  # a finished request is not counted as cancelled
    assert sum(r["served"] for r in health["replicas"].values()) >= 8


def test_bad_requests_get_the_same_errors_as_the_single_process_server(ray_url, single):
    bodies = [{"model": MODEL, "messages": [user("Hi", IMAGES[0])], "n": 2},
              {"model": "gpt-4o", "messages": [user("Hi", IMAGES[0])]},
              {"model": MODEL, "messages": [{"role": "user", "content": "word " * 5000}]}]
    for body in bodies:
        got = httpx.post(ray_url + "/v1/chat/completions", json=body, timeout=60)
        want = httpx.post(single + "/v1/chat/completions", json=body, timeout=60)
        assert (got.status_code, got.json()) == (want.status_code, want.json())
        assert got.status_code in (400, 404)


def stream_events(url: str, body: dict, on_first) -> tuple[dict, list[dict], float]:
    """POST a streamed chat completion; call on_first(headers) at the first chunk; returns (headers, events, seconds).
    An error before the stream started is its one event, with its status."""
    start = time.monotonic()
    events = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as response:
        headers = {k[len("x-vl-export-"):]: v for k, v in response.headers.items() if k.startswith("x-vl-export-")}
        if response.status_code != 200:
            return headers, [{"status": response.status_code, **json.loads(response.read())}], time.monotonic() - start
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: "):]))
                if len(events) == 2:
                    on_first(headers)
    return headers, events, time.monotonic() - start


def test_a_replica_killed_mid_request_fails_its_requests_promptly_and_the_service_recovers(ray_url):
    before = live_engine_replicas()
    assert len(before) == 2 and engine_running() == 2
    killed: list[str] = []

    def kill(headers):  # the long request kills its own replica once it streams
        killed.append(headers["replica"])
        os.kill(httpx.get(ray_url + "/health").json()["replicas"][headers["replica"]]["pid"], signal.SIGKILL)

    # The last question's answer runs to 2,000 tokens (about 8 s alone), the others stop after 155 to 600.
    bodies = [{"model": MODEL, "messages": [user(q, image)], "max_tokens": 2000, "stream": True}
              for q, image in zip(QUESTIONS, IMAGES)]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(stream_events, ray_url, body, kill if i == 3 else lambda headers: None)
                   for i, body in enumerate(bodies)]
        results = [future.result() for future in futures]
    assert len(killed) == 1
    for i, (headers, events, seconds) in enumerate(results):
        assert seconds < 30  # nothing hangs
        last = events[-1]
        if i == 3 or "error" in last:  # a 503, or an error event once the stream had started
            assert headers["replica"] == killed[0]
            assert last.get("status", 503) == 503 and set(last["error"]) == {"message", "type", "param", "code"}
            assert last["error"]["code"] == "replica_unavailable" and "retry" in last["error"]["message"]
        else:  # served by the other replica, or by the killed one before it died
            assert last["choices"][0]["finish_reason"] == "stop"
    assert len(results[3][1]) > 2 and "error" in results[3][1][-1]  # it died mid-stream

    # New requests go to the live replica while Ray restarts the dead one.
    for q, image in zip(QUESTIONS, IMAGES):
        answer, headers = ask(ray_url, [user(q, image)], max_tokens=8)
        assert answer and headers["replica"] != killed[0]
    deadline = time.monotonic() + 60
    while not (engine_running() == 2 and len(live_engine_replicas() - before) == 1):
        assert time.monotonic() < deadline, serve.status()
        time.sleep(0.5)
    # The new replica serves: a conversation whose key ranks it first lands there.
    new = (live_engine_replicas() - before).pop()
    live = live_engine_replicas()
    question = next(f"Question {i}?" for i in range(1000)
                    if rank_replicas(routing_key(f"Question {i}?", [], [], None), live)[0] == new)
    deadline = time.monotonic() + 30
    while True:  # the ingress's router learns of the new replica a moment after the controller does
        answer, headers = ask(ray_url, [{"role": "user", "content": question}], max_tokens=8)
        if headers["replica"] == new or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert headers["replica"] == new and answer
