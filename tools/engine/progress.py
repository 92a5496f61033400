"""Step timing, progress lines and peak memory for long-running pipelines."""

from __future__ import annotations

import contextlib
import contextvars
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


def _proc_cpu_seconds(pid: int) -> float:
    """CPU seconds of a live (or ended, not yet waited for) process and of the children it
    waited for, from /proc/<pid>/stat (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()  # the name, in parentheses, may hold spaces
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of every process it started: those
    waited for, from the kernel's count of this process's children, and those still running
    (or ended but not yet waited for: a process pool reaps its workers late) from /proc. A
    step's CPU is the difference over the step, the compile workers' included."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total + sum(_proc_cpu_seconds(pid) for pid in _descendants(os.getpid()))


# Processes sharing memory copy-on-write (forked children and their parent, while the children
# live: graphs.forked) are measured by their proportional set size (PSS), so that a page they
# share counts once in a sum over processes, not once per process as VmRSS counts it. Reading
# PSS walks the process's page tables, thousands of times slower than VmRSS, so it is read
# only for those processes, and at most every PSS_INTERVAL seconds.
PSS_INTERVAL = 5.0
_shared_pids: set[int] = set()
_pss_cache: dict[int, tuple[float, int]] = {}


_shared_trees: set[int] = set()


def share_memory_tree(root: int, shared: bool = True) -> None:
    """Measure ``root`` and every process under it by PSS (or no longer): for a process
    this one started that may fork children of its own (:mod:`.fresh`), whose sharing this
    process does not see."""
    if shared:
        _shared_trees.add(root)
    else:
        _shared_trees.discard(root)
        _pss_cache.clear()  # its processes are gone; a pid used again must not read their PSS


def share_memory(pids: set[int] | list[int], shared: bool = True) -> None:
    """Mark processes as sharing memory copy-on-write (or no longer, with ``shared=False``)."""
    for pid in pids:
        if shared:
            _shared_pids.add(pid)
        else:
            _shared_pids.discard(pid)
            _pss_cache.pop(pid, None)


def _status_field(pid: int, path: str, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:  # the process ended, or no such file
        pass
    return 0


def _rss_of(pid: int, in_shared_tree: bool = False) -> int:
    """Resident bytes of one process: VmRSS, or its PSS if it shares memory copy-on-write
    (:func:`share_memory`, :func:`share_memory_tree`; refreshed every :data:`PSS_INTERVAL`
    seconds)."""
    if pid not in _shared_pids and not in_shared_tree:
        return _status_field(pid, "status", "VmRSS:")
    now = time.monotonic()
    cached = _pss_cache.get(pid)
    if cached is None or now - cached[0] >= PSS_INTERVAL:
        pss = _status_field(pid, "smaps_rollup", "Pss:") or _status_field(pid, "status", "VmRSS:")
        cached = _pss_cache[pid] = (now, pss)
    return cached[1]


def _tree(pid: int) -> list[tuple[int, bool]]:
    """The descendants of ``pid``, each with whether it is in a tree measured by PSS."""
    found, todo = [], [(pid, pid in _shared_trees)]
    while todo:
        parent, shared = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                children = [int(c) for c in Path(f"/proc/{parent}/task/{tid}/children").read_text().split()]
            except OSError:
                continue
            below = [(c, shared or c in _shared_trees) for c in children]
            found += below
            todo += below
    return found


def _descendants(pid: int) -> list[int]:
    return [p for p, _ in _tree(pid)]


def tree_rss_bytes() -> int:
    """Resident memory of this process and every process it started, right now."""
    return _sample()[0]


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise,
    and the next step's peak RSS would include them)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _sample() -> tuple[int, int]:
    """(this process and its descendants, this process alone): resident bytes right now."""
    me = os.getpid()
    mine = _rss_of(me)
    return mine + sum(_rss_of(pid, shared) for pid, shared in _tree(me)), mine


@dataclass(eq=False)  # windows are told apart by identity (list.remove)
class PeakWindow:
    """Peak resident bytes seen while a window of :class:`TreePeak` was open: of the whole
    process tree and of this process alone."""

    tree: int
    main: int

    def add(self, tree: int, main: int) -> None:
        self.tree, self.main = max(self.tree, tree), max(self.main, main)


class TreePeak:
    """Samples the memory of this process and its descendants in a daemon thread: the peak
    of a build whose work runs partly in worker processes (a per-process peak would miss
    the sum). :meth:`watch` gives the peak of one stretch of work (a step, a partition)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.peak = tree_rss_bytes()
        self._windows: list[PeakWindow] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name="tree-rss", daemon=True)
        self._thread.start()

    def _take(self) -> None:
        tree, main = _sample()
        with self._lock:
            self.peak = max(self.peak, tree)
            for window in self._windows:
                window.add(tree, main)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._take()

    def open_window(self) -> PeakWindow:
        """Start tracking a peak from now on (:meth:`close_window` ends it)."""
        window = PeakWindow(*_sample())
        with self._lock:
            self._windows.append(window)
        return window

    def close_window(self, window: PeakWindow) -> PeakWindow:
        self._take()
        with self._lock:
            self._windows.remove(window)
        return window

    @contextlib.contextmanager
    def watch(self) -> Iterator[PeakWindow]:
        window = self.open_window()
        try:
            yield window
        finally:
            self.close_window(window)

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
    main_peak_rss_bytes: int | None = None  # with worker processes: this process alone
    cpu_seconds: float | None = None  # this process and every process it started (cpu_seconds())


