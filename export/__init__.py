"""ONNX export and inference-engine builders."""
