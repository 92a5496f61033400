"""All three tiny stage graphs: partitioned, quantized per partition, shared-weight binaries."""

import copy
import json
import re
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import onnx
import pytest
import torch

from neodragon_npu.graphs import onnx_io, qnn
from neodragon_npu.tools.engine.artifacts import MANIFEST
from neodragon_npu.tools.engine.forked import Forked
from neodragon_npu.graphs.feeds import load_samples
from neodragon_npu.graphs.targets import get_target
from neodragon_npu.graphs.verify import sqnr_db
from neodragon_npu.graphs import chain
from neodragon_npu.graphs.feeds import save_samples
from neodragon_npu.neodragon_models.spec import SamplePlan
from neodragon_npu.neodragon_models.specs import DENOISER
from neodragon_npu.tools.engine.build import build as run_build
from neodragon_npu.tools.engine.compile_pool import Compiler, PartTimer, compile_workers, worker_result
from neodragon_npu.tools.engine.family import CutPlan, _export_forked, export_graph, gptq_sample_indices
from neodragon_npu.tools.engine.options import BuildOptions, plan_build

from .conftest import FAMILY

MIN_SQNR_DB = DENOISER.min_sqnr_db
ALL_STAGES_MIN_SQNR_DB = DENOISER.family_min_sqnr_db


def test_every_stage_passes_in_the_simulator_and_in_aimet(build):
    _, result = build
    for kind in ("htp_simulator", "w8a16_cpu"):
        assert all(v >= ALL_STAGES_MIN_SQNR_DB for v in result.sqnr_db[kind].values()), kind
    assert result.sqnr_db["htp_simulator"]["2"] >= MIN_SQNR_DB  # the demo's stage-2 bar
    assert all(v > 100 for v in result.sqnr_db["float_chain"].values())  # partitions chain exactly


def test_partitions_share_weights_and_one_binary_per_target(build):
    out, _ = build
    manifest = json.loads((out / MANIFEST).read_text())
    parts = manifest["partitions"]
    assert len(parts) >= 2
    for part in parts:
        k = part["index"]
        inits = [set(onnx_io.load(out / g["qdq_model"]).graph.initializers) for g in part["graphs"].values()]
        # the content-named weights of rank 2 and up (name_weights_by_content)
        weights = [{n for n in names if re.fullmatch(r"w_\d+(x\d+)+_[0-9a-f]+", n)} for names in inits]
        assert weights[0] and weights[0] == weights[1] == weights[2]  # partition k holds the same weights everywhere
        for target in ("sm8750", "x-elite"):
            bins = {g["binaries"][target]["binary"] for g in part["graphs"].values()}
            assert len(bins) == 1 and (out / bins.pop()).is_file()
        assert part["graphs"]["2"]["inputs"] and part["graphs"]["2"]["outputs"]
    for entry in manifest["files"]:
        assert (out / entry["path"]).stat().st_size == entry["bytes"]
    assert manifest["verification"]["gate"]["passed"]
    # where each partition's quantization time went, and the sum in the report
    assert len(manifest["quantize_seconds"]) == len(parts)
    assert all({"GPTQ statistics", "aimet", "QDQ chain"} <= set(t) for t in manifest["quantize_seconds"])
    report = (out / "report.txt").read_text()
    assert "Quantization time (all partitions): GPTQ statistics" in report
    # the machine, and each step's CPU time next to its wall time
    assert manifest["host"]["cpus"] >= 1 and f"Host: {manifest['host']['cpu']}" in report
    first = manifest["steps"][0]
    line = next(x for x in report.splitlines() if x.strip().startswith(first["step"]))
    assert first["cpu_seconds"] > 0 and re.search(r" s  CPU +\d+ s  peak RSS", line)


def test_weight_encodings_are_identical_across_stages(build):
    out, _ = build
    enc = [json.loads((out / f"stage{s}_part1_w8a16.encodings").read_text()) for s in range(3)]
    params = [{e["name"]: e for e in x["param_encodings"]} for x in enc]
    assert params[0] == params[1] == params[2]
    acts = [{e["name"]: e["scale"] for e in x["activation_encodings"]} for x in enc]
    assert acts[0] != acts[2]  # activations are calibrated per stage


