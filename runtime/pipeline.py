"""Pipeline: a bundle answering like InternVL2.5's chat() and batch_chat(), on any backend, without torch."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from vl_export import integrity
from vl_export.errors import InputError
from vl_export.manifest import Manifest

from . import prompt as prompts
from .backends import open_backends
from .backends.base import GPU_TILES_PER_RUN, Backend, DecoderSession, GraphSession
from .preprocess import ImageInput, TilingConfig, preprocess_images, preprocess_video
from .sampling import GenerationConfig
from .tokenizer import TextTokenizer

Images = ImageInput | Sequence[ImageInput] | None
TILES_PER_RUN = GPU_TILES_PER_RUN  # tiles per vision run on a GPU, which TensorRT's vision profiles are tuned for


@dataclass
class Timings:
    preprocess_ms: float = 0.0
    vision_ms: float = 0.0  # vision encoder + projector, all tiles
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    new_tokens: int = 0
    prompt_tokens: int = 0
    tiles: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    @property
    def ttft_ms(self) -> float:
        """Time to first token: everything up to the first sampled token."""
        return self.preprocess_ms + self.vision_ms + self.prefill_ms

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.new_tokens - 1  # the first token comes from the prefill
        return steps / (self.decode_ms / 1000) if steps > 0 and self.decode_ms > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "preprocess_ms": round(self.preprocess_ms, 3),
            "vision_ms": round(self.vision_ms, 3),
            "prefill_ms": round(self.prefill_ms, 3),
            "ttft_ms": round(self.ttft_ms, 3),
            "decode_ms": round(self.decode_ms, 3),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 3),
            "new_tokens": self.new_tokens,
            "prompt_tokens": self.prompt_tokens,
            "tiles": self.tiles,
            "cached_tokens": self.cached_tokens,
        }


@dataclass
class ChatResult:
    text: str
    token_ids: list[int]
    history: list[tuple[str, str]]
    finish_reason: str
    timings: Timings

    def to_dict(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason, "timings": self.timings.to_dict()}


@dataclass
class Request:
    """One conversation made ready: its prompt ids, its tiles, and the question as history will keep it."""

    ids: list[int]
    pixel_values: np.ndarray  # (tiles, 3, 448, 448)
    tiles_per_image: list[int]
    question: str
    history: list[tuple[str, str]]
    preprocess_ms: float


@dataclass
class Stream:
    """Iterate for text pieces as they are decoded; `result` is set once the iteration ends."""

    pieces: Iterator[str]
    result: ChatResult | None = field(default=None)

    def __iter__(self) -> Iterator[str]:
        return self.pieces


class Pipeline:
    def __init__(self, bundle: Path, manifest: Manifest, backends: dict[str, Backend], max_tiles_per_run: int | None = None,
                 lazy: bool = False, kv_cache_mb: float = 0.0, image_cache_mb: float = 0.0, max_batch: int = 8,
                 parse_special_tokens: bool = False):
        self.bundle = bundle
        self.manifest = manifest
        self.backends = backends  # role -> backend; one backend for all graphs unless a per-graph spec asked otherwise
        self.backend = BackendSet(backends)
        self.max_tiles_per_run = max_tiles_per_run
        self.parse_special_tokens = parse_special_tokens  # the reference's encoding of text; see runtime/prompt.py
        self.tokenizer = TextTokenizer(bundle / manifest.tokenizer, manifest.special_tokens)
        self.embed_table = integrity.load_embed_table(bundle / manifest.embed_tokens["file"], manifest.embed_tokens,
                                                      self.tokenizer.vocab_size)  # (vocab, hidden), memory-mapped
        pre = manifest.preprocessing
        self.tiling = TilingConfig(pre.image_size, pre.min_tiles, pre.max_tiles, pre.use_thumbnail, pre.mean, pre.std)
        # The engine behind chat(), stream() and batch_chat(); its caches are off unless asked for (a library call
        # should not hold hundreds of MB behind the caller's back). The server runs an engine of its own.
        self.engine_options = {"kv_cache_mb": kv_cache_mb, "image_cache_mb": image_cache_mb, "max_batch": max_batch}
        if not lazy:  # load every graph now, so the first request pays no session start-up
            self.vision, self.projector, self.decoder  # noqa: B018

    @classmethod
    def from_bundle(cls, path: str | Path, backend: str = "onnxruntime", max_tiles_per_run: int | None = None,
                    lazy: bool = False, kv_cache_mb: float = 0.0, image_cache_mb: float = 0.0,
                    parse_special_tokens: bool = False, **backend_options) -> Pipeline:
        """Load a bundle. backend: onnxruntime (ort), openvino (ov) or tensorrt (trt), or one per graph, e.g.
        `vision=openvino,decoder=onnxruntime` (each graph where it runs fastest); options go to the backends that
        take them (threads=, device=, ...).

        lazy: open each graph on first use (calibration, for one, never needs the decoder of a vision-only pass).
        kv_cache_mb, image_cache_mb: budgets of the conversation KV cache (a follow-up question prefills only what
        is new) and of the image-embedding cache (an image seen before skips the vision encoder); 0 is off.
        parse_special_tokens: encode text as the reference does, special-token strings becoming control tokens
        (default: text is plain text; see runtime/prompt.py).
        """
        path = Path(path)
        manifest = Manifest.load(path)
        return cls(path, manifest, open_backends(backend, path, manifest, **backend_options), max_tiles_per_run, lazy,
                   kv_cache_mb, image_cache_mb, parse_special_tokens=parse_special_tokens)

    def _graph(self, role: str):
        backend = self.backends[role]
        entry = self.manifest.graph(role, backend.name)
        integrity.graph_key(self.bundle, entry)  # a graph that is not what the manifest hashed is refused, by name
        return backend, entry

    @cached_property
    def vision(self) -> GraphSession:
        backend, entry = self._graph("vision_encoder")
        return backend.open_graph(self.bundle, entry)

    @cached_property
    def projector(self) -> GraphSession:
        backend, entry = self._graph("projector")
        return backend.open_graph(self.bundle, entry)

    @cached_property
    def decoder(self) -> DecoderSession:
        backend, entry = self._graph("decoder")
        return backend.open_decoder(self.bundle, entry)

    @cached_property
    def engine(self):
        from .engine import Engine

        return Engine(self, **self.engine_options)

    # --- stages --------------------------------------------------------------------------------------------

    @property
    def tiles_per_run(self) -> int:
        """Tiles per vision run: max_tiles_per_run if given, else what the vision session does best with (2 on a CPU,
        8 on a GPU: backends/base.py); an engine built for fewer sets the pace."""
        limits = [getattr(g, "max_tiles", None) for g in (self.vision, self.projector)]
        return min([self.max_tiles_per_run or self.vision.tiles_per_run, *(n for n in limits if n)])

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """pixel_values (tiles, 3, 448, 448) -> image_embeds (tiles, 256, hidden), in runs of tiles_per_run."""
        runs = []
        per_run = self.tiles_per_run
        for start in range(0, len(pixel_values), per_run):
            chunk = np.ascontiguousarray(pixel_values[start : start + per_run], dtype=np.float32)
            features = self.vision.run({"pixel_values": chunk})["vision_features"]
            runs.append(self.projector.run({"vision_features": features})["image_embeds"])
        return np.concatenate(runs)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Token ids (...,) -> rows of the memory-mapped table as float32 (..., hidden)."""
        return np.asarray(self.embed_table[ids], dtype=np.float32)

    def splice(self, ids: Sequence[int], image_embeds: np.ndarray | None) -> np.ndarray:
        """Embed the ids, then overwrite the <IMG_CONTEXT> rows, in order, with the image embeddings."""
        ids = np.asarray(ids, dtype=np.int64)
        embeds = self.embed(ids)  # (s, hidden)
        rows = np.flatnonzero(ids == self.tokenizer.image_context)
        features = np.zeros((0, embeds.shape[-1]), np.float32) if image_embeds is None else image_embeds.reshape(-1, embeds.shape[-1])
        if len(rows) != len(features):
            raise InputError(f"image tokens {len(rows)} in the prompt, image features {len(features)}: they must match")
        embeds[rows] = features
        return embeds

    def prepare(
        self,
        question: str,
        images: Images = None,
        history: Sequence[tuple[str, str]] = (),
        system_message: str | None = None,
        video: str | Path | None = None,
        num_frames: int = 8,
        max_tiles: int | None = None,
    ) -> Request:
        """Tile, place the <image> markers as chat() does, render the template, tokenise, check the length."""
        start = time.perf_counter()
        system = self.manifest.system_message if system_message is None else system_message
        prompts.check_text(prompts.conversation(question, history, system))  # before any image is decoded
        tiling = self.tiling if max_tiles is None else TilingConfig(**{**self.tiling.__dict__, "max_tiles": max_tiles})
        if video is not None:
            if images:
                raise InputError("give either images or a video, not both")
            pixel_values, tiles_per_image = preprocess_video(video, num_frames, tiling)
            question = prompts.video_question(question, len(tiles_per_image))
        else:
            pixel_values, tiles_per_image = preprocess_images(_as_list(images), tiling)
            question = prompts.with_placeholders(question, len(tiles_per_image), history)
        segments = prompts.conversation(question, history, system)
        segments = prompts.expand_image_segments(segments, tiles_per_image, self.manifest.model.num_image_tokens)
        ids = self.tokenizer.encode_segments(segments, self.parse_special_tokens)
        if len(ids) >= self.manifest.max_context:
            raise InputError(f"the prompt is {len(ids)} tokens, over the model's context of {self.manifest.max_context}")
        return Request(ids, pixel_values, tiles_per_image, question, list(history), (time.perf_counter() - start) * 1000)

    # --- answering -----------------------------------------------------------------------------------------

    def chat(self, question: str, images: Images = None, history: Sequence[tuple[str, str]] = (),
             generation: GenerationConfig | None = None, **prepare_options) -> ChatResult:
        """Answer one question as InternVL2.5's chat(); returns the response and the new history."""
        stream = self.stream(question, images, history, generation, **prepare_options)
        for _ in stream:
            pass
        return stream.result

    def stream(self, question: str, images: Images = None, history: Sequence[tuple[str, str]] = (),
               generation: GenerationConfig | None = None, **prepare_options) -> Stream:
        """As chat(), yielding text pieces as they are decoded; the ChatResult is on `.result` at the end.

        Streams share the pipeline's engine: several open at once decode together, each at its own pace."""
        generation = generation or GenerationConfig()
        request = self.prepare(question, images, history, **prepare_options)
        seq = self.engine.add(request, generation)
        stream = Stream(iter(()))
        stream.pieces = self._stream(request, seq, stream)
        return stream

    def _stream(self, request: Request, seq, stream: Stream) -> Iterator[str]:
        try:
            while not seq.finished:
                self.engine.step()
                text = seq.take_text()
                if text:
                    yield text
        finally:
            self.engine.abort(seq)  # a no-op once finished; a caller that stopped early frees its slot
        if seq.error is not None:
            raise seq.error
        stream.result = chat_result(request, seq)

    def batch_chat(self, questions: Sequence[str], images: Sequence[Images] | None = None,
                   generation: GenerationConfig | None = None, system_message: str | None = None) -> list[ChatResult]:
        """Several independent questions decoded together, as InternVL2.5's batch_chat() (each answer the same as
        asking it alone)."""
        generation = generation or GenerationConfig()
        images = list(images) if images is not None else [None] * len(questions)
        if len(images) != len(questions):
            raise InputError(f"{len(questions)} questions but {len(images)} image entries")
        requests = [self.prepare(q, im, system_message=system_message) for q, im in zip(questions, images)]
        seqs = [self.engine.add(r, generation) for r in requests]
        try:
            while not all(seq.finished for seq in seqs):
                self.engine.step()
        finally:
            for seq in seqs:
                self.engine.abort(seq)
        for seq in seqs:
            if seq.error is not None:
                raise seq.error
        return [chat_result(r, seq) for r, seq in zip(requests, seqs)]


