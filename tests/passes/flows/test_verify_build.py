"""`neodragon-npu verify`: an all-stages build measured on fresh prompts."""

import json

import pytest

from graphs.artifacts import MANIFEST
from passes.flows.denoiser_stages import ALL_STAGES_MIN_SQNR_DB


def test_verify_reproduces_the_builds_check_and_measures_fresh_prompts(build, monkeypatch, capsys):
    """On the build's own check calls, `verify` must give the build's figures; on fresh
    prompts it gives its own, call by call."""
    from passes.flows import verify_build as vb
    from tools.cli import main

    out, result = build
    monkeypatch.setattr(vb, "FIRST_SEED", 2000)  # the build's check prompt: units 1 and 2
    same = vb.verify_build(out, prompts=1, calls_per_prompt=2)
    assert same.calls == {s: [(2000, 1), (2000, 2)] for s in range(3)}
    first = vb.verify_build(out, prompts=1, calls_per_prompt=1, float_chain=True)  # the build chains one call
    for s in range(3):
        assert same.sqnr_db["w8a16_cpu"][s] == pytest.approx(result.sqnr_db["w8a16_cpu"][s], abs=1e-6)
        assert first.sqnr_db["float_chain"][s] == pytest.approx(result.sqnr_db["float_chain"][s], abs=1e-6)
        assert min(same.per_call_db["w8a16_cpu"][s]) <= same.sqnr_db["w8a16_cpu"][s] <= max(same.per_call_db["w8a16_cpu"][s])
    monkeypatch.undo()

    assert main(["verify", str(out), "--prompts", "1", "--json", str(out.parent / "verify.json")]) == 0
    printed = capsys.readouterr().out
    fresh = json.loads((out.parent / "verify.json").read_text())
    assert fresh["prompts"] == [3000] and list(fresh["sqnr_db"]) == ["w8a16_cpu"]
    for s in ("0", "1", "2"):
        assert fresh["calls"][s] == [[3000, u] for u in (1, 2, 3)]  # tiny: every one of its 3 units
        assert fresh["sqnr_db"]["w8a16_cpu"][s] >= ALL_STAGES_MIN_SQNR_DB
        assert f"stage {s}: {fresh['sqnr_db']['w8a16_cpu'][s]:6.2f} dB pooled over 3 call(s)" in printed


def test_verify_refuses_what_is_not_an_all_stages_build(tmp_path, capsys):
    from tools.cli import main

    assert main(["verify", str(tmp_path)]) == 2
    assert "holds no manifest.json: not a build directory" in capsys.readouterr().err
    (tmp_path / MANIFEST).write_text(json.dumps({"tool": "neodragon-npu", "mode": "single-stage"}))
    assert main(["verify", str(tmp_path)]) == 2
    assert "single-stage build" in capsys.readouterr().err
