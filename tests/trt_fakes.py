"""A CPU stand-in for cuda-python and TensorRT, strict where the real APIs are, so the sessions run without a GPU.

FakeCudart is `cuda.bindings.runtime` with host memory as "device memory": cudaMalloc hands out the address of a
numpy buffer, so the real `Cuda` class copies with memmove. Like CUDA, the current device is per thread (a new
thread starts on device 0), a stream belongs to the device current when it was made, every allocation belongs to
the device current when it was made, and a stream used from a thread on another device is an error.

The fake engines follow TensorRT 11 (pyCore.cpp, NvInferRuntime.h): each context starts on profile 0;
set_optimization_profile_async raises RuntimeError when TensorRT refuses (it never returns False); the limits are
per profile (get_tensor_profile_shape); get_device_memory_size_for_profile_v2 is per profile, and a USER_MANAGED
context needs set_device_memory of at least that much before it runs; a context runs on the device its engine was
deserialized on. FakeDecoderEngine computes what the decoder graph computes structurally (present = past ++ new
keys/values; logits from the gathered positions), reading and writing memory through the bound addresses, so a
wrong pointer, a missed swap or a wrong device shows up as wrong numbers or an error.
"""

from __future__ import annotations

import ctypes
import threading
from types import ModuleType, SimpleNamespace

import numpy as np

from vl_export.engines import Profile
from vl_export.manifest import GraphEntry

TRT_DTYPE_NAMES = {"float32": "FLOAT", "float16": "HALF", "int64": "INT64"}
BACKED_BYTES = 256 << 20  # larger fake allocations get an address but no memory (nothing may copy into them)
STRATEGIES = SimpleNamespace(STATIC="STATIC", ON_PROFILE_CHANGE="ON_PROFILE_CHANGE", USER_MANAGED="USER_MANAGED")
SUCCESS, INVALID_VALUE, OUT_OF_MEMORY, INSUFFICIENT_DRIVER, NO_DEVICE, INVALID_DEVICE, INVALID_HANDLE = (
    0, 1, 2, 35, 100, 101, 400
)
ERROR_NAMES = {
    INVALID_VALUE: b"cudaErrorInvalidValue", OUT_OF_MEMORY: b"cudaErrorMemoryAllocation",
    INSUFFICIENT_DRIVER: b"cudaErrorInsufficientDriver", NO_DEVICE: b"cudaErrorNoDevice",
    INVALID_DEVICE: b"cudaErrorInvalidDevice", INVALID_HANDLE: b"cudaErrorInvalidResourceHandle",
}


class FakeStream:
    """cudaStream_t: its address comes from get_cuda_native_handle; int() is deprecated and refused here."""

    def __init__(self, handle: int, device: int):
        self.handle, self.device = handle, device

    def __int__(self):
        raise AssertionError("int(cudaStream_t) is deprecated: use cuda.bindings.utils.get_cuda_native_handle")


