"""Session backends: ONNX Runtime, OpenVINO, TensorRT."""
