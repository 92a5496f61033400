"""Step timing, progress lines and peak memory for long-running pipelines."""

from __future__ import annotations

import contextlib
import logging
import resource
import time
from dataclasses import dataclass, field
from typing import Iterator

logger = logging.getLogger("neodragon_npu")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        index = len(self.records) + 1
        logger.info("[%d/%d] %s ...", index, self.total, name)
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.records.append(StepRecord(name, seconds, peak_rss_bytes()))
        logger.info("[%d/%d] %s done in %.1f s (peak RSS %.2f GB)", index, self.total, name, seconds, peak_rss_bytes() / 1e9)

    def as_list(self) -> list[dict]:
        return [
            {"step": r.name, "seconds": round(r.seconds, 3), "peak_rss_bytes": r.peak_rss_bytes}
            for r in self.records
        ]


def count(label: str, i: int, n: int) -> None:
    """Progress inside a step (one line per item)."""
    logger.info("      %s %d/%d", label, i, n)
