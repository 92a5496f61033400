import json

import pytest

from neodragon_npu.passes.onnx.convert_mask_to_finite import ConvertMaskToFinitePass
from neodragon_npu.passes.registry import PASSES, create_pass, load_pipeline_file, pass_options


def test_every_pass_is_registered_with_a_summary():
    assert {"specialize_shapes", "fold_constants", "convert_mask_to_finite", "quantize_w8a16"} <= set(PASSES)
    assert all(cls.summary() and cls.IR in ("fx", "onnx") for cls in PASSES.values())


def test_options_are_validated():
    p = create_pass("convert_mask_to_finite", {"mask_value": -50.0})
    assert isinstance(p, ConvertMaskToFinitePass) and p.mask_value == -50.0
    with pytest.raises(ValueError, match="unknown pass 'nope'"):
        create_pass("nope")
    with pytest.raises(ValueError, match=r"unknown options \['bogus'\]"):
        create_pass("fold_constants", {"bogus": 1})
    with pytest.raises(ValueError, match=r"missing required options \['calibration'\]"):
        create_pass("quantize_w8a16")
    assert "calibration" in pass_options(PASSES["quantize_w8a16"])


def test_pipeline_files_in_toml_and_json(tmp_path):
    toml = tmp_path / "p.toml"
    toml.write_text('[[passes]]\nname = "fold_constants"\n\n[[passes]]\nname = "convert_mask_to_finite"\noptions = { mask_value = -30.0 }\n')
    passes = load_pipeline_file(toml)
    assert [p.pass_name() for p in passes] == ["fold_constants", "convert_mask_to_finite"]
    assert passes[1].mask_value == -30.0
    js = tmp_path / "p.json"
    js.write_text(json.dumps({"passes": [{"name": "remove_unused_nodes"}]}))
    assert [p.pass_name() for p in load_pipeline_file(js)] == ["remove_unused_nodes"]


@pytest.mark.parametrize(
    "text, message",
    [("passes = []", "non-empty list"), ("[[passes]]\noptions = {}", "has no 'name'"), ("[[passes", "cannot parse")],
)
def test_bad_pipeline_files_are_explained(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_pipeline_file(path)
