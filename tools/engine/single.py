"""The ``denoiser`` build: one pyramid stage from PyTorch to a verified Hexagon context binary.

Every step hands the next one files in the build directory, and the big objects (torch
model, FX graph, float session, QuantSim) are dropped before the next step, so a
full-size graph goes through with bounded memory and each artefact can be inspected.
"""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from neodragon_npu.tools.engine import artifacts

from neodragon_npu.graphs import onnx_io, qnn
from neodragon_npu.graphs import fx as fx_utils
from neodragon_npu.graphs.export import export_onnx
from neodragon_npu.graphs.quant.gptq import HessianSet
from neodragon_npu.tools.engine.host import describe_host
from neodragon_npu.tools.engine.progress import Steps, count, release_memory
from neodragon_npu.graphs.feeds import save_samples, to_numpy_feed
from neodragon_npu.graphs.stats import fx_stats, onnx_stats
from neodragon_npu.graphs.targets import DEFAULT_TARGET, get_target
from neodragon_npu.graphs.verify import compare, verify_fx, verify_onnx
from neodragon_npu.neodragon_models import pyramid
from neodragon_npu.neodragon_models.configs import get_denoiser_config
from neodragon_npu.neodragon_models.denoiser import build_denoiser, count_parameters
from neodragon_npu.neodragon_models.pruning import parse_removal, prune_blocks
from neodragon_npu.neodragon_models.sampling import collect_samples, example_stage_inputs
from neodragon_npu.passes import pipelines
from neodragon_npu.passes.base import PassManager
from neodragon_npu.tools.engine.report import write_report
from neodragon_npu.passes.onnx.quantize_w8a16 import QuantizeW8A16Pass
from neodragon_npu.passes.onnx.round_weights_gptq import RoundWeightsGPTQPass

logger = logging.getLogger("neodragon_npu")

OUTPUT_NAME = "noise_pred"
# Steps a build can stop after; each includes the ones before it.
UNTIL = ("export", "quantize", "compile", "verify")
FX_PIPELINES = ("optimized", "baseline")
# No tensor above rank 4 reaches the NPU compiler (facts 4.1).
MAX_RANK = 4
# The simulated W8A16 binary must stay this close to the fp32 PyTorch model.
MIN_SQNR_DB = 30.0
WEIGHT_ROUNDING = ("gptq", "nearest")  # int8 weight rounding: data-aware (graphs.gptq) or nearest


def check_weight_rounding(name: str) -> None:
    if name not in WEIGHT_ROUNDING:
        raise ValueError(f"unknown weight rounding {name!r}; known: {', '.join(WEIGHT_ROUNDING)}")


@dataclass
class DenoiserBuildOptions:
    config: str = "tiny"
    stage: int = 2
    target: str = DEFAULT_TARGET
    checkpoint: Path | None = None
    seed: int = 0
    calibration_prompts: int = 8
    check_prompts: int = 2
    exporter: str = "legacy"
    until: str = "verify"
    # blocks to remove: "3,7,9", "count=6" or "threshold=0.05" (with an importance file)
    remove_blocks: str | None = None
    importance: Path | None = None
    # "optimized": all denoiser FX passes; "baseline": the straight export (static shapes only)
    fx_pipeline: str = "optimized"
    skip_passes: tuple[str, ...] = ()  # passes to leave out (ablations)
    kv_bits: int = 16
    high_precision: tuple[str, ...] = pipelines.DENOISER_HIGH_PRECISION
    weight_rounding: str = "gptq"  # or "nearest"
    verify_each_pass: bool = False
    dump_dir: Path | None = None
    min_sqnr_db: float = MIN_SQNR_DB

    def validate(self) -> None:
        cfg = get_denoiser_config(self.config)
        cfg.geometry.stage_latent_hw(self.stage)
        get_target(self.target)
        check_weight_rounding(self.weight_rounding)
        if self.until not in UNTIL:
            raise ValueError(f"unknown --until step {self.until!r}; expected one of {UNTIL}")
        if self.fx_pipeline not in FX_PIPELINES:
            raise ValueError(f"unknown FX pipeline {self.fx_pipeline!r}; expected one of {FX_PIPELINES}")
        if self.calibration_prompts < 1 or self.check_prompts < 1:
            raise ValueError("need at least one calibration prompt and one check prompt")


