import numpy as np
import pytest
import torch
from torch import nn

from neodragon_npu.graphs import onnx_io
from neodragon_npu.graphs.export import export_onnx
from neodragon_npu.passes.onnx.fold_constants import FoldConstantsPass
from neodragon_npu.passes.onnx.hoist_token_position import HoistTokenPositionPass
from tests.helpers import run_onnx

VOCAB, LENGTH, WIDTH, EOS = 40, 8, 6, 3


class Pooler(nn.Module):
    """Rows pooled at the end token, as transformers' CLIP does: the largest id
    (``rule="argmax"``), the first EOS id (``"eos"``), or from a float score (``"score"``,
    which no host can compute from its tokenizer)."""

    def __init__(self, rule: str):
        super().__init__()
        torch.manual_seed(0)
        self.rule = rule
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.proj = nn.Linear(WIDTH, 4)

    def forward(self, ids):
        x = torch.tanh(self.embed(ids))
        if self.rule == "argmax":
            position = ids.argmax(-1)
        elif self.rule == "eos":
            position = (ids == EOS).int().argmax(-1)
        else:
            position = x.sum(-1).argmax(-1)
        return self.proj(x[torch.arange(x.shape[0]), position])


def _exported(tmp_path, rule, batch=2):
    export_onnx(Pooler(rule).eval(), [torch.zeros(batch, LENGTH, dtype=torch.long)], tmp_path / "p.onnx",
                input_names=["ids"], output_names=["y"])
    model = onnx_io.load(tmp_path / "p.onnx")
    FoldConstantsPass()(model)
    return model


def _ids(batch=2):
    ids = np.random.default_rng(1).integers(4, VOCAB - 1, (batch, LENGTH)).astype(np.int64)
    ends = [5, 2, 7][:batch]
    for row, end in enumerate(ends):
        ids[row, end] = EOS
        ids[row, end + 1:] = 0
    return ids, ends


@pytest.mark.parametrize("rule", ["argmax", "eos"])
def test_the_pooled_row_comes_from_the_host_one_hot_exactly(tmp_path, rule):
    model = _exported(tmp_path, rule)
    ids, ends = _ids()
    if rule == "argmax":  # the largest id marks the end
        ids[np.arange(2), ends] = VOCAB - 1
    before = run_onnx(model, {"ids": ids})[0]
    result = HoistTokenPositionPass(input_name="end_onehot")(model)
    assert result.modified
    assert [v.name for v in model.graph.inputs] == ["ids", "end_onehot"]
    assert not {"ArgMax", "Equal"} & {n.op_type for n in model.graph}
    assert sum(n.op_type == "Gather" for n in model.graph) == 1  # the embedding's lookup only
    expected = "largest id of ids" if rule == "argmax" else f"first position where ids == {EOS}"
    assert any(expected in note for note in result.notes)
    onehot = np.zeros((2, LENGTH), np.float32)
    onehot[np.arange(2), ends] = 1.0
    np.testing.assert_array_equal(run_onnx(model, {"ids": ids, "end_onehot": onehot})[0], before)
    again = HoistTokenPositionPass(input_name="end_onehot")(model)
    assert not again.modified and "nothing to do" in again.notes[0]


def test_a_position_from_activations_is_left_alone(tmp_path):
    model = _exported(tmp_path, "score")
    result = HoistTokenPositionPass()(model)
    assert not result.modified
    assert any("not a function of a token-id graph input" in n for n in result.notes)
    assert [v.name for v in model.graph.inputs] == ["ids"]
