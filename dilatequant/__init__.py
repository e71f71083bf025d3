"""DilateQuant toolchain: quantization-aware training of diffusers UNets (Weight Dilation, Temporal
Parallel Quantizer, Block-wise Distillation) and deployment as QDQ ONNX, TensorRT and Triton."""

__version__ = "0.1.0"
