"""Named pass pipelines, written out in order; each line says why the pass is there."""

from __future__ import annotations

from neodragon_npu.passes.base import Pass
from neodragon_npu.passes.fx.convert_rope_to_half_split import ConvertRopeToHalfSplitPass
from neodragon_npu.passes.fx.fold_attention_scale import FoldAttentionScalePass
from neodragon_npu.passes.fx.remove_identity_modules import RemoveIdentityModulesPass
from neodragon_npu.passes.fx.specialize_shapes import SpecializeShapesPass
from neodragon_npu.passes.fx.split_adaln import SplitAdaLNPass
from neodragon_npu.passes.fx.split_attention import SplitAttentionPass
from neodragon_npu.passes.onnx.convert_mask_to_finite import ConvertMaskToFinitePass
from neodragon_npu.passes.onnx.fold_constants import FoldConstantsPass
from neodragon_npu.passes.onnx.fuse_rms_norm import FuseRMSNormPass
from neodragon_npu.passes.onnx.fuse_rotary_embedding import FuseRotaryEmbeddingPass
from neodragon_npu.passes.onnx.name_weights_by_content import NameWeightsByContentPass
from neodragon_npu.passes.onnx.remove_unused_nodes import RemoveUnusedNodesPass


def denoiser_fx(
    *,
    tile_budget_bytes: int = 2 * 1024 * 1024,
    mask_segments: list[tuple[int, int, int, int]] | None = None,
) -> list[Pass]:
    """FX passes for a denoiser stage graph traced at its static envelope.

    ``mask_segments`` is the stage's mask structure (``pyramid.attention_segments``);
    ``tile_budget_bytes`` the target's on-chip budget for one score tile.
    """
    return [
        # Dropout/Identity are no-ops at inference; removing them keeps later matches simple.
        RemoveIdentityModulesPass(),
        # x.view(x.shape[0], ...) must not reach ONNX as Shape/Gather chains (facts 4.5).
        SpecializeShapesPass(),
        # One Linear per adaLN chunk, so each chunk gets its own encoding (facts 4.7).
        SplitAdaLNPass(),
        # Interleaved RoPE is an element interleave on device; half-split is two slices
        # and one full-width QK^T once Q/K weights are permuted offline (facts 4.2).
        ConvertRopeToHalfSplitPass(),
        # 1/sqrt(d) goes into the QK-norm weights: one [H, S, d] multiply less per block.
        FoldAttentionScalePass(),
        # Per-head, query-chunked, mask-aware attention: score tiles fit on chip and
        # hidden key ranges are never computed (facts 4.12: latency tracks bytes).
        SplitAttentionPass(tile_budget_bytes=tile_budget_bytes, mask_segments=mask_segments),
    ]


def denoiser_fx_baseline() -> list[Pass]:
    """The straight export of "Start here": only what makes the graph static."""
    return [RemoveIdentityModulesPass(), SpecializeShapesPass()]


def denoiser_onnx() -> list[Pass]:
    """ONNX clean-up before quantization."""
    return [
        # Weight reshapes (patch-embed conv -> linear), SDPA's sqrt(scale) and any shape
        # arithmetic left by the exporter become constants.
        FoldConstantsPass(),
        # -inf / finfo.min masks overflow A16 and FP16 and NaN fully masked rows (facts 4.3).
        ConvertMaskToFinitePass(),
        # QK-RMSNorm as one RMSNormalization op: two full-size writes less per norm.
        FuseRMSNormPass(),
        # Half-split RoPE as one RotaryEmbedding op: six full-size writes less per rotation.
        FuseRotaryEmbeddingPass(),
        # Folding leaves dead producers and unused initializers behind.
        RemoveUnusedNodesPass(),
        # The three stage graphs must name shared weights alike (QNN weight sharing, frozen
        # encodings and partition alignment match by name; export counters differ).
        NameWeightsByContentPass(),
    ]


def first_blocks_patterns(count: int) -> tuple[str, ...]:
    """Node-name patterns for every weight Linear of the first ``count`` MMDiT blocks of an
    exported stage graph: the attention projections and both FeedForwards.

    The exporter names a node after its module's attribute and numbers repeats in call
    order: block b's attention Linears end in "" (b = 0) or "_b"; its image and context
    FeedForwards are ``proj`` / ``net.2`` numbered 2b and 2b + 1. A test checks the mapping
    against the modules' weights."""

    def numbered(i: int) -> str:
        return "" if i == 0 else f"_{i}"

    patterns: list[str] = []
    for b in range(count):
        n = numbered(b)
        patterns += [f"/to_[qkv]{n}/*", f"/add_[qkv]_proj{n}/*", f"/to_out.0{n}/*", f"/to_add_out{n}/*"]
        for ff in (2 * b, 2 * b + 1):
            patterns += [f"/proj{numbered(ff)}/*", f"/net.2{numbered(ff)}/*"]
    return tuple(patterns)