@dataclass
class BuildResult:
    out_dir: Path
    manifest: dict
    sqnr_db: float | None = None
    stats: dict = field(default_factory=dict)


def _run_passes(model, passes, check, opts: DenoiserBuildOptions, dump) -> list[dict]:
    ir_name = passes[0].IR if passes else "none"
    manager = PassManager(
        passes,
        check=check if opts.verify_each_pass else None,
        dump_dir=opts.dump_dir / ir_name if opts.dump_dir else None,
        dump=dump,
    )
    result = manager(model)
    return [{"pass": r.name, "modified": r.modified, "seconds": round(r.seconds, 3)} for r in result.records]


def load_denoiser(opts, work: Path | None = None, manifest: dict | None = None):
    """The PyTorch model (synthetic or released weights), pruned when asked to.

    Pruning happens before anything runs: calibration and the fp32 reference then come
    from the pruned model, which is what the binaries must reproduce. With ``work`` and
    ``manifest``, the pruning is recorded there (once per build: other copies pass neither).
    """
    manifest = manifest if manifest is not None else {"model": {}}
    denoiser = build_denoiser(get_denoiser_config(opts.config), checkpoint=opts.checkpoint, seed=opts.seed)
    if opts.remove_blocks:
        n_blocks = denoiser.config.mmdit.num_layers
        removed = parse_removal(opts.remove_blocks, n_blocks, opts.importance)
        denoiser, mapping = prune_blocks(denoiser, removed)
        manifest["model"]["removed_blocks"] = removed
        manifest["model"]["block_mapping"] = {str(k): v for k, v in mapping.items()}
        manifest["model"]["transformer_params"] = count_parameters(denoiser.config.mmdit)
        if work is not None:
            mapping_json = {"original_blocks": n_blocks, "old_to_new": manifest["model"]["block_mapping"]}
            (work / "block_mapping.json").write_text(json.dumps(mapping_json, indent=2) + "\n")
    return denoiser


def stage_fx_passes(opts, config, target, stage: int) -> list:
    """The FX pipeline for one stage graph (``opts.fx_pipeline``, minus ``opts.skip_passes``)."""
    if opts.fx_pipeline == "baseline":
        passes = pipelines.denoiser_fx_baseline()
    else:
        passes = pipelines.denoiser_fx(
            tile_budget_bytes=target.score_tile_bytes,
            mask_segments=pyramid.attention_segments(config.geometry, config.mmdit.patch_size, stage),
        )
    return [p for p in passes if p.pass_name() not in opts.skip_passes]


def export_traced_stage(gm, example_list, path: Path, opts) -> None:
    """The straight ONNX export of a traced stage graph. The ONNX passes
    (:func:`optimize_stage_graph`) come next; a caller drops the PyTorch model in between,
    since folding makes new weight tensors (full-size stage 2 then peaked at 8.9 GB)."""
    export_onnx(
        gm, example_list, path,
        input_names=pyramid.STAGE_INPUT_NAMES, output_names=[OUTPUT_NAME], exporter=opts.exporter,
    )


def optimize_stage_graph(path: Path, opts, report: dict) -> dict:
    """Run the ONNX passes on an exported stage graph and save it; returns its A16 stats."""
    model = onnx_io.load(path)
    stats = optimize_stage_model(model, opts, report)
    onnx_io.save(model, path)
    return stats


def optimize_stage_model(model: ir.Model, opts, report: dict) -> dict:
    """Run the ONNX passes on an exported stage graph in place; returns its A16 stats."""
    report["onnx_before"] = onnx_stats(model)
    onnx_passes = pipelines.denoiser_onnx_baseline() if opts.fx_pipeline == "baseline" else pipelines.denoiser_onnx()
    report["onnx_passes"] = _run_passes(
        model,
        [p for p in onnx_passes if p.pass_name() not in opts.skip_passes],
        lambda m: verify_onnx(m, static_shapes=True, max_rank=MAX_RANK),
        opts,
        lambda m: str(m.graph),
    )
    verify_onnx(model, static_shapes=True, max_rank=MAX_RANK)
    report["onnx_after"] = onnx_stats(model)
    return onnx_stats(model, activation_bytes=2).as_dict()  # activations priced at 16 bit


