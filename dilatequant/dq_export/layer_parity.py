"""Teacher-forced layer-wise parity: every quantized layer of the graph against the fake-quant model, per t_index.

End to end, two runtimes of a quantized UNet cannot agree to the last bit: a float op (GroupNorm, SiLU, softmax)
that differs in its last bit moves a value across a rounding tie, and the flipped level propagates (30-45 dB
between runtimes that are both right). Layer by layer they can: each layer of the exported graph is fed the
PyTorch fake-quant model's own input to that layer, at the inputs' own t_index, and must produce the same
integer levels entering its conv/matmul and the same output. A wrong row of one per-timestep table, a wrong
zero point or swapped t_index rows change the levels of that layer at that t_index, which this sees and the
end-to-end numbers do not.

How (ONNX Runtime): each quantized layer's site in the graph is found from its integer-weight initializer
(fold.py's deployment form: x -> Mul(mult[t]) [-> Add(shift[t])] -> clip -> Q -> DQ -> op(., DQ(W_int)) [-> Add
(correction)] -> Mul(w_scale) -> Mul(delta[t]) [-> Add(bias)]; a weight-only INT4 layer: x [-> Mul(1/s)] ->
MatMul(DQ(W_int4)) [-> Add(bias)]). Every layer input x becomes a graph input of one teacher-forced model whose
outputs are every layer's levels (the activation QuantizeLinear output) and output; nodes no output needs are
dropped. So the runtime computes each layer with its own kernels and tables, from the reference's input.
Comparison lives here; running the graphs stays in the runners (`ort_layer_runner`, `trt_layer_runner`).
"""
from __future__ import annotations

import gc
import math
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnx_ir.passes import common

from ..calibrate.checkpoint import QuantCheckpoint
from ..calibrate.quant_unet import QuantConv2d, QuantLayer
from ..core.conditioning import COND_NAMES
from ..core.errors import UserError
from ..core.metrics import sqnr_db
from .onnx_files import load_model, save_model

MAX_LEVEL_DIFF = 1         # no level may differ by more than one (a float tie at most)
MAX_DIFF_SHARE = 1e-4      # share of levels that may differ by one, per layer
MIN_SQNR_DB = 60.0         # layer output against the reference, per layer and t_index
TEACHER_SUFFIX = "__teacher"
CAPTURE_BYTES = 2 * 2**30  # activations held per batch (every layer's input, levels and output, both sides)


class LayerParityError(UserError):
    """The graph does not compute the fake-quant model layer by layer (dq-export exits non-zero)."""


@dataclass
class LayerSite:
    """Where one quantized layer sits in the graph."""

    name: str               # module path in the UNet, e.g. down_blocks.0.resnets.0.conv1
    input: str              # graph value the layer reads (the reference's input is fed here)
    levels: str | None      # activation QuantizeLinear output (None: weight-only INT4, float activation)
    output: str             # the layer's output value (after the bias)
    weight_only: bool = False


# ---------------------------------------------------------------- graph side: sites and the teacher-forced model


def _is_data(value: ir.Value | None, memo: dict, data_inputs: set[str]) -> bool:
    """Does value depend on float data (sample, condition, timestep), shapes aside? t_index and constants do not.

    Walked with an explicit stack: an SDXL graph's data path runs thousands of nodes deep, past Python's
    recursion limit. memo (id of a value -> answer) is shared between calls, so the whole graph is walked once.
    """
    if value is None:
        return False
    expanded: set[int] = set()
    stack = [value]
    while stack:
        v = stack[-1]
        key = id(v)
        if key in memo:
            stack.pop()
            continue
        node = v.producer()
        if node is None or node.op_type in ("Shape", "Size"):
            memo[key] = node is None and v.is_graph_input() and v.name in data_inputs
            stack.pop()
            continue
        if key not in expanded:  # first visit: its inputs first, then this value again
            expanded.add(key)
            stack.extend(i for i in node.inputs if i is not None and id(i) not in memo and id(i) not in expanded)
            continue
        memo[key] = any(memo.get(id(i), False) for i in node.inputs if i is not None)
        stack.pop()
    return memo[id(value)]


