"""``build denoiser --all-stages``: the three stage graphs, partitioned, quantized and emitted
as shared-weight context binaries, one per partition and target.

The three stage graphs hold the same weights at different sequence lengths. They are cut
at the same places (partition k holds the same weights in every stage) and quantized one
partition at a time: the partition's three stage graphs are merged into one model
(:mod:`graphs.stage_merge`), so aimet handles each weight once -- one GPTQ rounding, one
encoding for every stage -- while each stage's activations get their own encodings.
Partition k + 1 calibrates on the outputs of aimet's calibration forwards of partition k
(activations passed through while aimet observes them; weights quantized in the first
forward and GPTQ's, float in the others, where GPTQ has put most on their int8 grid
already): what aimet's
calibration of the whole model, which does not fit in memory, would hand it, with each
calibration feed run once per partition. GPTQ's few feeds are calibration feeds whose
forwards keep the weights quantized; only the check feeds go through the quantized (QDQ)
partitions. Each quantized partition is handed to a worker process that
compiles its three graphs into one context binary storing the weights once, while this
process quantizes the next partition, on one thread while a compile runs; the QNN
compiler is single-threaded, so the two overlap on two cores, and once quantization is
done a second worker takes compiles still waiting. Every step hands files to the next and
drops its big objects, so memory stays bounded by one partition's quantization plus the
compiles.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import math
import multiprocessing
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnx_ir as ir

from neodragon_npu.tools.engine import artifacts

from neodragon_npu.graphs import onnx_io, partition, qnn, shared_weights as stage_merge
from neodragon_npu.tools.engine.forked import Forked
from neodragon_npu.graphs import fx as fx_utils
from neodragon_npu.graphs.export import exported_model
from neodragon_npu.graphs.quant.gptq import HessianSet
from neodragon_npu.tools.engine.host import describe_host, host_line
from neodragon_npu.graphs.quant.layerwise import layer_errors
from neodragon_npu.tools.engine.progress import Steps, Stopwatch, TreePeak, count, release_memory
from neodragon_npu.graphs.feeds import load_samples, save_samples, to_numpy_feed
from neodragon_npu.graphs.stats import format_bytes
from neodragon_npu.graphs.targets import DEFAULT_TARGET, get_target
from neodragon_npu.graphs.verify import sqnr_db
from neodragon_npu.neodragon_models import pyramid
from neodragon_npu.neodragon_models.configs import get_denoiser_config
from neodragon_npu.neodragon_models.sampling import collect_samples, example_stage_inputs
from neodragon_npu.graphs.verify import verify_fx
from neodragon_npu.tools.engine.single import (
    FX_PIPELINES,
    BuildCheckError,
    OUTPUT_NAME,
    _run_passes,
    check_weight_rounding,
    manifest_model,
    manifest_quantization,
    manifest_target,
    optimize_stage_model,
    load_denoiser,
    stage_fx_passes,
)
from neodragon_npu.passes.onnx.quantize_w8a16 import QuantizeW8A16Pass
from neodragon_npu.passes.onnx.round_weights_gptq import RoundWeightsGPTQPass
from neodragon_npu.passes.pipelines import DENOISER_HIGH_PRECISION

logger = logging.getLogger("neodragon_npu")

# fp32 weight bytes one partition may hold: bounds aimet's QuantSim memory (a 4-block,
# 1.36 GB partition peaked at 16.3 GB here) and, at int8, the compile size (< 2 GiB).
DEFAULT_PARTITION_WEIGHT_BYTES = 768 << 20
# The build fails below this (per stage). A sanity gate that catches a broken binary: the
# tiny model's stage 0 reaches 29 dB in the HTP simulator (its 16 tokens and 32-wide layers
# under 18x adaLN modulations), the fidelity targets are measured by `neodragon-npu bench`.
ALL_STAGES_MIN_SQNR_DB = 25.0
# Simulating the HTP is slow (~98 s per full-width block at 1728 tokens): by default the
# chained binaries are run in the simulator only for models up to this many weight bytes.
HTP_VERIFY_LIMIT_BYTES = 256 << 20
# fp32 weights up to which the stage exports share the sampled model (forked, three exports
# at once) instead of exporting one after the other, each on a rebuilt model
SHARED_EXPORT_LIMIT_BYTES = 7 << 30
GPTQ_TARGETS = ("float", "quantized")


@dataclass
class AllStagesOptions:
    config: str = "tiny"
    targets: tuple[str, ...] = (DEFAULT_TARGET,)
    checkpoint: Path | None = None
    seed: int = 0
    calibration_samples: int = 8  # per stage
    check_prompts: int = 1
    check_samples: int | None = 2  # per stage (None: every call of the check prompts)
    max_partition_weight_bytes: int = DEFAULT_PARTITION_WEIGHT_BYTES
    kv_bits: int = 16
    high_precision: tuple[str, ...] = DENOISER_HIGH_PRECISION
    weight_rounding: str = "gptq"  # or "nearest"
    gptq_samples: int = 2  # calibration calls per stage whose inputs feed the GPTQ Hessians
    # "quantized": plain GPTQ on the inputs of the chain with quantized weights (aimet's
    # calibration forwards; activations not rounded); "float": aimed at the float chain's
    # layer outputs (measured worse with 2 GPTQ calls per stage: it overfits)
    gptq_target: str = "quantized"
    remove_blocks: str | None = None
    importance: Path | None = None
    skip_passes: tuple[str, ...] = ()
    verify_htp: bool | None = None  # None: only for small models
    layer_report: bool | None = None  # None: only for small models
    exporter: str = "legacy"
    fx_pipeline: str = "optimized"
    verify_each_pass: bool = False
    dump_dir: Path | None = None
    min_sqnr_db: float = ALL_STAGES_MIN_SQNR_DB

    def validate(self) -> None:
        cfg = get_denoiser_config(self.config)
        if not self.targets:
            raise ValueError("give at least one target")
        for t in self.targets:
            get_target(t)
        if self.calibration_samples < 1 or self.check_prompts < 1:
            raise ValueError("need at least one calibration sample per stage and one check prompt")
        if self.fx_pipeline not in FX_PIPELINES:
            raise ValueError(f"unknown FX pipeline {self.fx_pipeline!r}")
        if self.max_partition_weight_bytes <= 0:
            raise ValueError("the partition weight budget must be positive")
        check_weight_rounding(self.weight_rounding)
        if self.gptq_samples < 1:
            raise ValueError("gptq_samples must be at least 1")
        if self.gptq_target not in GPTQ_TARGETS:
            raise ValueError(f"gptq_target must be one of {GPTQ_TARGETS}, got {self.gptq_target!r}")
        del cfg


@dataclass
class StagesResult:
    out_dir: Path
    manifest: dict
    sqnr_db: dict[str, dict[int, float]] = field(default_factory=dict)  # kind -> stage -> dB


def _stage_samples(denoiser, opts: AllStagesOptions, stages):
    """Calibration (first N per stage) and check samples from disjoint prompts."""
    units = len(denoiser.config.geometry.denoised_units)
    n_prompts = math.ceil(opts.calibration_samples / units)
    calib_seeds = list(range(1000, 1000 + n_prompts))
    check_seeds = list(range(2000, 2000 + opts.check_prompts))
    # each prompt runs only the units (calls per stage) that are needed
    limits = {seed: min(units, opts.calibration_samples - i * units) for i, seed in enumerate(calib_seeds)}
    if opts.check_samples is not None:
        # the check prompts in turn: N check calls from P prompts run ceil(N / P) units each
        # (with 2 and 2, unit 1 of both; the rollouts used to run 2 units of each and keep
        # the first prompt's two, 6 of the full-size float pipeline's 36 calls for nothing)
        per_prompt = math.ceil(opts.check_samples / len(check_seeds))
        limits.update({seed: min(units, per_prompt) for seed in check_seeds})
    samples = collect_samples(
        denoiser, calib_seeds + check_seeds, stages, progress=lambda i, n: count("prompt", i, n), units_per_prompt=limits
    )
    calib = {s: [x for x in samples[s] if x.prompt_seed in calib_seeds][: opts.calibration_samples] for s in stages}

    def in_turn(x):
        return x.unit, check_seeds.index(x.prompt_seed)

    check = {s: sorted((x for x in samples[s] if x.prompt_seed in check_seeds), key=in_turn)[: opts.check_samples]
             for s in stages}
    return calib, check


def gptq_sample_indices(n_calib: int, calls_per_prompt: int, count: int) -> list[int]:
    """The calibration calls whose inputs feed the GPTQ Hessians: the prompts in turn, each
    prompt's latest unit first (the last call of every prompt, then the one before, ...).
    Calibration calls are stored prompt by prompt, ``calls_per_prompt`` each (the last
    prompt may hold fewer).

    Prompts in turn: the context stream's tokens are the same in every call of one prompt,
    so two calls of one prompt give its Linears a Hessian of rank 128 for K = 1536. Two
    calls of two prompts against two of one, on held-out prompts: -0.03 to +0.65 dB per
    Linear, +0.3 dB on average (13 Linears of blocks 0 and 8, full size).
    Latest unit first: a unit's image tokens grow with its history, and the envelope pads
    the early units at the front with identical rows (200 of stage 0's 280 in unit 1),
    which weigh in the Hessian as one row repeated. Units 6 and 2 against units 1 and 1
    (the two prompts' calls 5 and 7 against 0 and 6): -0.12 to +0.24 dB per Linear held
    out, +0.06 dB on average (the 9 GPTQ'd Linears of block 2, full size)."""
    prompts = math.ceil(n_calib / calls_per_prompt)
    per_prompt = [list(range(p * calls_per_prompt, min((p + 1) * calls_per_prompt, n_calib)))[::-1] for p in range(prompts)]
    order = [calls[c] for c in range(calls_per_prompt) for calls in per_prompt if c < len(calls)]
    return order[:count]


def _write_stage_samples(denoiser, opts: AllStagesOptions, work: Path, stages: list[int]) -> None:
    """Run the float pipeline and write each stage's calibration and check sample files
    (the check files hold the fp32 outputs too)."""
    calib, check = _stage_samples(denoiser, opts, stages)
    for s in stages:
        save_samples(work / f"stage{s}_calibration_inputs.npz", [to_numpy_feed(x.inputs) for x in calib[s]])
        save_samples(
            work / f"stage{s}_check_samples.npz",
            [{**to_numpy_feed(x.inputs), f"{OUTPUT_NAME}_fp32": x.output.numpy()} for x in check[s]],
        )


@dataclass
class _CutPlan:
    """Where the stage graphs are cut: set by the first (largest) stage graph exported; the
    others take the cuts that give each partition the same weights."""
    max_weight_bytes: int
    cuts: list[int] | None = None
    weights: list[set[str]] | None = None

    def parts(self, prof: partition.Profile) -> list[int]:
        if self.cuts is None:
            self.cuts = partition.plan_cuts(prof, max_weight_bytes=self.max_weight_bytes)
            self.weights = partition.partition_weights(prof, self.cuts)
            return partition.cuts_to_parts(prof, self.cuts)
        return partition.align_parts(prof, self.weights)


def _export_stage(opts: AllStagesOptions, stage: int, make, work: Path, parts_for) -> tuple[dict, list[Path]]:
    """Trace one stage graph at its envelope shapes, run the FX passes, export it, run the
    ONNX passes and save it cut into partitions (``parts_for(profile)`` gives each node's
    partition: :meth:`_CutPlan.parts`); returns its A16 stats and the partition files.
    ``make()`` gives the PyTorch model to trace (the FX passes edit its parameters); only
    this function holds it.

    The whole stage graph is never written: the ONNX passes and the cuts work on the
    exported model, whose weights stay in memory until the partitions are saved (writing it
    out and reading it back took 40 s per full-size stage graph)."""
    model = make()
    config = model.config
    inputs = example_stage_inputs(model, stage)
    example = [inputs[n] for n in pyramid.STAGE_INPUT_NAMES]
    gm = fx_utils.trace(model.stage_module(stage), example, share_parameters=True)
    del model, inputs
    _run_passes(gm, stage_fx_passes(opts, config, get_target(opts.targets[0]), stage), verify_fx, opts, lambda g: g.code)
    with exported_model(gm, example, work, input_names=pyramid.STAGE_INPUT_NAMES, output_names=[OUTPUT_NAME],
                        exporter=opts.exporter) as onnx_model:
        del gm  # the ONNX model holds the weights it uses, not the module
        release_memory()
        stats = optimize_stage_model(onnx_model, opts, {})
        onnx_model = partition.prepare(onnx_model)
        prof = partition.profile(onnx_model)
        partition.annotate(onnx_model, prof, parts_for(prof))
        parts = partition.split(onnx_model)
        stats["handed_over"] = dict(zip(("tensors", "bytes_per_call"), partition.handed_over(parts)))
        paths = [onnx_io.save(part, work / f"stage{stage}_part{k}_float.onnx") for k, part in enumerate(parts)]
        del onnx_model, prof, parts
    release_memory()
    return stats, paths


def _export_forked(receive, opts: AllStagesOptions, stage: int, model, work: Path) -> tuple[dict, list[Path], float, float]:
    """:func:`_export_stage` in a forked process (:class:`graphs.forked.Forked`), on the
    parent's model as the fork shares it (the FX passes' edits stay in this process). The
    cuts come from the parent, which exports the largest stage meanwhile: ``receive()``
    gives each partition's weights once it has them. Then the float chain is checked here
    (:func:`_float_chain_sqnr`). Returns the A16 stats, the partition files, the export's
    seconds and the float chain's SQNR."""
    start = time.perf_counter()
    stats, paths = _export_stage(opts, stage, _hand_over(model), work,
                                 lambda prof: partition.align_parts(prof, receive()))
    seconds = time.perf_counter() - start
    return stats, paths, seconds, _float_chain_sqnr([str(p) for p in paths], str(work / f"stage{stage}_check_samples.npz"))


def _hand_over(obj):
    """A ``make()`` that returns ``obj`` once and keeps no reference to it afterwards."""
    box = [obj]
    return box.pop


def _drop_unneeded(envs: list[dict], keep: set[str]) -> None:
    """Drop every tensor but those in ``keep`` and the final output from each environment."""
    for env in envs:
        for name in set(env) - keep - {OUTPUT_NAME}:
            del env[name]


def _advance(session, envs: list[dict], keep: set[str] | None = None) -> None:
    """Run one partition on every environment (tensor name -> value) and add its outputs;
    with ``keep``, drop every tensor but those and the final output afterwards."""
    inputs = [x.name for x in session.get_inputs()]
    names = [o.name for o in session.get_outputs()]
    for env in envs:
        env.update(zip(names, qnn.run(session, {n: env[n] for n in inputs})))
    if keep is not None:
        _drop_unneeded(envs, keep)


def _run_chain(parts: list, feeds: list[dict], threads: int | None = None) -> list[np.ndarray]:
    """Run partitions (sessions, or model paths run on the CPU) in order on every feed,
    keeping only the tensors later partitions read."""
    outputs = [dict(f) for f in feeds]
    for part, keep in zip(parts, _inputs_needed_after(parts)):
        _advance(qnn.cpu_session(part, threads=threads) if isinstance(part, (str, Path)) else part, outputs, keep)
    return [env[OUTPUT_NAME] for env in outputs]


def _pooled(refs: list[np.ndarray], outs: list[np.ndarray]) -> float:
    return sqnr_db(np.concatenate([r.ravel() for r in refs]), np.concatenate([o.ravel() for o in outs]))


def _float_chain_sqnr(part_paths: list[str], check_npz: str) -> float:
    """SQNR of the float partitions run in sequence against the fp32 PyTorch output, on the
    first check call: the chain reproduces the unsplit graph on every input or a cut is
    wired wrong, so more calls would repeat the check (each is a full-size float forward,
    run beside the stage exports)."""
    feeds = load_samples(check_npz)[:1]
    refs = [f.pop(f"{OUTPUT_NAME}_fp32") for f in feeds]
    return _pooled(refs, _run_chain(part_paths, feeds, threads=1))


class _Compiler:
    """The QNN compiler is single-threaded: compiles run in worker processes, one at a time
    while this process quantizes (the two share the two cores), as many as ``wide`` once it
    is done (:meth:`widen`). A job waits here, not in the pool's queue, until a slot frees."""

    def __init__(self, pool: ProcessPoolExecutor, wide: int = 2, allocator: str | None = None) -> None:
        self.pool, self.wide = pool, wide
        self.limit, self.running = 1, 0
        self.allocator = allocator  # the malloc library the workers preload (None: glibc's)
        self.waiting: collections.deque = collections.deque()
        self.lock = threading.RLock()  # a job already done calls back at once, in _start

    def submit(self, fn, *args) -> Future:
        outer: Future = Future()
        with self.lock:
            self.waiting.append((outer, fn, args))
            self._start()
        return outer

    @property
    def busy(self) -> bool:
        """A compile is running or waiting."""
        with self.lock:
            return self.running > 0 or bool(self.waiting)

    def widen(self) -> None:
        with self.lock:
            self.limit = self.wide
            self._start()

    def _start(self) -> None:  # with the lock held
        while self.waiting and self.running < self.limit:
            outer, fn, args = self.waiting.popleft()
            if not outer.set_running_or_notify_cancel():
                continue
            self.running += 1
            try:
                inner = self.pool.submit(fn, *args)
            except BaseException as exc:  # a broken or shut-down pool
                self.running -= 1
                outer.set_exception(exc)
                continue
            inner.add_done_callback(functools.partial(self._finished, outer))

    def _finished(self, outer: Future, inner: Future) -> None:
        with self.lock:
            self.running -= 1
            self._start()
        if inner.cancelled():
            outer.set_exception(RuntimeError("the compile was cancelled"))
        elif inner.exception() is not None:
            outer.set_exception(inner.exception())
        else:
            outer.set_result(inner.result())

    def cancel_waiting(self) -> None:
        with self.lock:
            while self.waiting:
                self.waiting.popleft()[0].cancel()


@contextlib.contextmanager
def _background_worker():
    """Worker processes for the QNN compiler (:class:`_Compiler`), which overlap the
    quantization in this process. Spawned, so they hold none of this process's memory, and
    one per job: a worker kept about 2 GB after compiling a full-size partition, and the
    pool, which starts a second worker when a job is submitted from the previous job's
    callback, kept an idle one all through the quantization. A fresh worker holds 12-18 MB
    until its job arrives, and then imports only :mod:`graphs.qnn` (47 MB). The workers
    preload :func:`graphs.qnn.compile_allocator` (the compile allocates heavily). On failure
    or Ctrl-C, waiting work is cancelled and the running compiles stopped."""
    allocator = qnn.compile_allocator()
    with qnn.preloaded_in_new_processes(allocator):  # the pool starts workers as jobs come
        pool = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"),
                                   max_tasks_per_child=1)
        compiler = _Compiler(pool, allocator=allocator)
        try:
            yield compiler
        except BaseException:
            # A failed or interrupted build discards the workers' results: stop them now instead
            # of waiting for the compiles under way (about two minutes per full-size partition).
            compiler.cancel_waiting()
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
            raise
        finally:
            compiler.cancel_waiting()
            pool.shutdown(wait=True, cancel_futures=True)


class _Parts(Stopwatch):
    """Times the parts of one partition's quantization (``with watch("aimet"): ...``) and runs
    each on one thread if a compile is running or waiting as it starts (see
    :func:`graphs.qnn.thread_limit`); ``limited`` is the seconds spent so."""

    def __init__(self, compiler: _Compiler) -> None:
        super().__init__()
        self.compiler, self.limited = compiler, 0.0

    @contextlib.contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        threads = 1 if self.compiler.busy else None
        start = time.perf_counter()
        with super().__call__(part), qnn.thread_limit(threads):
            yield
        if threads:
            self.limited += time.perf_counter() - start


def _tag(stage: int) -> str:
    return f"stage{stage}"


def _log_compiled(target: str, k: int, n_parts: int):
    def log(future: Future) -> None:
        if not future.cancelled() and future.exception() is None:
            logger.info("      %s partition %d/%d compiled in the background (%.0f s)",
                        target, k + 1, n_parts, sum(future.result()[1]))
    return log


def _worker_result(future: Future, what: str):
    try:
        return future.result()
    except BrokenProcessPool:
        raise RuntimeError(
            f"the worker process died while {what} (a Python error it hit is printed above; "
            "if none is, the kernel killed it, usually for memory: see dmesg); nothing was written"
        ) from None


def _input_names(part) -> set[str]:
    if isinstance(part, (str, Path)):
        return {i.name for i in onnx.load(str(part), load_external_data=False).graph.input}
    return {i.name for i in part.get_inputs()}


def _inputs_needed_after(parts: list) -> list[set[str]]:
    """For each partition k (a model path or a session), the tensor names partitions after k
    read (what a chain must keep)."""
    inputs = [_input_names(p) for p in parts]
    needed, later = [], set()
    for names in reversed(inputs):
        needed.append(set(later))
        later |= names
    return needed[::-1]


def build_denoiser_stages(opts: AllStagesOptions, out_dir: str | Path) -> StagesResult:
    opts.validate()
    config = get_denoiser_config(opts.config)
    stages = list(range(config.geometry.num_stages))
    targets = [get_target(t) for t in opts.targets]
    tree = TreePeak()  # worker processes count towards the peak
    steps = Steps(7, tree=tree)
    manifest: dict = {
        "host": describe_host(),
        "pipeline": "denoiser",
        "mode": "all-stages",
        "model": manifest_model(config, opts),
        "targets": [manifest_target(t) for t in targets],
        "quantization": {
            **manifest_quantization(opts),
            **({"gptq_target": opts.gptq_target} if opts.weight_rounding == "gptq" else {}),
        },
    }
    result = StagesResult(Path(out_dir), manifest)

    with tree, artifacts.staged_dir(out_dir) as work, _background_worker() as worker, artifacts.Digests() as digests, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="float-chain") as checker:
        manifest["compile_allocator"] = worker.allocator or "glibc"
        if worker.allocator is None:
            logger.info("      the compile workers use glibc's malloc: no jemalloc found (make setup unpacks one "
                        "into the environment; the compiles take about a fifth longer without it)")
        # 1. The PyTorch model and pipeline samples for every stage.
        with steps.step("build the model and run the float pipeline for samples"):
            denoiser = load_denoiser(opts, work, manifest)
            config = denoiser.config
            _write_stage_samples(denoiser, opts, work, stages)
            weight_bytes = sum(p.numel() * 4 for p in denoiser.transformer.parameters())
            weight_bytes += sum(p.numel() * 4 for p in denoiser.context_adapter.parameters())
            # the stage exports below share this model; past this size each rebuilds its own
            share_model = weight_bytes <= SHARED_EXPORT_LIMIT_BYTES
            if not share_model:
                del denoiser
                release_memory()

        # 2. One float graph per stage: FX passes, export, ONNX passes, and the same cuts in
        #    every stage graph (the largest stage decides), saved as partitions. The largest
        #    stage exports here while the others export in forked processes, which share the
        #    model copy-on-write (each export keeps about one core busy), and check their float
        #    chains; past SHARED_EXPORT_LIMIT_BYTES the stages export one after the other,
        #    each on a rebuilt model. The float partitions are hashed for the manifest as they
        #    come.
        #    (Running the samples in the worker beside the exports saved 22 s at full size,
        #    862 s against 884 s, and peaked at 18.2 GB against 9.3 GB: both are memory-bound.)
        part_paths: dict[int, list[Path]] = {}
        stage_stats: dict[int, dict] = {}
        float_chains: dict[int, Future] = {}

        def check_float_chain(s: int) -> Future:
            return checker.submit(_float_chain_sqnr, [str(p) for p in part_paths[s]],
                                  str(work / f"stage{s}_check_samples.npz"))

        def exported(s: int, seconds: float) -> None:
            digests.start(f for path in part_paths[s] for f in onnx_io.model_files(path))
            logger.info("      stage %d: %d nodes, %s op-output bytes per call (A16), %d partition(s) handing "
                        "on %d tensors (%s per call); %.0f s", s, stage_stats[s]["node_count"],
                        format_bytes(stage_stats[s]["op_output_bytes"]), len(part_paths[s]),
                        stage_stats[s]["handed_over"]["tensors"],
                        format_bytes(stage_stats[s]["handed_over"]["bytes_per_call"]), seconds)

        plan = _CutPlan(opts.max_partition_weight_bytes)
        # largest stage first: its graph sets the cuts, and opens each shared context binary
        order = sorted(stages, reverse=True)
        with steps.step("trace, optimize, export and partition the three stage graphs"):
            if share_model:
                with contextlib.ExitStack() as forks:
                    forked = {}
                    for s in order[1:]:
                        forked[s] = Forked(f"the stage-{s} export", _export_forked, opts, s, denoiser, work)
                        forks.callback(forked[s].stop)
                    make, denoiser = _hand_over(denoiser), None  # _export_stage frees it when done
                    start = time.perf_counter()
                    stage_stats[order[0]], part_paths[order[0]] = _export_stage(opts, order[0], make, work, plan.parts)
                    for fork in forked.values():
                        fork.send(plan.weights)
                    exported(order[0], time.perf_counter() - start)
                    float_chains[order[0]] = check_float_chain(order[0])
                    for s, fork in forked.items():
                        stage_stats[s], part_paths[s], seconds, sqnr = fork.result()
                        exported(s, seconds)
                        float_chains[s] = Future()
                        float_chains[s].set_result(sqnr)
            else:
                for s in order:
                    start = time.perf_counter()
                    stage_stats[s], part_paths[s] = _export_stage(opts, s, functools.partial(load_denoiser, opts), work,
                                                                  plan.parts)
                    exported(s, time.perf_counter() - start)
                float_chains.update((s, check_float_chain(s)) for s in order)
            release_memory()
            n_parts = len(plan.cuts) + 1
        calib = {s: load_samples(work / f"stage{s}_calibration_inputs.npz") for s in stages}
        check = {s: load_samples(work / f"stage{s}_check_samples.npz") for s in stages}
        refs = {s: [feed.pop(f"{OUTPUT_NAME}_fp32") for feed in check[s]] for s in stages}
        verify_htp = opts.verify_htp if opts.verify_htp is not None else weight_bytes <= HTP_VERIFY_LIMIT_BYTES
        layer_report = opts.layer_report if opts.layer_report is not None else weight_bytes <= HTP_VERIFY_LIMIT_BYTES

        # The samples are final: hash them for the manifest now, on a background thread, as
        # the float partitions are (18 GB at full size), not in the last step.
        digests.start(p for p in sorted(work.iterdir()) if p.is_file())
        # The worker compiles each partition once quantized.
        compiles: dict[tuple[str, int], Future] = {}

        # 3. Quantize partition by partition, the three stages merged: weights once,
        #    activations per stage. The calibration feeds, GPTQ's among them, go on with
        #    aimet's calibration forwards (see the module docstring); the check feeds go
        #    through each quantized partition in turn.
        qdq_paths: dict[int, list[Path]] = {s: [] for s in stages}
        quantize_seconds: list[dict[str, float]] = []  # per partition: where the time went
        quantize_peaks: list[dict[str, int]] = []  # per partition: peak RSS while it was quantized
        envs = {s: [dict(feed) for feed in calib[s]] for s in stages}
        check_envs = {s: [dict(feed) for feed in check[s]] for s in stages}
        keep = {s: _inputs_needed_after(part_paths[s]) for s in stages}
        n_calib = min(len(calib[s]) for s in stages)
        picks = gptq_sample_indices(n_calib, len(config.geometry.denoised_units), opts.gptq_samples)
        # GPTQ's samples are calibration feeds (picks) whose calibration forwards run on the
        # quantized weights: a quantized chain without the activation rounding (plain GPTQ).
        # With a float GPTQ target, they are also carried by the float partitions.
        gptq = opts.weight_rounding == "gptq"
        float_envs = None
        if gptq and opts.gptq_target == "float":
            float_envs = {s: [dict(calib[s][i]) for i in picks] for s in stages}
        with steps.step(f"quantize W8A16 per partition ({opts.calibration_samples} samples per stage); compile behind it"):
            for k in range(n_parts):
                watch, memory = _Parts(worker), tree.open_window()
                hessians = None
                if gptq:  # one rounding for the weights all stages share
                    with watch("GPTQ statistics"):
                        hessians = HessianSet(total_feeds=len(picks) * len(stages))
                        for s in stages:
                            hessians.accumulate(part_paths[s][k], [envs[s][i] for i in picks], opts.high_precision,
                                                float_feeds=float_envs[s] if float_envs else None)
                            if float_envs:
                                _drop_unneeded(float_envs[s], keep[s][k])
                # the three stage graphs as one model: each weight quantized once, for all stages
                with watch("merge"):
                    merged = stage_merge.merge({_tag(s): onnx_io.load(part_paths[s][k]) for s in order})
                if hessians is not None:
                    with watch("GPTQ rounding"):
                        RoundWeightsGPTQPass(hessians=hessians, skip=opts.high_precision)(merged)
                        hessians.release()
                prefix = f"part{k}_w8a16"
                with watch("aimet"):
                    calib_feeds = stage_merge.merged_feeds(merged, {_tag(s): envs[s] for s in stages})

                    def hand_on(i: int, outputs: dict, k: int = k) -> None:
                        # the next partition calibrates on what aimet's calibration forward of
                        # this one produced (see the module docstring); feed i's inputs go
                        calib_feeds[i].clear()
                        for s in stages:
                            if i < len(envs[s]):
                                envs[s][i].update(stage_merge.own_values(outputs, _tag(s)))
                                _drop_unneeded([envs[s][i]], keep[s][k])

                    quant = QuantizeW8A16Pass(
                        calibration=calib_feeds,
                        htp_arch=targets[0].htp_arch,
                        encodings_dir=work,
                        encodings_prefix=prefix,
                        kv_bits=opts.kv_bits,
                        high_precision=opts.high_precision,
                        on_output=hand_on if k < n_parts - 1 else None,
                        quantized_weight_feeds=picks if gptq else (),
                    )
                    qdq = ir.serde.serialize_model(quant(merged).model)
                    del merged, quant, calib_feeds
                    release_memory()
                merged_encodings = work / f"{prefix}.encodings"
                for s in order:
                    with watch("split and save"):
                        stage_qdq = stage_merge.split(qdq, _tag(s))
                        path = work / f"stage{s}_part{k}_w8a16.onnx"
                        onnx_io.save_proto(stage_qdq, path)
                        weights = {t.name for t in stage_qdq.graph.initializer}
                        stage_merge.split_encodings(merged_encodings, _tag(s), weights, path.with_suffix(".encodings"))
                        qdq_paths[s].append(path)
                        del stage_qdq
                    # the check feeds go through the quantized partition (one session per stage
                    # graph: one session of the merged partition took as long to create as the
                    # three, 10.7 s against 10.1 s, and its runs 10.9 s against 12.5 s)
                    with watch("QDQ chain"):
                        _advance(qnn.cpu_session(path), check_envs[s], keep[s][k])
                merged_encodings.unlink()
                del qdq
                release_memory()
                rounded = f", {len(hessians.rounded)} weights GPTQ-rounded" if hessians is not None else ""
                tree.close_window(memory)
                logger.info("      partition %d/%d quantized%s (%s; %.0f s of it on one thread beside a compile; peak RSS "
                            "%.2f GB, this process %.2f GB)", k + 1, n_parts, rounded, watch.summary(), watch.limited,
                            memory.tree / 1e9, memory.main / 1e9)
                quantize_seconds.append({part: round(sec, 1) for part, sec in watch.seconds.items()})
                quantize_peaks.append({"all_processes": memory.tree, "main_process": memory.main})
                del hessians
                for target in targets:  # one context binary for the partition's three graphs
                    graphs = [(qdq_paths[s][k], work / target.name / f"stage{s}_part{k}_ctx.onnx") for s in order]
                    future = worker.submit(qnn.compile_shared_context, graphs, target.name)
                    future.add_done_callback(_log_compiled(target.name, k, n_parts))
                    compiles[target.name, k] = future
            del envs, float_envs
            release_memory()

        # 4. One shared-weight context binary per partition and target (started in step 3).
        binaries: dict[str, dict[int, dict[int, qnn.ContextBinary]]] = {t.name: {} for t in targets}
        compile_seconds: dict[str, dict[int, float]] = {t.name: {} for t in targets}
        with steps.step(f"finish the shared-weight context binaries for {', '.join(t.name for t in targets)}"):
            # nothing left to quantize: compiles still waiting may take the second core
            worker.widen()
            # hash the manifest's finished files meanwhile
            compiling = [work / t.name for t in targets]
            digests.start(p for p in sorted(work.rglob("*")) if p.is_file() and not any(d in p.parents for d in compiling))
            for s in stages:  # checked beside the exports
                result.sqnr_db.setdefault("float_chain", {})[s] = float_chains[s].result()
            for (name, k), future in compiles.items():
                built, seconds = _worker_result(future, f"compiling partition {k} for {name}")
                binaries[name][k] = dict(zip(order, built))
                for s, sec in zip(order, seconds):
                    compile_seconds[name][s] = compile_seconds[name].get(s, 0.0) + sec

        # 5. Numbers: float chain, QDQ chain (aimet simulation on the CPU), per-layer report.
        with steps.step("check the float and quantized chains against fp32"):
            for s in stages:
                result.sqnr_db.setdefault("w8a16_cpu", {})[s] = _pooled(refs[s], [env[OUTPUT_NAME] for env in check_envs[s]])
            if layer_report:
                manifest["worst_layers"] = _layer_report(work, part_paths, qdq_paths, calib)

        # 6. The HTP simulator: non-shared builds of the same graphs, chained.
        if verify_htp:
            with steps.step("run non-shared binaries chained in the HTP simulator"):
                target = targets[0]
                for s in stages:
                    sessions = []
                    for k in range(n_parts):
                        ctx = qnn.compile_context_binary(
                            qdq_paths[s][k], work / "htp_check" / f"stage{s}_part{k}_ctx.onnx", target
                        )
                        sessions.append(qnn.htp_session(ctx.epcontext_model, target))
                    result.sqnr_db.setdefault("htp_simulator", {})[s] = _pooled(refs[s], _run_chain(sessions, check[s]))
                    del sessions
        else:
            logger.info("      HTP simulator check skipped for a model this size (--verify-htp forces it)")

        # 7. Manifest and report.
        with steps.step("write the manifest and report"):
            manifest["partitions"] = _partition_entries(work, part_paths, qdq_paths, binaries, stages, n_parts)
            manifest["stage_graphs"] = {
                str(s): {"stats_a16": {k: v for k, v in stage_stats[s].items() if k != "handed_over"},
                         "handed_over": stage_stats[s]["handed_over"]}
                for s in stages
            }
            manifest["quantize_seconds"] = quantize_seconds
            manifest["quantize_peak_rss_bytes"] = quantize_peaks
            manifest["compile_seconds"] = {t: {str(s): round(v, 1) for s, v in per.items()} for t, per in compile_seconds.items()}
            manifest["verification"] = {
                kind: {str(s): round(v, 2) for s, v in per.items()} for kind, per in result.sqnr_db.items()
            }
            manifest["steps"] = steps.as_list()
            gate = "htp_simulator" if "htp_simulator" in result.sqnr_db else "w8a16_cpu"
            failing = {s: v for s, v in result.sqnr_db[gate].items() if v < opts.min_sqnr_db}
            manifest["verification"]["gate"] = {"kind": gate, "threshold_db": opts.min_sqnr_db, "passed": not failing}
            (work / "report.txt").write_text(_render(config.name, targets, n_parts, result, steps, manifest))
            artifacts.write_manifest(work, manifest, digests)
    if failing:
        worst = ", ".join(f"stage {s} {v:.1f} dB" for s, v in sorted(failing.items()))
        raise BuildCheckError(
            f"{gate} SQNR below {opts.min_sqnr_db:.0f} dB ({worst}); artefacts kept in {out_dir}, see report.txt"
        )
    return result


def _partition_entries(work, part_paths, qdq_paths, binaries, stages, n_parts) -> list[dict]:
    entries = []
    for k in range(n_parts):
        interfaces = {s: onnx_io.file_interface(qdq_paths[s][k]) for s in stages}
        entry = {"index": k, "weight_bytes_qdq": interfaces[max(stages)][1], "graphs": {}}
        for s in stages:
            entry["graphs"][str(s)] = {
                "float_model": part_paths[s][k].name,
                "qdq_model": qdq_paths[s][k].name,
                "encodings": qdq_paths[s][k].with_suffix(".encodings").name,
                **interfaces[s][0],
                "binaries": {
                    t: {"epcontext_model": str(b[k][s].epcontext_model.relative_to(work)),
                        "binary": str(b[k][s].binary.relative_to(work))}
                    for t, b in binaries.items()
                },
            }
        entries.append(entry)
    return entries


def _layer_report(work: Path, part_paths, qdq_paths, calib, top: int = 10) -> list[dict]:
    """Tensors where the quantized graph loses most SQNR relative to its inputs."""
    rows = []
    for s, parts in part_paths.items():
        envs = [dict(f) for f in calib[s][:2]]
        for k, path in enumerate(parts):
            session = qnn.cpu_session(path)
            feeds = [{x.name: env[x.name] for x in session.get_inputs()} for env in envs]
            errors = layer_errors(path, qdq_paths[s][k], feeds)
            for e in errors:
                rows.append({"stage": s, "partition": k, "tensor": e.tensor, "op": e.op_type, "node": e.node,
                             "sqnr_db": round(e.sqnr_db, 2)})
            _advance(session, envs)
            del session
    rows = [r for r in rows if math.isfinite(r["sqnr_db"])]
    worst = sorted(rows, key=lambda r: r["sqnr_db"])[:top]
    (work / "layer_sqnr.json").write_text(json.dumps(rows, indent=1) + "\n")
    return worst


def _render(config, targets, n_parts, result, steps, manifest) -> str:
    title = f"denoiser {config}, all stages -> {', '.join(t.description for t in targets)}"
    lines = [title, "=" * len(title), "", f"Host: {host_line(manifest['host'])}; the compile workers' malloc: "
             f"{manifest['compile_allocator']}", "",
             "Steps (CPU time of this process and its workers; peak RSS within the step: all "
             "processes / this one alone):"]
    for r in steps.records:
        lines.append(f"  {r.name:<72} {r.seconds:8.1f} s  CPU {r.cpu_seconds:7.0f} s  peak RSS "
                     f"{r.peak_rss_bytes / 1e9:5.2f} / {r.main_peak_rss_bytes / 1e9:5.2f} GB")
    lines.append(f"  {'the steps above (this report is written in the last one)':<72} "
                 f"{sum(r.seconds for r in steps.records):8.1f} s  CPU {sum(r.cpu_seconds for r in steps.records):7.0f} s  "
                 f"peak RSS {max(r.peak_rss_bytes for r in steps.records) / 1e9:5.2f} GB")
    lines += ["", f"{n_parts} partition(s) per stage; weights per partition (QDQ):"]
    for p in manifest["partitions"]:
        lines.append(f"  partition {p['index']}: {format_bytes(p['weight_bytes_qdq'])}")
    totals: dict[str, float] = {}
    for per in manifest["quantize_seconds"]:
        for part, sec in per.items():
            totals[part] = totals.get(part, 0.0) + sec
    lines += ["", "Quantization time (all partitions): " + ", ".join(f"{p} {s:.0f} s" for p, s in totals.items())]
    lines += ["", "Context binary build time per stage graph (all partitions):"]
    for t, per in manifest["compile_seconds"].items():
        lines.append(f"  {t:<10} " + "   ".join(f"stage {s}: {v:7.1f} s" for s, v in sorted(per.items())))
    lines += ["", "SQNR against the fp32 PyTorch model (check prompts, not used for calibration):"]
    for kind, per in result.sqnr_db.items():
        lines.append(f"  {kind:<16} " + "   ".join(f"stage {s}: {v:6.2f} dB" for s, v in sorted(per.items())))
    if manifest.get("worst_layers"):
        lines += ["", "Tensors with the lowest SQNR in the quantized partitions (see layer_sqnr.json):"]
        for r in manifest["worst_layers"]:
            lines.append(f"  stage {r['stage']} part {r['partition']} {r['op']:<12} {r['sqnr_db']:7.2f} dB  {r['tensor']}")
    return "\n".join(lines) + "\n"
