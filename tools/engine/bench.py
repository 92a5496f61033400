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
from contextlib import contextmanager
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


@contextmanager
def work_root(work_dir: str | Path | None):
    """``work_dir`` (kept), or a temporary directory removed afterwards."""
    root = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="neodragon-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        yield root
    finally:
        if work_dir is None:
            shutil.rmtree(root, ignore_errors=True)


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
    base = BuildOptions(
        model="denoiser", config=config, family=True, targets=(target,), calibration_samples=calibration_samples,
        check_samples=check_samples, verify_htp=True, layer_report=False, min_sqnr_db=0.0,
    )
    results = {}
    with work_root(work_dir) as root:
        for name in names:
            out = root / name.replace(" ", "_").replace("/", "")
            results[name] = build(replace(base, **VARIANTS[name]), out)
            if work_dir is None:
                shutil.rmtree(out, ignore_errors=True)
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


def rebuild_benchmark(model: str = "denoiser", config: str = "tiny", work_dir: str | Path | None = None) -> dict:
    """Build ``model`` twice into one directory, each time as a user would (a fresh
    ``neodragon-npu build`` process), the second time with nothing changed; then run the
    second build's context binary in the HTP simulator on its check samples. Returns the
    two wall times (s), the steps the second build reused and the simulator's SQNR (dB)."""
    import json
    import subprocess
    import sys
    import time

    from neodragon_npu.graphs import qnn
    from neodragon_npu.graphs.feeds import load_samples
    from neodragon_npu.graphs.targets import get_target
    from neodragon_npu.graphs.verify import pooled_sqnr
    from neodragon_npu.tools.engine.single import split_references

    command = [sys.executable, "-m", "neodragon_npu.tools.cli", "-q", "build", model, "--config", config, "-o"]
    seconds = []
    with work_root(work_dir) as root:
        out = root / "build"
        command.append(str(out))
        for _ in range(2):
            start = time.perf_counter()
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            seconds.append(time.perf_counter() - start)
        manifest = json.loads((out / "manifest.json").read_text())
        graph = manifest["graphs"][0]
        target = get_target(manifest["target"]["name"])
        session = qnn.htp_session(out / graph["epcontext_model"], target)
        outputs = [o["name"] for o in graph["outputs"]]
        feeds, refs = split_references(load_samples(out / "check_samples.npz"), outputs)
        pairs = [pair for feed, ref in zip(feeds, refs) for pair in zip(ref, qnn.run(session, feed))]
        return {"first_s": seconds[0], "second_s": seconds[1], "reused": manifest["cache"]["reused"],
                "htp_sqnr_db": pooled_sqnr(pairs)}


def format_rebuild(model: str, config: str, r: dict) -> str:
    reused = ", ".join(f"{kind} {n}" for kind, n in r["reused"].items())
    return (f"rebuild: {model} {config}, two `neodragon-npu build` runs into one directory\n"
            f"  first build                      {r['first_s']:7.1f} s\n"
            f"  second build, nothing changed    {r['second_s']:7.1f} s   (steps reused: {reused})\n"
            f"  the second build's binary in the HTP simulator: {r['htp_sqnr_db']:.2f} dB SQNR against fp32")
