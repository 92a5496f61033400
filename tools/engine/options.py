"""One option set for every model's build, checked against the model's spec before any work.

A build is either a **single** graph (one of the spec's graphs, whole) or a **family**
(several graphs that share weights, cut at the same places into memory-bounded partitions,
quantized partition by partition, one shared-weight context binary per partition and
target). Options that only one kind of build uses are refused for the other, by name.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neodragon_npu.graphs.onnx_edit import unmatched_patterns
from neodragon_npu.graphs.targets import DEFAULT_TARGET, Target, get_target
from neodragon_npu.neodragon_models.spec import GraphSpec, LoadOptions, ModelSpec
from neodragon_npu.neodragon_models.specs import get_model
from neodragon_npu.passes import pipelines

logger = logging.getLogger("neodragon_npu")

UNTIL = ("export", "quantize", "compile", "verify")  # steps a build can stop after
EXPORTERS = ("legacy", "dynamo")
GPTQ_TARGETS = ("quantized", "float")
# fp32 weight bytes one partition may hold: bounds aimet's QuantSim memory (see
# docs/all-stages-build.md) and, at int8, the compile size (< 2 GiB)
DEFAULT_PARTITION_WEIGHT_BYTES = 768 << 20
# bytes one partition's ops write per call at 16 bit: what its calibration and check forwards
# work through (it does not bound all of the quantization's memory: docs/first-frame.md,
# the SDXL VAE decoder)
DEFAULT_PARTITION_OUTPUT_BYTES = 3 << 30
DEFAULT_GPTQ_SAMPLES = 2
# No tensor above rank 4 reaches the NPU compiler (facts 4.1).
MAX_RANK = 4

# Options only a family build takes (flag spelling, for errors).
FAMILY_ONLY = {
    "partition_budget": "--partition-budget",
    "partition_activations": "--partition-activations",
    "gptq_samples": "--gptq-samples",
    "gptq_target": "--gptq-target",
    "layer_report": "--layer-report",
}
W8A16_ONLY = {
    "kv_bits": "--kv-bits",
    "weight_rounding": "--weight-rounding",
    "high_precision": "--high-precision",
    "extra_high_precision": "--high-precision",
    "adaround_iterations": "--adaround-iterations",
    "auto_16bit_db": "--auto-16bit",
}


@dataclass
class BuildOptions:
    """What a user asks of a build. ``None`` means the model's default."""

    model: str = "denoiser"
    config: str | None = None
    graphs: tuple[str, ...] = ()  # by name or key; (): the spec's default graph, or all with family
    family: bool = False
    targets: tuple[str, ...] = (DEFAULT_TARGET,)
    checkpoint: Path | None = None
    seed: int = 0
    calibration_samples: int | None = None  # per graph
    check_samples: int | None = None  # per graph
    exporter: str | None = None  # None: the model's (ModelSpec.exporter)
    until: str = "verify"
    fx_pipeline: str = "optimized"
    skip_passes: tuple[str, ...] = ()
    precision: str | None = None  # "w8a16" or "fp16"
    kv_bits: int | None = None
    weight_rounding: str | None = None
    auto_16bit_db: float | None = None  # 0 turns the model's off
    high_precision: tuple[str, ...] | None = None  # replaces the model's patterns; () for none
    extra_high_precision: tuple[str, ...] = ()  # added to them
    adaround_iterations: int | None = None
    partition_budget: int | None = None
    partition_activations: int | None = None
    gptq_samples: int | None = None
    gptq_target: str | None = None
    # None: a single graph is checked in the HTP simulator, a family only when its weights are
    # small; False checks the deployed graph on the CPU instead (onnxruntime)
    verify_htp: bool | None = None
    layer_report: bool | None = None
    verify_each_pass: bool = False
    dump_dir: Path | None = None
    min_sqnr_db: float | None = None
    model_options: dict[str, Any] = field(default_factory=dict)
    cache: bool = True  # keep each step's outputs in the step cache and reuse them
    cache_dir: Path | None = None  # None: <output>.cache beside the output
    force: bool = False  # write into an output directory that holds no build of this tool

    def replace(self, **changes: Any) -> "BuildOptions":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class BuildPlan:
    """A validated build: the spec, the graphs in build order, the resolved precision."""

    spec: ModelSpec
    options: BuildOptions
    config: str
    graphs: tuple[GraphSpec, ...]
    targets: tuple[Target, ...]
    precision: Any
    load: LoadOptions
    partition_budget: int
    partition_activations: int
    gptq_samples: int
    gptq_target: str
    min_sqnr_db: float

    @property
    def family(self) -> bool:
        return self.options.family

    @property
    def until(self) -> str:
        return self.options.until


