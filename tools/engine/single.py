"""A single-graph build: one graph of a spec, from PyTorch to verified Hexagon context binaries.

Every step hands the next one files in the build directory, and the big objects (torch
model, FX graph, float session, QuantSim) are dropped before the next step, so a large
graph goes through with bounded memory and each artefact can be inspected.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neodragon_npu.graphs import onnx_io, qnn
from neodragon_npu.graphs.feeds import load_samples, save_samples
from neodragon_npu.graphs.quant import sensitivity
from neodragon_npu.graphs.quant.gptq import HessianSet
from neodragon_npu.graphs.stats import fx_stats, onnx_stats
from neodragon_npu.graphs.verify import compare, pooled_sqnr
from neodragon_npu.neodragon_models.spec import REFERENCE_SUFFIX, SamplePlan
from neodragon_npu.passes import pipelines
from neodragon_npu.passes.base import PassManager
from neodragon_npu.tools.engine import artifacts, steps as build_steps
from neodragon_npu.tools.engine.cache import StepCache, cache_root, step_key
from neodragon_npu.tools.engine.host import describe_host
from neodragon_npu.tools.engine.options import BuildPlan, check_high_precision
from neodragon_npu.tools.engine.preflight import staged_build_dir
from neodragon_npu.tools.engine.progress import Steps, count, release_memory
from neodragon_npu.tools.engine.report import write_report
from neodragon_npu.tools.engine.steps import BuildCheckError, manifest_target

logger = logging.getLogger("neodragon_npu")
# calibration samples the int8 noise of each weight is measured on (--auto-16bit): one run
# per weight and sample, and the choice barely moves past two
SENSITIVITY_SAMPLES = 2
FP16_MAX = 65504.0


@dataclass
class BuildResult:
    out_dir: Path
    manifest: dict
    sqnr_db: float | None = None  # HTP simulator against fp32, pooled (the first target)
    stats: dict = field(default_factory=dict)


def _step_count(plan: BuildPlan) -> int:
    return {"export": 4, "quantize": 6, "compile": 7, "verify": 8}[plan.until]


def split_references(feeds: list[dict], outputs) -> tuple[list[dict], list[list[np.ndarray]]]:
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

    path = Path(path)
    # the weights stay in their external file (a 2 GB graph does not fit one protobuf)
    proto = onnx.load(str(path), load_external_data=False)
    names = [o for n in proto.graph.node for o in n.output if o]
    del proto.graph.output[:]
    for name in names:
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    probe = path.with_name(f".{path.stem}_every_output.onnx")  # beside it: the data file's path is relative
    onnx.save(proto, str(probe))
    del proto
    try:
        session = qnn.cpu_session(probe)
    finally:
        probe.unlink()
    peak, where = 0.0, ""
    for feed in feeds:
        for name, value in zip(names, session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})):
            if np.issubdtype(value.dtype, np.floating) and value.size:
                largest = float(np.max(np.abs(value)))
                if largest > peak:
                    peak, where = largest, name
    return peak, where


def build_single(plan: BuildPlan, out_dir: str | Path) -> BuildResult:
    """Build ``plan``'s one graph into ``out_dir`` (replaced atomically on success), through
    the step cache (:mod:`.cache`)."""
    root = cache_root(out_dir, plan.options.cache_dir, plan.options.cache)
    with artifacts.Digests() as digests, StepCache(root, digests) as cache:
        with staged_build_dir(plan, out_dir) as work:
            manifest, report, per_target = _Single(plan, work, cache).run()
            artifacts.write_manifest(work, manifest, digests)
        logger.info(cache.finish())
    if plan.until == "verify" and not manifest["verification"]["passed"]:
        worst = min(per_target.items(), key=lambda kv: kv[1][1])
        where = (f"the simulated {worst[0]} binary" if plan.options.verify_htp is not False
                 else "the deployed graph on the CPU")
        raise BuildCheckError(
            f"{where} reaches {worst[1][1]:.1f} dB SQNR against fp32, below the "
            f"{plan.min_sqnr_db:.0f} dB threshold (artefacts kept in {out_dir}, see report.txt)"
        )
    return BuildResult(Path(out_dir), manifest, report.get("htp_sqnr_db"), report)


class _Single:
    """One single-graph build; :meth:`run` reads top to bottom as the build goes. Each step
    is a cache entry: its key names what decides it, and a step whose entry exists only
    places the entry's files in the build directory."""

    def __init__(self, plan: BuildPlan, work: Path, cache: StepCache) -> None:
        self.plan, self.work, self.cache = plan, work, cache
        self.spec, self.opts, (self.graph,) = plan.spec, plan.options, plan.graphs
        self.name = f"{self.spec.name}_{self.graph.name}"
        common = {"model": self.spec.name, "load": build_steps.load_key(plan), "graph": self.graph.name}
        self.k_samples = step_key("samples", **common, calibration=self.opts.calibration_samples,
                                  check=self.opts.check_samples, source=self.spec.samples_key)
        self.k_export = step_key("export", **common, **build_steps.export_options(plan))
        self._model = None

    def model(self):
        """The PyTorch model, loaded on first use: a build whose samples and export are
        cached never loads it."""
        if self._model is None:
            self._model = self.spec.load(self.plan.load)
        return self._model

    def run(self) -> tuple[dict, dict, dict]:
        plan, spec, graph, work, cache, name = self.plan, self.spec, self.graph, self.work, self.cache, self.name
        opts, until, first, precision = self.opts, plan.until, plan.targets[0], plan.precision
        steps = Steps(_step_count(plan))
        manifest: dict = {"host": describe_host(), "pipeline": spec.name, "model": {}, **graph.describe,
                          "fx_pipeline": opts.fx_pipeline}
        if len(plan.targets) == 1:
            manifest["target"] = manifest_target(first)
        else:
            manifest["targets"] = [manifest_target(t) for t in plan.targets]
        report: dict = {"title": f"{spec.name} {plan.config} {graph.name} -> "
                                 f"{', '.join(t.description for t in plan.targets)}", "host": manifest["host"]}

        # 1. The PyTorch model: seeded synthetic weights, or the released folders (loaded
        #    here unless every step that needs it is cached).
        with steps.step("build the PyTorch model"):
            if not cache.has("export", self.k_export) or (until != "export" and
                                                          not cache.has("samples", self.k_samples)):
                self.model()

        # 2. Samples from the model's own pipeline: calibration and check samples are
        #    disjoint, so the binary is checked on inputs it was not calibrated on.
        if until != "export":
            with steps.step("run the float pipeline for calibration and check samples"):
                labels = cache.run("samples", self.k_samples, work, self._samples, "the samples")
                check, refs = split_references(load_samples(work / "check_samples.npz"), graph.output_names)
                labels = labels or [f"sample {i}" for i in range(len(check))]

        # 3-4. Trace at the graph's static shapes, run the FX passes, export to ONNX and run
        #    the ONNX passes.
        float_path = work / f"{name}_float.onnx"
        with steps.step("trace at the graph's static shapes and run FX passes"):
            entry = cache.get("export", self.k_export)
            if entry is None:
                gm, example = build_steps.trace(graph, self.model())
                report["fx_before"] = fx_stats(gm)
                report["fx_passes"] = build_steps.run_fx(plan, graph, self.model(), gm)
                report["fx_after"] = fx_stats(gm)
        with steps.step("export to ONNX and run ONNX passes"):
            if entry is None:
                model_description = spec.describe(self.model(), plan.load)
                # the torch model is released first (the ONNX passes fold weights into new tensors)
                self._model = None
                # the straight export goes through its file: the ONNX passes then name the values
                # they make after the saved graph's names, the same in every build
                with build_steps.exported(plan, graph, gm, example, work) as onnx_model:
                    del gm
                    onnx_io.save(onnx_model, float_path)
                    del onnx_model
                release_memory()
                onnx_model = onnx_io.load(float_path)
                before = set(report)
                manifest["graph_stats_a16"] = build_steps.optimize_onnx(onnx_model, plan, graph, report)
                onnx_io.save(onnx_model, float_path)
                del onnx_model
                exported = {"model": model_description, "graph_stats_a16": manifest["graph_stats_a16"],
                            "report": {k: report[k] for k in report if k not in before or k.startswith("fx_")}}
                cache.put("export", self.k_export, work, onnx_io.model_files(float_path), exported)
            else:
                exported = cache.reuse(entry, work, "the float graph").meta
                manifest["graph_stats_a16"] = exported["graph_stats_a16"]
                report.update(exported["report"])
            manifest["model"] = report["model"] = exported["model"]
        self._model = None
        manifest["float_model"] = float_path.name

        if until != "export":
            # 5. Float ONNX vs PyTorch on the check samples: the passes and the export are exact.
            with steps.step("check the float ONNX against PyTorch"):
                def float_check():
                    session = qnn.cpu_session(float_path)
                    # every output of every sample: the report shows the worst
                    return [], [compare(r, out) for feed, ref in zip(check, refs)
                                for r, out in zip(ref, qnn.run(session, feed))]
                report["float_check"] = cache.run(
                    "float-check", step_key("float-check", export=self.k_export, samples=self.k_samples), work,
                    float_check, "the float check")

            # 6. Precision: W8A16 with aimet-onnx, calibrated on the pipeline's own samples,
            #    or FP16.
            k_precise = step_key("precision", export=self.k_export, samples=self.k_samples, precision=precision,
                                 htp_arch=first.htp_arch)
            if precision.name == "w8a16":
                deployed_path = work / f"{name}_w8a16.onnx"
                check_high_precision(plan, [onnx_io.load(float_path)])
                calib = load_samples(work / "calibration_inputs.npz")
                with steps.step(f"quantize W8A16 with aimet-onnx ({len(calib)} calibration samples)"):
                    report["qdq"], auto = cache.run("precision", k_precise, work, lambda: self._quantize(
                        float_path, deployed_path, calib), "the W8A16 graph")
                del calib
                if auto is not None:
                    report["auto_16bit"] = auto
                manifest["qdq_model"] = deployed_path.name
                manifest["encodings"] = f"{name}_w8a16.encodings"
            else:
                deployed_path = work / f"{name}_fp16.onnx"
                with steps.step("convert to FP16"):
                    report["fp16_range"], report["fp16"], report["fp16_notes"] = cache.run(
                        "precision", k_precise, work, lambda: self._to_fp16(float_path, deployed_path),
                        "the FP16 graph")
                peak, where = report["fp16_range"]
                if peak > FP16_MAX:
                    logger.warning("      %s reaches %.3g on the calibration samples, past FP16's %.0f: the FP16 "
                                   "graph will saturate there", where, peak, FP16_MAX)
                manifest["fp16_model"] = deployed_path.name
                manifest["fp16_range"] = {"largest_abs_activation": peak, "tensor": where, "fp16_max": FP16_MAX}
                manifest["fp16_passes"] = report["fp16_notes"]
            manifest["quantization"] = precision.describe()
            if "auto_16bit" in report:
                manifest["quantization"]["auto_16bit"] = report["auto_16bit"]

        binaries, qnn_ops, k_compiled = {}, {}, {}
        if until in ("compile", "verify"):
            # 7. The QNN HTP compiler writes the EPContext model and the context binary.
            for target in plan.targets:
                with steps.step(f"compile the HTP context binary for {target.name} (v{target.htp_arch})"):
                    k_compiled[target.name] = step_key("compile", precision=k_precise, target=target,
                                                       expected_qnn_ops=dict(graph.expected_qnn_ops))
                    rel_model, rel_binary, qnn_ops[target.name] = cache.run(
                        "compile", k_compiled[target.name], work, lambda: self._compile(deployed_path, target),
                        f"the {target.name} context binary")
                    binaries[target.name] = qnn.ContextBinary(work / rel_model, work / rel_binary)
                report.setdefault("compile_seconds", 0.0)
                report["compile_seconds"] += steps.records[-1].seconds

        graph_entry = {"name": name, "float_model": float_path.name}
        per_target = {}
        on_htp = opts.verify_htp is not False
        if until == "verify" and on_htp:
            # 8. Load each binary back in the HTP simulator and compare with fp32 PyTorch.
            for target in plan.targets:
                with steps.step(f"load the {target.name} binary in the HTP simulator and compare with fp32"):
                    signature, results, pooled, per_output = cache.run(
                        "htp-check", step_key("htp-check", compile=k_compiled[target.name], samples=self.k_samples),
                        work, lambda: ([], self._check(qnn.htp_session(binaries[target.name].epcontext_model,
                                                                       target), check, refs, labels)),
                        f"the {target.name} simulator check")
                    if target is first:
                        graph_entry.update(signature)
                        first_per_output = per_output
                per_target[target.name] = (results, pooled)
        elif until == "verify":
            # 8. The deployed graph on the CPU (--no-verify-htp): the x86 simulator runs a
            #    large convolution graph for tens of minutes per call (docs/causal-vae.md).
            with steps.step("run the deployed graph on the CPU (onnxruntime) and compare with fp32"):
                signature, results, pooled, per_output = cache.run(
                    "cpu-check", step_key("cpu-check", precision=k_precise, samples=self.k_samples), work,
                    lambda: ([], self._check(qnn.cpu_session(deployed_path), check, refs, labels)),
                    "the CPU check")
                graph_entry.update(signature)
                first_per_output = per_output
            per_target = {t.name: (results, pooled) for t in plan.targets}
        if until == "verify":
            results, pooled = per_target[first.name]
            if len(first_per_output) > 1:
                report["htp_sqnr_per_output_db"] = first_per_output
            sqnrs = [c.sqnr_db for _, c in results]
            report["htp_check"] = results
            report["htp_sqnr_db"] = pooled
            if not on_htp:
                report["check_device"] = "the deployed graph on the CPU"
            manifest["verification"] = {
                "reference": spec.reference_note or "fp32 PyTorch module",
                "device": "x86 HTP simulator (onnxruntime-qnn)" if on_htp else
                          f"CPU (onnxruntime), the deployed {'QDQ' if precision.name == 'w8a16' else 'FP16'} graph",
                "samples": len(results),
                "sqnr_db": round(pooled, 2),
                "min_sample_sqnr_db": round(min(sqnrs), 2),
                "threshold_db": plan.min_sqnr_db,
                "passed": all(p >= plan.min_sqnr_db for _, p in per_target.values()),
            }
            if "htp_sqnr_per_output_db" in report:
                manifest["verification"]["per_output_sqnr_db"] = {
                    k: round(v, 2) for k, v in report["htp_sqnr_per_output_db"].items()}
            if len(plan.targets) > 1 and on_htp:
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
        manifest["cache"] = cache.summary()
        report["steps"] = steps.records
        write_report(work / "report.txt", report)
        return manifest, report, per_target

    # the steps' work on a cache miss: each returns (files, metadata) ---------------------
    def _samples(self):
        spec, graph, work, opts = self.spec, self.graph, self.work, self.opts
        files = []
        for file, text in (spec.artifacts(self.model()) if spec.artifacts else {}).items():
            (work / file).write_text(text)
            files.append(file)
        samples = spec.samples(self.model(), [graph], SamplePlan(opts.calibration_samples, opts.check_samples))
        files.append(save_samples(work / "calibration_inputs.npz", samples.calibration[graph.name]))
        files.append(save_samples(work / "check_samples.npz", samples.check[graph.name]))
        return files, samples.check_labels.get(graph.name)

    def _quantize(self, float_path: Path, deployed_path: Path, calib: list[dict]):
        precision, first = self.plan.precision, self.plan.targets[0]
        auto = None
        if precision.auto_16bit_db is not None:
            auto = self._choose_16_bit(float_path, calib)
            precision = dataclasses.replace(precision, high_precision=precision.high_precision
                                            + sensitivity.as_patterns(auto["kept"]))
        hessians = None
        if precision.rounding == "gptq":
            hessians = HessianSet()
            hessians.accumulate(float_path, calib, precision.high_precision)
        passes = pipelines.w8a16(precision, calibration=calib, htp_arch=first.htp_arch,
                                 encodings_dir=self.work, encodings_prefix=f"{self.name}_w8a16", hessians=hessians)
        result = PassManager(passes)(onnx_io.load(float_path))
        del hessians
        onnx_io.save(result.model, deployed_path)
        stats = onnx_stats(result.model)
        del result
        gc.collect()
        return [*onnx_io.model_files(deployed_path), self.work / f"{self.name}_w8a16.encodings"], (stats, auto)

    def _choose_16_bit(self, float_path: Path, calib: list[dict]) -> dict:
        """The weights to keep at 16 bit besides the model's: each weight's int8 noise at the
        outputs, measured on a few calibration samples (graphs.quant.sensitivity)."""
        target = self.plan.precision.auto_16bit_db
        feeds = calib[:SENSITIVITY_SAMPLES]

        def progress(i, n, weight):
            if i % max(1, n // 10) == 0:
                logger.info("      int8 noise of weight %d/%d (%s)", i + 1, n, weight)

        noise, joint_db = sensitivity.measure_weight_noise(float_path, feeds, skip=self.plan.precision.high_precision,
                                                           progress=progress)
        kept = noise.choose_16_bit(target)
        int8 = [w for w in noise.noise if w not in kept]
        total = sum(noise.weight_bytes.values())
        return {
            "target_db": target, "samples": len(feeds), "weights": len(noise.noise),
            "all_int8_db": round(joint_db, 2), "all_int8_sum_db": round(noise.predicted_db(noise.noise), 2),
            "predicted_db": round(noise.predicted_db(int8), 2),
            "kept": kept, "kept_weight_share": round(sum(noise.weight_bytes[w] for w in kept) / total, 4),
            "noise_db": {w: round(noise.predicted_db([w]), 2) for w in noise.noise},
        }

    def _to_fp16(self, float_path: Path, deployed_path: Path):
        calib = load_samples(self.work / "calibration_inputs.npz")
        passes = build_steps.without_skipped(pipelines.fp16(self.plan.precision, calibration=calib), self.plan)
        split = next((i for i, p in enumerate(passes) if p.pass_name() == "convert_to_fp16"), len(passes))
        model = onnx_io.load(float_path)
        records = PassManager(passes[:split])(model).records
        notes = [f"{r.name}: {n}" for r in records for n in r.notes]
        # the range the FP16 graph must hold: the graph just before the conversion, at fp32
        # (saved again only if a pass changed it)
        if any(r.modified for r in records):
            staged = onnx_io.save(model, self.work / f".{self.name}_fp16_input.onnx")
            peak, where = _largest_activation(staged, calib)
            onnx_io.remove(staged)
        else:
            peak, where = _largest_activation(float_path, calib)
        PassManager(passes[split:])(model)
        onnx_io.save(model, deployed_path)
        return onnx_io.model_files(deployed_path), ((peak, where), onnx_stats(model), notes)

    def _compile(self, deployed_path: Path, target):
        graph, work = self.graph, self.work
        # the QNN graph is dumped only to check the ops the spec expects in it
        dump = work / f".{target.name}_qnn_graph" if graph.expected_qnn_ops else None
        built = qnn.compile_context_binary(deployed_path, work / f"{self.name}_{target.name}_ctx.onnx", target,
                                           graph_dump_dir=dump)
        ops = {}
        if dump is not None:
            ops = qnn.qnn_graph_ops(dump)
            shutil.rmtree(dump)
        wrong = {op: ops.get(op, 0) for op, n in graph.expected_qnn_ops.items() if ops.get(op, 0) != n}
        if wrong:
            raise BuildCheckError(f"the {target.name} QNN graph holds {wrong} where {dict(graph.expected_qnn_ops)} "
                                  f"was expected (all its ops: {ops})")
        files = [built.epcontext_model, built.binary]
        return files, (built.epcontext_model.name, built.binary.name, ops)

    def _check(self, session, check, refs, labels):
        signature = qnn.io_signature(session)
        outputs = self.graph.output_names
        results, pairs = [], {name: [] for name in outputs}
        for i, (feed, ref, label) in enumerate(zip(check, refs, labels)):
            outs = qnn.run(session, feed)
            for name, r, out in zip(outputs, ref, outs):
                results.append((label if len(outputs) == 1 else f"{label} {name}", compare(r, out)))
                pairs[name].append((r, out))
            count("check sample", i + 1, len(check))
        del session
        per_output = {name: pooled_sqnr(p) for name, p in pairs.items()}
        # a graph holds its floor only if every output does
        return signature, results, min(per_output.values()), per_output
