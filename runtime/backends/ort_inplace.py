"""ONNX Runtime sessions (CPU) for the in-place decoder graphs (export/graphs_inplace.py, and export/graphs_gqa.py's
GroupQueryAttention and stacked forms, which have the same IO): one (b, kv_heads, capacity, d) host buffer per KV tensor,
bound as both `past_key_values.*` and `present.*`, so a step writes only its new positions (ScatterElements and ScatterND skip their
copy when input and output are the same memory) and nothing is swapped, allocated or copied per step.

Besides the DecoderSession interface (one common past length, as the decode loop uses it), `forward_at` takes
per-row write positions and a full-capacity mask, so the rows of one buffer can be slots at different lengths.
"""

from __future__ import annotations

import numpy as np

from vl_export.manifest import GraphEntry

from .base import DecoderSession


GROW_POSITIONS = 256  # a view grows by at least this many positions, and at least doubles: amortised copies
PREFILL_CHUNK = 256  # the stacked decoder reads a longer prompt this many positions at a time


class OrtInplaceDecoder(DecoderSession):
    """Attention reads every position of the bound buffer, so the buffer a step sees (the view) is kept near what is
    used: it starts at the prompt plus GROW_POSITIONS and grows (doubling, the kept positions copied once) up to
    the capacity `reset` was given, instead of sizing it to prompt + max_new_tokens up front (1,024 new tokens by
    default: 10x the positions a short answer to a short prompt uses, all read at every step)."""

    def __init__(self, session, entry: GraphEntry, backend):
        self.session = session
        self.backend = backend
        self._kv_layout(entry)
        self.max_capacity = 0
        self.capacity = 0  # positions in the current view
        self.flat: list[np.ndarray] = []  # one flat host buffer per KV tensor, past and present at once
        self.views: list[np.ndarray] = []  # (b, kv_heads, capacity, d) views of the first elements of each flat buffer
        self.mask = np.zeros((0, 0), np.int64)  # (b, capacity): 1 where a row holds a real written position
        # The IO binding with the views bound as past and present, made once per view: binding 2 x layers buffers
        # every step cost 0.8 ms of Python around a 14 ms INT4 step (same-size 1B, README #16). None: to be made.
        self.binding = None
        self.vocab = int(entry.output("logits").shape[-1])

    def reset(self, batch: int, capacity: int) -> None:
        self.batch, self.past_len, self.max_capacity = batch, 0, capacity
        self.capacity, self.views, self.binding = 0, [], None
        self.mask = np.zeros((batch, 0), np.int64)

    def ensure(self, total: int) -> None:
        """Make the view hold at least `total` positions (a batching engine calls this before `forward_at`)."""
        if total <= self.capacity:
            return
        if total > self.max_capacity:
            raise RuntimeError(f"decoder cache holds {self.batch}x{self.max_capacity}, asked for {self.batch}x{total}")
        new = min(self.max_capacity, self.grown(total))
        kept = [view[:, :, : self.past_len].copy() for view in self.views]  # before the layout changes
        size = self.batch * self.kv_heads * new * self.head_dim
        if not self.flat or self.flat[0].size < size:
            self.flat = [np.empty(size, self.kv_dtype) for _ in self.past_names]
        self.views = [flat[:size].reshape(self.batch, self.kv_heads, new, self.head_dim) for flat in self.flat]
        self.binding = None
        for i, view in enumerate(self.views):
            # Zeros beyond the kept positions, not stale memory: masked positions still enter the matmuls (times a
            # zero weight), and uninitialised memory can hold NaN bit patterns, which a zero weight does not cancel.
            view[:, :, self.past_len :] = 0
            if kept:
                view[:, :, : self.past_len] = kept[i]
        mask = np.zeros((self.batch, new), np.int64)
        mask[:, : self.capacity] = self.mask
        self.mask, self.capacity = mask, new

    def grown(self, total: int) -> int:
        """The view's next size when `total` positions do not fit: at least doubled (amortised copies)."""
        return max(2 * self.capacity, total + GROW_POSITIONS)

    def forward(self, inputs_embeds, attention_mask, position_ids, logits_positions) -> np.ndarray:
        b, s = inputs_embeds.shape[:2]
        total = self.past_len + s
        if b != self.batch:
            raise RuntimeError(f"decoder cache holds {self.batch} rows, asked for {b}")
        self.ensure(total)
        self.mask[:, :total] = attention_mask
        write = np.broadcast_to(np.arange(self.past_len, total, dtype=np.int64), (b, s))
        logits = self.forward_at(inputs_embeds, self.mask, position_ids, logits_positions, write)
        self.past_len = total
        return logits

    def forward_at(self, inputs_embeds, mask, position_ids, logits_positions, write_positions) -> np.ndarray:
        """One step with explicit slots: `mask` (b, capacity) marks every real position after this step's writes,
        `write_positions` (b, s) where this step's positions go. Returns logits (b, k, vocab)."""
        if self.binding is None:
            self.binding = self.session.io_binding()
            element = self.kv_dtype.type
            for past, present, view in zip(self.past_names, self.present_names, self.views):
                self.binding.bind_input(past, "cpu", 0, element, list(view.shape), view.ctypes.data)
                self.binding.bind_output(present, "cpu", 0, element, list(view.shape), view.ctypes.data)
        binding = self.binding
        for name, array in (("inputs_embeds", inputs_embeds), ("attention_mask", mask), ("position_ids", position_ids),
                            ("logits_positions", logits_positions), ("write_positions", write_positions)):
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        # The logits into an array of the caller's own, written by the run (no copy of ONNX Runtime's output).
        logits = np.empty((*np.shape(logits_positions), self.vocab), np.float32)
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        return logits

    def cache(self) -> list[np.ndarray]:
        return [view[:, :, : self.past_len].copy() for view in self.views]

    def load_cache(self, cache: list[np.ndarray], capacity: int) -> None:
        """Replace the cache by host arrays, each (b, kv_heads, past, d) (the batching engine's relayout)."""
        batch, _, past, _ = cache[0].shape
        self.reset(batch, max(capacity, past))
        self.ensure(past)
        for view, array in zip(self.views, cache):
            view[:, :, :past] = array
        self.mask[:, :past] = 1  # forward() overwrites these with the caller's attention mask (padding included)
        self.past_len = past