def _data_operand(node: ir.Node, memo, data_inputs) -> ir.Value | None:
    """The one data input of a pointwise node whose other inputs are tables or constants (else None)."""
    data = [i for i in node.inputs if _is_data(i, memo, data_inputs)]
    return data[0] if len(data) == 1 else None


def _single_use(value: ir.Value, op_types: tuple[str, ...]) -> ir.Node | None:
    users = [u.node for u in value.uses()]
    return users[0] if len(users) == 1 and users[0].op_type in op_types else None


def _weight_initializer(graph: ir.Graph, name: str, w_int: np.ndarray) -> ir.Value | None:
    """The layer's integer weight: by the exporter's name (unet.<layer>.w_int[_int4]), checked by its values."""
    for key in (f"unet.{name}.w_int", f"unet.{name}.w_int_int4"):
        v = graph.initializers.get(key)
        if v is not None and v.const_value is not None:
            arr = v.const_value.numpy()
            if arr.shape == w_int.shape and np.array_equal(arr.astype(np.int8), w_int):
                return v
    for v in graph.initializers.values():  # renamed by a pass: the values still identify it
        if v.const_value is not None and tuple(v.shape or ()) == w_int.shape \
                and v.dtype in (ir.DataType.INT8, ir.DataType.INT4) \
                and np.array_equal(v.const_value.numpy().astype(np.int8), w_int):
            return v
    return None


def find_site(graph: ir.Graph, name: str, layer: QuantLayer, weight_only: bool, memo: dict,
              data_inputs: set[str]) -> LayerSite | str:
    """The declared pattern around one layer, or a reason why it does not match."""
    w_int = layer.weight_quantizer.integer_weight(layer.weight.detach()).to(torch.int8).numpy()
    if not isinstance(layer, QuantConv2d):
        w_int = np.ascontiguousarray(w_int.T)  # stored [in, out]
    w = _weight_initializer(graph, name, w_int)
    if w is None:
        return "no initializer holds its integer weights"
    dq = [u.node for u in w.uses() if u.node.op_type == "DequantizeLinear"]
    ops = [u.node for d in dq for u in d.outputs[0].uses() if u.node.op_type in ("Conv", "MatMul", "Gemm")]
    if len(ops) != 1:
        return f"its weight feeds {len(ops)} Conv/MatMul nodes, expected 1"
    op = ops[0]
    q = layer.input_quantizer
    if weight_only:
        x, levels = op.inputs[0], None
        src = x.producer()
        if src is not None and src.op_type == "DequantizeLinear":
            return "weight-only INT4 layer whose activation passes a DequantizeLinear (W4A8 has no TensorRT kernel)"
        if q.inv_scale.numel():
            if src is None or src.op_type != "Mul" or _data_operand(src, memo, data_inputs) is None:
                return "weight-only INT4 layer without its 1/s Mul"
            x = _data_operand(src, memo, data_inputs)
    else:
        act_dq = op.inputs[0].producer()
        quant = act_dq.inputs[0].producer() if act_dq is not None and act_dq.op_type == "DequantizeLinear" else None
        if quant is None or quant.op_type != "QuantizeLinear":
            return "its activation does not come through QuantizeLinear -> DequantizeLinear"
        levels, v = quant.outputs[0], quant.inputs[0]
        for _ in range(2):  # the clip: Clip, or Max and Min in either order
            node = v.producer()
            if node is not None and node.op_type in ("Clip", "Max", "Min"):
                v = node.inputs[0]
        node = v.producer()
        if not q.symmetric:
            if node is None or node.op_type != "Add" or _data_operand(node, memo, data_inputs) is None:
                return "asymmetric layer without its zero-point shift Add before the clip"
            v = _data_operand(node, memo, data_inputs)
            node = v.producer()
        if node is None or node.op_type != "Mul" or _data_operand(node, memo, data_inputs) is None:
            return "no per-timestep multiplier Mul in front of its activation quantizer"
        x = _data_operand(node, memo, data_inputs)
    expected = ([] if weight_only or q.symmetric else ["Add"]) + ([] if weight_only else ["Mul", "Mul"]) \
        + (["Add"] if layer.bias is not None else [])
    y = op.outputs[0]
    for op_type in expected:  # zero-point correction, weight scale, step size, bias
        node = _single_use(y, (op_type,))
        if node is None or _data_operand(node, memo, data_inputs) is not y:
            return f"its output is not followed by the expected {' -> '.join(expected)}"
        y = node.outputs[0]
    return LayerSite(name, x.name, None if levels is None else levels.name, y.name, weight_only)


