"""Export of tiny random models: interface, metadata, integer weights, t_index use, parity with PyTorch."""
import json

import onnx
import pytest
import torch

from dilatequant.calibrate.checkpoint import load_checkpoint
from dilatequant.core.errors import UserError
from dilatequant.dq_export.export_config import ExportConfig
from dilatequant.dq_export.parity import ort_session, parity_inputs, run_ort
from dilatequant.dq_export.pipeline import export_and_verify

from conftest import assert_parity, tiny_checkpoint, tiny_cond, tiny_uncond

STEPS = 4


def _checkpoint(tmp, model, **cfg):
    return tiny_checkpoint(tmp, model, STEPS, **cfg)


@pytest.fixture(scope="module")
def cond_asym(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cond")
    ck = _checkpoint(tmp, tiny_cond(), weight_bits=4, act_bits=8, symmetric=False, attn_matmul=True, float_layers=())
    summary = export_and_verify(ck, tmp / "unet.onnx", ExportConfig(), per_step=5)
    return ck, tmp / "unet.onnx", summary


QPT_READS: dict[str, int] = {}  # what uncond_sym's export_and_verify did with the q.pt file


@pytest.fixture(scope="module")
def uncond_sym(tmp_path_factory):
    from dilatequant.calibrate import checkpoint

    tmp = tmp_path_factory.mktemp("uncond")
    ck = _checkpoint(tmp, tiny_uncond(), weight_bits=8, act_bits=8, symmetric=True, float_layers=("conv_in",))

    def counted(key, fn):
        def wrapper(*args, **kwargs):
            QPT_READS[key] = QPT_READS.get(key, 0) + 1
            return fn(*args, **kwargs)
        return wrapper

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(checkpoint, "_read", counted("loads", checkpoint._read))
        mp.setattr(checkpoint, "checkpoint_hash", counted("hashes", checkpoint.checkpoint_hash))
        summary = export_and_verify(ck, tmp / "unet.onnx", ExportConfig(), per_step=5)
    return ck, tmp / "unet.onnx", summary


def test_export_reads_the_checkpoint_once(uncond_sym):
    """One dq-export: the q.pt is loaded once and hashed once (the graph, its rules check and both parity checks
    share the object)."""
    assert QPT_READS == {"loads": 1, "hashes": 1}


@pytest.mark.parametrize("which", ["cond_asym", "uncond_sym"])
def test_parity_with_fake_quant_at_every_t_index(request, which):
    _, _, summary = request.getfixturevalue(which)
    par = summary["parity"]
    assert [r["t_index"] for r in par["per_t_index"]] == list(range(STEPS))
    assert_parity(par)
    assert summary["trt_rules"] == "passed"


def test_interface_and_metadata(cond_asym):
    ck_path, onnx_path, _ = cond_asym
    m = onnx.load(str(onnx_path))
    ins = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in m.graph.input}
    assert list(ins) == ["sample", "timestep", "t_index", "encoder_hidden_states"]
    assert ins["sample"][0] == ins["t_index"][0] == ins["encoder_hidden_states"][0] == "batch"
    assert m.graph.input[2].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [o.name for o in m.graph.output] == ["noise_pred"]
    meta = {p.key: p.value for p in m.metadata_props}
    assert json.loads(meta["dilatequant.timesteps"]) == [750, 500, 250, 0]
    assert meta["dilatequant.bits"] == "W4A8" and meta["dilatequant.precision"] == "int8"
    assert len(meta["dilatequant.source_checkpoint_sha256"]) == 64


def test_quantized_weights_are_stored_as_integers(cond_asym):
    _, onnx_path, _ = cond_asym
    m = onnx.load(str(onnx_path))
    inits = {i.name: i for i in m.graph.initializer}
    producers = {o: n for n in m.graph.node for o in n.output}
    for n in m.graph.node:
        if n.op_type in ("Conv", "MatMul", "Gemm") and n.input[1] in producers:
            src = producers[n.input[1]]
            if src.op_type == "DequantizeLinear" and src.input[0] in inits:
                assert inits[src.input[0]].data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT4)
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    weights_from_dq = [n for n in convs if producers.get(n.input[1]) is not None
                       and producers[n.input[1]].op_type == "DequantizeLinear"]
    # every conv but the all-ones zero-point correction convs reads an int8 DequantizeLinear weight
    assert len(weights_from_dq) >= len(convs) // 2
    # float 4-D constants are broadcast vectors [1, C, 1, 1] or zero-point sums [Cout, 1, kh, kw], never a weight
    assert not [i.name for i in m.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 4
                and i.dims[0] > 1 and i.dims[1] > 1], "no float copy of a quantized conv weight remains"