def _positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}")


def _select_graphs(spec: ModelSpec, config: str, opts: BuildOptions) -> tuple[GraphSpec, ...]:
    every = list(spec.graphs(config))
    by = {g.name: g for g in every} | {g.manifest_key: g for g in every}
    for name in opts.graphs:
        if name not in by:
            flag = spec.graph_flags[0]
            raise ValueError(f"--{flag} {name}: {spec.name} has no such graph; its graphs: "
                             f"{', '.join(g.manifest_key for g in every)}")
    if opts.family:
        chosen = [g for g in every if not opts.graphs or g.name in {by[n].name for n in opts.graphs}]
        return tuple(chosen)
    if len(opts.graphs) > 1:
        raise ValueError(f"a single-graph build takes one graph; for several give --{spec.graph_flags[1]}")
    if opts.graphs:
        return (by[opts.graphs[0]],)
    name = spec.default_graph or every[-1].name
    return (by[name],)


def _precision(spec: ModelSpec, opts: BuildOptions):
    if opts.high_precision is not None:
        chosen = [o.name for o in spec.options if o.sets_precision and opts.model_options.get(o.name) is not None]
        if chosen:
            raise ValueError(f"--high-precision replaces {spec.name}'s 16-bit weights: leave out "
                             f"--{chosen[0].replace('_', '-')}")
    precision = spec.precision(opts.model_options)
    kind = opts.precision or precision.name
    if kind not in pipelines.PRECISIONS:
        raise ValueError(f"--precision {kind}: known precisions are {', '.join(pipelines.PRECISIONS)}")
    if kind == "fp16":
        given = [flag for name, flag in W8A16_ONLY.items() if getattr(opts, name) not in (None, ())]
        if given:
            raise ValueError(f"{given[0]} applies to W8A16 builds, not --precision fp16")
        return pipelines.FP16()
    if not isinstance(precision, pipelines.W8A16):
        precision = pipelines.W8A16()
    high = precision.high_precision if opts.high_precision is None else tuple(opts.high_precision)
    changes = {"high_precision": high + tuple(opts.extra_high_precision)}
    if opts.kv_bits is not None:
        changes["kv_bits"] = opts.kv_bits
    if opts.weight_rounding is not None:
        changes["rounding"] = opts.weight_rounding
    if opts.auto_16bit_db is not None:
        changes["auto_16bit_db"] = opts.auto_16bit_db or None
    if opts.adaround_iterations is not None:
        if (opts.weight_rounding or precision.rounding) != "adaround":
            raise ValueError("--adaround-iterations applies with --weight-rounding adaround")
        changes["adaround_iterations"] = opts.adaround_iterations
    return dataclasses.replace(precision, **changes)


