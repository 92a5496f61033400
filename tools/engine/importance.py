"""``neodragon-npu importance``: score MMDiT blocks and write JSON, a table and bar charts."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from neodragon_npu.tools.engine import artifacts
from neodragon_npu.tools.engine.progress import peak_rss_bytes
from neodragon_npu.neodragon_models.configs import get_denoiser_config
from neodragon_npu.neodragon_models.denoiser import build_denoiser, check_denoiser_checkpoint
from neodragon_npu.neodragon_models.importance import COMBINATION, BlockScores, block_importance, rank_blocks

logger = logging.getLogger("neodragon_npu")


def scores_to_json(scores: list[BlockScores], meta: dict) -> dict:
    ranking = rank_blocks(scores)
    return {
        **meta,
        "combination": COMBINATION,
        "ranking_least_important_first": ranking,
        "blocks": [
            {
                "index": s.index,
                "context_pre_only": s.context_pre_only,
                "bi_image": {f"stage{k}": v for k, v in s.image.items()} | {"mean": s.mean("image")},
                "bi_text": {f"stage{k}": v for k, v in s.text.items()} | {"mean": s.mean("text")},
                "combined": s.combined,
                "rank": ranking.index(s.index),
            }
            for s in scores
        ],
    }


def format_table(scores: list[BlockScores]) -> str:
    stages = sorted(scores[0].image)
    head = "block  " + "  ".join(f"BI_img s{s}" for s in stages) + "  " + "  ".join(f"BI_txt s{s}" for s in stages)
    lines = [head + "   combined  rank"]
    ranking = rank_blocks(scores)
    for s in scores:
        img = "  ".join(f"{s.image[k]:9.5f}" for k in stages)
        txt = "  ".join(f"{s.text[k]:9.5f}" if s.text[k] is not None else f"{'-':>9}" for k in stages)
        lines.append(f"{s.index:5d}  {img}  {txt}   {s.combined:8.5f}  {ranking.index(s.index):4d}")
    lines.append(f"combined = {COMBINATION}")
    return "\n".join(lines)


def plot_scores(scores: list[BlockScores], which: str, path: Path) -> Path:
    """Grouped bar chart: one bar per stage for every block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stages = sorted(scores[0].image)
    fig, ax = plt.subplots(figsize=(max(6, len(scores) * 0.45), 3.2))
    width = 0.8 / len(stages)
    for j, stage in enumerate(stages):
        values = [getattr(s, which)[stage] or 0.0 for s in scores]
        ax.bar([s.index + (j - (len(stages) - 1) / 2) * width for s in scores], values, width, label=f"stage {stage}")
    ax.set_xlabel("block")
    ax.set_ylabel(f"BI_{'image' if which == 'image' else 'text'} = 1 - mean cos")
    ax.set_xticks([s.index for s in scores])
    ax.legend(fontsize=7)
    ax.set_title(f"block importance ({which} tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_importance(
    config: str,
    out_dir: str | Path,
    *,
    prompts: int = 1,
    samples_per_stage: int = 4,
    checkpoint: str | Path | None = None,
    seed: int = 0,
    force: bool = False,
) -> dict:
    """Score the blocks of ``config`` and write importance.json, bi_image.png, bi_text.png."""
    cfg = get_denoiser_config(config)
    if prompts < 1 or samples_per_stage < 1:
        raise ValueError("need at least one prompt and one sample per stage")
    if samples_per_stage > len(cfg.geometry.denoised_units):
        raise ValueError(f"--samples-per-stage {samples_per_stage}: the {config} denoiser makes "
                         f"{len(cfg.geometry.denoised_units)} calls per stage and prompt")
    artifacts.check_output_dir(out_dir, "importance", inputs={"--checkpoint": checkpoint}, force=force)
    check_denoiser_checkpoint(cfg, checkpoint)
    start = time.perf_counter()
    with artifacts.staged_dir(out_dir, "importance", inputs={"--checkpoint": checkpoint}, force=force) as work:
        logger.info("building the %s denoiser", config)
        denoiser = build_denoiser(cfg, checkpoint=checkpoint, seed=seed)
        seeds = list(range(3000, 3000 + prompts))
        logger.info("scoring %d blocks over %d prompt(s) x %d call(s) per stage", len(denoiser.transformer.transformer_blocks), prompts, samples_per_stage)
        scores = block_importance(
            denoiser, seeds, samples_per_stage=samples_per_stage, progress=lambda m: logger.info("      %s", m)
        )
        meta = {
            "config": config,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "seed": seed,
            "prompts": prompts,
            "samples_per_stage": prompts * samples_per_stage,
            "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_bytes": peak_rss_bytes(),
        }
        data = scores_to_json(scores, meta)
        (work / "importance.json").write_text(json.dumps(data, indent=2) + "\n")
        plot_scores(scores, "image", work / "bi_image.png")
        plot_scores(scores, "text", work / "bi_text.png")
        (work / "importance.txt").write_text(format_table(scores) + "\n")
        artifacts.write_manifest(work, {"pipeline": "importance", "config": config}, kind="importance")
    data["table"] = format_table(scores)
    return data
