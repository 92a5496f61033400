"""The causal video VAE: its mid-block attention against diffusers' own, causality of the
3-D encoder and of the parallel decoder, sizes against the released model, folder loading,
and a tiny W8A16 first-frame encoder build checked in the HTP simulator."""

import json

import pytest
import torch

from neodragon_npu.neodragon_models.causal_vae import (
    CausalVideoVAE, VAEAttention, build_causal_vae, causal_vae_config_to_json, get_causal_vae_config,
)


def test_the_mid_block_attention_is_diffusers_attention():
    from diffusers.models.attention_processor import Attention

    ours = VAEAttention(32, 4)
    torch.manual_seed(0)
    for p in ours.parameters():
        p.data.normal_()
    # as the released CausalUNetMidBlock2D builds it
    theirs = Attention(32, heads=1, dim_head=32, rescale_output_factor=1, eps=1e-6, norm_num_groups=4,
                       residual_connection=True, bias=True, upcast_softmax=True,
                       _from_deprecated_attn_block=True).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 32, 5, 7)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_the_released_size_has_the_released_parameter_counts():
    """neodragon-submodules.md 3-4: about 110 M in the 3-D encoder, about 9.9 M in the decoder."""
    with torch.device("meta"):
        vae = CausalVideoVAE(get_causal_vae_config("neodragon"))
    encoder = sum(p.numel() for p in vae.encoder.parameters())
    decoder = sum(p.numel() for p in vae.decoder.parameters())
    assert round(encoder / 1e6) == 110 and round(decoder / 1e5) == 99


def test_the_encoder_is_causal_and_the_first_frame_alone_gives_its_moments():
    vae = build_causal_vae(get_causal_vae_config("tiny"), seed=2)
    video = torch.rand(1, 3, 9, 32, 48) * 2 - 1
    with torch.no_grad():
        full = vae.encode_moments(video)
        first = vae.encode_moments(video[:, :, :1])
    assert full.shape == (1, 32, 2, 4, 6) and first.shape == (1, 32, 1, 4, 6)
    torch.testing.assert_close(full[:, :, 0], first[:, :, 0], rtol=1e-5, atol=1e-5)


def test_the_parallel_decoder_makes_49_frames_and_is_causal():
    cfg = get_causal_vae_config("tiny")
    vae = build_causal_vae(cfg, seed=2)
    z = torch.randn(1, 16, 7, 4, 6)
    changed = z.clone()
    changed[:, :, 3] += 1.0
    with torch.no_grad():
        frames, other = vae.decode_parallel(z), vae.decode_parallel(changed)
    assert frames.shape == (1, 3, 49, 32, 48)
    # latent frame k makes output frames 8k - 7 .. 8k (frame 0 keeps only its last)
    torch.testing.assert_close(frames[:, :, :17], other[:, :, :17], rtol=0, atol=0)
    assert not torch.allclose(frames[:, :, 17:25], other[:, :, 17:25])
    assert float(frames.abs().max()) < 10  # the synthetic decoder's range stays O(1)


def test_a_released_style_folder_loads_and_a_mismatched_one_is_named(tmp_path):
    from neodragon_npu.neodragon_models.spec import LoadOptions
    from neodragon_npu.neodragon_models.specs import get_model
    from neodragon_npu.neodragon_models.weights import CheckpointError, save_checkpoint

    cfg = get_causal_vae_config("tiny")
    vae = build_causal_vae(cfg, seed=5)
    folder = save_checkpoint(vae, tmp_path / "causal_video_vae", causal_vae_config_to_json(cfg))
    loaded = build_causal_vae(cfg, checkpoint=folder)
    image = torch.rand(1, 3, 1, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_moments(image), vae.encode_moments(image), rtol=0, atol=0)
    spec = get_model("vae-encoder")
    assert spec.preflight(LoadOptions("tiny", folder, 0, {}))["quant_conv.conv.weight"] == (32, 32, 1, 1, 1)
    raw = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(raw | {"decoder_num_features": [16, 8, 8, 4]}))
    for load in (lambda: build_causal_vae(cfg, checkpoint=folder),
                 lambda: spec.preflight(LoadOptions("tiny", folder, 0, {}))):
        with pytest.raises(CheckpointError, match=r"decoder\.blocks\.22\.weight"):
            load()


