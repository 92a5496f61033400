"""The one table of deployment targets: name -> SoC model, HTP arch and memory budgets.

SoC model numbers are QNN's ``QNN_SOC_MODEL_*`` ids (QnnTypes.h), the values the
onnxruntime-qnn ``soc_model`` option takes; ``htp_arch`` is the Hexagon version.
"""

from __future__ import annotations

from dataclasses import dataclass

MB = 1024 * 1024
GIB = 1024 * MB


@dataclass(frozen=True)
class Target:
    name: str  # what users type
    description: str
    soc_model: int
    htp_arch: int
    vtcm_bytes: int  # on-chip tightly coupled memory
    # One offline-prepared graph failed past ~2 GiB; a context is limited to ~4 GB on device.
    max_graph_bytes: int = 2 * GIB
    max_context_bytes: int = 4 * GIB
    hub_device: str = ""  # qai-hub device name for cloud compile/profile jobs

    @property
    def score_tile_bytes(self) -> int:
        """Budget for one attention score tile: a quarter of VTCM, leaving room for the
        tile's softmax, its Q/K/V operands and the next tile's prefetch."""
        return self.vtcm_bytes // 4


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "sm8750",
            "Snapdragon 8 Elite (SM8750), Hexagon v79",
            soc_model=69,
            htp_arch=79,
            vtcm_bytes=8 * MB,
            hub_device="Samsung Galaxy S25 (Family)",
        ),
        Target(
            "x-elite",
            "Snapdragon X Elite (SC8380XP / X1E80100), Hexagon v73",
            soc_model=60,
            htp_arch=73,
            vtcm_bytes=8 * MB,
            hub_device="Snapdragon X Elite CRD",
        ),
        Target(
            "sm8650",
            "Snapdragon 8 Gen 3 (SM8650), Hexagon v75",
            soc_model=57,
            htp_arch=75,
            vtcm_bytes=8 * MB,
            hub_device="Samsung Galaxy S24 (Family)",
        ),
        Target(
            "sm8550",
            "Snapdragon 8 Gen 2 (SM8550), Hexagon v73",
            soc_model=43,
            htp_arch=73,
            vtcm_bytes=8 * MB,
            hub_device="Samsung Galaxy S23 (Family)",
        ),
    )
}

DEFAULT_TARGET = "sm8750"
_ALIASES = {"8-elite": "sm8750", "snapdragon-8-elite": "sm8750", "sc8380xp": "x-elite", "x1e80100": "x-elite"}


def get_target(name: str) -> Target:
    key = _ALIASES.get(name.lower(), name.lower())
    try:
        return TARGETS[key]
    except KeyError:
        known = ", ".join(sorted(TARGETS))
        raise ValueError(f"unknown target {name!r}; known targets: {known}") from None
