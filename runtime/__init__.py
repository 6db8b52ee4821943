"""The torch-free runtime: a bundle answering like InternVL2.5's chat(), on ONNX Runtime, OpenVINO or TensorRT."""

from .pipeline import ChatResult, Pipeline, Stream, Timings
from .sampling import GenerationConfig

__all__ = ["ChatResult", "GenerationConfig", "Pipeline", "Stream", "Timings"]
