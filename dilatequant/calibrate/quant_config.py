"""Every quantization choice in one dataclass that round-trips through JSON (stored inside q.pt)."""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields

from ..core.errors import UserError

# The choices QuantConfig names; kept here, torch-free, so the CLI can list them without importing the method.
SCALING_METHODS = ("none", "smoothquant", "dilation")          # weight_dilation.py implements them
INIT_METHODS = ("mse", "percentile", "minmax", "minmean")      # timestep_quantizer.py implements them
FORMATS = ("int", "fp8")                                       # quantizers.py: IntRange, E4M3Grid


@dataclass
class QuantConfig:
    weight_bits: int = 4
    act_bits: int = 8
    symmetric: bool = False          # paper: asymmetric activations; True is what TensorRT runs
    first_last_bits: int | None = 8  # conv_in / conv_out (weights and inputs); None = same as the rest
    scaling: str = "dilation"        # none | smoothquant | dilation
    smoothquant_alpha: float = 0.5
    dilation_cap: float | None = None  # None -> 2^weight_bits
    tpq: bool = True                 # False: one activation row for all timesteps (static scale)
    num_steps: int = 50              # T: sampling steps the tables are calibrated for
    attn_matmul: bool = False        # quantize q, k, v and softmax output (per head)
    act_init: str = "mse"            # mse | percentile | minmax | minmean
    # layers left entirely in float (weights and input). None: the layer that reads x_t itself (a UNet's conv_in,
    # a transformer's patch embedding: denoisers.DenoiserFamily.input_layer), the one tensor whose 8-bit error the
    # noise prediction amplifies (benchmarks/layer_sensitivity.py: 6.3 dB of noise SQNR at W8A8 on `default`;
    # README "DilateQuant against its baselines"). A conv or linear from the latent channels: a plain float
    # (FP16) op in the graph, a negligible share of the FLOPs.
    float_layers: tuple[str, ...] | None = None
    # int: uniform integer levels; fp8: FP8 E4M3 (W8A8, symmetric; per-out-channel weights, per-tensor TPQ rows)
    format: str = "int"

    def __post_init__(self) -> None:
        if self.float_layers is not None:
            self.float_layers = tuple(self.float_layers)  # JSON gives a list
        if self.format not in FORMATS:
            raise UserError(f"unknown format '{self.format}': choose one of {', '.join(FORMATS)}")
        for name in ("weight_bits", "act_bits") + (("first_last_bits",) if self.first_last_bits else ()):
            if not 2 <= getattr(self, name) <= 8:
                raise UserError(f"{name} must be in 2..8, got {getattr(self, name)}")
        if self.format == "fp8":
            if (self.weight_bits, self.act_bits) != (8, 8):
                raise UserError(f"fp8 (E4M3) is 8-bit: got --bits {self.bits_name}; pass --bits W8A8 with --format fp8")
            if self.first_last_bits not in (None, 8):
                raise UserError(f"fp8 (E4M3) is 8-bit: got --first-last-bits {self.first_last_bits}; drop it "
                                "with --format fp8")
            if not self.symmetric:
                raise UserError("fp8 (E4M3) is symmetric (zero point 0): set symmetric=True")
        if self.scaling not in SCALING_METHODS:
            raise UserError(f"unknown scaling '{self.scaling}': choose one of {', '.join(SCALING_METHODS)}")
        if self.act_init not in INIT_METHODS:
            raise UserError(f"unknown activation init '{self.act_init}': choose one of {', '.join(INIT_METHODS)}")
        if self.num_steps < 1:
            raise UserError(f"num_steps must be >= 1, got {self.num_steps}")

    @property
    def table_rows(self) -> int:
        return self.num_steps if self.tpq else 1

    @property
    def cap(self) -> float:
        return self.dilation_cap or float(2**self.weight_bits)

    @property
    def bits_name(self) -> str:
        return f"W{self.weight_bits}A{self.act_bits}"

    @property
    def format_name(self) -> str:
        """What a report calls this quantization: W4A8 (integer) or FP8 W8A8 (E4M3)."""
        return f"FP8 {self.bits_name}" if self.format == "fp8" else self.bits_name

    @staticmethod
    def parse_bits(text: str) -> tuple[int, int]:
        m = re.fullmatch(r"[Ww](\d)[Aa](\d)", text.strip())
        if not m:
            raise UserError(f"bits must look like W4A8 (weight bits, activation bits), got '{text}'")
        return int(m.group(1)), int(m.group(2))

    def to_json(self) -> str:
        data = asdict(self)
        if data["format"] == "int":  # as before FP8 existed: older versions still read the q.pt, and an interrupted
            del data["format"]       # run's --resume fingerprint (recipe.run_fingerprint) is unchanged
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "QuantConfig":
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise UserError(f"quantization config has unknown fields {sorted(unknown)}; was q.pt written by a newer version?")
        data.setdefault("float_layers", [])  # written before the option existed: every layer quantized
        data.setdefault("format", "int")  # written before FP8 existed
        return cls(**data)
