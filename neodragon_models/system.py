"""Neodragon as one system: which config of each model goes into a bundle, and what the host
loop between the graphs needs (the manifest's ``host`` section and its tables).

A *system* names one config per model. The models' own ``tiny`` configs are each sized for
their own tests and do not chain (a 40-wide DT5 against a 64-wide one, 4 latent channels
against 16), so the tiny system takes ``tiny-system`` configs where needed: every width,
length and frame size agrees with the graph before it. :func:`check_system` says where two
configs disagree.

The host section holds every constant of ../shared/neodragon-submodules.md section 7: the
tokenizers, the prompt modifier, the LCM steps, the latent scales and shifts, the pyramid's
stages (timesteps, upsample alpha and beta, gamma for the block noise), the history layout
of every (unit, stage) call, the decoder's state. The tables are the arrays the host would
otherwise compute per call from long formulas: each stage's timestep features, the
position-embedding crops per (stage, level), the RoPE tables per (unit, stage), the UNet's
time features.
"""

from __future__ import annotations

import dataclasses
import math
import types
from dataclasses import dataclass

import numpy as np
import torch

from neodragon_npu.kernels.attention import MASK_VALUE
from neodragon_npu.kernels.rope import rope_tables
from neodragon_npu.neodragon_models import pyramid
from neodragon_npu.neodragon_models.causal_vae import (
    FIRST_FRAME_SCALE, FIRST_FRAME_SHIFT, VIDEO_SCALE, VIDEO_SHIFT, CausalVideoVAE, get_causal_vae_config,
)
from neodragon_npu.neodragon_models.clip import get_clip_config
from neodragon_npu.neodragon_models.configs import get_denoiser_config
from neodragon_npu.neodragon_models.dt5 import get_dt5_config
from neodragon_npu.neodragon_models.mmdit import sincos_2d_table
from neodragon_npu.neodragon_models.host.numerics import LCM_TIMESTEPS, lcm_coefficients, time_ids
from neodragon_npu.neodragon_models.host.tokenizer import Tokenizer
from neodragon_npu.neodragon_models.quicksrnet import SCALE as SR_SCALE, get_quicksrnet_config
from neodragon_npu.neodragon_models import ssd1b
from neodragon_npu.neodragon_models.streaming_decoder import state_names, state_shapes

# the released pipeline appends this to the prompt, once, for SSD-1B and the video encoders
PROMPT_MODIFIER = ", hyper quality, Ultra HD, 8K"
MODELS = ("clip-l", "clip-g", "dt5", "ssd1b-unet", "ssd1b-vae-decoder", "vae-encoder", "denoiser", "vae-decoder",
          "quicksrnet")


@dataclass(frozen=True)
class System:
    name: str
    configs: dict[str, str]  # model -> config
    calibration_prompts: int  # prompts whose float run calibrates every graph
    check_prompts: int  # prompts (not among them) every graph is checked on
    summary: str
    # built as partitioned families (shared weights); the rest as single graphs
    family_models: tuple[str, ...] = ("denoiser",)
    # build options (``BuildOptions`` fields) a model takes in this system besides its defaults
    build_options: dict[str, dict] = dataclasses.field(default_factory=dict)

    def config(self, model: str) -> str:
        return self.configs[model]


SYSTEMS = {
    "tiny": System(
        "tiny", {"clip-l": "tiny", "clip-g": "tiny", "dt5": "tiny", "ssd1b-unet": "tiny", "ssd1b-vae-decoder": "tiny",
                 "vae-encoder": "tiny-system", "denoiser": "tiny-system", "vae-decoder": "tiny-system",
                 "quicksrnet": "tiny-system"},
        calibration_prompts=4, check_prompts=1,
        summary="every graph narrow and small: 64x128 video frames, 25 frames, 3 units x 3 stages",
        # QuickSRNet's three tiny convolutions settle long before AdaRound's 10000 default.
        # The tiny decoder (8 to 16 channels) sits right at its full-size 35 dB floor
        # (docs/bundle.md): another machine's rounding could tip it under, so in this
        # system it gates at the 30 dB every generated frame must hold.
        build_options={"quicksrnet": {"adaround_iterations": 1000}, "vae-decoder": {"min_sqnr_db": 30.0}}),
    "neodragon": System(
        "neodragon", {m: "neodragon" for m in MODELS} | {"quicksrnet": "small"},
        calibration_prompts=4, check_prompts=1,
        summary="the released sizes: 320x512, 49 frames (6 units x 3 stages), 2x to 640x1024",
        family_models=("denoiser", "ssd1b-unet", "ssd1b-vae-decoder"),
        # At these sizes the x86 HTP simulator runs the convolution decoders and the encoder
        # for tens of minutes per call (docs/causal-vae.md, docs/first-frame.md): inside the
        # bundle they are checked from their deployed graphs on the CPU, as the large
        # families are; their single builds still check in the simulator.
        build_options={"vae-encoder": {"verify_htp": False}, "vae-decoder": {"verify_htp": False},
                       "ssd1b-vae-decoder": {"verify_htp": False, "layer_report": False}}),
}


