"""The step cache: entries keyed by everything that decides them, never half-written, never
used when damaged; builds that resume after SIGKILL and rerun only what changed."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from neodragon_npu.tools.engine import cache as step_cache
from neodragon_npu.tools.engine.build import build as run_build
from neodragon_npu.tools.engine.cache import KILL_AT_ENV, CacheError, StepCache, step_key
from neodragon_npu.tools.engine.compare import compare_builds
from neodragon_npu.tools.engine.options import BuildOptions

from .conftest import FAMILY


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# the cache itself ----------------------------------------------------------------------
def test_an_entry_comes_back_with_its_files_and_metadata(tmp_path):
    work, other = tmp_path / "work", tmp_path / "other"
    _write(work / "a.bin", b"alpha")
    _write(work / "sub" / "b.bin", b"beta" * 1000)
    with StepCache(tmp_path / "c") as cache:
        cache.put("step", "k1", work, [work / "a.bin", "sub/b.bin"], {"answer": 42})
    with StepCache(tmp_path / "c") as cache:
        entry = cache.get("step", "k1")
        assert entry.meta == {"answer": 42}
        entry.place(other)
        assert cache.get("step", "k2") is None
    assert (other / "a.bin").read_bytes() == b"alpha"
    assert (other / "sub" / "b.bin").read_bytes() == b"beta" * 1000


def test_external_data_is_copied_and_what_onnx_loads_from_a_reused_entry_loads(tmp_path):
    """onnx and onnx_ir refuse an external-data file with several hard links (a "hard-link
    attack"): the cache copies such files, and hard-links the rest."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from neodragon_npu.graphs import onnx_io

    work, other = tmp_path / "work", tmp_path / "other"
    work.mkdir()
    weight = numpy_helper.from_array(np.arange(64 * 64, dtype=np.float32).reshape(64, 64), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight])
    onnx.save(helper.make_model(graph), str(work / "m.onnx"), save_as_external_data=True,
              location="m.onnx.data", size_threshold=0)
    with StepCache(tmp_path / "c") as cache:
        cache.put("step", "k", work, [work / "m.onnx", work / "m.onnx.data"])
        assert (work / "m.onnx.data").stat().st_nlink == 1 and (work / "m.onnx").stat().st_nlink == 2
        cache.get("step", "k").place(other)
    assert (other / "m.onnx.data").stat().st_nlink == 1
    loaded = onnx_io.load(other / "m.onnx")
    np.testing.assert_array_equal(loaded.graph.initializers["w"].const_value.numpy(), numpy_helper.to_array(weight))
    onnx.load(str(other / "m.onnx"))  # onnx's own loader checks the links too


def test_a_changed_file_is_found_even_with_its_size_and_time_kept(tmp_path):
    work = tmp_path / "work"
    f = _write(work / "a.bin", b"0123456789")
    with StepCache(tmp_path / "c") as cache:
        cache.put("step", "k", work, [f], "meta")
    stored = tmp_path / "c" / "step" / "k" / "a.bin"
    stat = stored.stat()
    # the build directory's file is the entry's (a hard link): editing an output edits it
    assert os.path.samefile(stored, f)
    with open(f, "r+b") as fh:
        fh.seek(3)
        fh.write(b"X")
    os.utime(stored, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with StepCache(tmp_path / "c") as cache:
        assert cache.get("step", "k") is None  # detected, not used
    assert not (tmp_path / "c" / "step" / "k").exists()  # and removed, so the step runs again


def test_a_half_written_entry_is_never_found_and_is_cleared(tmp_path):
    debris = _write(tmp_path / "c" / "step" / ".tmp-x1" / "a.bin", b"partial")
    (tmp_path / "c" / "step" / "k").mkdir()  # a directory without its entry.json
    with StepCache(tmp_path / "c") as cache:
        assert cache.get("step", "k") is None
    assert not debris.parent.exists()


def test_one_build_at_a_time_holds_a_cache(tmp_path):
    with StepCache(tmp_path / "c"):
        with pytest.raises(CacheError, match="another build is using the cache"):
            StepCache(tmp_path / "c").__enter__()
        with pytest.raises(CacheError, match="a build is using the cache"):
            step_cache.clean(tmp_path / "c")


def test_keys_follow_options_and_file_contents(tmp_path):
    f = _write(tmp_path / "importance.json", b'{"a": 1}')
    base = step_key("export", load={"options": {"importance": f}}, fx_pipeline="optimized")
    assert base == step_key("export", load={"options": {"importance": f}}, fx_pipeline="optimized")
    assert base != step_key("export", load={"options": {"importance": f}}, fx_pipeline="baseline")
    assert base != step_key("samples", load={"options": {"importance": f}}, fx_pipeline="optimized")
    f.write_bytes(b'{"a": 2}')  # same path, other content
    assert base != step_key("export", load={"options": {"importance": f}}, fx_pipeline="optimized")


def test_unused_entries_go_oldest_first_past_twice_what_a_build_used(tmp_path):
    work = tmp_path / "work"
    with StepCache(tmp_path / "c") as cache:
        for i, key in enumerate(("old", "newer", "newest")):
            cache.put("step", key, work, [_write(work / f"{key}.bin", bytes(1000))])
            os.utime(tmp_path / "c" / "step" / key, (1000 + i, 1000 + i))
    with StepCache(tmp_path / "c") as cache:
        cache.put("step", "mine", work, [_write(work / "mine.bin", bytes(1000))])
        kept, removed = cache.evict_unused(keep_at_least=0)
    left = {e["key"] for e in step_cache.list_entries(tmp_path / "c")}
    assert left == {"mine", "newest"} and removed > 2000 and kept < 2500


def test_the_cache_command_reports_and_cleans(tmp_path, capsys):
    from neodragon_npu.tools.cli import main

    work = tmp_path / "work"
    with StepCache(tmp_path / "out.cache") as cache:
        cache.put("samples", "k", work, [_write(work / "s.npz", bytes(300_000))])
    assert main(["cache", "info", str(tmp_path / "out")]) == 0
    assert "samples" in capsys.readouterr().out
    assert main(["cache", "clean", str(tmp_path / "out.cache")]) == 0
    assert step_cache.list_entries(tmp_path / "out.cache") == []
    assert main(["cache", "info", str(tmp_path / "nothing")]) == 2


# builds --------------------------------------------------------------------------------
def _reused(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())["cache"]["reused"]


QUANTIZE_ONLY = BuildOptions(model="denoiser", config="tiny", until="quantize", calibration_samples=4, check_samples=2)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("cached") / "build"
    run_build(QUANTIZE_ONLY, out)
    return out


@pytest.mark.parametrize("change, reruns", [
    ({}, set()),
    ({"calibration_samples": 5}, {"samples", "float-check", "precision"}),
    ({"skip_passes": ("fuse_rms_norm",)}, {"export", "float-check", "precision"}),
    ({"weight_rounding": "nearest"}, {"precision"}),
    ({"seed": 1}, {"samples", "export", "float-check", "precision"}),
])
def test_a_change_reruns_exactly_the_steps_downstream_of_it(single, change, reruns):
    every = {"samples", "export", "float-check", "precision"}
    out = single.with_name(f"b{abs(hash(str(change)))}")
    run_build(QUANTIZE_ONLY.replace(**change, cache_dir=Path(f"{single}.cache")), out)
    assert set(_reused(out)) == every - reruns


def test_a_second_target_reuses_everything_before_its_compile(tmp_path):
    out = tmp_path / "b"
    first = BuildOptions(model="denoiser", config="tiny", until="compile", calibration_samples=4, check_samples=2)
    run_build(first, out)
    run_build(first.replace(targets=("sm8750", "x-elite")), out)
    assert _reused(out) == {"samples": 1, "export": 1, "float-check": 1, "precision": 1, "compile": 1}
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["graphs"][0]["binaries"]) == {"sm8750", "x-elite"}


