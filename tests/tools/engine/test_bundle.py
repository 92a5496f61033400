"""``build neodragon`` and ``generate`` on the tiny system, end to end in the HTP simulator:
a build killed inside the float pipeline resumes at its phase, and one killed after its
first graph resumes from the cache (the ``tiny_bundle`` fixture, tests/conftest.py), the bundle validates against its schema, the generated video follows
the float pipeline frame by frame, and bad bundles are refused with one line before any
work."""

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from neodragon_npu.neodragon_models.host.loop import GRAPH_IDS, PHASES, Loop
from neodragon_npu.neodragon_models.system import SYSTEMS, get_system, host_section, pos_table
from neodragon_npu.tools.engine.build import plan_build
from neodragon_npu.tools.engine.bundle import (CHECK_PROMPTS, CHECK_SEED, FloatGraphs, Recorder, _prompts,
                                               _unit_options, format_bundle, recorded, units)
from neodragon_npu.tools.runtime.bundle import BundleError, open_bundle
from neodragon_npu.tools.runtime.schema import MANIFEST_SCHEMA

LONG_PROMPT = "a red fox trotting through fresh snow at dawn while the wind lifts powder off the ridge"


def test_a_kill_inside_the_float_pipeline_resumes_at_its_phase(tiny_bundle, tmp_path):
    out, in_pipeline, killed, _ = tiny_bundle
    assert "calibration prompts, denoise: 4/4" in in_pipeline and "prompts, decode" not in in_pipeline
    for phase in ("text", "first_frame", "encode", "denoise"):
        assert f"the float pipeline's {phase} phase: reused" in killed
    assert "prompts, text" not in killed and "calibration prompts, decode: 1/4" in killed
    # the phases after the kill went on from the prompts as stored: the check prompt's
    # recorded decoder calls are what one uninterrupted float loop makes
    system = get_system("tiny")
    host, tables = host_section(system, pos_table(system))
    fresh = Recorder(FloatGraphs(system, 0), tmp_path, references=True)
    Loop(host, tables, fresh).run(_prompts(CHECK_PROMPTS, system.check_prompts, CHECK_SEED), PHASES[:-1])
    stored = {p.parent.parent for p in (out.parent / "tiny.cache").rglob("check/decoder_next-*.npz")}
    assert len(stored) == 1
    for gid in ("decoder_first", "decoder_next"):
        want, got = recorded(tmp_path, gid), recorded(next(iter(stored)) / "check", gid)
        assert len(want) == len(got) > 0
        for w, g in zip(want, got):
            assert w.keys() == g.keys()
            for k in w:
                np.testing.assert_allclose(g[k], w[k], rtol=1e-5, atol=1e-5, err_msg=f"{gid} {k}")


def test_a_killed_bundle_build_resumes_from_its_cache(tiny_bundle):
    out, _, killed, resumed = tiny_bundle
    assert "[bundle 2/10] clip-g" not in killed
    for phase in PHASES:
        assert f"the float pipeline's {phase} phase: reused" in resumed
    assert "which a killed command left" in resumed  # its staging directory removed
    reused = {u: json.loads((out / "graphs" / u / "manifest.json").read_text())["cache"]["reused"]
              for u in ("clip-l", "clip-g", "quicksrnet")}
    assert reused["clip-l"].get("precision") == 1 and reused["clip-l"].get("compile") == 1
    assert reused["clip-g"] == {} and reused["quicksrnet"] == {}
    assert not list(out.parent.glob(".tiny.partial-*"))