def test_chained_non_shared_binaries_reproduce_the_check(build):
    out, _ = build
    target = get_target("sm8750")
    sample = load_samples(out / "stage2_check_samples.npz")[0]
    ref = sample.pop("noise_pred_fp32")
    env = dict(sample)
    k = 0
    while (out / "htp_check" / f"stage2_part{k}_ctx.onnx").exists():
        session = qnn.htp_session(out / "htp_check" / f"stage2_part{k}_ctx.onnx", target)
        names = [o.name for o in session.get_outputs()]
        env.update(zip(names, qnn.run(session, {i.name: env[i.name] for i in session.get_inputs()})))
        k += 1
    assert k >= 2 and sqnr_db(ref, env["noise_pred"]) >= ALL_STAGES_MIN_SQNR_DB
    assert np.isfinite(env["noise_pred"]).all()



def test_gptq_rounded_weights_are_shared_and_on_the_int8_grid(build):
    from neodragon_npu.graphs.quant import gptq
    from neodragon_npu.graphs.onnx_edit import const_array, weight_values

    out, _ = build
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["quantization"]["weight_rounding"] == "gptq"
    assert manifest["quantization"]["gptq_target"] == "quantized"
    moved = 0
    for k in range(len(manifest["partitions"])):
        float_model = onnx_io.load(out / f"stage2_part{k}_float.onnx")
        qdq = [weight_values(onnx_io.load(out / f"stage{s}_part{k}_w8a16.onnx")) for s in range(3)]
        for site in gptq.weight_sites(float_model, manifest["quantization"]["high_precision"]):
            values = [q[site.weight] for q in qdq if site.weight in q]
            assert len(values) == 3
            np.testing.assert_array_equal(values[0], values[2])
            np.testing.assert_array_equal(values[1], values[2])
            w = const_array(float_model.graph.initializers[site.weight])
            w_kn, q_kn = (w.T, values[2].T) if site.transposed else (w, values[2])
            assert gptq.on_grid(q_kn)
            np.testing.assert_allclose(gptq.channel_scales(q_kn), gptq.channel_scales(w_kn), rtol=1e-5)
            moved += not np.array_equal(q_kn, gptq.round_to_nearest(w_kn))
    assert moved > 0  # GPTQ chose other integers than round-to-nearest for some weights


def test_cpu_check_matches_the_chained_qdq_files_and_stage_graphs_are_dropped(build):
    out, result = build
    manifest = json.loads((out / MANIFEST).read_text())
    for s in range(3):
        assert not (out / f"stage{s}_float.onnx").exists()  # the partitions replace it
        samples = load_samples(out / f"stage{s}_check_samples.npz")
        refs = [x.pop("noise_pred_fp32") for x in samples]
        qdq = [out / g["graphs"][str(s)]["qdq_model"] for g in manifest["partitions"]]
        outs = [o[0] for o in chain.run_chain(qdq, samples, ["noise_pred"])]
        assert abs(sqnr_db(np.concatenate([r.ravel() for r in refs]), np.concatenate([o.ravel() for o in outs]))
                   - result.sqnr_db["w8a16_cpu"][str(s)]) < 0.01
    assert all(step["peak_rss_bytes"] > 0 for step in manifest["steps"])


def test_float_target_gptq_moves_later_partitions_only(tmp_path, caplog):
    """--gptq-target float: the first partition's inputs are exact (nothing to absorb), so
    its weights equal plain GPTQ's; later partitions' weights move, stay on the grid and
    stay shared by the three stages."""
    from neodragon_npu.graphs.quant import gptq
    from neodragon_npu.graphs.onnx_edit import weight_values

    weights = {}
    for target in ("quantized", "float"):
        opts = FAMILY.replace(targets=("sm8750",), gptq_target=target, verify_htp=False, layer_report=False,
                              min_sqnr_db=0.0, until="quantize")
        out = tmp_path / target
        caplog.clear()
        with caplog.at_level("INFO", logger="neodragon_npu"):
            run_build(opts, out)
        # the steps are numbered out of the count that runs: the last is n/n
        numbers = [tuple(map(int, m.groups())) for r in caplog.records
                   for m in [re.match(r"\[(\d+)/(\d+)\] .* \.\.\.$", r.getMessage())] if m]
        assert numbers[-1][0] == numbers[-1][1] == len(numbers) and {n for _, n in numbers} == {len(numbers)}
        manifest = json.loads((out / MANIFEST).read_text())
        assert manifest["quantization"]["gptq_target"] == target
        weights[target] = {
            (s, k): {n: v for n, v in weight_values(onnx_io.load(out / f"stage{s}_part{k}_w8a16.onnx")).items()
                     if n.startswith("w_")}
            for s in range(3) for k in range(len(manifest["partitions"]))
        }
    plain, aimed = weights["quantized"], weights["float"]
    for name, value in aimed[2, 0].items():
        np.testing.assert_array_equal(value, plain[2, 0][name])
    later = sorted({k for _, k in aimed if k > 0})
    int8 = {(k, n) for k in later for n, v in plain[2, k].items()
            if v.ndim == 2 and (gptq.on_grid(v) or gptq.on_grid(v.T))}  # 16-bit weights are not GPTQ's
    moved = [(k, n) for k, n in sorted(int8) if not np.array_equal(aimed[2, k][n], plain[2, k][n])]
    assert moved
    for k, name in moved:
        np.testing.assert_array_equal(aimed[0, k][name], aimed[2, k][name])
        assert gptq.on_grid(aimed[2, k][name]) or gptq.on_grid(aimed[2, k][name].T), name


