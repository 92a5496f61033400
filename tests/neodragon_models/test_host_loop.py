"""The numpy host loop against independent references: torch's resizes, PIL's Lanczos, the
torch pyramid code the denoiser's own builds use, the block noise's covariance, the
tokenizers' truncation, and the systems' configs chaining."""

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neodragon_npu.neodragon_models import pyramid
from neodragon_npu.neodragon_models.host import numerics as nm
from neodragon_npu.neodragon_models.host.loop import stage_feed, tokenize
from neodragon_npu.neodragon_models.host.tokenizer import Tokenizer
from neodragon_npu.neodragon_models.system import SYSTEMS, check_system, host_section


@pytest.mark.parametrize("size_in,size_out", [((8, 16), (4, 8)), ((40, 64), (10, 16)), ((5, 7), (9, 13))])
def test_bilinear_resize_is_torchs(size_in, size_out):
    x = np.random.default_rng(0).standard_normal((1, 3, 2, *size_in)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x[0].transpose(1, 0, 2, 3)), size=size_out, mode="bilinear",
                        align_corners=False).numpy().transpose(1, 0, 2, 3)[None]
    np.testing.assert_allclose(nm.resize_bilinear(x, size_out), ref, atol=1e-5)


def test_lanczos_resize_matches_pil_within_one_level():
    from PIL import Image
    from scipy import ndimage

    rng = np.random.default_rng(1)
    pixels = ndimage.gaussian_filter(rng.random((128, 192, 3)) * 255, (2, 2, 0)).astype(np.uint8)
    for h, w in ((64, 128), (320, 512)):
        ours = nm.resize_lanczos(pixels, (h, w)).astype(int)
        pil = np.asarray(Image.fromarray(pixels).resize((w, h), Image.LANCZOS)).astype(int)
        assert np.abs(ours - pil).max() <= 1


def test_block_noise_has_the_pyramid_covariance():
    gamma = 1 / 3
    z = nm.block_noise(gamma, (1, 4, 1, 64, 64), np.random.default_rng(2))
    blocks = z.reshape(4, 32, 2, 32, 2).transpose(0, 1, 3, 2, 4).reshape(-1, 4)
    cov = np.cov(blocks.T)
    np.testing.assert_allclose(cov, np.eye(4) * (1 + gamma) - gamma, atol=0.05)
    # neighbours in different blocks (columns 2k+1 and 2k+2) are independent
    across = np.corrcoef(z[..., 1:-1:2].reshape(-1), z[..., 2::2].reshape(-1))[0, 1]
    assert abs(across) < 0.03


def test_nearest_upsample_and_patchify_are_the_torch_pipelines():
    x = np.random.default_rng(3).standard_normal((1, 4, 2, 4, 6)).astype(np.float32)
    up = F.interpolate(torch.from_numpy(x[0].transpose(1, 0, 2, 3)), scale_factor=2, mode="nearest")
    np.testing.assert_array_equal(nm.upsample_nearest_2x(x), up.numpy().transpose(1, 0, 2, 3)[None])
    np.testing.assert_array_equal(nm.patchify(x, 2), pyramid.patchify(torch.from_numpy(x), 2).numpy())
    tokens = np.random.default_rng(4).standard_normal((1, 2 * 2 * 3, 16)).astype(np.float32)
    np.testing.assert_array_equal(nm.unpatchify(tokens, 2, 4, 2, 4, 6),
                                  pyramid.unpatchify(torch.from_numpy(tokens), 2, 4, 2, 4, 6).numpy())


@pytest.fixture(scope="module")
def tiny_system():
    from neodragon_npu.neodragon_models.configs import get_denoiser_config
    from neodragon_npu.neodragon_models.denoiser import build_denoiser

    system = SYSTEMS["tiny"]
    denoiser = build_denoiser(get_denoiser_config(system.config("denoiser")), seed=0)
    host, tables = host_section(system, denoiser.transformer.pos_embed.pos_embed)
    return system, denoiser, host, tables


