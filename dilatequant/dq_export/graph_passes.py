"""Rewrites on the exported graph: metadata, INT4 weight blocks, clean-up."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper, numpy_helper
from onnx_ir.passes import common
from onnxscript.optimizer import fold_constants


def _never_fold_qdq(node) -> bool | None:
    """Constant folding must keep every Q/DQ node: folding DQ(int8 W) would leave a float weight."""
    return False if node.op_type in ("QuantizeLinear", "DequantizeLinear") else None


def simplify(model: ir.Model) -> onnx.ModelProto:
    """Cheap clean-up of the raw export (the exporter's full optimizer takes minutes on a UNet)."""
    fold_constants(model, should_fold=_never_fold_qdq)
    for p in (common.RemoveUnusedNodesPass(), common.LiftConstantsToInitializersPass(size_limit=1),
              common.DeduplicateInitializersPass(), common.CommonSubexpressionEliminationPass(),
              common.IdentityEliminationPass(), common.RemoveUnusedNodesPass(),
              common.ClearMetadataAndDocStringPass()):
        p(model)
    return ir.serde.serialize_model(model)


def finalize_graph(model: onnx.ModelProto, metadata: dict[str, str], int4_block: int | None) -> onnx.ModelProto:
    """INT4 weight blocks (when `int4_block` is set), then the graph's metadata (built by qdq_graph.metadata)."""
    if int4_block is not None:
        int4_weights(model, int4_block)
    del model.metadata_props[:]
    for k, v in metadata.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    model.producer_name = "dilatequant"
    return model


def int4_weights(model: onnx.ModelProto, block: int) -> int:
    """int8 [K, N] weight -> DequantizeLinear(axis 0, block_size) -> MatMul becomes INT4 blocks.

    The per-output-channel scale is replicated over every block of K, so values stay exact. Weights
    whose levels do not fit in 4 bits (8-bit first/last layers) or whose K is not a multiple of the
    block size stay int8.
    """
    inits = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    converted = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        w = inits[node.input[0]]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        users = consumers.get(node.output[0], [])
        if w.data_type != onnx.TensorProto.INT8 or len(w.dims) != 2 or axis != 1 \
                or not users or any(u.op_type not in ("MatMul", "Gemm") for u in users):
            continue
        arr = numpy_helper.to_array(w)
        k, n_out = arr.shape
        if arr.min() < -8 or arr.max() > 7 or k % block:
            continue
        # per-channel [N], or the unit per-tensor scale of integer-weight layers: either becomes [N]
        scale = np.broadcast_to(numpy_helper.to_array(inits[node.input[1]]).astype(np.float32).reshape(-1), (n_out,))
        w4 = numpy_helper.from_array(arr.astype(ml_dtypes.int4), w.name + "_int4")
        s4 = numpy_helper.from_array(np.tile(scale[None, :], (k // block, 1)), w.name + "_int4_scale")
        model.graph.initializer.extend([w4, s4])
        del node.input[:]
        node.input.extend([w4.name, s4.name])  # no zero point: 0
        del node.attribute[:]
        node.attribute.extend([helper.make_attribute("axis", 0), helper.make_attribute("block_size", block)])
        converted += 1
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return converted
