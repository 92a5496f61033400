"""`neodragon-npu verify`: an all-stages build measured on fresh prompts."""

import json

import pytest

from neodragon_npu.tools.engine.artifacts import MANIFEST
from neodragon_npu.neodragon_models.specs import DENOISER

ALL_STAGES_MIN_SQNR_DB = DENOISER.family_min_sqnr_db


def test_verify_reproduces_the_builds_check_and_measures_fresh_prompts(build, capsys, caplog):
    """On the build's own check calls, `verify` must give the build's figures; on fresh
    prompts it gives its own, call by call."""
    from neodragon_npu.tools.engine import verify_build as vb
    from neodragon_npu.tools.cli import main

    out, result = build
    same = vb.verify_build(out, prompts=2, calls_per_prompt=1, first_seed=2000)  # the build's check calls
    assert same.calls == {s: ["prompt 2000 unit 1", "prompt 2001 unit 1"] for s in "012"}
    first = vb.verify_build(out, prompts=1, calls_per_prompt=1, float_chain=True, first_seed=2000)  # the build chains one
    for s in "012":
        assert same.sqnr_db["w8a16_cpu"][s] == pytest.approx(result.sqnr_db["w8a16_cpu"][s], abs=1e-6)
        assert first.sqnr_db["float_chain"][s] == pytest.approx(result.sqnr_db["float_chain"][s], abs=1e-6)
        assert min(same.per_call_db["w8a16_cpu"][s]) <= same.sqnr_db["w8a16_cpu"][s] <= max(same.per_call_db["w8a16_cpu"][s])

    assert main(["verify", str(out), "--prompts", "1", "--json", str(out.parent / "verify.json")]) == 0
    printed = capsys.readouterr().out
    fresh = json.loads((out.parent / "verify.json").read_text())
    assert fresh["prompts"] == [3000] and list(fresh["sqnr_db"]) == ["w8a16_cpu"]
    for s in ("0", "1", "2"):
        assert fresh["calls"][s] == [f"prompt 3000 unit {u}" for u in (1, 2, 3)]  # tiny: every one of its 3 units
        assert fresh["sqnr_db"]["w8a16_cpu"][s] >= ALL_STAGES_MIN_SQNR_DB
        assert f"{s}: {fresh['sqnr_db']['w8a16_cpu'][s]:6.2f} dB pooled over 3 call(s)" in printed

    # a chosen prompt, here the build's own check prompt: said not to be fresh
    assert main(["verify", str(out), "--first-seed", "2000", "--prompts", "2", "--calls-per-prompt", "1",
                 "--json", str(out.parent / "verify2000.json")]) == 0
    again = json.loads((out.parent / "verify2000.json").read_text())
    assert again["calls"]["0"] == ["prompt 2000 unit 1", "prompt 2001 unit 1"]
    assert again["sqnr_db"]["w8a16_cpu"]["0"] == round(same.sqnr_db["w8a16_cpu"]["0"], 2)
    assert "seeds 2000-2001 include the build's calibration (1000+) or check (2000+) samples" in caplog.text


def test_verify_refuses_what_is_not_an_all_stages_build(tmp_path, capsys):
    from neodragon_npu.tools.cli import main

    assert main(["verify", str(tmp_path)]) == 2
    assert "holds no manifest.json: not a build directory" in capsys.readouterr().err
    (tmp_path / MANIFEST).write_text(json.dumps({"tool": "neodragon-npu", "pipeline": "denoiser", "graphs": []}))
    assert main(["verify", str(tmp_path)]) == 2
    assert "single-graph build" in capsys.readouterr().err


def _has_int8(qdq_path) -> bool:
    import onnx

    return any(t.data_type == onnx.TensorProto.INT8 for t in onnx.load(str(qdq_path)).graph.initializer)


