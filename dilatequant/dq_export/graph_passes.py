"""Rewrites on the exported graph (onnx_ir, in place): clean-up, INT4 weight blocks, metadata."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common


def _never_fold_qdq(node) -> bool | None:
    """Constant folding must keep every Q/DQ node: folding DQ(int8 W) would leave a float weight."""
    return False if node.op_type in ("QuantizeLinear", "DequantizeLinear") else None


def simplify(model: ir.Model) -> ir.Model:
    """Cheap clean-up of the raw export (the exporter's full optimizer takes minutes on a UNet).

    The tensors end as the graph's own copies: the exporter's refer to the PyTorch module's, and with them to
    the checkpoint's memory-mapped float weights (10.3 GB at SDXL size), which the caller then frees.
    """
    from onnxscript.optimizer import fold_constants  # a heavy import, needed by the export alone

    fold_constants(model, should_fold=_never_fold_qdq)
    for p in (common.RemoveUnusedNodesPass(), common.LiftConstantsToInitializersPass(size_limit=1),
              common.DeduplicateInitializersPass(), common.CommonSubexpressionEliminationPass(),
              common.IdentityEliminationPass(), common.RemoveUnusedNodesPass(),
              common.ClearMetadataAndDocStringPass()):
        p(model)
    for v in model.graph.initializers.values():
        t = v.const_value
        if isinstance(t, ir.Tensor) and not isinstance(t.raw, np.ndarray):  # the exporter's TorchTensor
            v.const_value = ir.Tensor(np.array(t.numpy()), name=v.name)
    return model


def finalize_graph(model: ir.Model, metadata: dict[str, str], int4_block: int | None) -> ir.Model:
    """INT4 weight blocks (when `int4_block` is set), then the graph's metadata (built by qdq_graph.metadata)."""
    if int4_block is not None:
        int4_weights(model, int4_block)
    model.metadata_props.clear()
    model.metadata_props.update(metadata)
    model.producer_name = "dilatequant"
    return model


def int4_weights(model: ir.Model, block: int) -> int:
    """int8 [K, N] weight -> DequantizeLinear(axis 0, block_size) -> MatMul becomes INT4 blocks.

    The per-output-channel scale is replicated over every block of K, so values stay exact. Weights
    whose levels do not fit in 4 bits (8-bit first/last layers) or whose K is not a multiple of the
    block size stay int8.
    """
    graph = model.graph
    converted = 0
    for node in graph:
        w = node.inputs[0] if node.op_type == "DequantizeLinear" else None
        if w is None or not w.is_initializer() or w.const_value is None:
            continue
        axis = node.attributes.get_int("axis", 1)
        users = list(node.outputs[0].uses())
        if w.const_value.dtype != ir.DataType.INT8 or len(w.const_value.shape) != 2 or axis != 1 \
                or not users or any(u.node.op_type not in ("MatMul", "Gemm") for u in users):
            continue
        arr = w.const_value.numpy()
        k, n_out = arr.shape
        if arr.min() < -8 or arr.max() > 7 or k % block:
            continue
        # per-channel [N], or the unit per-tensor scale of integer-weight layers: either becomes [N]
        scale = np.broadcast_to(node.inputs[1].const_value.numpy().astype(np.float32).reshape(-1), (n_out,))
        w4 = add_initializer(graph, w.name + "_int4", arr.astype(ml_dtypes.int4))
        s4 = add_initializer(graph, w.name + "_int4_scale", np.tile(scale[None, :], (k // block, 1)))
        node.resize_inputs(2)  # no zero point: 0
        node.replace_input_with(0, w4)
        node.replace_input_with(1, s4)
        node.attributes.clear()
        node.attributes.update({"axis": ir.AttrInt64("axis", 0), "block_size": ir.AttrInt64("block_size", block)})
        converted += 1
    remove_unused_initializers(graph)
    return converted


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A new initializer holding `array`, typed and shaped like it."""
    t = ir.Tensor(array, name=name)
    v = ir.Value(name=name, type=ir.TensorType(t.dtype), shape=t.shape, const_value=t)
    graph.register_initializer(v)
    return v


def remove_unused_initializers(graph: ir.Graph) -> None:
    """Drop the initializers no node reads (graph inputs and outputs stay)."""
    for name, v in list(graph.initializers.items()):
        if not v.uses() and not v.is_graph_output() and not v.is_graph_input():
            del graph.initializers[name]


def ensure_types(model: ir.Model) -> None:
    """Every node output typed: ONNX shape inference fills what the graph does not say (hand-built graphs).

    onnx_ir's pass infers on a copy without the large tensors, so it works at any model size.
    """
    if any(v.dtype is None for n in model.graph for v in n.outputs):
        common.ShapeInferencePass(check_type=False, strict_mode=False, data_prop=False)(model)
