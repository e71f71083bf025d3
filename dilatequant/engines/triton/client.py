"""dq-client: ask the `pipeline` model for images over HTTP or gRPC (tritonclient), retrying what is transient."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ...core.errors import UserError
from ...core.sizes import parse_size  # noqa: F401  (torch-free; dq-client parses --size with it)
from .retry import Attempts, RetriesExhausted, RetryPolicy, call_with_retries

PROTOCOLS = ("http", "grpc")


class InferenceFailed(UserError):
    """The server answered with an error (bad request, model failure); the message is the server's."""


def _module(protocol: str):
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol '{protocol}': choose http or grpc")
    try:
        if protocol == "http":
            import tritonclient.http as m
        else:
            import tritonclient.grpc as m
    except ImportError as err:
        raise UserError(f"tritonclient[{protocol}] is not installed ({err}); pip install 'dilatequant[serve]'") from err
    return m


def connect(url: str, protocol: str = "http", timeout_s: float = 300.0):
    m = _module(protocol)
    url = url.split("://", 1)[-1]
    if protocol == "http":
        return m.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
    return m.InferenceServerClient(url)


def infer(client, protocol: str, model: str, arrays: dict[str, np.ndarray], outputs: list[str],
          timeout_s: float = 300.0) -> dict[str, np.ndarray]:
    """One request with numpy inputs; server errors become InferenceFailed with the server's message."""
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    m = _module(protocol)
    inputs = []
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        t = m.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        t.set_data_from_numpy(arr)
        inputs.append(t)
    outs = [m.InferRequestedOutput(o) for o in outputs]
    try:
        if protocol == "grpc":
            result = client.infer(model, inputs, outputs=outs, client_timeout=timeout_s)
        else:
            result = client.infer(model, inputs, outputs=outs, timeout=int(timeout_s * 1e6))
    except InferenceServerException as err:
        raise InferenceFailed(f"server rejected the request to '{model}': {err.message()}") from err
    return {o: result.as_numpy(o) for o in outputs}


def pipeline_inputs(labels: list[int] | None, seed: int, steps: int | None = None,
                    guidance: float | None = None, num_images: int = 1) -> dict[str, np.ndarray]:
    arrays = {"SEED": np.array([seed], np.int64)}
    if steps is not None:
        arrays["STEPS"] = np.array([steps], np.int32)
    if labels is not None:
        arrays["CLASS_LABELS"] = np.asarray(labels, np.int64).reshape(-1)
        if guidance is not None:
            arrays["GUIDANCE_SCALE"] = np.array([guidance], np.float32)
    else:
        arrays["NUM_IMAGES"] = np.array([num_images], np.int32)
    return arrays


