"""TensorRT sessions: plans from the bundle's engines/, run with execute_async_v3 on device buffers allocated once.

Plans are refused before deserialization when engines.json says they were built by another TensorRT version, for
another GPU, or from another ONNX graph than the bundle holds now. The decoder's KV cache lives on the GPU in two
flat buffers per KV tensor, as in ort.py: `present` is written into the spare buffer, which becomes the next step's
`past`, so a step copies nothing but its new inputs in and its logits out. One execution context per engine switches
optimization profile (prefill / decode) only when the request's shapes move to the other one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vl_export.engines import BACKEND, ENGINES_DIR, Engines, EngineRecord, Target, onnx_sha256, select_profile
from vl_export.errors import BackendUnavailableError, BundleError, InputError
from vl_export.manifest import GraphEntry

from .base import Backend, DecoderSession, GraphSession
from .cuda_rt import Cuda, DeviceBuffer, device_index, import_cudart, probe_gpu
from .trt_plan import axis_sizes, kv_bytes, numpy_dtype, resolve_shape

MIN_TENSORRT_MAJOR = 10  # name-based tensors, INT64 IO and strongly typed networks


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailableError(
            "the tensorrt backend needs TensorRT: pip install 'vl-export[trt]' or use NVIDIA's TensorRT container"
        ) from None
    major = int(tensorrt.__version__.split(".")[0])
    if major < MIN_TENSORRT_MAJOR:
        raise BackendUnavailableError(
            f"TensorRT {tensorrt.__version__} is too old; vl-export needs TensorRT 10 or newer"
        )
    return tensorrt


class TensorRTBackend(Backend):
    name = BACKEND

    def __init__(self, device: int | str = 0):
        index = device_index(device)
        trt = import_tensorrt()
        cudart = import_cudart()
        self.gpu = probe_gpu(cudart, index)
        self.trt = trt
        self.cuda = Cuda(cudart, index)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.target = Target(trt.__version__, self.gpu.name, self.gpu.compute_capability)
        self._engines: dict[Path, Engines] = {}  # engines.json per bundle, read and checked once

    def _load(self, bundle: Path, entry: GraphEntry) -> tuple[object, EngineRecord]:
        bundle = Path(bundle).absolute()
        if bundle not in self._engines:
            engines = Engines.load(bundle)
            engines.check_target(self.target)
            self._engines[bundle] = engines
        record = self._engines[bundle].record_for(entry, onnx_sha256(bundle, entry))
        engine = self.runtime.deserialize_cuda_engine((bundle / ENGINES_DIR / record.file).read_bytes())
        if engine is None:
            raise BundleError(f"TensorRT cannot deserialize {ENGINES_DIR}/{record.file} (its log above says why)")
        return engine, record

    def open_graph(self, bundle: Path, entry: GraphEntry) -> GraphSession:
        engine, record = self._load(bundle, entry)
        return TrtGraph(Bindings(engine, record, entry, self.cuda))

    def open_decoder(self, bundle: Path, entry: GraphEntry) -> DecoderSession:
        engine, record = self._load(bundle, entry)
        return TrtDecoder(Bindings(engine, record, entry, self.cuda), entry)

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "device": f"cuda:{self.gpu.index}",
            "gpu": self.gpu.name,
            "compute_capability": self.gpu.compute_capability,
            "version": self.trt.__version__,
        }


def engine_io(engine) -> dict[str, tuple[bool, str]]:
    """name -> (is_input, TensorRT dtype name) for every IO tensor of a deserialized engine."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    return {n: (engine.get_tensor_mode(n).name == "INPUT", engine.get_tensor_dtype(n).name) for n in names}