def find_sites(model: ir.Model, ck: QuantCheckpoint, weight_only: tuple[str, ...] = ()) -> tuple[list[LayerSite], dict]:
    """Every quantized layer's site; layers whose pattern does not match are returned with the reason."""
    graph = model.graph
    data_inputs = {v.name for v in graph.inputs if v.name != "t_index"}
    memo: dict = {}
    sites, unmatched = [], {}
    for name, layer in ck.qunet.layers().items():
        found = find_site(graph, name, layer, name in weight_only, memo, data_inputs)
        if isinstance(found, str):
            unmatched[name] = found
        else:
            sites.append(found)
    if ck.qunet.config.attn_matmul:
        for key, q in ck.qunet.act_quantizers.items():
            if key.rsplit("/", 1)[-1] in ATTN_OPERANDS:
                found = find_attention_site(graph, key, q, memo, data_inputs)
                name = attention_site_name(key)
                if isinstance(found, str):
                    unmatched[name] = found
                else:
                    sites.append(found)
    return sites, unmatched


ATTN_OPERANDS = ("attn_q", "attn_k", "attn_v", "attn_p")
SHAPE_OPS = ("Reshape", "Unsqueeze", "Expand", "Cast", "Identity", "Squeeze")


def attention_site_name(key: str) -> str:
    """down_blocks/1/attentions/0/.../attn1/attn_q -> down_blocks.1.attentions.0....attn1:q (q, k, v, softmax p)."""
    path, _, part = key.rpartition("/")
    return f"{path.replace('/', '.')}:{part[-1]}"


def find_attention_site(graph: ir.Graph, key: str, q, memo: dict, data_inputs: set[str]) -> LayerSite | str:
    """An attention-matmul operand (fold._DequantizedOperand): x -> Mul(mult[t]) [-> Add(shift[t])] -> clip -> Q
    -> DQ [-> Add(correction[t])] -> Mul(delta[t]), found by its multiplier table's values under the module's name."""
    from .fold import StepTables

    mult = StepTables(q, static=False).mult.detach().numpy()
    prefix = "unet." + key.rpartition("/")[0].replace("/", ".") + "."
    tables = [v for name, v in graph.initializers.items() if name.startswith(prefix) and v.const_value is not None
              and tuple(v.shape or ()) == mult.shape and np.array_equal(v.const_value.numpy(), mult)]
    if len(tables) != 1:
        return f"{len(tables)} initializers under '{prefix}' hold its multiplier table (expected 1)"
    frontier = [u.node for u in tables[0].uses() if u.node.op_type == "Gather"]
    mul = None
    for _ in range(4):  # Gather -> (reshapes) -> Mul
        muls = [n for n in frontier if n.op_type == "Mul"]
        if muls:
            mul = muls[0] if len(muls) == 1 else None
            break
        frontier = [u.node for n in frontier if n.op_type in SHAPE_OPS + ("Gather",) for u in n.outputs[0].uses()]
    if mul is None or _data_operand(mul, memo, data_inputs) is None:
        return "its multiplier table does not reach one Mul on the activation"
    x = _data_operand(mul, memo, data_inputs)
    v = mul.outputs[0]
    if not q.symmetric:
        node = _single_use(v, ("Add",))
        if node is None:
            return "asymmetric operand without its zero-point shift Add"
        v = node.outputs[0]
    for _ in range(2):
        node = _single_use(v, ("Clip", "Max", "Min"))
        if node is not None:
            v = node.outputs[0]
    quant = _single_use(v, ("QuantizeLinear",))
    if quant is None:
        return "no QuantizeLinear after its clip"
    levels = quant.outputs[0]
    dq = _single_use(levels, ("DequantizeLinear",))
    if dq is None:
        return "its QuantizeLinear does not feed one DequantizeLinear"
    v = dq.outputs[0]
    for op_type in ([] if q.symmetric else ["Add"]) + ["Mul"]:  # correction, step size
        node = _single_use(v, (op_type,))
        if node is None or _data_operand(node, memo, data_inputs) is not v:
            return f"its dequantized value is not followed by {op_type} of its table"
        v = node.outputs[0]
    return LayerSite(attention_site_name(key), x.name, levels.name, v.name)