class OrtGqaDecoder(OrtInplaceDecoder):
    """The GroupQueryAttention decoder (export/graphs_gqa.py): the same IO and buffers, but the operator writes a row's
    new positions at write_positions[:, -1] - s + 1 .. write_positions[:, -1], so each row's write positions must be
    consecutive (a scatter to arbitrary slots is refused, not approximated). Its graph is checked against the
    manifest when the session opens: the bundle is untrusted, and a GQA graph with other IO would write elsewhere."""

    def __init__(self, session, entry: GraphEntry, backend):
        super().__init__(session, entry, backend)
        _check_session_io(session, entry)

    def forward_at(self, inputs_embeds, mask, position_ids, logits_positions, write_positions) -> np.ndarray:
        write = np.asarray(write_positions)
        if write.shape[1] > 1 and (np.diff(write, axis=1) != 1).any():
            raise ValueError("the GroupQueryAttention decoder writes each row's new positions consecutively; "
                             f"got write positions {write.tolist()!r:.200}")
        return super().forward_at(inputs_embeds, mask, position_ids, logits_positions, write_positions)


class OrtStackedDecoder(OrtInplaceDecoder):
    """The stacked-query-group decoder (export/graphs_gqa.py, form "stacked"): the in-place decoder's IO and buffers
    (ScatterND writes any slot), attention over the whole view. So the view grows by GROW_POSITIONS at a time
    instead of doubling: after a 1,900-token prompt a doubled view would make every step read twice the positions it
    uses, while a copy of the kept cache every GROW_POSITIONS steps costs about what one step reads. Its graph is
    checked against the manifest when the session opens, as the GQA graph's."""

    def __init__(self, session, entry: GraphEntry, backend):
        super().__init__(session, entry, backend)
        _check_session_io(session, entry)

    def grown(self, total: int) -> int:
        return total + GROW_POSITIONS

    def forward(self, inputs_embeds, attention_mask, position_ids, logits_positions) -> np.ndarray:
        """A prompt longer than PREFILL_CHUNK is read in chunks, each attending over the view as it grows: a single
        run would attend every position over the whole prompt's view and hold (s*groups, capacity) scores per KV
        head (230 MB a layer at 1,900 positions); in chunks its prefill took as long as GroupQueryAttention's (README
        #16). The causal limit is each position's write position, so a chunk never sees later chunks' slots."""
        s = inputs_embeds.shape[1]
        if s <= PREFILL_CHUNK:
            return super().forward(inputs_embeds, attention_mask, position_ids, logits_positions)
        logits_positions = np.asarray(logits_positions)
        logits = None
        for start in range(0, s, PREFILL_CHUNK):
            stop = min(s, start + PREFILL_CHUNK)
            here = np.clip(logits_positions - start, 0, stop - start - 1)
            part = super().forward(inputs_embeds[:, start:stop], attention_mask[:, : self.past_len + stop - start],
                                   position_ids[:, start:stop], here)
            inside = ((logits_positions >= start) & (logits_positions < stop))[..., None]
            logits = part if logits is None else np.where(inside, part, logits)
        return logits


ORT_TYPES = {"float32": "tensor(float)", "float16": "tensor(float16)", "int64": "tensor(int64)"}


def _check_session_io(session, entry: GraphEntry) -> None:
    """The graph's IO names, element types and fixed sizes, in order, are the manifest's."""
    from vl_export.errors import BundleError

    for kind, specs, nodes in (("inputs", entry.inputs, session.get_inputs()), ("outputs", entry.outputs, session.get_outputs())):
        if len(nodes) != len(specs):
            raise BundleError(f"{entry.file} has {len(nodes)} {kind}, its manifest entry {len(specs)}")
        for spec, node in zip(specs, nodes):
            fixed = [d if isinstance(d, int) else None for d in spec.shape]
            shape = [d if isinstance(d, int) else None for d in node.shape]
            if (node.name, node.type, shape) != (spec.name, ORT_TYPES.get(spec.dtype), fixed):
                raise BundleError(f"{entry.file}'s {kind} do not match its manifest entry: graph {node.name} "
                                  f"{node.type} {node.shape}, manifest {spec.name} {spec.dtype} {list(spec.shape)}")
