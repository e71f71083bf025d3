"""The method, up to q.pt: Weight Dilation, the Temporal Parallel Quantizer, Block-wise Knowledge Distillation."""