_LABEL: contextvars.ContextVar[str] = contextvars.ContextVar("steps_label", default="")


@contextlib.contextmanager
def labelled(label: str) -> Iterator[None]:
    """Steps logged inside name ``label`` in their counter (``[stage 0 baseline: 1/4]``):
    for a command that runs several builds."""
    token = _LABEL.set(f"{label}: ")
    try:
        yield
    finally:
        _LABEL.reset(token)


@dataclass
class Steps:
    """Numbered, timed steps: ``with steps.step("quantize"): ...`` logs start and end."""

    total: int
    records: list[StepRecord] = field(default_factory=list)
    # set when work runs in worker processes too: peaks are then of the whole process tree
    tree: TreePeak | None = None

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """With a :class:`TreePeak`, a step's peak is its own (the whole process tree's, and
        this process's alone); without, this process's peak so far."""
        index, label = len(self.records) + 1, _LABEL.get()
        logger.info("[%s%d/%d] %s ...", label, index, self.total, name)
        start, cpu_start = time.perf_counter(), cpu_seconds()
        with self.tree.watch() if self.tree is not None else contextlib.nullcontext() as window:
            yield
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu_start
        if window is None:
            record = StepRecord(name, seconds, peak_rss_bytes(), cpu_seconds=cpu)
            memory = f"peak RSS {record.peak_rss_bytes / 1e9:.2f} GB"
        else:
            record = StepRecord(name, seconds, window.tree, window.main, cpu_seconds=cpu)
            memory = f"peak RSS in the step {window.tree / 1e9:.2f} GB, this process alone {window.main / 1e9:.2f} GB"
        self.records.append(record)
        logger.info("[%s%d/%d] %s done in %.1f s (CPU %.0f s; %s)", label, index, self.total, name, seconds, cpu,
                    memory)

    def as_list(self) -> list[dict]:
        rows = []
        for r in self.records:
            row = {"step": r.name, "seconds": round(r.seconds, 3), "peak_rss_bytes": r.peak_rss_bytes}
            if r.main_peak_rss_bytes is not None:
                row["main_process_peak_rss_bytes"] = r.main_peak_rss_bytes
            if r.cpu_seconds is not None:
                row["cpu_seconds"] = round(r.cpu_seconds, 1)
            rows.append(row)
        return rows


def count(label: str, i: int, n: int) -> None:
    """Progress inside a step (one line per item)."""
    logger.info("      %s %d/%d", label, i, n)


class Stopwatch:
    """Seconds spent in named parts of a repeated step: ``with watch("gptq"): ...``; the
    parts keep their first-use order, and time adds up over repeated uses. Given a
    :class:`TreePeak`, it also keeps each part's peak resident bytes of this process (the
    part that holds the memory of a step is what a user trims first)."""

    def __init__(self, tree: "TreePeak | None" = None) -> None:
        self.seconds: dict[str, float] = {}
        self.peaks: dict[str, int] = {}
        self._tree = tree

    @contextlib.contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        start = time.perf_counter()
        window = self._tree.open_window() if self._tree is not None else None
        try:
            yield
        finally:
            self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - start
            if window is not None:
                self._tree.close_window(window)
                self.peaks[part] = max(self.peaks.get(part, 0), window.main)

    def summary(self) -> str:
        return ", ".join(
            f"{part} {s:.0f} s" + (f" at {self.peaks[part] / 1e9:.2f} GB" if part in self.peaks else "")
            for part, s in self.seconds.items())
