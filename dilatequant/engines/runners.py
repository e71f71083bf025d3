"""One runner interface over every runtime: PyTorch FP / fake-quant, ONNX Runtime, TensorRT.

Shaped like Polygraphy's runners: a runner only runs (comparison lives in verify.py), loads its
model lazily on first use (`activate()`), and describes itself with `RunnerMetadata`. Every runner
checks its inputs before running, because a runtime given a wrong t_index silently uses the wrong
activation scales (the exported graph clamps it) and a wrong shape fails deep inside the engine.

    runner.infer(sample [B,C,H,W] float, timestep [B] int, t_index [B] int, cond)
        -> noise_pred [B,C,H,W] float32 on the CPU

`cond` is None (unconditional), a dict of the graph's condition inputs (`encoder_hidden_states` [B,L,D]; SDXL
adds `text_embeds` [B,P] and `time_ids` [B,6]) or a bare encoder_hidden_states tensor.

A runner is also a `sampling.NoisePredictor` (`__call__`), so `sampling.sample(model, runner)` runs
on any of them.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..calibrate.conditioning import ENCODER_HIDDEN_STATES, as_condition, map_condition, unet_kwargs
from ..calibrate.models import DiffusionModel
from ..errors import UserError
from .trt_env import explain_cuda_failure, plan_mismatch, require_trt_and_gpu
from .trt_profiles import EngineProfile

METADATA_PREFIX = "dilatequant."
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
ENGINE_SUFFIXES = (".plan", ".engine", ".trt")

@dataclass(frozen=True)
class RunnerMetadata:
    """What a runner runs: t_index i means timesteps[i] of the calibrated schedule."""

    name: str
    runtime: str                      # torch | onnxruntime | tensorrt
    device: str                       # cpu | cuda
    dtype: str                        # fp32 | fp16 (the compute precision of what is not quantized)
    num_steps: int
    timesteps: tuple[int, ...]
    conditional: bool
    sample_shape: tuple[int, int, int]
    has_t_index: bool                 # False: static-scale graphs and FP models ignore t_index
    cond_dim: int | None = None       # last dim of encoder_hidden_states, when known
    cond_inputs: tuple[str, ...] = ()  # the condition inputs, in graph order (conditioning.COND_NAMES)
    pipeline_class: str = ""          # StableDiffusionPipeline | StableDiffusionXLPipeline | "" (class-token models)
    spatial_multiple: int = 0         # H and W may be any multiple of this (dynamic graphs); 0: only sample_shape
    fp_fingerprint: str = ""          # the FP model the checkpoint was calibrated from (UNet + encoders), if known

    def __post_init__(self) -> None:
        if self.conditional and not self.cond_inputs:  # class-token graphs written before SDXL inputs existed
            object.__setattr__(self, "cond_inputs", (ENCODER_HIDDEN_STATES,))

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["timesteps"], d["sample_shape"] = list(self.timesteps), list(self.sample_shape)
        d["cond_inputs"] = list(self.cond_inputs)
        return d


def metadata_from_props(props: dict[str, str], name: str, runtime: str, device: str, source: str) -> RunnerMetadata:
    """RunnerMetadata from the graph's "dilatequant.*" metadata_props (ONNX, or an engine's sidecar)."""
    try:
        timesteps = tuple(int(t) for t in json.loads(props[METADATA_PREFIX + "timesteps"]))
        num_steps = int(props.get(METADATA_PREFIX + "num_steps", len(timesteps)))
        return RunnerMetadata(
            name=name, runtime=runtime, device=device, dtype=props.get(METADATA_PREFIX + "dtype", "fp32"),
            num_steps=num_steps, timesteps=timesteps,
            conditional=props[METADATA_PREFIX + "conditional"] == "true",
            sample_shape=tuple(int(v) for v in json.loads(props[METADATA_PREFIX + "sample_shape"])),
            has_t_index=props.get(METADATA_PREFIX + "t_index_input", "true") == "true",
            cond_inputs=tuple(json.loads(props.get(METADATA_PREFIX + "cond_inputs", "[]"))),
            pipeline_class=props.get(METADATA_PREFIX + "pipeline_class", ""),
            spatial_multiple=int(props.get(METADATA_PREFIX + "spatial_multiple", 0)),
            fp_fingerprint=props.get(METADATA_PREFIX + "fp_fingerprint", ""))
    except KeyError as err:
        raise UserError(f"'{source}' has no '{err.args[0]}' metadata: it was not written by dq-export; "
                        "export the checkpoint with dq-export --ckpt q.pt --onnx unet.onnx") from err
    except (ValueError, TypeError) as err:
        raise UserError(f"'{source}' has malformed dilatequant.* metadata ({err}); re-export it with dq-export") from err


def _check_device(device: str) -> str:
    if device not in ("cpu", "cuda"):
        raise UserError(f"unknown device '{device}': choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' requested but PyTorch sees no CUDA GPU; use --device cpu")
    return device


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise UserError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    return x


class Runner:
    """Base: input validation, lazy activation, NoisePredictor protocol. Subclasses implement `_run`."""

    def __init__(self, metadata: RunnerMetadata):
        self.metadata = metadata
        self._active = False

    # -- lifecycle -------------------------------------------------------------------------------
    def activate(self) -> "Runner":
        if not self._active:
            self._load()
            self._active = True
        return self

    def _load(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        pass

    # -- inference -------------------------------------------------------------------------------
    def validate(self, sample, timestep, t_index, cond=None):
        """Checked, normalised inputs: sample float [B,C,H,W], timestep/t_index int64 [B], cond dict | None."""
        m = self.metadata
        sample, timestep, t_index = (_as_tensor(sample, "sample"), _as_tensor(timestep, "timestep"),
                                     _as_tensor(t_index, "t_index"))
        if not sample.is_floating_point():
            raise UserError(f"sample must be a float tensor, got {sample.dtype}")
        if sample.dim() != 4 or not self._takes_size(tuple(sample.shape[1:])):
            other = f" (or H, W multiples of {m.spatial_multiple})" if m.spatial_multiple else ""
            raise UserError(f"sample must have shape [B, {', '.join(map(str, m.sample_shape))}]{other} for {m.name}, "
                            f"got {list(sample.shape)}")
        batch = sample.shape[0]
        timestep = self._batch_vector(timestep, "timestep", batch)
        t_index = self._batch_vector(t_index, "t_index", batch)
        if timestep.numel() and timestep.min() < 0:
            raise UserError(f"timestep must be >= 0, got {timestep.tolist()}")
        if t_index.numel() and (t_index.min() < 0 or t_index.max() >= m.num_steps):
            raise UserError(f"t_index out of range: got {t_index.tolist()}, {m.name} is calibrated for "
                            f"t_index in [0, {m.num_steps}) ({m.num_steps} steps; map other schedules with "
                            "engines.schedule.ScheduleMapper)")
        cond = as_condition(cond if cond is None or isinstance(cond, dict) else _as_tensor(cond, "cond"))
        if m.conditional and cond is None:
            raise UserError(f"{m.name} is conditional: pass cond ({', '.join(m.cond_inputs)})")
        if not m.conditional and cond is not None:
            raise UserError(f"{m.name} is unconditional: pass cond=None")
        if cond is not None:
            if tuple(cond) != tuple(m.cond_inputs):
                raise UserError(f"{m.name} takes the condition inputs {list(m.cond_inputs)}, got {list(cond)}")
            cond = {k: self._cond_tensor(k, _as_tensor(v, k), batch) for k, v in cond.items()}
        return sample, timestep, t_index, cond

    def _takes_size(self, chw: tuple[int, ...]) -> bool:
        m = self.metadata
        if chw == tuple(m.sample_shape):
            return True
        return (bool(m.spatial_multiple) and chw[0] == m.sample_shape[0]
                and all(v > 0 and v % m.spatial_multiple == 0 for v in chw[1:]))

    def _cond_tensor(self, name: str, v: torch.Tensor, batch: int) -> torch.Tensor:
        doc = {ENCODER_HIDDEN_STATES: "[B, L, D]", "text_embeds": "[B, P]", "time_ids": "[B, 6]"}[name]
        if not v.is_floating_point() or v.dim() != doc.count(",") + 1:
            raise UserError(f"{name} must be a float tensor {doc}, got {v.dtype} {list(v.shape)}")
        if v.shape[0] != batch:
            raise UserError(f"batch mismatch: sample has batch {batch}, {name} has {v.shape[0]}")
        if name == ENCODER_HIDDEN_STATES and self.metadata.cond_dim is not None and v.shape[2] != self.metadata.cond_dim:
            raise UserError(f"{name} must have last dimension {self.metadata.cond_dim} for {self.metadata.name}, "
                            f"got {list(v.shape)}")
        if name == "time_ids" and v.shape[1] != 6:
            raise UserError(f"time_ids must be [B, 6] (original size, crop, target size), got {list(v.shape)}")
        return v

    @staticmethod
    def _batch_vector(x: torch.Tensor, name: str, batch: int) -> torch.Tensor:
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise UserError(f"{name} must be an integer tensor (int64), got {x.dtype}")
        if x.dim() == 0 or (x.dim() == 1 and x.shape[0] == 1):
            x = x.reshape(1).expand(batch)
        if x.dim() != 1:
            raise UserError(f"{name} must have shape [B], got {list(x.shape)}")
        if x.shape[0] != batch:
            raise UserError(f"batch mismatch: sample has batch {batch}, {name} has {x.shape[0]}")
        return x.to(torch.int64).contiguous()

    def infer(self, sample, timestep, t_index, cond=None) -> torch.Tensor:
        args = self.validate(sample, timestep, t_index, cond)
        self.activate()
        out = self._run(*args)
        return out.detach().to("cpu", torch.float32)

    def _run(self, sample, timestep, t_index, cond) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, sample, timestep, t_index, cond=None) -> torch.Tensor:
        return self.infer(sample, timestep, t_index, cond)

    def synchronize(self) -> None:
        """Wait for queued device work (for timing)."""
        if self.metadata.device == "cuda":
            torch.cuda.synchronize()

    def __repr__(self) -> str:
        m = self.metadata
        return f"{type(self).__name__}({m.name}: {m.runtime} {m.device} {m.dtype}, T={m.num_steps})"


class TorchRunner(Runner):
    """A PyTorch module (FP UNet or fake-quant QuantUNet) on cpu/cuda in fp32/fp16.

    `build` is called once, lazily, and returns fn(sample, timestep, t_index, cond) -> noise.
    fp16 casts the whole module, tables included, the way a user would run `.half()`.
    """

    def __init__(self, metadata: RunnerMetadata, build: Callable[[], Callable], compile: bool = False):
        super().__init__(metadata)
        self._build, self._compile, self._fn = build, compile, None

    def _load(self) -> None:
        self._fn = self._build()

    def _run(self, sample, timestep, t_index, cond):
        m = self.metadata
        dt = TORCH_DTYPES[m.dtype]
        sample = sample.to(m.device, dt)
        timestep, t_index = timestep.to(m.device), t_index.to(m.device)
        cond = map_condition(cond, lambda v: v.to(m.device, dt))
        with torch.no_grad():
            return self._fn(sample, timestep, t_index, cond)

    @classmethod
    def fp(cls, model: DiffusionModel, timesteps: list[int], device: str = "cpu", dtype: str = "fp32",
           compile: bool = False, name: str = "torch-fp") -> "TorchRunner":
        """The FP model; `timesteps` is the calibrated schedule its t_index inputs refer to (it ignores them)."""
        _check_device(device)
        if dtype not in TORCH_DTYPES:
            raise UserError(f"unknown dtype '{dtype}': choose fp32 or fp16")
        meta = RunnerMetadata(name=name + ("-compile" if compile else ""), runtime="torch", device=device, dtype=dtype,
                              num_steps=len(timesteps), timesteps=tuple(int(t) for t in timesteps),
                              has_t_index=False, **_model_fields(model))

        def build():
            unet = _placed(model.unet, device, dtype)
            call = torch.compile(unet) if compile else unet

            def fn(x, t, ti, c):
                return call(x, t, return_dict=False, **unet_kwargs(c))[0]
            return fn

        return cls(meta, build, compile)

    @classmethod
    def fake_quant(cls, ckpt: str | Path, device: str = "cpu", dtype: str = "fp32", compile: bool = False,
                   name: str = "torch-fakequant") -> "TorchRunner":
        """The PyTorch fake-quant model of a q.pt. Reads the schedule now; builds the model on first use."""
        from ..calibrate.checkpoint import load_checkpoint

        _check_device(device)
        if dtype not in TORCH_DTYPES:
            raise UserError(f"unknown dtype '{dtype}': choose fp32 or fp16")
        ck = load_checkpoint(ckpt)  # validates the file up front; the module moves to the device lazily
        return cls.from_checkpoint(ck, device, dtype, compile, name)

    @classmethod
    def from_checkpoint(cls, ck, device: str = "cpu", dtype: str = "fp32", compile: bool = False,
                        name: str = "torch-fakequant") -> "TorchRunner":
        meta = RunnerMetadata(name=name + ("-compile" if compile else ""), runtime="torch", device=device, dtype=dtype,
                              num_steps=len(ck.timesteps), timesteps=tuple(ck.timesteps),
                              has_t_index=bool(ck.qunet.config.tpq), fp_fingerprint=ck.source_fingerprint,
                              **_model_fields(ck.model))

        def build():
            qunet = _placed(ck.qunet, device, dtype)
            call = torch.compile(qunet) if compile else qunet
            return lambda x, t, ti, c: call(x, t, ti, c)

        return cls(meta, build, compile)


def _model_fields(model: DiffusionModel) -> dict:
    """RunnerMetadata fields that come from the model: conditioning and sample shape."""
    return {"conditional": model.is_conditional, "sample_shape": tuple(model.sample_shape),
            "cond_dim": getattr(model.unet.config, "cross_attention_dim", None) if model.is_conditional else None,
            "cond_inputs": tuple(model.cond_names), "pipeline_class": model.pipeline_class or "",
            "spatial_multiple": 2 ** (len(model.unet.config.block_out_channels) - 1)}


def _placed(module: torch.nn.Module, device: str, dtype: str) -> torch.nn.Module:
    """The module on device/dtype; a copy unless that is where it already is (others may share it)."""
    if (device, dtype) != ("cpu", "fp32"):
        module = copy.deepcopy(module).to(device, TORCH_DTYPES[dtype])
    return module.eval()


class OrtRunner(Runner):
    """An exported ONNX graph in ONNX Runtime. providers: cpu, cuda, tensorrt (ORT's execution providers)."""

    PROVIDERS = {"cpu": ["CPUExecutionProvider"],
                 "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                 "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]}

    def __init__(self, path: str | Path, provider: str = "cpu", threads: int = 0, name: str | None = None):
        import onnx

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"ONNX graph '{self.path}' does not exist; write one with dq-export --onnx {self.path}")
        if provider not in self.PROVIDERS:
            raise UserError(f"unknown ONNX Runtime provider '{provider}': choose one of {', '.join(self.PROVIDERS)}")
        try:
            proto = onnx.load(str(self.path), load_external_data=False)
        except Exception as err:  # noqa: BLE001 - onnx raises DecodeError and others for a bad file
            raise UserError(f"'{self.path}' is not a readable ONNX model ({type(err).__name__}); "
                            "pass a graph written by dq-export") from err
        props = {p.key: p.value for p in proto.metadata_props}
        self.input_names = [i.name for i in proto.graph.input]
        self._input_types = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
        cond_dim = None
        for i in proto.graph.input:
            if i.name == "encoder_hidden_states" and len(i.type.tensor_type.shape.dim) == 3:
                cond_dim = i.type.tensor_type.shape.dim[2].dim_value or None
        device = "cpu" if provider == "cpu" else "cuda"
        meta = metadata_from_props(props, name or f"onnxruntime-{provider}", "onnxruntime", device, str(self.path))
        super().__init__(replace(meta, cond_dim=cond_dim))
        self.provider, self.threads, self.session = provider, threads, None

    def _load(self) -> None:
        import onnxruntime as ort

        from ..dq_export.parity import ORT_DISABLED_OPTIMIZERS

        available = ort.get_available_providers()
        wanted = self.PROVIDERS[self.provider]
        if wanted[0] not in available:
            raise UserError(f"ONNX Runtime here has no {wanted[0]} (available: {', '.join(available)}); install "
                            f"onnxruntime-gpu for cuda/tensorrt providers or use provider cpu")
        so = ort.SessionOptions()
        if self.threads:
            so.intra_op_num_threads = self.threads
        self.session = ort.InferenceSession(str(self.path), so, providers=[p for p in wanted if p in available],
                                            disabled_optimizers=ORT_DISABLED_OPTIMIZERS)

    def _feeds(self, sample, timestep, t_index, cond) -> dict[str, np.ndarray]:
        import onnx

        values = {"sample": sample, "timestep": timestep, "t_index": t_index, **(cond or {})}
        feeds = {}
        for name in self.input_names:
            v = values[name]
            np_type = onnx.helper.tensor_dtype_to_np_dtype(self._input_types[name])
            feeds[name] = v.detach().cpu().numpy().astype(np_type, copy=False)
        return feeds

    def _run(self, sample, timestep, t_index, cond):
        return torch.from_numpy(self.session.run(None, self._feeds(sample, timestep, t_index, cond))[0])


