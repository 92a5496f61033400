"""``build neodragon``: every graph of the system in one bundle, calibrated end to end.

1. The float pipeline (:mod:`neodragon_npu.neodragon_models.host.loop` over the float
   PyTorch modules) runs on the calibration prompts and, apart, on the check prompts, one
   phase at a time with only that phase's models loaded. Every graph call is recorded: a
   graph is calibrated on what the float graph before it really produced, and checked
   against the float outputs on prompts it was not calibrated on.
2. Each model is built by the ordinary build engine, one after another, with those
   recorded samples in place of the spec's own; every step goes through the bundle's step
   cache, so a killed build resumes at its last finished step.
3. The manifest (``manifest.json``, schema in docs/bundle.md) lists every graph with its
   files, inputs, outputs, precision and measured fidelity, and the host loop's constants;
   ``tables.npz`` holds the loop's per-call arrays.

Each phase and each build runs in a fresh process (:mod:`.fresh`): the peak is one
build's, not one build's plus what the ones before it left in the heap.

The bundle appears at ``-o`` only when every graph is built and checked.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from neodragon_npu.graphs.feeds import load_samples, save_samples
from neodragon_npu.graphs.onnx_io import file_interface
from neodragon_npu.graphs.stats import format_bytes
from neodragon_npu.graphs.targets import get_target
from neodragon_npu.neodragon_models.host.loop import PHASE_GRAPHS, Graphs, Loop, PHASES
from neodragon_npu.neodragon_models.spec import REFERENCE_SUFFIX, LoadOptions, Samples
from neodragon_npu.neodragon_models.system import System, check_system, get_system, host_section, pos_table
from neodragon_npu.tools.engine import artifacts
from neodragon_npu.tools.engine.build import build_plan
from neodragon_npu.tools.engine.cache import StepCache, cache_root, kill_point, shared_run, step_key
from neodragon_npu.tools.engine.fresh import run_fresh
from neodragon_npu.tools.engine.host import describe_host, host_line
from neodragon_npu.tools.engine.options import BuildOptions, plan_build
from neodragon_npu.tools.engine.preflight import check_free_space, estimate_bytes, plan_weight_bytes
from neodragon_npu.tools.engine.progress import TreePeak, labelled, release_memory
from neodragon_npu.tools.runtime.bundle import FORMAT, TABLES, graph_place

logger = logging.getLogger("neodragon_npu")

CALIBRATION_SEED, CHECK_SEED = 1000, 2000
# Calibration prompts, written for this tool: varied subjects, motion and light, as a user
# would type them. With synthetic weights the words only pick token ids.
PROMPTS = (
    "a red fox trotting through fresh snow at dawn",
    "waves breaking on black volcanic rocks, slow motion",
    "a street market in the rain at night, neon reflections",
    "an astronaut floating past a window of the space station",
    "a hummingbird hovering over a purple flower",
    "time lapse of clouds rolling over a mountain ridge",
    "a chef tossing vegetables in a flaming wok",
    "a paper boat drifting down a gutter after the storm",
)
CHECK_PROMPTS = (
    "a golden retriever running along a beach at sunset",
    "a steam train crossing a stone bridge in autumn",
)


@dataclass(frozen=True)
class Unit:
    """One build of the bundle: a model's graphs, and the bundle's id for each."""

    name: str  # its folder under graphs/
    model: str
    graphs: dict[str, str]  # the spec's graph name -> bundle graph id
    family: bool = False
    # calls kept, evenly spaced, where a graph runs far more often than its build needs
    # (QuickSRNet once per frame: AdaRound's time grows with every calibration frame)
    calibration_limit: int | None = None
    check_limit: int | None = None


def units(system: System) -> list[Unit]:
    fam = set(system.family_models)
    return [
        Unit("clip-l", "clip-l", {"encoder": "clip_l"}),
        Unit("clip-g", "clip-g", {"encoder": "clip_g"}),
        Unit("dt5", "dt5", {"encoder": "dt5"}),
        Unit("ssd1b-unet", "ssd1b-unet", {"unet": "unet"}, "ssd1b-unet" in fam),
        Unit("ssd1b-vae-decoder", "ssd1b-vae-decoder", {"decoder": "sdxl_decoder"}, "ssd1b-vae-decoder" in fam),
        Unit("vae-encoder", "vae-encoder", {"first_frame": "vae_encoder"}),
        Unit("denoiser", "denoiser", {f"stage{s}": f"denoiser_stage{s}" for s in range(3)}, True),
        Unit("vae-decoder-first", "vae-decoder", {"first": "decoder_first"}),
        Unit("vae-decoder-next", "vae-decoder", {"next": "decoder_next"}),
        Unit("quicksrnet", "quicksrnet", {"x2": "sr"}, calibration_limit=16, check_limit=8),
    ]


def graph_sources(system: System) -> dict[str, tuple[str, str]]:
    """Bundle graph id -> (model, the spec's graph name)."""
    return {gid: (u.model, g) for u in units(system) for g, gid in u.graphs.items()}


# --- the float graphs ----------------------------------------------------------------------

def _load_options(spec, config: str, seed: int) -> LoadOptions:
    return LoadOptions(config=config, checkpoint=None, seed=seed, options={o.name: o.default for o in spec.options})


class FloatGraphs(Graphs):
    """The float PyTorch graph modules of ``system``, loaded per phase and freed after it."""

    def __init__(self, system: System, seed: int) -> None:
        self.system, self.seed = system, seed
        self.sources = graph_sources(system)
        self.fns: dict = {}

    def enter(self, phase: str) -> None:
        from neodragon_npu.neodragon_models.specs import get_model

        loaded = {}
        for gid in PHASE_GRAPHS[phase]:
            model_name, graph_name = self.sources[gid]
            spec = get_model(model_name)
            if model_name not in loaded:
                loaded[model_name] = spec.load(_load_options(spec, self.system.config(model_name), self.seed))
            graph = next(g for g in spec.graphs(self.system.config(model_name)) if g.name == graph_name)
            self.fns[gid] = self._fn(graph, graph.module(loaded[model_name]).eval())

    @staticmethod
    def _fn(graph, module):
        @torch.no_grad()
        def call(feed):
            out = module(*(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in graph.input_names))
            out = out if isinstance(out, (tuple, list)) else (out,)
            return {n: o.numpy() for n, o in zip(graph.output_names, out)}

        return call

    def leave(self, phase: str) -> None:
        self.fns.clear()
        release_memory()

    def __getitem__(self, graph_id: str):
        return self.fns[graph_id]


class Recorder(Graphs):
    """Records every call of the graphs it wraps. :meth:`flush` (after each prompt) writes
    each graph's calls so far to ``<id>-<n>.npz``, the outputs as ``<output>_fp32`` when
    ``references``: at full size one prompt's decoder calls and their states are GBs."""

    def __init__(self, inner: Graphs, out_dir: Path, references: bool) -> None:
        self.inner, self.out_dir, self.references = inner, out_dir, references
        self.calls: dict[str, list[dict]] = {}
        self.files: list[Path] = []

    def enter(self, phase: str) -> None:
        self.inner.enter(phase)

    def leave(self, phase: str) -> None:
        self.inner.leave(phase)
        self.flush()

    def flush(self) -> None:
        for gid, calls in self.calls.items():
            if calls:
                chunk = sum(1 for f in self.files if f.name.startswith(f"{gid}-"))
                self.files.append(save_samples(self.out_dir / f"{gid}-{chunk:03d}.npz", calls))
        self.calls = {}

    def __getitem__(self, graph_id: str):
        fn = self.inner[graph_id]

        def call(feed):
            out = fn(feed)
            record = {k: np.array(v) for k, v in feed.items()}
            if self.references:
                record |= {k + REFERENCE_SUFFIX: np.array(v) for k, v in out.items()}
            self.calls.setdefault(graph_id, []).append(record)
            return out

        return call


def recorded(samples_dir: Path, graph_id: str) -> list[dict]:
    """A graph's recorded calls, in the order they ran."""
    feeds = []
    for chunk in sorted(samples_dir.glob(f"{graph_id}-*.npz")):
        feeds += load_samples(chunk)
    if not feeds:
        raise ValueError(f"no recorded calls of {graph_id} in {samples_dir}")
    return feeds


def _prompts(texts: tuple[str, ...], n: int, first_seed: int) -> list[tuple[str, int]]:
    return [(texts[i % len(texts)], first_seed + i) for i in range(n)]


# --- the build -----------------------------------------------------------------------------

@dataclass
class BundleResult:
    out_dir: Path
    manifest: dict
    seconds: float
    peak_rss_bytes: int


def build_bundle(config: str, targets: tuple[str, ...], out_dir: str | Path, *, seed: int = 0,
                 calibration_prompts: int | None = None, cache: bool = True, cache_dir: str | Path | None = None,
                 force: bool = False) -> BundleResult:
    """Every graph of the ``config`` system into the bundle ``out_dir``."""
    system = get_system(config)
    check_system(system)
    if not targets:
        raise ValueError("give at least one target")
    resolved = [get_target(t) for t in targets]
    n_calib = calibration_prompts or system.calibration_prompts
    out_dir = Path(out_dir)
    root = cache_root(out_dir, cache_dir, cache)
    plan_units = units(system)
    # every model's options, and the disk space all the builds need, are checked before any work
    plans = [plan_build(_unit_options(unit, system, targets, seed, root, cache)) for unit in plan_units]
    need, free = check_free_space(sum(estimate_bytes(p, plan_weight_bytes(p)) for p in plans), out_dir, root,
                                  "this bundle")
    start, peak = time.perf_counter(), TreePeak()
    times: dict[str, float] = {}
    estimates = _previous_times(root, system.name)
    with artifacts.staged_dir(out_dir, "bundle", force=force) as work, shared_run() as used:
        logger.info("bundle %s (%s) for %s: %d graphs in %d builds, writing about %s (%s free); host %s",
                    system.name, system.summary, ", ".join(t.name for t in resolved),
                    sum(len(u.graphs) for u in plan_units), len(plan_units), format_bytes(need), format_bytes(free),
                    host_line(describe_host()))
        t0 = time.perf_counter()
        # the builds below open the cache in turn: it is held here only while the samples are made
        with labelled("float pipeline"), StepCache(root) as step_cache:
            samples_dir, samples_key, host, tables = _record(system, seed, n_calib, work, step_cache)
            used |= step_cache.used
        times["float pipeline (samples)"] = time.perf_counter() - t0
        np.savez(work / TABLES, **tables)
        for i, unit in enumerate(plan_units):
            done = sum(times.values())
            eta = _eta(plan_units[i:], estimates)
            logger.info("[bundle %d/%d] %s%s", i + 1, len(plan_units), unit.name,
                        f" (about {eta / 60:.0f} min left, from the last build of this system)" if eta else "")
            t0 = time.perf_counter()
            used |= run_fresh(f"the {unit.name} build", _build_unit, unit, system, targets, seed, root, cache,
                              samples_dir, samples_key, work)
            kill_point(f"bundle:built:{unit.name}")
            times[unit.name] = time.perf_counter() - t0
            # kept as each model finishes: a rerun after a kill estimates from them too
            _save_times(root, system.name, {**estimates, **times})
            logger.info("      %s built in %.0f s (%.0f s so far)", unit.name, times[unit.name], done + times[unit.name])
        # the samples stay in the cache; an app needs none of them
        shutil.rmtree(samples_dir)
        manifest = _manifest(system, seed, resolved, plan_units, work, host, n_calib, times, peak.peak)
        artifacts.write_manifest(work, manifest, kind="bundle")
        (work / "report.txt").write_text(format_bundle(manifest))
    with StepCache(root) as step_cache:  # evicts around what every build of the bundle used
        logger.info(step_cache.finish(used))
    peak.stop()
    return BundleResult(out_dir, manifest, time.perf_counter() - start, peak.peak)


def _unit_options(unit: Unit, system: System, targets, seed: int, root, cache: bool) -> BuildOptions:
    return BuildOptions(model=unit.model, config=system.config(unit.model),
                        graphs=() if unit.family else tuple(unit.graphs), family=unit.family,
                        targets=tuple(targets), seed=seed, cache=cache and root is not None,
                        cache_dir=root).replace(**system.build_options.get(unit.model, {}))


def _record(system: System, seed: int, n_calib: int, work: Path, step_cache: StepCache):
    """The float pipeline on the calibration and the check prompts, one cache step per phase:
    a build killed inside it resumes at the phase it was in (at full size the whole pipeline
    takes over half an hour). Each phase's entry holds its graphs' recorded calls, and the
    prompts as the phase left them, which the next phase goes on from."""
    host, tables = host_section(system, pos_table(system))
    prompts = {"calibration": _prompts(PROMPTS, n_calib, CALIBRATION_SEED),
               "check": _prompts(CHECK_PROMPTS, system.check_prompts, CHECK_SEED)}
    key = step_key("bundle-samples", system=dataclasses.asdict(system), seed=seed, prompts=prompts)
    samples_dir = work / "samples"
    runs: dict[str, list | None] = {label: None for label in prompts}
    for phase in PHASES:
        key = step_key("bundle-phase", before=key, phase=phase)

        def run_phase(phase=phase):
            return run_fresh(f"the float pipeline's {phase} phase", _run_phase, system, seed, phase, prompts, runs,
                             host, tables, samples_dir)

        after = step_cache.run("bundle-phase", key, work, run_phase, f"the float pipeline's {phase} phase")
        kill_point(f"bundle:phase:{phase}")
        if after is not None:
            runs = after
    return samples_dir, key, host, tables


def _run_phase(system: System, seed: int, phase: str, prompts: dict, runs: dict, host: dict, tables: dict,
               samples_dir: Path):
    """One phase of the float pipeline on every prompt set (in a process of its own):
    the files it recorded and the prompts as it left them."""
    files, after = [], {}
    for label, label_prompts in prompts.items():
        (samples_dir / label).mkdir(parents=True, exist_ok=True)
        recorder = Recorder(FloatGraphs(system, seed), samples_dir / label, references=label == "check")

        def progress(what, i, n, label=label, recorder=recorder):
            if what in PHASES:
                recorder.flush()
                logger.info("      %s prompts, %s: %d/%d", label, what, i, n)
            elif i == n or i % max(1, n // 4) == 0:  # inside a prompt: a full-size call takes a while
                logger.info("        %s %d/%d", what, i, n)

        after[label] = Loop(host, tables, recorder, progress).run(label_prompts, (phase,), runs[label])
        files += recorder.files
    # nothing goes on from the last phase: its frames need not be kept
    return files, None if phase == PHASES[-1] else after


def _recorded_samples(unit: Unit, samples_dir: Path):
    def samples(model, graphs, plan) -> Samples:
        calibration, check, labels = {}, {}, {}
        for g in graphs:
            gid = unit.graphs[g.name]
            calibration[g.name] = _spaced(recorded(samples_dir / "calibration", gid), unit.calibration_limit)
            check[g.name] = _spaced(recorded(samples_dir / "check", gid), unit.check_limit)
            labels[g.name] = [f"check prompt call {i}" for i in range(len(check[g.name]))]
        # a prompt's denoiser calls come unit after unit: GPTQ picks feeds across prompts
        per_prompt = len(model.config.geometry.denoised_units) if unit.model == "denoiser" else 1
        return Samples(calibration, check, labels, calls_per_group=per_prompt)

    return samples


def _spaced(feeds: list, limit: int | None) -> list:
    if limit is None or len(feeds) <= limit:
        return feeds
    return [feeds[int(i)] for i in np.linspace(0, len(feeds) - 1, limit).round()]


def _build_unit(unit: Unit, system: System, targets, seed: int, root, cache: bool, samples_dir: Path,
                samples_key: str, work: Path) -> set:
    """One model's build (in a process of its own): the cache entries it used."""
    plan = plan_build(_unit_options(unit, system, targets, seed, root, cache))
    spec = dataclasses.replace(plan.spec, samples=_recorded_samples(unit, samples_dir),
                               samples_key=f"{samples_key}:{unit.name}")
    with labelled(unit.name), shared_run() as used:
        build_plan(dataclasses.replace(plan, spec=spec), work / "graphs" / unit.name)
    return used


def _eta(remaining: list[Unit], estimates: dict[str, float]) -> float | None:
    if not estimates or any(u.name not in estimates for u in remaining):
        return None
    return sum(estimates[u.name] for u in remaining)


def _times_path(root, system: str) -> Path | None:
    return None if root is None else Path(root) / f"bundle-{system}-times.json"


def _previous_times(root, system: str) -> dict[str, float]:
    path = _times_path(root, system)
    if path is None or not path.is_file():
        return {}
    return json.loads(path.read_text())


def _save_times(root, system: str, times: dict[str, float]) -> None:
    path = _times_path(root, system)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(times, indent=1) + "\n")


# --- the manifest --------------------------------------------------------------------------

def _io(model_path: Path) -> tuple[list[dict], list[dict]]:
    signature = file_interface(model_path)[0]
    return signature["inputs"], signature["outputs"]


def _graph_entry(unit: Unit, graph_name: str, gid: str, sub: dict, root: Path) -> dict:
    rel = f"graphs/{unit.name}"
    entry: dict = {"model": unit.model, "config": sub["model"].get("config"), "build": rel,
                   "phase": next(p for p, ids in PHASE_GRAPHS.items() if gid in ids), "place": graph_place(gid)}
    if unit.family:
        key = next(k for k in sub["stage_graphs"] if k == graph_name or f"stage{k}" == graph_name)
        parts = []
        for p in sub["partitions"]:
            g = p["graphs"][key]
            part = {"index": p["index"], "qdq_model": f"{rel}/{g['qdq_model']}", "encodings": f"{rel}/{g['encodings']}",
                    "binaries": {t: {k: f"{rel}/{v}" for k, v in b.items()} for t, b in g["binaries"].items()}}
            sim = root / rel / "htp_check" / f"{graph_name}_part{p['index']}_ctx.onnx"
            if sim.is_file():
                part["simulator_model"] = f"{rel}/htp_check/{sim.name}"
            parts.append(part)
        entry.update(kind="family", precision="w8a16", partitions=parts, quantization=sub.get("quantization"))
        inputs, outputs = _family_io([root / p["qdq_model"] for p in parts])
        ver = sub["verification"]
        entry["fidelity"] = {"reference": "fp32 PyTorch, the float pipeline's own calls on the check prompts",
                             **{kind: per[key] for kind, per in ver.items() if isinstance(per, dict) and key in per},
                             "threshold_db": ver["gate"]["threshold_db"], "passed": ver["gate"]["passed"]}
    else:
        g = sub["graphs"][0]
        precision = "w8a16" if "qdq_model" in sub else "fp16"
        deployed = sub.get("qdq_model") or sub.get("fp16_model")
        binaries = g.get("binaries") or {sub["target"]["name"]: {"epcontext_model": g["epcontext_model"],
                                                                "binary": g["binary"]}}
        entry.update(kind="single", precision=precision, deployed_model=f"{rel}/{deployed}",
                     binaries={t: {k: f"{rel}/{v}" for k, v in b.items()} for t, b in binaries.items()},
                     quantization=sub.get("quantization"))
        if precision == "w8a16":
            entry["encodings"] = f"{rel}/{sub['encodings']}"
        inputs, outputs = _io(root / rel / deployed)
        ver = sub["verification"]
        entry["fidelity"] = {"reference": "fp32 PyTorch, the float pipeline's own calls on the check prompts",
                             "device": ver["device"], "sqnr_db": ver["sqnr_db"],
                             # a sample is one output of one call
                             "min_sample_sqnr_db": ver["min_sample_sqnr_db"], "samples": ver["samples"],
                             "threshold_db": ver["threshold_db"], "passed": ver["passed"]}
    entry["inputs"], entry["outputs"] = inputs, outputs
    return entry


def _family_io(paths: list[Path]) -> tuple[list[dict], list[dict]]:
    """A partition chain's own inputs (those no earlier partition makes) and the last
    partition's outputs."""
    made, inputs = set(), []
    for path in paths:
        ins, outs = _io(path)
        inputs += [i for i in ins if i["name"] not in made and i["name"] not in {x["name"] for x in inputs}]
        made |= {o["name"] for o in outs}
    return inputs, _io(paths[-1])[1]


def _manifest(system: System, seed: int, targets, plan_units: list[Unit], work: Path, host: dict, n_calib: int,
              times: dict[str, float], peak: int) -> dict:
    graphs = {}
    for unit in plan_units:
        sub = json.loads((work / "graphs" / unit.name / "manifest.json").read_text())
        for graph_name, gid in unit.graphs.items():
            graphs[gid] = _graph_entry(unit, graph_name, gid, sub, work)
    return {
        "format": FORMAT,
        "system": {"name": system.name, "summary": system.summary, "configs": dict(system.configs), "seed": seed,
                   "weights": "synthetic (seeded)"},
        "targets": [{"name": t.name, "soc_model": t.soc_model, "htp_arch": t.htp_arch} for t in targets],
        "graphs": graphs,
        "tables": TABLES,
        "loop": host,
        "calibration": {"source": "the float pipeline run end to end; each graph's feeds are what the float graph "
                                  "before it produced",
                        "prompts": _prompts(PROMPTS, n_calib, CALIBRATION_SEED),
                        "check_prompts": _prompts(CHECK_PROMPTS, system.check_prompts, CHECK_SEED)},
        "build": {"seconds": {k: round(v, 1) for k, v in times.items()}, "total_seconds": round(sum(times.values()), 1),
                  "peak_rss_bytes": peak},
    }


def format_bundle(manifest: dict) -> str:
    """The bundle's report: each graph's precision and fidelity, each build's time."""
    sysm = manifest["system"]
    lines = [f"Neodragon bundle, system {sysm['name']} ({sysm['summary']}), weights {sysm['weights']}, "
             f"for {', '.join(t['name'] for t in manifest['targets'])}", "",
             f"{'graph':<18} {'model':<18} {'precision':<9} {'fidelity against fp32 (check prompts)':<44} place"]
    for gid, g in manifest["graphs"].items():
        f = g["fidelity"]
        if "sqnr_db" in f:
            fid = f"{f['sqnr_db']:.2f} dB ({f['device'].split(' (')[0]}; floor {f['threshold_db']:.0f})"
        else:
            kind = "htp_simulator" if "htp_simulator" in f else "w8a16_cpu"
            fid = f"{f[kind]:.2f} dB ({kind.replace('_', ' ')}; floor {f['threshold_db']:.0f})"
        lines.append(f"{gid:<18} {g['model']:<18} {g['precision']:<9} {fid:<44} {g['place']}")
    b = manifest["build"]
    lines += ["", "Build time per part (s):"]
    total = b["total_seconds"] or 1.0
    for k, v in b["seconds"].items():
        lines.append(f"  {k:<28} {v:8.1f}  {100 * v / total:5.1f} %")
    # GB of 10^9 bytes, as every step's line and the CLI's closing line give it
    lines.append(f"  {'total':<28} {b['total_seconds']:8.1f}; peak RSS {b['peak_rss_bytes'] / 1e9:.2f} GB "
                 "(this process and its workers)")
    return "\n".join(lines) + "\n"