class FakeCudart(ModuleType):
    """cuda.bindings.runtime on a machine with `devices` GPUs of `memory_bytes` each (0 devices: no GPU)."""

    def __init__(self, devices: int = 1, memory_bytes: int = 80 << 30, runtime: int = 13000, driver: int = 13000):
        super().__init__("cuda.bindings.runtime")
        self.devices, self.memory_bytes, self.runtime, self.driver = devices, memory_bytes, runtime, driver
        self.cudaError_t = SimpleNamespace(cudaSuccess=SUCCESS)
        self.cudaMemcpyKind = SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
        self._thread = threading.local()
        self.allocations: dict[int, tuple[np.ndarray | None, int, int]] = {}  # ptr -> (backing, nbytes, device)
        self.used = [0] * max(devices, 1)
        self.mallocs = 0
        self.streams = 0
        self._virtual = 1 << 44  # addresses of unbacked allocations, far from any real one

    # --- devices ---
    def current(self) -> int:
        return getattr(self._thread, "device", 0)

    def _fails(self) -> int | None:
        if self.driver // 1000 < self.runtime // 1000:
            return INSUFFICIENT_DRIVER
        return None if self.devices else NO_DEVICE

    def cudaRuntimeGetVersion(self):
        return SUCCESS, self.runtime

    def cudaDriverGetVersion(self):
        return SUCCESS, self.driver

    def cudaGetDeviceCount(self):
        err = self._fails()
        return (err, 0) if err else (SUCCESS, self.devices)

    def cudaGetErrorName(self, err):
        return SUCCESS, ERROR_NAMES[err]

    def cudaSetDevice(self, device):
        err = self._fails()
        if err:
            return (err,)
        if not 0 <= device < self.devices:
            return (INVALID_DEVICE,)
        self._thread.device = device
        return (SUCCESS,)

    def cudaGetDeviceProperties(self, device):
        return SUCCESS, SimpleNamespace(name=b"NVIDIA H100 80GB HBM3\x00", major=9, minor=0,
                                        totalGlobalMem=self.memory_bytes)

    def cudaMemGetInfo(self):
        return SUCCESS, self.memory_bytes - self.used[self.current()], self.memory_bytes

    # --- streams and memory ---
    def cudaStreamCreate(self):
        self.streams += 1
        return SUCCESS, FakeStream(0x5000 + self.streams, self.current())

    def cudaStreamSynchronize(self, stream):
        return (SUCCESS,) if stream.device == self.current() else (INVALID_HANDLE,)

    def cudaMalloc(self, nbytes):
        device = self.current()
        if self.used[device] + nbytes > self.memory_bytes:
            return OUT_OF_MEMORY, 0
        if nbytes <= BACKED_BYTES:
            backing = np.zeros(max(nbytes, 1), np.uint8)
            ptr = backing.ctypes.data
        else:
            backing, ptr = None, self._virtual
            self._virtual += nbytes + 4096
        self.allocations[ptr] = (backing, nbytes, device)
        self.used[device] += nbytes
        self.mallocs += 1
        return SUCCESS, ptr

    def cudaFree(self, ptr):
        if ptr not in self.allocations:
            return (INVALID_VALUE,)
        _, nbytes, device = self.allocations.pop(ptr)
        self.used[device] -= nbytes
        return (SUCCESS,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        if stream.device != self.current():
            return (INVALID_HANDLE,)  # a stream of another device than the calling thread's
        self.check_device_span(dst if kind == 1 else src, nbytes, stream.device)
        ctypes.memmove(dst, src, nbytes)
        return (SUCCESS,)

    # --- for the fake engines and the tests ---
    def check_device_span(self, ptr: int, nbytes: int, device: int) -> None:
        """`ptr` .. `ptr + nbytes` lies in one backed allocation made on `device`."""
        for start, (backing, size, owner) in self.allocations.items():
            if start <= ptr and ptr + nbytes <= start + size:
                assert backing is not None, "copy into an allocation too large for the fake to back"
                assert owner == device, f"memory of GPU {owner} used on GPU {device}"
                return
        raise AssertionError(f"{nbytes} bytes at {ptr:#x} are not inside a device allocation")

    def read(self, ptr: int, shape, dtype) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        self.check_device_span(ptr, nbytes, self.current())
        raw = (ctypes.c_uint8 * nbytes).from_address(ptr)
        return np.frombuffer(raw, np.uint8).view(dtype).reshape(shape).copy()

    def write(self, ptr: int, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array)
        self.check_device_span(ptr, array.nbytes, self.current())
        ctypes.memmove(ptr, array.ctypes.data, array.nbytes)


def fake_cuda_python(monkeypatch, cudart: FakeCudart) -> None:
    """Install cuda.bindings.runtime (and cuda.bindings.utils, for the native stream handle) as the fakes."""
    import sys

    utils = SimpleNamespace(get_cuda_native_handle=lambda obj: obj.handle)
    monkeypatch.setitem(sys.modules, "cuda", SimpleNamespace())
    monkeypatch.setitem(sys.modules, "cuda.bindings", SimpleNamespace(runtime=cudart, utils=utils))
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    monkeypatch.setitem(sys.modules, "cuda.bindings.utils", utils)


class FakeContext:
    def __init__(self, engine, strategy):
        self.engine, self.strategy = engine, strategy
        self.profile = 0  # as in TensorRT: a new context is on profile 0
        self.switches: list[int] = []
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}
        self.memory: tuple[int, int] | None = None  # (ptr, size) given by set_device_memory

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        if not 0 <= index < self.engine.num_optimization_profiles:
            raise RuntimeError("Error in set optimization profile async.")  # pyCore.cpp: PY_ASSERT_RUNTIME_ERROR
        self.profile = index
        self.switches.append(index)
        self.shapes.clear()  # switching invalidates the input shapes
        return True

    def set_device_memory(self, ptr: int, size: int) -> None:
        self.memory = (ptr, size)

    def set_input_shape(self, name: str, shape) -> bool:
        low, _, high = self.engine.profile_shapes[self.profile][name]
        if not all(lo <= s <= hi for lo, s, hi in zip(low, shape, high)):
            return False
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def get_tensor_shape(self, name: str) -> tuple:
        return self.engine.output_shape(self.shapes, name)

    def execute_async_v3(self, stream: int) -> bool:
        engine = self.engine
        assert engine.cudart.current() == engine.device, (
            f"an engine of GPU {engine.device} run from a thread on GPU {engine.cudart.current()}"
        )
        assert set(self.shapes) == set(engine.input_names), "every input shape must be set after a switch"
        if self.strategy == STRATEGIES.USER_MANAGED:
            need = engine.get_device_memory_size_for_profile_v2(self.profile)
            assert self.memory is not None and self.memory[1] >= need, "USER_MANAGED context without enough memory"
        engine.compute(self)
        engine.runs.append(self.profile)
        return True


