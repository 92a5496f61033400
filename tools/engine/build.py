"""``build``: any model of the spec table, one graph or a family, from options to a build directory."""

from __future__ import annotations

from pathlib import Path

from neodragon_npu.tools.engine.family import FamilyResult, build_family
from neodragon_npu.tools.engine.options import BuildOptions, plan_build
from neodragon_npu.tools.engine.single import BuildResult, build_single


def build(opts: BuildOptions, out_dir: str | Path) -> BuildResult | FamilyResult:
    """Check ``opts`` against the model's spec (before any work), then build."""
    plan = plan_build(opts)
    return build_family(plan, out_dir) if plan.family else build_single(plan, out_dir)
