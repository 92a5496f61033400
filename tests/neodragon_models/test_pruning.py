import copy
import json

import pytest
import torch

from neodragon_npu.neodragon_models.configs import get_denoiser_config
from neodragon_npu.neodragon_models.context_adapter import ContextAdapter
from neodragon_npu.neodragon_models.denoiser import Denoiser, build_denoiser, count_parameters, save_denoiser
from neodragon_npu.neodragon_models.mmdit import PyramidMMDiT
from neodragon_npu.neodragon_models.pruning import parse_removal, prune_blocks, select_blocks
from neodragon_npu.neodragon_models.sampling import example_stage_inputs


def _meta(name):
    cfg = get_denoiser_config(name)
    with torch.device("meta"):
        return Denoiser(cfg, PyramidMMDiT(cfg.mmdit), ContextAdapter(cfg.context_adapter))


@pytest.mark.parametrize("removed", [[0, 1, 2, 3, 4, 5], [7, 9, 11, 13, 15, 23]])
def test_removing_six_baseline_blocks_gives_the_neodragon_parameter_count(removed):
    pruned, _ = prune_blocks(_meta("baseline"), removed)  # meta: nothing is allocated
    params = sum(p.numel() for p in pruned.transformer.parameters())
    assert abs(params - 1.518e9) / 1.518e9 < 0.005
    assert params == count_parameters(get_denoiser_config("neodragon").mmdit)


def test_removing_the_last_block_makes_the_new_last_block_context_pre_only(tiny_denoiser):
    pruned, mapping = prune_blocks(tiny_denoiser, [2])
    assert mapping == {0: 0, 1: 1}
    assert pruned.transformer.transformer_blocks[-1].context_pre_only
    assert not hasattr(pruned.transformer.transformer_blocks[-1], "ff_context")
    rewired = copy.deepcopy(tiny_denoiser)  # the block list without its last block
    del rewired.transformer.transformer_blocks[2]
    inputs = example_stage_inputs(tiny_denoiser, 1)
    assert torch.allclose(pruned.stage_module(1)(**inputs), rewired.stage_module(1)(**inputs), atol=1e-6)


def test_pruned_model_saves_as_a_contiguous_checkpoint_that_loads(tiny_denoiser, tmp_path):
    pruned, _ = prune_blocks(tiny_denoiser, [0])
    save_denoiser(pruned, tmp_path / "student")
    raw = json.loads((tmp_path / "student" / "diffusion_transformer_320p" / "config.json").read_text())
    assert raw["num_layers"] == 2
    loaded = build_denoiser(tiny_denoiser.config, checkpoint=tmp_path / "student")
    inputs = example_stage_inputs(tiny_denoiser, 0)
    assert torch.allclose(loaded.stage_module(0)(**inputs), pruned.stage_module(0)(**inputs), atol=1e-6)


def test_selection_by_count_threshold_and_list(tmp_path):
    ranking, scores = [2, 0, 1], {0: 0.2, 1: 0.5, 2: 0.1}
    assert select_blocks(ranking, scores, count=2) == [0, 2]
    assert select_blocks(ranking, scores, threshold=0.15) == [2]
    assert select_blocks(ranking, scores, threshold=0.05) == []
    path = tmp_path / "importance.json"
    path.write_text(json.dumps({"blocks": [{"index": i, "combined": v} for i, v in scores.items()]}))
    assert parse_removal("count=1", 3, path) == [2]
    assert parse_removal("threshold=0.3", 3, path) == [0, 2]
    assert parse_removal("2, 0", 3) == [0, 2]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("5", r"cannot remove blocks \[5\]"),
        ("0,1,2", "leaves none"),
        ("count=2", "needs --importance"),
        ("a,b", "expected indices"),
    ],
)
def test_bad_removal_specs_are_explained(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_removal(spec, 3)
