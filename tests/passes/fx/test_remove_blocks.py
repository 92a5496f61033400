import json

import pytest

from neodragon_npu.graphs import fx as fx_utils
from neodragon_npu.neodragon_models import pyramid
from neodragon_npu.neodragon_models.pruning import load_importance, prune_blocks, select_blocks
from neodragon_npu.neodragon_models.sampling import example_stage_inputs
from neodragon_npu.passes.base import PreconditionError
from neodragon_npu.passes.fx.remove_blocks import RemoveBlocksPass
from tests.helpers import check_fx_pass


def _traced(denoiser, stage=2):
    example = example_stage_inputs(denoiser, stage, seed=4)
    inputs = [example[n] for n in pyramid.STAGE_INPUT_NAMES]
    return fx_utils.trace(denoiser.stage_module(stage), inputs), inputs


def _importance(tmp_path, scores):
    path = tmp_path / "importance.json"
    path.write_text(json.dumps({"blocks": [{"index": i, "combined": v} for i, v in enumerate(scores)]}))
    return path


@pytest.mark.parametrize("removed", [[1], [2], [0, 2]])  # [2] and [0, 2] remove the last block
def test_explicit_removal_equals_the_pruned_model(tiny_denoiser, removed, tmp_path):
    gm, inputs = _traced(tiny_denoiser)
    mapping_file = tmp_path / "map.json"
    check = check_fx_pass(RemoveBlocksPass(blocks=removed, mapping_path=mapping_file), gm, inputs)
    assert check.modified
    pruned, mapping = prune_blocks(tiny_denoiser, removed)
    assert (gm(*inputs) - pruned.stage_module(2)(*inputs)).abs().max() < 1e-6
    assert gm.meta["block_mapping"] == mapping
    assert json.loads(mapping_file.read_text())["old_to_new"] == {str(k): v for k, v in mapping.items()}
    indices = {k.split(".")[2] for k in gm.state_dict() if k.startswith("transformer.transformer_blocks.")}
    assert indices == {str(i) for i in range(3 - len(removed))}  # renumbered contiguously
    assert not RemoveBlocksPass(blocks=removed)(gm).modified  # indices are the original ones


def test_blocks_chosen_from_importance_scores_remove_the_least_important(tiny_denoiser, tmp_path):
    """Selection by count or threshold belongs to the build (pruning.select_blocks); the pass
    takes what it selects."""
    ranking, scores = load_importance(_importance(tmp_path, [0.3, 0.01, 0.2]))
    gm, inputs = _traced(tiny_denoiser)
    assert check_fx_pass(RemoveBlocksPass(blocks=select_blocks(ranking, scores, count=1)), gm, inputs).modified
    assert gm.meta["block_mapping"] == {0: 0, 2: 1}
    gm, inputs = _traced(tiny_denoiser)
    assert check_fx_pass(RemoveBlocksPass(blocks=select_blocks(ranking, scores, threshold=0.25)), gm, inputs).modified
    assert gm.meta["block_mapping"] == {0: 0}


def test_a_second_run_changes_nothing_and_says_why(tiny_denoiser):
    gm, inputs = _traced(tiny_denoiser)
    assert RemoveBlocksPass(blocks=[1])(gm).modified
    code = gm.code
    again = RemoveBlocksPass(blocks=[1])(gm)
    assert not again.modified and gm.code == code
    assert any("already removed" in note for note in again.notes)


def test_bad_selections_are_refused(tiny_denoiser):
    with pytest.raises(ValueError, match="non-empty list of block indices"):
        RemoveBlocksPass(blocks=[])
    with pytest.raises(ValueError, match="non-empty list of block indices"):
        RemoveBlocksPass(blocks=[-1])
    gm, _ = _traced(tiny_denoiser)
    with pytest.raises(PreconditionError, match=r"blocks \[5\] do not exist"):
        RemoveBlocksPass(blocks=[5])(gm)
    with pytest.raises(PreconditionError, match="leaves none"):
        RemoveBlocksPass(blocks=[0, 1, 2])(gm)
