import pytest

from neodragon_npu.neodragon_models.configs import get_denoiser_config
from neodragon_npu.neodragon_models.denoiser import count_parameters

# Paper: 2.028 B -> 1.518 B parameters (ContextAdapter excluded).
PAPER_PARAMS = {"neodragon": 1.518e9, "baseline": 2.028e9}


@pytest.mark.parametrize("name", ["neodragon", "baseline"])
def test_parameter_counts_match_the_paper_within_half_a_percent(name):
    # count_parameters builds on the meta device: nothing is allocated.
    params = count_parameters(get_denoiser_config(name).mmdit)
    assert abs(params - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.005


def test_context_adapter_has_0_13_b_parameters():
    params = count_parameters(get_denoiser_config("neodragon").context_adapter)
    assert abs(params - 0.130e9) / 0.130e9 < 0.005


def test_real_configs_have_the_published_architecture():
    cfg = get_denoiser_config("neodragon")
    assert (cfg.mmdit.num_layers, cfg.mmdit.inner_dim, cfg.mmdit.num_attention_heads) == (18, 1536, 24)
    assert get_denoiser_config("baseline").mmdit.num_layers == 24


def test_unknown_config_names_the_known_ones():
    with pytest.raises(ValueError, match="known configs: baseline, neodragon, neodragon-2block, tiny"):
        get_denoiser_config("huge")
