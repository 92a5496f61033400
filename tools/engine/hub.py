"""``neodragon-npu emit --hub``: Qualcomm AI Hub compile, link and profile jobs for a build.

AI Hub compiles the same W8A16 QDQ graphs this toolkit compiles locally, on its own QAIRT,
for a real device, and can link several compiled graphs into one context binary with
shared weights (a link job) and profile them on a phone. This machine has neither network
access nor an AI Hub token, so :func:`submit_hub_jobs` stops there with one sentence;
everything up to the requests it would send is built and tested.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neodragon_npu.tools.engine.artifacts import MANIFEST, TOOL
from neodragon_npu.graphs.targets import get_target

# The graphs are already quantized (QDQ): AI Hub only has to produce the context binary.
COMPILE_OPTIONS = "--target_runtime qnn_context_binary"


class HubUnavailableError(RuntimeError):
    """AI Hub cannot be reached from here (no token, no network)."""


@dataclass(frozen=True)
class HubRequest:
    kind: str  # "compile", "link" or "profile"
    name: str
    device: str
    model: str | None = None  # compile: the ONNX file sent
    inputs: tuple[str, ...] = field(default_factory=tuple)  # link/profile: names of earlier requests
    options: str = ""

    def describe(self) -> str:
        what = self.model if self.model else " + ".join(self.inputs)
        return f"{self.kind:<8} {self.name:<28} on {self.device!r}: {what} {self.options}".rstrip()


def _read_manifest(build_dir: Path) -> dict:
    path = Path(build_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{build_dir} is not a neodragon-npu build directory ({exc})") from None
    if manifest.get("tool") != TOOL:
        raise ValueError(f"{path} was not written by {TOOL}")
    return manifest


def plan_hub_jobs(build_dir: str | Path, target: str, *, profile: bool = False, link: bool = True) -> list[HubRequest]:
    """The requests for a build: a compile job per QDQ graph; with ``--all-stages`` builds a
    link job per partition (its three stage graphs, one shared-weight binary); profile jobs
    on the device when asked."""
    build_dir = Path(build_dir)
    manifest = _read_manifest(build_dir)
    device = get_target(target).hub_device
    requests: list[HubRequest] = []
    if manifest.get("mode") == "all-stages":
        for part in manifest["partitions"]:
            k = part["index"]
            compiled = []
            for stage, graph in sorted(part["graphs"].items(), reverse=True):
                name = f"stage{stage}_part{k}"
                requests.append(HubRequest("compile", name, device, str(build_dir / graph["qdq_model"]), options=COMPILE_OPTIONS))
                compiled.append(name)
            if link:
                requests.append(HubRequest("link", f"part{k}_linked", device, inputs=tuple(compiled)))
                if profile:
                    requests.append(HubRequest("profile", f"part{k}_profile", device, inputs=(f"part{k}_linked",)))
            elif profile:
                requests += [HubRequest("profile", f"{n}_profile", device, inputs=(n,)) for n in compiled]
    else:
        if "qdq_model" not in manifest:
            raise ValueError(f"{build_dir} holds no quantized graph (built with --until export?)")
        name = manifest["graphs"][0]["name"]
        requests.append(HubRequest("compile", name, device, str(build_dir / manifest["qdq_model"]), options=COMPILE_OPTIONS))
        if profile:
            requests.append(HubRequest("profile", f"{name}_profile", device, inputs=(name,)))
    return requests


def _hub_client() -> Any:
    """The qai_hub module, if a token is configured; else one sentence saying why not."""
    config = Path(os.environ.get("QAIHUB_CLIENT_INI", Path.home() / ".qai_hub" / "client.ini"))
    if not os.environ.get("QAI_HUB_API_TOKEN") and not config.is_file():
        raise HubUnavailableError(
            "Qualcomm AI Hub needs an API token (qai-hub configure --api_token ...) and network "
            "access, and this machine has neither, so no job was submitted."
        )
    import qai_hub

    return qai_hub


def submit_hub_jobs(requests: list[HubRequest], client: Any = None) -> list[str]:
    """Submit in order (links wait for their compiles); returns the job ids."""
    client = client if client is not None else _hub_client()
    jobs: dict[str, Any] = {}
    try:
        for r in requests:
            device = client.Device(r.device)
            if r.kind == "compile":
                jobs[r.name] = client.submit_compile_job(model=r.model, device=device, name=r.name, options=r.options)
            elif r.kind == "link":
                models = [jobs[n].get_target_model() for n in r.inputs]
                jobs[r.name] = client.submit_link_job(models=models, device=device, name=r.name, options=r.options)
            elif r.kind == "profile":
                model = jobs[r.inputs[0]].get_target_model()
                jobs[r.name] = client.submit_profile_job(model=model, device=device, name=r.name, options=r.options)
            else:
                raise ValueError(f"unknown AI Hub request kind {r.kind!r}")
    except (OSError, ConnectionError) as exc:
        raise HubUnavailableError(f"could not reach Qualcomm AI Hub ({exc}); {len(jobs)} job(s) were submitted.") from None
    return [job.job_id for job in jobs.values()]
