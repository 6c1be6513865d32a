"""Serving backends (torch, onnxruntime, tensorrt) behind one protocol."""
