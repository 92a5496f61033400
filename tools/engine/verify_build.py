"""``neodragon-npu verify BUILD``: a family build measured on fresh samples.

A build checks itself on a few held-out calls per graph (two by default): enough to catch a
broken binary, not to settle a fraction of a dB. This draws samples the build never saw
from the model's own pipeline (seeds from 3000; calibration used 1000+, the build's check
2000+), chains the build's QDQ partitions on the CPU (aimet's simulation), and optionally
its float partitions, against the fp32 PyTorch outputs. With ``per_partition`` it also
says where each graph loses: for every partition, the SQNR of the tensors it hands on when
its QDQ graph runs on the float chain's inputs (the loss that partition adds by itself) and
when the QDQ chain runs up to it (the loss so far), both against the float chain. With
``htp_partition`` one partition is also compiled for the build's first target and run in
the HTP simulator on the float chain's inputs, beside its QDQ graph: where a whole graph is
too large to simulate, this shows that aimet's simulation and the HTP agree on a part of it.
The PyTorch model comes from the manifest: model, config, seed, checkpoint, removed blocks.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neodragon_npu.graphs import chain, qnn
from neodragon_npu.graphs.targets import Target, get_target
from neodragon_npu.tools.engine.artifacts import MANIFEST
from neodragon_npu.tools.engine.progress import count, peak_rss_bytes, release_memory
from neodragon_npu.graphs.verify import pooled_sqnr, sqnr_db
from neodragon_npu.neodragon_models.spec import REFERENCE_SUFFIX, LoadOptions, SamplePlan
from neodragon_npu.neodragon_models.specs import get_model

logger = logging.getLogger("neodragon_npu")

FIRST_SEED = 3000


class NotAnAllStagesBuild(ValueError):
    pass


@dataclass(frozen=True)
class PartitionLoss:
    """One partition of one stage, on the tensors it hands on (later partitions' inputs and
    the stage output), pooled over the calls, against the float chain."""

    local_db: float  # its QDQ graph fed the float chain's inputs
    chain_db: float  # the QDQ chain up to and including it
    worst_tensor: str  # the handed-on tensor with the lowest local SQNR
    worst_local_db: float


@dataclass(frozen=True)
class HtpPartitionCheck:
    """One partition compiled and run in the HTP simulator on the float chain's inputs."""

    partition: int
    target: str
    htp_vs_float_db: float  # the tensors it hands on, pooled over the calls
    htp_vs_qdq_db: float  # against its QDQ graph on the same inputs (aimet's simulation)
    qdq_vs_float_db: float
    compile_seconds: float
    run_seconds: float


@dataclass
class VerifyResult:
    prompts: list[int]
    calls: dict[str, list[str]]  # graph key -> what each call is ("prompt 3000 unit 1")
    sqnr_db: dict[str, dict[int, float]] = field(default_factory=dict)  # kind -> stage -> pooled dB
    per_call_db: dict[str, dict[int, list[float]]] = field(default_factory=dict)
    partitions: dict[int, list[PartitionLoss]] = field(default_factory=dict)  # with per_partition
    htp: dict[str, HtpPartitionCheck] = field(default_factory=dict)  # with htp_partition
    seconds: float = 0.0
    peak_rss_bytes: int = 0

    def as_json(self) -> dict:
        return {
            "prompts": self.prompts,
            "calls": {str(s): list(calls) for s, calls in self.calls.items()},
            "sqnr_db": {k: {str(s): round(v, 2) for s, v in per.items()} for k, per in self.sqnr_db.items()},
            "per_call_db": {k: {str(s): [round(v, 2) for v in vs] for s, vs in per.items()}
                            for k, per in self.per_call_db.items()},
            "partitions": {str(s): [{"local_db": round(x.local_db, 2), "chain_db": round(x.chain_db, 2),
                                      "worst_tensor": x.worst_tensor, "worst_local_db": round(x.worst_local_db, 2)}
                                     for x in losses] for s, losses in self.partitions.items()},
            "htp_partition": {s: {k: (round(v, 2) if isinstance(v, float) else v) for k, v in vars(c).items()}
                              for s, c in self.htp.items()},
            "seconds": round(self.seconds, 1),
            "peak_rss_bytes": self.peak_rss_bytes,
        }


def load_options(spec, manifest: dict) -> LoadOptions:
    """How the build loaded its model, from its manifest."""
    model = manifest["model"]
    options = {o.name: o.default for o in spec.options}
    removed = model.get("removed_blocks")
    if removed and "remove_blocks" in options:
        options["remove_blocks"] = ",".join(str(b) for b in removed)
    checkpoint = model.get("checkpoint")
    return LoadOptions(config=model["config"], checkpoint=Path(checkpoint) if checkpoint else None,
                       seed=model["seed"], options=options)


def _pooled(refs, outs) -> float:
    return pooled_sqnr(zip(refs, outs))


