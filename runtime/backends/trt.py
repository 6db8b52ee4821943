"""TensorRT sessions: plans from the bundle's engines/, run with execute_async_v3 on device buffers allocated once.

Plans are refused before deserialization when engines.json says they were built by another TensorRT version, for
another GPU, or from another ONNX graph than the bundle holds now. The decoder's KV cache lives on the GPU in two
flat buffers per KV tensor, as in ort.py: `present` is written into the spare buffer, which becomes the next step's
`past`, so a step copies nothing but its new inputs in and its logits out.

Each optimization profile has its own execution context, set to its profile once: switching one context between
prefill and decode would cost a layer resource update on every switch (NvInferRuntime.h's warning on
setOptimizationProfileAsync). The contexts share one user-managed scratch allocation, sized for the largest profile
(getDeviceMemorySizeForProfileV2), since a session never runs two of them at once. Every limit (batch, sequence,
past, total, tiles) is read from the engine itself, never from the manifest's max_context.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vl_export.engines import (
    BACKEND,
    ENGINES_DIR,
    EngineRecord,
    Engines,
    Profile,
    Target,
    onnx_sha256,
    select_profile,
)
from vl_export.errors import BackendUnavailableError, BundleError, InputError
from vl_export.manifest import GraphEntry

from .base import GPU_TILES_PER_RUN, Backend, DecoderSession, GraphSession
from .cuda_rt import Cuda, DeviceBuffer, device_index, import_cudart, probe_gpu, tensorrt_cuda_major
from .trt_plan import axis_sizes, chunks, kv_bytes, numpy_dtype, profile_axes, resolve_shape

# 10.0: name-based tensors, INT64 IO, strongly typed networks; 10.1: get_device_memory_size_for_profile_v2 and
# set_device_memory(memory, size), which the user-managed contexts use.
MIN_TENSORRT = (10, 1)


def import_tensorrt():
    try:
        import tensorrt
    except ImportError:
        raise BackendUnavailableError(
            "the tensorrt backend needs TensorRT: pip install 'vl-export[trt]' or use NVIDIA's TensorRT container"
        ) from None
    version = tuple(int(part) for part in tensorrt.__version__.split(".")[:2])
    if version < MIN_TENSORRT:
        raise BackendUnavailableError(
            f"TensorRT {tensorrt.__version__} is too old; vl-export needs TensorRT 10.1 or newer"
        )
    return tensorrt


class TensorRTBackend(Backend):
    name = BACKEND

    def __init__(self, device: int | str = 0):
        index = device_index(device)
        trt = import_tensorrt()
        cudart = import_cudart()
        self.gpu = probe_gpu(cudart, index, tensorrt_cuda_major())
        self.trt = trt
        self.cuda = Cuda(cudart, index)  # the device is current in this thread; sessions re-assert it in theirs
        self.allocation = trt.ExecutionContextAllocationStrategy.USER_MANAGED
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
        self.cuda.activate()  # the engine's weights go to the current device
        engine = self.runtime.deserialize_cuda_engine((bundle / ENGINES_DIR / record.file).read_bytes())
        if engine is None:
            raise BundleError(f"TensorRT cannot deserialize {ENGINES_DIR}/{record.file} (its log above says why)")
        return engine, record

    def open_graph(self, bundle: Path, entry: GraphEntry) -> GraphSession:
        engine, record = self._load(bundle, entry)
        return TrtGraph(Bindings(engine, record, entry, self.cuda, self.allocation))

    def open_decoder(self, bundle: Path, entry: GraphEntry) -> DecoderSession:
        engine, record = self._load(bundle, entry)
        return TrtDecoder(Bindings(engine, record, entry, self.cuda, self.allocation), entry)

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


def engine_profiles(engine, entry: GraphEntry, names: list[str]) -> list[Profile]:
    """The engine's own optimization profiles as axis ranges (get_tensor_profile_shape), named as engines.json does."""
    profiles = []
    for i in range(engine.num_optimization_profiles):
        shapes = {t.name: engine.get_tensor_profile_shape(t.name, i) for t in entry.inputs}
        name = names[i] if i < len(names) else f"profile {i}"
        profiles.append(Profile(name, profile_axes(entry.inputs, shapes, entry.role)))
    return profiles


def gib(nbytes: int) -> str:
    return f"{nbytes / (1 << 30):.2f} GiB"


def open_contexts(engine, file: str, profiles: list[Profile], allocation, scratch: DeviceBuffer, cuda) -> list:
    """One execution context per profile, each set to its profile once, all on `scratch` (largest profile's size).

    Raises BackendUnavailableError naming each profile's device memory when the GPU cannot hold them: this is what
    `build_engines` runs after a build, so an engine whose context cannot be created is refused there."""
    sizes = [int(engine.get_device_memory_size_for_profile_v2(i)) for i in range(len(profiles))]
    need = max(sizes, default=0)
    per_profile = ", ".join(f"{p.name} {gib(n)}" for p, n in zip(profiles, sizes))
    try:
        ptr = scratch.ensure(need) if need else 0
    except RuntimeError as error:  # cudaMalloc's out-of-memory
        raise BackendUnavailableError(
            f"{file} needs {gib(need)} of device memory for its execution context (per profile: {per_profile}) and "
            f"the GPU has {gib(cuda.free_bytes())} free ({error}); rebuild the engines with a smaller --max-context "
            "or --prefill-chunk"
        ) from None
    contexts = []
    for index, profile in enumerate(profiles):
        context = engine.create_execution_context(allocation)
        if context is None:
            raise BackendUnavailableError(f"TensorRT could not create an execution context for {file} profile "
                                          f"{profile.name} (per profile: {per_profile}; its log above says why)")
        if index:  # a new context starts on profile 0; this raises RuntimeError when TensorRT refuses
            context.set_optimization_profile_async(index, cuda.stream_handle)
        context.set_device_memory(ptr, need)
        contexts.append(context)
    cuda.synchronize()
    return contexts


