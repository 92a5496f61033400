"""The streaming decoder against the released parallel decode (all 49 frames, fp32), the
state handed through the exported graphs' inputs and outputs, and a tiny W8A16 build."""

import json

import numpy as np
import pytest
import torch

from neodragon_npu.neodragon_models.causal_vae import build_causal_vae, get_causal_vae_config
from neodragon_npu.neodragon_models.streaming_decoder import StreamingDecoder, decode_streaming, state_names


def _vae():
    return build_causal_vae(get_causal_vae_config("tiny"), seed=3)


def test_frame_by_frame_decoding_equals_the_parallel_decode_on_all_49_frames():
    from neodragon_npu.neodragon_models.specs.causal_vae import synthetic_latents

    vae = _vae()
    z = synthetic_latents(1, vae.config, seed=9)
    with torch.no_grad():
        parallel, streaming = vae.decode_parallel(z), decode_streaming(vae, z)
    assert streaming.shape == parallel.shape == (1, 3, 49, 32, 48)
    torch.testing.assert_close(streaming, parallel, rtol=1e-5, atol=1e-5)


def test_an_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="variant 'middle'"):
        StreamingDecoder(_vae(), "middle")


def _export(graph, tmp_path):
    from neodragon_npu.tools.engine.build import build
    from neodragon_npu.tools.engine.options import BuildOptions

    out = tmp_path / graph
    build(BuildOptions(model="vae-decoder", config="tiny", seed=3, graphs=(graph,), until="export", cache=False), out)
    return out / json.loads((out / "manifest.json").read_text())["float_model"]


def test_the_state_round_trips_through_the_exported_graphs(tmp_path):
    """The two float ONNX graphs, chained on the CPU with each call's state outputs fed to
    the next call's state inputs, make the parallel decode's 49 frames."""
    from neodragon_npu.graphs import qnn
    from neodragon_npu.neodragon_models.specs.causal_vae import synthetic_latents

    vae = _vae()
    first, step = (qnn.cpu_session(_export(g, tmp_path)) for g in ("first", "next"))
    names = state_names(vae)
    assert [i.name for i in step.get_inputs()] == ["latent", *names]
    assert [o.name for o in step.get_outputs()] == ["frames", *[f"{n}_out" for n in names]]
    z = synthetic_latents(1, vae.config, seed=11)
    frames, *state = first.run(None, {"latent": z[:, :, 0].numpy()})
    video = [frames]
    for t in range(1, 7):
        frames, *state = step.run(None, {"latent": z[:, :, t].numpy(), **dict(zip(names, state))})
        video.append(frames)
    with torch.no_grad():
        parallel = vae.decode_parallel(z)[0].transpose(0, 1).numpy()
    np.testing.assert_allclose(np.concatenate(video), parallel, rtol=1e-4, atol=1e-4)
    ops = {n.op_type for n in __import__("onnx").load(str(_export("next", tmp_path / "again"))).graph.node}
    assert not {"Transpose", "Reshape", "DepthToSpace", "SpaceToDepth"} & ops  # no time moved into C or N


def test_a_tiny_w8a16_next_frame_graph_builds_and_runs_in_the_htp_simulator(tmp_path):
    """Every output (frames and the nine states) checked; Transpose/Reshape bytes under 5%."""
    from neodragon_npu.tools.engine.build import build
    from neodragon_npu.tools.engine.options import BuildOptions

    out = tmp_path / "next"
    build(BuildOptions(model="vae-decoder", config="tiny", cache=False, min_sqnr_db=25.0), out)
    manifest = json.loads((out / "manifest.json").read_text())
    per_output = manifest["verification"]["per_output_sqnr_db"]
    assert set(per_output) == {"frames", *[f"memory_{i}_out" for i in range(9)]}
    assert min(per_output.values()) >= 25.0
    stats = manifest["graph_stats_a16"]
    assert stats["layout_bytes"] / stats["op_output_bytes"] < 0.05