def test_a_damaged_entry_is_rebuilt_to_the_same_result(single, tmp_path):
    out = tmp_path / "b"
    options = QUANTIZE_ONLY.replace(cache_dir=Path(f"{single}.cache"))
    run_build(options, out)
    qdq = next(out.glob("*_w8a16.onnx"))
    good = qdq.read_bytes()
    with open(qdq, "r+b") as fh:  # edits the cache entry through its hard link
        fh.seek(len(good) // 2)
        fh.write(bytes([good[len(good) // 2] ^ 0xFF]))
    run_build(options, out)
    assert "precision" not in _reused(out)
    assert qdq.read_bytes() == good


def _cli_build(out: Path, kill_at: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop(KILL_AT_ENV, None)
    if kill_at:
        env[KILL_AT_ENV] = kill_at
    args = ["build", "denoiser", "--config", "tiny", "--all-stages", "--target", ",".join(FAMILY.targets),
            "--calibration-samples", str(FAMILY.calibration_samples), "--partition-budget",
            str(FAMILY.partition_budget), "-o", str(out)]
    # the log goes to a file, not a pipe: a worker of the killed build that has not yet seen
    # its parent die would hold a pipe open, and reading it to its end would wait for that
    log = out.with_name(f"{out.name}.log")
    with open(log, "w") as f:
        run = subprocess.run([sys.executable, "-m", "neodragon_npu.tools.cli", *args], env=env,
                             stdout=subprocess.DEVNULL, stderr=f)
    return subprocess.CompletedProcess(run.args, run.returncode, "", log.read_text())


def test_a_build_killed_anywhere_resumes_to_the_uninterrupted_result(build, tmp_path):
    """SIGKILL after a step (samples), while an entry is being stored (export: the entry
    must not count), inside a step (partition 2's aimet pass) and after a compile; each
    run resumes where the last one stopped, and the end equals the build never killed."""
    reference, _ = build
    out = tmp_path / "resumed"
    runs = [  # (kill point, what this run's log must show reused, what it must not)
        ("sealed:samples", [], [r"the samples: reused"]),
        ("sealing:export", [r"the samples: reused"], [r"float partitions: reused"]),
        ("quantize:1:quantize_w8a16", [r"the samples: reused"], [r"float partitions: reused"]),
        ("sealed:compile", [r"float partitions: reused", r"partition 1/\d+: reused"], [r"partition 2/\d+: reused"]),
        (None, [r"partition 1/\d+: reused", r"context binary of partition \d+/\d+: reused"], []),
    ]
    for point, reused, not_reused in runs:
        run = _cli_build(out, point)
        for pattern in reused:
            assert re.search(pattern, run.stderr), (point, pattern, run.stderr[-3000:])
        for pattern in not_reused:
            assert not re.search(pattern, run.stderr), (point, pattern)
        if point is not None:
            assert run.returncode == -9, (point, run.stderr[-3000:])
            assert not out.exists()  # nothing half-written where the user looks
    assert run.returncode == 0, run.stderr[-3000:]
    diffs, text = compare_builds(reference, out)
    assert not diffs, text
    assert not list(tmp_path.glob(".resumed.partial-*"))  # what the killed runs left is gone
