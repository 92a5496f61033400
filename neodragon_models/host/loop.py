"""The whole Neodragon generation loop on the host, numpy only, around graphs it is handed.

``run`` goes prompt text -> tokens -> CLIP-L, CLIP-G, DT5 -> 4 LCM steps of the SSD-1B UNet
-> SDXL VAE decoder (the first frame) -> Lanczos resize -> causal VAE encoder (the first
latent) -> units x stages of the denoiser's stage graphs -> the streaming decoder, frame by
frame with its state -> QuickSRNet 2x per frame. Every constant comes from the bundle
manifest's ``host`` section and its tables (``tables.npz``), so an app that reads the same
manifest runs the same steps.

The graphs are callables ``feed -> {output: array}`` keyed by the bundle's graph ids
(:data:`GRAPH_IDS`): onnxruntime sessions for a bundle, the float PyTorch modules for the
reference (and for the calibration samples of a bundle build). The loop runs in phases
(:data:`PHASES`), each over every prompt before the next starts, so a caller that holds
one model at a time (``Graphs.enter``/``leave``) runs several prompts with bounded memory.

Random draws come from numpy generators seeded by (seed, purpose): the first frame's
latent and LCM noise, the VAE posterior, the video noise and block noise; the same seed
gives the same draws to the compiled and the float loops.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

from neodragon_npu.neodragon_models.host import numerics as nm
from neodragon_npu.neodragon_models.host.tokenizer import Tokenizer

Feed = dict[str, np.ndarray]
GraphFn = Callable[[Feed], dict[str, np.ndarray]]

PHASES = ("text", "first_frame", "encode", "denoise", "decode", "upscale")
PHASE_GRAPHS = {
    "text": ("clip_l", "clip_g", "dt5"),
    "first_frame": ("unet", "sdxl_decoder"),
    "encode": ("vae_encoder",),
    "denoise": ("denoiser_stage0", "denoiser_stage1", "denoiser_stage2"),
    "decode": ("decoder_first", "decoder_next"),
    "upscale": ("sr",),
}
GRAPH_IDS = tuple(g for phase in PHASES for g in PHASE_GRAPHS[phase])
# random streams, one per purpose, so a phase's draws do not depend on the others
_FIRST_FRAME, _POSTERIOR, _VIDEO = 1, 2, 3


class Graphs:
    """What the loop calls: ``graphs[id](feed)``. ``enter(phase)`` and ``leave(phase)``
    bracket a phase (a caller loads and frees its models there)."""

    def __getitem__(self, graph_id: str) -> GraphFn:
        raise NotImplementedError

    def enter(self, phase: str) -> None:
        pass

    def leave(self, phase: str) -> None:
        pass


class GraphTable(Graphs):
    """Graphs from a plain mapping (id -> callable)."""

    def __init__(self, table: Mapping[str, GraphFn]) -> None:
        self.table = dict(table)

    def __getitem__(self, graph_id: str) -> GraphFn:
        return self.table[graph_id]


@dataclass
class PromptRun:
    """One prompt through the loop: what each phase made."""

    prompt: str
    seed: int
    warnings: list[str] = field(default_factory=list)
    text: dict[str, np.ndarray] = field(default_factory=dict)
    first_frame_image: np.ndarray | None = None  # [1, 3, H, W] in [-1, 1], the SDXL decoder's
    first_frame_pixels: np.ndarray | None = None  # [H, W, 3] uint8
    latents: list[np.ndarray] = field(default_factory=list)  # one [1, C, fpu, h, w] per unit
    decoded: np.ndarray | None = None  # [F, 3, H, W] in [-1, 1]
    upscaled: np.ndarray | None = None  # [F, 3, 2H, 2W] in [0, 1]
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def video_frames(self) -> np.ndarray:
        """[F, 2H, 2W, 3] uint8: what the video file holds."""
        return (np.clip(self.upscaled, 0, 1).transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)


def tokenize(host: dict, prompt: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """The three encoders' token inputs for ``prompt`` (the modifier appended), and a
    warning when an encoder cut words off."""
    text = prompt + host["prompt_modifier"]
    feeds, cut = {}, []
    for graph_id in ("clip_l", "clip_g", "dt5"):
        tok = Tokenizer.from_json(host["tokenizers"][graph_id])
        ids, mask, dropped = tok(text)
        if dropped:
            cut.append(f"{graph_id} keeps the first {tok.max_words}")
        feeds[graph_id] = ({"input_ids": ids, "end_onehot": tok.end_onehot(ids)} if tok.kind == "clip"
                           else {"input_ids": ids, "attention_mask": mask})
    warnings = []
    if cut:
        n = len(Tokenizer.from_json(host["tokenizers"]["dt5"]).words(text))
        warnings.append(f"the prompt with its modifier ({host['prompt_modifier'].strip()!r}) is {n} words, digits "
                        f"and marks; {', '.join(cut)}: the rest is cut off, as the real tokenizers truncate")
    return feeds, warnings


def stage_feed(video: dict, tables: Mapping[str, np.ndarray], unit: int, stage: int, clips: list[np.ndarray],
               text: dict[str, np.ndarray]) -> Feed:
    """A denoiser call's inputs: the clips' patches padded at the front to the stage's
    envelope, their position-embedding crops, the text, the stage's timestep features,
    the call's RoPE tables and the attention mask."""
    call = video["calls"][f"{unit},{stage}"]
    p = video["patch_size"]
    layout = call["clips"]
    tokens = np.concatenate([nm.patchify(x, p) for x in clips], axis=1)
    pos = np.concatenate([np.tile(tables[f"denoiser/pos_grid/s{stage}/l{c['level']}"], (1, c["num_frames"], 1))
                          for c in layout], axis=1)
    times = np.concatenate([np.repeat(np.arange(c["first_frame"], c["first_frame"] + c["num_frames"]),
                                      (c["height"] // p) * (c["width"] // p)) for c in layout])
    pad = call["pad_tokens"]
    if pad:
        tokens = np.concatenate([np.zeros((1, pad, tokens.shape[2]), np.float32), tokens], axis=1)
        pos = np.concatenate([np.zeros((1, pad, pos.shape[2]), np.float32), pos], axis=1)
    return {
        "latent_tokens": tokens.astype(np.float32),
        "pos_embed": pos.astype(np.float32),
        "prompt_embeds": text["prompt_embeds"],
        "pooled_projections": text["pooled"],
        "timestep_proj": tables[f"denoiser/timestep_proj/s{stage}"],
        "rope_cos": tables[f"denoiser/rope_cos/u{unit}/s{stage}"],
        "rope_sin": tables[f"denoiser/rope_sin/u{unit}/s{stage}"],
        "attn_bias": nm.attention_bias(text["prompt_mask"], times, pad, video["mask_value"]),
    }


class Loop:
    """The phases, over ``graphs``, with the manifest's ``host`` section and its tables."""

    def __init__(self, host: dict, tables: Mapping[str, np.ndarray], graphs: Graphs,
                 progress: Callable[[str, int, int], None] | None = None) -> None:
        self.host, self.tables, self.graphs = host, tables, graphs
        self.progress = progress or (lambda what, i, n: None)

    def run(self, prompts: list[tuple[str, int]], phases: tuple[str, ...] = PHASES,
            runs: list[PromptRun] | None = None) -> list[PromptRun]:
        """Each (prompt, seed) through ``phases``, in the order of :data:`PHASES`: from the
        start, or on from ``runs``, the prompts as the phases before left them."""
        runs = runs if runs is not None else [PromptRun(p, s) for p, s in prompts]
        for phase in phases:
            self.graphs.enter(phase)
            try:
                for i, run in enumerate(runs):
                    start = time.perf_counter()
                    getattr(self, f"_{phase}")(run)
                    run.seconds[phase] = time.perf_counter() - start
                    self.progress(phase, i + 1, len(runs))
            finally:
                self.graphs.leave(phase)
        return runs

    def _text(self, run: PromptRun) -> None:
        feeds, run.warnings = tokenize(self.host, run.prompt)
        outs = {g: self.graphs[g](feeds[g]) for g in ("clip_l", "clip_g", "dt5")}
        run.text = {
            "pooled": np.concatenate([outs["clip_l"]["text_embeds"], outs["clip_g"]["text_embeds"]], axis=-1),
            "sdxl_embeds": np.concatenate([outs["clip_l"]["penultimate_hidden_states"],
                                           outs["clip_g"]["penultimate_hidden_states"]], axis=-1),
            "sdxl_pooled": outs["clip_g"]["text_embeds"],
            "prompt_embeds": outs["dt5"]["prompt_embeds"],
            "prompt_mask": feeds["dt5"]["attention_mask"],
        }
        run.text = {k: np.asarray(v, dtype=np.float32) for k, v in run.text.items()}

    def _first_frame(self, run: PromptRun) -> None:
        ff = self.host["first_frame"]
        rng = np.random.default_rng([run.seed, _FIRST_FRAME])
        h, w = ff["latent_size"]
        latents = rng.standard_normal((1, ff["latent_channels"], h, w)).astype(np.float32)
        unet = self.graphs["unet"]
        for k, coefficients in enumerate(ff["lcm_steps"]):
            feed = {"sample": latents, "timestep_features": self.tables[f"unet/timestep_features/k{k}"],
                    "encoder_hidden_states": run.text["sdxl_embeds"], "text_embeds": run.text["sdxl_pooled"],
                    "time_ids_features": self.tables["unet/time_ids_features"]}
            eps = np.asarray(unet(feed)["noise_pred"], dtype=np.float32)
            noise = rng.standard_normal(latents.shape).astype(np.float32) if coefficients["renoise"] else None
            latents = nm.lcm_step_with(coefficients, eps, latents, noise)
            self.progress("LCM step", k + 1, len(ff["lcm_steps"]))
        image = self.graphs["sdxl_decoder"]({"latent": latents / ff["vae_scaling_factor"]})["image"]
        run.first_frame_image = np.asarray(image, dtype=np.float32)
        run.first_frame_pixels = nm.to_pixels(run.first_frame_image[0])

    def _encode(self, run: PromptRun) -> None:
        video = self.host["video"]
        pixels = nm.resize_lanczos(run.first_frame_pixels, tuple(video["frame_size"]))
        moments = self.graphs["vae_encoder"]({"image": nm.from_pixels(pixels)})["moments"]
        z = nm.sample_posterior(np.asarray(moments, dtype=np.float32), np.random.default_rng([run.seed, _POSTERIOR]))
        first = video["first_frame_latent"]
        run.latents = [((z - first["shift"]) * first["scale"])[:, :, None].astype(np.float32)]

    def _denoise(self, run: PromptRun) -> None:
        video = self.host["video"]
        rng = np.random.default_rng([run.seed, _VIDEO])
        c, t = video["latent_channels"], video["latent_frames"]
        h, w = video["latent_size"]
        noise = rng.standard_normal((1, c, t, h, w)).astype(np.float32)
        for _ in range(video["num_stages"] - 1):  # down to the lowest stage, variance kept
            noise = nm.resize_bilinear(noise, (noise.shape[-2] // 2, noise.shape[-1] // 2)) * 2.0
        fpu, p, stages = video["frames_per_unit"], video["patch_size"], video["stages"]
        units = video["denoised_units"]
        for i, unit in enumerate(units):
            history = np.concatenate(run.latents, axis=2)
            levels = [nm.resize_bilinear(history, tuple(s["latent_size"])) for s in stages[:-1]] + [history]
            x = noise[:, :, unit * fpu:(unit + 1) * fpu]
            for s, stage in enumerate(stages):
                if stage["upsample"] is not None:
                    up = stage["upsample"]
                    x = nm.upsample_renoise(x, up["alpha"], up["beta"], video["gamma"], rng)
                layout = video["calls"][f"{unit},{s}"]["clips"]
                clips = [levels[cl["level"]][:, :, cl["first_frame"]:cl["first_frame"] + cl["num_frames"]]
                         for cl in layout[:-1]] + [x]
                feed = stage_feed(video, self.tables, unit, s, clips, run.text)
                out = np.asarray(self.graphs[f"denoiser_stage{s}"](feed)["noise_pred"], dtype=np.float32)
                flow = nm.unpatchify(out[:, -video["calls"][f"{unit},{s}"]["output_tokens"]:], p, c, fpu,
                                     x.shape[-2], x.shape[-1])
                x = (x - flow).astype(np.float32)  # one Euler step, sigma 1 -> 0
            run.latents.append(x)
            self.progress("unit", i + 1, len(units))

    def _decode(self, run: PromptRun) -> None:
        video, decoder = self.host["video"], self.host["decoder"]
        z = np.concatenate(run.latents, axis=2)
        first, rest = video["first_frame_latent"], video["video_latent"]
        names = [s["name"] for s in decoder["state"]]
        out = self.graphs["decoder_first"]({"latent": z[:, :, 0] / first["scale"] + first["shift"]})
        frames, state = [out["frames"]], [out[f"{n}_out"] for n in names]
        for k in range(1, z.shape[2]):
            out = self.graphs["decoder_next"]({"latent": z[:, :, k] / rest["scale"] + rest["shift"],
                                               **dict(zip(names, state))})
            frames.append(out["frames"])
            state = [out[f"{n}_out"] for n in names]
        run.decoded = np.concatenate(frames).astype(np.float32)

    def _upscale(self, run: PromptRun) -> None:
        sr = self.graphs["sr"]
        out = []
        for i, frame in enumerate(run.decoded):
            out.append(sr({"frame": np.clip(frame[None] / 2 + 0.5, 0.0, 1.0)})["upscaled"])
            self.progress("frame", i + 1, len(run.decoded))
        run.upscaled = np.concatenate(out).astype(np.float32)