class Bindings:
    """One engine's execution context, its profile choice, and one reusable device buffer per IO tensor."""

    def __init__(self, engine, record: EngineRecord, entry: GraphEntry, cuda):
        io = engine_io(engine)
        expected = {t.name: True for t in entry.inputs} | {t.name: False for t in entry.outputs}
        if {n: is_input for n, (is_input, _) in io.items()} != expected:
            raise BundleError(f"{ENGINES_DIR}/{record.file} has IO tensors {sorted(io)}, the manifest's {entry.role} "
                              f"graph has {sorted(expected)}; rebuild the engines")
        self.engine = engine  # the context needs its engine alive
        self.context = engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(f"TensorRT could not create an execution context for {record.file} (out of GPU memory?)")
        self.role, self.profiles, self.cuda = entry.role, record.profiles, cuda
        self.inputs, self.outputs = entry.inputs, entry.outputs
        self.dtypes = {n: numpy_dtype(dtype, n) for n, (_, dtype) in io.items()}
        self.buffers = {n: DeviceBuffer(cuda) for n in io}
        self.profile = 0  # a new context starts on profile 0

    def use_profile(self, sizes: dict[str, int]) -> None:
        index = select_profile(self.profiles, sizes, self.role)
        if index != self.profile:
            # Switching invalidates the input shapes; callers set every shape after this.
            if not self.context.set_optimization_profile_async(index, self.cuda.stream_handle):
                raise RuntimeError(f"TensorRT refused optimization profile {index} for the {self.role} engine")
            self.profile = index

    def set_input(self, name: str, shape: tuple[int, ...], ptr: int) -> None:
        if not self.context.set_input_shape(name, shape):
            raise InputError(f"the {self.role} engine refused {name} of shape {shape}")
        self.context.set_tensor_address(name, ptr)

    def copy_input(self, name: str, array: np.ndarray) -> None:
        if array.dtype != self.dtypes[name]:
            raise InputError(f"{name} is {array.dtype}, the {self.role} engine takes {self.dtypes[name]}")
        ptr = self.buffers[name].ensure(array.nbytes)
        self.cuda.to_device(ptr, array)
        self.set_input(name, tuple(array.shape), ptr)

    def output_shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.context.get_tensor_shape(name))  # concrete once every input shape is set

    def bind_output(self, name: str) -> np.ndarray:
        """A fresh host array for `name`, its device buffer bound; filled after execute and synchronize."""
        host = np.empty(self.output_shape(name), self.dtypes[name])
        self.context.set_tensor_address(name, self.buffers[name].ensure(host.nbytes))
        return host

    def execute(self, outputs: dict[str, np.ndarray]) -> None:
        if not self.context.execute_async_v3(self.cuda.stream_handle):
            raise RuntimeError(f"TensorRT failed to run the {self.role} engine (its log above says why)")
        for name, host in outputs.items():
            self.cuda.to_host(host, self.buffers[name].ptr)
        self.cuda.synchronize()

    def release(self) -> None:
        for buffer in self.buffers.values():
            buffer.release()


class TrtGraph(GraphSession):
    def __init__(self, bindings: Bindings):
        self.io = bindings

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        io = self.io
        io.use_profile(axis_sizes(io.inputs, {n: a.shape for n, a in feeds.items()}, io.role))
        for t in io.inputs:
            io.copy_input(t.name, feeds[t.name])
        outputs = {t.name: io.bind_output(t.name) for t in io.outputs}
        io.execute(outputs)
        return outputs

    def close(self) -> None:
        self.io.release()


