"""Block importance from the float pipeline (SANA-1.5 style, as Neodragon used it).

BI_k = 1 - mean cosine similarity between block k's input and output tokens, separately
for image tokens (BI^v) and text tokens (BI^t), over the real tokens of every call the
pipeline makes (padding, padded text and the envelope's front padding are left out). A
block that barely changes its tokens is cheap to remove. The last ("context pre-only")
block has no text output, so its BI^t is undefined (None).

Scores are accumulated by forward hooks while :func:`sampling.rollout` generates, so
nothing but running sums is kept: the full-size 24-block model scores in its own memory.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch

from neodragon_npu.neodragon_models import pyramid
from neodragon_npu.neodragon_models.denoiser import Denoiser
from neodragon_npu.neodragon_models.sampling import rollout, synthetic_prompt

# How the two scores are combined into one ranking (stated in every report):
# the mean over stages of (BI^v + BI^t) / 2, with BI^v alone where BI^t is undefined.
COMBINATION = "mean over stages of (BI_image + BI_text) / 2; BI_image alone for the context-pre-only block"


@dataclass
class BlockScores:
    index: int
    context_pre_only: bool
    image: dict[int, float] = field(default_factory=dict)  # stage -> BI^v
    text: dict[int, float | None] = field(default_factory=dict)  # stage -> BI^t

    def mean(self, which: str) -> float | None:
        values = [v for v in getattr(self, which).values() if v is not None]
        return sum(values) / len(values) if values else None

    @property
    def combined(self) -> float:
        image, text = self.mean("image"), self.mean("text")
        return image if text is None else (image + text) / 2


class _Accumulator:
    """Running sums of per-token cosine similarity per (block, stage, stream)."""

    def __init__(self) -> None:
        self.sums: dict[tuple[int, int, str], float] = defaultdict(float)
        self.counts: dict[tuple[int, int, str], int] = defaultdict(int)
        self.stage = 0
        self.image_real: torch.Tensor | None = None  # [N] bool
        self.text_real: torch.Tensor | None = None  # [L] bool

    def add(self, block: int, stream: str, x_in: torch.Tensor, x_out: torch.Tensor, real: torch.Tensor) -> None:
        cos = torch.nn.functional.cosine_similarity(x_in.double(), x_out.double(), dim=-1)[0]  # [tokens]
        key = (block, self.stage, stream)
        self.sums[key] += float(cos[real].sum())
        self.counts[key] += int(real.sum())


def block_importance(
    denoiser: Denoiser,
    prompt_seeds: list[int],
    *,
    samples_per_stage: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[BlockScores]:
    """Score every block over the calls of rollouts with these prompts.

    ``samples_per_stage`` limits each prompt's rollout to that many units (each unit makes
    one call per stage); the default runs all units.
    """
    geo = denoiser.config.geometry
    blocks = denoiser.transformer.transformer_blocks
    acc = _Accumulator()
    text_len = geo.text_len

    def before(unit: int, stage: int, inputs: dict[str, torch.Tensor]) -> None:
        acc.stage = stage
        n_env = inputs["latent_tokens"].shape[1]
        n_real = pyramid.image_token_count(geo, denoiser.config.mmdit.patch_size, unit, stage)
        acc.image_real = torch.arange(n_env) >= n_env - n_real  # front padding is not real
        # valid text is what the frame being generated (the last token) can see
        acc.text_real = inputs["attn_bias"][0, 0, -1, :text_len] == 0
        if progress is not None:
            progress(f"unit {unit} stage {stage}")

    def hook(index: int):
        def record(module, args, output):
            hidden_in, context_in = args[0], args[1]
            context_out, hidden_out = output
            acc.add(index, "image", hidden_in, hidden_out, acc.image_real)
            if context_out is not None:
                acc.add(index, "text", context_in, context_out, acc.text_real)

        return record

    handles = [b.register_forward_hook(hook(i)) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            for seed in prompt_seeds:
                max_unit = None if samples_per_stage is None else geo.denoised_units[0] + samples_per_stage - 1
                rollout(denoiser, synthetic_prompt(denoiser, seed), seed, before_call=before, max_unit=max_unit)
    finally:
        for h in handles:
            h.remove()

    scores = []
    for i, block in enumerate(blocks):
        entry = BlockScores(i, block.context_pre_only)
        for stage in range(geo.num_stages):
            for stream, target in (("image", entry.image), ("text", entry.text)):
                count = acc.counts.get((i, stage, stream), 0)
                if count:
                    target[stage] = 1.0 - acc.sums[(i, stage, stream)] / count
                elif stream == "text":
                    target[stage] = None
        scores.append(entry)
    return scores


def rank_blocks(scores: list[BlockScores]) -> list[int]:
    """Block indices from least to most important under :data:`COMBINATION`."""
    return [s.index for s in sorted(scores, key=lambda s: (s.combined, s.index))]
