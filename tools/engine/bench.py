"""``neodragon-npu bench fidelity``: SQNR of the three stage graphs, and what each fix is worth.

Builds the stage graphs of a model (by default full width, real sequence lengths, two
blocks) with every fix, then once without each, and runs the chained binaries in the HTP
simulator against the fp32 PyTorch model. aimet's simulation of the same QDQ graphs (CPU)
is reported next to it: it does not model the QNN EP's conversion of an unsigned 16-bit
MatMul operand to 8 bit, which is what the 16-bit K/V fix addresses.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from neodragon_npu.passes.pipelines import DENOISER_HIGH_PRECISION_LAYERS
from neodragon_npu.tools.engine.build import build
from neodragon_npu.tools.engine.family import FamilyResult
from neodragon_npu.tools.engine.options import BuildOptions

# variant name -> what changes against the full pipeline
VARIANTS = {
    "all fixes": {},
    "no adaLN split": {"skip_passes": ("split_adaln",)},
    "8-bit K/V": {"kv_bits": 8},
    "int8 first blocks": {"high_precision": DENOISER_HIGH_PRECISION_LAYERS},
    # The defaults keep the first two blocks' Linears at 16 bit, which on the two-block
    # benchmark model is every block: these show the fixes where the blocks are int8, as
    # 16 of the 18 blocks of the full model are.
    "int8 blocks, no adaLN split": {"high_precision": DENOISER_HIGH_PRECISION_LAYERS,
                                    "skip_passes": ("split_adaln",)},
    "int8 blocks, 8-bit K/V": {"high_precision": DENOISER_HIGH_PRECISION_LAYERS, "kv_bits": 8},
    "nearest rounding": {"weight_rounding": "nearest"},
    "float-target GPTQ": {"gptq_target": "float"},
}


def fidelity_benchmark(
    config: str = "neodragon-2block",
    *,
    variants: list[str] | None = None,
    target: str = "sm8750",
    calibration_samples: int = 8,
    check_samples: int = 1,
    work_dir: str | Path | None = None,
) -> dict[str, FamilyResult]:
    names = variants or list(VARIANTS)
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    root = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="neodragon-bench-"))
    base = BuildOptions(
        model="denoiser", config=config, family=True, targets=(target,), calibration_samples=calibration_samples,
        check_samples=check_samples, verify_htp=True, layer_report=False, min_sqnr_db=0.0,
    )
    results = {}
    try:
        for name in names:
            out = root / name.replace(" ", "_").replace("/", "")
            results[name] = build(replace(base, **VARIANTS[name]), out)
            if work_dir is None:
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if work_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    return results


def format_fidelity(config: str, results: dict[str, FamilyResult]) -> str:
    width = max([18, *map(len, results)])
    lines = [f"fidelity: {config}, SQNR against fp32 PyTorch (dB), one check call per stage", ""]
    lines.append(f"{'variant':<{width}} {'HTP simulator':^30}   {'aimet simulation (CPU)':^30}")
    lines.append(f"{'':<{width}} {'stage 0':>9} {'stage 1':>9} {'stage 2':>9}   {'stage 0':>9} {'stage 1':>9} {'stage 2':>9}")
    for name, result in results.items():
        htp = result.sqnr_db.get("htp_simulator", {})
        cpu = result.sqnr_db.get("w8a16_cpu", {})
        row = " ".join(f"{htp.get(str(s), float('nan')):9.2f}" for s in range(3))
        row2 = " ".join(f"{cpu.get(str(s), float('nan')):9.2f}" for s in range(3))
        lines.append(f"{name:<{width}} {row}   {row2}")
    return "\n".join(lines)