def plan_build(opts: BuildOptions) -> BuildPlan:
    """Check every option against the model's spec; raises ValueError naming the option."""
    from neodragon_npu.passes.registry import PASSES

    spec = get_model(opts.model)
    config = opts.config or spec.default_config
    if config not in spec.configs():
        raise ValueError(f"unknown {spec.name} config {config!r}; known configs: {', '.join(spec.configs())}")
    if not opts.targets:
        raise ValueError("give at least one target")
    targets = tuple(get_target(t) for t in opts.targets)
    if len({t.name for t in targets}) != len(targets):
        raise ValueError(f"--target {','.join(opts.targets)} names a target twice")
    if opts.until not in UNTIL:
        raise ValueError(f"unknown --until step {opts.until!r}; expected one of {', '.join(UNTIL)}")
    if opts.exporter is not None and opts.exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {opts.exporter!r}; expected one of {', '.join(EXPORTERS)}")
    if opts.fx_pipeline not in spec.pipelines:
        raise ValueError(f"unknown pipeline {opts.fx_pipeline!r} for {spec.name}; known: {', '.join(spec.pipelines)}")
    unknown = [p for p in opts.skip_passes if p not in PASSES]
    if unknown:
        raise ValueError(f"--skip-pass {unknown[0]}: no such pass; `neodragon-npu passes` lists them")
    for name in ("calibration_samples", "check_samples", "gptq_samples", "partition_budget",
                 "partition_activations"):
        _positive("--" + name.replace("_", "-"), getattr(opts, name))
    if opts.gptq_target is not None and opts.gptq_target not in GPTQ_TARGETS:
        raise ValueError(f"--gptq-target must be one of {', '.join(GPTQ_TARGETS)}, got {opts.gptq_target!r}")
    if not opts.family:
        given = [flag for name, flag in FAMILY_ONLY.items() if getattr(opts, name) is not None]
        if given:
            raise ValueError(f"{given[0]} applies to a family build of several graphs "
                             f"(--{spec.graph_flags[1]}), not to a single-graph build")
    known = {o.name: o for o in spec.options}
    for name, value in opts.model_options.items():
        if name not in known:
            raise ValueError(f"--{name.replace('_', '-')} is not an option of {spec.name}")
        option = known[name]
        if value is None:
            continue
        mode = "family" if opts.family else "single"
        if option.applies_to is not None and option.applies_to != mode:
            raise ValueError(f"--{name.replace('_', '-')} applies to {option.applies_to} builds of {spec.name}")
        if option.check is not None:
            option.check(value)
    model_options = {o.name: opts.model_options.get(o.name, o.default) for o in spec.options}
    opts = opts.replace(config=config, model_options=model_options, exporter=opts.exporter or spec.exporter)
    graphs = _select_graphs(spec, config, opts)
    precision = _precision(spec, opts)
    if opts.family and precision.name != "w8a16":
        raise ValueError("family builds are W8A16 (partitioned, quantized per partition); FP16 builds one graph")
    if opts.family and precision.auto_16bit_db is not None:
        raise ValueError("--auto-16bit applies to single-graph builds; a family build keeps the weights "
                         "--high-precision names at 16 bit")
    if opts.family and opts.gptq_target is not None and precision.rounding != "gptq":
        raise ValueError("--gptq-target applies with --weight-rounding gptq")
    min_sqnr = opts.min_sqnr_db if opts.min_sqnr_db is not None else (
        spec.family_min_sqnr_db if opts.family else spec.min_sqnr_db)
    return BuildPlan(
        spec=spec, options=opts, config=config,
        graphs=graphs, targets=targets, precision=precision,
        load=LoadOptions(config=config, checkpoint=opts.checkpoint, seed=opts.seed, options=model_options),
        partition_budget=opts.partition_budget or DEFAULT_PARTITION_WEIGHT_BYTES,
        partition_activations=opts.partition_activations or DEFAULT_PARTITION_OUTPUT_BYTES,
        gptq_samples=opts.gptq_samples or DEFAULT_GPTQ_SAMPLES,
        gptq_target=opts.gptq_target or "quantized",
        min_sqnr_db=min_sqnr,
    )


def check_high_precision(plan: BuildPlan, models) -> None:
    """Every 16-bit weight pattern must pick a weight somewhere in the float graph(s)
    ``models`` (all partitions of every graph of a family: a pattern may fairly miss some).
    A pattern the user gave that picks nothing is refused before the long quantization,
    since its build would silently be the build without it; one of the model's own (a
    pruned model may have lost the blocks it names) is only warned about."""
    patterns = getattr(plan.precision, "high_precision", ())
    if not patterns:
        return
    missing = unmatched_patterns(models, patterns)
    given = set(plan.options.extra_high_precision) | set(plan.options.high_precision or ())
    ours = [p for p in missing if p in given]
    if ours:
        raise ValueError(f"--high-precision {ours[0]!r} matches no weight of {plan.spec.name}: patterns match "
                         "a node's name, its weights' names, or the module path it was exported from "
                         "(e.g. 'unet.*attn2.to_*')")
    for pattern in missing:
        logger.warning(
            "      %s's 16-bit weight pattern %r matches no weight of this graph", plan.spec.name, pattern)