class Bindings:
    """One engine's execution contexts (one per profile), its limits, and one reusable device buffer per IO tensor."""

    def __init__(self, engine, record: EngineRecord, entry: GraphEntry, cuda, allocation):
        io = engine_io(engine)
        expected = {t.name: True for t in entry.inputs} | {t.name: False for t in entry.outputs}
        if {n: is_input for n, (is_input, _) in io.items()} != expected:
            raise BundleError(f"{ENGINES_DIR}/{record.file} has IO tensors {sorted(io)}, the manifest's {entry.role} "
                              f"graph has {sorted(expected)}; rebuild the engines")
        cuda.activate()
        self.engine = engine  # the contexts need their engine alive
        self.role, self.cuda = entry.role, cuda
        self.inputs, self.outputs = entry.inputs, entry.outputs
        self.profiles = engine_profiles(engine, entry, [p.name for p in record.profiles])
        self.scratch = DeviceBuffer(cuda)
        self.contexts = open_contexts(engine, record.file, self.profiles, allocation, self.scratch, cuda)
        self.dtypes = {n: numpy_dtype(dtype, n) for n, (_, dtype) in io.items()}
        self.buffers = {n: DeviceBuffer(cuda) for n in io}
        self.profile = 0
        self.context = self.contexts[0]

    def largest(self, axis: str) -> int:
        """The largest size of `axis` any profile takes (the engine's limit)."""
        return max(p.axes[axis][2] for p in self.profiles)

    def use_profile(self, sizes: dict[str, int]) -> None:
        """Run the next call on the context of the tightest profile holding `sizes`; callers then set every shape."""
        self.profile = select_profile(self.profiles, sizes, self.role)
        self.context = self.contexts[self.profile]

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
        self.cuda.activate()
        self.contexts, self.context = [], None  # the contexts go before the memory they run on
        for buffer in (*self.buffers.values(), self.scratch):
            buffer.release()


class TrtGraph(GraphSession):
    tiles_per_run = GPU_TILES_PER_RUN

    def __init__(self, bindings: Bindings):
        self.io = bindings
        self.max_tiles = bindings.largest("tiles")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        io = self.io
        io.cuda.activate()
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
        # The engine's limits, from its profiles: the runtime clamps a request to them or refuses it (generate.py).
        self.max_batch = bindings.largest("batch")
        self.max_positions = bindings.largest("total")  # past + new positions of one sequence
        self.max_seq = bindings.largest("seq")  # positions per run; a longer prompt is prefilled in chunks
        self.capacity = 0
        self.current = 0

    def reset(self, batch: int, capacity: int) -> None:
        if batch > self.max_batch or capacity > self.max_positions:
            raise InputError(
                f"the decoder engine was built for batch <= {self.max_batch} and <= {self.max_positions} positions, "
                f"asked for batch {batch} x {capacity}; rebuild the engines with larger limits"
            )
        self.io.cuda.activate()
        per_position = kv_bytes(batch, 1, self.kv_heads, self.head_dim, self.kv_dtype)
        for buffer in (b for pair in self.kv for b in pair):
            buffer.ensure(per_position * capacity)  # a no-op while the buffers from an earlier request are enough
        self.batch, self.past_len, self.current = batch, 0, 0
        self.capacity = self.kv[0][0].nbytes // per_position

    def forward(self, inputs_embeds, attention_mask, position_ids, logits_positions) -> np.ndarray:
        self.io.cuda.activate()  # this thread may not be the one that opened the session
        s = inputs_embeds.shape[1]
        if s <= self.max_seq:
            return self._run(inputs_embeds, attention_mask, position_ids, logits_positions)
        # Longer than the engine's prefill profile: run it in chunks, each on the cache the previous ones wrote,
        # keeping from each chunk the logits of the asked positions that fall inside it.
        past = self.past_len
        if attention_mask.shape[1] != past + s:
            raise InputError(f"attention_mask covers {attention_mask.shape[1]} positions, the cache and the new "
                             f"tokens {past + s}")
        logits = None
        for start, end in chunks(s, self.max_seq):
            local = np.clip(logits_positions - start, 0, end - start - 1)
            out = self._run(inputs_embeds[:, start:end], attention_mask[:, : past + end], position_ids[:, start:end],
                            local)  # (b, k, vocab)
            logits = np.empty_like(out) if logits is None else logits
            inside = (logits_positions >= start) & (logits_positions < end)  # (b, k)
            logits[inside] = out[inside]
        return logits

    def _run(self, inputs_embeds, attention_mask, position_ids, logits_positions) -> np.ndarray:
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
        self.io.cuda.activate()
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
        self.io.cuda.activate()
        for buffer in (b for pair in self.kv for b in pair):
            buffer.release()
        self.io.release()
