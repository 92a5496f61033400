"""A single-graph build: one graph of a spec, from PyTorch to verified Hexagon context binaries.

Every step hands the next one files in the build directory, and the big objects (torch
model, FX graph, float session, QuantSim) are dropped before the next step, so a large
graph goes through with bounded memory and each artefact can be inspected.
"""

from __future__ import annotations

import gc
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neodragon_npu.graphs import onnx_io, qnn
from neodragon_npu.graphs.feeds import save_samples
from neodragon_npu.graphs.quant.gptq import HessianSet
from neodragon_npu.graphs.stats import fx_stats, onnx_stats
from neodragon_npu.graphs.verify import compare, pooled_sqnr
from neodragon_npu.neodragon_models.spec import REFERENCE_SUFFIX, SamplePlan
from neodragon_npu.passes import pipelines
from neodragon_npu.passes.base import PassManager
from neodragon_npu.tools.engine import artifacts, steps as build_steps
from neodragon_npu.tools.engine.host import describe_host
from neodragon_npu.tools.engine.options import BuildPlan
from neodragon_npu.tools.engine.progress import Steps, count, release_memory
from neodragon_npu.tools.engine.report import write_report
from neodragon_npu.tools.engine.steps import BuildCheckError, manifest_target

logger = logging.getLogger("neodragon_npu")
FP16_MAX = 65504.0


@dataclass
class BuildResult:
    out_dir: Path
    manifest: dict
    sqnr_db: float | None = None  # HTP simulator against fp32, pooled (the first target)
    stats: dict = field(default_factory=dict)


def _step_count(plan: BuildPlan) -> int:
    return {"export": 4, "quantize": 6, "compile": 7, "verify": 8}[plan.until]


def _split_references(feeds: list[dict], outputs) -> tuple[list[dict], list[list[np.ndarray]]]:
    """Check feeds without their ``<output>_fp32`` references, and the references."""
    inputs, refs = [], []
    for feed in feeds:
        feed = dict(feed)
        refs.append([feed.pop(o + REFERENCE_SUFFIX) for o in outputs])
        inputs.append(feed)
    return inputs, refs


def _largest_activation(path: Path, feeds: list[dict]) -> tuple[float, str]:
    """The largest |value| any float tensor of the model takes on ``feeds``, and where."""
    import onnx

    proto = onnx.load(str(path))
    names = [o for n in proto.graph.node for o in n.output if o]
    del proto.graph.output[:]
    for name in names:
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = qnn.cpu_session(proto.SerializeToString())
    peak, where = 0.0, ""
    for feed in feeds:
        for name, value in zip(names, session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})):
            if np.issubdtype(value.dtype, np.floating) and value.size:
                largest = float(np.max(np.abs(value)))
                if largest > peak:
                    peak, where = largest, name
    return peak, where


