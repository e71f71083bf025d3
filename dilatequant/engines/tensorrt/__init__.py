"""TensorRT: engine builds (`dq-build-engine`), the optimization profile, the environment checks, the runner."""
