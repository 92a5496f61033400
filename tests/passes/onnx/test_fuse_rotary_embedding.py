import numpy as np
import torch

from neodragon_npu.graphs import onnx_io
from neodragon_npu.graphs.export import export_onnx
from neodragon_npu.kernels.rope import rope_half_split, rope_tables
from neodragon_npu.passes.onnx.fold_constants import FoldConstantsPass
from neodragon_npu.passes.onnx.fuse_rotary_embedding import FuseRotaryEmbeddingPass
from tests.helpers import check_onnx_pass

S, D = 6, 16


class Rot(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, cos, sin):
        return self.fn(x, cos, sin) * 2


def _feeds():
    cos, sin = rope_tables(torch.arange(S, dtype=torch.float32), D, 10000.0)
    x = np.random.default_rng(0).standard_normal((1, 3, S, D)).astype(np.float32)
    return {"x": x, "cos": cos.numpy(), "sin": sin.numpy()}


def _exported(tmp_path, fn):
    feeds = _feeds()
    export_onnx(
        Rot(fn), [torch.from_numpy(v) for v in feeds.values()], tmp_path / "r.onnx",
        input_names=list(feeds), output_names=["y"],
    )
    model = onnx_io.load(tmp_path / "r.onnx")
    FoldConstantsPass()(model)
    return model


def test_half_split_rotation_becomes_rotary_embedding(tmp_path):
    check = check_onnx_pass(FuseRotaryEmbeddingPass(), _exported(tmp_path, rope_half_split), _feeds())
    assert check.modified and check.max_abs_error < 1e-5
    assert check.ops_after["RotaryEmbedding"] == 1
    assert check.ops_after["Concat"] == 0 and check.ops_after["Slice"] == 0 and check.ops_before["Slice"] == 2
    assert check.model.opset_imports[""] == 23
    assert not FuseRotaryEmbeddingPass()(check.model).modified


def test_other_rotations_are_left_alone(tmp_path):
    def swapped_signs(x, cos, sin):  # not a rotation RotaryEmbedding computes
        lo, hi = x[..., : D // 2], x[..., D // 2 :]
        return torch.cat([lo * cos + hi * sin, hi * cos + lo * sin], dim=-1)

    check = check_onnx_pass(FuseRotaryEmbeddingPass(), _exported(tmp_path, swapped_signs), _feeds())
    assert not check.modified and check.ops_after == check.ops_before
