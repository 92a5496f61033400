"""The SSD-1B graphs through the engine (tiny configs): diffusers' attention processors
split by pattern, partitions of the UNet, W8A16 builds in the HTP simulator, and the
first-frame host loop through the two binaries."""

import json

import numpy as np
import pytest
import torch

from neodragon_npu.graphs import onnx_io
from neodragon_npu.graphs.chain import run_chain
from neodragon_npu.graphs.onnx_edit import const_array, matches_any, module_path, reads_weight, unmatched_patterns
from neodragon_npu.graphs.fx import trace
from neodragon_npu.graphs.fx_attention import find_attention
from neodragon_npu.neodragon_models import ssd1b
from neodragon_npu.neodragon_models.first_frame import UNET_INPUTS
from neodragon_npu.neodragon_models.spec import LoadOptions
from neodragon_npu.neodragon_models.specs.ssd1b import _load
from neodragon_npu.passes.fx.split_attention import SplitAttentionPass
from neodragon_npu.tools.engine.build import build
from neodragon_npu.tools.engine.options import BuildOptions, check_high_precision, plan_build


@pytest.fixture(scope="module")
def models():
    return _load(with_vae=True)(LoadOptions("tiny", None, 0, {}))


def test_the_split_attention_equals_diffusers_attention_processors(models):
    """torch.export leaves diffusers' AttnProcessor2_0 as the ATen SDPA op; every self- and
    cross-attention is found and split, and the graph still equals diffusers' forward."""
    run = models.run(7, decode=False)
    feed = {k: torch.from_numpy(v) for k, v in run.unet_inputs[1].items()}
    ids = torch.from_numpy(ssd1b.time_ids(128, 192))
    with torch.no_grad():
        ref = models.unet(feed["sample"], ssd1b.LCM_TIMESTEPS[1], feed["encoder_hidden_states"],
                          added_cond_kwargs={"text_embeds": feed["text_embeds"], "time_ids": ids}).sample
    gm = trace(ssd1b.UNetGraph(models.unet), [feed[n] for n in UNET_INPUTS], method="export")
    blocks = sum(len(a.transformer_blocks) for b in (*models.unet.down_blocks, *models.unet.up_blocks)
                 for a in getattr(b, "attentions", []))
    assert len(find_attention(gm)) == 2 * blocks  # attn1 (self) and attn2 (cross) in every block
    pass_ = SplitAttentionPass(tile_budget_bytes=4096, min_rows=8)
    assert pass_(gm).modified
    assert not find_attention(gm)  # none left whole
    with torch.no_grad():
        out = gm(*[feed[n] for n in UNET_INPUTS])
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    latent = torch.from_numpy(run.latent / models.scaling_factor)
    with torch.no_grad():
        image = models.vae.decode(latent).sample
    gm = trace(ssd1b.VAEDecoderGraph(models.vae), [latent], method="export")
    assert SplitAttentionPass(tile_budget_bytes=8192, min_rows=8)(gm).modified  # the mid block's 384 tokens
    with torch.no_grad():
        out = gm(latent)
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, image, atol=1e-4, rtol=1e-4)


BUDGET = 4 * 1024 * 1024


@pytest.fixture(scope="module")
def unet_parts(tmp_path_factory):
    out = tmp_path_factory.mktemp("unet-parts")
    build(BuildOptions(model="ssd1b-unet", config="tiny", family=True, partition_budget=BUDGET, until="export",
                       cache=False, check_samples=1, calibration_samples=4), out)
    manifest = json.loads((out / "manifest.json").read_text())
    return manifest["partitions"], [out / p["graphs"]["unet"]["float_model"] for p in manifest["partitions"]]


def test_unet_partitions_hold_the_budget_and_chain_to_the_whole_graph(unet_parts):
    parts, paths = unet_parts
    assert len(parts) >= 2 and all(p["weight_bytes_float"] <= BUDGET for p in parts)
    models = _load(with_vae=False)(LoadOptions("tiny", None, 0, {}))
    assert sum(p["weight_bytes_float"] for p in parts) >= 4 * ssd1b.count_parameters(models.unet) * 0.99
    feed = models.run(11, decode=False).unet_inputs[0]
    with torch.no_grad():
        ref = ssd1b.UNetGraph(models.unet)(*[torch.from_numpy(feed[n]) for n in UNET_INPUTS]).numpy()
    (chained,), = run_chain(paths, [feed], ["noise_pred"])
    np.testing.assert_allclose(chained, ref, atol=1e-4, rtol=1e-4)


