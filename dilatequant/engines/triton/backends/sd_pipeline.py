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
SDXL graphs (StableDiffusionXLPipeline.__call__): both tokenizers and text encoders, their penultimate hidden states
concatenated per token, the pooled projection of text_encoder_2 as text_embeds; no NEGATIVE_PROMPT under
force_zeros_for_empty_prompt gives zero embeddings for the unconditional half; time_ids = original size + crop
top-left + target size (defaults: HEIGHT, WIDTH; 0, 0; HEIGHT, WIDTH), the same for both halves; decode with the
VAE's latents_mean/latents_std when its config has them.
SD3 graphs (StableDiffusion3Pipeline.__call__, the graph is its transformer): both CLIP encoders' penultimate hidden
states concatenated and zero-padded to joint_attention_dim, then T5's last hidden state at t5_tokens tokens (zeros
without T5); pooled_projections = both CLIP pooled projections; the negative prompt "" encoded the same way; the
folder's own FlowMatchEuler (mu from the image tokens when it shifts dynamically), unscaled noise, no
scale_model_input, float timesteps to the transformer as they are; decode latents / scaling_factor + shift_factor.

Needs torch, diffusers and transformers in the server's Python. Inputs: see config.pbtxt's header.
"""
import inspect
import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from dq_bls import RequestError, call, error_response

try:
    import diffusers
    import torch
    import transformers
except ImportError as err:  # reported on every request: the model still loads and says what is missing
    torch = None
    IMPORT_ERROR = (f"the pipeline needs torch, diffusers and transformers in the server's Python ({err}); "
                    "pip install them there")

DEFAULT_SCHEDULER = "pipeline"  # the folder's own; SD3 samples with it only
SDXL, SD3 = "StableDiffusionXLPipeline", "StableDiffusion3Pipeline"
REQUIRED = object()


def _value(request, name, default=REQUIRED):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        if default is REQUIRED:
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


def _pair(request, name, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return tuple(default)
    arr = tensor.as_numpy().reshape(-1)
    if arr.size != 2 or (arr < 0).any():
        raise RequestError(f"input '{name}' must hold two non-negative integers, got {arr.tolist()}")
    return tuple(int(v) for v in arr)


def make_scheduler(config):
    """A scheduler from its whole config (every setting is in it, so no class default fills anything in)."""
    return getattr(diffusers, config["_class_name"]).from_config(config)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / args["model_version"]
        self.models = {"text_encoder": p["text_encoder_model"], "unet": p["unet_model"], "vae": p["vae_model"]}
        self.xl = p.get("pipeline_class") == SDXL
        self.sd3 = p.get("pipeline_class") == SD3
        self.encoders = ["text_encoder"]
        if self.xl or self.sd3:
            self.models["text_encoder_2"] = p["text_encoder_2_model"]
            self.encoders.append("text_encoder_2")
        if p.get("text_encoder_3_model"):
            self.models["text_encoder_3"] = p["text_encoder_3_model"]
            self.encoders.append("text_encoder_3")
        if self.sd3:
            self.joint_dim, self.t5_tokens = int(p["joint_attention_dim"]), int(p["t5_tokens"])
            self.shift_factor, self.patch_size = float(p["shift_factor"]), int(p["patch_size"])
        self.force_zeros = p.get("force_zeros_for_empty_prompt") == "true"
        stats = [p.get("latents_mean"), p.get("latents_std")]
        self.latents_stats = [json.loads(v) for v in stats] if all(stats) else None
        self.unet_output = p["unet_output"]
        self.unet_batch = int(p["unet_max_batch"])
        self.t_index_input = p.get("t_index_input", "true") == "true"  # static-scale graphs take no t_index
        self.timesteps = np.array(json.loads(p["timesteps"]), dtype=np.float64)  # floats: Euler-type, SD3
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
            classes = {"text_encoder": p["tokenizer_class"], "text_encoder_2": p.get("tokenizer_2_class"),
                       "text_encoder_3": p.get("tokenizer_3_class")}
            self.tokenizers = {e: getattr(transformers, classes[e]).from_pretrained(
                str(folder / e.replace("text_encoder", "tokenizer")), local_files_only=True) for e in self.encoders}

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

    # --- requests -------------------------------------------------------------------------------------------
    def _settings(self, request):
        prompt = _value(request, "PROMPT")
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError("PROMPT is empty: send the text to generate from")
        negative = _value(request, "NEGATIVE_PROMPT", None)  # None: SDXL may zero the unconditional half
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
        if self.sd3 and scheduler != DEFAULT_SCHEDULER:
            raise RequestError(f"SCHEDULER '{scheduler}': an SD3 pipeline samples with its own scheduler only; "
                               "leave SCHEDULER out")
        if scheduler not in self.schedulers:
            raise RequestError(f"unknown SCHEDULER '{scheduler}': choose one of {', '.join(self.schedulers)}")
        seed = int(_value(request, "SEED"))
        time_ids = None
        if self.xl:  # original size + crop top-left + target size, as StableDiffusionXLPipeline._get_add_time_ids
            time_ids = (_pair(request, "ORIGINAL_SIZE", (h, w)) + _pair(request, "CROPS_COORDS_TOP_LEFT", (0, 0))
                        + (h, w))
        return prompt, negative, steps, guidance, n, (h, w), scheduler, seed, time_ids

    def _condition(self, prompt, negative, n, guided, time_ids):
        """The unet's condition inputs, [uncond; cond] under guidance, as the pipeline's encode_prompt makes them."""
        emb, pooled = self._encode(prompt)
        cond = {"encoder_hidden_states": emb.repeat(n, 1, 1)}
        pooled_name = "pooled_projections" if self.sd3 else "text_embeds"
        if self.xl or self.sd3:
            cond[pooled_name] = pooled.repeat(n, 1)
        if guided:
            if self.xl and negative is None and self.force_zeros:
                neg, neg_pooled = torch.zeros_like(emb), torch.zeros_like(pooled)
            else:
                neg, neg_pooled = self._encode(negative or "")
            cond["encoder_hidden_states"] = torch.cat([neg.repeat(n, 1, 1), cond["encoder_hidden_states"]])
            if self.xl or self.sd3:
                cond[pooled_name] = torch.cat([neg_pooled.repeat(n, 1), cond[pooled_name]])
        if self.xl:
            rows = len(cond["text_embeds"])
            cond["time_ids"] = torch.tensor([list(time_ids)], dtype=torch.float32).repeat(rows, 1)
        return {k: v.numpy().astype(np.float32, copy=False) for k, v in cond.items()}

    def _generate(self, request):
        prompt, negative, steps, guidance, n, (h, w), scheduler, seed, time_ids = self._settings(request)
        guided = guidance > 1.0  # diffusers' do_classifier_free_guidance
        cond = self._condition(prompt, negative, n, guided, time_ids)
        sched = make_scheduler(self.schedulers[scheduler])
        gen = torch.Generator().manual_seed(seed)
        shape = (n, self.latent_channels, h // self.vae_scale_factor, w // self.vae_scale_factor)
        if self.sd3:  # StableDiffusion3Pipeline: its own scheduler, unscaled noise, no scale_model_input
            sched.set_timesteps(steps, **self._mu(sched.config, shape))
            latents, step_kwargs, scale = torch.randn(shape, generator=gen), {}, (lambda x, t: x)
        else:
            sched.set_timesteps(steps)
            latents = torch.randn(shape, generator=gen) * sched.init_noise_sigma
            step_kwargs, scale = {}, sched.scale_model_input
            params = set(inspect.signature(sched.step).parameters)
            if "eta" in params:
                step_kwargs["eta"] = 0.0
            if "generator" in params:
                step_kwargs["generator"] = gen
        for t in sched.timesteps:
            x = torch.cat([latents] * 2) if guided else latents
            x = scale(x, t)
            eps = torch.from_numpy(self._unet(x.numpy(), t, cond))
            if guided:
                uncond, text = eps.chunk(2)
                eps = uncond + guidance * (text - uncond)
            latents = sched.step(eps, t, latents, **step_kwargs, return_dict=False)[0]
        if self.latents_stats is not None:
            mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in self.latents_stats)
            latents = latents * std / self.scaling_factor + mean
        elif self.sd3:
            latents = latents / self.scaling_factor + self.shift_factor
        else:
            latents = latents / self.scaling_factor
        image = torch.from_numpy(self._call("vae", {"latent": latents.numpy()}, ["image"])[0])
        image = (image * 0.5 + 0.5).clamp(0, 1)
        return (image * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()

    def _mu(self, cfg, shape):
        """StableDiffusion3Pipeline's mu (diffusers' calculate_shift) when its scheduler shifts dynamically."""
        if not cfg.get("use_dynamic_shifting"):
            return {}
        tokens = (shape[2] // self.patch_size) * (shape[3] // self.patch_size)
        base_len, max_len = cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096)
        base, top = cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16)
        m = (top - base) / (max_len - base_len)
        return {"mu": tokens * m + base - m * base_len}

    # --- BLS calls ------------------------------------------------------------------------------------------
    def _encode(self, text):
        """(hidden states [1, T, D], pooled [1, P] or None): SD the last hidden state; SDXL both encoders'
        penultimate ones concatenated, and text_encoder_2's pooled projection; SD3 see _encode_sd3."""
        if self.sd3:
            return self._encode_sd3(text)
        hidden, pooled = [], None
        for e in self.encoders:
            tok = self.tokenizers[e]
            ids = tok([text], padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="np").input_ids.astype(np.int64)
            names = ["penultimate_hidden_state"] if self.xl else ["last_hidden_state"]
            outs = self._call(e, {"input_ids": ids}, names + (["text_embeds"] if e == "text_encoder_2" else []))
            hidden.append(torch.from_numpy(outs[0]))
            if e == "text_encoder_2":
                pooled = torch.from_numpy(outs[1])
        return torch.cat(hidden, dim=-1), pooled

    def _encode_sd3(self, text):
        """StableDiffusion3Pipeline.encode_prompt: CLIP-L || CLIP-G penultimate hidden states, zero-padded to the joint
        width, then T5 (or zeros); both pooled projections concatenated."""
        hidden, pooled = [], []
        for e in ("text_encoder", "text_encoder_2"):
            tok = self.tokenizers[e]
            ids = tok([text], padding="max_length", max_length=self.tokenizers["text_encoder"].model_max_length,
                      truncation=True, return_tensors="np").input_ids.astype(np.int64)
            outs = self._call(e, {"input_ids": ids}, ["penultimate_hidden_state", "text_embeds"])
            hidden.append(torch.from_numpy(outs[0]))
            pooled.append(torch.from_numpy(outs[1]))
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, self.joint_dim - clip.shape[-1]))
        if "text_encoder_3" in self.models:
            ids = self.tokenizers["text_encoder_3"]([text], padding="max_length", max_length=self.t5_tokens,
                                                    truncation=True, add_special_tokens=True,
                                                    return_tensors="np").input_ids.astype(np.int64)
            t5 = torch.from_numpy(self._call("text_encoder_3", {"input_ids": ids}, ["last_hidden_state"])[0])
        else:
            t5 = torch.zeros((1, self.t5_tokens, self.joint_dim))
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)

    def _call(self, model, arrays, output_names):
        inputs = [pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in arrays.items()]
        return [out.astype(np.float32, copy=False) for out in call(self.models[model], inputs, output_names)]

    def t_index(self, t):
        return int(np.abs(self.timesteps - t).argmin())

    def _unet(self, sample, t, cond):
        t_index = self.t_index(float(t))
        # a UNet graph takes integer timesteps; SD3's transformer the scheduler's float as it is
        t, t_type = (float(t), np.float32) if self.sd3 else (int(round(float(t))), np.int64)
        outs = []
        for s in range(0, len(sample), self.unet_batch):
            chunk = np.ascontiguousarray(sample[s:s + self.unet_batch], dtype=np.float32)
            b = len(chunk)
            inputs = [pb_utils.Tensor("sample", chunk), pb_utils.Tensor("timestep", np.full((b, 1), t, t_type))]
            inputs += [pb_utils.Tensor(k, np.ascontiguousarray(v[s:s + b])) for k, v in cond.items()]
            if self.t_index_input:
                inputs.append(pb_utils.Tensor("t_index", np.full((b, 1), t_index, np.int64)))
            outs.append(call(self.models["unet"], inputs, [self.unet_output])[0])
        return np.concatenate(outs).astype(np.float32, copy=False)