def teacher_forced_model(model: ir.Model, sites: list[LayerSite]) -> tuple[onnx.ModelProto, list[str]]:
    """The graph with every layer input cut into a graph input (`<name>__teacher`), outputs levels and layer outputs.

    Returns the model and the graph inputs it still reads (the original ones some shape or t_index path needs).
    """
    graph = model.graph
    values = {v.name: v for node in graph for v in node.outputs}
    values.update({v.name: v for v in graph.inputs})
    cut: dict[str, ir.Value] = {}
    for s in sites:
        if s.input in cut:
            continue
        old = values[s.input]
        if old.is_graph_input():
            cut[s.input] = old
            continue
        new = ir.Value(name=s.input + TEACHER_SUFFIX, shape=old.shape,
                       type=old.type or ir.TensorType(ir.DataType.FLOAT))
        old.replace_all_uses_with(new)
        graph.inputs.append(new)
        cut[s.input] = new
    outputs = []
    for s in sites:
        for name in (s.levels, s.output):
            if name is not None and values[name] not in outputs:
                outputs.append(values[name])
    graph.outputs.clear()
    graph.outputs.extend(outputs)
    common.RemoveUnusedNodesPass()(model)
    used = [v for v in graph.inputs if v.uses() or v.is_graph_output()]
    graph.inputs.clear()
    graph.inputs.extend(used)
    return ir.serde.serialize_model(model), [v.name for v in used]


# ---------------------------------------------------------------- reference side: the fake-quant model's layers


@dataclass
class Captured:
    x: torch.Tensor
    levels: torch.Tensor | None
    y: torch.Tensor


@torch.no_grad()
def capture_layers(ck: QuantCheckpoint, inputs: dict[str, torch.Tensor]) -> dict[str, Captured]:
    """Every QuantLayer's (and attention operand's) input, integer levels and output in one fake-quant forward."""
    out: dict[str, Captured] = {}
    hooks = []
    if ck.qunet.config.attn_matmul:
        for key, q in ck.qunet.act_quantizers.items():
            if key.rsplit("/", 1)[-1] in ATTN_OPERANDS:
                def operand(mod, args, y, name=attention_site_name(key)):
                    out[name] = Captured(args[0].detach().clone(), mod.levels(args[0]).v.detach().clone(),
                                         y.detach().clone())
                hooks.append(q.register_forward_hook(operand))
    for name, layer in ck.qunet.layers().items():
        def hook(mod, args, y, name=name):
            x = args[0]
            q = mod.input_quantizer
            lv = q.levels(x).v if q.mode == "quant" else None
            out[name] = Captured(x.detach().clone(), None if lv is None else lv.detach().clone(), y.detach().clone())
        hooks.append(layer.register_forward_hook(hook))
    try:
        cond = {k: inputs[k] for k in COND_NAMES if k in inputs} or None
        ck.qunet(inputs["sample"], inputs["timestep"], inputs["t_index"], cond)
    finally:
        for h in hooks:
            h.remove()
    return out


# ---------------------------------------------------------------- comparison