class FakeEngine:
    def __init__(self, entry: GraphEntry, profiles: list[Profile], cudart: FakeCudart,
                 memory_per_profile: list[int] | None = None):
        self.entry, self.cudart = entry, cudart
        self.device = cudart.current()  # deserialized on the thread's current device
        self.io = [(t, True) for t in entry.inputs] + [(t, False) for t in entry.outputs]
        self.input_names = [t.name for t in entry.inputs]
        self.profile_shapes = [p.shapes(entry.inputs) for p in profiles]
        self.num_io_tensors = len(self.io)
        self.num_optimization_profiles = len(profiles)
        self.memory_per_profile = memory_per_profile or [4096 * (i + 1) for i in range(len(profiles))]
        self.contexts: list[FakeContext] = []
        self.runs: list[int] = []  # the profile of every run, in order

    def get_tensor_name(self, i: int) -> str:
        return self.io[i][0].name

    def _spec(self, name):
        return next((t, is_input) for t, is_input in self.io if t.name == name)

    def get_tensor_mode(self, name: str):
        return SimpleNamespace(name="INPUT" if self._spec(name)[1] else "OUTPUT")

    def get_tensor_dtype(self, name: str):
        return SimpleNamespace(name=TRT_DTYPE_NAMES[self._spec(name)[0].dtype])

    def get_tensor_profile_shape(self, name: str, profile_index: int):
        return [list(shape) for shape in self.profile_shapes[profile_index][name]]

    def get_device_memory_size_for_profile_v2(self, profile_index: int) -> int:
        return self.memory_per_profile[profile_index]

    def create_execution_context(self, strategy=STRATEGIES.STATIC):
        context = FakeContext(self, strategy)
        self.contexts.append(context)
        return context

    def read_input(self, context, name):
        return self.cudart.read(context.addresses[name], context.shapes[name], self._spec(name)[0].dtype)


class FakeProjectorEngine(FakeEngine):
    """image_embeds[t, i, :] = 2 * vision_features[t, i, :hidden] (shapes as the real projector's)."""

    def output_shape(self, shapes, name):
        tiles = shapes["vision_features"][0]
        return (tiles, *self.entry.outputs[0].shape[1:])

    def compute(self, context):
        features = self.read_input(context, "vision_features")
        out_shape = self.output_shape(context.shapes, "image_embeds")
        out = np.zeros(out_shape, np.float32)
        width = min(out_shape[2], features.shape[2])
        out[:, : min(out_shape[1], features.shape[1]), :width] = 2 * features[:, : out_shape[1], :width]
        self.cudart.write(context.addresses["image_embeds"], out)


class FakeDecoderEngine(FakeEngine):
    """new key/value of layer l, kind j at (b, h, t) = embeds[b, t, :head_dim] + 10 * (2l + j) + h;
    logits[b, k, v] = embeds[b, p, 0] * (v + 1) + position_ids[b, p] with p = logits_positions[b, k]
    (what a token's logits depend on: its embedding and its absolute position, not how the prompt was chunked)."""

    def output_shape(self, shapes, name):
        b, s = shapes["inputs_embeds"][:2]
        if name == "logits":
            return (b, shapes["logits_positions"][1], self.entry.outputs[0].shape[2])
        _, heads, past, dim = shapes["past_key_values.0.key"]
        return (b, heads, past + s, dim)

    def compute(self, context):
        embeds = self.read_input(context, "inputs_embeds")  # (b, s, hidden)
        positions = self.read_input(context, "position_ids")  # (b, s)
        picks = self.read_input(context, "logits_positions")  # (b, k)
        pasts = [t for t in self.entry.inputs if t.name.startswith("past_key_values.")]
        presents = [t for t in self.entry.outputs if t.name.startswith("present.")]
        for index, (past_spec, present_spec) in enumerate(zip(pasts, presents)):
            past = self.read_input(context, past_spec.name)  # (b, heads, past, dim)
            heads, dim = past.shape[1], past.shape[3]
            new = embeds[:, None, :, :dim] + 10 * index + np.arange(heads)[None, :, None, None]
            present = np.concatenate([past, new.astype(past.dtype)], axis=2)
            self.cudart.write(context.addresses[present_spec.name], present)
        vocab = self.entry.outputs[0].shape[2]
        picked = np.take_along_axis(embeds[:, :, 0], picks, axis=1)  # (b, k)
        offset = np.take_along_axis(positions, picks, axis=1)  # (b, k)
        logits = picked[:, :, None] * np.arange(1, vocab + 1) + offset[:, :, None]
        self.cudart.write(context.addresses["logits"], logits.astype(np.float32))


