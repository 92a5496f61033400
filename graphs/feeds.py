"""Sample sets (calibration and check inputs) as .npz files.

A sample set is a list of feeds ``{input name: array}`` that share names and shapes. On
disk each input name holds the samples stacked on a new leading axis.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

Feed = dict[str, np.ndarray]


def _stored(value) -> np.ndarray:
    """Floating inputs as float32 (what the graphs take); integer ones (token ids) as they are."""
    value = np.asarray(value)
    return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) or value.dtype == bool else value


def save_samples(path: str | Path, samples: Sequence[Mapping[str, np.ndarray]]) -> Path:
    if not samples:
        raise ValueError("no samples to save")
    names = list(samples[0])
    for i, s in enumerate(samples):
        if list(s) != names:
            raise ValueError(f"sample {i} has inputs {list(s)}, expected {names}")
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
    np.savez(tmp, **{n: np.stack([_stored(s[n]) for s in samples]) for n in names})
    os.replace(tmp, path)
    return path


def load_samples(path: str | Path) -> list[Feed]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such sample file")
    try:
        with np.load(path) as data:
            stacked = {k: data[k] for k in data.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{path}: not a readable .npz sample file ({exc})") from None
    counts = {len(v) for v in stacked.values()}
    if len(counts) != 1:
        raise ValueError(f"{path}: inputs hold different numbers of samples {sorted(counts)}")
    (n,) = counts
    return [{k: v[i] for k, v in stacked.items()} for i in range(n)]


def to_numpy_feed(feed: Mapping[str, object]) -> Feed:
    """Torch tensors or arrays -> contiguous float32 arrays."""
    out = {}
    for name, value in feed.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        out[name] = np.ascontiguousarray(value, dtype=np.float32)
    return out
