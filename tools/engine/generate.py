"""``neodragon-npu generate``: a prompt to a video through a bundle's graphs.

The loop itself (:mod:`neodragon_npu.neodragon_models.host.loop`) and the bundle's sessions
(:mod:`neodragon_npu.tools.runtime.bundle`) use onnxruntime and numpy only. With
``--compare-float`` the same loop runs again over the float PyTorch modules of the bundle's
system (same prompt, seed and noise), and every output frame is compared.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neodragon_npu.neodragon_models.host.loop import PHASES, Loop, tokenize
from neodragon_npu.tools.runtime.bundle import BundleGraphs, open_bundle
from neodragon_npu.tools.runtime.media import (
    psnr_8bit, write_contact_sheet, write_psnr_plot, write_video,
)

logger = logging.getLogger("neodragon_npu")
SYNTHETIC_NOTE = ("this bundle holds synthetic weights, so the video is structured noise: that is expected; judge it "
                  "by its PSNR against the float pipeline, not by eye")
TOKENIZER_NOTE = "no tokenizer files here: words map to ids by a hash (docs/bundle.md)"


@dataclass
class GenerateResult:
    prompt: str
    seed: int
    runtime: str
    target: str
    frames: int
    video: Path
    contact_sheet: Path
    first_frame: Path
    seconds: float
    phase_seconds: dict[str, float]
    warnings: list[str]
    notes: list[str]
    float_video: Path | None = None
    psnr_plot: Path | None = None
    frame_psnr_db: list[float] = field(default_factory=list)
    float_seconds: float | None = None

    def as_json(self) -> dict:
        out = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}
        out["frame_psnr_db"] = [round(v, 2) for v in self.frame_psnr_db]
        out["phase_seconds"] = {k: round(v, 1) for k, v in self.phase_seconds.items()}
        return out


def prompt_seed(prompt: str) -> int:
    return zlib.crc32(prompt.encode("utf-8")) % (2 ** 31)


def _progress(label: str):
    starts: dict[str, float] = {}

    def show(what: str, i: int, n: int) -> None:
        if what in PHASES:
            logger.info("[%s %d/%d] %s done (%.1f s)", label, PHASES.index(what) + 1, len(PHASES), what,
                        time.perf_counter() - starts.pop("phase", time.perf_counter()))
            starts["phase"] = time.perf_counter()
        elif i == n or i % max(1, n // 4) == 0:
            logger.info("      %s %d/%d", what, i, n)

    starts["phase"] = time.perf_counter()
    return show


def generate(prompt: str, bundle_dir: str | Path, out: str | Path, *, runtime: str = "htp", target: str | None = None,
             seed: int | None = None, compare_float: bool = False, arch: int | None = None) -> GenerateResult:
    """Run the bundle's loop on ``prompt``; write ``out`` (MP4, or GIF), ``<stem>-sheet.png``,
    ``<stem>-first-frame.png``; with ``compare_float`` also ``<stem>-float.mp4`` and
    ``<stem>-psnr.png``."""
    bundle = open_bundle(bundle_dir, target=target, runtime=runtime, arch=arch)  # every check before any work
    target = target or bundle.manifest["targets"][0]["name"]
    seed = prompt_seed(prompt) if seed is None else seed
    out = Path(out)
    start = time.perf_counter()
    where = "the HTP (here onnxruntime-qnn's x86 simulator)" if runtime == "htp" else "the CPU (QDQ / FP16 graphs)"
    logger.info("generating %r (seed %d) from %s on %s", prompt, seed, bundle_dir, where)
    for w in tokenize(bundle.loop, prompt)[1]:  # said before the work, not after it
        logger.warning("warning: %s", w)
    run = Loop(bundle.loop, bundle.tables, BundleGraphs(bundle, runtime, target), _progress("bundle")).run(
        [(prompt, seed)])[0]
    seconds = time.perf_counter() - start
    frames = run.video_frames
    video = write_video(frames, out)
    first = _write_png(out.with_name(f"{out.stem}-first-frame.png"), run.first_frame_pixels)
    synthetic = bundle.manifest["system"]["weights"].startswith("synthetic")
    notes = [TOKENIZER_NOTE] + ([SYNTHETIC_NOTE] if synthetic else [])
    result = GenerateResult(prompt, seed, runtime, target, len(frames), video, out, first, seconds,
                            dict(run.seconds), run.warnings, notes)
    rows = [(f"{runtime}", frames)]
    if compare_float:
        from neodragon_npu.neodragon_models.system import get_system
        from neodragon_npu.tools.engine.bundle import FloatGraphs

        system = get_system(bundle.manifest["system"]["name"])
        if dict(system.configs) != bundle.manifest["system"]["configs"]:
            raise ValueError(f"the bundle's configs {bundle.manifest['system']['configs']} are not this tool's "
                             f"{system.name} system: the float pipeline cannot be rebuilt to compare")
        t0 = time.perf_counter()
        reference = Loop(bundle.loop, bundle.tables, FloatGraphs(system, bundle.manifest["system"]["seed"]),
                         _progress("float")).run([(prompt, seed)])[0]
        result.float_seconds = time.perf_counter() - t0
        ref_frames = reference.video_frames
        result.frame_psnr_db = [psnr_8bit(a, b) for a, b in zip(frames, ref_frames)]
        result.float_video = write_video(ref_frames, out.with_name(f"{out.stem}-float{out.suffix}"))
        result.psnr_plot = write_psnr_plot(result.frame_psnr_db, out.with_name(f"{out.stem}-psnr.png"),
                                           f"{prompt!r}: {runtime} against the float pipeline, per frame")
        rows.append(("float", ref_frames))
    result.contact_sheet = write_contact_sheet(rows, out.with_name(f"{out.stem}-sheet.png"),
                                               title=f"{prompt!r} (seed {seed})")
    return result


def _write_png(path: Path, pixels: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(pixels).save(path)
    return path


def format_generate(r: GenerateResult) -> str:
    where = "HTP simulator" if r.runtime == "htp" else "CPU, QDQ / FP16 graphs"
    lines = [f"{r.frames} frames for {r.prompt!r} (seed {r.seed}, {where}, {r.target}) in {r.seconds:.0f} s: "
             + ", ".join(f"{k} {v:.1f} s" for k, v in r.phase_seconds.items()),
             f"  wrote {r.video}, {r.contact_sheet}, {r.first_frame}"]
    if r.frame_psnr_db:
        finite = [v for v in r.frame_psnr_db if np.isfinite(v)]
        worst = int(np.argmin(r.frame_psnr_db))
        lines += [f"  against the float pipeline ({r.float_seconds:.0f} s): PSNR per frame (8-bit, dB):",
                  "    " + " ".join(f"{v:.1f}" for v in r.frame_psnr_db),
                  f"  worst frame {worst}: {r.frame_psnr_db[worst]:.2f} dB; mean {np.mean(finite):.2f} dB"
                  if finite else "  every frame equal to the float pipeline's",
                  f"  wrote {r.float_video} and {r.psnr_plot}"]
    for w in r.warnings:
        lines.append(f"  warning: {w}")
    for n in r.notes:
        lines.append(f"  note: {n}")
    return "\n".join(lines) + "\n"


def write_json(result: GenerateResult, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result.as_json(), indent=1) + "\n")