def read_build(build: str | Path) -> tuple[Path, dict]:
    build = Path(build)
    path = build / MANIFEST
    if not path.is_file():
        raise NotAnAllStagesBuild(f"{build} holds no {MANIFEST}: not a build directory")
    manifest = json.loads(path.read_text())
    if "partitions" not in manifest or manifest.get("mode") is None:
        raise NotAnAllStagesBuild(
            f"{build} is a single-graph build; verify measures family builds (build ... --all-stages / --all-graphs)")
    if "qdq_model" not in next(iter(manifest["partitions"][0]["graphs"].values())):
        raise NotAnAllStagesBuild(f"{build} was built --until export: it holds no quantized partitions")
    return build, manifest


def _pooled_over(names: list[str], refs: list[dict], outs: list[dict]) -> float:
    return _pooled([r[n] for r in refs for n in names], [o[n] for o in outs for n in names])


def _chains_by_partition(float_paths: list[Path], qdq_paths: list[Path], feeds: list[dict], outputs,
                         htp: tuple[int, Target] | None = None):
    """Run the float chain, the QDQ chain and each QDQ partition on the float chain's inputs
    side by side. Returns the two chains' stage outputs, a :class:`PartitionLoss` per
    partition and, with ``htp`` (partition, target), its :class:`HtpPartitionCheck`."""
    floats, quants = [dict(f) for f in feeds], [dict(f) for f in feeds]
    losses, htp_check = [], None
    for k, (fp, qp, keep) in enumerate(zip(float_paths, qdq_paths, chain.inputs_needed_after(float_paths))):
        f_session, q_session = qnn.cpu_session(fp), qnn.cpu_session(qp)
        inputs = [x.name for x in q_session.get_inputs()]
        names = [o.name for o in q_session.get_outputs()]
        if [o.name for o in f_session.get_outputs()] != names:
            raise ValueError(f"partition {k}: {fp.name} and {qp.name} do not have the same outputs")
        handed = [n for n in names if n in keep or n in outputs]
        local = [dict(zip(names, qnn.run(q_session, {n: env[n] for n in inputs}))) for env in floats]
        chain.advance(q_session, quants)
        chain.advance(f_session, floats)
        del f_session, q_session
        if htp is not None and htp[0] == k:
            htp_check = _htp_partition(k, htp[1], qp, [{n: env[n] for n in inputs} for env in floats], names,
                                       handed, floats, local)
        per_tensor = {n: _pooled_over([n], floats, local) for n in handed}
        worst = min(per_tensor, key=per_tensor.get)
        losses.append(PartitionLoss(_pooled_over(handed, floats, local), _pooled_over(handed, floats, quants),
                                    worst, per_tensor[worst]))
        logger.info("      partition %d/%d: %.2f dB by itself, %.2f dB chained", k + 1, len(float_paths),
                    losses[-1].local_db, losses[-1].chain_db)
        del local
        chain.drop_unneeded(floats, keep, outputs)
        chain.drop_unneeded(quants, keep, outputs)
    return ([[env[o] for o in outputs] for env in floats], [[env[o] for o in outputs] for env in quants], losses,
            htp_check)


def _htp_partition(k: int, target: Target, qdq_path: Path, inputs: list[dict], names: list[str],
                   handed: list[str], floats: list[dict], local: list[dict]) -> HtpPartitionCheck:
    """Partition ``k`` compiled (non-shared, in a temporary folder) and run in the HTP
    simulator on ``inputs``; ``floats`` hold the float chain's values after it, ``local``
    its QDQ graph's outputs on the same inputs."""
    logger.info("      partition %d: compiling for %s and running %d call(s) in the HTP simulator",
                k + 1, target.name, len(inputs))
    with tempfile.TemporaryDirectory(prefix="neodragon-htp-") as tmp:
        start = time.perf_counter()
        ctx = qnn.compile_context_binary(qdq_path, Path(tmp) / f"part{k}_ctx.onnx", target)
        compiled = time.perf_counter()
        session = qnn.htp_session(ctx.epcontext_model, target)
        runs = [dict(zip(names, qnn.run(session, feed))) for feed in inputs]
        ran = time.perf_counter()
        del session
    check = HtpPartitionCheck(k, target.name, _pooled_over(handed, floats, runs), _pooled_over(handed, local, runs),
                              _pooled_over(handed, floats, local), compiled - start, ran - compiled)
    logger.info("      partition %d in the HTP simulator: %.2f dB against the float chain, %.2f dB against "
                "its QDQ graph (QDQ against float: %.2f dB)", k + 1, check.htp_vs_float_db, check.htp_vs_qdq_db,
                check.qdq_vs_float_db)
    return check


