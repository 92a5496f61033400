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
    with pytest.raises(ValueError, match=r"unknown option 'bogus' \(its options: input_size_limit, max_rounds"):
        create_pass("fold_constants", {"bogus": 1})
    with pytest.raises(ValueError, match=r"missing required options calibration"):
        create_pass("quantize_w8a16")
    assert "calibration" in pass_options(PASSES["quantize_w8a16"])


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("fold_constants", {"max_rounds": -3}, r"max_rounds = -3 must be at least 1"),
        ("fold_constants", {"max_rounds": 2.5}, r"max_rounds = 2.5 must be int"),
        ("fold_constants", {"max_rounds": True}, r"must be int, not True"),
        ("convert_mask_to_finite", {"mask_value": "-inf"}, r"mask_value = '-inf' must be float"),
        ("convert_mask_to_finite", {"mask_value": float("-inf")}, r"must be float"),
        ("split_attention", {"activation_bytes": 3}, r"must be one of 1, 2, 4"),
        ("quantize_w8a16", {"calibration": "nowhere.npz"}, r"names no existing file"),
        ("quantize_w8a16", {"quant_scheme": "best"}, r"one of min_max, tf, tf_enhanced, percentile"),
        ("round_weights_adaround", {"crop": [48, 0]}, r"must be at least 1"),
        ("round_weights_gptq", {"skip": "blocks.*"}, r"must be a list of str"),
        ("partition_graph", {"reference": []}, r"set by the build engine"),
        ("remove_blocks", {"blocks": [1, -2]}, r"must be at least 0"),
    ],
)
def test_pass_options_are_checked_by_type_and_range_naming_pass_and_option(name, options, message):
    from neodragon_npu.passes.base import OptionError

    with pytest.raises(OptionError, match=rf"pass {name}: .*{message}"):
        create_pass(name, options)


def test_every_pass_declares_each_option_and_its_defaults_pass_their_own_checks():
    """What a pipeline file may set is declared with type, range and meaning (passes
    --options shows it); the rest is the engine's. A default outside its declared range
    would make the declaration a lie."""
    import inspect

    for name, cls in PASSES.items():
        params = pass_options(cls)
        assert set(cls.OPTIONS) | set(cls.ENGINE_OPTIONS) == set(params), name
        assert not set(cls.OPTIONS) & set(cls.ENGINE_OPTIONS), name
        for opt, spec in cls.OPTIONS.items():
            assert spec.help, (name, opt)
            default = params[opt]
            if default is not inspect.Parameter.empty and not (default is None and spec.none_ok):
                assert spec.check(list(default) if isinstance(default, tuple) else default) is None, (name, opt)


def test_a_pass_whose_options_are_not_declared_is_refused_at_discovery(tmp_path, monkeypatch):
    import sys

    from neodragon_npu.passes import registry

    folder = tmp_path / "passes_pkg"
    (folder / "onnx").mkdir(parents=True)
    (folder / "onnx" / "undeclared.py").write_text(
        "from neodragon_npu.passes.base import Pass, PassResult\n"
        "class Undeclared(Pass):\n"
        "    IR = 'onnx'\n"
        "    NAME = 'undeclared'\n"
        "    def __init__(self, *, limit: int = 3):\n"
        "        self.limit = limit\n"
        "    def call(self, model):\n"
        "        return PassResult(model, False)\n")
    (folder / "__init__.py").write_text("")
    (folder / "onnx" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "__file__", str(folder / "registry.py"))
    monkeypatch.setattr(registry, "__package__", "passes_pkg")
    monkeypatch.setattr(registry, "IR_FOLDERS", ("onnx",))
    with pytest.raises(ImportError, match=r"undeclared.py: OPTIONS and ENGINE_OPTIONS declare \[\]; its keyword "
                                          r"options are \['limit'\]"):
        registry._discover()
    sys.modules.pop("passes_pkg.onnx.undeclared", None)


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
    [("passes = []", "non-empty list"), ("[[passes]]\noptions = {}", "has no 'name'"), ("[[passes", "cannot parse"),
     ('[[passes]]\nname = "fold_constants"\noption = {max_rounds = 2}', r"passes\[0\] \(fold_constants\) has "
      r"unknown key 'option'; an entry holds name and options"),
     ('pipeline = "x"\n[[passes]]\nname = "fold_constants"', "unknown top-level key 'pipeline'"),
     ('[[passes]]\nname = "fold_constants"\noptions = 3', "options must be a table")],
)
def test_bad_pipeline_files_are_explained(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_pipeline_file(path)