@dataclass
class _Row:
    """Accumulated over one (layer, t_index)."""

    elements: int = 0
    levels: int = 0
    differing: int = 0
    max_diff: float = 0.0
    signal: float = 0.0
    noise: float = 0.0

    def add(self, ref: Captured, levels: np.ndarray | None, y: np.ndarray) -> None:
        yr = ref.y.double().numpy()
        self.elements += yr.size
        self.signal += float(np.sum(yr**2))
        self.noise += float(np.sum((y.astype(np.float64) - yr) ** 2))
        if ref.levels is not None and levels is not None:
            d = np.abs(levels.astype(np.float64) - ref.levels.double().numpy())
            self.levels += d.size
            self.differing += int(np.count_nonzero(d))
            self.max_diff = max(self.max_diff, float(d.max()) if d.size else 0.0)

    @property
    def sqnr_db(self) -> float:
        if self.noise == 0.0:
            return math.inf
        return -math.inf if self.signal == 0.0 else 10 * math.log10(self.signal / self.noise)


@dataclass
class Thresholds:
    max_level_diff: int = MAX_LEVEL_DIFF
    max_diff_share: float = MAX_DIFF_SHARE
    min_sqnr_db: float = MIN_SQNR_DB


@dataclass
class LayerParity:
    """Accumulates the comparison of every layer at every t_index; `report()` gives the JSON."""

    sites: list[LayerSite]
    num_steps: int
    rows: dict[tuple[str, int], _Row] = field(default_factory=dict)

    def add_batch(self, t_index: torch.Tensor, ref: dict[str, Captured], got: dict[str, np.ndarray]) -> None:
        for s in self.sites:
            r = ref[s.name]
            for t in t_index.unique().tolist():
                m = (t_index == t).numpy()
                sel = Captured(r.x[m], None if r.levels is None else r.levels[m], r.y[m])
                lv = None if s.levels is None else got[s.levels][m]
                self.rows.setdefault((s.name, t), _Row()).add(sel, lv, got[s.output][m])

    def report(self, unmatched: dict[str, str], th: Thresholds, enforce: bool = True) -> dict:
        layers, failures = [], []
        for name, reason in unmatched.items():
            failures.append(f"{name}: not found in the graph ({reason})")
        for s in self.sites:
            per_t = [(t, self.rows[(s.name, t)]) for t in range(self.num_steps) if (s.name, t) in self.rows]
            levels = sum(r.levels for _, r in per_t)
            differing = sum(r.differing for _, r in per_t)
            max_diff = max((r.max_diff for _, r in per_t), default=0.0)
            sq = [r.sqnr_db for _, r in per_t]
            entry = {"layer": s.name, "mode": "w4a16" if s.weight_only else "quantized input",
                     "elements": sum(r.elements for _, r in per_t), "levels": levels,
                     "differing_levels": differing, "differing_share": differing / levels if levels else 0.0,
                     "max_level_diff": max_diff, "min_sqnr_db": min(sq) if sq else None,
                     "t_index_covered": len(per_t),
                     "per_t_index": [{"t_index": t, "sqnr_db": r.sqnr_db, "differing_levels": r.differing,
                                      "levels": r.levels, "max_level_diff": r.max_diff} for t, r in per_t]}
            layers.append(entry)
            if len(per_t) < self.num_steps:
                failures.append(f"{s.name}: only {len(per_t)} of {self.num_steps} t_index values had inputs")
            if max_diff > th.max_level_diff:
                worst = max(per_t, key=lambda p: p[1].max_diff)[0]
                failures.append(f"{s.name}: a level differs by {max_diff:.0f} (t_index {worst})")
            if levels and differing / levels >= th.max_diff_share:
                failures.append(f"{s.name}: {differing} of {levels} levels differ ({differing / levels:.2e})")
            low = [(t, r.sqnr_db) for t, r in per_t if r.sqnr_db < th.min_sqnr_db]
            if low:
                t, v = min(low, key=lambda p: p[1])
                failures.append(f"{s.name}: output SQNR {v:.1f} dB at t_index {t} (< {th.min_sqnr_db:.0f} dB)")
        all_levels = sum(e["levels"] for e in layers)
        all_diff = sum(e["differing_levels"] for e in layers)
        finite = [e["min_sqnr_db"] for e in layers if e["min_sqnr_db"] is not None]
        worst = min(layers, key=lambda e: e["min_sqnr_db"] if e["min_sqnr_db"] is not None else math.inf,
                    default=None)
        return {"layers": len(layers), "unmatched": unmatched, "t_index_values": self.num_steps,
                "max_level_diff": max((e["max_level_diff"] for e in layers), default=0.0),
                "differing_levels": all_diff, "levels_compared": all_levels,
                "differing_share": all_diff / all_levels if all_levels else 0.0,
                "min_layer_sqnr_db": min(finite) if finite else None,
                "worst_layer": None if worst is None else worst["layer"],
                "thresholds": {"max_level_diff": th.max_level_diff, "max_differing_share": th.max_diff_share,
                               "min_sqnr_db": th.min_sqnr_db},
                "enforced": enforce, "passed": not failures, "failures": failures, "per_layer": layers}


