"""Partitions of a graph run in sequence: each reads what earlier ones produced.

An *environment* is one call's tensors (name -> array): the graph inputs, then every
partition's outputs as it runs. A chain keeps only what later partitions read and the
graph outputs, so a long chain holds a few tensors per call, not all of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx

from neodragon_npu.graphs import qnn


def input_names(part) -> set[str]:
    """The inputs of a partition: a model path (its graph read without weights) or a session."""
    if isinstance(part, (str, Path)):
        return {i.name for i in onnx.load(str(part), load_external_data=False).graph.input}
    return {i.name for i in part.get_inputs()}


def inputs_needed_after(parts: Sequence) -> list[set[str]]:
    """For each partition k, the tensor names the partitions after k read."""
    inputs = [input_names(p) for p in parts]
    needed, later = [], set()
    for names in reversed(inputs):
        needed.append(set(later))
        later |= names
    return needed[::-1]


def drop_unneeded(envs: Iterable[dict], keep: set[str], outputs: Iterable[str] = ()) -> None:
    """Drop every tensor but those in ``keep`` and the graph ``outputs`` from each environment."""
    keep = set(keep) | set(outputs)
    for env in envs:
        for name in set(env) - keep:
            del env[name]


def advance(session, envs: list[dict], keep: set[str] | None = None, outputs: Iterable[str] = ()) -> None:
    """Run one partition on every environment and add its outputs; with ``keep``, then drop
    every tensor but those and the graph ``outputs``."""
    inputs = [x.name for x in session.get_inputs()]
    names = [o.name for o in session.get_outputs()]
    for env in envs:
        env.update(zip(names, qnn.run(session, {n: env[n] for n in inputs})))
    if keep is not None:
        drop_unneeded(envs, keep, outputs)


def run_chain(parts: Sequence, feeds: Sequence[dict], outputs: Sequence[str],
              threads: int | None = None) -> list[list[np.ndarray]]:
    """Run partitions (sessions, or model paths run on the CPU) in order on every feed;
    returns each feed's graph outputs."""
    envs = [dict(f) for f in feeds]
    for part, keep in zip(parts, inputs_needed_after(parts)):
        session = qnn.cpu_session(part, threads=threads) if isinstance(part, (str, Path)) else part
        advance(session, envs, keep, outputs)
    return [[env[o] for o in outputs] for env in envs]