def get_system(name: str) -> System:
    if name not in SYSTEMS:
        raise ValueError(f"unknown system config {name!r}; known: {', '.join(SYSTEMS)}")
    return SYSTEMS[name]


def _unet_config(system: System):
    config = ssd1b.get_unet_config(system.config("ssd1b-unet"))
    return types.SimpleNamespace(**config)


def check_system(system: System) -> None:
    """Raises ValueError naming every place where one graph's output does not fit the next
    graph's input under ``system``'s configs."""
    den = get_denoiser_config(system.config("denoiser"))
    dt5 = get_dt5_config(system.config("dt5"))
    clip_l = get_clip_config("clip-l", system.config("clip-l"))
    clip_g = get_clip_config("clip-g", system.config("clip-g"))
    unet = _unet_config(system)
    enc = get_causal_vae_config(system.config("vae-encoder"))
    dec = get_causal_vae_config(system.config("vae-decoder"))
    sr = get_quicksrnet_config(system.config("quicksrnet"))
    geo, mm = den.geometry, den.mmdit
    problems = []

    def need(what: str, a, b) -> None:
        if a != b:
            problems.append(f"{what}: {a} against {b}")

    need("DT5 output width / denoiser text width", dt5.project_out_dim, den.context_adapter.input_dims)
    need("DT5 tokens / denoiser text length", dt5.max_length, geo.text_len)
    need("CLIP-L + CLIP-G pooled width / denoiser pooled width", clip_l.projection_dim + clip_g.projection_dim,
         mm.pooled_projection_dim)
    need("CLIP-L + CLIP-G states / UNet cross-attention width", clip_l.hidden_size + clip_g.hidden_size,
         unet.cross_attention_dim)
    need("CLIP-G pooled + time ids / UNet class embedding width",
         clip_g.projection_dim + 6 * unet.addition_time_embed_dim, unet.projection_class_embeddings_input_dim)
    need("CLIP-L / CLIP-G tokens", clip_l.max_position_embeddings, clip_g.max_position_embeddings)
    need("VAE encoder / decoder config", enc, dec)
    need("VAE latent channels / denoiser channels", enc.encoder_out_channels, mm.in_channels)
    need("VAE latent size / denoiser latent size", enc.latent_size, (geo.latent_height, geo.latent_width))
    need("VAE latent frames / denoiser latent frames", dec.latent_frames, geo.num_latent_frames)
    need("VAE frame size / QuickSRNet input", (dec.height, dec.width), (sr.height, sr.width))
    if problems:
        raise ValueError(f"the {system.name} system's configs do not chain: " + "; ".join(problems))


def tokenizers(system: System) -> dict[str, dict]:
    """The three tokenizers as the manifest writes them."""
    out = {}
    for graph_id, variant in (("clip_l", "clip-l"), ("clip_g", "clip-g")):
        cfg = get_clip_config(variant, system.config(variant))
        end = cfg.end_token
        out[graph_id] = Tokenizer("clip", cfg.max_position_embeddings, eos_id=end, pad_id=end,
                                  word_ids=(0, min(cfg.bos_token_id, end)), bos_id=cfg.bos_token_id).as_json()
    dt5 = get_dt5_config(system.config("dt5"))
    out["dt5"] = Tokenizer("t5", dt5.max_length, eos_id=1, pad_id=0, word_ids=(2, dt5.vocab_size)).as_json()
    return out


