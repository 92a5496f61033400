"""``neodragon-npu verify BUILD``: an all-stages build measured on fresh prompts.

A build checks itself on a few held-out calls per stage (two by default): enough to catch a
broken binary, not to settle a fraction of a dB. On the full-size build, stage 2 gave
34.90 dB on its two check calls and 37.08 dB on 16 fresh ones (8 prompts; one call alone
ranged from 35.9 to 38.5 dB). This runs the float pipeline again for prompts the
build never saw (seeds from 3000; calibration used 1000+, the build's check 2000+), every
unit of each unless told otherwise, and chains the build's QDQ partitions on the CPU
(aimet's simulation), and optionally its float partitions, against the fp32 PyTorch
outputs.
The PyTorch model comes from the manifest: config, seed, checkpoint and removed blocks.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path


from graphs.artifacts import MANIFEST
from graphs.progress import count, peak_rss_bytes, release_memory
from graphs.samples import to_numpy_feed
from graphs.verify import sqnr_db
from neodragon_models.sampling import collect_samples
from passes.flows.denoiser import load_denoiser
from passes.flows.denoiser_stages import _pooled, _run_chain

logger = logging.getLogger("neodragon_npu")

FIRST_SEED = 3000


class NotAnAllStagesBuild(ValueError):
    pass


@dataclass
class VerifyResult:
    prompts: list[int]
    calls: dict[int, list[tuple[int, int]]]  # stage -> (prompt seed, unit) per call
    sqnr_db: dict[str, dict[int, float]] = field(default_factory=dict)  # kind -> stage -> pooled dB
    per_call_db: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    seconds: float = 0.0
    peak_rss_bytes: int = 0

    def as_json(self) -> dict:
        return {
            "prompts": self.prompts,
            "calls": {str(s): [list(c) for c in calls] for s, calls in self.calls.items()},
            "sqnr_db": {k: {str(s): round(v, 2) for s, v in per.items()} for k, per in self.sqnr_db.items()},
            "per_call_db": {k: {str(s): [round(v, 2) for v in vs] for s, vs in per.items()}
                            for k, per in self.per_call_db.items()},
            "seconds": round(self.seconds, 1),
            "peak_rss_bytes": self.peak_rss_bytes,
        }


def _model_options(build: Path, manifest: dict):
    """The options :func:`load_denoiser` needs, as the build recorded them."""
    from types import SimpleNamespace

    model = manifest["model"]
    removed = model.get("removed_blocks")
    checkpoint = model.get("checkpoint")
    return SimpleNamespace(
        config=model["config"], checkpoint=Path(checkpoint) if checkpoint else None, seed=model["seed"],
        remove_blocks=",".join(str(b) for b in removed) if removed else None, importance=None,
    )


def read_build(build: str | Path) -> tuple[Path, dict]:
    build = Path(build)
    path = build / MANIFEST
    if not path.is_file():
        raise NotAnAllStagesBuild(f"{build} holds no {MANIFEST}: not a build directory")
    manifest = json.loads(path.read_text())
    if manifest.get("mode") != "all-stages":
        raise NotAnAllStagesBuild(
            f"{build} is a single-stage build; verify measures all-stages builds (build denoiser --all-stages)")
    return build, manifest


def verify_build(
    build: str | Path, *, prompts: int = 2, calls_per_prompt: int | None = None, float_chain: bool = False
) -> VerifyResult:
    """SQNR of the build's chained QDQ partitions (and with ``float_chain`` its float ones,
    which the build checked already) on ``prompts`` fresh prompts, ``calls_per_prompt``
    units each (None: every unit), pooled per stage and per call."""
    if prompts < 1:
        raise ValueError("verify needs at least one prompt")
    if calls_per_prompt is not None and calls_per_prompt < 1:
        raise ValueError("calls per prompt must be at least 1")
    build, manifest = read_build(build)
    start = time.perf_counter()
    parts = sorted(manifest["partitions"], key=lambda p: p["index"])
    stages = sorted(int(s) for s in parts[0]["graphs"])
    paths = {
        kind: {s: [build / p["graphs"][str(s)][f"{kind}_model"] for p in parts] for s in stages}
        for kind in ("qdq", "float")
    }
    missing = [p for per in paths.values() for ps in per.values() for p in ps if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{build}: {len(missing)} partition file(s) missing, e.g. {missing[0].name}")

    denoiser = load_denoiser(_model_options(build, manifest))
    units = len(denoiser.config.geometry.denoised_units)
    per_prompt = units if calls_per_prompt is None else min(units, calls_per_prompt)
    seeds = list(range(FIRST_SEED, FIRST_SEED + prompts))
    logger.info("float pipeline: %d prompt(s), %d call(s) per stage each", prompts, per_prompt)
    samples = collect_samples(denoiser, seeds, tuple(stages), progress=lambda i, n: count("prompt", i, n),
                              units_per_prompt={seed: per_prompt for seed in seeds})
    del denoiser
    release_memory()
    feeds = {s: [to_numpy_feed(x.inputs) for x in samples[s]] for s in stages}
    refs = {s: [x.output.numpy() for x in samples[s]] for s in stages}
    result = VerifyResult(seeds, {s: [(x.prompt_seed, x.unit) for x in samples[s]] for s in stages})
    del samples

    for s in stages:
        for kind, label in (("qdq", "w8a16_cpu"), ("float", "float_chain"))[: 2 if float_chain else 1]:
            outs = _run_chain(paths[kind][s], feeds[s])
            result.sqnr_db.setdefault(label, {})[s] = _pooled(refs[s], outs)
            result.per_call_db.setdefault(label, {})[s] = [sqnr_db(r, o) for r, o in zip(refs[s], outs)]
            logger.info("      stage %d %s: %.2f dB over %d call(s)", s, label, result.sqnr_db[label][s], len(outs))
            del outs
    result.seconds = time.perf_counter() - start
    result.peak_rss_bytes = peak_rss_bytes()
    return result


def format_verify(build: Path, manifest: dict, result: VerifyResult) -> str:
    title = f"{build}: {manifest['model']['config']}, {len(result.prompts)} fresh prompt(s) (seeds {result.prompts[0]}+)"
    lines = [title, "=" * len(title), ""]
    built = manifest.get("verification", {})
    for label in result.sqnr_db:
        per, calls = result.sqnr_db[label], result.per_call_db[label]
        lines.append(f"{label}:")
        for s in sorted(per):
            seen = built.get(label, {}).get(str(s))
            at_build = f"   (the build's own check: {seen:.2f} dB)" if seen is not None else ""
            lines.append(f"  stage {s}: {per[s]:6.2f} dB pooled over {len(calls[s])} call(s); per call "
                         f"{min(calls[s]):.2f} to {max(calls[s]):.2f} dB{at_build}")
    lines += ["", f"{result.seconds:.0f} s, peak RSS {result.peak_rss_bytes / 1e9:.2f} GB"]
    return "\n".join(lines) + "\n"
