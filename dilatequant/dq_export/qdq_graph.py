"""q.pt -> QDQ ONNX: the deployment-form denoiser (UNet or transformer) exported with torch.onnx (dynamo), then
annotated."""
from __future__ import annotations

import gc
import json
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Sequence

import onnx_ir as ir
import torch
from torch import nn

from ..calibrate.checkpoint import QuantCheckpoint, load_checkpoint
from ..core.conditioning import COND_NAMES, as_condition
from ..core.denoisers import UNetFamily, family_of
from ..core.errors import UserError
from .export_config import FP8_MIN_COMPUTE_CAPABILITY, ExportConfig
from .export_fixes import transformer_export
from .fold import ExportContext, deploy_unet, int4_layers
from .fp8_ops import TRANSLATIONS
from .fp16 import to_fp16
from .graph_passes import finalize_graph, simplify
from .onnx_files import save_model

FORMAT_VERSION = "1"
OPSET = 21


class ExportWrapper(nn.Module):
    """Graph interface: (sample, timestep, t_index, <the denoiser's condition inputs>) -> noise_pred.

    The inputs are keyword arguments (conditioning.COND_NAMES), so every family's subset keeps its names:
    SDXL's text_embeds/time_ids, SD3's pooled_projections, FLUX's guidance, PixArt's encoder_attention_mask."""

    def __init__(self, unet: nn.Module, ctx: ExportContext, num_steps: int, use_t_index: bool) -> None:
        super().__init__()
        self.unet, self.ctx, self.num_steps, self.use_t_index = unet, ctx, num_steps, use_t_index
        self.family = family_of(unet)

    def forward(self, sample, timestep, t_index=None, encoder_hidden_states=None, text_embeds=None, time_ids=None,
                pooled_projections=None, guidance=None, encoder_attention_mask=None):
        # An out-of-range t_index must never index out of bounds in any runtime: clamp in the graph.
        self.ctx.t_index = torch.clamp(t_index, 0, self.num_steps - 1) if self.use_t_index else None
        cond = {"encoder_hidden_states": encoder_hidden_states, "text_embeds": text_embeds, "time_ids": time_ids,
                "pooled_projections": pooled_projections, "guidance": guidance,
                "encoder_attention_mask": encoder_attention_mask}
        return self.family.predict(self.unet, sample, timestep, as_condition(cond))


class StaticExportWrapper(ExportWrapper):
    """The static-scale twin's interface: (sample, timestep[, condition inputs]), no t_index."""

    def forward(self, sample, timestep, encoder_hidden_states=None, text_embeds=None, time_ids=None,
                pooled_projections=None, guidance=None, encoder_attention_mask=None):
        return super().forward(sample, timestep, None, encoder_hidden_states, text_embeds, time_ids,
                               pooled_projections, guidance, encoder_attention_mask)


assert tuple(COND_NAMES) == ("encoder_hidden_states", "text_embeds", "time_ids", "pooled_projections", "guidance",
                             "encoder_attention_mask"), "ExportWrapper.forward takes COND_NAMES in this order"


def input_names(cond_inputs: Sequence[str], use_t_index: bool) -> list[str]:
    """Graph input names in order: sample, timestep, [t_index], then the denoiser's condition inputs."""
    return ["sample", "timestep"] + (["t_index"] if use_t_index else []) + list(cond_inputs)


def example_inputs(ck: QuantCheckpoint, batch: int, use_t_index: bool) -> dict[str, torch.Tensor]:
    c, h, w = ck.model.sample_shape
    gen = torch.Generator().manual_seed(0)
    ins = {"sample": torch.randn(batch, c, h, w, generator=gen),
           "timestep": _timestep_input(ck, batch)}
    if use_t_index:
        ins["t_index"] = torch.arange(batch) % len(ck.timesteps)
    if ck.model.is_conditional:
        guidance = ck.model.guidance_scale if ck.model.guidance_embedded else 1.0
        ins.update(ck.model.condition(torch.arange(batch) % ck.model.num_labels, guidance))
    return ins


def _timestep_input(ck: QuantCheckpoint, batch: int) -> torch.Tensor:
    """A UNet graph takes int64 timesteps (rounded); a transformer's takes them as its scheduler gives them
    (flow matching's 1000 sigma floats: a float32 input)."""
    values = (list(ck.timesteps) * batch)[:batch]
    if ck.model.is_transformer:
        return torch.tensor(values, dtype=torch.float32 if any(isinstance(t, float) for t in values) else torch.int64)
    return torch.tensor([round(t) for t in values], dtype=torch.int64)


