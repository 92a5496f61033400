"""Running single-graph builds from their directories: the manifest read and checked to be
the graph a host loop needs, and a session on the HTP simulator (the context binary) or on
the CPU (aimet's QDQ graph). The host tools that chain builds (``verify-stream``,
``first-frame``) share this."""

from __future__ import annotations

import json
from pathlib import Path

from neodragon_npu.graphs import qnn
from neodragon_npu.graphs.targets import get_target
from neodragon_npu.tools.engine.artifacts import MANIFEST

RUNTIMES = ("htp", "cpu-qdq")


class ChainError(ValueError):
    """Builds that cannot be run together (wrong model, graph or target, or not compiled)."""


def read_graph_build(build: str | Path, model: str, graph: str) -> dict:
    """The manifest of a single-graph ``model`` build of ``graph``; anything else is one error."""
    path = Path(build) / MANIFEST
    if not path.is_file():
        raise ChainError(f"{build} holds no {MANIFEST}: not a build directory")
    manifest = json.loads(path.read_text())
    names = [g.get("name") for g in manifest.get("graphs", [])]
    if manifest.get("pipeline") != model or names not in ([graph], [f"{model}_{graph}"]):
        raise ChainError(f"{build} is not a {model} build of the {graph!r} graph "
                         f"(it holds {manifest.get('pipeline')} {', '.join(map(str, names))})")
    return manifest


def same_model_and_target(manifests: dict[str, dict], fields: tuple[str, ...] = ("config", "checkpoint", "seed")):
    """Builds (label -> manifest) that a loop chains must come from one model and target."""
    (label, first), *rest = manifests.items()
    for other_label, other in rest:
        a = {k: first["model"].get(k) for k in fields}
        b = {k: other["model"].get(k) for k in fields}
        if a != b or first["target"] != other["target"]:
            raise ChainError(f"the {label} and {other_label} builds differ in model (config, checkpoint, seed) or "
                             f"target: {a} for {first['target']['name']} against {b} for {other['target']['name']}")


def graph_session(build: str | Path, manifest: dict, runtime: str):
    """A session on the build's one graph: its context binary in the HTP simulator
    (``htp``) or its QDQ graph on the CPU (``cpu-qdq``)."""
    if runtime not in RUNTIMES:
        raise ChainError(f"unknown runtime {runtime!r}; runtimes: {', '.join(RUNTIMES)}")
    entry = manifest["graphs"][0]
    if runtime == "htp":
        if "epcontext_model" not in entry:
            raise ChainError(f"{build} holds no context binary (built with --until before compile)")
        return qnn.htp_session(Path(build) / entry["epcontext_model"], get_target(manifest["target"]["name"]))
    if "qdq_model" not in manifest:
        raise ChainError(f"{build} holds no quantized graph (built with --until export)")
    return qnn.cpu_session(Path(build) / manifest["qdq_model"])