def test_gptq_samples_come_from_every_prompt_in_turn():
    # 8 calibration calls: 6 of the first prompt, then 2 of the second
    # two prompts (calls 0-5 and 6-7): each one's latest unit, then the one before
    assert gptq_sample_indices(8, 6, 2) == [5, 7]
    assert gptq_sample_indices(8, 6, 5) == [5, 7, 4, 6, 3]
    assert gptq_sample_indices(4, 6, 2) == [3, 2]  # one prompt: its latest calls
    assert gptq_sample_indices(3, 1, 9) == [0, 1, 2]  # never more than there are


def test_first_block_patterns_pick_exactly_the_linears_of_those_blocks(build):
    import onnx_ir as ir

    from neodragon_npu.graphs.onnx_edit import const_array, matches_any
    from neodragon_npu.neodragon_models.configs import get_denoiser_config
    from neodragon_npu.neodragon_models.denoiser import build_denoiser
    from neodragon_npu.passes.pipelines import first_blocks_patterns

    out, _ = build
    blocks = build_denoiser(get_denoiser_config("tiny"), seed=FAMILY.seed).transformer.transformer_blocks
    linears = {}  # weight as the export stores it ([in, out]) -> (block, module)
    for b, block in enumerate(blocks):
        for name, module in block.named_modules():
            if isinstance(module, torch.nn.Linear) and "norm" not in name:
                linears[module.weight.detach().numpy().T.tobytes()] = (b, name)
    # q and k rows are permuted and scaled offline (RoPE layout, folded 1/sqrt(d)), so only
    # the other Linears can be recognised by their weights
    rotated = ("attn.to_q", "attn.to_k", "attn.add_q_proj", "attn.add_k_proj")
    models = [ir.load(p) for p in sorted(out.glob("stage2_part*_float.onnx"))]
    assert len(blocks) == 3
    for count in (1, 2, 3):  # 4 on the full-size model: blocks 0-3
        patterns = first_blocks_patterns(count)
        found, by_name = set(), []
        for model in models:
            for node in model.graph:
                w = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) > 1 else None
                if w is not None and w.is_initializer() and matches_any(node, patterns):
                    hit = linears.get(const_array(w).tobytes())
                    if hit is None:
                        by_name.append(node.name)
                    else:
                        found.add(hit)
        expected = {(b, n) for b, n in linears.values() if b < count and not n.startswith(rotated)}
        assert found == expected
        assert len(by_name) == 4 * count and all(n.split("/")[1].startswith(("to_q", "to_k", "add_q", "add_k")) for n in by_name)


def test_context_adapter_patterns_pick_exactly_its_linears(build):
    import onnx_ir as ir

    from neodragon_npu.graphs.onnx_edit import const_array, matches_any
    from neodragon_npu.neodragon_models.configs import get_denoiser_config
    from neodragon_npu.neodragon_models.denoiser import build_denoiser
    from neodragon_npu.passes.pipelines import CONTEXT_ADAPTER_PATTERNS, DENOISER_HIGH_PRECISION

    out, _ = build
    adapter = build_denoiser(get_denoiser_config("tiny"), seed=FAMILY.seed).context_adapter
    expected = {m.weight.detach().numpy().tobytes() for m in adapter.modules() if isinstance(m, torch.nn.Linear)}
    assert expected and set(CONTEXT_ADAPTER_PATTERNS) <= set(DENOISER_HIGH_PRECISION)
    found = set()
    for path in sorted(out.glob("stage2_part*_float.onnx")):
        for node in ir.load(path).graph:
            w = node.inputs[1] if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1 else None
            if w is not None and w.is_initializer() and matches_any(node, CONTEXT_ADAPTER_PATTERNS):
                value = const_array(w)  # [in, out] for MatMul, either way round for Gemm
                found.add(next((b for b in (value.T.tobytes(), value.tobytes()) if b in expected), node.name))
    assert found == expected