def test_16_bit_patterns_pick_linear_weights_by_module_path_across_partitions(unet_parts, caplog):
    """The dynamo exporter names a Linear's folded weight ``val_N``; a pattern on the module
    path still picks it, in every partition, and nothing else. A pattern that picks nothing
    is refused when the user gave it and warned about when the model did."""
    _, paths = unet_parts
    graphs = [onnx_io.load(p) for p in paths]
    models = _load(with_vae=False)(LoadOptions("tiny", None, 0, {}))
    projections = {f"unet.{name}" for name, m in models.unet.named_modules()
                   if isinstance(m, torch.nn.Linear) and ".attn2.to_" in name}
    picked = [module_path(n) for g in graphs for n in g.graph if reads_weight(n)
              and matches_any(n, ["unet.*attn2.to_*"])]
    assert len(projections) >= 8 and sorted(picked) == sorted(projections)
    # conv_out lives in the last partition only: checked over the whole family, it matches
    assert unmatched_patterns(graphs, ["unet.*attn2.to_*", "unet.conv_out.*", "unet.nosuch.*"]) == ["unet.nosuch.*"]

    plan = plan_build(BuildOptions(model="ssd1b-unet", config="tiny", family=True,
                                   extra_high_precision=("unet.nosuch.*",)))
    with pytest.raises(ValueError, match="--high-precision 'unet.nosuch.\\*' matches no weight"):
        check_high_precision(plan, graphs)
    # the model's own stream patterns, checked on the first partition alone (no conv_out)
    plan = plan_build(BuildOptions(model="ssd1b-unet", config="tiny", family=True))
    with caplog.at_level("WARNING", logger="neodragon_npu"):
        check_high_precision(plan, graphs[:1])
        check_high_precision(plan, graphs)
    assert [r for r in caplog.records if "'unet.conv_out.*' matches no weight" in r.getMessage()]
    assert len([r for r in caplog.records if "matches no weight" in r.getMessage()]) == len(
        unmatched_patterns(graphs[:1], plan.precision.high_precision))


