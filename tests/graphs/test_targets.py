import pytest

from neodragon_npu.graphs.targets import DEFAULT_TARGET, get_target


def test_named_targets_map_to_soc_and_arch():
    elite = get_target("sm8750")
    assert (elite.soc_model, elite.htp_arch) == (69, 79)
    x_elite = get_target("x-elite")
    assert (x_elite.soc_model, x_elite.htp_arch) == (60, 73)
    assert get_target("8-elite") is elite and get_target("SC8380XP") is x_elite
    assert DEFAULT_TARGET == "sm8750"


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(ValueError, match="known targets: .*sm8750.*x-elite"):
        get_target("sm9000")
