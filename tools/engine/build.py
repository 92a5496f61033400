"""``build``: any model of the spec table, one graph or a family, from options to a build directory."""

from __future__ import annotations

import logging
from pathlib import Path

from neodragon_npu.graphs.stats import format_bytes
from neodragon_npu.tools.engine.family import FamilyResult, build_family
from neodragon_npu.tools.engine.options import BuildOptions, BuildPlan, plan_build
from neodragon_npu.tools.engine.preflight import preflight
from neodragon_npu.tools.engine.single import BuildResult, build_single

logger = logging.getLogger("neodragon_npu")


def build(opts: BuildOptions, out_dir: str | Path) -> BuildResult | FamilyResult:
    """Check ``opts`` against the model's spec, the output directory, the inputs, the
    partition budget and the free disk space (before any work), then build."""
    return build_plan(plan_build(opts), out_dir)


def build_plan(plan: BuildPlan, out_dir: str | Path) -> BuildResult | FamilyResult:
    """:func:`build` of a plan made already (a caller may have adjusted its spec)."""
    checked = preflight(plan, out_dir)
    logger.info("%s %s: %s of fp32 weights; the build writes about %s (%s free)", plan.spec.name, plan.config,
                format_bytes(checked.weight_bytes), format_bytes(checked.estimated_bytes),
                format_bytes(checked.free_bytes))
    return build_family(plan, out_dir) if plan.family else build_single(plan, out_dir)
