import pytest
import torch

from neodragon_npu.neodragon_models import pyramid
from neodragon_npu.neodragon_models.denoiser import build_denoiser, save_denoiser
from neodragon_npu.neodragon_models.configs import get_denoiser_config
from neodragon_npu.neodragon_models.sampling import example_stage_inputs, rollout, synthetic_prompt
from neodragon_npu.neodragon_models.weights import CheckpointError, WEIGHTS_NAME


def _random_clips(cfg, unit, stage, seed):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(1, cfg.mmdit.in_channels, c.num_frames, c.height, c.width, generator=gen)
        for c in pyramid.clip_layout(cfg.geometry, unit, stage)
    ]


@pytest.mark.parametrize("stage", range(3))
def test_envelope_padding_reproduces_every_unpadded_call(tiny_denoiser, stage):
    cfg = tiny_denoiser.config
    module = tiny_denoiser.stage_module(stage)
    prompt = synthetic_prompt(tiny_denoiser, 7)
    table = tiny_denoiser.transformer.pos_embed.pos_embed
    for unit in cfg.geometry.denoised_units:
        clips = _random_clips(cfg, unit, stage, unit)
        args = (cfg, table, unit, stage, clips, prompt.embeds, prompt.mask, prompt.pooled)
        padded = module(**pyramid.stage_inputs(*args, pad_to_envelope=True))
        unpadded = module(**pyramid.stage_inputs(*args, pad_to_envelope=False))
        assert torch.allclose(padded, unpadded, atol=1e-5), (unit, stage)


def test_synthetic_weights_are_seeded(tiny_denoiser):
    again = build_denoiser(tiny_denoiser.config, seed=0)
    other = build_denoiser(tiny_denoiser.config, seed=1)
    a = tiny_denoiser.transformer.state_dict()
    assert all(torch.equal(a[k], v) for k, v in again.transformer.state_dict().items())
    assert not torch.equal(a["proj_out.weight"], other.transformer.state_dict()["proj_out.weight"])


def test_rollout_generates_every_frame(tiny_denoiser):
    geo = tiny_denoiser.config.geometry
    video = rollout(tiny_denoiser, synthetic_prompt(tiny_denoiser, 1), seed=1)
    assert video.shape == (1, 4, geo.num_latent_frames, geo.latent_height, geo.latent_width)
    assert torch.isfinite(video).all()


def test_an_unpadded_rollout_hands_on_the_envelope_inputs_and_the_same_outputs(tiny_denoiser):
    calls = {}
    for unpadded in (False, True):
        seen = calls[unpadded] = []
        rollout(tiny_denoiser, synthetic_prompt(tiny_denoiser, 3), seed=3, max_unit=2, unpadded=unpadded,
                on_call=lambda unit, stage, inputs, out, seen=seen: seen.append((unit, stage, inputs, out)))
    assert [c[:2] for c in calls[True]] == [c[:2] for c in calls[False]] and len(calls[True]) == 6
    envelope = pyramid.envelope_image_tokens(tiny_denoiser.config.geometry, tiny_denoiser.config.mmdit.patch_size, 0)
    for (unit, stage, padded, out), (_, _, inputs, unpadded_out) in zip(calls[False], calls[True]):
        assert inputs.keys() == padded.keys()
        assert all(torch.allclose(inputs[n], padded[n], atol=1e-5) for n in padded)  # envelope-shaped
        assert torch.allclose(unpadded_out, out, atol=1e-5), (unit, stage)
        assert torch.allclose(tiny_denoiser.stage_module(stage)(**inputs), unpadded_out, atol=1e-5)
    assert calls[True][0][2]["latent_tokens"].shape[1] == envelope  # unit 1, stage 0: padded inputs


@pytest.fixture()
def checkpoint(tmp_path, tiny_denoiser):
    return save_denoiser(tiny_denoiser, tmp_path / "ckpt")


