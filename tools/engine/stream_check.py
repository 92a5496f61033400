"""Decode whole videos through a streaming decoder's two compiled graphs, frame by frame,
each call's state outputs handed to the next call, against the released parallel decode.

Each graph's own build check feeds it fp32 states. Here the states are the binaries' own,
so error that builds up from frame to frame is measured, as on the device."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from neodragon_npu.graphs import qnn
from neodragon_npu.graphs.verify import pooled_sqnr
from neodragon_npu.tools.engine.graph_runtime import ChainError, graph_session, read_graph_build, same_model_and_target

FIRST_SEED = 3000  # calibration uses 1000+, build checks 2000+


# the error a caller sees when the two builds cannot be chained
StreamCheckError = ChainError


@dataclass
class StreamResult:
    frame_sqnr_db: list[list[float]]  # per video, per output frame
    pooled_db: float
    runtime: str
    seconds: float

    def as_json(self) -> dict:
        return {"pooled_sqnr_db": round(self.pooled_db, 2), "runtime": self.runtime, "seconds": round(self.seconds, 1),
                "frame_sqnr_db": [[round(v, 2) for v in video] for video in self.frame_sqnr_db]}


def check_stream(first_build: str | Path, next_build: str | Path, *, videos: int = 1, first_seed: int = FIRST_SEED,
                 runtime: str = "htp") -> StreamResult:
    """``videos`` synthetic latent videos (seeds ``first_seed``...) through ``first`` then
    ``next`` six times, on the HTP simulator (``runtime="htp"``) or aimet's QDQ graphs on
    the CPU (``"cpu-qdq"``); every output frame against ``decode_parallel`` in fp32."""
    from neodragon_npu.neodragon_models.specs import get_model
    from neodragon_npu.neodragon_models.specs.causal_vae import synthetic_latents
    from neodragon_npu.neodragon_models.streaming_decoder import state_names
    from neodragon_npu.tools.engine.verify_build import load_options

    start = time.perf_counter()
    first_manifest = read_graph_build(first_build, "vae-decoder", "first")
    next_manifest = read_graph_build(next_build, "vae-decoder", "next")
    same_model_and_target({"first": first_manifest, "next": next_manifest})
    spec = get_model("vae-decoder")
    vae = spec.load(load_options(spec, first_manifest))
    names = state_names(vae)
    first = graph_session(first_build, first_manifest, runtime)
    step = graph_session(next_build, next_manifest, runtime)
    per_video, pairs = [], []
    for v in range(videos):
        z = synthetic_latents(1, vae.config, first_seed + v)
        with torch.no_grad():
            reference = vae.decode_parallel(z)[0].transpose(0, 1).numpy()  # [frames, 3, H, W]
        frames, *state = qnn.run(first, {"latent": z[:, :, 0].numpy()})
        out = [frames]
        for t in range(1, z.shape[2]):
            frames, *state = qnn.run(step, {"latent": z[:, :, t].numpy(), **dict(zip(names, state))})
            out.append(frames)
        decoded = np.concatenate(out).astype(np.float32)
        per_video.append([pooled_sqnr([(r, d)]) for r, d in zip(reference, decoded)])
        pairs.append((reference, decoded))
    return StreamResult(per_video, pooled_sqnr(pairs), runtime, time.perf_counter() - start)


def format_stream(result: StreamResult) -> str:
    where = "HTP simulator" if result.runtime == "htp" else "aimet QDQ graphs on the CPU"
    lines = [f"Streaming decode through the compiled graphs ({where}), state handed on, against the parallel "
             f"fp32 decode:"]
    for i, video in enumerate(result.frame_sqnr_db):
        lines.append(f"  video {i}: {len(video)} frames, worst frame {min(video):.2f} dB (frame "
                     f"{int(np.argmin(video))}), first {video[0]:.2f} dB, last {video[-1]:.2f} dB")
    lines.append(f"  all frames pooled: SQNR {result.pooled_db:.2f} dB ({result.seconds:.0f} s)")
    return "\n".join(lines) + "\n"
