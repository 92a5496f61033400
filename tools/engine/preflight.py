"""What a build checks before any work: where it writes, what it reads, whether its partition
budget can work, and whether the disk can hold it.

Every check here runs in seconds at full size (modules on the meta device, checkpoint
headers only), so a mistake is reported before sampling, not after it.
"""

from __future__ import annotations

import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from neodragon_npu.graphs.stats import format_bytes
from neodragon_npu.tools.engine import artifacts
from neodragon_npu.tools.engine.cache import cache_bytes, cache_root, is_cache
from neodragon_npu.tools.engine.options import BuildPlan

logger = logging.getLogger("neodragon_npu")

# Bytes a build writes (output directory and step cache together: the cache holds hard links
# to the same files) per fp32 weight byte. Per graph of a family: its float partitions (fp32,
# 1.0) and its W8A16 partitions (0.37); per target: the context binaries (0.39); measured on
# the full-size denoiser family (docs/measurements.md, 2026-12-06) and rounded up for the
# files a step holds only while it runs.
FAMILY_BYTES_PER_WEIGHT_BYTE_PER_GRAPH = 1.6
FAMILY_BYTES_PER_WEIGHT_BYTE_PER_TARGET = 0.5
# A single-graph build: the float graph, the deployed graph, a binary per target.
SINGLE_BYTES_PER_WEIGHT_BYTE = 1.6
SINGLE_BYTES_PER_WEIGHT_BYTE_PER_TARGET = 0.5
# Samples, reports and small graphs: what any build needs beyond its weights.
FIXED_BYTES = 256 << 20


class DiskSpaceError(ValueError):
    """Not enough free disk space for a build (found before it starts)."""


@dataclass(frozen=True)
class Preflight:
    """What the checks found, for the build's log."""

    weight_bytes: int
    largest_weight_bytes: int
    estimated_bytes: int
    free_bytes: int


def build_inputs(plan: BuildPlan, out_dir: str | Path) -> dict[str, object]:
    """Every path a build reads or keeps beside its output, by flag: none of them may lie
    inside the output directory, which the build replaces."""
    o = plan.options
    inputs: dict[str, object] = {"--checkpoint": o.checkpoint, "--dump-dir": o.dump_dir,
                                 "--cache-dir": cache_root(out_dir, o.cache_dir, o.cache)}
    for option in plan.spec.options:
        value = plan.load.options.get(option.name)
        if isinstance(value, Path):
            inputs[f"--{option.name.replace('_', '-')}"] = value
    return inputs


def staged_build_dir(plan: BuildPlan, out_dir: str | Path):
    """The build's staging directory (:func:`artifacts.staged_dir`), owned as a build."""
    return artifacts.staged_dir(out_dir, "build", inputs=build_inputs(plan, out_dir), force=plan.options.force)


def estimate_bytes(plan: BuildPlan, weight_bytes: int) -> int:
    """Disk bytes a build of ``plan`` writes, from its fp32 weight bytes (see the factors)."""
    targets = len(plan.targets) if plan.until in ("compile", "verify") else 0
    if plan.family:
        per = (FAMILY_BYTES_PER_WEIGHT_BYTE_PER_GRAPH * len(plan.graphs)
               + FAMILY_BYTES_PER_WEIGHT_BYTE_PER_TARGET * targets)
    else:
        per = SINGLE_BYTES_PER_WEIGHT_BYTE + SINGLE_BYTES_PER_WEIGHT_BYTE_PER_TARGET * targets
    return int(per * weight_bytes) + FIXED_BYTES


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_disk_space(plan: BuildPlan, out_dir: str | Path, weight_bytes: int) -> tuple[int, int]:
    """Refuse a build the free space of its output's file system cannot hold; returns
    (estimate, free bytes). A previous build in ``out_dir`` is replaced only at the end, so
    its files do not count as free; what the step cache holds already is reused by hard
    link and not written again."""
    return check_free_space(estimate_bytes(plan, weight_bytes), out_dir,
                            cache_root(out_dir, plan.options.cache_dir, plan.options.cache), "this build")


def check_free_space(need: int, out_dir: str | Path, root: Path | None, what: str) -> tuple[int, int]:
    """Refuse ``need`` bytes written under ``out_dir`` (and the cache ``root``) where they do
    not fit; the cache's own bytes count as written already."""
    free = shutil.disk_usage(_existing(Path(out_dir))).free
    if root is not None:
        free = min(free, shutil.disk_usage(_existing(root)).free)
        if is_cache(root):
            need = max(FIXED_BYTES, need - cache_bytes(root))
    if need > free:
        raise DiskSpaceError(
            f"{what} writes about {format_bytes(need)} and {_existing(Path(out_dir))} has "
            f"{format_bytes(free)} free; free some space or choose another -o (and --cache-dir)")
    return need, free


def plan_weight_bytes(plan: BuildPlan) -> int:
    """fp32 bytes of the weights the plan's model will hold (read cheaply: meta shapes)."""
    return sum(4 * math.prod(s) for s in plan.spec.preflight(plan.load).values())


def check_partition_budget(plan: BuildPlan, shapes: dict[str, tuple[int, ...]]) -> int:
    """Refuse a partition budget below the weights of the largest module (fp32 bytes; a
    Linear's weight and bias can land in one node, and no cut gives a partition less than
    one node's weights). Returns those bytes."""
    per_module: dict[str, int] = {}
    for name, shape in shapes.items():
        module = name.rpartition(".")[0]
        per_module[module] = per_module.get(module, 0) + 4 * math.prod(shape)
    if not per_module:
        return 0
    name = max(per_module, key=per_module.get)
    largest = per_module[name]
    if largest > plan.partition_budget:
        raise ValueError(f"--partition-budget {plan.partition_budget} is below the weights of the largest layer "
                         f"({name}: {largest} bytes at fp32); give at least --partition-budget {largest}")
    return largest


def preflight(plan: BuildPlan, out_dir: str | Path) -> Preflight:
    """Every check a build makes before its first step; raises naming the option or path."""
    artifacts.check_output_dir(out_dir, "build", inputs=build_inputs(plan, out_dir), force=plan.options.force)
    shapes = plan.spec.preflight(plan.load)
    weight_bytes = sum(4 * math.prod(s) for s in shapes.values())
    largest = check_partition_budget(plan, shapes) if plan.family else 0
    need, free = check_disk_space(plan, out_dir, weight_bytes)
    return Preflight(weight_bytes, largest, need, free)