def test_released_style_checkpoint_loads_and_matches(checkpoint, tiny_denoiser, tiny_stage_inputs):
    loaded = build_denoiser(get_denoiser_config("tiny"), checkpoint=checkpoint, seed=99)
    for module in ("transformer", "context_adapter"):
        ours, theirs = getattr(tiny_denoiser, module).state_dict(), getattr(loaded, module).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    inputs = tiny_stage_inputs[1]
    ref = tiny_denoiser.stage_module(1)(**inputs)
    assert torch.allclose(loaded.stage_module(1)(**inputs), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_checkpoint_keys_follow_the_released_names(checkpoint):
    from safetensors import safe_open

    with safe_open(str(checkpoint / "diffusion_transformer_320p" / WEIGHTS_NAME), "pt") as f:
        keys = set(f.keys())
    for key in (
        "pos_embed.proj.weight",
        "pos_embed.pos_embed",
        "time_text_embed.timestep_embedder.linear_1.weight",
        "time_text_embed.text_embedder.linear_2.bias",
        "transformer_blocks.0.norm1.linear.weight",
        "transformer_blocks.0.attn.add_q_proj.weight",
        "transformer_blocks.0.attn.norm_add_q.weight",
        "transformer_blocks.0.attn.to_out.0.weight",
        "transformer_blocks.0.ff.net.0.proj.weight",
        "transformer_blocks.0.ff_context.net.2.weight",
        "transformer_blocks.2.norm1_context.linear.weight",
        "norm_out.linear.weight",
        "proj_out.weight",
    ):
        assert key in keys, key
    assert not any(k.startswith("transformer_blocks.2.ff_context") for k in keys)  # context-pre-only
    assert not any(k.startswith("transformer_blocks.2.attn.to_add_out") for k in keys)


def _rewrite(folder, mutate):
    from safetensors.torch import load_file, save_file

    path = folder / "diffusion_transformer_320p" / WEIGHTS_NAME
    state = load_file(str(path))
    mutate(state)
    save_file(state, str(path))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda s: s.pop("proj_out.bias"), "missing keys: proj_out.bias"),
        (lambda s: s.__setitem__("extra.weight", torch.zeros(1)), "unexpected keys: extra.weight"),
        (lambda s: s.__setitem__("proj_out.bias", torch.zeros(3)), r"mis-shaped keys: proj_out.bias \[3\]"),
    ],
)
def test_mismatched_checkpoint_gives_one_clear_error(checkpoint, mutate, message):
    _rewrite(checkpoint, mutate)
    with pytest.raises(CheckpointError, match=message):
        build_denoiser(get_denoiser_config("tiny"), checkpoint=checkpoint)


def test_truncated_checkpoint_is_reported(checkpoint):
    path = checkpoint / "context_adapter" / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        build_denoiser(get_denoiser_config("tiny"), checkpoint=checkpoint)


def test_missing_folder_and_config_are_reported(tmp_path, checkpoint):
    with pytest.raises(CheckpointError, match="does not exist"):
        build_denoiser(get_denoiser_config("tiny"), checkpoint=tmp_path / "nowhere")
    (checkpoint / "diffusion_transformer_320p" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config.json"):
        build_denoiser(get_denoiser_config("tiny"), checkpoint=checkpoint)


def test_unsupported_architecture_option_is_refused(checkpoint):
    import json

    path = checkpoint / "diffusion_transformer_320p" / "config.json"
    raw = json.loads(path.read_text())
    raw["qk_norm"] = "layer_norm"
    path.write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="qk_norm='layer_norm' is not supported"):
        build_denoiser(get_denoiser_config("tiny"), checkpoint=checkpoint)


def test_example_inputs_have_the_envelope_shapes(tiny_denoiser):
    geo = tiny_denoiser.config.geometry
    inputs = example_stage_inputs(tiny_denoiser, 2)
    seq = pyramid.envelope_attention_tokens(geo, 2, 2)
    assert list(inputs) == list(pyramid.STAGE_INPUT_NAMES)
    assert inputs["attn_bias"].shape == (1, 1, seq, seq)
    assert inputs["rope_cos"].shape == (1, 1, seq, 8)  # half tables: one angle per pair
