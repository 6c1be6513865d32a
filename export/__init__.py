"""supmae-export: ONNX, quantised ONNX, TensorRT engines, Triton repositories, timm weights."""