def test_check_calls_come_from_the_check_prompts_in_turn(monkeypatch):
    """Two check calls from two prompts: unit 1 of each, and no rollout runs further."""
    from neodragon_npu.neodragon_models.specs import denoiser as denoiser_spec

    ran = {}
    real = denoiser_spec.collect_samples

    def recording(*args, units_per_prompt=None, **kwargs):
        ran.update(units_per_prompt)
        return real(*args, units_per_prompt=units_per_prompt, **kwargs)

    monkeypatch.setattr(denoiser_spec, "collect_samples", recording)
    plan = plan_build(FAMILY)
    model = DENOISER.load(plan.load)
    graphs = [g for g in plan.graphs if g.manifest_key in ("0", "2")]
    samples = DENOISER.samples(model, graphs, SamplePlan(calibration=4, check=2, family=True))
    assert ran == {1000: 3, 1001: 1, 2000: 1, 2001: 1}  # tiny: 3 units per prompt
    for s in ("stage0", "stage2"):
        assert samples.check_labels[s] == ["prompt 2000 unit 1", "prompt 2001 unit 1"]
        assert len(samples.calibration[s]) == 4 and "noise_pred_fp32" in samples.check[s][0]
    samples = DENOISER.samples(model, graphs[:1], SamplePlan(calibration=1, check=3, family=True))
    assert samples.check_labels["stage0"] == ["prompt 2000 unit 1", "prompt 2001 unit 1", "prompt 2000 unit 2"]


def test_a_forked_stage_export_writes_what_an_export_here_writes(tmp_path):
    plan = plan_build(FAMILY)
    denoiser = DENOISER.load(plan.load)
    stage2, stage1 = (next(g for g in plan.graphs if g.manifest_key == k) for k in ("2", "1"))

    def weights():
        return {f"{m}.{n}": t for m in ("transformer", "context_adapter")
                for n, t in getattr(denoiser, m).state_dict().items()}

    before = {name: t.clone() for name, t in weights().items()}
    here, there = tmp_path / "here", tmp_path / "there"
    samples = DENOISER.samples(denoiser, [stage1], SamplePlan(calibration=1, check=1, family=True))
    for work in (here, there):
        work.mkdir()
        save_samples(work / "stage1_check_samples.npz", samples.check["stage1"])
    cuts = CutPlan(plan.partition_budget)
    export_graph(plan, stage2, lambda: copy.deepcopy(denoiser), here, cuts.decide)  # sets the cuts, as in a build
    stats, paths = export_graph(plan, stage1, lambda: copy.deepcopy(denoiser), here, cuts.follow)
    assert len(paths) > 1
    fork = Forked("the stage-1 export", _export_forked, plan, stage1, denoiser, there)
    fork.send(cuts.weights)  # the cuts, as the parent's export of the lead graph gives them
    forked_stats, forked_paths, seconds, float_chain_db = fork.result()
    assert forked_stats == stats and [p.name for p in forked_paths] == [p.name for p in paths] and seconds > 0
    for a, b in zip(paths, forked_paths):  # the same graphs; the initializers may come in another order
        ours, theirs = onnx.load(str(a)), onnx.load(str(b))
        assert list(ours.graph.node) == list(theirs.graph.node)
        assert list(ours.graph.input) == list(theirs.graph.input) and list(ours.graph.output) == list(theirs.graph.output)
        assert ({t.name: t.SerializeToString() for t in ours.graph.initializer}
                == {t.name: t.SerializeToString() for t in theirs.graph.initializer})
    assert float_chain_db > 100  # the float partitions chained reproduce the PyTorch output
    # the forked export's FX passes edited the child's copy of the model, not this one
    after = weights()
    assert after.keys() == before.keys() and all(torch.equal(after[n], t) for n, t in before.items())
