"""Runtime side: TensorRT engine builds, one runner interface over every backend, verification reports, Triton serving."""
