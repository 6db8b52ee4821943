"""`serve` facing hostile clients and mistaken settings: deadlines on reading, a connection limit, 400 (never 500)
for bad values, local files confined to a root, no API docs unless asked, settings checked at start."""

from __future__ import annotations

import io
import json
import socket
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from vl_export.cli import main
from vl_export.errors import InputError, VlExportError
from vl_export.runtime import Pipeline
from vl_export.runtime.openai_schema import Limits, OpenAIError, parse_chat_request
from vl_export.runtime.server import BackgroundServer, ServerConfig
from vl_export.runtime.serving import GenerationQueue, Job

MODEL = "tiny"
LIMITS = Limits(max_tokens=16)


def png(width=64, height=64) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def server(bundle_fp32):
    config = ServerConfig(MODEL, port=0, max_queue=4, timeout_s=60, limits=LIMITS, read_timeout_s=1.0, max_connections=4)
    with BackgroundServer([Pipeline.from_bundle(bundle_fp32, threads=1)], config) as url:
        yield url


def post(url, body, raw: bytes | None = None):
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(url + "/v1/chat/completions", content=content, headers={"Content-Type": "application/json"}, timeout=30)


def hello(**extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2, **extra}


@pytest.mark.parametrize("body, raw, message", [
    (hello(seed=-1), None, "seed must be in [0, 2**63)"),
    (None, b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "nested too deeply"),
    (None, json.dumps(hello()).replace('"max_tokens": 2', '"max_tokens": 2, "temperature": NaN').encode(), "NaN is not a JSON number"),
    (None, json.dumps(hello()).replace('"max_tokens": 2', '"max_tokens": 2, "repetition_penalty": Infinity').encode(), "Infinity"),
    (hello(repetition_penalty=1e309), None, None),  # json.dumps writes Infinity for it
    (hello(stream=True, messages=[{"role": "user", "content": "see <IMG_CONTEXT>"}]), None, "only the runtime places"),
])
def test_bad_values_are_400_not_500_and_before_any_work(server, body, raw, message):
    response = post(server, body, raw)
    assert response.status_code == 400, response.text
    if message:
        assert message in response.json()["error"]["message"]


def test_docs_and_openapi_are_off_unless_asked(server, bundle_fp32):
    assert httpx.get(server + "/docs").status_code == 404
    assert httpx.get(server + "/openapi.json").status_code == 404
    config = ServerConfig(MODEL, port=0, docs=True)
    with BackgroundServer([Pipeline.from_bundle(bundle_fp32, threads=1, lazy=True)], config) as url:
        assert httpx.get(url + "/openapi.json").status_code == 200


def connect(url) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> bool:
    """Send `trickle` a byte every 0.1 s; True if the server closes the connection within `seconds`."""
    deadline = time.monotonic() + seconds
    sock.settimeout(0.1)
    i = 0
    while time.monotonic() < deadline:
        try:
            if i < len(trickle):
                sock.send(trickle[i : i + 1])
                i += 1
            if sock.recv(4096) == b"":
                return True
        except socket.timeout:
            continue
        except OSError:
            return True
    return False


def test_a_client_sending_headers_a_byte_at_a_time_is_cut_off(server):
    with connect(server) as sock:
        start = time.monotonic()
        assert closed_within(sock, 5, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" * 10)
        assert time.monotonic() - start < 3  # the read deadline is 1 s


def test_a_body_that_never_arrives_gets_408(server):
    with connect(server) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\":")
        sock.settimeout(5)
        assert sock.recv(4096).startswith(b"HTTP/1.1 408")


def test_connections_beyond_the_limit_get_503(server):
    idle = [connect(server) for _ in range(4)]
    try:
        time.sleep(0.2)
        assert httpx.get(server + "/health").status_code == 503
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.2)
    assert httpx.get(server + "/health").status_code == 200


class Refusing:
    """A pipeline stand-in: every request fails in prepare, as a user's mistake."""

    def stream(self, *args, **kwargs):
        raise InputError("refused")


def test_max_queue_zero_means_no_waiting_but_idle_workers_still_serve():
    events = []
    queue = GenerationQueue([Refusing()], 0)
    try:
        job = Job("q", [], [], None, None, time.monotonic() + 10, events.append)
        queue.submit(job)  # an idle worker takes it: not a 429
        deadline = time.monotonic() + 5
        while not events and time.monotonic() < deadline:
            time.sleep(0.01)
        assert events and events[0].kind == "error"
    finally:
        queue.close()


@pytest.mark.parametrize("flags, message", [
    (["--max-queue", "-1"], "--max-queue must be 0 or more"),
    (["--max-batch", "0"], "--max-batch must be at least 1"),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--threads", "-2"], "--threads must be at least 1"),
    (["--timeout", "nan"], "--timeout must be a positive number"),
    (["--timeout", "0"], "--timeout must be a positive number"),
    (["--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["--max-tiles", "100000"], "--max-tiles must be in [1, 256]"),
    (["--allow-local-files", "/nonexistent-root"], "is not a directory"),
])
def test_bad_serve_settings_are_refused_at_start(capsys, monkeypatch, bundle_fp32, flags, message):
    import vl_export.runtime.server as server_module

    monkeypatch.setattr(server_module, "run_server", lambda *a: pytest.fail("the server started"))
    code = main(["serve", "--bundle", str(bundle_fp32), *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err


# --- local files ---------------------------------------------------------------------------------------------------


def local(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}


def test_local_files_are_read_only_under_the_root(tmp_path):
    root, elsewhere = tmp_path / "root", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (root / "in.png").write_bytes(png())
    (elsewhere / "out.png").write_bytes(png())
    (root / "link.png").symlink_to(elsewhere / "out.png")
    assert parse_chat_request(local(str(root / "in.png")), MODEL, LIMITS, root).images == [png()]
    assert parse_chat_request(local("in.png"), MODEL, LIMITS, root).images == [png()]  # relative to the root
    answers = set()
    for url in (str(elsewhere / "out.png"), str(elsewhere / "missing.png"), f"file://{elsewhere}/out.png",
                "../elsewhere/out.png", str(root / "link.png"), "/etc/shadow", "/etc/nonexistent"):
        with pytest.raises(OpenAIError) as refused:
            parse_chat_request(local(url), MODEL, LIMITS, root)
        assert refused.value.status == 400
        answers.add(refused.value.message)
    # One answer for all of them: nothing says whether a file outside exists, or how large it is.
    assert answers == {"messages[0].content[0].image_url: local image paths must lie under the server's "
                       "--allow-local-files directory"}


def test_serve_config_refuses_bad_values():
    for kwargs in ({"max_queue": -1}, {"timeout_s": float("inf")}, {"read_timeout_s": 0}, {"max_connections": 0}):
        with pytest.raises(VlExportError):
            ServerConfig(MODEL, **kwargs)