class TrtDecoder(DecoderSession):
    STEP_INPUTS = ("inputs_embeds", "attention_mask", "position_ids", "logits_positions")

    def __init__(self, bindings: Bindings, entry: GraphEntry):
        self.io = bindings
        self.past_names = [t.name for t in entry.inputs if t.name.startswith("past_key_values.")]
        self.present_names = [t.name for t in entry.outputs if t.name.startswith("present.")]
        self.step_specs = [entry.input(n) for n in self.STEP_INPUTS]
        kv = entry.input(self.past_names[0])
        self.kv_shape = kv.shape  # ("batch", kv_heads, "past", head_dim)
        self.kv_heads, self.head_dim = int(kv.shape[1]), int(kv.shape[3])
        self.kv_dtype = bindings.dtypes[self.past_names[0]]
        # The cache's own buffers: two sets (past, present) of one flat buffer per KV tensor, swapped every step.
        self.kv = [[DeviceBuffer(bindings.cuda) for _ in self.past_names] for _ in range(2)]
        self.max_batch = max(p.axes["batch"][2] for p in bindings.profiles)
        self.max_total = max(p.axes["total"][2] for p in bindings.profiles)
        self.capacity = 0
        self.current = 0

    def reset(self, batch: int, capacity: int) -> None:
        if batch > self.max_batch or capacity > self.max_total:
            raise InputError(
                f"the decoder engine was built for batch <= {self.max_batch} and <= {self.max_total} positions, "
                f"asked for batch {batch} x {capacity}; rebuild the engines with larger limits"
            )
        per_position = kv_bytes(batch, 1, self.kv_heads, self.head_dim, self.kv_dtype)
        for buffer in (b for pair in self.kv for b in pair):
            buffer.ensure(per_position * capacity)  # a no-op while the buffers from an earlier request are enough
        self.batch, self.past_len, self.current = batch, 0, 0
        self.capacity = self.kv[0][0].nbytes // per_position

    def forward(self, inputs_embeds, attention_mask, position_ids, logits_positions) -> np.ndarray:
        io = self.io
        arrays = dict(zip(self.STEP_INPUTS, (inputs_embeds, attention_mask, position_ids, logits_positions)))
        sizes = axis_sizes(self.step_specs, {n: a.shape for n, a in arrays.items()}, io.role)
        b, s, total = sizes["batch"], sizes["seq"], self.past_len + sizes["seq"]
        if b != self.batch or total > self.capacity:
            raise RuntimeError(f"decoder cache holds {self.batch}x{self.capacity}, asked for {b}x{total}")
        if sizes["total"] != total:
            raise InputError(f"attention_mask covers {sizes['total']} positions, the cache and the new tokens {total}")
        sizes["past"] = self.past_len
        io.use_profile(sizes)
        for name, array in arrays.items():
            io.copy_input(name, array)
        past_shape = resolve_shape(self.kv_shape, sizes)  # (b, kv_heads, past, head_dim)
        for past, present, src, dst in zip(
            self.past_names, self.present_names, self.kv[self.current], self.kv[1 - self.current]
        ):
            io.set_input(past, past_shape, src.ptr)
            io.context.set_tensor_address(present, dst.ptr)
        present_shape = io.output_shape(self.present_names[0])
        if present_shape != (b, self.kv_heads, total, self.head_dim):
            raise RuntimeError(f"the decoder engine writes present of shape {present_shape}, the cache expects "
                               f"{(b, self.kv_heads, total, self.head_dim)}")
        logits = io.bind_output("logits")  # (b, num_logits, vocab)
        io.execute({"logits": logits})
        self.current = 1 - self.current
        self.past_len = total
        return logits

    def cache(self) -> list[np.ndarray]:
        shape = (self.batch, self.kv_heads, self.past_len, self.head_dim)
        hosts = [np.empty(shape, self.kv_dtype) for _ in self.past_names]
        for host, buffer in zip(hosts, self.kv[self.current]):
            self.io.cuda.to_host(host, buffer.ptr)
        self.io.cuda.synchronize()
        return hosts

    def load_cache(self, cache: list[np.ndarray], capacity: int) -> None:
        batch, _, past, _ = cache[0].shape
        self.reset(batch, max(capacity, past))
        for buffer, array in zip(self.kv[0], cache):  # (b, kv_heads, past, d) is the flat layout's prefix
            self.io.cuda.to_device(buffer.ptr, np.ascontiguousarray(array, self.kv_dtype))
        self.io.cuda.synchronize()
        self.past_len = past

    def close(self) -> None:
        for buffer in (b for pair in self.kv for b in pair):
            buffer.release()
        self.io.release()
