"""The steps every build shares: trace a graph, run its passes, export, clean up in ONNX."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import onnx_ir as ir

from neodragon_npu.graphs import fx as fx_utils
from neodragon_npu.graphs.export import exported_model
from neodragon_npu.graphs.stats import onnx_stats
from neodragon_npu.graphs.verify import verify_fx, verify_onnx
from neodragon_npu.neodragon_models.spec import GraphSpec
from neodragon_npu.passes.base import PassManager
from neodragon_npu.tools.engine.options import MAX_RANK, BuildPlan


class BuildCheckError(RuntimeError):
    """The built graphs failed their numerical check (the build directory is kept)."""


def run_passes(model, passes, check, plan: BuildPlan, dump) -> list[dict]:
    """Run ``passes`` with the build's debugging options; one record per pass."""
    opts = plan.options
    ir_name = passes[0].IR if passes else "none"
    manager = PassManager(
        passes,
        check=check if opts.verify_each_pass else None,
        dump_dir=opts.dump_dir / ir_name if opts.dump_dir else None,
        dump=dump,
    )
    result = manager(model)
    return [{"pass": r.name, "modified": r.modified, "seconds": round(r.seconds, 3)} for r in result.records]


def without_skipped(passes: list, plan: BuildPlan) -> list:
    return [p for p in passes if p.pass_name() not in plan.options.skip_passes]


def fx_passes(plan: BuildPlan, graph: GraphSpec, model) -> list:
    """The graph's FX pipeline for the build's first target (its tile budget), minus the
    skipped passes."""
    return without_skipped(graph.fx_passes(model, plan.targets[0], plan.options.fx_pipeline), plan)


def onnx_passes(plan: BuildPlan, graph: GraphSpec) -> list:
    return without_skipped(graph.onnx_passes(plan.options.fx_pipeline), plan)


def trace(graph: GraphSpec, model) -> tuple:
    """The graph's module traced at its static example shapes: (FX graph, example list).
    The FX graph shares the module's parameters (FX passes edit them in place), so a caller
    that still needs the model traces a copy."""
    inputs = graph.example_inputs(model)
    example = [inputs[n] for n in graph.input_names]
    gm = fx_utils.trace(graph.module(model), example, share_parameters=True,
                        method=graph.tracing.method, leaf_modules=graph.tracing.leaf_modules)
    return gm, example


def run_fx(plan: BuildPlan, graph: GraphSpec, model, gm) -> list[dict]:
    return run_passes(gm, fx_passes(plan, graph, model), verify_fx, plan, lambda g: g.code)


@contextlib.contextmanager
def exported(plan: BuildPlan, graph: GraphSpec, gm, example, workdir: Path) -> Iterator[ir.Model]:
    """The straight ONNX export of a traced graph, its weights held in memory (see
    :func:`neodragon_npu.graphs.export.exported_model`)."""
    with exported_model(gm, example, workdir, input_names=graph.input_names, output_names=graph.output_names,
                        exporter=plan.options.exporter) as model:
        yield model


def optimize_onnx(model: ir.Model, plan: BuildPlan, graph: GraphSpec, report: dict) -> dict:
    """Run the graph's ONNX passes in place and check the result is static and of rank <= 4;
    returns its statistics with activations priced at 16 bit."""
    report["onnx_before"] = onnx_stats(model)
    report["onnx_passes"] = run_passes(
        model, onnx_passes(plan, graph), lambda m: verify_onnx(m, static_shapes=True, max_rank=MAX_RANK), plan,
        lambda m: str(m.graph),
    )
    verify_onnx(model, static_shapes=True, max_rank=MAX_RANK)
    report["onnx_after"] = onnx_stats(model)
    return onnx_stats(model, activation_bytes=2).as_dict()


def manifest_target(target) -> dict:
    return {"name": target.name, "soc_model": target.soc_model, "htp_arch": target.htp_arch}


def load_key(plan: BuildPlan) -> dict:
    """What decides the loaded model, for the step cache: the model options that only
    choose 16-bit weights are left out (they enter through the precision)."""
    precision_only = {o.name for o in plan.spec.options if o.sets_precision}
    return {"config": plan.load.config, "checkpoint": plan.load.checkpoint, "seed": plan.load.seed,
            "options": {k: v for k, v in plan.load.options.items() if k not in precision_only}}


def export_options(plan: BuildPlan) -> dict:
    """The options that decide the exported float graph(s), for the step cache. The FX
    passes read the first target (its tile budget); a family is cut by its budget."""
    o = plan.options
    return {"target": plan.targets[0], "exporter": o.exporter, "fx_pipeline": o.fx_pipeline,
            "skip_passes": sorted(o.skip_passes), "verify_each_pass": o.verify_each_pass,
            "dump_dir": str(o.dump_dir) if o.dump_dir else None,
            "partition_budget": plan.partition_budget if plan.family else None,
            "partition_activations": plan.partition_activations if plan.family else None}
