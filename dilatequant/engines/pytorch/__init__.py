"""PyTorch: the FP and fake-quant runners, and the quantized UNet that drops into a diffusers pipeline."""
