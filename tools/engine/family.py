"""A family build: graphs that share weights, partitioned, quantized per partition, and
emitted as shared-weight context binaries, one per partition and target.

The graphs of a family (the denoiser's three stage graphs) hold the same weights at
different shapes. They are cut at the same places (partition k holds the same weights in
every graph) and quantized one partition at a time: the partition's graphs are merged into
one model (:mod:`neodragon_npu.graphs.shared_weights`), so aimet handles each weight once
-- one GPTQ rounding, one encoding for every graph -- while each graph's activations get
their own encodings. Partition k + 1 calibrates on the outputs of aimet's calibration
forwards of partition k (activations passed through while aimet observes them): what
aimet's calibration of the whole model, which does not fit in memory, would hand it.
GPTQ's few feeds are calibration feeds whose forwards keep the weights quantized; only the
check feeds go through the quantized (QDQ) partitions. Each quantized partition is handed
to a compile worker (:mod:`.compile_pool`) while this process quantizes the next one.
Every step hands files to the next and drops its big objects, so memory stays bounded by
one partition's quantization plus the compiles. The design and its measurements:
docs/all-stages-build.md.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import pickle
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from neodragon_npu.graphs import chain, onnx_io, partition, qnn, shared_weights
from neodragon_npu.graphs.feeds import load_samples, save_samples
from neodragon_npu.graphs.quant.gptq import HessianSet
from neodragon_npu.graphs.quant.layerwise import layer_errors
from neodragon_npu.graphs.stats import format_bytes
from neodragon_npu.graphs.verify import pooled_sqnr, verify_fx
from neodragon_npu.neodragon_models.spec import REFERENCE_SUFFIX, GraphSpec, SamplePlan
from neodragon_npu.passes import pipelines
from neodragon_npu.passes.base import PassManager
from neodragon_npu.tools.engine import artifacts, steps as build_steps
from neodragon_npu.tools.engine.cache import StepCache, cache_root, kill_point, step_key
from neodragon_npu.tools.engine.compile_pool import PartTimer, compile_workers, log_compiled, worker_result
from neodragon_npu.tools.engine.forked import Forked
from neodragon_npu.tools.engine.host import describe_host, host_line
from neodragon_npu.tools.engine.options import BuildPlan, check_high_precision
from neodragon_npu.tools.engine.preflight import staged_build_dir
from neodragon_npu.tools.engine.progress import Steps, TreePeak, release_memory
from neodragon_npu.tools.engine.report import model_lines
from neodragon_npu.tools.engine.steps import BuildCheckError, manifest_target

logger = logging.getLogger("neodragon_npu")

# Simulating the HTP is slow (minutes per full-width block): by default the chained
# binaries run in the simulator only for models up to this many weight bytes.
HTP_VERIFY_LIMIT_BYTES = 256 << 20
# fp32 weights up to which the graph exports share the loaded model (forked, all at once)
# instead of exporting one after the other, each on a freshly loaded model.
SHARED_EXPORT_LIMIT_BYTES = 7 << 30


@dataclass
class FamilyResult:
    out_dir: Path
    manifest: dict
    sqnr_db: dict[str, dict[str, float]] = field(default_factory=dict)  # kind -> graph key -> dB


def gptq_sample_indices(n_calib: int, calls_per_group: int, count: int) -> list[int]:
    """The calibration calls whose inputs feed the GPTQ Hessians: the groups (prompts) in
    turn, each group's latest call first. Calibration calls are stored group by group,
    ``calls_per_group`` each (the last group may hold fewer).

    Groups in turn: the denoiser's context tokens are the same in every call of a prompt,
    so calls of one prompt give its Linears a Hessian of low rank. Latest call first: a
    later unit's history holds more real tokens and less envelope padding (measurements in
    docs/quantization.md)."""
    groups = math.ceil(n_calib / calls_per_group)
    per_group = [list(range(g * calls_per_group, min((g + 1) * calls_per_group, n_calib)))[::-1]
                 for g in range(groups)]
    order = [calls[c] for c in range(calls_per_group) for calls in per_group if c < len(calls)]
    return order[:count]


class CutPlan:
    """Where a family's graphs are cut: the lead graph (exported first) decides with
    :meth:`decide`; the others follow with :meth:`follow`, so partition k holds the same
    weights in every graph."""

    def __init__(self, max_weight_bytes: int, max_output_bytes: int | None = None) -> None:
        self.max_weight_bytes = max_weight_bytes
        self.max_output_bytes = max_output_bytes
        self.cuts: list[int] | None = None
        self.weights: list[set[str]] | None = None

    def decide(self, prof: partition.Profile) -> list[int]:
        self.cuts = partition.plan_cuts(prof, max_weight_bytes=self.max_weight_bytes,
                                        max_output_bytes=self.max_output_bytes)
        self.weights = partition.partition_weights(prof, self.cuts)
        return partition.cuts_to_parts(prof, self.cuts)

    def follow(self, prof: partition.Profile) -> list[int]:
        return partition.align_parts(prof, self.weights)


def export_graph(plan: BuildPlan, graph: GraphSpec, make, work: Path, parts_for) -> tuple[dict, list[Path]]:
    """Trace one graph, run its FX passes, export it, run its ONNX passes and save it cut
    into partitions (``parts_for(profile)`` gives each node's partition); returns its A16
    stats and the partition files. ``make()`` gives the model to trace (the FX passes edit
    its parameters); only this function holds it. The whole graph is never written: the
    cuts work on the exported model, whose weights stay in memory until the partitions
    are saved."""
    model = make()
    gm, example = build_steps.trace(graph, model)
    fx_passes = build_steps.fx_passes(plan, graph, model)
    del model
    build_steps.run_passes(gm, fx_passes, verify_fx, plan, lambda g: g.code)
    with build_steps.exported(plan, graph, gm, example, work) as onnx_model:
        del gm  # the ONNX model holds the weights it uses, not the module
        release_memory()
        stats = build_steps.optimize_onnx(onnx_model, plan, graph, {})
        onnx_model = partition.prepare(onnx_model)
        prof = partition.profile(onnx_model)
        partition.annotate(onnx_model, prof, parts_for(prof))
        parts = partition.split(onnx_model)
        stats["handed_over"] = dict(zip(("tensors", "bytes_per_call"), partition.handed_over(parts)))
        paths = [onnx_io.save(part, work / f"{graph.name}_part{k}_float.onnx") for k, part in enumerate(parts)]
        del onnx_model, prof, parts
    release_memory()
    return stats, paths


def float_chain_sqnr(part_paths: list[str], check_npz: str, outputs) -> float:
    """SQNR of the float partitions chained against the fp32 PyTorch output, on the first
    check call: the chain reproduces the unsplit graph on every input or a cut is wired
    wrong, so more calls would repeat the check."""
    feeds = load_samples(check_npz)[:1]
    refs = [[f.pop(o + REFERENCE_SUFFIX) for o in outputs] for f in feeds]
    outs = chain.run_chain(part_paths, feeds, outputs, threads=1)
    return pooled_sqnr(zip(_flat(refs), _flat(outs)))


def _export_forked(receive, plan: BuildPlan, graph: GraphSpec, model, work: Path):
    """:func:`export_graph` in a forked process (:class:`Forked`), on the parent's model as
    the fork shares it; ``receive()`` gives the cuts once the parent's lead export has them.
    Then the float chain is checked here. Returns the stats, the partition files, the
    export's seconds and the float chain's SQNR."""
    start = time.perf_counter()
    stats, paths = export_graph(plan, graph, _hand_over(model), work,
                                lambda prof: partition.align_parts(prof, receive()))
    seconds = time.perf_counter() - start
    sqnr = float_chain_sqnr([str(p) for p in paths], str(work / f"{graph.name}_check_samples.npz"),
                            graph.output_names)
    return stats, paths, seconds, sqnr


def _hand_over(obj):
    """A ``make()`` that returns ``obj`` once and keeps no reference to it afterwards."""
    box = [obj]
    return box.pop


# What partition k + 1 starts from, as the cache stores it (pickled: the feeds keep their dtypes).
_HANDOFF = "handoff.pkl"


def _flat(per_call: list[list]) -> list:
    return [x for call in per_call for x in call]


def _done(value) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


class _Family:
    """One family build; :meth:`run` reads top to bottom as the build goes."""

    def __init__(self, plan: BuildPlan, work: Path, tree: TreePeak, compiler, digests, checker,
                 cache: StepCache) -> None:
        self.plan, self.spec, self.opts = plan, plan.spec, plan.options
        self.work, self.tree, self.compiler, self.digests, self.checker = work, tree, compiler, digests, checker
        self.cache = cache
        self.graphs = list(plan.graphs)  # natural order
        self.order = self.graphs[::-1]  # build order: the lead graph first
        # samples, export, [quantize, [compile], check, [HTP check]], write
        n_steps = {"export": 3, "quantize": 5, "compile": 6, "verify": 7}[plan.until]
        self.steps = Steps(n_steps, tree=tree)
        precision = plan.precision
        self.gptq = precision.rounding == "gptq"
        self.manifest: dict = {
            "host": describe_host(),
            "pipeline": self.spec.name,
            "mode": self.spec.family_label,
            "model": {},
            "targets": [manifest_target(t) for t in plan.targets],
            "quantization": {**precision.describe(), **({"gptq_target": plan.gptq_target} if self.gptq else {})},
        }
        self.result = FamilyResult(work, self.manifest)
        self.part_paths: dict[str, list[Path]] = {}
        self.qdq_paths: dict[str, list[Path]] = {g.name: [] for g in self.graphs}
        self.stats: dict[str, dict] = {}
        self.float_chains: dict[str, Future] = {}
        self.compiles: dict[tuple[str, int], Future] = {}
        self.quantize_seconds: list[dict[str, float]] = []
        self.quantize_peaks: list[dict[str, int]] = []

    def run(self) -> FamilyResult:
        self.manifest["compile_allocator"] = self.compiler.allocator or "glibc"
        if self.compiler.allocator is None:
            logger.info("      the compile workers use glibc's malloc: no jemalloc found (make setup unpacks one "
                        "into the environment; compiles are slower without it)")
        # 1. The PyTorch model and the samples of every graph from the model's own pipeline;
        # 2. one float graph per member, cut the same way, saved as partitions. The model is
        #    handed straight on: the exports drop it (no reference here may keep it alive).
        self._step_keys()
        self.export_entry = self.cache.get("export", self.k_export)
        self.export_and_partition(self.load_and_sample())
        if self.plan.until == "export":
            return self.write_outputs()
        # 3. Quantize partition by partition, the family merged; compiles start behind it.
        self.quantize_partitions()
        # 4. The shared-weight context binaries (one per partition and target).
        if self.plan.until in ("compile", "verify"):
            self.finish_compiles()
        # 5. The float and quantized chains against fp32; the per-layer report.
        self.check_chains()
        # 6. The HTP simulator: non-shared binaries of the same graphs, chained.
        if self.plan.until == "verify":
            self.check_htp()
        # 7. Manifest and report.
        return self.write_outputs()

    def _step_keys(self) -> None:
        """The cache keys of the steps before the partitions are known (see :mod:`.cache`)."""
        plan, o = self.plan, self.opts
        common = {"model": self.spec.name, "load": build_steps.load_key(plan), "family": [g.name for g in self.graphs]}
        self.k_samples = step_key("samples", **common, calibration=o.calibration_samples, check=o.check_samples,
                                  source=self.spec.samples_key)
        self.k_export = step_key("export", **common, **build_steps.export_options(plan))
        self.k_float = step_key("float-chains", export=self.k_export, samples=self.k_samples)

    # 1 ---------------------------------------------------------------------------------
    def load_and_sample(self):
        plan, work = self.plan, self.work
        with self.steps.step("build the model and run the float pipeline for samples"):
            entry = self.cache.take("samples", self.k_samples, work, "the samples")
            if entry is not None:
                self.manifest["model"], self.calls_per_group, self.weight_bytes = entry.meta
                self.share_model = self.weight_bytes <= SHARED_EXPORT_LIMIT_BYTES
                # the exports share a model loaded here unless they are cached too
                return self.spec.load(plan.load) if self.share_model and self.export_entry is None else None
            model = self.spec.load(plan.load)
            self.manifest["model"] = self.spec.describe(model, plan.load)
            files = []
            for file, text in (self.spec.artifacts(model) if self.spec.artifacts else {}).items():
                (work / file).write_text(text)
                files.append(file)
            samples = self.spec.samples(model, self.graphs, SamplePlan(
                self.opts.calibration_samples, self.opts.check_samples, family=True))
            for g in self.graphs:
                files.append(save_samples(work / f"{g.name}_calibration_inputs.npz", samples.calibration[g.name]))
                files.append(save_samples(work / f"{g.name}_check_samples.npz", samples.check[g.name]))
            self.calls_per_group = samples.calls_per_group
            del samples
            release_memory()  # before the exports fork: freed heap they would otherwise inherit
            self.weight_bytes = self.spec.weight_bytes(model)
            self.cache.put("samples", self.k_samples, work, files,
                           (self.manifest["model"], self.calls_per_group, self.weight_bytes))
            # the exports share this model; past this size each loads its own
            self.share_model = self.weight_bytes <= SHARED_EXPORT_LIMIT_BYTES
            if not self.share_model or self.export_entry is not None:
                del model
                release_memory()
                model = None
        return model

    # 2 ---------------------------------------------------------------------------------
    def export_and_partition(self, model) -> None:
        """The lead graph exports here while the others export in forked processes, which
        share the model copy-on-write and check their float chains; past
        SHARED_EXPORT_LIMIT_BYTES one after the other, each on a freshly loaded model. The
        float partitions are hashed for the manifest as they come."""
        plan, work, cuts = self.plan, self.work, CutPlan(self.plan.partition_budget, self.plan.partition_activations)
        lead = self.order[0]
        with self.steps.step(f"trace, optimize, export and partition the {len(self.graphs)} graphs"):
            if self.export_entry is not None:
                return self._exports_from_cache()
            if self.share_model:
                with contextlib.ExitStack() as forks:
                    forked = {}
                    for g in self.order[1:]:
                        forked[g.name] = Forked(f"the {g.name} export", _export_forked, plan, g, model, work)
                        forks.callback(forked[g.name].stop)
                    make, model = _hand_over(model), None  # export_graph frees it when done
                    start = time.perf_counter()
                    self.stats[lead.name], self.part_paths[lead.name] = export_graph(plan, lead, make, work, cuts.decide)
                    for fork in forked.values():
                        fork.send(cuts.weights)
                    self._exported(lead, time.perf_counter() - start)
                    self.float_chains[lead.name] = self._check_float_chain(lead)
                    for g in self.order[1:]:
                        self.stats[g.name], self.part_paths[g.name], seconds, sqnr = forked[g.name].result()
                        self._exported(g, seconds)
                        self.float_chains[g.name] = _done(sqnr)
            else:
                for g in self.order:
                    start = time.perf_counter()
                    decide = cuts.decide if g is lead else cuts.follow
                    self.stats[g.name], self.part_paths[g.name] = export_graph(
                        plan, g, functools.partial(self.spec.load, plan.load), work, decide)
                    self._exported(g, time.perf_counter() - start)
                self.float_chains.update((g.name, self._check_float_chain(g)) for g in self.order)
            release_memory()
            self.n_parts = len(cuts.cuts) + 1
            files = [f for g in self.graphs for path in self.part_paths[g.name] for f in onnx_io.model_files(path)]
            self.cache.put("export", self.k_export, work, files, background=True, meta=(
                self.stats, {g.name: [p.name for p in self.part_paths[g.name]] for g in self.graphs}, self.n_parts))

    def _exports_from_cache(self) -> None:
        entry = self.cache.reuse(self.export_entry, self.work, f"the {len(self.graphs)} graphs' float partitions")
        self.stats, names, self.n_parts = entry.meta
        self.part_paths = {g: [self.work / n for n in per] for g, per in names.items()}
        chains = self.cache.get("float-chains", self.k_float)
        for g in self.graphs:
            self.float_chains[g.name] = _done(chains.meta[g.name]) if chains else self._check_float_chain(g)

    def _check_float_chain(self, g: GraphSpec) -> Future:
        return self.checker.submit(float_chain_sqnr, [str(p) for p in self.part_paths[g.name]],
                                   str(self.work / f"{g.name}_check_samples.npz"), g.output_names)

    def _exported(self, g: GraphSpec, seconds: float) -> None:
        st = self.stats[g.name]
        logger.info("      %s: %d nodes, %s op-output bytes per call (A16), %d partition(s) handing on %d tensors "
                    "(%s per call); %.0f s", g.name, st["node_count"], format_bytes(st["op_output_bytes"]),
                    len(self.part_paths[g.name]), st["handed_over"]["tensors"],
                    format_bytes(st["handed_over"]["bytes_per_call"]), seconds)

    # 3 ---------------------------------------------------------------------------------
    def _partition_keys(self) -> list[str]:
        """Partition k's key holds partition k - 1's: it calibrates on what that one made."""
        plan, keys, previous = self.plan, [], None
        for k in range(self.n_parts):
            previous = step_key("quantize", export=self.k_export, samples=self.k_samples, part=k, previous=previous,
                                precision=plan.precision, gptq_samples=plan.gptq_samples,
                                gptq_target=plan.gptq_target, htp_arch=plan.targets[0].htp_arch)
            keys.append(previous)
        return keys

    def _resume_point(self) -> tuple[list, object]:
        """The cached partitions a build can take (0 .. j - 1) and the hand-off of the last
        of them (what partition j starts from), or ([], None) to start from the samples."""
        done = []
        for key in self.part_keys:
            entry = self.cache.get("quantize", key)
            if entry is None:
                break
            done.append(entry)
        while done:
            handoff = self.cache.get("handoff", self.part_keys[len(done) - 1])
            if handoff is not None:
                return done, handoff
            done.pop()  # its hand-off is gone: that partition is quantized again
        return [], None

    def quantize_partitions(self) -> None:
        """The calibration feeds, GPTQ's among them, go on with aimet's calibration forwards
        (see the module docstring); the check feeds go through each quantized partition.
        Each partition is stored in the cache as it is done, with what the next one starts
        from (its hand-off: the feeds carried this far), so a killed build resumes at the
        partition it was quantizing."""
        plan, work, graphs, cache = self.plan, self.work, self.graphs, self.cache
        precision, targets = plan.precision, plan.targets
        check_high_precision(plan, (onnx_io.load(p) for g in graphs for p in self.part_paths[g.name]))
        self.part_keys = self._partition_keys()
        done, handoff = self._resume_point()
        start = len(done)
        check = {g.name: load_samples(work / f"{g.name}_check_samples.npz") for g in graphs}
        self.refs = {g.name: [[feed.pop(o + REFERENCE_SUFFIX) for o in g.output_names] for feed in check[g.name]]
                     for g in graphs}
        self.check = check
        outputs = {g.name: g.output_names for g in graphs}
        keep = {g.name: chain.inputs_needed_after(self.part_paths[g.name]) for g in graphs}
        if handoff is None:
            calib = {g.name: load_samples(work / f"{g.name}_calibration_inputs.npz") for g in graphs}
            envs = {g.name: [dict(feed) for feed in calib[g.name]] for g in graphs}
            self.check_envs = {g.name: [dict(feed) for feed in check[g.name]] for g in graphs}
            del calib
        else:
            state = pickle.loads((handoff.path / _HANDOFF).read_bytes())
            envs, self.check_envs, float_envs = state["envs"], state["check_envs"], state["float_envs"]
            del state
        compile_now = plan.until in ("compile", "verify")
        label = "quantize W8A16 per partition" + (
            f" ({min(len(envs[g.name]) for g in graphs)} samples per graph)" if start < self.n_parts else "")
        with self.steps.step(label + ("; compile behind it" if compile_now else "")):
            for k, entry in enumerate(done):
                cache.reuse(entry, work, f"partition {k + 1}/{self.n_parts}")
                names, seconds, peaks = entry.meta
                for g in graphs:
                    self.qdq_paths[g.name].append(work / names[g.name])
                self.quantize_seconds.append(seconds)
                self.quantize_peaks.append(peaks)
                if compile_now:
                    self._submit_compiles(k)
            if start == self.n_parts:
                return
            n_calib = min(len(envs[g.name]) for g in graphs)
            picks = gptq_sample_indices(n_calib, self.calls_per_group, plan.gptq_samples)
            # GPTQ's feeds (picks) are calibration feeds whose calibration forwards run on the
            # quantized weights: a quantized chain without the activation rounding (plain GPTQ).
            # With a float GPTQ target, they are also carried by the float partitions.
            if handoff is None:
                float_envs = None
                if self.gptq and plan.gptq_target == "float":
                    float_envs = {g.name: [dict(envs[g.name][i]) for i in picks] for g in graphs}
            for k in range(start, self.n_parts):
                watch, memory = PartTimer(self.compiler, self.tree), self.tree.open_window()
                hessians = None
                if self.gptq:  # one rounding for the weights every graph shares
                    with watch("GPTQ statistics"):
                        hessians = HessianSet(total_feeds=len(picks) * len(graphs))
                        for g in graphs:
                            hessians.accumulate(self.part_paths[g.name][k], [envs[g.name][i] for i in picks],
                                                precision.high_precision,
                                                float_feeds=float_envs[g.name] if float_envs else None)
                            if float_envs:
                                chain.drop_unneeded(float_envs[g.name], keep[g.name][k], outputs[g.name])
                # the family as one model: each weight quantized once, for every graph
                with watch("merge"):
                    merged = shared_weights.merge({g.name: onnx_io.load(self.part_paths[g.name][k]) for g in self.order})
                prefix = f"part{k}_w8a16"
                calib_feeds = shared_weights.merged_feeds(merged, {g.name: envs[g.name] for g in graphs})

                def hand_on(i: int, outs: dict, k: int = k) -> None:
                    # the next partition calibrates on what aimet's calibration forward of
                    # this one produced; feed i's inputs go
                    calib_feeds[i].clear()
                    for g in graphs:
                        if i < len(envs[g.name]):
                            envs[g.name][i].update(shared_weights.own_values(outs, g.name))
                            chain.drop_unneeded([envs[g.name][i]], keep[g.name][k], outputs[g.name])

                passes = pipelines.w8a16(
                    precision, calibration=calib_feeds, htp_arch=targets[0].htp_arch, encodings_dir=work,
                    encodings_prefix=prefix, hessians=hessians,
                    on_output=hand_on if k < self.n_parts - 1 else None,
                    quantized_weight_feeds=picks if self.gptq else (),
                )
                for p in passes:
                    kill_point(f"quantize:{k}:{p.pass_name()}")
                    with watch(_part_label(p)):
                        merged = p(merged).model
                    if hessians is not None and p.pass_name() == "round_weights_gptq":
                        hessians.release()
                qdq = ir.serde.serialize_model(merged)
                del merged, passes, calib_feeds
                release_memory()
                merged_encodings = work / f"{prefix}.encodings"
                files = []
                for g in self.order:
                    with watch("split and save"):
                        graph_qdq = shared_weights.split(qdq, g.name)
                        path = work / f"{g.name}_part{k}_w8a16.onnx"
                        onnx_io.save_proto(graph_qdq, path)
                        weights = {t.name for t in graph_qdq.graph.initializer}
                        shared_weights.split_encodings(merged_encodings, g.name, weights, path.with_suffix(".encodings"))
                        self.qdq_paths[g.name].append(path)
                        files += [*onnx_io.model_files(path), path.with_suffix(".encodings")]
                        del graph_qdq
                    with watch("QDQ chain"):
                        chain.advance(qnn.cpu_session(path), self.check_envs[g.name], keep[g.name][k], outputs[g.name])
                merged_encodings.unlink()
                del qdq
                release_memory()
                rounded = f", {len(hessians.rounded)} weights GPTQ-rounded" if hessians is not None else ""
                self.tree.close_window(memory)
                logger.info("      partition %d/%d quantized%s (%s; %.0f s of it on one thread beside a compile; peak "
                            "RSS %.2f GB, this process %.2f GB)", k + 1, self.n_parts, rounded, watch.summary(),
                            watch.limited, memory.tree / 1e9, memory.main / 1e9)
                self.quantize_seconds.append({part: round(sec, 1) for part, sec in watch.seconds.items()})
                self.quantize_peaks.append({"all_processes": memory.tree, "main_process": memory.main,
                                            "main_process_per_part": dict(watch.peaks)})
                del hessians
                last = k == self.n_parts - 1
                self._store_partition(k, files, {"envs": None if last else envs, "check_envs": self.check_envs,
                                                 "float_envs": None if last else float_envs})
                if compile_now:
                    self._submit_compiles(k)
            del envs, float_envs
            release_memory()

    def _store_partition(self, k: int, files: list[Path], state: dict) -> None:
        """Partition k into the cache, then its hand-off (the state partition k + 1 starts
        from); partition k - 1's hand-off is then no longer needed. In this order, a build
        killed anywhere finds a partition's hand-off only beside the partition itself."""
        cache, key = self.cache, self.part_keys[k]
        names = {g.name: self.qdq_paths[g.name][k].name for g in self.graphs}
        cache.put("quantize", key, self.work, files, (names, self.quantize_seconds[k], self.quantize_peaks[k]),
                  background=True)
        if not cache.enabled:
            return
        handoff = self.work / _HANDOFF
        start = time.perf_counter()
        with open(handoff, "wb") as f:
            pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
        logger.info("      hand-off after partition %d/%d (what a resumed build starts from): %s written in %.1f s",
                    k + 1, self.n_parts, format_bytes(handoff.stat().st_size), time.perf_counter() - start)
        cache.put("handoff", key, self.work, [handoff], background=True)
        handoff.unlink()  # the cache holds it; it is no output
        if k > 0:
            cache.drop("handoff", self.part_keys[k - 1], after_pending=True)

    def _submit_compiles(self, k: int) -> None:
        for target in self.plan.targets:  # one context binary for the partition's graphs
            key = step_key("compile", quantize=self.part_keys[k], target=target)
            entry = self.cache.take("compile", key, self.work,
                                    f"the {target.name} context binary of partition {k + 1}/{self.n_parts}")
            if entry is not None:
                paths, seconds = entry.meta
                future = _done(([qnn.ContextBinary(self.work / m, self.work / b) for m, b in paths], seconds))
            else:
                graphs = [(self.qdq_paths[g.name][k], self.work / target.name / f"{g.name}_part{k}_ctx.onnx")
                          for g in self.order]
                future = self.compiler.submit(qnn.compile_shared_context, graphs, target.name)
                future.add_done_callback(log_compiled(target.name, k, self.n_parts))
                future.add_done_callback(functools.partial(self._store_compile, key))
            self.compiles[target.name, k] = future

    def _store_compile(self, key: str, future: Future) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        built, seconds = future.result()
        rel = [(str(b.epcontext_model.relative_to(self.work)), str(b.binary.relative_to(self.work))) for b in built]
        files = sorted({f for pair in rel for f in pair})
        self.cache.put("compile", key, self.work, files, (rel, seconds), background=True)

    # 4 ---------------------------------------------------------------------------------
    def finish_compiles(self) -> None:
        targets = self.plan.targets
        self.binaries: dict[str, dict[int, dict[str, qnn.ContextBinary]]] = {t.name: {} for t in targets}
        self.compile_seconds: dict[str, dict[str, float]] = {t.name: {} for t in targets}
        with self.steps.step(f"finish the shared-weight context binaries for {', '.join(t.name for t in targets)}"):
            self.compiler.widen()  # nothing left to quantize: waiting compiles may take the second core
            compiling = [self.work / t.name for t in targets]
            self.digests.start(p for p in sorted(self.work.rglob("*"))
                               if p.is_file() and not any(d in p.parents for d in compiling))
            for (name, k), future in self.compiles.items():
                built, seconds = worker_result(future, f"compiling partition {k} for {name}")
                self.binaries[name][k] = {g.name: b for g, b in zip(self.order, built)}
                for g, sec in zip(self.order, seconds):
                    self.compile_seconds[name][g.name] = self.compile_seconds[name].get(g.name, 0.0) + sec

    # 5 ---------------------------------------------------------------------------------
    def check_chains(self) -> None:
        result = self.result
        layer_report = self.opts.layer_report
        if layer_report is None:
            layer_report = self.weight_bytes <= HTP_VERIFY_LIMIT_BYTES
        with self.steps.step("check the float and quantized chains against fp32"):
            chains = {g.name: self.float_chains[g.name].result() for g in self.graphs}  # checked beside the exports
            if not self.cache.has("float-chains", self.k_float):
                self.cache.put("float-chains", self.k_float, self.work, [], chains)
            for g in self.graphs:
                result.sqnr_db.setdefault("float_chain", {})[g.manifest_key] = chains[g.name]
            for g in self.graphs:
                outs = [[env[o] for o in g.output_names] for env in self.check_envs[g.name]]
                result.sqnr_db.setdefault("w8a16_cpu", {})[g.manifest_key] = pooled_sqnr(
                    zip(_flat(self.refs[g.name]), _flat(outs)))
            if layer_report:
                key = step_key("layer-report", quantize=self.part_keys[-1], samples=self.k_samples)
                self.manifest["worst_layers"] = self.cache.run(
                    "layer-report", key, self.work, lambda: (["layer_sqnr.json"], self._layer_report()),
                    "the per-layer report")

    def _layer_report(self, top: int = 10) -> list[dict]:
        """Tensors where the quantized graphs lose most SQNR relative to their inputs."""
        rows = []
        for g in self.order:
            envs = load_samples(self.work / f"{g.name}_calibration_inputs.npz")[:2]
            for k, path in enumerate(self.part_paths[g.name]):
                session = qnn.cpu_session(path)
                feeds = [{x.name: env[x.name] for x in session.get_inputs()} for env in envs]
                for e in layer_errors(path, self.qdq_paths[g.name][k], feeds):
                    rows.append({**(dict(g.describe) or {"graph": g.manifest_key}), "partition": k,
                                 "tensor": e.tensor, "op": e.op_type, "node": e.node, "sqnr_db": round(e.sqnr_db, 2)})
                chain.advance(session, envs)
                del session
        rows = [r for r in rows if math.isfinite(r["sqnr_db"])]
        (self.work / "layer_sqnr.json").write_text(json.dumps(rows, indent=1) + "\n")
        return sorted(rows, key=lambda r: r["sqnr_db"])[:top]

    # 6 ---------------------------------------------------------------------------------
    def check_htp(self) -> None:
        verify_htp = self.opts.verify_htp
        if verify_htp is None:
            verify_htp = self.weight_bytes <= HTP_VERIFY_LIMIT_BYTES
        if not verify_htp:
            logger.info("      HTP simulator check skipped for a model this size (--verify-htp forces it)")
            self.steps.total -= 1
            return
        target = self.plan.targets[0]
        with self.steps.step("run non-shared binaries chained in the HTP simulator"):
            key = step_key("htp-check", quantize=self.part_keys[-1], samples=self.k_samples, target=target)
            self.result.sqnr_db["htp_simulator"] = self.cache.run(
                "htp-check", key, self.work, lambda: self._simulate_chains(target), "the HTP simulator's check")

    def _simulate_chains(self, target) -> tuple[list[Path], dict[str, float]]:
        sqnr = {}
        for g in self.graphs:
            sessions = []
            for k in range(self.n_parts):
                ctx = qnn.compile_context_binary(self.qdq_paths[g.name][k],
                                                 self.work / "htp_check" / f"{g.name}_part{k}_ctx.onnx", target)
                sessions.append(qnn.htp_session(ctx.epcontext_model, target))
            outs = chain.run_chain(sessions, self.check[g.name], g.output_names)
            sqnr[g.manifest_key] = pooled_sqnr(zip(_flat(self.refs[g.name]), _flat(outs)))
            del sessions
        return sorted(p for p in (self.work / "htp_check").rglob("*") if p.is_file()), sqnr

    # 7 ---------------------------------------------------------------------------------
    def write_outputs(self) -> FamilyResult:
        manifest, result = self.manifest, self.result
        with self.steps.step("write the manifest and report"):
            self.cache.wait()  # the entries stored in the background, whose digests the manifest takes
            manifest["partitions"] = self._partition_entries()
            manifest["stage_graphs"] = {
                g.manifest_key: {"stats_a16": {k: v for k, v in self.stats[g.name].items() if k != "handed_over"},
                                 "handed_over": self.stats[g.name]["handed_over"]}
                for g in self.graphs
            }
            if self.plan.until != "export":
                manifest["quantize_seconds"] = self.quantize_seconds
                manifest["quantize_peak_rss_bytes"] = self.quantize_peaks
            if self.plan.until in ("compile", "verify"):
                manifest["compile_seconds"] = {
                    t: {k: round(v, 1) for k, v in ((g.manifest_key, per[g.name]) for g in self.graphs)}
                    for t, per in self.compile_seconds.items()}
            manifest["verification"] = {
                kind: {s: round(v, 2) for s, v in per.items()} for kind, per in result.sqnr_db.items()
            }
            manifest["steps"] = self.steps.as_list()
            manifest["cache"] = self.cache.summary()
            self.failing = {}
            if self.plan.until != "export":
                gate = "htp_simulator" if "htp_simulator" in result.sqnr_db else "w8a16_cpu"
                self.failing = {s: v for s, v in result.sqnr_db[gate].items() if v < self.plan.min_sqnr_db}
                manifest["verification"]["gate"] = {"kind": gate, "threshold_db": self.plan.min_sqnr_db,
                                                    "passed": not self.failing}
                self.gate = gate
            (self.work / "report.txt").write_text(self._render())
            artifacts.write_manifest(self.work, manifest, self.digests)
        return result

    def _partition_entries(self) -> list[dict]:
        work, quantized = self.work, self.plan.until != "export"
        binaries = getattr(self, "binaries", {})
        entries = []
        for k in range(self.n_parts):
            files = self.qdq_paths if quantized else self.part_paths
            interfaces = {g.name: onnx_io.file_interface(files[g.name][k]) for g in self.graphs}
            entry = {"index": k, ("weight_bytes_qdq" if quantized else "weight_bytes_float"):
                     interfaces[self.order[0].name][1], "graphs": {}}
            for g in self.graphs:
                graph_entry = {"float_model": self.part_paths[g.name][k].name}
                if quantized:
                    graph_entry["qdq_model"] = self.qdq_paths[g.name][k].name
                    graph_entry["encodings"] = self.qdq_paths[g.name][k].with_suffix(".encodings").name
                graph_entry.update(interfaces[g.name][0])
                if quantized:
                    graph_entry["binaries"] = {
                        t: {"epcontext_model": str(b[k][g.name].epcontext_model.relative_to(work)),
                            "binary": str(b[k][g.name].binary.relative_to(work))}
                        for t, b in binaries.items()
                    }
                entry["graphs"][g.manifest_key] = graph_entry
            entries.append(entry)
        return entries

    def _render(self) -> str:
        manifest, result, targets = self.manifest, self.result, self.plan.targets
        title = f"{self.spec.name} {self.plan.config}, {self.spec.family_label} -> " \
                f"{', '.join(t.description for t in targets)}"
        lines = [title, "=" * len(title), "", f"Host: {host_line(manifest['host'])}; the compile workers' malloc: "
                 f"{manifest['compile_allocator']}", "", *model_lines(manifest["model"]),
                 "Steps (CPU time of this process and its workers; peak RSS within the step: all "
                 "processes / this one alone):"]
        records = self.steps.records
        for r in records:
            lines.append(f"  {r.name:<72} {r.seconds:8.1f} s  CPU {r.cpu_seconds:7.0f} s  peak RSS "
                         f"{r.peak_rss_bytes / 1e9:5.2f} / {r.main_peak_rss_bytes / 1e9:5.2f} GB")
        lines.append(f"  {'the steps above (this report is written in the last one)':<72} "
                     f"{sum(r.seconds for r in records):8.1f} s  CPU {sum(r.cpu_seconds for r in records):7.0f} s  "
                     f"peak RSS {max(r.peak_rss_bytes for r in records) / 1e9:5.2f} GB")
        weight_key = "weight_bytes_qdq" if self.plan.until != "export" else "weight_bytes_float"
        lines += ["", f"{self.n_parts} partition(s) per graph; weights per partition "
                      f"({'QDQ' if weight_key.endswith('qdq') else 'fp32'}):"]
        for p in manifest["partitions"]:
            lines.append(f"  partition {p['index']}: {format_bytes(p[weight_key])}")
        if manifest.get("quantize_seconds"):
            totals: dict[str, float] = {}
            for per in manifest["quantize_seconds"]:
                for part, sec in per.items():
                    totals[part] = totals.get(part, 0.0) + sec
            lines += ["", "Quantization time (all partitions): " + ", ".join(f"{p} {s:.0f} s" for p, s in totals.items())]
        if manifest.get("compile_seconds"):
            lines += ["", "Context binary build time per graph (all partitions):"]
            for t, per in manifest["compile_seconds"].items():
                lines.append(f"  {t:<10} " + "   ".join(f"{s}: {v:7.1f} s" for s, v in per.items()))
        if result.sqnr_db:
            lines += ["", f"SQNR against the {self.spec.reference_note or 'fp32 PyTorch model'} (check samples, "
                          "not used for calibration):"]
            for kind, per in result.sqnr_db.items():
                lines.append(f"  {kind:<16} " + "   ".join(f"{s}: {v:6.2f} dB" for s, v in per.items()))
        if manifest.get("worst_layers"):
            lines += ["", "Tensors with the lowest SQNR in the quantized partitions (see layer_sqnr.json):"]
            for r in manifest["worst_layers"]:
                where = " ".join(f"{k} {v}" for k, v in r.items() if k not in ("partition", "tensor", "op", "node", "sqnr_db"))
                lines.append(f"  {where} part {r['partition']} {r['op']:<12} {r['sqnr_db']:7.2f} dB  {r['tensor']}")
        return "\n".join(lines) + "\n"


def _part_label(p) -> str:
    """How a pass's time is labelled in the per-partition timings."""
    return {"round_weights_gptq": "GPTQ rounding", "quantize_w8a16": "aimet"}.get(p.pass_name(), "aimet")


def build_family(plan: BuildPlan, out_dir: str | Path) -> FamilyResult:
    """Build ``plan``'s graphs as a family into ``out_dir`` (replaced atomically on success),
    through the step cache (:mod:`.cache`)."""
    tree = TreePeak()  # worker processes count towards the peak
    root = cache_root(out_dir, plan.options.cache_dir, plan.options.cache)
    with artifacts.Digests() as digests, StepCache(root, digests) as cache:
        with tree, staged_build_dir(plan, out_dir) as work, compile_workers() as compiler, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="float-chain") as checker:
            build = _Family(plan, work, tree, compiler, digests, checker, cache)
            result = build.run()
        logger.info(cache.finish())
    result.out_dir = Path(out_dir)
    if build.failing:
        worst = ", ".join(f"{s} {v:.1f} dB" for s, v in sorted(build.failing.items()))
        raise BuildCheckError(
            f"{build.gate} SQNR below {plan.min_sqnr_db:.0f} dB ({worst}); artefacts kept in {out_dir}, see report.txt"
        )
    return result