def build_single(plan: BuildPlan, out_dir: str | Path) -> BuildResult:
    """Build ``plan``'s one graph into ``out_dir`` (replaced atomically on success)."""
    spec, opts, (graph,) = plan.spec, plan.options, plan.graphs
    until = plan.until
    name = f"{spec.name}_{graph.name}"
    steps = Steps(_step_count(plan))
    first = plan.targets[0]
    manifest: dict = {"host": describe_host(), "pipeline": spec.name, "model": {}, **graph.describe,
                      "fx_pipeline": opts.fx_pipeline}
    if len(plan.targets) == 1:
        manifest["target"] = manifest_target(first)
    else:
        manifest["targets"] = [manifest_target(t) for t in plan.targets]
    report: dict = {"title": f"{spec.name} {plan.config} {graph.name} -> "
                             f"{', '.join(t.description for t in plan.targets)}", "host": manifest["host"]}
    precision = plan.precision

    with artifacts.staged_dir(out_dir) as work:
        # 1. The PyTorch model: seeded synthetic weights, or the released folders.
        with steps.step("build the PyTorch model"):
            model = spec.load(plan.load)
            manifest["model"] = spec.describe(model, plan.load)
            for file, text in (spec.artifacts(model) if spec.artifacts else {}).items():
                (work / file).write_text(text)

        # 2. Samples from the model's own pipeline: calibration and check samples are
        #    disjoint, so the binary is checked on inputs it was not calibrated on.
        if until != "export":
            with steps.step("run the float pipeline for calibration and check samples"):
                samples = spec.samples(model, [graph], SamplePlan(opts.calibration_samples, opts.check_samples))
                calib, check_feeds = samples.calibration[graph.name], samples.check[graph.name]
                labels = samples.check_labels.get(graph.name) or [f"sample {i}" for i in range(len(check_feeds))]
                save_samples(work / "calibration_inputs.npz", calib)
                save_samples(work / "check_samples.npz", check_feeds)
                check, refs = _split_references(check_feeds, graph.output_names)
                del samples, check_feeds

        # 3. Trace at the graph's static shapes and run the FX passes.
        with steps.step("trace at the graph's static shapes and run FX passes"):
            gm, example = build_steps.trace(graph, model)
            report["fx_before"] = fx_stats(gm)
            report["fx_passes"] = build_steps.run_fx(plan, graph, model, gm)
            report["fx_after"] = fx_stats(gm)

        # 4. Export to ONNX and clean up; the torch model is released first (the ONNX passes
        #    fold weights into new tensors).
        float_path = work / f"{name}_float.onnx"
        with steps.step("export to ONNX and run ONNX passes"):
            del model
            # the straight export goes through its file: the ONNX passes then name the values
            # they make after the saved graph's names, the same in every build
            with build_steps.exported(plan, graph, gm, example, work) as onnx_model:
                del gm
                onnx_io.save(onnx_model, float_path)
                del onnx_model
            release_memory()
            onnx_model = onnx_io.load(float_path)
            manifest["graph_stats_a16"] = build_steps.optimize_onnx(onnx_model, plan, graph, report)
            onnx_io.save(onnx_model, float_path)
            del onnx_model
        manifest["float_model"] = float_path.name

        if until != "export":
            # 5. Float ONNX vs PyTorch on the check samples: the passes and the export are exact.
            with steps.step("check the float ONNX against PyTorch"):
                session = qnn.cpu_session(float_path)
                report["float_check"] = [compare(ref[0], qnn.run(session, feed)[0]) for feed, ref in zip(check, refs)]
                del session

            # 6. Precision: W8A16 with aimet-onnx, calibrated on the pipeline's own samples,
            #    or FP16.
            if precision.name == "w8a16":
                deployed_path = work / f"{name}_w8a16.onnx"
                with steps.step(f"quantize W8A16 with aimet-onnx ({len(calib)} calibration samples)"):
                    hessians = None
                    if precision.rounding == "gptq":
                        hessians = HessianSet()
                        hessians.accumulate(float_path, calib, precision.high_precision)
                    passes = pipelines.w8a16(precision, calibration=calib, htp_arch=first.htp_arch,
                                             encodings_dir=work, encodings_prefix=f"{name}_w8a16", hessians=hessians)
                    result = PassManager(passes)(onnx_io.load(float_path))
                    del hessians
                    onnx_io.save(result.model, deployed_path)
                    report["qdq"] = onnx_stats(result.model)
                    del result
                    gc.collect()
                manifest["qdq_model"] = deployed_path.name
                manifest["encodings"] = f"{name}_w8a16.encodings"
            else:
                deployed_path = work / f"{name}_fp16.onnx"
                with steps.step("convert to FP16"):
                    peak, where = _largest_activation(float_path, calib)
                    report["fp16_range"] = (peak, where)
                    if peak > FP16_MAX:
                        logger.warning(
                            "      %s reaches %.3g on the calibration samples, past FP16's %.0f: the FP16 graph "
                            "will saturate there", where, peak, FP16_MAX)
                    model16 = onnx_io.load(float_path)
                    PassManager(pipelines.fp16(precision))(model16)
                    onnx_io.save(model16, deployed_path)
                    report["fp16"] = onnx_stats(model16)
                    del model16
                manifest["fp16_model"] = deployed_path.name
                manifest["fp16_range"] = {"largest_abs_activation": peak, "tensor": where, "fp16_max": FP16_MAX}
            manifest["quantization"] = precision.describe()

        binaries, qnn_ops = {}, {}
        if until in ("compile", "verify"):
            # 7. The QNN HTP compiler writes the EPContext model and the context binary.
            for target in plan.targets:
                with steps.step(f"compile the HTP context binary for {target.name} (v{target.htp_arch})"):
                    # the QNN graph is dumped only to check the ops the spec expects in it
                    dump = work / f".{target.name}_qnn_graph" if graph.expected_qnn_ops else None
                    binaries[target.name] = qnn.compile_context_binary(
                        deployed_path, work / f"{name}_{target.name}_ctx.onnx", target, graph_dump_dir=dump)
                    if dump is not None:
                        qnn_ops[target.name] = qnn.qnn_graph_ops(dump)
                        shutil.rmtree(dump)
                    wrong = {op: qnn_ops[target.name].get(op, 0) for op, n in graph.expected_qnn_ops.items()
                             if qnn_ops[target.name].get(op, 0) != n}
                    if wrong:
                        raise BuildCheckError(
                            f"the {target.name} QNN graph holds {wrong} where {dict(graph.expected_qnn_ops)} was "
                            f"expected (all its ops: {qnn_ops[target.name]})")
                report.setdefault("compile_seconds", 0.0)
                report["compile_seconds"] += steps.records[-1].seconds

        graph_entry = {"name": name, "float_model": float_path.name}
        if until == "verify":
            # 8. Load each binary back in the HTP simulator and compare with fp32 PyTorch.
            per_target = {}
            for target in plan.targets:
                with steps.step(f"load the {target.name} binary in the HTP simulator and compare with fp32"):
                    session = qnn.htp_session(binaries[target.name].epcontext_model, target)
                    if target is first:
                        graph_entry.update(qnn.io_signature(session))
                    results, pairs = [], []
                    for i, (feed, ref, label) in enumerate(zip(check, refs, labels)):
                        out = qnn.run(session, feed)[0]
                        results.append((label, compare(ref[0], out)))
                        pairs.append((ref[0], out))
                        count("check sample", i + 1, len(check))
                    del session
                per_target[target.name] = (results, pooled_sqnr(pairs))
            results, pooled = per_target[first.name]
            sqnrs = [c.sqnr_db for _, c in results]
            report["htp_check"] = results
            report["htp_sqnr_db"] = pooled
            manifest["verification"] = {
                "reference": spec.reference_note or "fp32 PyTorch module",
                "device": "x86 HTP simulator (onnxruntime-qnn)",
                "samples": len(results),
                "sqnr_db": round(pooled, 2),
                "min_sample_sqnr_db": round(min(sqnrs), 2),
                "threshold_db": plan.min_sqnr_db,
                "passed": all(p >= plan.min_sqnr_db for _, p in per_target.values()),
            }
            if len(plan.targets) > 1:
                manifest["verification"]["per_target_sqnr_db"] = {t: round(p, 2) for t, (_, p) in per_target.items()}
        if binaries:
            ctx = binaries[first.name]
            graph_entry.update({"epcontext_model": ctx.epcontext_model.name, "binary": ctx.binary.name})
            if graph.expected_qnn_ops:
                graph_entry["qnn_ops"] = qnn_ops[first.name]
            if len(plan.targets) > 1:
                graph_entry["binaries"] = {t: {"epcontext_model": b.epcontext_model.name, "binary": b.binary.name}
                                           for t, b in binaries.items()}
        else:
            graph_entry.update(onnx_io.io_signature(onnx_io.load(float_path)))
        manifest["graphs"] = [graph_entry]
        manifest["steps"] = steps.as_list()
        report["steps"] = steps.records
        write_report(work / "report.txt", report)
        artifacts.write_manifest(work, manifest)
    if until == "verify" and not manifest["verification"]["passed"]:
        worst = min(per_target.items(), key=lambda kv: kv[1][1])
        raise BuildCheckError(
            f"the simulated {worst[0]} binary reaches {worst[1][1]:.1f} dB SQNR against fp32, below the "
            f"{plan.min_sqnr_db:.0f} dB threshold (artefacts kept in {out_dir}, see report.txt)"
        )
    return BuildResult(Path(out_dir), manifest, report.get("htp_sqnr_db"), report)