class TensorRTRunner(Runner):
    """A serialized TensorRT engine through Polygraphy (EngineFromBytes + TrtRunner), imported lazily.

    Metadata comes from the engine's sidecar `<engine>.json` (written by engines/trt_build.py), whose
    "metadata" key holds the source ONNX's metadata_props verbatim, "profiles" the plan's optimization profile
    (sizes outside it are refused before TensorRT sees them; a batch above its maximum, e.g. a classifier-free
    guidance batch of 2 x images, is run as several calls and concatenated, so every sampler can use any plan),
    and "tensorrt"/"gpu" what built it (a plan from another TensorRT release or GPU architecture is refused in
    one line before it is deserialized).
    """

    FEED_DEVICE = "cuda"  # where the inputs go: the plan's bindings are on the GPU

    def __init__(self, path: str | Path, name: str = "tensorrt"):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"engine '{self.path}' does not exist; build one with dq-build-engine --engine {self.path}")
        sidecar = sidecar_path(self.path)
        if not sidecar.is_file():
            raise UserError(f"engine '{self.path}' has no sidecar '{sidecar.name}' (calibrated schedule, shapes); "
                            "rebuild it with dq-build-engine, which writes both")
        try:
            side = json.loads(sidecar.read_text())
            props = side["metadata"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserError(f"sidecar '{sidecar}' is not valid engine metadata ({err}); rebuild with dq-build-engine") from err
        meta = metadata_from_props(props, name, "tensorrt", "cuda", str(sidecar))
        super().__init__(meta)
        self.profile = EngineProfile.from_sidecar(side, str(sidecar))  # None: an old sidecar, nothing to check
        self._built_with = (side.get("tensorrt"), side.get("gpu"))
        from ..dq_export.qdq_graph import input_names

        self.input_names = input_names(meta.cond_inputs, meta.has_t_index)
        self._runner, self._dtypes = None, {}

    def validate(self, sample, timestep, t_index, cond=None):
        """The base checks, then the plan's optimization profile (sizes; a batch above its maximum is split)."""
        args = super().validate(sample, timestep, t_index, cond)
        if self.profile is not None:
            c = args[3]
            conds = c if isinstance(c, dict) else ({} if c is None else {"encoder_hidden_states": c})
            self.profile.check({"sample": tuple(args[0].shape), **{k: tuple(v.shape) for k, v in conds.items()}})
        return args

    def _load(self) -> None:
        trt, gpu = require_trt_and_gpu()
        problem = plan_mismatch(str(self.path), *self._built_with, str(trt.__version__), gpu)
        if problem:
            raise UserError(problem)
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        from polygraphy.datatype import DataType
        from polygraphy.exception import PolygraphyException

        try:
            self._runner = TrtRunner(EngineFromBytes(self.path.read_bytes()), name=self.metadata.name)
            self._runner.activate()
        except (PolygraphyException, RuntimeError, TypeError) as err:
            self._runner = None
            raise UserError(explain_cuda_failure(str(err)) or
                            f"TensorRT could not load engine '{self.path}' ({type(err).__name__}: {err}); rebuild it "
                            "here with dq-build-engine") from err
        for name, (dtype, _shape) in self._runner.get_input_metadata(use_numpy_dtypes=False).items():
            self._dtypes[name] = DataType.to_dtype(DataType.from_dtype(dtype), "torch")

    def _run(self, sample, timestep, t_index, cond):
        values = {"sample": sample, "timestep": timestep, "t_index": t_index, **(cond or {})}
        feeds = {n: values[n].to(self.FEED_DEVICE, self._dtypes.get(n, values[n].dtype)).contiguous()
                 for n in self.input_names}
        batch = sample.shape[0]
        spans = self.profile.chunks(batch) if self.profile is not None else [(0, batch)]
        outs = [self._infer({n: v[a:b] for n, v in feeds.items()}) for a, b in spans]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _infer(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """One engine call. Its output is copied: Polygraphy's TrtRunner returns views of host buffers it reuses,
        so the next call (or the next chunk of this one) would overwrite a result kept as it is."""
        out = self._runner.infer(feeds, copy_outputs_to_host=True)
        out = out["noise_pred"] if "noise_pred" in out else next(iter(out.values()))
        return torch.as_tensor(out).clone()

    def __exit__(self, *exc) -> None:
        if self._runner is not None:
            self._runner.deactivate()
            self._runner, self._active = None, False


def sidecar_path(engine: str | Path) -> Path:
    return Path(f"{engine}.json")


def require_tensorrt():
    """TensorRT 11 and a GPU, or one line saying what is missing and how to install it."""
    return require_trt_and_gpu()[0]


def open_runner(path_or_spec: str | Path, device: str = "cpu", dtype: str = "fp32", provider: str | None = None,
                threads: int = 0, fp_model: DiffusionModel | None = None) -> Runner:
    """Pick the runner from the file type: .onnx -> ONNX Runtime, .plan/.engine -> TensorRT, .pt -> fake-quant.

    `fp:<q.pt>` gives the FP model the checkpoint was calibrated from (or `fp_model`) on its schedule.
    """
    spec = str(path_or_spec)
    if spec.startswith("fp:"):
        from ..calibrate.checkpoint import load_checkpoint

        ck = load_checkpoint(spec[3:])
        return TorchRunner.fp(fp_model or fp_model_of(ck), ck.timesteps, device, dtype)
    path = Path(spec)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return OrtRunner(path, provider or ("cpu" if device == "cpu" else "cuda"), threads)
    if suffix in ENGINE_SUFFIXES:
        return TensorRTRunner(path)
    if suffix == ".pt":
        return TorchRunner.fake_quant(path, device, dtype)
    raise UserError(f"cannot tell the runtime of '{spec}' from its suffix: pass a .onnx graph, a "
                    f"{'/'.join(ENGINE_SUFFIXES)} TensorRT engine, a q.pt checkpoint or fp:<q.pt>")


def fp_model_of(ck) -> DiffusionModel:
    """The FP model a checkpoint was calibrated from (embedded name or diffusers folder)."""
    from ..calibrate.checkpoint import source_model

    try:
        return source_model(ck)
    except UserError as err:
        raise UserError(f"cannot load the checkpoint's FP model '{ck.source}' ({err}); pass --model with the "
                        "FP model it was calibrated from") from err
