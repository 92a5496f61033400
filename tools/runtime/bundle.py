"""Reading a Neodragon bundle and running its graphs: onnxruntime and numpy only.

This is what an app does with a bundle (docs/bundle.md): read ``manifest.json``, check it
against the schema and the device, load ``tables.npz``, and open a session per graph, the
context binaries on the HTP (onnxruntime-qnn's QNN EP; here its x86 simulator) or the
deployed QDQ / FP16 graphs on the CPU. No torch: the same code runs on a Snapdragon laptop.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from neodragon_npu.neodragon_models.host.loop import GRAPH_IDS, PHASE_GRAPHS, Graphs
from neodragon_npu.tools.runtime.schema import MANIFEST_SCHEMA

FORMAT = "neodragon-bundle/1"
MANIFEST = "manifest.json"
TABLES = "tables.npz"
RUNTIMES = ("htp", "cpu-qdq")

_PLACES = {
    "clip_l": "text: once per prompt (pooled for the denoiser, states for the UNet)",
    "clip_g": "text: once per prompt (pooled for both, states for the UNet)",
    "dt5": "text: once per prompt (the denoiser's prompt tokens)",
    "unet": "first frame: once per LCM step",
    "sdxl_decoder": "first frame: once, after the last LCM step",
    "vae_encoder": "first frame -> latent 0: once",
    "denoiser_stage0": "video: once per unit, stage 0",
    "denoiser_stage1": "video: once per unit, stage 1",
    "denoiser_stage2": "video: once per unit, stage 2",
    "decoder_first": "decode: latent frame 0",
    "decoder_next": "decode: each later latent frame, with the previous call's state",
    "sr": "upscale: once per decoded frame",
}


class BundleError(ValueError):
    """A bundle that cannot run here (missing, damaged, or built for another device)."""


def graph_place(graph_id: str) -> str:
    """Where a graph runs in the loop, in words (the manifest's ``place``)."""
    return _PLACES[graph_id]


@dataclass
class Bundle:
    root: Path
    manifest: dict
    tables: Mapping[str, np.ndarray]

    @property
    def loop(self) -> dict:
        return self.manifest["loop"]

    def path(self, rel: str) -> Path:
        return self.root / rel


def _schema_errors(manifest: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(MANIFEST_SCHEMA)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in sorted(validator.iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path)))]