def _dynamic_shapes(names: list[str], static: bool, spatial_multiple: int):
    """Dynamic batch and spatial sizes; H and W stay multiples of the UNet's total downsampling factor."""
    if static:
        return None
    # diffusers' Upsample2D branches on batch >= 64 only to call .contiguous() (a no-op in ONNX), which
    # torch.export turns into a guard batch <= 63: declaring that range up front saves a second trace
    # (about a quarter of the export time, profiled). The ONNX batch dimension stays symbolic: any size runs.
    batch = torch.export.Dim("batch", min=1, max=63)
    h = spatial_multiple * torch.export.Dim("h_blocks", min=1, max=4096 // spatial_multiple)
    w = spatial_multiple * torch.export.Dim("w_blocks", min=1, max=4096 // spatial_multiple)
    shapes = {"sample": {0: batch, 2: h, 3: w}, "timestep": {0: batch}, "t_index": {0: batch}}
    return {n: shapes.get(n, {0: batch}) for n in names}  # condition inputs: dynamic batch, fixed token count


def spatial_multiple(denoiser: nn.Module) -> int:
    """Latent sizes the denoiser takes without padding: a UNet's 2^downsamplings, a transformer's patch."""
    return family_of(denoiser).patch_multiple(denoiser)


def export_onnx(ckpt: str | Path | QuantCheckpoint, onnx_path: str | Path, cfg: ExportConfig) -> dict:
    """Write the QDQ ONNX graph of a q.pt (its path, or the QuantCheckpoint read from it, which the export
    leaves unchanged); returns a summary (the caller runs checks and parity)."""
    start = time.perf_counter()
    ck = ckpt if isinstance(ckpt, QuantCheckpoint) else load_checkpoint(ckpt)
    cfg = cfg.for_checkpoint(ck.qunet.config.format)
    use_t = not cfg.static_scales and ck.qunet.config.tpq
    w4a16 = w4a16_layers(ck, cfg)
    unet, ctx = deploy_unet(ck.qunet, static=cfg.static_scales, w4a16=w4a16)
    wrapper = (ExportWrapper if use_t else StaticExportWrapper)(unet.eval(), ctx, len(ck.timesteps), use_t).eval()
    names = input_names(ck.model.cond_names, use_t)
    ins = example_inputs(ck, cfg.batch, use_t)
    shapes = _dynamic_shapes(names, cfg.static_shapes, spatial_multiple(ck.qunet.unet))
    with torch.no_grad(), warnings.catch_warnings(), _without_stack_traces():
        warnings.simplefilter("ignore")
        try:
            if isinstance(family_of(ck.qunet.unet), UNetFamily):
                program = torch.onnx.export(
                    wrapper, tuple(ins[n] for n in names), input_names=names, output_names=["noise_pred"],
                    dynamo=True, opset_version=OPSET, dynamic_shapes=shapes, verbose=False, optimize=False,
                    custom_translation_table=TRANSLATIONS)
            else:
                program = transformer_export(wrapper, {n: ins[n] for n in names}, names, shapes, OPSET, TRANSLATIONS)
        except UserError:
            raise
        except Exception as err:  # the exporter's own errors are long; keep the cause
            raise UserError(f"ONNX export failed: {type(err).__name__}: {str(err).splitlines()[0]}") from err
    model = simplify(program.model)
    props = metadata(ck, cfg, ck.sha256, use_t)
    if _fixed_spatial_size(model):  # the exporter specialised H and W (PixArt's position table is built per size)
        props["dilatequant.spatial_multiple"] = "0"
    # The graph holds its own copies of the weights now. The exporter's program, the deployment-form copy and (when
    # no caller holds it) the checkpoint, its mapped float32 pages 10.3 GB at SDXL size, sit in reference cycles:
    # collect them before the graph is written
    del program, wrapper, unet, ctx, ck
    gc.collect()
    model = finalize_graph(model, props, cfg.int4_block if cfg.precision == "int4" else None)
    _check_int4_blocks(model, w4a16)
    if cfg.dtype == "fp16":
        to_fp16(model)
    written = save_model(model, onnx_path)  # over ~2 GB: unet.onnx + unet.onnx.data (onnx_files.py)
    return {"onnx": str(onnx_path), "bytes": written["bytes"], "external_data": written["external_data"],
            "inputs": names, "precision": cfg.precision,
            "static_scales": cfg.static_scales, "dtype": cfg.dtype, "export_s": round(time.perf_counter() - start, 2),
            "config": asdict(cfg), "int4_layers": list(w4a16)}


@contextmanager
def _without_stack_traces() -> Iterator[None]:
    """Trace without recording each FX node's Python stack: simplify clears node metadata, stack traces included,
    so they cost time (capture and symbolization per node) and change nothing in the graph
    (benchmarks/results/export_profile)."""
    config = getattr(torch.fx, "config", None)
    if config is None or not hasattr(config, "do_not_emit_stack_traces"):  # older torch: nothing to switch off
        yield
        return
    before = config.do_not_emit_stack_traces
    config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        config.do_not_emit_stack_traces = before


def _fixed_spatial_size(model) -> bool:
    """Does the graph (onnx_ir) take one latent size only (static H and W on its sample input)? A dimension the
    exporter specialised comes out as a symbol named by its value ("8"): it is made the integer it is."""
    sample = next(v for v in model.graph.inputs if v.name == "sample")
    dims = [int(str(d)) if not isinstance(d, int) and str(d).isdigit() else d for d in sample.shape]
    sample.shape = ir.Shape(dims)
    return all(isinstance(d, int) for d in dims[2:])


def w4a16_layers(ck: QuantCheckpoint, cfg: ExportConfig) -> tuple[str, ...]:
    """`--precision int4`: the layers that become weight-only INT4 GEMMs; none is a clear error, not an int8 graph."""
    if cfg.precision != "int4":
        return ()
    names = tuple(int4_layers(ck.qunet, cfg.int4_block))
    if not names:
        raise UserError(f"--precision int4 needs 4-bit weights on linear layers whose input size is a multiple of "
                        f"{cfg.int4_block}; this checkpoint is {ck.qunet.config.bits_name}: export it with "
                        "--precision int8, or calibrate with --bits W4A8")
    return names


def _check_int4_blocks(model: ir.Model, w4a16: tuple[str, ...]) -> None:
    """Every weight-only layer got its INT4 blocks (else the graph would run it W8A16 under an int4 label)."""
    if not w4a16:
        return
    blocked = sum(1 for n in model.graph if n.op_type == "DequantizeLinear" and "block_size" in n.attributes)
    if blocked != len(w4a16):
        raise UserError(f"INT4 export: {blocked} INT4 weight blocks for {len(w4a16)} weight-only layers; "
                        "this is a bug in dq-export, please report it with the checkpoint")


def metadata(ck: QuantCheckpoint, cfg: ExportConfig, ckpt_hash: str, use_t: bool) -> dict[str, str]:
    qc = ck.qunet.config
    return {
        "dilatequant.format_version": FORMAT_VERSION,
        "dilatequant.source_checkpoint_sha256": ckpt_hash,
        "dilatequant.bits": qc.bits_name,
        "dilatequant.symmetric": str(qc.symmetric).lower(),
        "dilatequant.timesteps": json.dumps(ck.timesteps),
        "dilatequant.num_steps": str(len(ck.timesteps)),
        "dilatequant.t_index_input": str(use_t).lower(),
        "dilatequant.precision": cfg.precision,
        "dilatequant.dtype": cfg.dtype,
        "dilatequant.static_scales": str(cfg.static_scales).lower(),
        "dilatequant.conditional": str(ck.model.is_conditional).lower(),
        "dilatequant.cond_inputs": json.dumps(list(ck.model.cond_names)),
        "dilatequant.pipeline_class": ck.model.pipeline_class or "",
        "dilatequant.prediction_type": str(ck.model.scheduler.config.get("prediction_type", "epsilon")),
        "dilatequant.fp_fingerprint": ck.source_fingerprint,
        "dilatequant.spatial_multiple": "0" if cfg.static_shapes else str(spatial_multiple(ck.qunet.unet)),
        "dilatequant.sample_shape": json.dumps(list(ck.model.sample_shape)),
        "dilatequant.base_model": ck.source,
        "dilatequant.int4_layers": json.dumps(list(w4a16_layers(ck, cfg))),  # weight-only (W4A16) GEMMs
        "dilatequant.format": qc.format,  # int | fp8
        **({"dilatequant.min_compute_capability": FP8_MIN_COMPUTE_CAPABILITY} if qc.format == "fp8" else {}),
    }
