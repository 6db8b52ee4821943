"""The session interface every backend implements: plain graphs, and the decoder with its KV cache."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from vl_export.manifest import GraphEntry


# Tiles per vision run, where the caller does not choose. On a GPU, 8: TensorRT's vision profiles are tuned for it.
# On a CPU, 2: a run's activations grow with its tiles (a 7-tile image on the same-size 1B INT4 bundle, OpenVINO
# vision + ONNX Runtime decoder: peak RSS 1,610 MiB in runs of 8, 1,402 MiB in runs of 2) and the time per tile does
# not (1.72 / 1.63 / 1.59 s a tile in runs of 8 / 4 / 2 on OpenVINO; 2.33 / 2.20 / 2.36 s on ONNX Runtime; README #16).
GPU_TILES_PER_RUN = 8
CPU_TILES_PER_RUN = 2


class GraphSession(ABC):
    """One graph compiled for one backend; numpy arrays in, numpy arrays out."""

    max_tiles: int | None = None  # most tiles one run takes (a TensorRT engine's profile); None: no limit
    tiles_per_run: int = CPU_TILES_PER_RUN  # the run size the session does best with (see above)

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class DecoderSession(ABC):
    """The decoder graph and its KV cache, which stays where the backend keeps it between calls.

    Buffers are allocated by `reset` and reused across requests while they are large enough; `forward` appends
    the new positions to the cache without copying the old ones more than the graph itself does.
    """

    past_len: int = 0
    batch: int = 0

    def _kv_layout(self, entry: GraphEntry) -> None:
        """The cache tensors' names, heads, head size and dtype, as the manifest gives them."""
        self.past_names = [t.name for t in entry.inputs if t.name.startswith("past_key_values.")]
        self.present_names = [t.name for t in entry.outputs if t.name.startswith("present.")]
        kv = entry.input(self.past_names[0])  # (batch, kv_heads, past, head_dim)
        self.kv_heads, self.head_dim = int(kv.shape[1]), int(kv.shape[3])
        self.kv_dtype = np.dtype(kv.dtype)
    # What the session can hold, where it is less than the model's context (a TensorRT engine's profiles);
    # None: no limit of its own. generate() clamps max_new_tokens to max_positions or refuses the prompt.
    max_positions: int | None = None  # past + new positions per sequence
    max_batch: int | None = None

    @abstractmethod
    def reset(self, batch: int, capacity: int) -> None:
        """Empty the cache for `batch` sequences of up to `capacity` positions (past + new) each."""

    @abstractmethod
    def forward(
        self,
        inputs_embeds: np.ndarray,  # (b, s, hidden) float32
        attention_mask: np.ndarray,  # (b, past + s) int64
        position_ids: np.ndarray,  # (b, s) int64
        logits_positions: np.ndarray,  # (b, k) int64
    ) -> np.ndarray:
        """Run the new positions, append their keys and values to the cache, return logits (b, k, vocab)."""

    @abstractmethod
    def cache(self) -> list[np.ndarray]:
        """Host copies of the cache in graph order (layer 0 key, layer 0 value, ...), each (b, kv_heads, past, d)."""

    @abstractmethod
    def load_cache(self, cache: list[np.ndarray], capacity: int) -> None:
        """Replace the cache by host arrays in graph order, each (b, kv_heads, past, d): batch becomes b, past_len
        becomes past, and the buffers hold at least `capacity` positions (as `reset`).

        The serving engine lays out each new running batch with it (requests join and leave between steps) and
        resumes a prompt from a cached prefix; `load_cache(cache(), capacity)` changes nothing but the capacity.
        """


class Backend(ABC):
    """Opens a bundle's graphs for one runtime (ONNX Runtime, OpenVINO or TensorRT)."""

    name: str

    @abstractmethod
    def open_graph(self, bundle: Path, entry: GraphEntry) -> GraphSession: ...

    @abstractmethod
    def open_decoder(self, bundle: Path, entry: GraphEntry) -> DecoderSession: ...

    def describe(self) -> dict:
        """What ran: backend, device, threads, versions; goes into results and benchmark reports."""
        return {"backend": self.name}
