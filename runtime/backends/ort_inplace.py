"""ONNX Runtime session for the in-place decoder graph: one (b, kv_heads, capacity, d) OrtValue per KV tensor, bound
as both `past_key_values.*` and `present.*`, so a step writes only its new positions (ScatterElements skips its
copy when input and output are the same memory) and nothing is swapped, allocated or copied per step.

Besides the DecoderSession interface (one common past length, as the decode loop uses it), `forward_at` takes
per-row write positions and a full-capacity mask, so the rows of one buffer can be slots at different lengths.
"""

from __future__ import annotations

import numpy as np

from vl_export.manifest import GraphEntry

from .base import DecoderSession


class OrtInplaceDecoder(DecoderSession):
    def __init__(self, session, entry: GraphEntry, backend):
        self.session = session
        self.backend = backend
        self.past_names = [t.name for t in entry.inputs if t.name.startswith("past_key_values.")]
        self.present_names = [t.name for t in entry.outputs if t.name.startswith("present.")]
        kv = entry.input(self.past_names[0])
        self.kv_heads, self.head_dim = int(kv.shape[1]), int(kv.shape[3])
        self.kv_dtype = np.dtype(kv.dtype)
        self.capacity = 0
        self.buffers: list = []  # one OrtValue (b, kv_heads, capacity, d) per KV tensor, past and present at once
        self.mask = np.zeros((0, 0), np.int64)  # (b, capacity): 1 where a row holds a real written position

    def reset(self, batch: int, capacity: int) -> None:
        if batch != self.batch or capacity > self.capacity or not self.buffers:
            shape = (batch, self.kv_heads, capacity, self.head_dim)
            # Zeros, not empty: masked positions still enter the matmuls (times a zero weight), and uninitialised
            # memory can hold NaN bit patterns, which a zero weight does not cancel.
            make = self.backend.ort.OrtValue.ortvalue_from_shape_and_type
            self.buffers = [make(shape, self.kv_dtype, self.backend.device, 0) for _ in self.past_names]
            for buffer in self.buffers:
                buffer.update_inplace(np.zeros(shape, self.kv_dtype))
            self.capacity = capacity
        self.batch, self.past_len = batch, 0
        self.mask = np.zeros((batch, self.capacity), np.int64)

    def forward(self, inputs_embeds, attention_mask, position_ids, logits_positions) -> np.ndarray:
        b, s = inputs_embeds.shape[:2]
        total = self.past_len + s
        if b != self.batch or total > self.capacity:
            raise RuntimeError(f"decoder cache holds {self.batch}x{self.capacity}, asked for {b}x{total}")
        self.mask[:, :total] = attention_mask
        write = np.broadcast_to(np.arange(self.past_len, total, dtype=np.int64), (b, s))
        logits = self.forward_at(inputs_embeds, self.mask, position_ids, logits_positions, write)
        self.past_len = total
        return logits

    def forward_at(self, inputs_embeds, mask, position_ids, logits_positions, write_positions) -> np.ndarray:
        """One step with explicit slots: `mask` (b, capacity) marks every real position after this step's writes,
        `write_positions` (b, s) where this step's positions go. Returns logits (b, k, vocab)."""
        binding = self.session.io_binding()
        for name, array in (("inputs_embeds", inputs_embeds), ("attention_mask", mask), ("position_ids", position_ids),
                            ("logits_positions", logits_positions), ("write_positions", write_positions)):
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for past, present, buffer in zip(self.past_names, self.present_names, self.buffers):
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)
        binding.bind_output("logits", "cpu")
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[-1].numpy()  # bound last

    def cache(self) -> list[np.ndarray]:
        return [buf.numpy()[:, :, : self.past_len].copy() for buf in self.buffers]
