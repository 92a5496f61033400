"""What a build checks before any work: the model is never loaded when a check fails."""

import pytest

from neodragon_npu.neodragon_models import specs
from neodragon_npu.tools.engine import preflight
from neodragon_npu.tools.engine.build import build
from neodragon_npu.tools.engine.options import BuildOptions, plan_build


@pytest.fixture
def loads(monkeypatch):
    """Every load of the denoiser, recorded (a check that fails must come before any)."""
    import dataclasses

    calls = []
    spec = specs.get_model("denoiser")
    original = spec.load
    patched = dataclasses.replace(spec, load=lambda o: calls.append(o) or original(o))
    monkeypatch.setitem(specs.MODELS, "denoiser", patched)
    return calls


def test_a_partition_budget_below_one_layer_is_refused_before_the_model_loads(tmp_path, loads):
    opts = BuildOptions(config="tiny", family=True, partition_budget=4096)
    with pytest.raises(ValueError, match=r"--partition-budget 4096 is below the weights of the largest layer "
                                         r"\(.*\); give at least --partition-budget \d+"):
        build(opts, tmp_path / "out")
    assert loads == [] and list(tmp_path.iterdir()) == []


def test_the_smallest_budget_preflight_names_is_accepted_by_it(tmp_path):
    opts = BuildOptions(config="tiny", family=True, partition_budget=4096)
    with pytest.raises(ValueError) as refused:
        preflight.preflight(plan_build(opts), tmp_path / "out")
    smallest = int(str(refused.value).rsplit(" ", 1)[1])
    assert preflight.preflight(plan_build(opts.replace(partition_budget=smallest)), tmp_path / "out")
    with pytest.raises(ValueError):
        preflight.preflight(plan_build(opts.replace(partition_budget=smallest - 1)), tmp_path / "out")


def test_a_build_the_disk_cannot_hold_is_refused_before_the_model_loads(tmp_path, loads, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(preflight.DiskSpaceError, match=r"writes about .* has 1.00 MB free; free some space or "
                                                       r"choose another -o"):
        build(BuildOptions(config="tiny"), tmp_path / "out")
    assert loads == [] and list(tmp_path.iterdir()) == []


def test_the_disk_estimate_grows_with_graphs_targets_and_weights():
    single = plan_build(BuildOptions(config="neodragon"))
    family = plan_build(BuildOptions(config="neodragon", family=True))
    two = plan_build(BuildOptions(config="neodragon", family=True, targets=("sm8750", "x-elite")))
    export = plan_build(BuildOptions(config="neodragon", family=True, until="export"))
    w = 6 << 30
    assert preflight.estimate_bytes(export, w) < preflight.estimate_bytes(family, w) < preflight.estimate_bytes(two, w)
    assert preflight.estimate_bytes(single, w) < preflight.estimate_bytes(family, w)
    assert preflight.estimate_bytes(family, 2 * w) > preflight.estimate_bytes(family, w)


def test_a_family_builds_at_the_smallest_budget_preflight_names(tmp_path):
    """The budget the refusal names must work all the way through quantization: at it each
    partition holds about one layer, and shared weights keep one kind of consumer."""
    import json

    # the fidelity gate is not what this test is about: one layer per partition, with every
    # cut's activations quantized on two calibration samples, loses much more than a build
    # at a sensible budget
    opts = BuildOptions(config="tiny", family=True, partition_budget=4096, until="quantize",
                        calibration_samples=2, cache=False, min_sqnr_db=-100.0)
    with pytest.raises(ValueError) as refused:
        build(opts, tmp_path / "refused")
    smallest = int(str(refused.value).rsplit(" ", 1)[1])
    build(opts.replace(partition_budget=smallest), tmp_path / "b")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert len(manifest["partitions"]) > 10
    assert all(set(p["graphs"]) == {"0", "1", "2"} for p in manifest["partitions"])
