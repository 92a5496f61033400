"""The MMDiT denoiser as a spec: one graph per pyramid stage, all sharing the weights.

Its samples come from the float generation loop (:mod:`..sampling`): every call of the
deployed loop is one sample of its stage's graph. Calibration prompts (seeds 1000+) and
check prompts (2000+) are disjoint.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from neodragon_npu.neodragon_models import pyramid
from neodragon_npu.neodragon_models.configs import DENOISER_CONFIGS, get_denoiser_config
from neodragon_npu.neodragon_models.denoiser import (
    Denoiser, build_denoiser, check_denoiser_checkpoint, count_parameters, denoiser_modules,
)
from neodragon_npu.neodragon_models.pruning import parse_removal, prune_blocks
from neodragon_npu.neodragon_models.sampling import collect_samples, example_stage_inputs
from neodragon_npu.neodragon_models.spec import (
    REFERENCE_SUFFIX, GraphSpec, LoadOptions, ModelOption, ModelSpec, SamplePlan, Samples, load_description,
    meta_shapes,
)
from neodragon_npu.passes import pipelines

logger = logging.getLogger("neodragon_npu")

OUTPUT = "noise_pred"
CALIBRATION_SEED, CHECK_SEED = 1000, 2000
# A one-graph build calibrates on every call of this many prompts and checks on every call
# of CHECK_PROMPTS; a family build takes FAMILY_CALIBRATION calls per stage from as few
# prompts as hold them, and FAMILY_CHECK check calls from CHECK_PROMPTS prompts in turn.
CALIBRATION_PROMPTS, CHECK_PROMPTS = 8, 2
FAMILY_CALIBRATION, FAMILY_CHECK = 8, 2


def _load(opts: LoadOptions) -> Denoiser:
    """Synthetic or released weights; pruned before anything runs, so calibration and the
    fp32 reference come from the pruned model the binaries must reproduce."""
    denoiser = build_denoiser(get_denoiser_config(opts.config), checkpoint=opts.checkpoint, seed=opts.seed)
    if opts.options.get("remove_blocks"):
        n_blocks = denoiser.config.mmdit.num_layers
        removed = parse_removal(opts.options["remove_blocks"], n_blocks, opts.options.get("importance"))
        denoiser, mapping = prune_blocks(denoiser, removed)
        denoiser.pruning = {"original_blocks": n_blocks, "removed": removed, "old_to_new": mapping}
        logger.info("      removed %d of the %d MMDiT blocks before tracing: %s", len(removed), n_blocks,
                    ", ".join(map(str, removed)))
    return denoiser


def _weight_shapes(opts: LoadOptions) -> dict[str, tuple[int, ...]]:
    """Checkpoint config and headers checked, --remove-blocks (and its importance file)
    parsed against the model's blocks; the weights' shapes (before pruning)."""
    config = check_denoiser_checkpoint(get_denoiser_config(opts.config), opts.checkpoint)
    if opts.options.get("remove_blocks"):
        parse_removal(opts.options["remove_blocks"], config.mmdit.num_layers, opts.options.get("importance"))
    transformer, adapter = denoiser_modules(config)
    return meta_shapes(transformer, "transformer.") | meta_shapes(adapter, "context_adapter.")


def _stage_graph(stage: int) -> GraphSpec:
    def fx_passes(model: Denoiser, target, pipeline: str) -> list:
        if pipeline == "baseline":
            return pipelines.denoiser_fx_baseline()
        segments = pyramid.attention_segments(model.config.geometry, model.config.mmdit.patch_size, stage)
        return pipelines.denoiser_fx(tile_budget_bytes=target.score_tile_bytes, mask_segments=segments)

    return GraphSpec(
        name=f"stage{stage}",
        key=str(stage),
        module=lambda model: model.stage_module(stage),
        example_inputs=lambda model: example_stage_inputs(model, stage),
        input_names=pyramid.STAGE_INPUT_NAMES,
        output_names=(OUTPUT,),
        fx_passes=fx_passes,
        onnx_passes=lambda pipeline: (pipelines.denoiser_onnx_baseline() if pipeline == "baseline"
                                      else pipelines.denoiser_onnx()),
        describe={"stage": stage},
    )


def _graphs(config: str) -> list[GraphSpec]:
    return [_stage_graph(s) for s in range(get_denoiser_config(config).geometry.num_stages)]


def _feeds(calls) -> list[dict]:
    from neodragon_npu.graphs.feeds import to_numpy_feed

    return [to_numpy_feed(x.inputs) for x in calls]


def _checks(calls) -> list[dict]:
    from neodragon_npu.graphs.feeds import to_numpy_feed

    return [{**to_numpy_feed(x.inputs), OUTPUT + REFERENCE_SUFFIX: x.output.numpy()} for x in calls]


def _samples(model: Denoiser, graphs, plan: SamplePlan) -> Samples:
    """One-graph builds: every call of whole prompts, prompt by prompt. Family builds (and
    ``verify``): N calls per stage; check calls from the check prompts in turn (with 2 and
    2, unit 1 of both), each prompt's rollout stopped after the units it is needed for."""
    stages = tuple(int(g.key) for g in graphs)
    units = len(model.config.geometry.denoised_units)
    progress = _progress()
    if not plan.family:
        n_calib = CALIBRATION_PROMPTS * units if plan.calibration is None else plan.calibration
        n_check = CHECK_PROMPTS * units if plan.check is None else plan.check
        calib_seeds = list(range(CALIBRATION_SEED, CALIBRATION_SEED + math.ceil(n_calib / units)))
        check_seeds = list(range(plan.first_check_seed, plan.first_check_seed + math.ceil(n_check / units)))
        limits = {seed: min(units, n_calib - i * units) for i, seed in enumerate(calib_seeds)}
        limits.update({seed: min(units, n_check - i * units) for i, seed in enumerate(check_seeds)})
        calls = collect_samples(model, calib_seeds + check_seeds, stages, progress=progress, units_per_prompt=limits)
        calib = {s: [x for x in calls[s] if x.prompt_seed in calib_seeds] for s in stages}
        check = {s: [x for x in calls[s] if x.prompt_seed in check_seeds] for s in stages}
    else:
        n_calib = FAMILY_CALIBRATION if plan.calibration is None else plan.calibration
        n_check = FAMILY_CHECK if plan.check is None else plan.check
        calib_seeds = list(range(CALIBRATION_SEED, CALIBRATION_SEED + math.ceil(n_calib / units)))
        n_groups = plan.check_groups or min(n_check, CHECK_PROMPTS)
        check_seeds = list(range(plan.first_check_seed, plan.first_check_seed + n_groups))
        limits = {seed: min(units, n_calib - i * units) for i, seed in enumerate(calib_seeds)}
        per_prompt = math.ceil(n_check / len(check_seeds))
        limits.update({seed: min(units, per_prompt) for seed in check_seeds})
        calls = collect_samples(model, calib_seeds + check_seeds, stages, progress=progress, units_per_prompt=limits)
        calib = {s: [x for x in calls[s] if x.prompt_seed in calib_seeds][:n_calib] for s in stages}

        def in_turn(x):
            return x.unit, check_seeds.index(x.prompt_seed)

        check = {s: sorted((x for x in calls[s] if x.prompt_seed in check_seeds), key=in_turn)[:n_check]
                 for s in stages}
    name = {s: f"stage{s}" for s in stages}
    return Samples(
        calibration={name[s]: _feeds(calib[s]) for s in stages},
        check={name[s]: _checks(check[s]) for s in stages},
        check_labels={name[s]: [f"prompt {x.prompt_seed} unit {x.unit}" for x in check[s]] for s in stages},
        calls_per_group=units,
    )


