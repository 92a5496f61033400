"""``neodragon-npu first-frame``: text -> UNet x 4 -> VAE decoder through an ``ssd1b-unet``
and an ``ssd1b-vae-decoder`` build, with the float pipeline beside it on the same prompt and
noise.

The loop between the graphs is the host's (numpy: :mod:`neodragon_npu.neodragon_models.first_frame`).
The text conditioning comes from the float CLIP encoders: their own FP16 builds are checked
by ``build clip-l|clip-g``, and feeding the same conditioning to both loops measures what the
two quantized graphs lose. No tokenizer files are here: the prompt picks seeded synthetic
token ids (a hash of its text), and the report says so."""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from neodragon_npu.graphs import qnn
from neodragon_npu.graphs.verify import pooled_sqnr
from neodragon_npu.neodragon_models.first_frame import UNET_INPUTS, run_first_frame, to_png_array, torch_decoder, \
    torch_unet
from neodragon_npu.tools.runtime.media import psnr_8bit
from neodragon_npu.tools.engine.graph_runtime import graph_session, read_graph_build, same_model_and_target

TOKENIZER_NOTE = "no tokenizer files here: the prompt picks seeded synthetic token ids"
SYNTHETIC_NOTE = "synthetic weights make a noise image: compare with the float pipeline, not by eye"


@dataclass
class FirstFrameResult:
    prompt: str
    prompt_seed: int
    noise_seed: int
    runtime: str
    step_sqnr_db: list[float]  # each step's noise estimate, quantized loop against float loop
    latent_sqnr_db: float
    image_sqnr_db: float
    image_psnr_db: float  # the 8-bit images, peak 255
    image: Path
    float_image: Path
    seconds: float
    synthetic: bool

    def as_json(self) -> dict:
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}
        for k in ("latent_sqnr_db", "image_sqnr_db", "image_psnr_db", "seconds"):
            out[k] = round(out[k], 2)
        out["step_sqnr_db"] = [round(v, 2) for v in self.step_sqnr_db]
        out["notes"] = [TOKENIZER_NOTE] + ([SYNTHETIC_NOTE] if self.synthetic else [])
        return out


def prompt_seed(prompt: str) -> int:
    return zlib.crc32(prompt.encode("utf-8")) % (2 ** 31)


def write_png(path: Path, pixels: np.ndarray) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image

    path.parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(str(path), pixels)
    return path


def first_frame(prompt: str, unet_build: str | Path, decoder_build: str | Path, out: str | Path, *,
                runtime: str = "htp", seed: int | None = None) -> FirstFrameResult:
    """Both loops on one prompt; writes ``out`` (the compiled graphs' image) and
    ``<out>-float.png`` beside it."""
    from neodragon_npu.neodragon_models.specs import get_model
    from neodragon_npu.tools.engine.verify_build import load_options

    start = time.perf_counter()
    unet_manifest = read_graph_build(unet_build, "ssd1b-unet", "unet")
    decoder_manifest = read_graph_build(decoder_build, "ssd1b-vae-decoder", "decoder")
    same_model_and_target({"UNet": unet_manifest, "decoder": decoder_manifest})
    unet_session = graph_session(unet_build, unet_manifest, runtime)
    decoder_session = graph_session(decoder_build, decoder_manifest, runtime)
    spec = get_model("ssd1b-vae-decoder")
    models = spec.load(load_options(spec, decoder_manifest))
    p_seed = prompt_seed(prompt)
    noise_seed = p_seed if seed is None else seed
    conditioning = models.conditioning(p_seed)
    latent = models.latent_size

    def npu_unet(feed):
        return qnn.run(unet_session, {n: feed[n] for n in UNET_INPUTS})[0]

    def npu_decode(z):
        return qnn.run(decoder_session, {"latent": z})[0]

    common = dict(conditioning=conditioning, unet_config=models.unet.config, latent_size=latent,
                  scaling_factor=models.scaling_factor, seed=noise_seed)
    reference = run_first_frame(torch_unet(models.unet), torch_decoder(models.vae), **common)
    compiled = run_first_frame(npu_unet, npu_decode, **common)
    out = Path(out)
    float_out = out.with_name(f"{out.stem}-float{out.suffix or '.png'}")
    pixels, float_pixels = to_png_array(compiled.image), to_png_array(reference.image)
    write_png(out, pixels)
    write_png(float_out, float_pixels)
    return FirstFrameResult(
        prompt=prompt, prompt_seed=p_seed, noise_seed=noise_seed, runtime=runtime,
        step_sqnr_db=[pooled_sqnr([(r, c)]) for r, c in zip(reference.noise_preds, compiled.noise_preds)],
        latent_sqnr_db=pooled_sqnr([(reference.latent, compiled.latent)]),
        image_sqnr_db=pooled_sqnr([(reference.image, compiled.image)]),
        image_psnr_db=psnr_8bit(pixels, float_pixels), image=out, float_image=float_out,
        seconds=time.perf_counter() - start, synthetic=decoder_manifest["model"].get("checkpoint") is None,
    )


def format_first_frame(r: FirstFrameResult) -> str:
    where = "HTP simulator" if r.runtime == "htp" else "aimet QDQ graphs on the CPU"
    lines = [f"First frame for {r.prompt!r} ({where}; prompt seed {r.prompt_seed}, noise seed {r.noise_seed}):",
             "  UNet noise estimate vs float loop, per step: "
             + ", ".join(f"{v:.2f}" for v in r.step_sqnr_db) + " dB",
             f"  final latent: SQNR {r.latent_sqnr_db:.2f} dB; image: SQNR {r.image_sqnr_db:.2f} dB, "
             f"PSNR {r.image_psnr_db:.2f} dB (8-bit, against the float loop's image)",
             f"  wrote {r.image} and {r.float_image} ({r.seconds:.0f} s)",
             f"  note: {TOKENIZER_NOTE}"]
    if r.synthetic:
        lines.append(f"  note: {SYNTHETIC_NOTE}")
    return "\n".join(lines) + "\n"


def write_json(result: FirstFrameResult, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result.as_json(), indent=1) + "\n")