def verify_build(
    build: str | Path, *, prompts: int = 2, calls_per_prompt: int | None = None, float_chain: bool = False,
    per_partition: bool = False, first_seed: int | None = None, htp_partition: int | None = None,
) -> VerifyResult:
    """SQNR of the build's chained QDQ partitions (and with ``float_chain`` its float ones,
    which the build checked already) on ``prompts`` fresh prompts, ``calls_per_prompt``
    units each (None: every unit), pooled per stage and per call. ``per_partition`` runs
    the float chain too and measures each partition (:class:`PartitionLoss`). The prompts'
    seeds start at ``first_seed`` (default :data:`FIRST_SEED`; below it lie the build's
    calibration prompts, 1000+, and check prompts, 2000+). ``htp_partition`` (0-based) runs
    that partition in the HTP simulator too (:class:`HtpPartitionCheck`; implies
    ``per_partition``)."""
    if prompts < 1:
        raise ValueError("verify needs at least one prompt")
    if calls_per_prompt is not None and calls_per_prompt < 1:
        raise ValueError("calls per prompt must be at least 1")
    build, manifest = read_build(build)
    start = time.perf_counter()
    spec = get_model(manifest["pipeline"])
    load = load_options(spec, manifest)
    parts = sorted(manifest["partitions"], key=lambda p: p["index"])
    htp = None
    if htp_partition is not None:
        if not 0 <= htp_partition < len(parts):
            raise ValueError(f"--htp-partition {htp_partition}: the build has partitions 0-{len(parts) - 1}")
        htp = (htp_partition, get_target(manifest["targets"][0]["name"]))
        per_partition = True
    keys = list(parts[0]["graphs"])
    graphs = [g for g in spec.graphs(load.config) if g.manifest_key in keys]
    paths = {
        kind: {g.manifest_key: [build / p["graphs"][g.manifest_key][f"{kind}_model"] for p in parts] for g in graphs}
        for kind in ("qdq", "float")
    }
    missing = [p for per in paths.values() for ps in per.values() for p in ps if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{build}: {len(missing)} partition file(s) missing, e.g. {missing[0].name}")

    model = spec.load(load)
    first = FIRST_SEED if first_seed is None else first_seed
    seeds = list(range(first, first + prompts))
    if first < FIRST_SEED:
        logger.warning("seeds %d-%d include the build's calibration (1000+) or check (2000+) samples: "
                       "not fresh", seeds[0], seeds[-1])
    calls = spec.samples(model, graphs, SamplePlan(calibration=0, check=prompts * (calls_per_prompt or 1 << 16),
                                                   family=True, check_groups=prompts, first_check_seed=first))
    del model
    release_memory()
    feeds, refs = {}, {}
    for g in graphs:
        feeds[g.manifest_key] = [dict(f) for f in calls.check[g.name]]
        refs[g.manifest_key] = [[f.pop(o + REFERENCE_SUFFIX) for o in g.output_names] for f in feeds[g.manifest_key]]
    result = VerifyResult(seeds, {g.manifest_key: list(calls.check_labels.get(g.name, [])) for g in graphs})
    del calls

    def record(s: str, label: str, outs) -> None:
        result.sqnr_db.setdefault(label, {})[s] = _pooled(_flat(refs[s]), _flat(outs))
        result.per_call_db.setdefault(label, {})[s] = [_pooled(r, o) for r, o in zip(refs[s], outs)]
        logger.info("      %s %s: %.2f dB over %d call(s)", s, label, result.sqnr_db[label][s], len(outs))

    for g in graphs:
        s = g.manifest_key
        if per_partition:
            logger.info("      graph %s, partition by partition", s)
            floats, quants, result.partitions[s], htp_check = _chains_by_partition(
                paths["float"][s], paths["qdq"][s], feeds[s], g.output_names, htp)
            if htp_check is not None:
                result.htp[s] = htp_check
            record(s, "w8a16_cpu", quants)
            record(s, "float_chain", floats)
            del floats, quants
            continue
        for kind, label in (("qdq", "w8a16_cpu"), ("float", "float_chain"))[: 2 if float_chain else 1]:
            record(s, label, chain.run_chain(paths[kind][s], feeds[s], g.output_names))
    result.seconds = time.perf_counter() - start
    result.peak_rss_bytes = peak_rss_bytes()
    return result


def _flat(per_call) -> list:
    return [x for call in per_call for x in call]


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
            lines.append(f"  {s}: {per[s]:6.2f} dB pooled over {len(calls[s])} call(s); per call "
                         f"{min(calls[s]):.2f} to {max(calls[s]):.2f} dB{at_build}")
    for s, losses in result.partitions.items():
        lines += ["", f"{s}, partition by partition (the tensors each hands on, against the float chain):",
                  "  partition   by itself   chained   worst tensor by itself"]
        for k, x in enumerate(losses):
            lines.append(f"  {k:9d}   {x.local_db:6.2f} dB  {x.chain_db:6.2f} dB  {x.worst_local_db:6.2f} dB {x.worst_tensor}")
    for s, c in result.htp.items():
        lines += ["", f"{s}, partition {c.partition} in the {c.target} HTP simulator (compile {c.compile_seconds:.0f} s, "
                      f"run {c.run_seconds:.0f} s), on the float chain's inputs:",
                  f"  HTP against the float chain   {c.htp_vs_float_db:6.2f} dB",
                  f"  QDQ against the float chain   {c.qdq_vs_float_db:6.2f} dB",
                  f"  HTP against QDQ               {c.htp_vs_qdq_db:6.2f} dB"]
    lines += ["", f"{result.seconds:.0f} s, peak RSS {result.peak_rss_bytes / 1e9:.2f} GB"]
    return "\n".join(lines) + "\n"
