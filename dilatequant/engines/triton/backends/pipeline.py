"""Triton Python-backend `pipeline`: DDIM sampling that calls the `unet` model through BLS.

Copied into <repo>/pipeline/1/model.py by dq-triton. A sampling loop cannot be a Triton ensemble
(no loops), so this model runs it and sends one BLS request per step to `unet`, where dynamic
batching merges steps of concurrent pipelines (t_index is per sample). Every timestep is mapped
to the t_index of the nearest calibrated timestep (exact when steps == the calibrated count).

Needs torch and diffusers in the server's Python: the starting noise is torch's seeded Generator
(identical to dilatequant.core.sampling.initial_noise) and the step is diffusers' DDIMScheduler
built from the model's own scheduler config (scheduler_config.json beside this file).

Inputs (see config.pbtxt): SEED int64 [1]; STEPS int32 [1] (optional, default: calibrated count);
CLASS_LABELS int64 [N] (conditional) or NUM_IMAGES int32 [1] (unconditional);
GUIDANCE_SCALE fp32 [1] (optional, conditional only). Output IMAGES uint8 [N, H, W, C].
"""
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from dq_bls import RequestError, call, error_response

try:
    import torch
    from diffusers import DDIMScheduler
except ImportError as err:  # reported on every request: the model still loads and says what is missing
    torch = None
    IMPORT_ERROR = f"the pipeline needs torch and diffusers in the server's Python ({err}); pip install them there"


def _scalar(request, name, default=None):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if default is None:
            raise RequestError(f"missing input '{name}'")
        return default
    arr = tensor.as_numpy().reshape(-1)
    if arr.size != 1:
        raise RequestError(f"input '{name}' must hold one value, got shape {list(tensor.as_numpy().shape)}")
    return arr[0].item()


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / args["model_version"]
        self.unet = p["unet_model"]
        self.unet_output = p.get("unet_output", "noise_pred")
        self.unet_batch = int(p["unet_max_batch"])
        self.timesteps = np.array(json.loads(p["timesteps"]), dtype=np.float64)  # floats: Euler-type calibration
        self.sample_shape = tuple(json.loads(p["sample_shape"]))
        self.conditional = p["conditional"] == "true"
        self.t_index_input = p["t_index_input"] == "true"
        self.default_guidance = float(p["default_guidance"])
        self.max_images = int(p["max_images"])
        self.scheduler_config = json.loads((folder / "scheduler_config.json").read_text())
        self.num_train = int(self.scheduler_config["num_train_timesteps"])
        if self.conditional:
            self.num_classes = int(p["num_classes"])
            self.tokens = tuple(json.loads(p["token_shape"]))
            self.table = np.load(folder / "class_tokens.npy")
        if torch is not None:
            torch.set_num_threads(int(p.get("torch_threads", "1")))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                if torch is None:
                    raise RequestError(IMPORT_ERROR)
                images = self._generate(request)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("IMAGES", images)]))
            except RequestError as err:
                responses.append(error_response(err))
        return responses

    def t_index(self, t: int) -> int:
        return int(np.abs(self.timesteps - t).argmin())

    def _labels(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, "CLASS_LABELS")
        if tensor is None:
            raise RequestError("missing input 'CLASS_LABELS' (one class label per image)")
        labels = tensor.as_numpy().reshape(-1).astype(np.int64)
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if bad.size:
            raise RequestError(f"unknown class label {int(bad[0])}: this model knows classes 0..{self.num_classes - 1}")
        return labels

    def _generate(self, request):
        seed = int(_scalar(request, "SEED"))
        steps = int(_scalar(request, "STEPS", len(self.timesteps)))
        if not 1 <= steps <= self.num_train:
            raise RequestError(f"STEPS {steps} out of range: use 1..{self.num_train}")
        if self.conditional:
            labels = self._labels(request)
            n = len(labels)
            guidance = float(_scalar(request, "GUIDANCE_SCALE", self.default_guidance))
            if not np.isfinite(guidance):
                raise RequestError("GUIDANCE_SCALE must be a finite number")
        else:
            n = int(_scalar(request, "NUM_IMAGES", 1))
            guidance = 1.0
        if not 1 <= n <= self.max_images:
            raise RequestError(f"{n} images requested: use 1..{self.max_images} per request")
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn((n, *self.sample_shape), generator=gen)
        guided = self.conditional and guidance != 1.0
        cond = None
        if self.conditional:
            rows = labels if not guided else np.concatenate([labels, np.full(n, self.num_classes)])
            cond = self.table[rows].reshape(len(rows), *self.tokens).astype(np.float32)
        sched = DDIMScheduler.from_config(self.scheduler_config)
        sched.set_timesteps(steps)
        for t in sched.timesteps:
            x_in = torch.cat([x, x]) if guided else x
            eps = torch.from_numpy(self._unet(x_in.numpy(), int(t), self.t_index(int(t)), cond))
            if guided:
                eps_cond, eps_uncond = eps.chunk(2)
                eps = eps_uncond + guidance * (eps_cond - eps_uncond)
            x = sched.step(eps, t, x).prev_sample
        x = x.clamp(-1, 1)
        images = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
        return images

    def _unet(self, sample, t, t_index, cond):
        outs = []
        for s in range(0, len(sample), self.unet_batch):
            chunk = np.ascontiguousarray(sample[s:s + self.unet_batch], dtype=np.float32)
            b = len(chunk)
            inputs = [pb_utils.Tensor("sample", chunk), pb_utils.Tensor("timestep", np.full((b, 1), t, np.int64))]
            if self.t_index_input:
                inputs.append(pb_utils.Tensor("t_index", np.full((b, 1), t_index, np.int64)))
            if cond is not None:
                inputs.append(pb_utils.Tensor("encoder_hidden_states", np.ascontiguousarray(cond[s:s + b])))
            outs.append(call(self.unet, inputs, [self.unet_output])[0])
        return np.concatenate(outs).astype(np.float32, copy=False)
