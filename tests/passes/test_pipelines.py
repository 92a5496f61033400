import torch

from neodragon_npu.graphs import fx as fx_utils
from neodragon_npu.graphs import onnx_io
from neodragon_npu.graphs.export import export_onnx
from neodragon_npu.graphs.verify import verify_onnx
from neodragon_npu.neodragon_models import pyramid
from neodragon_npu.passes.base import PassManager
from neodragon_npu.passes import pipelines
from neodragon_npu.passes.pipelines import denoiser_fx, denoiser_fx_baseline, denoiser_onnx, denoiser_onnx_baseline
from tests.helpers import run_onnx


def test_pipelines_are_ordered_fx_then_onnx():
    assert {p.IR for p in denoiser_fx()} == {"fx"} == {p.IR for p in denoiser_fx_baseline()}
    assert {p.IR for p in denoiser_onnx()} == {"onnx"} == {p.IR for p in denoiser_onnx_baseline()}
    assert {p.IR for p in pipelines.cleanup_fx()} == {"fx"} and {p.IR for p in pipelines.cleanup_onnx()} == {"onnx"}


def test_w8a16_is_its_four_passes_in_order_and_each_can_be_left_out():
    names = [p.pass_name() for p in pipelines.w8a16(pipelines.W8A16(), calibration=[{}], htp_arch=79)]
    assert names == ["round_weights_gptq", "quantize_w8a16", "requantize_matmul_operand", "fold_weight_quantization"]
    names = [p.pass_name() for p in pipelines.w8a16(pipelines.W8A16(rounding="nearest", kv_bits=8), calibration=[{}],
                                                    htp_arch=79)]
    assert names == ["quantize_w8a16", "fold_weight_quantization"]
    adaround = pipelines.w8a16(pipelines.W8A16(rounding="adaround", adaround_iterations=7, adaround_crop=(8, 8)),
                               calibration=[{}], htp_arch=79)
    assert [p.pass_name() for p in adaround][:2] == ["round_weights_adaround", "quantize_w8a16"]
    assert (adaround[0].iterations, adaround[0].crop) == (7, (8, 8))
    assert [p.pass_name() for p in pipelines.fp16(pipelines.FP16(), calibration=[{}])] == ["rescale_residual_stream", "convert_to_fp16"]


def test_the_manifest_precision_says_how_score_ranges_were_set():
    for shared, said in ((True, "one per split attention"), (False, "per piece")):
        precision = pipelines.W8A16(shared_attention_ranges=shared)
        quantize = [p for p in pipelines.w8a16(precision, calibration=[{}], htp_arch=79)
                    if p.pass_name() == "quantize_w8a16"]
        assert quantize[0].shared_attention_ranges is shared
        assert precision.describe()["attention_score_ranges"] == said


def test_bad_precision_options_are_refused():
    import pytest

    with pytest.raises(ValueError, match="unknown weight rounding"):
        pipelines.W8A16(rounding="stochastic")
    with pytest.raises(ValueError, match="K/V bits"):
        pipelines.W8A16(kv_bits=4)


def test_denoiser_pipeline_leaves_a_static_exact_fused_graph(tiny_denoiser, tiny_stage_inputs, tmp_path):
    inputs = tiny_stage_inputs[1]
    example = [inputs[n] for n in pyramid.STAGE_INPUT_NAMES]
    module = tiny_denoiser.stage_module(1)
    with torch.no_grad():
        ref = module(*example).numpy()
    gm = fx_utils.trace(module, example)
    segments = pyramid.attention_segments(tiny_denoiser.config.geometry, 2, 1)
    assert PassManager(denoiser_fx(tile_budget_bytes=4096, mask_segments=segments)).call(gm).modified
    export_onnx(gm, example, tmp_path / "s.onnx", input_names=pyramid.STAGE_INPUT_NAMES, output_names=["y"])
    model = onnx_io.load(tmp_path / "s.onnx")
    assert PassManager(denoiser_onnx())(model).modified
    verify_onnx(model, static_shapes=True, max_rank=4)
    ops = {n.op_type for n in model.graph}
    assert not ops & {"Shape", "Gather", "ConstantOfShape", "Where", "Expand", "Erf"}
    assert {"RMSNormalization", "RotaryEmbedding", "LayerNormalization", "Gelu"} <= ops
    assert model.opset_imports[""] == 23
    out = run_onnx(model, {k: v.numpy() for k, v in inputs.items()})[0]
    assert abs(out - ref).max() < 1e-4
    # a second run of the whole pipeline finds nothing to do, FX and ONNX alike
    assert not PassManager(denoiser_onnx())(model).modified
    assert not PassManager(denoiser_fx(tile_budget_bytes=4096, mask_segments=segments))(gm).modified
