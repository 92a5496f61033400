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
from neodragon_npu.tools.engine.single import MIN_SQNR_DB, load_denoiser
from neodragon_npu.tools.engine.family import (
    ALL_STAGES_MIN_SQNR_DB,
    AllStagesOptions,
    _background_worker,
    _Compiler,
    _CutPlan,
    _export_forked,
    _export_stage,
    _Parts,
    _run_chain,
    _worker_result,
    _write_stage_samples,
    build_denoiser_stages,
    gptq_sample_indices,
)


def test_every_stage_passes_in_the_simulator_and_in_aimet(build):
    _, result = build
    for kind in ("htp_simulator", "w8a16_cpu"):
        assert all(v >= ALL_STAGES_MIN_SQNR_DB for v in result.sqnr_db[kind].values()), kind
    assert result.sqnr_db["htp_simulator"][2] >= MIN_SQNR_DB  # the demo's stage-2 bar
    assert all(v > 100 for v in result.sqnr_db["float_chain"].values())  # partitions chain exactly


def test_partitions_share_weights_and_one_binary_per_target(build):
    out, _ = build
    manifest = json.loads((out / MANIFEST).read_text())
    parts = manifest["partitions"]
    assert len(parts) >= 2
    for part in parts:
        k = part["index"]
        inits = [set(onnx_io.load(out / g["qdq_model"]).graph.initializers) for g in part["graphs"].values()]
        weights = [{n for n in names if "transformer" in n or "MatMul" in n} for names in inits]
        assert weights[0] == weights[1] == weights[2]  # partition k holds the same weights everywhere
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
    float_model = onnx_io.load(out / "stage2_part1_float.onnx")
    qdq = [weight_values(onnx_io.load(out / f"stage{s}_part1_w8a16.onnx")) for s in range(3)]
    moved = 0
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
        outs = _run_chain(qdq, samples)
        assert abs(sqnr_db(np.concatenate([r.ravel() for r in refs]), np.concatenate([o.ravel() for o in outs]))
                   - result.sqnr_db["w8a16_cpu"][s]) < 0.01
    assert all(step["peak_rss_bytes"] > 0 for step in manifest["steps"])


def test_a_dead_worker_process_is_reported_in_one_sentence():
    future = Future()
    future.set_exception(BrokenProcessPool("A child process terminated abruptly"))
    with pytest.raises(RuntimeError, match="worker process died while compiling partition 3"):
        _worker_result(future, "compiling partition 3 for sm8750")


def test_an_interrupted_build_does_not_wait_for_the_worker():
    """Ctrl-C (or an error) while the worker runs a long task stops the worker at once."""
    import time

    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        with _background_worker() as worker:
            running = worker.submit(time.sleep, 120)
            while not running.running():
                time.sleep(0.05)
            time.sleep(0.5)  # the worker is inside the task
            raise KeyboardInterrupt
    assert time.perf_counter() - start < 60
    assert running.done()


def test_each_compile_runs_in_a_fresh_worker_process():
    """A worker exits after one job (the QNN compiler keeps its memory otherwise), so two
    jobs in turn run in two processes, neither of them this one."""
    import os

    with _background_worker() as worker:
        first = worker.submit(os.getpid).result(60)
        second = worker.submit(os.getpid).result(60)
    assert len({first, second, os.getpid()}) == 3


def test_compile_workers_preload_the_allocator(monkeypatch):
    """The QNN compiler runs about a fifth faster on jemalloc: the workers load it, this
    process does not, and the environment is as it was afterwards."""
    import os
    from pathlib import Path

    library = qnn.compile_allocator()
    if library is None:
        pytest.skip("no jemalloc or tcmalloc on this machine (make setup unpacks jemalloc into .venv)")
    before = os.environ.get("LD_PRELOAD")
    maps = Path("/proc/self/maps").read_text
    with _background_worker() as worker:
        assert worker.allocator == library
        assert Path(library).name in worker.submit(maps).result(60)
    assert Path(library).name not in maps()
    assert os.environ.get("LD_PRELOAD") == before
    monkeypatch.setenv(qnn.ALLOCATOR_ENV, "glibc")
    with _background_worker() as worker:
        assert worker.allocator is None
        assert Path(library).name not in worker.submit(maps).result(60)


