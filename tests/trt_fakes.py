"""A CPU stand-in for cuda-python and TensorRT engines, so the sessions' buffer and cache logic runs without a GPU.

FakeCuda keeps "device memory" in numpy byte arrays keyed by fake pointers. FakeDecoderEngine computes what the
decoder graph computes structurally (present = past ++ new keys/values; logits from the gathered positions), reading
and writing that memory through the addresses the session binds, so a wrong pointer or a missed swap shows up as
wrong numbers.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from vl_export.engines import Profile
from vl_export.manifest import GraphEntry

TRT_DTYPE_NAMES = {"float32": "FLOAT", "float16": "HALF", "int64": "INT64"}


class FakeCuda:
    stream_handle = 7

    def __init__(self):
        self.memory: dict[int, np.ndarray] = {}
        self.next_ptr = 1 << 20
        self.mallocs = 0
        self.frees = 0

    def malloc(self, nbytes: int) -> int:
        ptr, self.next_ptr = self.next_ptr, self.next_ptr + nbytes + 4096
        self.memory[ptr] = np.zeros(nbytes, np.uint8)
        self.mallocs += 1
        return ptr

    def free(self, ptr: int) -> None:
        del self.memory[ptr]
        self.frees += 1

    def to_device(self, ptr: int, array: np.ndarray) -> None:
        raw = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
        self.memory[ptr][: raw.size] = raw

    def to_host(self, array: np.ndarray, ptr: int) -> None:
        array.view(np.uint8).reshape(-1)[:] = self.memory[ptr][: array.nbytes]

    def synchronize(self) -> None:
        pass

    def read(self, ptr: int, shape, dtype) -> np.ndarray:
        count = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return self.memory[ptr][:count].view(dtype).reshape(shape).copy()

    def write(self, ptr: int, array: np.ndarray) -> None:
        self.to_device(ptr, array)


class FakeContext:
    def __init__(self, engine):
        self.engine = engine
        self.profile = 0
        self.switches: list[int] = []
        self.shapes: dict[str, tuple] = {}
        self.addresses: dict[str, int] = {}

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        self.profile = index
        self.switches.append(index)
        self.shapes.clear()  # as in TensorRT: switching invalidates the input shapes
        return True

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
        assert set(self.shapes) == set(self.engine.input_names), "every input shape must be set after a switch"
        self.engine.compute(self, self.engine.cuda)
        return True


class FakeEngine:
    def __init__(self, entry: GraphEntry, profiles: list[Profile], cuda: FakeCuda):
        self.entry, self.cuda = entry, cuda
        self.io = [(t, True) for t in entry.inputs] + [(t, False) for t in entry.outputs]
        self.input_names = [t.name for t in entry.inputs]
        self.profile_shapes = [p.shapes(entry.inputs) for p in profiles]
        self.num_io_tensors = len(self.io)

    def get_tensor_name(self, i: int) -> str:
        return self.io[i][0].name

    def _spec(self, name):
        return next((t, is_input) for t, is_input in self.io if t.name == name)

    def get_tensor_mode(self, name: str):
        return SimpleNamespace(name="INPUT" if self._spec(name)[1] else "OUTPUT")

    def get_tensor_dtype(self, name: str):
        return SimpleNamespace(name=TRT_DTYPE_NAMES[self._spec(name)[0].dtype])

    def create_execution_context(self):
        return FakeContext(self)

    def read_input(self, context, name):
        return self.cuda.read(context.addresses[name], context.shapes[name], self._spec(name)[0].dtype)


class FakeProjectorEngine(FakeEngine):
    """image_embeds[t, i, :] = 2 * vision_features[t, i, :hidden] (shapes as the real projector's)."""

    def output_shape(self, shapes, name):
        tiles = shapes["vision_features"][0]
        return (tiles, *self.entry.outputs[0].shape[1:])

    def compute(self, context, cuda):
        features = self.read_input(context, "vision_features")
        out_shape = self.output_shape(context.shapes, "image_embeds")
        out = np.zeros(out_shape, np.float32)
        width = min(out_shape[2], features.shape[2])
        out[:, : min(out_shape[1], features.shape[1]), :width] = 2 * features[:, : out_shape[1], :width]
        cuda.write(context.addresses["image_embeds"], out)


class FakeDecoderEngine(FakeEngine):
    """new key/value of layer l, kind j at (b, h, t) = embeds[b, t, :head_dim] + 10 * (2l + j) + h;
    logits[b, k, v] = embeds[b, logits_positions[b, k], 0] * (v + 1) + past."""

    def output_shape(self, shapes, name):
        b, s = shapes["inputs_embeds"][:2]
        if name == "logits":
            return (b, shapes["logits_positions"][1], self.entry.outputs[0].shape[2])
        _, heads, past, dim = shapes["past_key_values.0.key"]
        return (b, heads, past + s, dim)

    def compute(self, context, cuda):
        embeds = self.read_input(context, "inputs_embeds")  # (b, s, hidden)
        positions = self.read_input(context, "logits_positions")  # (b, k)
        pasts = [t for t in self.entry.inputs if t.name.startswith("past_key_values.")]
        presents = [t for t in self.entry.outputs if t.name.startswith("present.")]
        b, s = embeds.shape[:2]
        for index, (past_spec, present_spec) in enumerate(zip(pasts, presents)):
            past = self.read_input(context, past_spec.name)  # (b, heads, past, dim)
            heads, dim = past.shape[1], past.shape[3]
            new = embeds[:, None, :, :dim] + 10 * index + np.arange(heads)[None, :, None, None]
            present = np.concatenate([past, new.astype(past.dtype)], axis=2)
            cuda.write(context.addresses[present_spec.name], present)
        past_len = context.shapes["past_key_values.0.key"][2]
        vocab = self.entry.outputs[0].shape[2]
        picked = np.take_along_axis(embeds[:, :, 0], positions, axis=1)  # (b, k)
        logits = picked[:, :, None] * np.arange(1, vocab + 1) + past_len
        cuda.write(context.addresses["logits"], logits.astype(np.float32))


def fake_tensorrt(version: str, inputs_by_file: dict[str, list[str]], built: list[str]) -> SimpleNamespace:
    """The tensorrt module as build_engines drives it: parse -> configure -> build; plans are b'plan:<file>'."""

    class Config:
        def __init__(self):
            self.profiles = 0

        def add_optimization_profile(self, profile):
            self.profiles += 1
            return self.profiles - 1

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

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            assert flags == 0  # TensorRT 11: strongly typed without the flag
            return Network()

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return SimpleNamespace(set_shape=lambda *args: None)

        def build_serialized_network(self, network, config):
            built.append(network.file)
            return f"plan:{network.file}".encode()

    return SimpleNamespace(
        __version__=version,
        Logger=Logger,
        Builder=Builder,
        OnnxParser=Parser,
        NetworkDefinitionCreationFlag=SimpleNamespace(STRONGLY_TYPED=1),
    )