# the decomposed norms are checked as the legacy exporter writes them: exported by dynamo
# they reach 1.4 dB in the HTP simulator, not isolated yet (docs/causal-vae.md)
@pytest.mark.parametrize("pipeline, exporter, norm, weights", [("optimized", "dynamo", "GroupNormalization", "default"),
                                                               ("optimized", "dynamo", "GroupNormalization", "auto"),
                                                               ("decomposed-norms", "legacy", None, "int8")])
def test_a_tiny_w8a16_first_frame_encoder_build_agrees_with_aimet_in_the_htp_simulator(tmp_path, pipeline, exporter,
                                                                                       norm, weights):
    """2-D only (no Conv3d, no 5-D tensor, no InstanceNormalization), GroupNorm as one op
    or decomposed, and the HTP simulator close to aimet's QDQ simulation on the CPU.
    With every weight at int8 the tiny encoder stays near 31 dB; with the weights of most
    int8 noise at 16 bit (--auto-16bit) it passes 40 dB; by default every weight is 16 bit."""
    from neodragon_npu.graphs import onnx_io, qnn
    from neodragon_npu.graphs.feeds import load_samples
    from neodragon_npu.graphs.verify import pooled_sqnr
    from neodragon_npu.tools.engine.build import build
    from neodragon_npu.tools.engine.options import BuildOptions

    out = tmp_path / "enc"
    choice = {"default": {}, "auto": {"high_precision": (), "auto_16bit_db": 42.0},
              "int8": {"high_precision": (), "auto_16bit_db": 0.0, "min_sqnr_db": 25.0}}[weights]
    build(BuildOptions(model="vae-encoder", config="tiny", cache=False, fx_pipeline=pipeline, exporter=exporter,
                       **choice), out)
    manifest = json.loads((out / "manifest.json").read_text())
    graph = onnx_io.load(out / manifest["float_model"]).graph
    ops = [n.op_type for n in graph]
    assert "Conv" in ops and "InstanceNormalization" not in ops
    assert ops.count("GroupNormalization") == (14 if norm else 0)  # 13 per-frame norms and the attention's
    assert all(len(v.shape) <= 4 for n in graph for v in n.outputs if v.shape is not None)
    session = qnn.cpu_session(out / manifest["qdq_model"])
    pairs = [(f["moments_fp32"], session.run(None, {"image": f["image"]})[0])
             for f in load_samples(out / "check_samples.npz")]
    aimet = pooled_sqnr(pairs)
    htp = manifest["verification"]["sqnr_db"]
    # within 0.5 dB near 31 dB; near 43 dB the HTP's own arithmetic shows (1.5 dB under
    # aimet's CPU simulation), and with every weight at 16 bit it is most of the error
    # (46.9 dB against aimet's 56.8 dB on this graph, docs/causal-vae.md)
    if weights == "default":
        assert aimet > htp
    else:
        assert abs(htp - aimet) < (1.0 if weights == "int8" else 2.0)
    chosen = manifest["quantization"].get("auto_16bit")
    qdq = onnx_io.load(out / manifest["qdq_model"]).graph
    bits = {v.name: str(v.const_value.dtype) for v in qdq.initializers.values()
            if v.const_value is not None and len(v.const_value.shape) >= 2}
    if weights == "int8":
        assert chosen is None and 25.0 < aimet < 36.0
        return
    assert htp >= 40.0 and manifest["verification"]["passed"]
    if weights == "default":
        # every weight stored at 16 bit, and the manifest says so
        assert chosen is None and manifest["quantization"]["weights"].startswith("int16")
        assert len(bits) >= 20 and all(b.endswith("INT16") for b in bits.values())
    else:
        kept = chosen["kept"]
        assert 0 < len(kept) < chosen["weights"] and chosen["all_int8_db"] < 36.0 <= chosen["predicted_db"]
        # the kept weights are stored at 16 bit in the deployed graph, the others at 8
        assert all(bits[w].endswith("INT16") for w in kept if w in bits) and any(w in bits for w in kept)
        assert any(b.endswith("INT8") for b in bits.values())
