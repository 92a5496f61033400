import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from neodragon_npu.kernels.attention import MASK_VALUE
from neodragon_npu.passes.onnx.convert_mask_to_finite import ConvertMaskToFinitePass
from tests.helpers import check_onnx_pass, onnx_model, run_onnx


def _masked_softmax(fill: float, via_constant: bool = False):
    """softmax(scores + Where(keep, 0, fill)): the SDPA lowering of a boolean mask."""
    nodes = [
        helper.make_node("Where", ["keep", "zero", "fill"], ["bias"]),
        helper.make_node("Add", ["scores", "bias"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
    ]
    inits = [onnx.numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    fill_t = onnx.numpy_helper.from_array(np.array(fill, np.float32), "fill")
    if via_constant:
        nodes.insert(0, helper.make_node("Constant", [], ["fill"], value=fill_t))
    else:
        inits.append(fill_t)
    return onnx_model(
        nodes,
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [3, 4]),
            helper.make_tensor_value_info("keep", TensorProto.BOOL, [3, 4]),
        ],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [3, 4])],
        inits,
    )


def _feeds():
    keep = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], bool)  # last row fully masked
    return {"scores": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32), "keep": keep}


@pytest.mark.parametrize("fill", [float("-inf"), float(np.finfo(np.float32).min), -1e9])
@pytest.mark.parametrize("via_constant", [False, True])
def test_infinite_masks_become_finite_and_fully_masked_rows_stop_being_nan(fill, via_constant):
    model = _masked_softmax(fill, via_constant)
    before = run_onnx(model, _feeds())[0]
    result = ConvertMaskToFinitePass()(model)
    after = run_onnx(result.model, _feeds())[0]
    assert result.modified
    # rows with visible keys are unchanged (exp(-100) is 0 next to them) ...
    assert np.allclose(after[:2], before[:2], atol=1e-7)
    # ... and the fully masked row is finite instead of NaN: the same bias on every key
    # cancels in the softmax
    assert np.isfinite(after).all()
    scores = _feeds()["scores"][2]
    assert np.allclose(after[2], np.exp(scores) / np.exp(scores).sum(), atol=1e-6)
    assert not ConvertMaskToFinitePass()(result.model).modified


def test_finite_masks_are_left_alone():
    check = check_onnx_pass(ConvertMaskToFinitePass(), _masked_softmax(MASK_VALUE), _feeds())
    assert not check.modified and check.max_abs_error == 0


def test_weights_are_not_examined():
    w = np.full((4, 2), -1e6, np.float32)  # absurd but a weight: MatMul operand
    model = onnx_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    assert not ConvertMaskToFinitePass()(model).modified


def test_bad_mask_value_is_refused():
    with pytest.raises(ValueError, match="must be finite and negative"):
        ConvertMaskToFinitePass(mask_value=float("-inf"))