def test_float_input_layer_is_a_plain_float_conv(uncond_sym, cond_asym):
    """--float-layers conv_in: the graph input goes straight into a float Conv; with it quantized, through Q/DQ."""
    for fixture, float_input in ((uncond_sym, True), (cond_asym, False)):
        m = onnx.load(str(fixture[1]))
        inits = {i.name: i for i in m.graph.initializer}
        readers = [n.op_type for n in m.graph.node if "sample" in n.input and n.op_type != "Shape"]
        if float_input:
            conv = next(n for n in m.graph.node if "sample" in n.input and n.op_type == "Conv")
            assert readers == ["Conv"] and inits[conv.input[1]].data_type == onnx.TensorProto.FLOAT
        else:  # x_t * mult[t_index] -> Clip -> Q/DQ -> Conv (and a Slice for the zero-point correction's shape)
            assert "Conv" not in readers and "Mul" in readers


def test_t_index_selects_the_tables_and_is_clamped(cond_asym):
    ck_path, onnx_path, _ = cond_asym
    ck = load_checkpoint(ck_path)
    ins = parity_inputs(ck, per_step=1)
    sess = ort_session(onnx_path)
    base = run_ort(sess, ins)
    wrong = dict(ins, t_index=(ins["t_index"] + 1) % STEPS)
    assert (run_ort(sess, wrong) - base).abs().max() > 1e-3, "a wrong t_index must change the output"
    last = dict(ins, t_index=torch.full_like(ins["t_index"], STEPS - 1))
    over = dict(ins, t_index=torch.full_like(ins["t_index"], 10_000))
    assert torch.equal(run_ort(sess, over), run_ort(sess, last)), "out-of-range t_index is clamped in the graph"


def test_int4_and_static_variants(cond_asym, tmp_path):
    ck_path, onnx_path, _ = cond_asym
    s4 = export_and_verify(ck_path, tmp_path / "int4.onnx", ExportConfig(precision="int4"), per_step=1)
    m4 = onnx.load(str(tmp_path / "int4.onnx"))
    int4_dq = [n for n in m4.graph.node if n.op_type == "DequantizeLinear"
               and any(a.name == "block_size" for a in n.attribute)]
    assert int4_dq, "W4 linear weights become INT4 blocks"
    assert s4["parity"]["min_median_sample_sqnr_db"] >= 50
    st = export_and_verify(ck_path, tmp_path / "static.onnx", ExportConfig(static_scales=True), verify=False)
    assert st["inputs"] == ["sample", "timestep", "encoder_hidden_states"] and st["trt_rules"] == "passed"


def test_bad_precision_is_a_clear_error():
    with pytest.raises(UserError, match=r"unknown precision 'fp4': choose one of int8, int4, fp8"):
        ExportConfig(precision="fp4")


def test_spatial_sizes_are_dynamic(cond_asym):
    ck_path, onnx_path, _ = cond_asym
    m = onnx.load(str(onnx_path))
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == "batch" and isinstance(dims[2], str) and isinstance(dims[3], str), dims
    ck = load_checkpoint(ck_path)
    gen = torch.Generator().manual_seed(3)
    t_index = torch.arange(10) % len(ck.timesteps)
    ins = {"sample": torch.randn(10, 1, 16, 12, generator=gen), "timestep": torch.tensor(ck.timesteps)[t_index],
           "t_index": t_index, "encoder_hidden_states": ck.model.class_encoder(torch.arange(10)).detach()}
    out = run_ort(ort_session(onnx_path), ins)
    with torch.no_grad():
        ref = ck.qunet(ins["sample"], ins["timestep"], ins["t_index"], ins["encoder_hidden_states"])
    assert out.shape == (10, 1, 16, 12)
    from dilatequant.core.metrics import sqnr_db
    # per sample: a rounding flip may move single samples (README "Export"), a wrong shape handling all of them
    assert sorted(sqnr_db(a, b) for a, b in zip(out, ref))[5] >= 50
    # the batch range declared at export (<= 63, a diffusers guard) does not bind the ONNX graph
    big = {k: v.repeat(7, *([1] * (v.dim() - 1))) for k, v in ins.items()}
    out70 = run_ort(ort_session(onnx_path), big, batch=70)
    assert out70.shape == (70, 1, 16, 12)
    assert sorted(sqnr_db(a, b) for a, b in zip(out70, out.repeat(7, 1, 1, 1)))[35] >= 50
