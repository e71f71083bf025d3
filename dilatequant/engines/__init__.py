"""Runtime side: TensorRT engine builds, one runner interface over every backend, and verification reports."""
