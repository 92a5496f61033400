import dataclasses

import numpy as np
import pytest
import torch

from neodragon_npu.neodragon_models import ssd1b


@pytest.fixture(scope="module")
def unet():
    return ssd1b.build_unet(ssd1b.get_unet_config("tiny"), seed=0)


def _conditioning(unet, seed=0):
    shapes = ssd1b.unet_shapes(unet, tokens=16)
    gen = torch.Generator().manual_seed(seed)
    h, w = shapes.latent
    return (torch.randn(1, 4, h, w, generator=gen), torch.randn(1, shapes.tokens, shapes.text_dim, generator=gen),
            torch.randn(1, shapes.pooled_dim, generator=gen), ssd1b.time_ids(8 * h, 8 * w))


def test_the_unet_graph_equals_diffusers_forward_with_host_features(unet):
    sample, text, pooled, ids = _conditioning(unet)
    with torch.no_grad():
        ref = unet(sample, 749, text, added_cond_kwargs={"text_embeds": pooled,
                                                          "time_ids": torch.from_numpy(ids)}).sample
        feats = {k: torch.from_numpy(v) for k, v in ssd1b.host_embedding_features(unet.config, 749, ids).items()}
        out = ssd1b.UNetGraph(unet)(sample, feats["timestep_features"], text, pooled, feats["time_ids_features"])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_the_host_sinusoid_equals_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding

    t = np.array([999.0, 1.0, 640.0], dtype=np.float32)
    for dim, flip, shift in ((320, True, 0.0), (256, True, 0.0), (33, False, 1.0)):
        ref = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        # float32 arguments near 1000 rad: one ulp of exp() moves sin() by about 1e-4
        np.testing.assert_allclose(ssd1b.sinusoid(t, dim, flip_sin_to_cos=flip, freq_shift=shift), ref.numpy(),
                                   atol=2e-4)


def test_the_host_lcm_steps_equal_diffusers_scheduler():
    from diffusers import LCMScheduler

    scheduler = LCMScheduler(set_alpha_to_one=False, original_inference_steps=4, steps_offset=1)
    scheduler.set_timesteps(4)
    assert tuple(int(t) for t in scheduler.timesteps) == ssd1b.LCM_TIMESTEPS
    rng = np.random.default_rng(0)
    ours = theirs = rng.standard_normal((1, 4, 8, 12)).astype(np.float32)
    theirs = torch.from_numpy(theirs)
    for i, t in enumerate(scheduler.timesteps):
        eps = rng.standard_normal((1, 4, 8, 12)).astype(np.float32)
        gen = torch.Generator().manual_seed(i)
        noise = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(i)).numpy()
        theirs = scheduler.step(torch.from_numpy(eps), t, theirs, generator=gen).prev_sample
        last = i == len(scheduler.timesteps) - 1
        ours = ssd1b.lcm_step(eps, i, ours, None if last else noise)
        np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="needs fresh noise"):
        ssd1b.lcm_step(eps, 0, ours, None)


def test_the_released_sizes_have_the_released_parameter_counts():
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(ssd1b.get_unet_config("neodragon"))
        vae = AutoencoderKL.from_config(ssd1b.get_vae_config("neodragon"))
    blocks = [len(a.transformer_blocks) for b in (*unet.down_blocks, *unet.up_blocks)
              for a in getattr(b, "attentions", [])]
    assert sum(blocks) == 34 and len(unet.mid_block.resnets) == 1 and not unet.mid_block.attentions
    assert round(ssd1b.count_parameters(unet) / 1e9, 2) == 1.33
    assert round((ssd1b.count_parameters(vae.decoder) + ssd1b.count_parameters(vae.post_quant_conv)) / 1e6, 1) == 49.5


