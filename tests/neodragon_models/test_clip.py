"""CLIP-L / CLIP-G against an independent implementation: transformers'
CLIPTextModelWithProjection with the same weights (pooled projection and the penultimate
hidden states, both pooling rules); parameter counts; released-folder loading; a tiny FP16
build of each checked in the HTP simulator."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from neodragon_npu.neodragon_models.clip import (
    CLIPTextModelWithProjection, build_clip, clip_config_to_json, count_parameters, end_onehot, get_clip_config,
)


def _transformers_twin(cfg, ours):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection as HF

    hf = HF(CLIPTextConfig(**dataclasses.asdict(cfg), attention_dropout=0.0)).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"text_model.embeddings.position_ids"}
    return hf


@pytest.mark.parametrize("variant", ["clip-l", "clip-g"])
@pytest.mark.parametrize("eos", ["legacy argmax", "eos id"])
def test_clip_matches_transformers_with_the_same_weights(variant, eos):
    cfg = get_clip_config(variant, "tiny")
    if eos == "eos id":  # newer configs pool at the first eos_token_id, not the largest id
        cfg = dataclasses.replace(cfg, eos_token_id=5)
    ours = build_clip(cfg, seed=3)
    hf = _transformers_twin(cfg, ours)
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(6, cfg.vocab_size - 2, (2, cfg.max_position_embeddings), generator=gen)
    ids[0, 4:] = cfg.end_token
    ids[1, 11:] = cfg.end_token
    with torch.no_grad():
        ref = hf(input_ids=ids, output_hidden_states=True)
        embeds, hidden = ours(ids)
        hoisted, _ = ours(ids, torch.from_numpy(end_onehot(ids.numpy(), cfg)))
    torch.testing.assert_close(embeds, ref.text_embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden, ref.hidden_states[-2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hoisted, embeds, rtol=0, atol=1e-6)  # the host's one-hot pools the same row


@pytest.mark.parametrize("variant, params", [("clip-l", 123_650_304), ("clip-g", 694_659_840)])
def test_the_released_sizes_have_the_released_parameter_counts(variant, params):
    """neodragon-submodules.md 2: ~0.124 B and ~0.694 B; the exact figures are
    transformers' own count for the same configs."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection as HF

    cfg = get_clip_config(variant, "neodragon")
    with torch.device("meta"):
        ours = CLIPTextModelWithProjection(cfg)
        hf = HF(CLIPTextConfig(**dataclasses.asdict(cfg)))
    assert sum(p.numel() for p in ours.parameters()) == count_parameters(cfg) == params
    assert sum(p.numel() for p in hf.parameters()) == params


def test_a_released_style_folder_loads_and_a_mismatched_one_is_named(tmp_path):
    from neodragon_npu.neodragon_models.specs import get_model
    from neodragon_npu.neodragon_models.spec import LoadOptions
    from neodragon_npu.neodragon_models.weights import CheckpointError

    cfg = get_clip_config("clip-g", "tiny")
    model = build_clip(cfg, seed=4)
    folder = tmp_path / "text_encoder_2"
    folder.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    # some transformers versions save the position ids buffer too
    state["text_model.embeddings.position_ids"] = torch.arange(cfg.max_position_embeddings)[None]
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(clip_config_to_json(cfg)))
    loaded = build_clip(get_clip_config("clip-g", "neodragon"), checkpoint=folder)  # the folder's config rules
    ids = torch.randint(0, 120, (1, cfg.max_position_embeddings), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for a, b in zip(loaded(ids), model(ids)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    spec = get_model("clip-g")
    assert spec.preflight(LoadOptions("tiny", folder, 0, {}))["text_projection.weight"] == (40, 40)

    wide = json.loads((folder / "config.json").read_text()) | {"intermediate_size": 96}
    (folder / "config.json").write_text(json.dumps(wide))  # fc1/fc2 in the file no longer fit
    for load in (lambda: build_clip(cfg, checkpoint=folder), lambda: spec.preflight(LoadOptions("tiny", folder, 0, {}))):
        with pytest.raises(CheckpointError, match=r"text_model\.encoder\.layers\.0\.mlp\.fc1\.weight"):
            load()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 40}))
    with pytest.raises(CheckpointError, match="lacks vocab_size"):
        build_clip(cfg, checkpoint=folder)


@pytest.mark.parametrize("variant", ["clip-l", "clip-g"])
def test_a_tiny_fp16_clip_build_holds_both_outputs_in_the_htp_simulator(tmp_path, variant):
    """Token ids and the host's end one-hot in, both outputs checked against fp32 in the HTP
    simulator; the graph has no ArgMax, no Gather but the embedding's, rank <= 4."""
    from neodragon_npu.graphs import onnx_io
    from neodragon_npu.tools.engine.build import build
    from neodragon_npu.tools.engine.options import BuildOptions

    build(BuildOptions(model=variant, config="tiny", cache=False), tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    per_output = manifest["verification"]["per_output_sqnr_db"]
    assert set(per_output) == {"text_embeds", "penultimate_hidden_states"}
    assert min(per_output.values()) >= 45.0 and manifest["quantization"]["weights"] == "float16"
    graph = onnx_io.load(tmp_path / "b" / manifest["fp16_model"]).graph
    assert [v.name for v in graph.inputs] == ["input_ids", "end_onehot"]
    ops = [n.op_type for n in graph]
    assert "ArgMax" not in ops and ops.count("Gather") == 1  # the token embedding's table lookup
    assert all(len(v.shape) <= 4 for n in graph for v in n.outputs)
    from neodragon_npu.graphs.onnx_edit import const_array

    # the causal mask each Softmax's scores get is a finite constant
    masks = [const_array(v) for n in graph if n.op_type == "Softmax"
             for v in n.inputs[0].producer().inputs if const_array(v) is not None]
    assert len(masks) == 3 and all(np.isfinite(m).all() and m.min() >= -1e4 and m.min() < -10 for m in masks)


def test_a_plain_clip_text_model_folder_loads_with_its_pooled_output(tmp_path):
    """SSD-1B's ssd_1b_text_encoder is transformers' CLIPTextModel: no projection. It loads,
    and its pooled output and penultimate states are transformers' own."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = dataclasses.replace(get_clip_config("clip-l", "tiny"), projection_dim=32)
    hf = CLIPTextModel(CLIPTextConfig(**dataclasses.asdict(cfg), attention_dropout=0.0)).eval()
    hf.save_pretrained(tmp_path / "ssd_1b_text_encoder")
    ours = build_clip(get_clip_config("clip-l", "neodragon"), checkpoint=tmp_path / "ssd_1b_text_encoder")
    ids = torch.randint(0, 120, (1, cfg.max_position_embeddings), generator=torch.Generator().manual_seed(2))
    ids[0, -1] = cfg.end_token
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        pooled, penultimate = ours(ids)
    torch.testing.assert_close(pooled, ref.pooler_output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(penultimate, ref.hidden_states[-2], atol=1e-5, rtol=1e-5)
    # the preflight reads the same folder as the load does: the projection is the identity
    from neodragon_npu.neodragon_models.spec import LoadOptions
    from neodragon_npu.neodragon_models.specs import get_model

    shapes = get_model("clip-l").preflight(LoadOptions("tiny", tmp_path / "ssd_1b_text_encoder", 0, {}))
    assert shapes == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
