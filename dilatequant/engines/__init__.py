"""Runtime side, one folder per backend (`pytorch/`, `onnxruntime/`, `tensorrt/`, `triton/`), one runner interface
(`base.py`, `runners.open_runner`), dq-verify and dq-generate."""