def test_every_denoiser_call_gets_the_inputs_the_torch_pyramid_gives(tiny_system):
    """The host's feed from the manifest and tables equals pyramid.stage_inputs (what the
    stage graphs were traced and calibrated against) for every (unit, stage)."""
    _, denoiser, host, tables = tiny_system
    cfg = denoiser.config
    video = host["video"]
    rng = np.random.default_rng(5)
    mask = np.zeros((1, cfg.geometry.text_len), dtype=np.int64)
    mask[0, :11] = 1
    text = {"prompt_embeds": rng.standard_normal((1, cfg.geometry.text_len, 64)).astype(np.float32),
            "pooled": rng.standard_normal((1, 64)).astype(np.float32), "prompt_mask": mask}
    for unit in cfg.geometry.denoised_units:
        for stage in range(cfg.geometry.num_stages):
            layout = pyramid.clip_layout(cfg.geometry, unit, stage)
            clips = [rng.standard_normal((1, 16, c.num_frames, c.height, c.width)).astype(np.float32) for c in layout]
            ours = stage_feed(video, tables, unit, stage, clips, text)
            ref = pyramid.stage_inputs(cfg, denoiser.transformer.pos_embed.pos_embed, unit, stage,
                                       [torch.from_numpy(c) for c in clips], torch.from_numpy(text["prompt_embeds"]),
                                       torch.from_numpy(mask).float(), torch.from_numpy(text["pooled"]))
            assert list(ours) == list(pyramid.STAGE_INPUT_NAMES)
            for name in ours:
                np.testing.assert_allclose(ours[name], ref[name].numpy(), atol=1e-6, err_msg=f"{unit},{stage} {name}")


def test_the_bundle_position_table_is_the_models(tiny_system):
    from neodragon_npu.neodragon_models.system import pos_table

    system, denoiser, _, _ = tiny_system
    torch.testing.assert_close(pos_table(system), denoiser.transformer.pos_embed.pos_embed)


def test_the_manifest_schedule_is_the_released_one():
    """The full-size stages' timesteps and upsample factors (submodules section 7's table)."""
    host, _ = host_section(SYSTEMS["tiny"], torch.zeros(1, 24 * 24, 32))
    stages = host["video"]["stages"]
    assert [s["timestep"] for s in stages] == [1000.0, 744.0, 386.0]
    assert stages[0]["upsample"] is None
    assert stages[1]["upsample"]["alpha"] == pytest.approx(0.59988, abs=1e-4)
    assert stages[1]["upsample"]["beta"] == pytest.approx(0.69303, abs=1e-4)
    assert stages[2]["upsample"]["alpha"] == pytest.approx(0.74963, abs=1e-4)
    assert stages[2]["upsample"]["beta"] == pytest.approx(0.43366, abs=1e-4)


def test_clip_tokenizer_truncates_as_the_real_one_keeping_the_end_token():
    tok = Tokenizer("clip", 8, eos_id=127, pad_id=127, word_ids=(0, 126), bos_id=126)
    ids, mask, dropped = tok("one two three four five six seven eight nine")
    assert ids.shape == (1, 8) and dropped == 3
    assert ids[0, 0] == 126 and ids[0, -1] == 127 and (ids[0, 1:-1] < 126).all()
    short, _, none = tok("a fox")
    assert none == 0 and list(short[0, 3:]) == [127] * 5
    assert tok.end_onehot(short)[0].tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
    assert tok("A Fox!")[0].tolist() == tok("a fox !")[0].tolist()  # case and spacing do not matter


def test_t5_tokenizer_truncates_keeping_eos_and_masks_up_to_it():
    tok = Tokenizer("t5", 6, eos_id=1, pad_id=0, word_ids=(2, 96))
    ids, mask, dropped = tok("one two three four five six seven")
    assert dropped == 2 and ids[0, -1] == 1 and mask.tolist() == [[1] * 6]
    ids, mask, _ = tok("red fox")
    assert ids[0, 2] == 1 and ids[0, 3:].tolist() == [0, 0, 0] and mask.tolist() == [[1, 1, 1, 0, 0, 0]]


def test_a_long_prompt_gives_one_warning_naming_each_encoder(tiny_system):
    _, _, host, _ = tiny_system
    feeds, warnings = tokenize(host, "a fox")
    assert warnings == []
    feeds, warnings = tokenize(host, " ".join(["word"] * 40))
    assert len(warnings) == 1 and "clip_l keeps the first 14" in warnings[0] and "dt5 keeps the first 15" in warnings[0]
    assert feeds["dt5"]["input_ids"][0, -1] == 1


def test_both_systems_chain_and_a_mismatch_is_named():
    for system in SYSTEMS.values():
        check_system(system)
    broken = dataclasses.replace(SYSTEMS["tiny"], configs={**SYSTEMS["tiny"].configs, "denoiser": "tiny"})
    with pytest.raises(ValueError, match="DT5 output width / denoiser text width: 64 against 40"):
        check_system(broken)


def test_the_host_runtime_imports_without_torch():
    """What an app runs (the loop, the bundle reader, the media writers) needs no torch."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "import neodragon_npu.neodragon_models.host.loop, neodragon_npu.tools.runtime.bundle, "
            "neodragon_npu.tools.runtime.media\n"
            "assert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules if sys.modules[m])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
