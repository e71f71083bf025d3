"""Proof that the exported graph computes the fake-quant model: ONNX Runtime vs PyTorch per t_index."""
from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from ..calibrate.calibration_data import condition_of
from ..calibrate.checkpoint import QuantCheckpoint
from ..core.conditioning import map_condition
from ..core.metrics import sqnr_db
from ..core.sampling import default_guidance, sample


def int8_gemm_is_exact() -> bool:
    """Whether MLAS's uint8 x int8 GEMM is exact on this CPU: on x86 only with VNNI. Without it (AVX2, AVX-512
    without VNNI) the kernel sums product pairs in saturating int16, and a DQ -> MatMul that ORT fuses into
    MatMulIntegerToFloat is wrong (seen on an AMD EPYC without AVX-512: 19-23 dB against the float graph)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True  # Arm's sdot/udot kernels accumulate in int32
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False  # cannot tell: take the exact path
    return "avx512_vnni" in flags or "avx_vnni" in flags


# ORT 1.32 rejects some opset-21 QDQ graphs in QDQPropagationTransformer ("output_dtype INT8 does not match
# y_zero_point"); it also moves Q/DQ around, which a parity proof does not want. QDQSelectorActionTransformer
# fuses DQ -> MatMul into the uint8 x int8 kernel: kept only where that kernel is exact (int8_gemm_is_exact).
ORT_DISABLED_OPTIMIZERS = ["QDQPropagationTransformer"] + ([] if int8_gemm_is_exact() else
                                                           ["QDQSelectorActionTransformer"])
# ORT vs PyTorch fake-quant: float rounding alone stays far above this; a wrong scale lands far below
PARITY_DB = 50.0


# ORT fuses DQ(INT4 blocks) -> MatMul into MatMulNBits, whose CPU kernel by default quantizes the float activation
# to int8 blocks (accuracy level 4): not what TensorRT's W4A16 computes. Level 0 keeps it float.
ORT_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}


def ort_session(path: str | Path, threads: int = 0) -> ort.InferenceSession:
    return ort_session_from_bytes(str(path), threads)


def ort_session_from_bytes(model: str | bytes, threads: int = 0) -> ort.InferenceSession:
    """A CPU session on a path or serialized model, with the options every parity check uses."""
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
    for k, v in ORT_SESSION_CONFIG.items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=ORT_DISABLED_OPTIMIZERS)


def parity_inputs(ck: QuantCheckpoint, per_step: int = 2, seed: int = 1234) -> dict[str, torch.Tensor]:
    """per_step UNet inputs at every t_index, from trajectories of the fake-quant model itself."""
    traj = sample(ck.model, ck.qunet.predictor(), num_samples=per_step, steps=ck.schedule.steps, seed=seed,
                  guidance_scale=default_guidance(ck.model), return_trajectory=True, progress=False,
                  scheduler=ck.schedule.scheduler, timestep_kwargs=ck.schedule.timestep_kwargs).trajectory
    flat = lambda t: t.reshape(-1, *t.shape[2:])  # noqa: E731  [steps, B, ...] -> [steps*B, ...]
    out = {"sample": flat(traj.sample), "timestep": flat(traj.timestep), "t_index": flat(traj.t_index)}
    out.update(map_condition(traj.cond, flat) or {})
    return out


def run_ort(session: ort.InferenceSession, inputs: dict[str, torch.Tensor], batch: int = 16) -> torch.Tensor:
    names = [i.name for i in session.get_inputs()]
    n = len(inputs["sample"])
    outs = []
    for s in range(0, n, batch):
        feeds = {k: inputs[k][s:s + batch].numpy() for k in names}
        outs.append(torch.from_numpy(session.run(None, feeds)[0]))
    return torch.cat(outs)


@torch.no_grad()
def run_torch(ck: QuantCheckpoint, inputs: dict[str, torch.Tensor], batch: int = 16) -> torch.Tensor:
    n = len(inputs["sample"])
    outs = []
    for s in range(0, n, batch):
        sl = slice(s, s + batch)
        cond = map_condition(condition_of(inputs), lambda v: v[sl])
        outs.append(ck.qunet(inputs["sample"][sl], inputs["timestep"][sl], inputs["t_index"][sl], cond))
    return torch.cat(outs)


def parity_report(onnx_path: str | Path, ck: QuantCheckpoint, per_step: int = 2, torch_floor: bool = False) -> dict:
    """Max abs error and SQNR of ORT against PyTorch fake-quant at every t_index.

    A quantized network is discontinuous: float summation order alone (ORT's kernels vs PyTorch's, or
    PyTorch at batch 1 vs batch 16 - reported as "torch_self") can move a value across a rounding tie,
    and that one level then propagates through the rest of the UNet. Such a flip hits single samples;
    a wrong scale, zero point or table row hits every sample of a t_index. So each t_index reports the
    pooled SQNR and the median over its samples, and the samples below PARITY_DB are counted.
    torch_floor adds PyTorch's own floor (every input again at batch 1: half the check's time, so opt-in).
    """
    inputs = parity_inputs(ck, per_step)
    ort_out = run_ort(ort_session(onnx_path), inputs)
    ref = run_torch(ck, inputs)
    self_ref = run_torch(ck, inputs, batch=1) if torch_floor else None
    rows = []
    for t in range(len(ck.timesteps)):
        m = inputs["t_index"] == t
        per_sample = [sqnr_db(o, r) for o, r in zip(ort_out[m], ref[m])]
        rows.append({"t_index": t, "timestep": ck.timesteps[t],
                     "max_abs_error": (ort_out[m] - ref[m]).abs().max().item(),
                     "sqnr_db": sqnr_db(ort_out[m], ref[m]), "median_sample_sqnr_db": float(np.median(per_sample)),
                     "samples_below": sum(v < PARITY_DB for v in per_sample)})
        if torch_floor:
            rows[-1]["torch_self_sqnr_db"] = sqnr_db(self_ref[m], ref[m])
    sq = [r["sqnr_db"] for r in rows]
    med = [r["median_sample_sqnr_db"] for r in rows]
    floor = {}
    if torch_floor:
        own = [r["torch_self_sqnr_db"] for r in rows]
        floor = {"torch_self_min_sqnr_db": float(np.min(own)), "torch_self_median_sqnr_db": float(np.median(own))}
    return {"per_t_index": rows, "min_sqnr_db": float(np.min(sq)), "median_sqnr_db": float(np.median(sq)),
            "min_median_sample_sqnr_db": float(np.min(med)),
            "samples_below": sum(r["samples_below"] for r in rows), "samples": len(ref), "threshold_db": PARITY_DB,
            "max_abs_error": max(r["max_abs_error"] for r in rows), "samples_per_t_index": per_step, **floor}
