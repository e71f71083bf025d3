"""Triton Python-backend `pipeline` for Stable Diffusion: a prompt in, uint8 images out, calling `text_encoder`,
`unet` and `vae_decoder` through BLS.

Copied into <repo>/pipeline/1/model.py by dq-triton for StableDiffusionPipeline graphs. It repeats, step for step,
what dq-generate runs (diffusers' StableDiffusionPipeline.__call__ with the quantized UNet in it), so the same seed
and settings give the same images:
- tokens: the pipeline's own tokenizer (files in tokenizer/ beside this file), padded to model_max_length and
  truncated; the prompt and the negative prompt ("" when none) are encoded by separate calls, as encode_prompt does;
- latents: torch.randn((N, C, H/f, W/f), generator=torch.Generator().manual_seed(SEED)) * init_noise_sigma;
- scheduler: the one SCHEDULER names in schedulers.json (written by dq-triton with dilatequant.core.schedulers, as
  dq-generate builds it: `pipeline`, the folder's own, by default), set_timesteps(STEPS), scale_model_input,
  step(..., eta=0 / generator where the step takes them);
- UNet: guidance > 1 doubles the batch as [uncond; cond]; t_index is the nearest calibrated timestep (first
  minimum of |t - timesteps| on the unrounded t, so a tie takes the larger timestep); float timesteps then round
  to the integers the graph takes;
- decode: vae_decoder(latents / scaling_factor); image = clamp(x * 0.5 + 0.5, 0, 1); uint8 = round(image * 255).

Needs torch, diffusers and transformers in the server's Python. Inputs: see config.pbtxt's header.
"""
import inspect
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

try:
    import torch
    import transformers
    import diffusers
except ImportError as err:  # reported on every request: the model still loads and says what is missing
    torch = None
    IMPORT_ERROR = (f"the pipeline needs torch, diffusers and transformers in the server's Python ({err}); "
                    "pip install them there")

DEFAULT_SCHEDULER = "pipeline"


class RequestError(ValueError):
    """A request that cannot be served; its message goes back to the client."""


def _value(request, name, default=None):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if default is None:
            raise RequestError(f"missing input '{name}'")
        return default
    arr = tensor.as_numpy().reshape(-1)
    if arr.size != 1:
        raise RequestError(f"input '{name}' must hold one value, got shape {list(tensor.as_numpy().shape)}")
    v = arr[0]
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError(f"input '{name}' is not UTF-8 text") from None
    return v.item() if hasattr(v, "item") else v