def _progress():
    return lambda i, n: logger.info("      prompt %d/%d", i, n)


def _precision(options) -> pipelines.W8A16:
    first = options.get("first_blocks_16bit")
    first = pipelines.FIRST_BLOCKS_AT_16_BIT if first is None else first
    return pipelines.W8A16(high_precision=pipelines.denoiser_high_precision(first), rounding="gptq")


def _describe(model: Denoiser, opts: LoadOptions) -> dict:
    config = get_denoiser_config(opts.config)
    out = load_description(opts, transformer_params=count_parameters(model.config.mmdit),
                           context_adapter_params=count_parameters(config.context_adapter))
    pruning = getattr(model, "pruning", None)
    if pruning:
        out["removed_blocks"] = pruning["removed"]
        out["block_mapping"] = {str(k): v for k, v in pruning["old_to_new"].items()}
    return out


def _artifacts(model: Denoiser) -> dict[str, str]:
    pruning = getattr(model, "pruning", None)
    if not pruning:
        return {}
    mapping = {"original_blocks": pruning["original_blocks"],
               "old_to_new": {str(k): v for k, v in pruning["old_to_new"].items()}}
    return {"block_mapping.json": json.dumps(mapping, indent=2) + "\n"}


def _weight_bytes(model: Denoiser) -> int:
    return sum(p.numel() * 4 for m in (model.transformer, model.context_adapter) for p in m.parameters())


def _check_first_blocks(n: int) -> None:
    if n < 0:
        raise ValueError(f"--first-blocks-16bit {n} is negative")


DENOISER = ModelSpec(
    name="denoiser",
    summary="MMDiT denoiser + ContextAdapter: one W8A16 graph per pyramid stage, shared weights",
    configs=lambda: tuple(DENOISER_CONFIGS),
    default_config="tiny",
    load=_load,
    graphs=_graphs,
    samples=_samples,
    precision=_precision,
    describe=_describe,
    weight_bytes=_weight_bytes,
    min_sqnr_db=30.0,
    # The family gate catches a broken binary; the tiny model's stage 0 (16 tokens, 32-wide
    # layers under large adaLN modulations) sits lowest. Fidelity targets are `bench fidelity`'s.
    family_min_sqnr_db=25.0,
    options=(
        ModelOption("remove_blocks", str, None, "blocks to remove first: 3,7,9 or count=N or threshold=T"),
        ModelOption("importance", Path, None, "importance.json from `neodragon-npu importance` (for count/threshold)"),
        ModelOption("first_blocks_16bit", int, None,
                    f"the first N MMDiT blocks keep 16-bit weights (default {pipelines.FIRST_BLOCKS_AT_16_BIT})",
                    check=_check_first_blocks, sets_precision=True),
    ),
    pipelines=("optimized", "baseline"),
    default_graph="stage2",
    family_label="all-stages",
    graph_flags=("stage", "all-stages"),
    checkpoint_help="folder holding diffusion_transformer_320p/ and context_adapter/",
    artifacts=_artifacts,
    reference_note="fp32 PyTorch stage module",
    weight_shapes=_weight_shapes,
)