# Weights kept at 16 bit in every denoiser build, from the per-layer SQNR report:
# * the conditioning MLPs (timestep and pooled-text embedders, 0.5% of the weights) feed
#   every adaLN modulation (tiny stage 2: 29.9 -> 33.4 dB with them at 16 bit);
# * the adaLN Linears (split or not, and norm_out's): int8 leaves their outputs at ~42 dB,
#   and a modulation of (1 + scale) with scale up to 18.4 carries that error into every
#   token; they run once per call on one vector, so 16 bit costs weight bytes (~1/3 of
#   the transformer's) but no compute;
# * the patch embedding (the MatMul reading ``latent_tokens``) and ``proj_out``, the first
#   and last layers (0.2 M weights each).
# Measured on the 2-block full-width model, stage 2, transformer partition, aimet CPU:
# 31.4 dB (embedders only) -> 33.5 (+ adaLN) -> 34.9-35.6 dB (+ first/last, with GPTQ;
# the spread is over GPTQ row counts, one held-out call).
DENOISER_HIGH_PRECISION_LAYERS = (
    "*time_text_embed*",
    "*norm1*.linear*",
    "*norm_out.linear*",
    "latent_tokens",
    "/proj_out/*",
)
# And every Linear of the first two MMDiT blocks. Their input is the patch embedding (std
# about 1) and their output std is 5-7: what they add is most of the residual stream, so
# their weight error is not diluted as in the later blocks. Per partition of the full-size
# model (float inputs), stage 2: blocks 0-1 lose 36.6 dB, blocks 2-3 40.6, then 42.7-47.8.
# Re-quantizing only blocks 0-1 of the full build at 16 bit moved the chained 18-block
# result from 32.87 / 32.18 / 32.77 to 34.56 / 34.07 / 34.23 dB (stages 0 / 1 / 2, aimet
# simulation); block 0 alone gave 33.86 / 33.58 / 32.62. Cost: 2 x 57 M weights at 16 bit,
# 113 MB more per target (full-build binaries 2.40 GB; 2.28 GB in an earlier build with them int8).
# Blocks 2-3 are then the partition that loses most by itself (`verify --per-partition`,
# 41.1 / 41.4 / 41.8 dB). With them at 16 bit too (`--first-blocks-16bit 4`) the full build's
# `verify` on 16 fresh calls per stage went from 35.48 / 36.05 / 37.31 to 36.86 / 37.69 /
# 38.59 dB (worst stage-0 call 31.41 -> 33.77 dB) for another 113 MB per target (binaries
# 2.53 -> 2.64 GB); not the default yet, as the tiny test model has only three blocks.
FIRST_BLOCKS_AT_16_BIT = 2
# And the ContextAdapter's Linears (130 M weights, +130 MB per target). Stage 0 has the
# fewest image tokens (80 real ones in unit 1), so the 128 context tokens weigh most in its
# attention. Re-quantizing only the ContextAdapter's partition of a full build with its
# Linears in float (every other partition's integers unchanged) moved the 18-block result
# from 34.75 / 36.29 / 35.16 to 35.49 / 36.63 / 35.26 dB. A whole build with them at 16 bit
# gave 35.55 / 36.47 / 34.43 dB on the build's two check calls per stage, too few to judge
# by: `neodragon-npu verify` of the default build on 16 fresh calls per stage (8 prompts)
# gives 35.48 / 36.02 / 37.08 dB, on 12 (2 prompts x 6 units) 36.15 / 36.17 / 37.00 dB.
CONTEXT_ADAPTER_PATTERNS = ("/network_layers.*",)


def denoiser_high_precision(first_blocks: int = FIRST_BLOCKS_AT_16_BIT) -> tuple[str, ...]:
    """The patterns of the weights a denoiser build keeps at 16 bit, with the Linears of
    its first ``first_blocks`` MMDiT blocks."""
    if first_blocks < 0:
        raise ValueError(f"first blocks at 16 bit: {first_blocks} is negative")
    return DENOISER_HIGH_PRECISION_LAYERS + first_blocks_patterns(first_blocks) + CONTEXT_ADAPTER_PATTERNS


DENOISER_HIGH_PRECISION = denoiser_high_precision()


def denoiser_onnx_baseline() -> list[Pass]:
    """The ONNX clean-up of "Start here", without the stage-graph fusions."""
    return [FoldConstantsPass(), ConvertMaskToFinitePass(), RemoveUnusedNodesPass()]


PIPELINES = {
    "denoiser_fx": denoiser_fx,
    "denoiser_fx_baseline": denoiser_fx_baseline,
    "denoiser_onnx": denoiser_onnx,
    "denoiser_onnx_baseline": denoiser_onnx_baseline,
}