def make_scheduler(config):
    """A scheduler from its whole config (every setting is in it, so no class default fills anything in)."""
    return getattr(diffusers, config["_class_name"]).from_config(config)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / args["model_version"]
        self.models = {"text_encoder": p["text_encoder_model"], "unet": p["unet_model"], "vae": p["vae_model"]}
        self.unet_output = p["unet_output"]
        self.unet_batch = int(p["unet_max_batch"])
        self.t_index_input = p.get("t_index_input", "true") == "true"  # static-scale graphs take no t_index
        self.timesteps = np.array(json.loads(p["timesteps"]), dtype=np.float64)  # floats: Euler-type calibration
        self.latent_channels = int(p["latent_channels"])
        self.vae_scale_factor = int(p["vae_scale_factor"])
        self.scaling_factor = float(p["scaling_factor"])
        self.size = tuple(json.loads(p["image_size"]))
        self.size_multiple = int(p["size_multiple"])
        self.max_size = int(p["max_size"])
        self.default_steps = int(p["default_steps"])
        self.default_guidance = float(p["default_guidance"])
        self.max_images = int(p["max_images"])
        self.schedulers = json.loads((folder / "schedulers.json").read_text())
        self.num_train = int(self.schedulers[DEFAULT_SCHEDULER]["num_train_timesteps"])
        if torch is not None:
            torch.set_num_threads(int(p.get("torch_threads", "1")))
            tok_cls = getattr(transformers, p["tokenizer_class"])
            self.tokenizer = tok_cls.from_pretrained(str(folder / "tokenizer"), local_files_only=True)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                if torch is None:
                    raise RequestError(IMPORT_ERROR)
                images = self._generate(request)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("IMAGES", images)]))
            except RequestError as err:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(err))))
        return responses

    # --- requests -------------------------------------------------------------------------------------------
    def _settings(self, request):
        prompt = _value(request, "PROMPT")
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError("PROMPT is empty: send the text to generate from")
        negative = _value(request, "NEGATIVE_PROMPT", "")
        steps = int(_value(request, "STEPS", self.default_steps))
        if not 1 <= steps <= self.num_train:
            raise RequestError(f"STEPS {steps} out of range: use 1..{self.num_train}")
        guidance = float(_value(request, "GUIDANCE_SCALE", self.default_guidance))
        if not np.isfinite(guidance):
            raise RequestError("GUIDANCE_SCALE must be a finite number")
        n = int(_value(request, "NUM_IMAGES", 1))
        if not 1 <= n <= self.max_images:
            raise RequestError(f"NUM_IMAGES {n} out of range: use 1..{self.max_images} per request")
        h, w = int(_value(request, "HEIGHT", self.size[0])), int(_value(request, "WIDTH", self.size[1]))
        if (h, w) != self.size:
            if not self.size_multiple:
                raise RequestError(f"HEIGHT x WIDTH {h}x{w}: this unet was exported for {self.size[0]}x{self.size[1]} "
                                   "only (static shapes); leave HEIGHT and WIDTH out")
            m = self.size_multiple
            if h < m or w < m or h % m or w % m or max(h, w) > self.max_size:
                raise RequestError(f"HEIGHT x WIDTH {h}x{w} cannot be taken: both must be multiples of {m} up to "
                                   f"{self.max_size} (default {self.size[0]}x{self.size[1]})")
        scheduler = _value(request, "SCHEDULER", DEFAULT_SCHEDULER)
        if scheduler not in self.schedulers:
            raise RequestError(f"unknown SCHEDULER '{scheduler}': choose one of {', '.join(self.schedulers)}")
        seed = int(_value(request, "SEED"))
        return prompt, negative, steps, guidance, n, (h, w), scheduler, seed

    def _generate(self, request):
        prompt, negative, steps, guidance, n, (h, w), scheduler, seed = self._settings(request)
        guided = guidance > 1.0  # diffusers' do_classifier_free_guidance
        emb = self._encode(prompt).repeat(n, 1, 1)
        if guided:
            emb = torch.cat([self._encode(negative).repeat(n, 1, 1), emb])
        sched = make_scheduler(self.schedulers[scheduler])
        sched.set_timesteps(steps)
        gen = torch.Generator().manual_seed(seed)
        shape = (n, self.latent_channels, h // self.vae_scale_factor, w // self.vae_scale_factor)
        latents = torch.randn(shape, generator=gen) * sched.init_noise_sigma
        step_kwargs = {}
        params = set(inspect.signature(sched.step).parameters)
        if "eta" in params:
            step_kwargs["eta"] = 0.0
        if "generator" in params:
            step_kwargs["generator"] = gen
        cond = emb.numpy().astype(np.float32, copy=False)
        for t in sched.timesteps:
            x = torch.cat([latents] * 2) if guided else latents
            x = sched.scale_model_input(x, t)
            eps = torch.from_numpy(self._unet(x.numpy(), t, cond))
            if guided:
                uncond, text = eps.chunk(2)
                eps = uncond + guidance * (text - uncond)
            latents = sched.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
        image = torch.from_numpy(self._call("vae", "latent", (latents / self.scaling_factor).numpy(), "image"))
        image = (image * 0.5 + 0.5).clamp(0, 1)
        return (image * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()

    # --- BLS calls ------------------------------------------------------------------------------------------
    def _encode(self, text):
        ids = self.tokenizer([text], padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="np").input_ids.astype(np.int64)
        return torch.from_numpy(self._call("text_encoder", "input_ids", ids, "last_hidden_state"))

    def _call(self, model, input_name, array, output_name):
        name = self.models[model]
        inputs = [pb_utils.Tensor(input_name, np.ascontiguousarray(array))]
        response = pb_utils.InferenceRequest(model_name=name, inputs=inputs,
                                             requested_output_names=[output_name]).exec()
        if response.has_error():
            raise RequestError(f"model '{name}' failed: {response.error().message()}")
        return pb_utils.get_output_tensor_by_name(response, output_name).as_numpy().astype(np.float32, copy=False)

    def t_index(self, t):
        return int(np.abs(self.timesteps - t).argmin())

    def _unet(self, sample, t, cond):
        t_index = self.t_index(float(t))
        t = int(round(float(t)))
        outs = []
        for s in range(0, len(sample), self.unet_batch):
            chunk = np.ascontiguousarray(sample[s:s + self.unet_batch], dtype=np.float32)
            b = len(chunk)
            inputs = [pb_utils.Tensor("sample", chunk), pb_utils.Tensor("timestep", np.full((b, 1), t, np.int64)),
                      pb_utils.Tensor("encoder_hidden_states", np.ascontiguousarray(cond[s:s + b]))]
            if self.t_index_input:
                inputs.append(pb_utils.Tensor("t_index", np.full((b, 1), t_index, np.int64)))
            response = pb_utils.InferenceRequest(model_name=self.models["unet"], inputs=inputs,
                                                 requested_output_names=[self.unet_output]).exec()
            if response.has_error():
                raise RequestError(f"unet model '{self.models['unet']}' failed: {response.error().message()}")
            outs.append(pb_utils.get_output_tensor_by_name(response, self.unet_output).as_numpy())
        return np.concatenate(outs).astype(np.float32, copy=False)
