"""Exports InternVL checkpoints to ONNX bundles."""
