"""ONNX Runtime sessions (CPU, or CUDA with onnxruntime-gpu), the decoder's KV cache held in two OrtValue buffers.

The decoder graph concatenates past and new keys into `present`, so each step reads the cache once and writes
it once. The two buffers are allocated at `reset` and swap roles every step: `present` is written straight into
the spare buffer through I/O binding and becomes the next step's `past` without a copy or an allocation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vl_export.errors import BackendUnavailableError, BundleError
from vl_export.manifest import GraphEntry

from .base import GPU_TILES_PER_RUN, Backend, DecoderSession, GraphSession

DEVICES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
SPIN = (0, 1, "decoder")  # 1: every session's pool spins when idle; 0: none; decoder: the decoder's only


def _import_ort():
    try:
        import onnxruntime
    except ImportError:
        raise BackendUnavailableError("the onnxruntime backend needs onnxruntime: pip install 'vl-export[runtime]'") from None
    return onnxruntime


# The GroupQueryAttention decoder relies on ONNX Runtime reading every position id of a prompt when query_seqlens is
# given (export/graphs_gqa.py; held by tests/test_gqa_decoder.py on 1.32), the stacked one on MultiHeadAttention's
# attention_bias and its cache-shaped (BNSH) keys. Older releases were not checked: refused.
GQA_MIN_ORT = (1, 32)


def _check_gqa_support(version: str, entry: GraphEntry) -> None:
    numbers = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
    if numbers < GQA_MIN_ORT:
        raise BackendUnavailableError(
            f"{entry.file} (the {entry.form} decoder) needs onnxruntime >= {'.'.join(map(str, GQA_MIN_ORT))}, "
            f"this is {version} (pip install 'onnxruntime>=1.32')")


class OrtBackend(Backend):
    name = "onnxruntime"

    def __init__(self, device: str = "cpu", threads: int | None = None, spin: int | str = "decoder"):
        ort = _import_ort()
        if spin not in SPIN:
            raise BackendUnavailableError(f"the onnxruntime option spin takes 0, 1 or decoder, got {spin!r}")
        # Whether idle intra-op threads spin or sleep between the parallel parts of a run. A decode step is a few
        # hundred small parallel parts: sleeping between them costs ~5 ms a step (1B INT4, 2 threads: 24.2 vs 19.0
        # ms, README #16), so the decoder's pool spins by default. The vision encoder's large matmuls do not care,
        # and the serving engine runs a newcomer's vision encoder on its own thread beside the decoder, where two
        # spinning pools steal each other's cores (4 streams: p95 inter-token latency 193 ms spinning vs 104 ms
        # sleeping, README Serving): servers therefore default to spin=0 (serving_options in backends/__init__.py).
        self.spin = spin
        if device not in DEVICES:
            raise BackendUnavailableError(f"unknown onnxruntime device {device!r} (choose from {', '.join(DEVICES)})")
        if DEVICES[device] not in ort.get_available_providers():
            raise BackendUnavailableError(
                f"onnxruntime has no {DEVICES[device]} here (install onnxruntime-gpu and a CUDA driver for --device cuda)"
            )
        self.ort = ort
        self.device = device
        self.threads = threads

    def _session(self, path: Path, decoder: bool = False):
        options = self.ort.SessionOptions()
        options.graph_optimization_level = self.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads:
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
        if not (self.spin == 1 or (self.spin == "decoder" and decoder)):
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        try:
            return self.ort.InferenceSession(str(path), sess_options=options, providers=[DEVICES[self.device]])
        except Exception as exc:  # onnxruntime raises its own exception types for unreadable graphs
            raise BundleError(f"onnxruntime cannot load {path.name}: {str(exc).splitlines()[0]}") from None

    def open_graph(self, bundle: Path, entry: GraphEntry) -> GraphSession:
        graph = OrtGraph(self._session(bundle / entry.file))
        if self.device != "cpu":
            graph.tiles_per_run = GPU_TILES_PER_RUN
        return graph

    def open_decoder(self, bundle: Path, entry: GraphEntry) -> DecoderSession:
        if is_inplace(entry):
            from .ort_inplace import OrtGqaDecoder, OrtInplaceDecoder, OrtStackedDecoder

            if self.device != "cpu":
                raise BackendUnavailableError(f"{entry.file} (the in-place cache decoder) runs on ONNX Runtime's CPU "
                                              "provider only; it has not been checked on CUDA")
            if entry.form is not None:
                _check_gqa_support(_import_ort().__version__, entry)
                made = OrtGqaDecoder if entry.form == "gqa" else OrtStackedDecoder
                return made(self._session(bundle / entry.file, decoder=True), entry, self)
            return OrtInplaceDecoder(self._session(bundle / entry.file, decoder=True), entry, self)
        return OrtDecoder(self._session(bundle / entry.file, decoder=True), entry, self)

    def describe(self) -> dict:
        return {"backend": self.name, "device": self.device, "threads": self.threads, "spin": self.spin,
                "version": self.ort.__version__}


def is_inplace(entry: GraphEntry) -> bool:
    """An in-place decoder graph (export/graphs_inplace.py) names its cache axis `capacity` instead of past/total."""
    past = [t for t in entry.inputs if t.name.startswith("past_key_values.")]
    return bool(past) and past[0].shape[2] == "capacity"


class OrtGraph(GraphSession):
    def __init__(self, session):
        self.session = session
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.session.run(self.output_names, feeds)))


class OrtDecoder(DecoderSession):
    def __init__(self, session, entry: GraphEntry, backend: OrtBackend):
        self.session = session
        self.backend = backend
        self._kv_layout(entry)
        self.capacity = 0
        self.buffers: list[list] = [[], []]  # two sets of one flat OrtValue per past/present tensor
        self.current = 0

    def reset(self, batch: int, capacity: int) -> None:
        size = batch * self.kv_heads * capacity * self.head_dim
        have = self.buffers[0][0].shape()[0] if self.buffers[0] else 0
        if size > have:
            make = self.backend.ort.OrtValue.ortvalue_from_shape_and_type
            self.buffers = [
                [make([size], self.kv_dtype, self.backend.device, 0) for _ in self.past_names] for _ in range(2)
            ]
        self.batch, self.past_len, self.current = batch, 0, 0
        self.capacity = have // (batch * self.kv_heads * self.head_dim) if size <= have else capacity

    def _kv_shape(self, length: int) -> list[int]:
        return [self.batch, self.kv_heads, length, self.head_dim]

    def forward(self, inputs_embeds, attention_mask, position_ids, logits_positions) -> np.ndarray:
        b, s = inputs_embeds.shape[:2]
        total = self.past_len + s
        if b != self.batch or total > self.capacity:
            raise RuntimeError(f"decoder cache holds {self.batch}x{self.capacity}, asked for {b}x{total}")
        binding = self.session.io_binding()
        for name, array in (
            ("inputs_embeds", inputs_embeds),
            ("attention_mask", attention_mask),
            ("position_ids", position_ids),
            ("logits_positions", logits_positions),
        ):
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        device, element = self.backend.device, self.kv_dtype.type
        past_shape, present_shape = self._kv_shape(self.past_len), self._kv_shape(total)
        for past, present, src, dst in zip(
            self.past_names, self.present_names, self.buffers[self.current], self.buffers[1 - self.current]
        ):
            binding.bind_input(past, device, 0, element, past_shape, src.data_ptr())
            binding.bind_output(present, device, 0, element, present_shape, dst.data_ptr())
        binding.bind_output("logits", "cpu")
        self.session.run_with_iobinding(binding)
        self.current = 1 - self.current
        self.past_len = total
        return binding.get_outputs()[-1].numpy()  # bound last

    def cache(self) -> list[np.ndarray]:
        count = self.batch * self.kv_heads * self.past_len * self.head_dim
        shape = self._kv_shape(self.past_len)
        return [buf.numpy()[:count].reshape(shape).copy() for buf in self.buffers[self.current]]

    def load_cache(self, cache: list[np.ndarray], capacity: int) -> None:
        batch, _, past, _ = cache[0].shape
        self.reset(batch, max(capacity, past))
        for buf, array in zip(self.buffers[0], cache):
            flat = np.ascontiguousarray(array, self.kv_dtype).reshape(-1)
            if self.backend.device == "cpu":
                buf.numpy()[: flat.size] = flat  # numpy() of a CPU OrtValue is a view of its memory
            else:  # update_inplace copies to the device, but only a whole buffer
                whole = np.zeros(buf.shape()[0], self.kv_dtype)
                whole[: flat.size] = flat
                buf.update_inplace(whole)
        self.past_len = past
