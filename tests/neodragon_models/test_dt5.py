"""DT5 against an independent implementation: transformers' T5EncoderModel with the same
weights, for both feed-forward kinds; parameter counts against the released sizes."""

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from neodragon_npu.neodragon_models.dt5 import DT5, count_parameters, get_dt5_config


def _seeded(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if p.dim() > 1 else 1.0))


@pytest.mark.parametrize("ffn", ["gated-gelu", "relu"])
def test_dt5_matches_transformers_t5_encoder_with_the_same_weights(ffn):
    from transformers import T5Config
    from transformers import T5EncoderModel as HFT5EncoderModel

    cfg = dataclasses.replace(get_dt5_config("tiny"), feed_forward_proj=ffn)
    ours = DT5(cfg).eval()
    _seeded(ours, 3)
    hf = HFT5EncoderModel(T5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, num_heads=cfg.num_heads,
        num_layers=cfg.num_layers, d_ff=cfg.d_ff, feed_forward_proj=cfg.feed_forward_proj,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        layer_norm_epsilon=cfg.layer_norm_epsilon, dropout_rate=0.0, is_encoder_decoder=False,
    )).eval()
    state = {k.removeprefix("encoder."): v for k, v in ours.state_dict().items() if k.startswith("encoder.")}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight"}
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(2, cfg.vocab_size, (2, cfg.max_length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 11:] = 0  # padded, as the tokenizer pads to max_length
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours.encoder(ids, mask)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        projected = ours(ids, mask)
    assert projected.shape == (2, cfg.max_length, cfg.project_out_dim)
    lin0, lin3 = ours.final_projection[0], ours.final_projection[3]
    torch.testing.assert_close(projected, lin3(torch.relu(lin0(ref))), rtol=1e-5, atol=1e-5)


def test_the_released_size_has_the_released_parameter_count():
    cfg = get_dt5_config("neodragon")
    with torch.device("meta"):
        model = DT5(cfg)
    counted = sum(p.numel() for p in model.parameters())
    assert counted == count_parameters(cfg)
    # ../shared/neodragon-submodules.md 1: 24.7 M embedding + 85 M layers + 19.9 M projection
    assert 0.129e9 < counted < 0.130e9
    names = dict(model.named_parameters())
    assert tuple(names["encoder.encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape) == (32, 12)
    assert tuple(names["encoder.encoder.block.11.layer.1.DenseReluDense.wi_0.weight"].shape) == (2048, 768)
    assert tuple(names["final_projection.3.weight"].shape) == (4096, 4096)


def test_the_released_size_synthetic_weights_overflow_fp16_like_real_t5():
    """The residual stream grows block by block past FP16's 65,504 on token ids the weights
    were not fitted on: fp32 stays finite, a plain FP16 run does not."""
    from neodragon_npu.neodragon_models.dt5 import build_dt5

    model = build_dt5(get_dt5_config("neodragon"), seed=0)
    cfg = model.config
    peaks = []
    hooks = [block.register_forward_hook(lambda mod, inputs, out: peaks.append(float(out.abs().max())))
             for block in model.encoder.encoder.block]
    ids = torch.randint(2, cfg.vocab_size, (1, cfg.max_length), generator=torch.Generator().manual_seed(99))
    mask = torch.ones_like(ids)
    mask[0, 20:] = 0
    with torch.no_grad():
        out = model(ids, mask)
        for hook in hooks:
            hook.remove()
        half = model.half()(ids, mask)
    assert peaks[0] < 1e3 and peaks[-1] > 4 * 65504
    assert all(b > a for a, b in zip(peaks, peaks[1:]))  # it grows block by block
    assert torch.isfinite(out).all() and float(out.abs().max()) < 100
    assert not torch.isfinite(half).all()


def test_tiny_synthetic_weights_are_seeded():
    from neodragon_npu.neodragon_models.dt5 import build_dt5

    a, b, c = (build_dt5(get_dt5_config("tiny"), seed=s) for s in (0, 0, 1))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_a_released_style_folder_loads_and_a_mismatched_one_is_named(tmp_path):
    import json

    from neodragon_npu.neodragon_models.dt5 import build_dt5, dt5_config_to_json
    from neodragon_npu.neodragon_models.spec import LoadOptions
    from neodragon_npu.neodragon_models.specs import get_model
    from neodragon_npu.neodragon_models.weights import CheckpointError

    cfg = get_dt5_config("tiny")
    model = build_dt5(cfg, seed=4)
    state = {k: v for k, v in model.state_dict().items() if k != "encoder.encoder.embed_tokens.weight"}
    folder = tmp_path / "text_encoder_3"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(dt5_config_to_json(cfg)))
    loaded = build_dt5(cfg, checkpoint=folder)
    ids = torch.randint(2, cfg.vocab_size, (1, cfg.max_length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), model(ids, mask), rtol=0, atol=0)
    assert get_model("dt5").preflight(LoadOptions("tiny", folder, 0, {}))["final_projection.3.weight"] == (64, 64)

    relu = json.loads((folder / "config.json").read_text()) | {"feed_forward_proj": "relu"}
    (folder / "config.json").write_text(json.dumps(relu))  # the file's wi_0/wi_1 no longer fit
    for load in (lambda: build_dt5(cfg, checkpoint=folder),  # the load, and the check before any work
                 lambda: get_model("dt5").preflight(LoadOptions("tiny", folder, 0, {}))):
        with pytest.raises(CheckpointError, match=r"does not match the model: missing keys: .*DenseReluDense.wi.weight"):
            load()
    (folder / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="lacks vocab_size, d_model"):
        build_dt5(cfg, checkpoint=folder)


def test_plain_fp16_dt5_saturates_in_the_htp_simulator_and_the_rescaled_one_holds(tmp_path):
    """What the residual-stream rescale and the fused norms fix, end to end: the synthetic
    weights' stream passes FP16's range, so the plain FP16 graph (T5's norm as exported:
    x^2 overflows), compiled for SM8750 and run in the HTP simulator, is far from fp32;
    with them, the same build is within FP16's precision."""
    import json
    import re

    from neodragon_npu.tools.engine.build import build
    from neodragon_npu.tools.engine.options import BuildOptions
    from neodragon_npu.tools.engine.steps import BuildCheckError

    with pytest.raises(BuildCheckError, match=r"reaches (-?\d+\.\d) dB SQNR") as failed:
        build(BuildOptions(model="dt5", config="tiny", cache=False, skip_passes=("fuse_rms_norm", "rescale_residual_stream")),
              tmp_path / "plain")
    assert float(re.search(r"reaches (-?\d+\.\d) dB", str(failed.value)).group(1)) < 10.0
    assert "FP16 ends at 65504" in (tmp_path / "plain" / "report.txt").read_text()

    build(BuildOptions(model="dt5", config="tiny", cache=False), tmp_path / "rescaled")
    manifest = json.loads((tmp_path / "rescaled" / "manifest.json").read_text())
    assert manifest["verification"]["sqnr_db"] >= 40.0
    assert manifest["fp16_range"]["largest_abs_activation"] < 65504 / 4
    assert any("divided by S = " in note for note in manifest["fp16_passes"])
    ops = manifest["graph_stats_a16"]["op_counts"]
    # no relative-position bucket arithmetic reaches the graph: the bias is one constant
    assert not {"Log", "Where", "Abs", "Min", "Floor"} & set(ops)
    from neodragon_npu.graphs import onnx_io
    from neodragon_npu.neodragon_models.dt5 import build_dt5

    model = build_dt5(get_dt5_config("tiny"), seed=0)
    bias = model.encoder.encoder.block[0].layer[0].SelfAttention.position_bias(16).numpy()
    graph = onnx_io.load(tmp_path / "rescaled" / manifest["float_model"]).graph
    tables = [v.const_value.numpy() for v in graph.initializers.values() if v.const_value.shape.dims == bias.shape]
    assert any(np.array_equal(t, bias) for t in tables)
