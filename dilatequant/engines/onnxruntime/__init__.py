"""ONNX Runtime: the runner for exported graphs (the TensorRT form and the --target ort integer flavor)."""