def manifest_model(config, opts) -> dict:
    """The manifest's model entry, shared by the single-stage and all-stages builds."""
    return {
        "config": config.name,
        "checkpoint": str(opts.checkpoint) if opts.checkpoint else None,
        "seed": opts.seed,
        "transformer_params": count_parameters(config.mmdit),
        "context_adapter_params": count_parameters(config.context_adapter),
    }


def manifest_target(target) -> dict:
    return {"name": target.name, "soc_model": target.soc_model, "htp_arch": target.htp_arch}


def manifest_quantization(opts) -> dict:
    return {
        "weights": "int8 per-channel symmetric", "activations": "uint16", "kv_bits": opts.kv_bits,
        "high_precision": list(opts.high_precision), "weight_rounding": opts.weight_rounding,
    }


def build_denoiser_stage(opts: DenoiserBuildOptions, out_dir: str | Path) -> BuildResult:
    """Build one stage graph into ``out_dir`` (replaced atomically on success)."""
    opts.validate()
    target = get_target(opts.target)
    config = get_denoiser_config(opts.config)
    stage = opts.stage
    name = f"denoiser_stage{stage}"
    n_steps = {"export": 4, "quantize": 6, "compile": 7, "verify": 8}[opts.until]
    steps = Steps(n_steps)
    manifest: dict = {
        "host": describe_host(),
        "pipeline": "denoiser",
        "model": manifest_model(config, opts),
        "stage": stage,
        "fx_pipeline": opts.fx_pipeline,
        "target": manifest_target(target),
    }
    report: dict = {"title": f"denoiser {config.name} stage {stage} -> {target.description}", "host": manifest["host"]}

    with artifacts.staged_dir(out_dir) as work:
        # 1. The PyTorch model: seeded synthetic weights, or the released folders.
        with steps.step("build the PyTorch model"):
            denoiser = load_denoiser(opts, work, manifest)
            config = denoiser.config
            stage_module = denoiser.stage_module(stage)

        # 2. Stage inputs from the float pipeline: calibration and check prompts are disjoint,
        #    so the binary is checked on inputs it was not calibrated on.
        calib_seeds = list(range(1000, 1000 + opts.calibration_prompts))
        check_seeds = list(range(2000, 2000 + opts.check_prompts))
        if opts.until == "export":
            example = example_stage_inputs(denoiser, stage, opts.seed)
        else:
            with steps.step("run the float pipeline for calibration and check samples"):
                seeds = calib_seeds + check_seeds
                samples = collect_samples(
                    denoiser, seeds, (stage,), progress=lambda i, n: count("prompt", i, n)
                )[stage]
                calib = [to_numpy_feed(s.inputs) for s in samples if s.prompt_seed in calib_seeds]
                check = [s for s in samples if s.prompt_seed in check_seeds]
                save_samples(work / "calibration_inputs.npz", calib)
                save_samples(
                    work / "check_samples.npz",
                    [{**to_numpy_feed(s.inputs), f"{OUTPUT_NAME}_fp32": s.output.numpy()} for s in check],
                )
                example = samples[0].inputs
        example_list = [example[n] for n in pyramid.STAGE_INPUT_NAMES]

        # 3. Trace at the static envelope and run the FX passes.
        with steps.step("trace at the stage envelope and run FX passes"):
            gm = fx_utils.trace(stage_module, example_list, share_parameters=True)
            report["fx_before"] = fx_stats(gm)
            fx_passes = stage_fx_passes(opts, config, target, stage)
            report["fx_passes"] = _run_passes(gm, fx_passes, verify_fx, opts, lambda g: g.code)
            report["fx_after"] = fx_stats(gm)

        # 4. Export to ONNX and clean up; the torch model is released afterwards.
        float_path = work / f"{name}_float.onnx"
        with steps.step("export to ONNX and run ONNX passes"):
            del stage_module, denoiser
            export_traced_stage(gm, example_list, float_path, opts)
            del gm  # the ONNX passes fold weights into new tensors: not with the torch copy
            release_memory()
            manifest["graph_stats_a16"] = optimize_stage_graph(float_path, opts, report)
        manifest["float_model"] = float_path.name

        if opts.until != "export":
            # 5. Float ONNX vs PyTorch on the check samples: the passes and the export are exact.
            with steps.step("check the float ONNX against PyTorch"):
                session = qnn.cpu_session(float_path)
                float_cmp = [
                    compare(s.output.numpy(), qnn.run(session, to_numpy_feed(s.inputs))[0]) for s in check
                ]
                del session
                report["float_check"] = float_cmp

            # 6. W8A16 with aimet-onnx, calibrated on the pipeline's own stage inputs.
            qdq_path = work / f"{name}_w8a16.onnx"
            with steps.step(f"quantize W8A16 with aimet-onnx ({len(calib)} calibration samples)"):
                model = onnx_io.load(float_path)
                if opts.weight_rounding == "gptq":
                    hessians = HessianSet()
                    hessians.accumulate(float_path, calib, opts.high_precision)
                    RoundWeightsGPTQPass(hessians=hessians, skip=opts.high_precision)(model)
                    del hessians
                quant = QuantizeW8A16Pass(
                    calibration=calib, htp_arch=target.htp_arch,
                    encodings_dir=work, encodings_prefix=f"{name}_w8a16",
                    kv_bits=opts.kv_bits, high_precision=opts.high_precision,
                )
                qdq = quant(model).model
                del model
                onnx_io.save(qdq, qdq_path)
                report["qdq"] = onnx_stats(qdq)
                del qdq
                gc.collect()
            manifest["qdq_model"] = qdq_path.name
            manifest["encodings"] = f"{name}_w8a16.encodings"
            manifest["quantization"] = manifest_quantization(opts)

        if opts.until in ("compile", "verify"):
            # 7. The QNN HTP compiler writes the EPContext model and the context binary.
            with steps.step(f"compile the HTP context binary for {target.name} (v{target.htp_arch})"):
                ctx = qnn.compile_context_binary(qdq_path, work / f"{name}_{target.name}_ctx.onnx", target)
            report["compile_seconds"] = steps.records[-1].seconds

        graph_entry = {"name": name, "float_model": float_path.name}
        if opts.until == "verify":
            # 8. Load the binary back in the HTP simulator and compare with fp32 PyTorch.
            with steps.step("load the binary in the HTP simulator and compare with fp32"):
                session = qnn.htp_session(ctx.epcontext_model, target)
                graph_entry.update(qnn.io_signature(session))
                results, pairs = [], []
                for i, s in enumerate(check):
                    out = qnn.run(session, to_numpy_feed(s.inputs))[0]
                    results.append((s, compare(s.output.numpy(), out)))
                    pairs.append((s.output.numpy(), out))
                    count("check sample", i + 1, len(check))
                del session
            sqnrs = [c.sqnr_db for _, c in results]
            pooled = _pooled_sqnr(pairs)
            report["htp_check"] = results
            report["htp_sqnr_db"] = pooled
            manifest["verification"] = {
                "reference": "fp32 PyTorch stage module",
                "device": "x86 HTP simulator (onnxruntime-qnn)",
                "samples": len(results),
                "sqnr_db": round(pooled, 2),
                "min_sample_sqnr_db": round(min(sqnrs), 2),
                "threshold_db": opts.min_sqnr_db,
                "passed": pooled >= opts.min_sqnr_db,
            }
        if opts.until in ("compile", "verify"):
            graph_entry.update({"epcontext_model": ctx.epcontext_model.name, "binary": ctx.binary.name})
        else:
            graph_entry.update(onnx_io.io_signature(onnx_io.load(float_path)))
        manifest["graphs"] = [graph_entry]
        manifest["steps"] = steps.as_list()
        report["steps"] = steps.records
        write_report(work / "report.txt", report)
        artifacts.write_manifest(work, manifest)
    if opts.until == "verify" and pooled < opts.min_sqnr_db:
        raise BuildCheckError(
            f"the simulated binary reaches {pooled:.1f} dB SQNR against fp32, below the "
            f"{opts.min_sqnr_db:.0f} dB threshold (artefacts kept in {out_dir}, see report.txt)"
        )
    return BuildResult(Path(out_dir), manifest, report.get("htp_sqnr_db"), report)


class BuildCheckError(RuntimeError):
    """The built binary failed its numerical check (the build directory is kept)."""


def _pooled_sqnr(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """SQNR over all check samples together (signal and noise energies summed)."""
    signal = sum(float(np.sum(ref.astype(np.float64) ** 2)) for ref, _ in pairs)
    noise = sum(float(np.sum((ref.astype(np.float64) - out) ** 2)) for ref, out in pairs)
    return float(10 * np.log10(signal / noise)) if noise else float("inf")