def _scale_weights(qdq_path, factor):
    """Multiply the scale of every int8 weight's DequantizeLinear in a QDQ file."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(qdq_path))
    inits = {t.name: t for t in model.graph.initializer}
    spoiled = {node.input[1] for node in model.graph.node if node.op_type == "DequantizeLinear"
               and node.input[0] in inits and inits[node.input[0]].data_type == onnx.TensorProto.INT8}
    assert spoiled, f"{qdq_path.name} holds no int8 weight"
    for name in spoiled:
        inits[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[name]) * np.float32(factor), name))
    onnx.save(model, str(qdq_path))


def test_per_partition_names_the_partition_that_loses(build, tmp_path, capsys):
    """Partition by partition, verify gives the same stage figures as the plain chains; with
    one partition's weights spoiled, that partition alone loses by itself, and the chain
    loses from it on."""
    import shutil

    from neodragon_npu.tools.engine import verify_build as vb
    from neodragon_npu.tools.cli import main

    out, _ = build
    plain = vb.verify_build(out, prompts=1, calls_per_prompt=1, float_chain=True)
    split = vb.verify_build(out, prompts=1, calls_per_prompt=1, per_partition=True)
    n = len(json.loads((out / MANIFEST).read_text())["partitions"])
    assert n >= 3
    for s in "012":
        for label in ("w8a16_cpu", "float_chain"):
            assert split.sqnr_db[label][s] == pytest.approx(plain.sqnr_db[label][s], abs=1e-6)
        losses = split.partitions[s]
        assert len(losses) == n
        assert losses[0].local_db == pytest.approx(losses[0].chain_db, abs=1e-9)  # the same inputs
        assert all(x.worst_local_db <= x.local_db + 1e-9 for x in losses)  # pooled lies between the tensors'
        assert losses[-1].worst_tensor == "noise_pred"

    spoiled = tmp_path / "spoiled"
    shutil.copytree(out, spoiled)
    manifest = json.loads((spoiled / MANIFEST).read_text())
    parts = sorted(manifest["partitions"], key=lambda p: p["index"])
    # the first partition after the first that holds int8 weights (the first blocks stay 16-bit)
    j = next(k for k in range(1, n - 1) if _has_int8(spoiled / parts[k]["graphs"]["0"]["qdq_model"]))
    _scale_weights(spoiled / parts[j]["graphs"]["0"]["qdq_model"], 1.25)
    bad = vb.verify_build(spoiled, prompts=1, calls_per_prompt=1, per_partition=True)
    good, worse = split.partitions["0"], bad.partitions["0"]
    assert worse[:j] == good[:j]
    assert worse[j].local_db < good[j].local_db - 10 and worse[j].chain_db < good[j].chain_db - 10
    assert all(w.chain_db < g.chain_db for w, g in zip(worse[j:], good[j:]))  # from it on
    assert all(w.local_db == pytest.approx(g.local_db, abs=1e-6) for w, g in zip(worse[j + 1:], good[j + 1:]))
    assert min(range(n), key=lambda k: worse[k].local_db) == j
    assert bad.partitions["1"] == split.partitions["1"] and bad.partitions["2"] == split.partitions["2"]

    assert main(["verify", str(spoiled), "--prompts", "1", "--calls-per-prompt", "1", "--per-partition",
                 "--json", str(tmp_path / "v.json")]) == 0
    printed = capsys.readouterr().out
    assert "0, partition by partition" in printed
    row = next(x for x in printed.splitlines() if x.strip().startswith(f"{j} ") and "dB" in x)
    assert f"{worse[j].local_db:6.2f} dB" in row and worse[j].worst_tensor in row
    saved = json.loads((tmp_path / "v.json").read_text())
    assert saved["partitions"]["0"][j]["local_db"] == round(worse[j].local_db, 2)
    assert list(saved["sqnr_db"]) == ["w8a16_cpu", "float_chain"]


def test_one_partition_runs_in_the_htp_simulator_beside_its_qdq_graph(build, tmp_path, capsys):
    """The HTP simulator and aimet's simulation of one partition, on the same float-chain
    inputs, agree to the precision of a W8A16 graph (a partition wired or read wrong gives
    near 0 dB)."""
    from neodragon_npu.tools.engine import verify_build as vb
    from neodragon_npu.tools.cli import main

    out, _ = build
    n = len(json.loads((out / MANIFEST).read_text())["partitions"])
    plain = vb.verify_build(out, prompts=1, calls_per_prompt=1, per_partition=True)
    checked = vb.verify_build(out, prompts=1, calls_per_prompt=1, htp_partition=1)
    assert checked.partitions == plain.partitions  # the rest of the run is unchanged
    for s in "012":
        c = checked.htp[s]
        assert c.partition == 1 and c.target == "sm8750"
        assert c.qdq_vs_float_db == pytest.approx(plain.partitions[s][1].local_db, abs=1e-6)
        assert c.htp_vs_float_db > 35 and c.htp_vs_qdq_db > 35
    assert main(["verify", str(out), "--prompts", "1", "--calls-per-prompt", "1", "--htp-partition", str(n),
                 ]) == 2
    assert f"--htp-partition {n}: the build has partitions 0-{n - 1}" in capsys.readouterr().err
    assert main(["verify", str(out), "--prompts", "1", "--calls-per-prompt", "1", "--htp-partition", "1",
                 "--json", str(tmp_path / "h.json")]) == 0
    assert "partition 1 in the sm8750 HTP simulator" in capsys.readouterr().out
    saved = json.loads((tmp_path / "h.json").read_text())["htp_partition"]["0"]
    assert saved["partition"] == 1 and saved["htp_vs_qdq_db"] == round(checked.htp["0"].htp_vs_qdq_db, 2)
