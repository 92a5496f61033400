import dataclasses

import pytest
import torch

from neodragon_npu.neodragon_models.configs import get_denoiser_config
from neodragon_npu.neodragon_models.denoiser import build_denoiser
from neodragon_npu.neodragon_models.importance import block_importance, rank_blocks
from neodragon_npu.neodragon_models.pruning import prune_blocks
from neodragon_npu.neodragon_models.sampling import example_stage_inputs

IDENTITY_BLOCKS = (1, 3)


def _zero_gates(denoiser, index):
    """Zero the attention and MLP gates of both streams: the block becomes the identity."""
    dim = denoiser.config.mmdit.inner_dim
    block = denoiser.transformer.transformer_blocks[index]
    with torch.no_grad():
        for norm in (block.norm1, block.norm1_context):
            for chunk in (2, 5):  # gate_msa, gate_mlp
                norm.linear.weight[chunk * dim : (chunk + 1) * dim] = 0
                norm.linear.bias[chunk * dim : (chunk + 1) * dim] = 0


@pytest.fixture(scope="module")
def gated():
    cfg = get_denoiser_config("tiny")
    denoiser = build_denoiser(cfg.replace(mmdit=dataclasses.replace(cfg.mmdit, num_layers=5)), seed=2)
    for index in IDENTITY_BLOCKS:
        _zero_gates(denoiser, index)
    return denoiser


def test_near_identity_blocks_rank_lowest(gated):
    scores = block_importance(gated, [1, 2], samples_per_stage=2)
    assert sorted(rank_blocks(scores)[:2]) == list(IDENTITY_BLOCKS)
    for index in IDENTITY_BLOCKS:
        assert scores[index].combined < 1e-6
    assert all(scores[i].combined > 1e-3 for i in (0, 2, 4))
    assert scores[4].context_pre_only and all(v is None for v in scores[4].text.values())
    assert set(scores[0].image) == {0, 1, 2}


def test_removing_them_changes_the_output_by_less_than_1e_5(gated):
    pruned, mapping = prune_blocks(gated, list(IDENTITY_BLOCKS))
    assert mapping == {0: 0, 2: 1, 4: 2}
    for stage in range(3):
        inputs = example_stage_inputs(gated, stage, seed=stage)
        ref = gated.stage_module(stage)(**inputs)
        out = pruned.stage_module(stage)(**inputs)
        assert float((out - ref).norm() / ref.norm()) < 1e-5