def attention_bytes(profile: Profile) -> int:
    """A fake engine's context memory for a profile: the prefill's fp32 attention at its largest shapes (14 heads,
    3 tensors), so a large context at a long chunk does not fit; vision profiles: 64 MiB per tile."""
    axes = profile.axes
    if "seq" in axes:
        return axes["batch"][2] * 14 * axes["seq"][2] * axes["total"][2] * 4 * 3
    return axes["tiles"][2] * (64 << 20)


def fake_tensorrt(version: str, inputs_by_file: dict[str, list[str]], built: list[str], cudart: FakeCudart,
                  entries: dict[str, GraphEntry]) -> SimpleNamespace:
    """The tensorrt module as build_engines drives it: parse -> configure -> build -> deserialize and open contexts;
    plans are b'plan:<file>'. `built` collects (file, TF32 flag after configure) per build."""

    class Config:
        def __init__(self):
            self.profiles: list[dict] = []
            self.flags = {"TF32"}  # NvInfer.h: kTF32 "Enabled by default"

        def clear_flag(self, flag):
            self.flags.discard(flag)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile.shapes)
            return len(self.profiles) - 1

        def create_timing_cache(self, data: bytes):
            return SimpleNamespace(data=data)

        def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
            self.cache = cache
            return True

        def get_timing_cache(self):
            return SimpleNamespace(serialize=lambda: self.cache.data + b"+tactics")

    class Network:
        def __init__(self):
            self.names: list[str] = []

        @property
        def num_inputs(self):
            return len(self.names)

        def get_input(self, i):
            return SimpleNamespace(name=self.names[i])

    class Parser:
        def __init__(self, network, logger):
            self.network = network

        def parse_from_file(self, path: str) -> bool:
            self.file = path.rsplit("/", 1)[-1]
            self.network.names = inputs_by_file[self.file]
            self.network.file = self.file
            return True

    class Logger:
        WARNING = 2

        def __init__(self, severity):
            pass

    plans: dict[bytes, tuple[str, list[dict]]] = {}

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            assert flags == 0  # TensorRT 11: strongly typed without the flag
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            shapes: dict = {}
            return SimpleNamespace(shapes=shapes, set_shape=lambda n, lo, opt, hi: shapes.__setitem__(n, (lo, opt, hi)))

        def build_serialized_network(self, network, config):
            built.append((network.file, "TF32" in config.flags))
            plan = f"plan:{network.file}".encode()
            plans[plan] = (network.file, config.profiles)
            return plan

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, plan: bytes):
            file, shapes = plans[plan]
            entry = entries[file]
            axes = [_axes_of(entry, s) for s in shapes]
            profiles = [Profile(f"p{i}", a) for i, a in enumerate(axes)]
            return FakeEngine(entry, profiles, cudart, [attention_bytes(p) for p in profiles])

    return SimpleNamespace(
        __version__=version,
        Logger=Logger,
        Builder=Builder,
        OnnxParser=Parser,
        Runtime=Runtime,
        NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1),
        BuilderFlag=SimpleNamespace(TF32="TF32"),
        ExecutionContextAllocationStrategy=STRATEGIES,
    )


def _axes_of(entry: GraphEntry, shapes: dict) -> dict:
    """Symbolic axis ranges back from set_shape's (min, opt, max) shapes."""
    axes = {}
    for t in entry.inputs:
        for i, d in enumerate(t.shape):
            if isinstance(d, str):
                axes[d] = tuple(shapes[t.name][k][i] for k in range(3))
    return axes