def chat_result(request: Request, seq) -> ChatResult:
    """A finished engine sequence as chat() answers: the cleaned text and the conversation extended by it."""
    timings = Timings(request.preprocess_ms, seq.vision_ms, seq.prefill_ms, new_tokens=len(seq.tokens),
                      prompt_tokens=seq.prompt_len, tiles=len(request.pixel_values), cached_tokens=seq.cached)
    if seq.first_token_at is not None:
        timings.decode_ms = (seq.last_token_at - seq.first_token_at) * 1000
    text = prompts.clean_response(seq.detok.final_text)
    return ChatResult(text, list(seq.tokens), request.history + [(request.question, text)], seq.finish_reason, timings)


class BackendSet:
    """What ran, for results and reports: the one backend, or each graph's."""

    def __init__(self, backends: dict[str, Backend]):
        self.backends = backends
        names = {b.name for b in backends.values()}
        self.name = names.pop() if len(names) == 1 else ",".join(f"{r}={b.name}" for r, b in backends.items())

    def describe(self) -> dict:
        unique = {id(b): b for b in self.backends.values()}
        if len(unique) == 1:
            return next(iter(unique.values())).describe()
        return {"backend": self.name, "graphs": {role: b.describe() for role, b in self.backends.items()}}


def _as_list(images: Images) -> list[ImageInput]:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]
