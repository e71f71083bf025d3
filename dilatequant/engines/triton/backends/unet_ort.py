"""Triton Python-backend model running an ONNX graph with ONNX Runtime (CPU): the QDQ `unet`, and for Stable
Diffusion pipelines also the text encoder(s) and `vae_decoder` (any graph whose inputs and outputs share a batch
dimension).

Copied into <repo>/<model>/1/model.py by dq-triton --kind cpu, so a server that has only the Python
backend (e.g. the one bundled in nvidia-pytriton) serves the same repository. Self-contained on
purpose: it imports numpy, onnxruntime and Triton's utils only.

Dynamic batching hands execute() several requests; they are concatenated into one ORT call (each
sample carries its own timestep and t_index, so requests at different timesteps share a batch).
A bad request gets an error response naming the problem; the others in the batch are still served.
"""
import json
import platform
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def _int8_gemm_is_exact() -> bool:
    """dilatequant.dq_export.parity.int8_gemm_is_exact, repeated: this file runs inside Triton on its own."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


# As dilatequant.dq_export.parity.ORT_DISABLED_OPTIMIZERS: ORT 1.32 rejects some opset-21 QDQ graphs in the
# first; the second fuses DQ -> MatMul into a uint8 x int8 kernel that is exact only on CPUs with VNNI.
DISABLED_OPTIMIZERS = ["QDQPropagationTransformer"] + ([] if _int8_gemm_is_exact() else
                                                       ["QDQSelectorActionTransformer"])
ORT_TO_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
             "tensor(int32)": np.int32}


class RequestError(ValueError):
    """A request that cannot be served; its message goes back to the client."""


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / args["model_version"]
        self.num_steps = int(params.get("num_steps", "0"))  # the unet's calibrated steps (t_index range)
        options = ort.SessionOptions()
        threads = int(params.get("intra_op_threads", "0"))
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(folder / params.get("onnx_file", "model.onnx")), options,
                                            providers=["CPUExecutionProvider"], disabled_optimizers=DISABLED_OPTIMIZERS)
        self.inputs = {i.name: (ORT_TO_NP[i.type], i.shape) for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def _read(self, request):
        feeds = {}
        n = None
        for name, (dtype, shape) in self.inputs.items():
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise RequestError(f"missing input '{name}'")
            arr = tensor.as_numpy()
            if arr.dtype != dtype:
                raise RequestError(f"input '{name}' has dtype {arr.dtype}, expected {np.dtype(dtype).name}")
            if len(shape) == 1:  # [B] tensors arrive as [B, 1] (config dims [1]) or [B] (after reshape)
                arr = arr.reshape(-1)
            n = len(arr) if n is None else n
            if len(arr) != n:
                raise RequestError(f"input '{name}' has batch {len(arr)}, but '{next(iter(feeds))}' has {n}")
            want = [n] + [d if isinstance(d, int) else -1 for d in shape[1:]]
            if arr.ndim != len(want) or any(w not in (-1, a) for w, a in zip(want, arr.shape)):
                raise RequestError(f"input '{name}' has shape {list(arr.shape)}, expected {want}")
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                raise RequestError(f"input '{name}' contains NaN or Inf values")
            feeds[name] = arr
        if "t_index" in feeds and self.num_steps:
            t = feeds["t_index"]
            bad = t[(t < 0) | (t >= self.num_steps)]
            if bad.size:
                raise RequestError(f"t_index {int(bad[0])} out of range: this model was calibrated for "
                                   f"{self.num_steps} steps, so t_index must be in 0..{self.num_steps - 1}")
        return feeds

    def execute(self, requests):
        responses = [None] * len(requests)
        groups = {}  # requests whose tensors agree beyond the batch dim run as one ORT call (sizes may differ)
        for i, request in enumerate(requests):
            try:
                f = self._read(request)
            except RequestError as err:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err)))
                continue
            groups.setdefault(tuple(v.shape[1:] for v in f.values()), []).append((i, f))
        for members in groups.values():
            self._run(members, responses)
        return responses

    def _run(self, members, responses):
        batch = {k: np.concatenate([f[k] for _, f in members]) for k in self.inputs}
        try:
            outs = self.session.run(self.outputs, batch)
        except Exception as err:  # ORT's own failure: report it to every request of the batch
            for i, _ in members:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"ONNX Runtime failed: {err}"))
            return
        start = 0
        for i, f in members:
            n = len(next(iter(f.values())))
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(out[start:start + n]))
                       for name, out in zip(self.outputs, outs)]
            responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
            start += n