def test_the_bundle_manifest_follows_its_schema_and_names_every_graph(tiny_bundle):
    out = tiny_bundle[0]
    manifest = json.loads((out / "manifest.json").read_text())
    jsonschema.validate(manifest, MANIFEST_SCHEMA)
    assert set(manifest["graphs"]) == set(GRAPH_IDS)
    opened = open_bundle(out, runtime="htp")
    assert opened.manifest["targets"][0]["name"] == "sm8750"
    for gid, g in manifest["graphs"].items():
        assert g["fidelity"]["passed"], gid
        assert all(i["shape"] and i["dtype"] for i in g["inputs"]), gid
    # the precisions the specs give: FP16 text encoders, W8A16 for the rest
    assert {g: manifest["graphs"][g]["precision"] for g in ("clip_l", "dt5", "unet", "sr")} == \
        {"clip_l": "fp16", "dt5": "fp16", "unet": "w8a16", "sr": "w8a16"}
    # the loop's constants an app needs: the history layout of the last unit's stage 2 call
    video = manifest["loop"]["video"]
    last = video["calls"][f"{video['denoised_units'][-1]},2"]
    assert [c["level"] for c in last["clips"]] == [0, 1, 2, 2] and last["pad_tokens"] == 0
    assert not (out / "samples").exists()  # the calibration data stays in the cache
    ok = subprocess.run([sys.executable, "-m", "neodragon_npu.tools.cli", "validate-bundle", str(out)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "a valid neodragon-bundle/1 bundle" in ok.stdout


def test_generate_in_the_htp_simulator_follows_the_float_pipeline(tiny_bundle, tmp_path):
    from neodragon_npu.tools.engine.generate import generate

    out = tiny_bundle[0]
    result = generate(LONG_PROMPT, out, tmp_path / "fox.mp4", runtime="htp", compare_float=True)
    assert result.frames == 25 == len(result.frame_psnr_db)
    assert min(result.frame_psnr_db) >= 30.0, result.frame_psnr_db
    assert result.warnings and "cut off" in result.warnings[0]  # the prompt is longer than the encoders take
    assert any("synthetic weights" in n for n in result.notes)
    for path in (result.video, result.float_video, result.contact_sheet, result.psnr_plot, result.first_frame):
        assert path.is_file() and path.stat().st_size > 0, path
    assert result.video.suffix in (".mp4", ".gif")


def _copy(bundle_dir: Path, dst: Path, edit=None) -> Path:
    """A bundle whose files link to ``bundle_dir``'s, with the manifest edited."""
    dst.mkdir()
    for item in bundle_dir.iterdir():
        if item.name != "manifest.json":
            (dst / item.name).symlink_to(item.absolute())
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    if edit is not None:
        edit(manifest)
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["graphs"].pop("denoiser_stage1"), "the bundle has no denoiser_stage1 graph"),
    (lambda m: m["loop"]["video"].pop("stages"), "does not follow neodragon-bundle/1: loop/video: 'stages' is a "
                                                 "required property"),
    (lambda m: m["graphs"]["sr"]["binaries"]["sm8750"].update(epcontext_model="graphs/quicksrnet/gone.onnx"),
     "the bundle's sr graph is missing graphs/quicksrnet/gone.onnx"),
    (lambda m: m.update(output="build"), "holds a build output of neodragon-npu, not a bundle"),
])
def test_a_bad_bundle_is_refused_in_one_line_before_any_work(tiny_bundle, tmp_path, edit, message):
    out = tiny_bundle[0]
    bad = _copy(out, tmp_path / "bad", edit)
    with pytest.raises(BundleError, match=message.replace("(", r"\(").replace(")", r"\)")):
        open_bundle(bad)
    run = subprocess.run([sys.executable, "-m", "neodragon_npu.tools.cli", "generate", "a fox", "--bundle", str(bad),
                          "-o", str(tmp_path / "v.mp4")], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[0].startswith("neodragon-npu: error: ")
    assert message.split(":")[0] in run.stderr and "Traceback" not in run.stderr
    assert not list(tmp_path.glob("v*"))  # nothing written


def test_a_bundle_for_another_target_or_arch_is_refused(tiny_bundle):
    out = tiny_bundle[0]
    with pytest.raises(BundleError, match="built for sm8750, not x-elite: build it with --target x-elite"):
        open_bundle(out, target="x-elite")
    with pytest.raises(BundleError, match="for HTP v79, and this device's HTP is v73"):
        open_bundle(out, arch=73)
    with pytest.raises(BundleError, match="holds no manifest.json: not a bundle"):
        open_bundle(out / "graphs")


def test_the_cpu_runtime_runs_the_deployed_graphs(tiny_bundle, tmp_path):
    """--runtime cpu-qdq: the QDQ and FP16 graphs on the CPU follow the float pipeline too."""
    from neodragon_npu.tools.engine.generate import generate

    out = tiny_bundle[0]
    result = generate("a fox", out, tmp_path / "cpu.mp4", runtime="cpu-qdq", seed=7, compare_float=True)
    assert result.warnings == []
    assert len(result.frame_psnr_db) == 25 and min(result.frame_psnr_db) >= 30.0, result.frame_psnr_db


@pytest.mark.parametrize("system", sorted(SYSTEMS))
def test_every_build_of_each_system_is_planned_before_any_work(system, tmp_path):
    # a system's per-model options go through the same checks as the CLI's flags
    sys_ = SYSTEMS[system]
    plans = {u.name: plan_build(_unit_options(u, sys_, ("sm8750",), 0, tmp_path, True)) for u in units(sys_)}
    for unit in units(sys_):
        assert plans[unit.name].options.config == sys_.config(unit.model)
        for option, value in sys_.build_options.get(unit.model, {}).items():
            assert getattr(plans[unit.name].options, option) == value


def test_the_bundle_report_gives_memory_in_the_units_of_the_step_lines(tiny_bundle):
    manifest = json.loads((tiny_bundle[0] / "manifest.json").read_text())
    manifest["build"]["peak_rss_bytes"] = 20_390_000_000  # GB of 10^9 bytes, as each step's line says
    assert "peak RSS 20.39 GB" in format_bundle(manifest)


def test_on_the_cpu_one_family_graph_is_open_at_a_time(tiny_bundle):
    from neodragon_npu.tools.runtime.bundle import BundleGraphs

    graphs = BundleGraphs(open_bundle(tiny_bundle[0], runtime="cpu-qdq"), "cpu-qdq")
    graphs.enter("denoise")
    assert not graphs.sessions  # opened when the loop first calls them
    graphs["denoiser_stage0"], graphs["denoiser_stage1"]
    assert list(graphs.sessions) == ["denoiser_stage1"]
    graphs.leave("denoise")
    graphs.enter("text")  # single graphs open with their phase, as on the HTP
    assert set(graphs.sessions) == {"clip_l", "clip_g", "dt5"}