def validate_manifest(manifest: dict) -> None:
    """The manifest against the schema (docs/bundle.md) and the loop's graph ids; raises
    BundleError with the first problem."""
    errors = _schema_errors(manifest)
    if errors:
        raise BundleError(f"the bundle manifest does not follow {FORMAT}: {errors[0]}"
                          + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
    missing = [g for g in GRAPH_IDS if g not in manifest["graphs"]]
    if missing:
        raise BundleError(f"the bundle has no {', '.join(missing)} graph{'s' if len(missing) > 1 else ''}: it cannot "
                          f"run the whole loop; build it again with `neodragon-npu build neodragon`")


def _files(entry: dict, runtime: str, target: str) -> list[str]:
    """The files a graph runs from under ``runtime`` for ``target``."""
    if entry["kind"] == "single":
        if runtime == "cpu-qdq":
            return [entry["deployed_model"]]
        return [entry["binaries"][target]["epcontext_model"]]
    if runtime == "cpu-qdq":
        return [p["qdq_model"] for p in entry["partitions"]]
    if on_simulator():
        return [p.get("simulator_model", "") for p in entry["partitions"]]
    return [p["binaries"][target]["epcontext_model"] for p in entry["partitions"]]


def on_simulator() -> bool:
    """onnxruntime-qnn on an x86 machine runs the HTP in its simulator, which does not load
    the shared-weight context binaries of a family: those graphs run from the non-shared
    binaries the build checked."""
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def open_bundle(root: str | Path, *, target: str | None = None, runtime: str = "htp",
                arch: int | None = None) -> Bundle:
    """Read and check a bundle before any work: its manifest (schema), every graph the loop
    needs, the target (and its HTP arch, when ``arch`` is given) and each file the runtime
    will load. Raises BundleError with one line."""
    root = Path(root)
    if runtime not in RUNTIMES:
        raise BundleError(f"unknown runtime {runtime!r}; runtimes: {', '.join(RUNTIMES)}")
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root} holds no {MANIFEST}: not a bundle (make one with `neodragon-npu build neodragon`)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if manifest.get("output") != "bundle":
        raise BundleError(f"{root} holds a {manifest.get('output', 'non-bundle')} output of neodragon-npu, not a bundle "
                          f"(make one with `neodragon-npu build neodragon`)")
    validate_manifest(manifest)
    built_for = {t["name"]: t for t in manifest["targets"]}
    if target is None:
        target = manifest["targets"][0]["name"]
    if target not in built_for:
        raise BundleError(f"the bundle was built for {', '.join(built_for)}, not {target}: build it with --target "
                          f"{target}")
    if arch is not None and built_for[target]["htp_arch"] != arch:
        raise BundleError(f"the bundle's {target} graphs are for HTP v{built_for[target]['htp_arch']}, and this "
                          f"device's HTP is v{arch}")
    for gid in GRAPH_IDS:
        for rel in _files(manifest["graphs"][gid], runtime, target):
            if not rel:
                raise BundleError(f"the bundle's {gid} graph has no binary that loads in the HTP simulator (its "
                                  f"build did not check it there); run it with --runtime cpu-qdq")
            if not (root / rel).is_file():
                raise BundleError(f"the bundle's {gid} graph is missing {rel}: the bundle is incomplete")
    tables_path = root / manifest["tables"]
    if not tables_path.is_file():
        raise BundleError(f"the bundle is missing {manifest['tables']}: the bundle is incomplete")
    with np.load(tables_path) as data:
        tables = {k: data[k] for k in data.files}
    return Bundle(root, manifest, tables)


class BundleGraphs(Graphs):
    """The bundle's graphs as onnxruntime sessions, opened at the start of their phase and
    closed at its end; a family graph runs its partitions in turn, each fed from the
    inputs and the earlier partitions' outputs."""

    def __init__(self, bundle: Bundle, runtime: str, target: str | None = None) -> None:
        from neodragon_npu.graphs.targets import get_target

        self.bundle, self.runtime = bundle, runtime
        self.target = get_target(target or bundle.manifest["targets"][0]["name"])
        self.sessions: dict[str, list] = {}

    def enter(self, phase: str) -> None:
        for gid in PHASE_GRAPHS[phase]:
            if not self._one_at_a_time(gid):
                self._open(gid)

    def _one_at_a_time(self, graph_id: str) -> bool:
        # On the CPU a QDQ graph's int8 weights unpack to fp32 when its session opens: at full
        # size the three denoiser stage graphs together outgrow a 24 GB machine, so one
        # family graph is open at a time, reopened when the loop turns to it.
        return self.runtime == "cpu-qdq" and self.bundle.manifest["graphs"][graph_id]["kind"] == "family"

    def _open(self, graph_id: str) -> None:
        from neodragon_npu.graphs import qnn

        files = _files(self.bundle.manifest["graphs"][graph_id], self.runtime, self.target.name)
        if self.runtime == "cpu-qdq":
            self.sessions[graph_id] = [qnn.cpu_session(self.bundle.path(f)) for f in files]
        else:
            self.sessions[graph_id] = [qnn.htp_session(self.bundle.path(f), self.target) for f in files]

    def leave(self, phase: str) -> None:
        for gid in PHASE_GRAPHS[phase]:
            self.sessions.pop(gid, None)

    def __getitem__(self, graph_id: str):
        from neodragon_npu.graphs import qnn

        if graph_id not in self.sessions:
            for other in [g for g in self.sessions if self._one_at_a_time(g)]:
                del self.sessions[other]
            self._open(graph_id)
        parts = self.sessions[graph_id]

        def call(feed):
            env = dict(feed)
            for session in parts:
                outs = qnn.run(session, env)
                env.update(zip((o.name for o in session.get_outputs()), outs))
            return env

        return call