def prompt_inputs(prompt: str, seed: int = 0, steps: int | None = None, guidance: float | None = None,
                  negative_prompt: str | None = None, num_images: int | None = None,
                  size: tuple[int, int] | None = None, scheduler: str | None = None,
                  original_size: tuple[int, int] | None = None,
                  crops_coords_top_left: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """The Stable Diffusion pipeline's inputs; what is None is left to the server's defaults. original_size and
    crops_coords_top_left are SDXL's time_ids micro-conditioning (an SD 1.x/2.x server rejects them)."""
    if not prompt.strip():
        raise UserError("--prompt is empty; pass the text to generate from")

    def text(v: str) -> np.ndarray:
        return np.array([v.encode("utf-8")], dtype=object)

    arrays = {"PROMPT": text(prompt), "SEED": np.array([seed], np.int64)}
    optional = {"NEGATIVE_PROMPT": None if negative_prompt is None else text(negative_prompt),
                "STEPS": None if steps is None else np.array([steps], np.int32),
                "GUIDANCE_SCALE": None if guidance is None else np.array([guidance], np.float32),
                "NUM_IMAGES": None if num_images is None else np.array([num_images], np.int32),
                "HEIGHT": None if size is None else np.array([size[0]], np.int32),
                "WIDTH": None if size is None else np.array([size[1]], np.int32),
                "SCHEDULER": None if scheduler is None else text(scheduler),
                "ORIGINAL_SIZE": None if original_size is None else np.array(original_size, np.int32),
                "CROPS_COORDS_TOP_LEFT": None if crops_coords_top_left is None else
                np.array(crops_coords_top_left, np.int32)}
    arrays.update({k: v for k, v in optional.items() if v is not None})
    return arrays


def generate(url: str, labels: list[int] | None = None, seed: int = 0, steps: int | None = None,
             guidance: float | None = None, num_images: int = 1, protocol: str = "http",
             model: str = "pipeline", timeout_s: float = 300.0, retries: int = 0) -> np.ndarray:
    """Images [N, H, W, C] uint8 from the pipeline model (labels for conditional models)."""
    return request_images(url, pipeline_inputs(labels, seed, steps, guidance, num_images), protocol, model, timeout_s,
                          retries)


def generate_from_prompt(url: str, prompt: str, seed: int = 0, protocol: str = "http", model: str = "pipeline",
                         timeout_s: float = 300.0, retries: int = 0, **settings) -> np.ndarray:
    """Images [N, H, W, C] uint8 from a Stable Diffusion pipeline model; settings: see prompt_inputs."""
    return request_images(url, prompt_inputs(prompt, seed, **settings), protocol, model, timeout_s, retries)


WRONG_KIND = {  # a server message that means the request was for the other kind of pipeline -> the fix
    "'PROMPT'": "this server's pipeline takes prompts (a Stable Diffusion repository): pass --prompt TEXT",
    "unexpected inference input 'CLASS_LABELS'": "this server's pipeline takes prompts (a Stable Diffusion "
                                                  "repository): pass --prompt TEXT",
}
WRONG_KIND_PROMPT = ("this server's pipeline takes class labels or nothing, not prompts: pass --label N or leave "
                     "both out")


def request_images(url: str, arrays: dict[str, np.ndarray], protocol: str = "http", model: str = "pipeline",
                   timeout_s: float = 300.0, retries: int = 0) -> np.ndarray:
    """IMAGES for these inputs; `timeout_s` bounds the whole call, `retries` transient failures are tried again."""
    return fetch_images(url, arrays, protocol, model, RetryPolicy(retries=retries, deadline_s=timeout_s))[0]


def fetch_images(url: str, arrays: dict[str, np.ndarray], protocol: str = "http", model: str = "pipeline",
                 policy: RetryPolicy | None = None) -> tuple[np.ndarray, Attempts]:
    """IMAGES and what it took to get them, under `policy` (retries with backoff, one deadline for all attempts)."""
    policy = policy or RetryPolicy()

    def attempt(seconds_left: float) -> np.ndarray:
        client = connect(url, protocol, seconds_left)
        try:
            return infer(client, protocol, model, arrays, ["IMAGES"], seconds_left)["IMAGES"]
        finally:
            client.close()

    try:
        return call_with_retries(attempt, policy)
    except RetriesExhausted as err:
        refused = {"connection refused", "connection reset"}
        if set(err.attempts.failures) <= refused:
            raise RetriesExhausted(f"cannot reach Triton at {url} over {protocol}: {err}; start it with dq-serve "
                                   "--repo DIR", err.attempts) from err
        hint = ("allow it more time with --timeout" if err.attempts.failures[-1] == "timed out" else
                "the server may be recovering a model: try again, or allow more with --retries / --timeout")
        raise RetriesExhausted(f"Triton at {url} did not serve '{model}': {err}; {hint}", err.attempts) from err
    except InferenceFailed as err:
        msg = str(err)
        if "PROMPT" in arrays and "unexpected inference input 'PROMPT'" in msg:
            raise InferenceFailed(f"{msg}; {WRONG_KIND_PROMPT}") from err
        if "PROMPT" not in arrays:
            for needle, fix in WRONG_KIND.items():
                if needle in msg:
                    raise InferenceFailed(f"{msg}; {fix}") from err
        raise
    except UserError:
        raise
    except Exception as err:  # a bad host name, a protocol error: name the URL
        raise UserError(f"cannot reach Triton at {url} over {protocol} ({type(err).__name__}: {err}); "
                        "start it with dq-serve --repo DIR") from err


def save_png(images: np.ndarray, path: str | Path, scale: int = 4) -> Path:
    """Images side by side in one PNG (grey or RGB), enlarged `scale` times for viewing."""
    from PIL import Image

    from ...core.reporting import atomic_write_bytes

    strip = np.concatenate(list(images), axis=1)
    if strip.shape[-1] == 1:
        strip = strip[..., 0]
    img = Image.fromarray(strip)
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