def pos_table(system: System) -> torch.Tensor:
    """The denoiser's 2-D sin-cos table ``[1, S*S, D]`` from its config (what synthetic
    weights hold in ``transformer.pos_embed.pos_embed``), without building the model."""
    mm = get_denoiser_config(system.config("denoiser")).mmdit
    return torch.from_numpy(sincos_2d_table(mm.inner_dim, mm.pos_embed_max_size, mm.sample_size // mm.patch_size)
                            ).float()[None]


def host_section(system: System, positions: torch.Tensor) -> tuple[dict, dict[str, np.ndarray]]:
    """The manifest's ``host`` section and the tables (name -> array) for ``system``;
    ``positions`` is the denoiser's sin-cos table (:func:`pos_table`)."""
    den = get_denoiser_config(system.config("denoiser"))
    geo, mm = den.geometry, den.mmdit
    unet = _unet_config(system)
    vae = get_causal_vae_config(system.config("vae-decoder"))
    sr = get_quicksrnet_config(system.config("quicksrnet"))
    sched = pyramid.PyramidSchedule.from_geometry(geo)
    p = mm.patch_size
    tables: dict[str, np.ndarray] = {}

    latent_h, latent_w = unet.sample_size if isinstance(unet.sample_size, (tuple, list)) else (unet.sample_size,) * 2
    ids = time_ids(8 * latent_h, 8 * latent_w)
    for k, t in enumerate(LCM_TIMESTEPS):
        tables[f"unet/timestep_features/k{k}"] = ssd1b.host_embedding_features(unet, t, ids)["timestep_features"]
    tables["unet/time_ids_features"] = ssd1b.host_embedding_features(unet, LCM_TIMESTEPS[0], ids)["time_ids_features"]
    first_frame = {
        "latent_channels": unet.in_channels, "latent_size": [latent_h, latent_w],
        "image_size": [8 * latent_h, 8 * latent_w], "vae_scaling_factor": float(ssd1b.get_vae_config(
            system.config("ssd1b-vae-decoder"))["scaling_factor"]),
        "time_ids": ids.reshape(-1).tolist(), "lcm_steps": lcm_coefficients(),
        "initial_noise": "standard normal [1, C, h, w] (init_noise_sigma 1)",
        "step": "x0 = (x - sqrt(1 - alpha_cumprod) eps) / sqrt(alpha_cumprod); d = c_out x0 + c_skip x; "
                "x = sqrt(alpha_cumprod_next) d + sqrt(1 - alpha_cumprod_next) noise where renoise, else d",
        "conditioning": "encoder_hidden_states = CLIP-L and CLIP-G penultimate states side by side; "
                        "text_embeds = CLIP-G's pooled projection",
        "output": "SDXL decoder image in [-1, 1] -> 8-bit pixels (x / 2 + 0.5, clipped, x 255, rounded)",
    }

    stages = []
    for s in range(geo.num_stages):
        up = None
        if s:
            orig = 1 - sched.orig_start_sigmas[s]
            alpha = 1 / (math.sqrt(1 + 1 / sched.gamma) * (1 - orig) + orig)
            up = {"alpha": alpha, "beta": alpha * (1 - orig) / math.sqrt(sched.gamma)}
        stages.append({"stage": s, "latent_size": list(geo.stage_latent_hw(s)), "timestep": sched.timesteps[s],
                       "sigmas": [1.0, 0.0], "upsample": up})
        tables[f"denoiser/timestep_proj/s{s}"] = pyramid.timestep_projection(
            torch.tensor([sched.timesteps[s]]), mm.timestep_proj_dim).numpy()
    calls = {}
    for unit in geo.denoised_units:
        for s in range(geo.num_stages):
            layout = pyramid.clip_layout(geo, unit, s)
            n = sum(c.tokens(p) for c in layout)
            envelope = pyramid.envelope_image_tokens(geo, p, s)
            calls[f"{unit},{s}"] = {
                "clips": [{"level": c.level, "first_frame": c.first_frame, "num_frames": c.num_frames,
                           "height": c.height, "width": c.width} for c in layout],
                "image_tokens": n, "pad_tokens": envelope - n,
                "output_tokens": pyramid.output_token_count(geo, p, s)}
            seq_times = torch.cat([torch.zeros(geo.text_len + envelope - n), pyramid.temporal_ids(layout, p)])
            cos, sin = rope_tables(seq_times, mm.attention_head_dim, mm.rope_theta)
            tables[f"denoiser/rope_cos/u{unit}/s{s}"] = cos.numpy()
            tables[f"denoiser/rope_sin/u{unit}/s{s}"] = sin.numpy()
            for c in layout:
                tables[f"denoiser/pos_grid/s{s}/l{c.level}"] = pyramid.cropped_pos_embed(
                    positions, mm.pos_embed_max_size, pyramid.Clip(c.level, 0, 1, c.height, c.width), layout[-1],
                    p).numpy()
    video = {
        "frame_size": [vae.height, vae.width], "latent_channels": mm.in_channels,
        "latent_size": [geo.latent_height, geo.latent_width], "latent_frames": geo.num_latent_frames,
        "frames_per_unit": geo.frames_per_unit, "denoised_units": list(geo.denoised_units),
        "num_stages": geo.num_stages, "patch_size": p, "gamma": sched.gamma, "text_len": geo.text_len,
        "mask_value": MASK_VALUE,
        "first_frame_latent": {"shift": FIRST_FRAME_SHIFT, "scale": FIRST_FRAME_SCALE,
                               "encode": "z = (sample - shift) * scale", "decode": "sample = z / scale + shift"},
        "video_latent": {"shift": VIDEO_SHIFT, "scale": VIDEO_SCALE, "decode": "sample = z / scale + shift"},
        "first_frame_input": "the first frame's pixels resized (Lanczos-3) to frame_size, x / 255 * 2 - 1",
        "posterior": "moments = mean ; logvar on channels: z = mean + exp(clip(logvar, -30, 20) / 2) noise",
        "noise": "standard normal [1, C, latent_frames, H, W], then (num_stages - 1) times: bilinear to half "
                 "size (align_corners false, no antialias), x 2; unit u takes frames u*fpu:(u+1)*fpu",
        "history": "per unit: all latents so far along time; level l < num_stages - 1 is the history resized "
                   "bilinearly to stage l's latent size, the last level the history itself; a call's clips "
                   "(oldest first) are levels[level][:, :, first_frame:first_frame+num_frames], then the target",
        "upsample": "into stage s > 0: nearest 2x, then alpha x + beta block_noise; block noise is N(0, "
                    "(1 + gamma) I - gamma 11^T) over each 2x2 block",
        "step": "x = x - unpatchify(noise_pred) (sigma 1 -> 0)",
        "stages": stages, "calls": calls,
        "inputs": {
            "latent_tokens": "patches (c, kh, kw order) of the call's clips, zero rows in front up to the envelope",
            "pos_embed": "per clip, table denoiser/pos_grid/s{stage}/l{level} repeated num_frames times; zero rows "
                         "in front like the tokens",
            "prompt_embeds": "DT5 output", "pooled_projections": "CLIP-L ++ CLIP-G pooled projections",
            "timestep_proj": "table denoiser/timestep_proj/s{stage}",
            "rope_cos": "table denoiser/rope_cos/u{unit}/s{stage}", "rope_sin": "table denoiser/rope_sin/u{unit}/s{stage}",
            "attn_bias": "over [text ; pad ; image tokens]: groups valid text + image, padded text, pad; a query sees "
                         "keys of its group at its own or an earlier frame (text at frame 0); 0 seen, mask_value not",
        },
    }
    with torch.device("meta"):
        meta_vae = CausalVideoVAE(vae)
    decoder = {
        "state": [{"name": n, "shape": list(s)} for n, s in zip(state_names(meta_vae), state_shapes(meta_vae))],
        "first": "decoder_first(latent 0) -> frames (1) and <state>_out", "next":
            "decoder_next(latent k, state = the previous call's <state>_out) -> frames (8) and <state>_out",
        "frames": 1 + (geo.num_latent_frames - 1) * 8,
    }
    upscale = {"scale": SR_SCALE, "input_size": [sr.height, sr.width],
               "input": "each decoded frame x / 2 + 0.5 clipped to [0, 1]", "output": "[0, 1]"}
    host = {"prompt_modifier": PROMPT_MODIFIER, "tokenizers": tokenizers(system), "first_frame": first_frame,
            "video": video, "decoder": decoder, "upscale": upscale}
    return host, {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tables.items()}
