"""``neodragon-npu report``: each stage graph before and after the stage-graph passes.

For every requested stage the denoiser is built twice -- the straight export of "Start
here" (static shapes only) and the optimized pipeline -- and the figures that drive NPU
latency are put side by side, priced at 16-bit activations: node count, total op-output
bytes per call, largest single tensor, largest attention-score tensor, peak live
activation bytes, and (with ``compile=True``) the time to build the context binary.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from neodragon_npu.graphs.stats import format_bytes
from neodragon_npu.neodragon_models import pyramid
from neodragon_npu.neodragon_models.configs import get_denoiser_config
from neodragon_npu.tools.engine.build import build
from neodragon_npu.tools.engine.options import BuildOptions
from neodragon_npu.tools.engine.progress import labelled

VARIANTS = ("baseline", "optimized")
_COMPILE_STEP = "compile the HTP context binary"


@dataclass
class StageFigures:
    nodes: int
    op_output_bytes: int
    largest_tensor: int
    largest_score_tensor: int
    peak_live_bytes: int
    compile_seconds: float | None

    @classmethod
    def from_manifest(cls, manifest: dict) -> "StageFigures":
        stats = manifest["graph_stats_a16"]
        compile_s = next((s["seconds"] for s in manifest["steps"] if s["step"].startswith(_COMPILE_STEP)), None)
        return cls(
            nodes=stats["node_count"],
            op_output_bytes=stats["op_output_bytes"],
            largest_tensor=stats["largest_tensor"]["bytes"],
            largest_score_tensor=stats.get("largest_score_tensor", {}).get("bytes", 0),
            peak_live_bytes=stats["peak_live_bytes"],
            compile_seconds=compile_s,
        )


def stage_report(
    config: str,
    stages: list[int],
    *,
    target: str,
    compile: bool = False,
    work_dir: str | Path | None = None,
    seed: int = 0,
) -> dict[int, dict[str, StageFigures]]:
    """Build every (stage, variant) and collect its figures."""
    cfg = get_denoiser_config(config)
    for stage in stages:
        cfg.geometry.stage_latent_hw(stage)
    cfg_units = len(cfg.geometry.denoised_units)
    base = BuildOptions(
        model="denoiser", config=config, targets=(target,), seed=seed, until="compile" if compile else "export",
        calibration_samples=2 * cfg_units, check_samples=cfg_units,
    )
    root = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="neodragon-report-"))
    results: dict[int, dict[str, StageFigures]] = {}
    try:
        for stage in stages:
            results[stage] = {}
            for variant in VARIANTS:
                out = root / f"stage{stage}_{variant}"
                with labelled(f"stage {stage} {variant}"):
                    built = build(replace(base, graphs=(str(stage),), fx_pipeline=variant), out)
                results[stage][variant] = StageFigures.from_manifest(built.manifest)
                if work_dir is None:
                    shutil.rmtree(out, ignore_errors=True)  # a full-size float model is 6.5 GB
    finally:
        if work_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return results


def format_stage_report(config: str, results: dict[int, dict[str, StageFigures]]) -> str:
    geometry = get_denoiser_config(config).geometry
    lines = [f"denoiser {config}: stage graphs before / after the stage-graph passes (16-bit activations)", ""]

    def change(a: float, b: float) -> str:
        return f"{100.0 * (b - a) / a:+.1f}%" if a else ""

    for stage, figures in results.items():
        seq = pyramid.envelope_attention_tokens(geometry, 2, stage)
        before, after = figures["baseline"], figures["optimized"]
        lines.append(f"stage {stage} ({seq} attention tokens)          baseline      optimized   change")
        rows = [
            ("nodes", before.nodes, after.nodes, str),
            ("op-output bytes per call", before.op_output_bytes, after.op_output_bytes, format_bytes),
            ("largest tensor", before.largest_tensor, after.largest_tensor, format_bytes),
            ("largest attention-score tensor", before.largest_score_tensor, after.largest_score_tensor, format_bytes),
            ("peak live activations", before.peak_live_bytes, after.peak_live_bytes, format_bytes),
        ]
        for name, a, b, fmt in rows:
            lines.append(f"  {name:<32}{fmt(a):>14} {fmt(b):>14}  {change(a, b):>8}")
        if before.compile_seconds is not None:
            lines.append(
                f"  {'context binary build time':<32}{before.compile_seconds:>12.1f} s {after.compile_seconds:>12.1f} s"
            )
        lines.append("")
    return "\n".join(lines)


def report_json(results: dict[int, dict[str, StageFigures]]) -> str:
    return json.dumps(
        {str(s): {v: vars(f) for v, f in figs.items()} for s, figs in results.items()}, indent=2
    )
