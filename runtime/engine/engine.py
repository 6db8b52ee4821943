"""The continuous-batching engine: requests join the running batch between steps and leave when they finish.

Each `step`: rows that finished or were cancelled leave (their KV goes to the prefix cache) and prefilled ones join;
waiting requests take free slots (prefix-cache lookup, images to the encoder thread); one prefill advances (all of
it when nobody is decoding, one chunk when someone is); then every running row decodes one token in one decoder
call. A request's greedy tokens are the same alone or batched, cached or not; a seeded sampler is its own.
"""

from __future__ import annotations

import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from vl_export.errors import InputError

from ..sampling import GenerationConfig, Sampler
from ..tokenizer import IncrementalDecoder
from .cache import MiB, ImageCache, PrefixCache, image_key, pixel_digest
from .runner import Runner
from .scheduler import Scheduler
from .sequence import ImageSpan, Sequence, Status

log = logging.getLogger("vl_export.engine")


class NoMetrics:
    """What the engine reports to; the server's Metrics (Prometheus) has the same methods."""

    def token(self, seq: Sequence, now: float) -> None: ...

    def finished(self, seq: Sequence) -> None: ...


class Engine:
    def __init__(self, pipe, max_batch: int = 4, prefill_chunk: int = 512, kv_cache_mb: float = 0.0,
                 image_cache_mb: float = 0.0, metrics=None):
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        self.pipe = pipe
        self.scheduler = Scheduler(max_batch)
        self.runner = Runner(pipe.decoder, pipe.embed, prefill_chunk)
        self.prefix_cache = PrefixCache(kv_cache_mb * MiB) if kv_cache_mb > 0 else None
        self.image_cache = ImageCache(image_cache_mb * MiB) if image_cache_mb > 0 else None
        self.metrics = metrics or NoMetrics()
        # One thread runs the vision encoder, so a newcomer's images never stop the running streams' steps.
        self.encoder = ThreadPoolExecutor(1, thread_name_prefix="vl-export-vision")
        self.stop_ids = pipe.tokenizer.stop_ids
        self.max_context = pipe.manifest.max_context
        self._ids = itertools.count()

    # --- requests in and out ----------------------------------------------------------------------------------

    def add(self, request, generation: GenerationConfig, refuse_overlong: bool = False) -> Sequence:
        """Queue a prepared request (Pipeline.prepare). The new tokens are clipped to the context, as chat() does,
        or, with refuse_overlong (the server), a prompt + max_new_tokens over the context is an InputError."""
        ids = np.asarray(request.ids, np.int64)
        room = self.max_context - len(ids)
        if refuse_overlong and generation.max_new_tokens > room:
            raise InputError(f"the prompt is {len(ids)} tokens and max_tokens {generation.max_new_tokens}: together "
                             f"over the model's context of {self.max_context}")
        images = self._image_spans(ids, request.pixel_values, request.tiles_per_image)
        keys = ids.copy()
        for span in images:
            keys[span.start : span.end] = image_key(span.digest)
        seq = Sequence(next(self._ids), ids, keys, images, request.pixel_values, generation,
                       max_new=min(generation.max_new_tokens, room),
                       detok=IncrementalDecoder(self.pipe.tokenizer, generation.stop), sampler=Sampler(generation))
        self.scheduler.add(seq)
        return seq

    def abort(self, seq: Sequence, reason: str = "cancelled") -> None:
        """Stop a request wherever it is; a running row leaves the batch at the next step."""
        if seq.finished:
            return
        if seq not in self.runner.rows:
            self.scheduler.remove(seq)
        self._finish(seq, reason)

    @property
    def has_work(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.active or self.runner.rows)

    def close(self) -> None:
        self.encoder.shutdown(wait=True, cancel_futures=True)

    def stats(self) -> dict:
        return {"waiting": len(self.scheduler.waiting), "active": len(self.scheduler.active),
                "running_batch": len(self.runner.rows),
                "kv_cache": self.prefix_cache.describe() if self.prefix_cache else None,
                "image_cache": self.image_cache.describe() if self.image_cache else None}

    # --- the step -----------------------------------------------------------------------------------------------

    def step(self) -> None:
        self._relayout()
        for seq in self.scheduler.admit():
            self._start(seq)
        self._collect_encoded(block_for=None)
        plan = self.scheduler.schedule(self.runner.rows)
        if plan.wait_for is not None:
            self._collect_encoded(block_for=plan.wait_for)
            plan = self.scheduler.schedule(self.runner.rows)
        if plan.prefill is not None:
            self._prefill(plan.prefill, plan.whole)
        if plan.decode:
            self._decode()

    def _relayout(self) -> None:
        """Finished rows leave, prefilled ones join; the leavers' KV goes to the prefix cache."""
        keep = [s for s in self.runner.rows if s.status is Status.RUNNING]
        joining = [s for s in self.scheduler.running() if s not in self.runner.rows]
        if len(keep) == len(self.runner.rows) and not joining:
            return
        left = self.runner.relayout(keep + joining)
        for seq, kv in left.items():
            self.scheduler.remove(seq)
            self._remember(seq, kv)

    def _start(self, seq: Sequence) -> None:
        """A slot is free: take what the prefix cache has, send the images it does not cover to the encoder."""
        if self.prefix_cache is not None:
            seq.cached, prefix = self.prefix_cache.lookup(seq.keys, limit=seq.prompt_len - 1)  # keep one to get logits
            seq.done, seq.partial = seq.cached, prefix
        needed = [k for k, span in enumerate(seq.images) if span.end > seq.cached]
        if needed:
            seq.status = Status.ENCODING
            seq.encoding = self.encoder.submit(self._encode, seq, needed)
        else:
            seq.status = Status.PREFILLING

    def _encode(self, seq: Sequence, needed: list[int]) -> dict[int, np.ndarray]:
        """In the encoder thread: each image alone (so its embeddings never depend on the other images), cached."""
        start = time.perf_counter()
        out = {}
        for k in needed:
            span = seq.images[k]
            embeds = self.image_cache.get(span.digest) if self.image_cache is not None else None
            if embeds is None:
                embeds = self.pipe.encode_images(seq.pixel_values[span.first_tile : span.first_tile + span.tiles])
                if self.image_cache is not None:
                    self.image_cache.put(span.digest, embeds)
            out[k] = embeds  # (tiles, tokens, hidden)
        seq.vision_ms = (time.perf_counter() - start) * 1000
        return out

    def _collect_encoded(self, block_for: Sequence | None) -> None:
        if block_for is not None:
            block_for.encoding.exception()  # waits
        for seq in [s for s in self.scheduler.active if s.status is Status.ENCODING and s.encoding.done()]:
            error = seq.encoding.exception()
            if error is not None:
                self._fail(seq, error)
            else:
                seq.image_embeds = seq.encoding.result()
                seq.status = Status.PREFILLING
            seq.encoding = None

    def _prefill(self, seq: Sequence, whole: bool) -> None:
        start = time.perf_counter()
        try:
            if seq.embeds is None:
                seq.embeds, seq.image_embeds = self._prompt_embeds(seq), {}
            logits = self.runner.prefill(seq, seq.embeds, whole)
        except Exception as exc:  # this request's prompt failed; the running rows were put back and go on
            self._fail(seq, exc)
            return
        finally:
            seq.prefill_ms += (time.perf_counter() - start) * 1000
        if logits is None:
            return
        seq.embeds = None
        seq.status = Status.RUNNING  # joins the batch at the next step
        self._sample(seq, logits[None])
        if seq.finished:  # its first token ended it: it never joins, its prefill is still worth keeping
            self.scheduler.remove(seq)
            self._remember(seq, [t[0] for t in seq.partial])
            seq.partial = None

    def _decode(self) -> None:
        rows = self.runner.rows
        try:
            logits = self.runner.decode()
        except Exception as exc:  # the batched call failed: no row has a token; each is told, the engine goes on
            log.exception("decode step failed")
            for seq in rows:
                self._fail(seq, exc)
            return
        for i, seq in enumerate(rows):
            if not seq.finished:
                self._sample(seq, logits[i : i + 1])

    def _sample(self, seq: Sequence, logits: np.ndarray) -> None:
        """logits (1, vocab) -> one token for seq: stop tokens, stop strings and max_new as generate() decides."""
        try:
            token = int(seq.sampler(logits, [seq.tokens])[0])
            seq.tokens.append(token)
            now = time.perf_counter()
            self.metrics.token(seq, now)
            seq.first_token_at = seq.first_token_at or now
            seq.last_token_at = now
            if token in self.stop_ids and not seq.generation.ignore_eos:
                self._finish(seq, "stop")
                return
            piece = seq.detok.push(token)
            if piece:
                seq.text.append(piece)
            if seq.detok.stopped:
                self._finish(seq, "stop_string")
            elif len(seq.tokens) >= seq.max_new:
                self._finish(seq, "length")
        except Exception as exc:
            self._fail(seq, exc)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if reason in ("stop", "stop_string", "length"):
            tail = seq.detok.finish()
            if tail:
                seq.text.append(tail)
        seq.finish_reason, seq.status = reason, Status.FINISHED
        self.metrics.finished(seq)

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        if not isinstance(error, InputError):
            log.error("request %d failed: %s: %s", seq.id, type(error).__name__, error)
        seq.error = error
        if seq not in self.runner.rows:
            self.scheduler.remove(seq)
        self._finish(seq, "error")

    def _remember(self, seq: Sequence, kv: list[np.ndarray]) -> None:
        if self.prefix_cache is not None and seq.error is None:
            self.prefix_cache.store(seq.fed_keys, kv)

    # --- prompt layout ----------------------------------------------------------------------------------------

    def _image_spans(self, ids: np.ndarray, pixel_values: np.ndarray, tiles_per_image) -> list[ImageSpan]:
        per_tile = self.pipe.manifest.model.num_image_tokens
        rows = np.flatnonzero(ids == self.pipe.tokenizer.image_context)
        if len(rows) != sum(tiles_per_image) * per_tile:
            raise InputError(f"image tokens {len(rows)} in the prompt, image features {sum(tiles_per_image) * per_tile}: "
                             "they must match")
        spans, used = [], 0
        for tiles in tiles_per_image:
            first = int(rows[used * per_tile]) if tiles else 0
            end = first + tiles * per_tile
            if tiles and int(rows[(used + tiles) * per_tile - 1]) != end - 1:
                raise InputError("an image's tokens are not contiguous in the prompt")
            spans.append(ImageSpan(first, end, tiles, pixel_digest(pixel_values[used : used + tiles]), used))
            used += tiles
        return spans

    def _prompt_embeds(self, seq: Sequence) -> np.ndarray:
        """(prompt - cached, hidden): the token embeddings from seq.cached on, image rows from the projector."""
        embeds = self.pipe.embed(seq.ids[seq.cached :])
        for k, span in enumerate(seq.images):
            if span.end <= seq.cached:
                continue
            features = seq.image_embeds[k].reshape(-1, embeds.shape[-1])  # (tiles * tokens, hidden)
            first = max(span.start, seq.cached)
            embeds[first - seq.cached : span.end - seq.cached] = features[first - span.start :]
        return embeds
