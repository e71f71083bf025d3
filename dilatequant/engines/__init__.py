"""Runtime side: one runner interface over PyTorch, ONNX Runtime and TensorRT, schedule mapping, dq-verify."""