def test_a_build_refuses_a_16_bit_pattern_that_picks_nothing_before_quantizing(tmp_path):
    with pytest.raises(ValueError, match="'unet.attn9.\\*' matches no weight of ssd1b-unet"):
        build(BuildOptions(model="ssd1b-unet", config="tiny", until="quantize", cache=False, check_samples=1,
                           calibration_samples=4, extra_high_precision=("unet.conv_in.*", "unet.attn9.*")),
              tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.fixture(scope="module")
def builds(tiny_bundle, tmp_path_factory):
    """The tiny UNet and SDXL decoder builds the tiny bundle holds (each an ordinary
    single-graph build, calibrated on the bundle's float pipeline)."""
    root = tmp_path_factory.mktemp("ssd1b")
    for name, unit in (("unet", "ssd1b-unet"), ("vae", "ssd1b-vae-decoder")):
        (root / name).symlink_to(tiny_bundle[0] / "graphs" / unit)
    return root


def test_tiny_w8a16_builds_of_both_graphs_pass_in_the_htp_simulator(builds):
    for name, floor, outputs in (("unet", 35.0, ["noise_pred"]), ("vae", 35.0, ["image"])):
        manifest = json.loads((builds / name / "manifest.json").read_text())
        assert manifest["verification"]["device"].startswith("x86 HTP simulator")
        assert manifest["verification"]["passed"] and manifest["verification"]["sqnr_db"] >= floor
        graph = onnx_io.load(builds / name / manifest["float_model"]).graph
        ops = [n.op_type for n in graph]
        # GroupNorm stays one op; no sinusoid (Sin, Cos, Exp) is left in the graph
        assert "GroupNormalization" in ops and not {"Sin", "Cos", "Exp", "InstanceNormalization"} & set(ops)
        assert [o["name"] for o in manifest["graphs"][0]["outputs"]] == outputs
    # the UNet's stream weights (stem, head, resamplers, resnet shortcuts) are stored at 16
    # bit, the resnets' branch convolutions at 8
    manifest = json.loads((builds / "unet" / "manifest.json").read_text())
    bits = {v.name: str(v.const_value.dtype) for v in onnx_io.load(builds / "unet" / manifest["qdq_model"]).graph
            .initializers.values() if v.name.endswith(".weight") and v.const_value is not None}
    stream = [w for w in bits if any(k in w for k in ("conv_in.", "conv_out.", "conv_shortcut.", "samplers."))]
    branch = [w for w in bits if w.endswith((".conv1.weight", ".conv2.weight"))]
    assert {"unet.conv_in.weight", "unet.conv_out.weight"} <= set(stream) and branch
    assert any("conv_shortcut" in w for w in stream) and any("upsamplers" in w for w in stream)
    assert all(bits[w].endswith("INT16") for w in stream) and all(bits[w].endswith("INT8") for w in branch)
    # the attention projections (weights named val_N, found by the module path) at 16 bit,
    # the feed-forward Linears at 8
    qdq = onnx_io.load(builds / "unet" / manifest["qdq_model"]).graph
    linear = {}
    for node in qdq:
        dq = node.inputs[1].producer() if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1 else None
        if dq is not None and dq.op_type == "DequantizeLinear" and const_array(dq.inputs[0]) is not None:
            linear[module_path(node)] = const_array(dq.inputs[0]).dtype
    attention = [m for m in linear if m and (".attn1.to_" in m or ".attn2.to_" in m)]
    feed_forward = [m for m in linear if m and ".ff.net." in m]
    assert len(attention) == 4 * len(feed_forward) > 0
    assert all(linear[m] == np.int16 for m in attention) and all(linear[m] == np.int8 for m in feed_forward)


def test_first_frame_through_the_binaries_stays_close_to_the_float_loop(builds, tmp_path, capsys):
    from neodragon_npu.tools.cli import main

    out = tmp_path / "frame.png"
    assert main(["first-frame", "a lighthouse at dusk", "--unet", str(builds / "unet"), "--decoder",
                 str(builds / "vae"), "-o", str(out), "--json", str(tmp_path / "f.json")]) == 0
    result = json.loads((tmp_path / "f.json").read_text())
    assert result["image_psnr_db"] >= 30.0 and len(result["step_sqnr_db"]) == 4
    assert out.is_file() and (tmp_path / "frame-float.png").is_file()
    assert "synthetic token ids" in capsys.readouterr().out
    # the same prompt picks the same ids and noise: the float image does not change
    assert main(["first-frame", "a lighthouse at dusk", "--unet", str(builds / "unet"), "--decoder",
                 str(builds / "vae"), "-o", str(tmp_path / "again.png"), "--runtime", "cpu-qdq"]) == 0
    import matplotlib.image

    assert np.array_equal(matplotlib.image.imread(tmp_path / "frame-float.png"),
                          matplotlib.image.imread(tmp_path / "again-float.png"))
    # a decoder build given as the UNet is refused before any work
    assert main(["first-frame", "x", "--unet", str(builds / "vae"), "--decoder", str(builds / "vae"),
                 "-o", str(tmp_path / "bad.png")]) != 0
    assert "is not a ssd1b-unet build" in capsys.readouterr().err and not (tmp_path / "bad.png").exists()


def test_partitioned_first_frame_builds_gate_at_their_targets():
    # the full-size graphs are family builds: their check fails below the same target as a
    # one-graph build's, not the denoiser family's looser floor
    for model in ("ssd1b-unet", "ssd1b-vae-decoder"):
        single = plan_build(BuildOptions(model=model, config="tiny"))
        family = plan_build(BuildOptions(model=model, config="tiny", family=True))
        assert family.min_sqnr_db == single.min_sqnr_db >= 35.0
