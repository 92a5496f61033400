"""Step timing, progress lines and peak memory for long-running pipelines."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import resource
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

logger = logging.getLogger("neodragon_npu")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_of(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:  # the process ended
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                children = [int(c) for c in Path(f"/proc/{parent}/task/{tid}/children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def tree_rss_bytes() -> int:
    """Resident memory of this process and every process it started, right now."""
    me = os.getpid()
    return sum(_rss_of(pid) for pid in [me, *_descendants(me)])


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise,
    and the next step's peak RSS would include them)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class TreePeak:
    """Samples :func:`tree_rss_bytes` in a daemon thread: the peak memory of a build whose
    work runs partly in worker processes (a per-process peak would miss the sum)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.peak = tree_rss_bytes()
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name="tree-rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, tree_rss_bytes())

    def read(self) -> int:
        self.peak = max(self.peak, tree_rss_bytes(), peak_rss_bytes())
        return self.peak

    def stop(self) -> None:
        self._stop.set()

    def __enter__(self) -> "TreePeak":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class StepRecord:
    name: str
    seconds: float
    peak_rss_bytes: int


@dataclass
class Steps:
    """Numbered, timed steps: ``with steps.step("quantize"): ...`` logs start and end."""

    total: int
    records: list[StepRecord] = field(default_factory=list)
    # set when work runs in worker processes too: peaks are then of the whole process tree
    tree: TreePeak | None = None

    def peak(self) -> int:
        return self.tree.read() if self.tree is not None else peak_rss_bytes()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        index = len(self.records) + 1
        logger.info("[%d/%d] %s ...", index, self.total, name)
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        peak = self.peak()
        self.records.append(StepRecord(name, seconds, peak))
        logger.info("[%d/%d] %s done in %.1f s (peak RSS %.2f GB)", index, self.total, name, seconds, peak / 1e9)

    def as_list(self) -> list[dict]:
        return [
            {"step": r.name, "seconds": round(r.seconds, 3), "peak_rss_bytes": r.peak_rss_bytes}
            for r in self.records
        ]


def count(label: str, i: int, n: int) -> None:
    """Progress inside a step (one line per item)."""
    logger.info("      %s %d/%d", label, i, n)


class Stopwatch:
    """Seconds spent in named parts of a repeated step: ``with watch("gptq"): ...``; the
    parts keep their first-use order, and time adds up over repeated uses."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - start

    def summary(self) -> str:
        return ", ".join(f"{part} {s:.0f} s" for part, s in self.seconds.items())