def test_released_folders_load_and_a_mismatched_one_is_named(tmp_path, unet):
    from neodragon_npu.neodragon_models.weights import CheckpointError, save_checkpoint

    folder = save_checkpoint(unet, tmp_path / "ssd_1b_unet", {"_class_name": "UNet2DConditionModel",
                                                              **ssd1b.get_unet_config("tiny")})
    loaded = ssd1b.build_unet({}, checkpoint=folder)
    for (name, a), (_, b) in zip(unet.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    vae = ssd1b.build_vae(ssd1b.get_vae_config("tiny"), seed=1)
    vae_folder = save_checkpoint(vae, tmp_path / "ssd_1b_vae", {"_class_name": "AutoencoderKL",
                                                                **ssd1b.get_vae_config("tiny")})
    with pytest.raises(CheckpointError, match="is a AutoencoderKL, not a UNet2DConditionModel"):
        ssd1b.build_unet({}, checkpoint=vae_folder)
    # the VAE's config with a wider latent: every mismatched tensor is named
    raw = {"_class_name": "AutoencoderKL", **ssd1b.get_vae_config("tiny"), "latent_channels": 8}
    bad = save_checkpoint(vae, tmp_path / "bad_vae", raw)
    with pytest.raises(CheckpointError, match="mis-shaped keys: .*post_quant_conv"):
        ssd1b.build_vae({}, checkpoint=bad)


def test_the_preflight_checks_the_text_encoder_folders_it_finds(tmp_path, unet):
    """A released SSD-1B folder's text encoders are read by the samples' loop, after the
    UNet is built: a mismatched one fails the preflight, before any work."""
    import json

    from transformers import CLIPTextConfig, CLIPTextModel

    from neodragon_npu.neodragon_models.clip import get_clip_config
    from neodragon_npu.neodragon_models.spec import LoadOptions
    from neodragon_npu.neodragon_models.specs import get_model
    from neodragon_npu.neodragon_models.weights import CheckpointError, save_checkpoint

    save_checkpoint(unet, tmp_path / "ssd_1b_unet", {"_class_name": "UNet2DConditionModel",
                                                    **ssd1b.get_unet_config("tiny")})
    # SSD-1B's ssd_1b_text_encoder is a plain CLIPTextModel: no projection
    cfg = get_clip_config("clip-l", "tiny")
    cfg = dataclasses.asdict(dataclasses.replace(cfg, projection_dim=cfg.hidden_size))
    CLIPTextModel(CLIPTextConfig(**cfg)).save_pretrained(tmp_path / "ssd_1b_text_encoder")
    spec, load = get_model("ssd1b-unet"), LoadOptions("tiny", tmp_path, 0, {})
    assert spec.preflight(load) == spec.preflight(LoadOptions("tiny", None, 0, {}))
    config = tmp_path / "ssd_1b_text_encoder" / "config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"hidden_size": 2 * cfg["hidden_size"]}))
    with pytest.raises(CheckpointError, match=r"ssd_1b_text_encoder does not match the model: .*mis-shaped"):
        spec.preflight(load)


def test_sample_plans_of_a_build_and_of_verify_ask_for_whole_prompts():
    from neodragon_npu.neodragon_models.spec import SamplePlan
    from neodragon_npu.neodragon_models.specs.ssd1b import CALIBRATION_PROMPTS, CHECK_PROMPTS, _prompt_seeds

    calib, check = _prompt_seeds(SamplePlan(), 4)  # a build with the defaults
    assert (len(calib), len(check)) == (CALIBRATION_PROMPTS, CHECK_PROMPTS)
    assert not set(calib) & set(check)
    calib, check = _prompt_seeds(SamplePlan(calibration=5, check=3), 4)  # partial prompts round up
    assert (len(calib), len(check)) == (2, 1)
    # `verify --prompts 2`: no calibration, two fresh prompts however many calls it allows
    calib, check = _prompt_seeds(SamplePlan(calibration=0, check=2 << 16, check_groups=2, first_check_seed=3000), 4)
    assert calib == [] and check == [3000, 3001]
