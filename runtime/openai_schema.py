"""OpenAI chat-completions requests to runtime calls, and the response, chunk and error bodies: pure functions.

Decisions (documented in `vl-export serve --help` too):
- Sampling: with no temperature, top_p or top_k in the request, or temperature 0, decoding is greedy, as the
  reference chat() (OpenAI's own default is temperature 1; send one to sample). top_k and
  repetition_penalty are accepted as extensions, as LMDeploy and vLLM do.
- Conversation: system (and developer) messages -> system_message (absent: InternVL2.5's default); earlier
  user/assistant turns -> history; the last user message -> question. Consecutive messages of one role are
  joined with a newline.
- Images: a message's images come before its text, as `<image>\\n` for one and `Image-1: <image>\\n...` for
  several (chat()'s and the model card's forms), unless the text places its own `<image>` markers. Images of
  earlier turns are sent again with the request, as chat() does. data: URLs (base64) always; local paths and
  file:// only when the server allows them; http(s) URLs are refused, never fetched.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from vl_export.errors import InputError

from .prompt import IMAGE_PLACEHOLDER
from .sampling import GenerationConfig

MiB = 1024 * 1024
SYSTEM_ROLES = ("system", "developer")
CHAT_ROLES = ("user", "assistant")
MAX_STOP_STRINGS = 4  # OpenAI's limit
KIND_NAMES = {bool: "a boolean", int: "an integer", float: "a number"}


class OpenAIError(Exception):
    """An error the server answers with `status` and OpenAI's body {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 64 * MiB
    max_image_bytes: int = 20 * MiB  # OpenAI's own per-image limit
    max_image_pixels: int = 64_000_000  # checked from the header, before decoding
    max_images: int = 16  # per request, all turns together
    max_tiles: int | None = None  # per image; None: the bundle's (12)
    max_tokens: int = 2048  # the most new tokens a request may ask for; also the default

    def __post_init__(self):
        from vl_export.errors import InputError

        for name in ("max_body_bytes", "max_image_bytes", "max_image_pixels", "max_images", "max_tokens"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_tiles is not None and not 1 <= self.max_tiles <= 256:
            raise InputError(f"--max-tiles must be in [1, 256], got {self.max_tiles}")


@dataclass(frozen=True)
class ChatCall:
    """One request, ready for Pipeline.stream()."""

    question: str
    images: list[bytes]
    history: list[tuple[str, str]]
    system_message: str | None
    generation: GenerationConfig
    stream: bool = False
    include_usage: bool = False
    model: str = ""


def parse_chat_request(body: Any, model_id: str, limits: Limits = Limits(),
                       allow_local_files: str | os.PathLike | None = None) -> ChatCall:
    """Validate a decoded JSON body; every problem is an OpenAIError naming the offending field.

    allow_local_files: the directory local image paths and file:// URLs may read from (None: none)."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != model_id:
        raise OpenAIError(404, f"The model `{model}` does not exist; this server serves `{model_id}`", "model", "model_not_found")
    _refuse_unsupported(body)
    n = _optional(body, "n", int, 1)
    if n != 1:
        raise OpenAIError(400, f"n must be 1 (one choice per request), got {n}", "n")
    system, turns = _conversation(body.get("messages"), limits, allow_local_files)
    history = [(turns[i][0], turns[i + 1][0]) for i in range(0, len(turns) - 1, 2)]
    images = [image for _, turn_images in turns for image in turn_images]
    if len(images) > limits.max_images:
        raise OpenAIError(400, f"the conversation holds {len(images)} images, over this server's limit of "
                               f"{limits.max_images}", "messages")
    stream = _optional(body, "stream", bool, False)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise OpenAIError(400, "stream_options must be an object", "stream_options")
    include_usage = bool(options.get("include_usage", False))
    return ChatCall(turns[-1][0], images, history, system, _generation(body, limits), stream, include_usage, model_id)


def _refuse_unsupported(body: dict) -> None:
    """Fields this server cannot honour are refused rather than silently ignored."""
    for name in ("frequency_penalty", "presence_penalty"):
        value = body.get(name)
        if value not in (None, 0, 0.0):
            raise OpenAIError(400, f"{name} is not supported (use repetition_penalty)", name)
    for name in ("tools", "functions", "logit_bias", "audio", "modalities", "prediction"):
        if body.get(name):
            raise OpenAIError(400, f"{name} is not supported by this server", name)
    if body.get("logprobs") or body.get("top_logprobs"):
        raise OpenAIError(400, "logprobs are not supported by this server", "logprobs")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise OpenAIError(400, "response_format other than text is not supported", "response_format")


def _conversation(messages: Any, limits: Limits, allow_local_files) -> tuple[str | None, list[tuple[str, list[bytes]]]]:
    """messages -> (system message, alternating user/assistant turns ending with a user turn)."""
    if not isinstance(messages, list) or not messages:
        raise OpenAIError(400, "messages must be a non-empty list", "messages")
    system: list[str] = []
    turns: list[tuple[str, list[str], list[bytes]]] = []  # (role, texts, images)
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise OpenAIError(400, f"{where} must be an object", where)
        role = message.get("role")
        if role not in SYSTEM_ROLES + CHAT_ROLES:
            raise OpenAIError(400, f"{where}.role {role!r} is not supported (use system, user or assistant)", f"{where}.role")
        text, images = _content(message.get("content"), where, role, limits, allow_local_files)
        if role in SYSTEM_ROLES:
            system.append(text)
        elif turns and turns[-1][0] == role:
            turns[-1][1].append(text)
            turns[-1][2].extend(images)
        else:
            turns.append((role, [text], list(images)))
    if not turns or turns[0][0] != "user":
        raise OpenAIError(400, "the conversation must start with a user message (after any system message)", "messages")
    if turns[-1][0] != "user":
        raise OpenAIError(400, "the last message must be from the user", "messages")
    merged = [(_with_markers("\n".join(texts), len(images)), images) for _, texts, images in turns]
    return ("\n".join(system) if system else None), merged


def _with_markers(text: str, num_images: int) -> str:
    """Place `<image>` markers before the text as chat() and the model card do, unless the user placed them."""
    if not num_images or IMAGE_PLACEHOLDER in text:
        return text
    if num_images == 1:
        return f"{IMAGE_PLACEHOLDER}\n{text}"
    return "".join(f"Image-{i}: {IMAGE_PLACEHOLDER}\n" for i in range(1, num_images + 1)) + text


def _content(content: Any, where: str, role: str, limits: Limits, allow_local_files) -> tuple[str, list[bytes]]:
    if content is None and role == "assistant":
        return "", []
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise OpenAIError(400, f"{where}.content must be a string or a list of parts", f"{where}.content")
    texts, images = [], []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            if role != "user":
                raise OpenAIError(400, f"{at}: images are only accepted in user messages", at)
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise OpenAIError(400, f"{at}.image_url.url must be a string", f"{at}.image_url")
            images.append(load_image_url(url, f"{at}.image_url", limits, allow_local_files))
        else:
            raise OpenAIError(400, f"{at} must be a text or image_url part, got type {kind!r}", at)
    return "\n".join(texts), images


def load_image_url(url: str, where: str, limits: Limits, allow_local_files) -> bytes:
    """A data: URL, or a local path / file:// URL where allowed -> the image's encoded bytes, checked."""
    scheme = "data" if url.startswith("data:") else urlparse(url).scheme.lower()
    if scheme == "data":
        data = _data_url(url, where, limits)
    elif scheme in ("http", "https"):
        raise OpenAIError(400, f"{where}: remote image URLs are not fetched by this server; send the image "
                               "inline as a data: URL (data:image/png;base64,...)", where, "remote_url_not_supported")
    elif scheme in ("", "file"):
        if allow_local_files is None or allow_local_files is False:
            raise OpenAIError(400, f"{where}: local image paths are refused unless the server runs with "
                                   "--allow-local-files; send the image as a data: URL", where, "local_files_not_allowed")
        data = _local_file(unquote(urlparse(url).path) if scheme == "file" else url, where, limits, allow_local_files)
    else:
        raise OpenAIError(400, f"{where}: unsupported image URL scheme {scheme!r} (use a data: URL)", where)
    check_image(data, where, limits)
    return data


def _data_url(url: str, where: str, limits: Limits) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise OpenAIError(400, f"{where}: a data: URL must be base64-encoded (data:image/png;base64,...)", where)
    # Refuse an oversized image from its encoded length, before spending memory on decoding it.
    if len(payload) * 3 // 4 > limits.max_image_bytes + 2:
        raise OpenAIError(400, f"{where}: the image is about {len(payload) * 3 // 4} bytes, over this server's "
                               f"limit of {limits.max_image_bytes}", where, "image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise OpenAIError(400, f"{where}: the data: URL is not valid base64", where, "invalid_base64") from None
    if len(data) > limits.max_image_bytes:
        raise OpenAIError(400, f"{where}: the image is {len(data)} bytes, over this server's limit of "
                               f"{limits.max_image_bytes}", where, "image_too_large")
    return data


def _local_file(path_text: str, where: str, limits: Limits, root: str | os.PathLike) -> bytes:
    """A file under `root` (symlinks resolved; relative paths are relative to it). Outside it, one answer whether the
    file exists or not, so the server reveals nothing about the rest of the machine."""
    real_root = Path(os.path.realpath(root))
    path = Path(os.path.realpath(real_root / path_text)) if "\0" not in path_text else real_root
    if real_root not in path.parents:
        raise OpenAIError(400, f"{where}: local image paths must lie under the server's --allow-local-files "
                               f"directory", where, "local_file_refused")
    if not path.is_file():
        raise OpenAIError(400, f"{where}: image {path_text} not found under the allowed directory", where)
    size = path.stat().st_size
    if size > limits.max_image_bytes:
        raise OpenAIError(400, f"{where}: image {path_text} is {size} bytes, over this server's limit of "
                               f"{limits.max_image_bytes}", where, "image_too_large")
    return path.read_bytes()


def check_image(data: bytes, where: str, limits: Limits) -> None:
    """Read only the header: refuse what is not an image, or too many pixels, before the request is queued."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise OpenAIError(400, f"{where}: the data is not a readable image ({exc.__class__.__name__})", where, "invalid_image") from None
    if width * height > limits.max_image_pixels:
        raise OpenAIError(400, f"{where}: the image is {width}x{height} = {width * height} pixels, over this "
                               f"server's limit of {limits.max_image_pixels}", where, "image_too_large")


def _generation(body: dict, limits: Limits) -> GenerationConfig:
    temperature = _optional(body, "temperature", float, None)
    top_p = _optional(body, "top_p", float, None)
    top_k = _optional(body, "top_k", int, None)
    if temperature is not None and not 0 <= temperature <= 2:
        raise OpenAIError(400, f"temperature must be in [0, 2], got {temperature}", "temperature")
    if top_p is not None and not 0 <= top_p <= 1:
        raise OpenAIError(400, f"top_p must be in [0, 1], got {top_p}", "top_p")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _optional(body, name, int, limits.max_tokens)
    if not 1 <= max_tokens <= limits.max_tokens:
        raise OpenAIError(400, f"{name} must be in [1, {limits.max_tokens}] on this server, got {max_tokens}", name)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > MAX_STOP_STRINGS:
        raise OpenAIError(400, f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings", "stop")
    options = dict(max_new_tokens=max_tokens, seed=_optional(body, "seed", int, None), stop=tuple(s for s in stop if s),
                   repetition_penalty=_optional(body, "repetition_penalty", float, 1.0))
    sampling = any(v is not None for v in (temperature, top_p, top_k)) and temperature != 0 and top_p != 0
    try:
        if not sampling:  # the reference chat()'s default; see the module docstring
            return GenerationConfig(**options)
        return GenerationConfig(temperature=1.0 if temperature is None else temperature,
                                top_p=1.0 if top_p is None else top_p, top_k=top_k or 0, **options)
    except InputError as exc:
        raise OpenAIError(400, str(exc)) from None


def _optional(body: dict, name: str, kind: type, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    # bool is an int in Python, but `"max_tokens": true` is a client's mistake.
    if kind is bool:
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok:
        raise OpenAIError(400, f"{name} must be {KIND_NAMES[kind]}, got {value!r:.40}", name)
    if kind is float and not math.isfinite(value):
        raise OpenAIError(400, f"{name} must be a finite number, got {value!r}", name)
    return float(value) if kind is float else value


# --- responses ----------------------------------------------------------------------------------------------


def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def finish_reason(runtime_reason: str) -> str:
    """The runtime's stop / stop_string / length -> OpenAI's stop / length."""
    return "length" if runtime_reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(completion_id: str, model: str, text: str, reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason(reason)}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(completion_id: str, model: str, delta: dict, reason: str | None = None, created: int | None = None) -> dict:
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created or int(time.time()),
            "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                         "finish_reason": None if reason is None else finish_reason(reason)}]}


def usage_chunk(completion_id: str, model: str, prompt_tokens: int, completion_tokens: int, created: int | None = None) -> dict:
    """The extra last chunk of stream_options.include_usage: no choices, the usage."""
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created or int(time.time()),
            "model": model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
