"""ONNX export and inference-engine builders (see DESIGN.md)."""
