"""Named pass pipelines, written out in order; each line says why the pass is there."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from neodragon_npu.passes.base import Pass
from neodragon_npu.passes.fx.convert_rope_to_half_split import ConvertRopeToHalfSplitPass
from neodragon_npu.passes.fx.fold_attention_scale import FoldAttentionScalePass
from neodragon_npu.passes.fx.remove_identity_modules import RemoveIdentityModulesPass
from neodragon_npu.passes.fx.specialize_shapes import SpecializeShapesPass
from neodragon_npu.passes.fx.split_adaln import SplitAdaLNPass
from neodragon_npu.passes.fx.split_attention import SplitAttentionPass
from neodragon_npu.passes.onnx.convert_mask_to_finite import ConvertMaskToFinitePass
from neodragon_npu.passes.onnx.convert_to_fp16 import ConvertToFP16Pass
from neodragon_npu.passes.onnx.fold_weight_quantization import FoldWeightQuantizationPass
from neodragon_npu.passes.onnx.fold_constants import FoldConstantsPass
from neodragon_npu.passes.onnx.fuse_rms_norm import FuseRMSNormPass
from neodragon_npu.passes.onnx.fuse_rotary_embedding import FuseRotaryEmbeddingPass
from neodragon_npu.passes.onnx.name_weights_by_content import NameWeightsByContentPass
from neodragon_npu.passes.onnx.quantize_w8a16 import QuantizeW8A16Pass
from neodragon_npu.passes.onnx.remove_unused_nodes import RemoveUnusedNodesPass
from neodragon_npu.passes.onnx.rescale_residual_stream import RescaleResidualStreamPass
from neodragon_npu.passes.onnx.requantize_matmul_operand import RequantizeMatMulOperandPass
from neodragon_npu.passes.onnx.round_weights_adaround import RoundWeightsAdaRoundPass
from neodragon_npu.passes.onnx.round_weights_gptq import RoundWeightsGPTQPass


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


# Weights every denoiser build keeps at 16 bit, chosen from the per-layer SQNR report
# (figures: docs/quantization.md): the conditioning MLPs, which feed every adaLN
# modulation; the adaLN Linears (one vector per call, so weight bytes but no compute; a
# modulation of (1 + scale) carries their error into every token); the patch embedding
# (the MatMul reading ``latent_tokens``) and ``proj_out``, the first and last layers.
DENOISER_HIGH_PRECISION_LAYERS = (
    "*time_text_embed*",
    "*norm1*.linear*",
    "*norm_out.linear*",
    "latent_tokens",
    "/proj_out/*",
)
# And every Linear of the first MMDiT blocks: their output is most of the residual stream,
# so their weight error is not diluted as in later blocks.
FIRST_BLOCKS_AT_16_BIT = 2
# And the ContextAdapter's Linears: the 128 context tokens weigh most in stage 0's attention.
CONTEXT_ADAPTER_PATTERNS = ("/network_layers.*",)


def denoiser_high_precision(first_blocks: int = FIRST_BLOCKS_AT_16_BIT) -> tuple[str, ...]:
    """The patterns of the weights a denoiser build keeps at 16 bit, with the Linears of
    its first ``first_blocks`` MMDiT blocks."""
    if first_blocks < 0:
        raise ValueError(f"first blocks at 16 bit: {first_blocks} is negative")
    return DENOISER_HIGH_PRECISION_LAYERS + first_blocks_patterns(first_blocks) + CONTEXT_ADAPTER_PATTERNS


DENOISER_HIGH_PRECISION = denoiser_high_precision()

# Weights a diffusers UNet2DConditionModel build keeps at 16 bit: those its feature stream
# passes through rather than beside. A resnet's or transformer's residual branch adds its
# int8 noise scaled by the branch's small share of the stream; the stem and head, the
# resamplers, and the 1x1 shortcuts of resnets that change width (every up-path resnet,
# whose input is concatenated with a skip) carry the whole stream, so each adds its full
# int8 noise, one after another (figures: docs/first-frame.md).
UNET_STREAM_WEIGHTS = (
    "unet.conv_in.*",
    "unet.*downsamplers*",
    "unet.*conv_shortcut*",
    "unet.*upsamplers*",
    "unet.conv_out.*",
)
# The UNet's attention projections (self and cross): their int8 noise reaches the score
# tensors through both Q and K, and the softmax passes it on to every token; with the stream
# weights alone at 16 bit they were what was left (figures: docs/first-frame.md). Matched by
# the module path the dynamo exporter records, since it names a Linear's weight val_N.
UNET_ATTENTION_WEIGHTS = (
    "unet.*.attn1.to_*",
    "unet.*.attn2.to_*",
)


def denoiser_onnx_baseline() -> list[Pass]:
    """The ONNX clean-up of "Start here", without the stage-graph fusions."""
    return [FoldConstantsPass(), ConvertMaskToFinitePass(), RemoveUnusedNodesPass()]


def cleanup_fx() -> list[Pass]:
    """FX passes for any model: what makes a traced graph static and simple."""
    return [
        # Dropout/Identity are no-ops at inference.
        RemoveIdentityModulesPass(),
        # No Shape/Gather chains reach ONNX (facts 4.5).
        SpecializeShapesPass(),
    ]


def cleanup_onnx() -> list[Pass]:
    """ONNX passes for any model: fold, make masks finite, drop what is dead."""
    return [FoldConstantsPass(), ConvertMaskToFinitePass(), RemoveUnusedNodesPass()]


def encoder_onnx() -> list[Pass]:
    """ONNX passes for a text encoder: the clean-up, and its RMS norms as one op each."""
    return [
        # the relative position bias and any shape arithmetic become constants: no bucket
        # arithmetic (log, where, min on integers) reaches the HTP
        FoldConstantsPass(),
        # finfo.min masks overflow FP16 and NaN fully masked rows (facts 4.3)
        ConvertMaskToFinitePass(),
        # T5's RMS norms as one op: one full-size x^2 write less each, and the form the
        # residual-stream rescale recognises as a scale-free reader
        FuseRMSNormPass(),
        RemoveUnusedNodesPass(),
    ]


# --- precision: what turns a float graph into what the NPU runs -------------------------

WEIGHT_ROUNDINGS = ("gptq", "adaround", "nearest")


@dataclass(frozen=True)
class W8A16:
    """Per-channel int8 weights, 16-bit activations. ``high_precision``: fnmatch patterns of
    weights kept at 16 bit; ``rounding``: how int8 weights are rounded."""

    high_precision: tuple[str, ...] = ()
    # keep at 16 bit the fewest further weights that bring the int8 rest's predicted SQNR to
    # this (graphs.quant.sensitivity); None: only ``high_precision``
    auto_16bit_db: float | None = None
    kv_bits: int = 16
    rounding: str = "gptq"
    adaround_iterations: int = 10000
    adaround_crop: tuple[int, int] | None = None  # fully convolutional models: AdaRound on crops
    range_margin: float = 2.0
    # one score range per split attention (QuantizeW8A16Pass.shared_attention_ranges)
    shared_attention_ranges: bool = True
    name: ClassVar[str] = "w8a16"

    def __post_init__(self) -> None:
        if self.rounding not in WEIGHT_ROUNDINGS:
            raise ValueError(f"unknown weight rounding {self.rounding!r}; known: {', '.join(WEIGHT_ROUNDINGS)}")
        if self.kv_bits not in (8, 16):
            raise ValueError(f"K/V bits must be 8 or 16, got {self.kv_bits}")
        if self.auto_16bit_db is not None and not 0 < self.auto_16bit_db < 96:
            raise ValueError(f"the int8 weights' SQNR target must lie between 0 and 96 dB, got {self.auto_16bit_db}")
        if self.adaround_iterations < 1:
            raise ValueError(f"AdaRound iterations must be at least 1, got {self.adaround_iterations}")

    def describe(self) -> dict:
        weights = "int16 per-channel symmetric" if "*" in self.high_precision else "int8 per-channel symmetric"
        out = {"weights": weights, "activations": "uint16", "kv_bits": self.kv_bits,
               "high_precision": list(self.high_precision), "weight_rounding": self.rounding,
               "activation_range_margin": self.range_margin,
               "attention_score_ranges": "one per split attention" if self.shared_attention_ranges else "per piece"}
        if self.auto_16bit_db is not None:
            out["auto_16bit_db"] = self.auto_16bit_db
        if self.rounding == "adaround":
            out["adaround_iterations"] = self.adaround_iterations
            if self.adaround_crop:
                out["adaround_crop"] = list(self.adaround_crop)
        return out


@dataclass(frozen=True)
class FP16:
    """Every float tensor in FP16, as the HTP computes float graphs."""

    name: ClassVar[str] = "fp16"

    def describe(self) -> dict:
        return {"weights": "float16", "activations": "float16"}


PRECISIONS = {"w8a16": W8A16, "fp16": FP16}


def w8a16(
    precision: W8A16,
    *,
    calibration,
    htp_arch: int,
    encodings_dir=None,
    encodings_prefix: str = "model",
    hessians=None,
    on_output=None,
    quantized_weight_feeds=(),
) -> list[Pass]:
    """The W8A16 pipeline for a float graph (or a merged family of graphs).

    ``hessians`` (a :class:`neodragon_npu.graphs.quant.gptq.HessianSet`) lets a caller that
    gathered GPTQ's statistics elsewhere (over graphs sharing the weights) hand them in;
    without it GPTQ runs the model on ``calibration``. ``on_output`` and
    ``quantized_weight_feeds`` go to aimet's calibration forwards (see QuantizeW8A16Pass)."""
    passes: list[Pass] = []
    if precision.rounding == "gptq":
        # int8 weights rounded with GPTQ on the calibration activations, onto the grid aimet
        # then keeps bit for bit (the model stays float)
        source = {"hessians": hessians} if hessians is not None else {"calibration": calibration}
        passes.append(RoundWeightsGPTQPass(skip=precision.high_precision, **source))
    elif precision.rounding == "adaround":
        # int8 weights rounded up or down as aimet's AdaRound learns from the calibration
        # inputs (on crops for a fully convolutional model), again onto aimet's own grid
        passes.append(RoundWeightsAdaRoundPass(calibration=calibration, iterations=precision.adaround_iterations,
                                               htp_arch=htp_arch, skip=precision.high_precision,
                                               crop=precision.adaround_crop))
    passes.append(
        # aimet-onnx QuantSim: int8 weights, activation ranges calibrated on the pipeline's
        # own samples, the AIMET encodings file
        QuantizeW8A16Pass(
            calibration=calibration,
            htp_arch=htp_arch,
            encodings_dir=encodings_dir,
            encodings_prefix=encodings_prefix,
            range_margin=precision.range_margin,
            high_precision=precision.high_precision,
            shared_attention_ranges=precision.shared_attention_ranges,
            on_output=on_output,
            quantized_weight_feeds=quantized_weight_feeds,
        )
    )
    if precision.kv_bits == 16:
        # the QNN EP drops an unsigned 16-bit MatMul operand (K, V) to 8 bit: make it signed
        passes.append(RequantizeMatMulOperandPass())
    # the weights stored as the integers the NPU holds: a third of the file, no requantizing
    passes.append(FoldWeightQuantizationPass())
    return passes


def fp16(precision: FP16, *, calibration) -> list[Pass]:
    """The FP16 pipeline: the graph emitted in FP16, so the simulator computes as the HTP."""
    return [
        # a residual stream past FP16's range (T5's, facts 4.4) divided by a power of two
        # chosen on the calibration samples, folded into the weights: exact, no op added
        RescaleResidualStreamPass(calibration=calibration),
        ConvertToFP16Pass(),
    ]