def raise_on_failure(report: dict, report_path: str | Path | None = None) -> None:
    """A failed layer-wise parity is an error (dq-export exits 2), naming the first layers that fail."""
    if report.get("enforced", True) and not report["passed"]:
        f = report["failures"]
        more = f" (and {len(f) - 3} more)" if len(f) > 3 else ""
        where = f" (every layer: {report_path})" if report_path else ""
        raise LayerParityError(f"layer-wise parity failed: {'; '.join(f[:3])}{more}{where}. The graph does not "
                               "compute the fake-quant model: do not deploy it; re-export it from its q.pt - a "
                               "hand-edited or stale graph, or a dq-export bug (report it with the checkpoint)")


# ---------------------------------------------------------------- runners and the check


LayerRunner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def ort_layer_runner(path: Path, threads: int = 0) -> LayerRunner:
    """ONNX Runtime on the teacher-forced model's file (the same session options as the end-to-end parity);
    by path, so its external data is read beside it and no 2 GiB protobuf message is ever built."""
    from .parity import ort_session

    sess = ort_session(path, threads)
    names = [o.name for o in sess.get_outputs()]
    return lambda feeds: dict(zip(names, sess.run(names, feeds)))


@contextmanager
def scratch_dir(near: Path) -> Iterator[Path]:
    """A temporary folder beside `near` (same disk as the graph, not a RAM-backed /tmp), else the system's."""
    try:
        tmp = tempfile.TemporaryDirectory(dir=near, prefix=".layer-parity-")
    except OSError:
        tmp = tempfile.TemporaryDirectory(prefix="dq-layer-parity-")
    with tmp as name:
        yield Path(name)


def layer_inputs(ck: QuantCheckpoint, per_step: int, fp_model=None, seed: int = 4321) -> tuple[dict, str]:
    """per_step real calibration inputs at every t_index: from the FP model's trajectories (calibration_data.py),
    or, when the FP model cannot be loaded (tiny test models), from the fake-quant model's own trajectories."""
    from ..calibrate.calibration_data import build_calibration_set
    from ..calibrate.checkpoint import source_model

    T = len(ck.timesteps)
    if fp_model is None:
        try:
            fp_model = source_model(ck)
        except UserError:
            fp_model = None
    if fp_model is not None:
        data = build_calibration_set(fp_model, per_step * T, ck.schedule.steps, seed=seed, schedule=ck.schedule)
        return (data.inputs(slice(None)),
                f"calibration set: {per_step * T} inputs from FP {ck.schedule.label} trajectories")
    from .parity import parity_inputs

    return parity_inputs(ck, per_step, seed=seed), f"{per_step * T} inputs from fake-quant {ck.schedule.label} trajectories"