def test_compiles_run_one_at_a_time_until_widened():
    """While the build quantizes, one compile at a time (one core each); widened, two."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    lock, running, most = threading.Lock(), [0], [0]
    release = threading.Event()

    def job(x):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        release.wait(10)
        with lock:
            running[0] -= 1
        if x == "bad":
            raise ValueError("compile failed")
        return x * 2

    with ThreadPoolExecutor(max_workers=4) as pool:
        compiler = _Compiler(pool)
        assert not compiler.busy
        futures = [compiler.submit(job, x) for x in (1, 2, 3, "bad")]
        time.sleep(0.3)
        assert most[0] == 1 and futures[0].running() and not futures[1].running()
        assert compiler.busy  # the build's quantization then limits itself to one thread
        compiler.widen()
        time.sleep(0.3)
        assert most[0] == 2 and futures[1].running() and not futures[2].running()
        release.set()
        assert [f.result(10) for f in futures[:3]] == [2, 4, 6]
        with pytest.raises(ValueError, match="compile failed"):
            futures[3].result(10)
        assert most[0] == 2
        time.sleep(0.1)  # the last job's callback
        assert not compiler.busy
        # jobs still waiting when the build stops are cancelled
        release.clear()
        first, second = compiler.submit(job, 4), compiler.submit(job, 5)
        compiler.limit = 1
        third = compiler.submit(job, 6)
        compiler.cancel_waiting()
        release.set()
        assert third.cancelled() and first.result(10) == 8 and second.result(10) == 10


def test_quantization_parts_run_on_one_thread_only_while_a_compile_runs():
    import time
    from types import SimpleNamespace

    threads = torch.get_num_threads()
    compiler = SimpleNamespace(busy=True)
    watch = _Parts(compiler)
    with watch("aimet"):
        assert torch.get_num_threads() == 1 and qnn.session_threads() == 1
        time.sleep(0.2)
    assert torch.get_num_threads() == threads and qnn.session_threads() is None
    compiler.busy = False  # the compile finished: the next part takes every core again
    with watch("QDQ chain"):
        assert torch.get_num_threads() == threads and qnn.session_threads() is None
        time.sleep(0.1)
    with watch("aimet"):
        pass
    assert 0.2 <= watch.limited < 0.3
    assert list(watch.seconds) == ["aimet", "QDQ chain"] and watch.seconds["QDQ chain"] >= 0.1


def test_float_target_gptq_moves_later_partitions_only(tmp_path):
    """--gptq-target float: the first partition's inputs are exact (nothing to absorb), so
    its weights equal plain GPTQ's; later partitions' weights move, stay on the grid and
    stay shared by the three stages."""
    from neodragon_npu.graphs.quant import gptq
    from neodragon_npu.graphs.onnx_edit import weight_values

    weights = {}
    for target in ("quantized", "float"):
        opts = AllStagesOptions(config="tiny", calibration_samples=4, max_partition_weight_bytes=220_000,
                                gptq_target=target, verify_htp=False, layer_report=False, min_sqnr_db=0.0)
        out = tmp_path / target
        build_denoiser_stages(opts, out)
        assert json.loads((out / MANIFEST).read_text())["quantization"]["gptq_target"] == target
        weights[target] = {
            (s, k): {n: v for n, v in weight_values(onnx_io.load(out / f"stage{s}_part{k}_w8a16.onnx")).items()
                     if n.startswith("w_")}
            for s in range(3) for k in (0, 1)
        }
    plain, aimed = weights["quantized"], weights["float"]
    for name, value in aimed[2, 0].items():
        np.testing.assert_array_equal(value, plain[2, 0][name])
    moved = [n for n, v in aimed[2, 1].items() if v.ndim == 2 and not np.array_equal(v, plain[2, 1][n])]
    assert moved
    for name in moved:
        np.testing.assert_array_equal(aimed[0, 1][name], aimed[2, 1][name])
        assert gptq.on_grid(aimed[2, 1][name]) or gptq.on_grid(aimed[2, 1][name].T), name


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
    blocks = build_denoiser(get_denoiser_config("tiny"), seed=AllStagesOptions().seed).transformer.transformer_blocks
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
    adapter = build_denoiser(get_denoiser_config("tiny"), seed=AllStagesOptions().seed).context_adapter
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
    from neodragon_npu.neodragon_models.configs import get_denoiser_config
    from neodragon_npu.neodragon_models.denoiser import build_denoiser
    from neodragon_npu.tools.engine import family as denoiser_stages

    ran = {}
    real = denoiser_stages.collect_samples

    def recording(*args, units_per_prompt=None, **kwargs):
        ran.update(units_per_prompt)
        return real(*args, units_per_prompt=units_per_prompt, **kwargs)

    monkeypatch.setattr(denoiser_stages, "collect_samples", recording)
    model = build_denoiser(get_denoiser_config("tiny"), seed=0)
    opts = AllStagesOptions(config="tiny", calibration_samples=4, check_prompts=2, check_samples=2)
    calib, check = denoiser_stages._stage_samples(model, opts, [0, 2])
    assert ran == {1000: 3, 1001: 1, 2000: 1, 2001: 1}  # tiny: 3 units per prompt
    for s in (0, 2):
        assert [(x.prompt_seed, x.unit) for x in check[s]] == [(2000, 1), (2001, 1)]
        assert [(x.prompt_seed, x.unit) for x in calib[s]] == [(1000, 1), (1000, 2), (1000, 3), (1001, 1)]
    opts = AllStagesOptions(config="tiny", calibration_samples=1, check_prompts=2, check_samples=3)
    _, check = denoiser_stages._stage_samples(model, opts, [1])
    assert [(x.prompt_seed, x.unit) for x in check[1]] == [(2000, 1), (2001, 1), (2000, 2)]


def test_a_forked_stage_export_writes_what_an_export_here_writes(tmp_path):
    opts = AllStagesOptions(config="tiny", max_partition_weight_bytes=220_000)
    denoiser = load_denoiser(opts)

    def weights():
        return {f"{m}.{n}": t for m in ("transformer", "context_adapter")
                for n, t in getattr(denoiser, m).state_dict().items()}

    before = {name: t.clone() for name, t in weights().items()}
    here, there = tmp_path / "here", tmp_path / "there"
    for work in (here, there):
        work.mkdir()
        _write_stage_samples(denoiser, opts, work, [1])
    plan = _CutPlan(opts.max_partition_weight_bytes)
    _export_stage(opts, 2, lambda: copy.deepcopy(denoiser), here, plan.parts)  # sets the cuts, as in a build
    stats, paths = _export_stage(opts, 1, lambda: copy.deepcopy(denoiser), here, plan.parts)
    assert len(paths) > 1
    fork = Forked("the stage-1 export", _export_forked, opts, 1, denoiser, there)
    fork.send(plan.weights)  # the cuts, as the parent's export of the largest stage gives them
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
