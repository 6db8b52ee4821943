"""OpenVINO sessions compiled from the bundle's ONNX graphs (IR cached by ov_cache), the decoder's KV cache in two
preallocated numpy buffers per KV tensor.

As in ort.py the two buffers swap roles every step: the infer request reads `past` from one and writes `present`
straight into the other, both handed to OpenVINO as shared-memory ov.Tensor views, so a step allocates nothing
and copies the cache only where the graph's own Concat does. Options: device (cpu), threads
(INFERENCE_NUM_THREADS), precision (`f32` exact, `bf16` fast where the CPU has bf16 instructions), hint
(PERFORMANCE_HINT, latency by default), cache_dir (where converted IR goes; "off" for none) and stateful (1: the
decoder's past/present pairs become OpenVINO variables kept inside the plugin, OvStatefulDecoder; 0: the shared
buffers above).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vl_export.errors import BackendUnavailableError, BundleError
from vl_export.manifest import GraphEntry

from . import ov_cache
from .base import Backend, DecoderSession, GraphSession
from .ov_pages import release_pages

# bf16 by default where the CPU has bf16 instructions, f32 elsewhere. Measured (tests/test_openvino.py, the 1B
# bundles in /work/bench, AMD EPYC with AVX-512 BF16, no AMX): bf16 keeps cosine >= 0.999 to PyTorch fp32 on vision
# features, image embeds and prefill logits, and runs the fp32 graphs' matmuls about 2x faster than f32 (the int8
# ones are int8 either way; bf16 speeds the float parts). f32 is the exact mode, equal to PyTorch within 1e-4.
PRECISIONS = {"f32": "f32", "fp32": "f32", "bf16": "bf16"}
CAPABILITY = {"f32": "FP32", "bf16": "BF16"}  # how OPTIMIZATION_CAPABILITIES names them
DEFAULT_PRECISION = "bf16"
# The decoder's cache inside the plugin or in shared host buffers: chosen by measurement (README, #16).
DEFAULT_STATEFUL = True
HINTS = ("latency", "throughput")
SWITCH = {"1": True, "true": True, "on": True, "yes": True, "0": False, "false": False, "off": False, "no": False}


def _import_ov():
    try:
        import openvino
    except ImportError:
        raise BackendUnavailableError("the openvino backend needs OpenVINO: pip install 'vl-export[openvino]'") from None
    return openvino


class OpenVinoBackend(Backend):
    name = "openvino"

    def __init__(self, device: str = "cpu", threads: int | None = None, precision: str | None = None,
                 hint: str = "latency", cache_dir: str | None = None, stateful: str | bool = DEFAULT_STATEFUL):
        ov = _import_ov()
        core = ov.Core()
        self.device = _device(core, device)
        capabilities = set(core.get_property(self.device, "OPTIMIZATION_CAPABILITIES"))
        self.precision = _precision(precision, capabilities, self.device)
        if hint.lower() not in HINTS:
            raise BackendUnavailableError(f"unknown OpenVINO hint {hint!r} (choose from {', '.join(HINTS)})")
        self.ov, self.core = ov, core
        self.threads, self.hint, self.cache_request = threads, hint.lower(), cache_dir
        self.stateful = _switch("stateful", stateful)
        self.cache_dir: Path | None = None  # decided per bundle at the first open

    def config(self) -> dict:
        config = {"INFERENCE_PRECISION_HINT": self.precision, "PERFORMANCE_HINT": self.hint.upper()}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = int(self.threads)
        return config

    def compile(self, bundle: Path, entry: GraphEntry, variables: dict[str, str] | None = None):
        """(compiled model, the files its weights are mapped from); `variables` (input -> output names) are made
        stateful first."""
        self.cache_dir = ov_cache.choose_dir(Path(bundle), self.cache_request)
        if not (Path(bundle) / entry.file).is_file():
            raise BundleError(f"bundle {bundle} is incomplete: {entry.file} is missing")
        try:
            model, weight_files = ov_cache.read_model(self.ov, self.core, Path(bundle), entry, self.cache_dir)
            config = self.config()
            if variables:
                from openvino._offline_transformations import apply_make_stateful_transformation

                apply_make_stateful_transformation(model, variables)
                # The plugin may keep variables it recognises as a KV cache in another type (u8 by default on some
                # CPUs): pin it to the inference precision, so f32 stays exact and bf16 is what was measured.
                config["KV_CACHE_PRECISION"] = self.precision
            return self.core.compile_model(model, self.device, config), weight_files
        except RuntimeError as exc:  # OpenVINO raises RuntimeError (with a long C++ trace) for what it cannot read
            raise BundleError(f"OpenVINO cannot load {entry.file}: {_first_line(exc)}") from None

    def open_graph(self, bundle: Path, entry: GraphEntry) -> GraphSession:
        return OvGraph(*self.compile(bundle, entry))

    def open_decoder(self, bundle: Path, entry: GraphEntry) -> DecoderSession:
        if self.stateful:
            pairs = OvStatefulDecoder.pairs(entry)
            return OvStatefulDecoder(*self.compile(bundle, entry, dict(pairs)), entry, self.ov)
        return OvDecoder(*self.compile(bundle, entry), entry, self.ov)

    def describe(self) -> dict:
        return {"backend": self.name, "device": self.device, "threads": self.threads, "precision": self.precision,
                "hint": self.hint, "stateful": self.stateful, "version": self.ov.get_version(),
                "ir_cache": str(self.cache_dir) if self.cache_dir else None}


def _device(core, device: str) -> str:
    """'cpu' -> 'CPU'; 'gpu' is any GPU.N OpenVINO lists. A device it cannot use is one clear line."""
    name = str(device).upper()
    available = list(core.available_devices)
    if name in available or any(d.split(".")[0] == name for d in available):
        return name
    raise BackendUnavailableError(f"OpenVINO cannot use device {device!r} here (available: {', '.join(available) or 'none'})")


def _precision(requested: str | None, capabilities: set[str], device: str) -> str:
    if requested is None:  # the measured default, where the hardware has it
        return DEFAULT_PRECISION if CAPABILITY[DEFAULT_PRECISION] in capabilities else "f32"
    key = str(requested).lower()
    if key not in PRECISIONS:
        raise BackendUnavailableError(f"unknown OpenVINO precision {requested!r} (choose from f32, bf16)")
    precision = PRECISIONS[key]
    if CAPABILITY[precision] not in capabilities:
        raise BackendUnavailableError(f"OpenVINO's {device} here has no {precision} support (it offers "
                                      f"{', '.join(sorted(capabilities))}); use precision=f32")
    return precision


def _switch(name: str, value) -> bool:
    key = str(value).lower()
    if key not in SWITCH:
        raise BackendUnavailableError(f"OpenVINO option {name}={value!r} is not a switch (use 1 or 0)")
    return SWITCH[key]


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip() and not line.lstrip().startswith("Exception from")]
    return lines[0] if lines else type(exc).__name__


def _bind_inputs(request, tensor, dtypes: dict, **arrays: np.ndarray) -> None:
    """The decoder's plain inputs, read in place by the request (as the graph's dtypes)."""
    for name, array in arrays.items():
        request.set_tensor(name, tensor(np.ascontiguousarray(array, dtype=dtypes[name]), shared_memory=True))


def _release_after_first(weight_files: list[Path], packed: set[bool], prefill: bool) -> None:
    """Prefill and single-token steps pack their weights apart (ov_pages): drop the mapped pages after the first of
    each kind since the last reset."""
    if prefill not in packed:
        release_pages(weight_files)
        packed.add(prefill)


class OvGraph(GraphSession):
    def __init__(self, compiled, weight_files: list[Path]):
        self.compiled = compiled
        # One request per compiled model, always: the CPU plugin shares a stream's graph memory between requests,
        # and a second request without our output tensors beside one with them corrupted the heap (OpenVINO 2026.4).
        self.request = compiled.create_infer_request()
        self.output_names = [o.get_any_name() for o in compiled.outputs]
        self.weight_files = weight_files

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Inputs are read in place; outputs are copied, because the request reuses their memory on the next call
        # and the pipeline keeps one run's embeddings while it encodes the next run of tiles.
        feeds = {name: np.ascontiguousarray(array) for name, array in feeds.items()}
        out = self.request.infer(feeds, share_inputs=True, share_outputs=False)
        # Every run, not just the first: a new tile count can pick kernels that pack the weights afresh. It costs
        # well under a millisecond against seconds of vision encoding.
        release_pages(self.weight_files)
        return {name: out[name] for name in self.output_names}


class OvDecoder(DecoderSession):
    def __init__(self, compiled, weight_files: list[Path], entry: GraphEntry, ov):
        self.compiled = compiled
        self.request = compiled.create_infer_request()  # the only one (see OvGraph)
        self.weight_files = weight_files
        self.packed: set[bool] = set()  # step kinds (prefill or not) run since the mapped weights were released
        self.Tensor = ov.Tensor
        self.past_names = [t.name for t in entry.inputs if t.name.startswith("past_key_values.")]
        self.present_names = [t.name for t in entry.outputs if t.name.startswith("present.")]
        self.input_dtypes = {t.name: np.dtype(t.dtype) for t in entry.inputs if not t.name.startswith("past_key_values.")}
        kv = entry.input(self.past_names[0])
        self.kv_heads, self.head_dim = int(kv.shape[1]), int(kv.shape[3])
        self.kv_dtype = np.dtype(kv.dtype)
        self.capacity = 0
        self.buffers: list[list[np.ndarray]] = [[], []]  # two sets of one flat buffer per past/present tensor
        self.current = 0

    def reset(self, batch: int, capacity: int) -> None:
        size = batch * self.kv_heads * capacity * self.head_dim
        have = self.buffers[0][0].size if self.buffers[0] else 0
        if size > have:
            self.buffers = [[np.empty(size, self.kv_dtype) for _ in self.past_names] for _ in range(2)]
        self.batch, self.past_len, self.current = batch, 0, 0
        self.packed.clear()  # once per request: a new prompt length may pick kernels that pack weights afresh
        self.capacity = max(size, have) // (batch * self.kv_heads * self.head_dim)

    def _view(self, flat: np.ndarray, length: int):
        """The first (b, kv_heads, length, d) elements of a flat buffer, as an ov.Tensor on the same memory."""
        count = self.batch * self.kv_heads * length * self.head_dim
        return self.Tensor(flat[:count].reshape(self.batch, self.kv_heads, length, self.head_dim), shared_memory=True)

    def forward(self, inputs_embeds, attention_mask, position_ids, logits_positions) -> np.ndarray:
        b, s = inputs_embeds.shape[:2]
        total = self.past_len + s
        if b != self.batch or total > self.capacity:
            raise RuntimeError(f"decoder cache holds {self.batch}x{self.capacity}, asked for {b}x{total}")
        request = self.request
        _bind_inputs(request, self.Tensor, self.input_dtypes, inputs_embeds=inputs_embeds,
                     attention_mask=attention_mask, position_ids=position_ids, logits_positions=logits_positions)
        for past, present, src, dst in zip(self.past_names, self.present_names,
                                           self.buffers[self.current], self.buffers[1 - self.current]):
            request.set_tensor(past, self._view(src, self.past_len))
            request.set_tensor(present, self._view(dst, total))
        request.infer()
        _release_after_first(self.weight_files, self.packed, s > 1)
        self.current = 1 - self.current
        self.past_len = total
        return request.get_tensor("logits").data.copy()  # (b, k, vocab); the request reuses its memory

    def cache(self) -> list[np.ndarray]:
        count = self.batch * self.kv_heads * self.past_len * self.head_dim
        shape = (self.batch, self.kv_heads, self.past_len, self.head_dim)
        return [buf[:count].reshape(shape).copy() for buf in self.buffers[self.current]]

    def load_cache(self, cache: list[np.ndarray], capacity: int) -> None:
        batch, _, past, _ = cache[0].shape
        self.reset(batch, max(capacity, past))
        for buf, array in zip(self.buffers[0], cache):
            buf[: array.size] = np.asarray(array, self.kv_dtype).reshape(-1)
        self.past_len = past


class OvStatefulDecoder(DecoderSession):
    """The portable decoder made stateful at load (OpenVINO's MakeStateful, as the models openvino-genai runs are
    built): each past_key_values.{i}.* input and its present.{i}.* output become one variable the plugin keeps, so a
    step passes neither the cache in nor gets it back, and the plugin may keep it in its own layout (its fused
    attention appends in place). The bundle's graph is unchanged; the transformation runs on the loaded model.

    The variables are read and written only where the interface asks for host copies: `cache` and `load_cache`
    (the serving engine's batch layout and prefix cache), `reset` (empty variables of the new batch size).
    Capacity means nothing here (the plugin grows its cache); it is kept for the interface's sake.
    """

    def __init__(self, compiled, weight_files: list[Path], entry: GraphEntry, ov):
        self._kv_layout(entry)
        self.compiled, self.weight_files, self.Tensor = compiled, weight_files, ov.Tensor
        self.request = compiled.create_infer_request()  # the only one (see OvGraph)
        self.packed: set[bool] = set()
        self.input_dtypes = {t.name: np.dtype(t.dtype) for t in entry.inputs if not t.name.startswith("past_key_values.")}
        self.states = self._states_in_graph_order()
        self.capacity = 0

    @staticmethod
    def pairs(entry: GraphEntry) -> list[tuple[str, str]]:
        """(past input, present output) per cache tensor, in graph order; the manifest's names must pair up."""
        inputs = [t.name for t in entry.inputs if t.name.startswith("past_key_values.")]
        outputs = {t.name for t in entry.outputs if t.name.startswith("present.")}
        pairs = [(name, "present." + name[len("past_key_values."):]) for name in inputs]
        if not pairs or {p for _, p in pairs} != outputs:
            raise BundleError(f"{entry.file}: past_key_values.* inputs and present.* outputs do not pair up")
        return pairs

    def _states_in_graph_order(self) -> list:
        """The request's variables, one per past input, in graph order. MakeStateful names a variable after its
        input and output; the match is on both names, so layer 1 never takes layer 11's variable."""
        states = list(self.request.query_state())
        ordered = []
        for past, present in zip(self.past_names, self.present_names):
            found = [s for s in states if s.name.startswith(past) and s.name[len(past):].startswith(present)]
            if len(found) != 1:
                raise BundleError(f"OpenVINO made {len(found)} variables for {past} -> {present} (expected one)")
            ordered.append(found[0])
        return ordered

    def _empty(self, batch: int) -> None:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), self.kv_dtype)
        for state in self.states:
            state.state = self.Tensor(empty)

    def reset(self, batch: int, capacity: int) -> None:
        self._empty(batch)
        self.batch, self.past_len, self.capacity = batch, 0, capacity
        self.packed.clear()

    def forward(self, inputs_embeds, attention_mask, position_ids, logits_positions) -> np.ndarray:
        b, s = inputs_embeds.shape[:2]
        if b != self.batch:
            raise RuntimeError(f"decoder cache holds {self.batch} sequences, asked for {b}")
        request = self.request
        _bind_inputs(request, self.Tensor, self.input_dtypes, inputs_embeds=inputs_embeds,
                     attention_mask=attention_mask, position_ids=position_ids, logits_positions=logits_positions)
        request.infer()
        _release_after_first(self.weight_files, self.packed, s > 1)
        self.past_len += s
        self.capacity = max(self.capacity, self.past_len)
        return request.get_tensor("logits").data.copy()

    def cache(self) -> list[np.ndarray]:
        return [np.array(state.state.data, dtype=self.kv_dtype, copy=True) for state in self.states]

    def load_cache(self, cache: list[np.ndarray], capacity: int) -> None:
        batch, _, past, _ = cache[0].shape
        for state, array in zip(self.states, cache):
            state.state = self.Tensor(np.ascontiguousarray(array, dtype=self.kv_dtype))
        self.batch, self.past_len, self.capacity = batch, past, max(capacity, past)
        self.packed.clear()