def feeds_for(batch: dict[str, torch.Tensor], captured: dict[str, Captured], sites: list[LayerSite],
              graph_inputs: list[str], input_types: dict[str, np.dtype]) -> dict[str, np.ndarray]:
    feeds = {}
    by_input = {s.input: s for s in sites}
    for name in graph_inputs:
        if name.endswith(TEACHER_SUFFIX):
            v = captured[by_input[name[: -len(TEACHER_SUFFIX)]].name].x
        else:  # an original graph input: a layer reading it directly (encoder_hidden_states), t_index, shapes
            v = batch[name]
        feeds[name] = v.detach().cpu().numpy().astype(input_types[name], copy=False)
    return feeds


def layer_parity_report(onnx_path: str | Path, ck: QuantCheckpoint, per_step: int = 2, batch: int = 8,
                        weight_only: tuple[str, ...] = (), fp_model=None, inputs: dict | None = None,
                        runner_factory: Callable[[Path], LayerRunner] = ort_layer_runner,
                        thresholds: Thresholds | None = None) -> dict:
    """Teacher-forced comparison of every quantized layer at every t_index (see the module docstring)."""
    th = thresholds or Thresholds()
    layers = ck.qunet.layers()
    if any(layers[n].input_quantizer.mode != "off" for n in weight_only):
        raise ValueError("configure the reference first: fold.w4a16_reference(ck.qunet, weight_only)")
    structure = load_model(onnx_path, with_data=False)
    props = {p.key: p.value for p in structure.metadata_props}
    if props.get("dilatequant.static_scales") == "true":
        return {"skipped": "static-scale twin: no per-timestep fake-quant reference to compare with", "passed": True,
                "enforced": False}
    if any(n.op_type == "MatMulIntegerToFloat" for n in structure.graph.node):
        return {"skipped": "--target ort graph: its layer-wise parity ran at export, on the TensorRT-form graph it "
                "was converted from", "passed": True, "enforced": False}
    del structure
    source = "given inputs"
    if inputs is None:  # first: the FP model that samples them is gone before the graph and the reference load
        inputs, source = layer_inputs(ck, per_step, fp_model)
        gc.collect()
    proto = load_model(onnx_path)  # by path: external data is read from beside the graph
    model = ir.serde.deserialize_model(proto)
    sites, unmatched = find_sites(model, ck, weight_only)
    enforce = props.get("dilatequant.dtype", "fp32") == "fp32"
    teacher, graph_inputs = teacher_forced_model(model, sites)
    del model, proto  # the teacher-forced copy is all that is needed from here
    types = {i.name: onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in teacher.graph.input}
    acc = LayerParity(sites, len(ck.timesteps))
    n = len(inputs["sample"])
    # one input's captured activations size the batches (an SD-size UNet holds GBs of them per input)
    one = capture_layers(ck, {k: v[:1] for k, v in inputs.items()})
    per_input = sum(c.x.nbytes + c.y.nbytes + (0 if c.levels is None else c.levels.nbytes) for c in one.values())
    size = max(1, min(batch, CAPTURE_BYTES // (2 * max(1, per_input))))  # reference and runtime copies
    del one
    with scratch_dir(Path(onnx_path).parent) as tmp:
        # the runtime reads the teacher-forced graph from a file: over the external-data threshold (a >2 GB
        # UNet) it is written as graph + data file, which no serialized bytes could hold
        teacher_path = tmp / "teacher.onnx"
        save_model(teacher, teacher_path)
        del teacher
        run = runner_factory(teacher_path)
        try:
            for start in range(0, n, size):
                b = {k: v[start:start + size] for k, v in inputs.items()}
                ref = capture_layers(ck, b)
                got = run(feeds_for(b, ref, sites, graph_inputs, types))
                acc.add_batch(b["t_index"], ref, got)
        finally:
            if callable(getattr(run, "close", None)):
                run.close()
    rep = acc.report(unmatched, th, enforce)
    rep.update({"inputs": source, "samples": n, "runtime": getattr(run, "name", "onnxruntime"),
                "weight_only_int4_layers": list(weight_only)})
    if not enforce:
        rep["note"] = "FP16 graph: layer outputs are rounded to FP16, the thresholds are not enforced"
    return rep
