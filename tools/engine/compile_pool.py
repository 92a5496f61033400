"""The QNN compiler's worker processes, overlapping a build's quantization.

The compiler is single-threaded and allocates heavily: each compile runs in a fresh
spawned worker (which preloads the faster allocator, :func:`neodragon_npu.graphs.qnn.compile_allocator`),
one at a time while the build quantizes on the other core, as many as two once it is done.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Iterator

from neodragon_npu.graphs import qnn
from neodragon_npu.tools.engine.progress import Stopwatch

logger = logging.getLogger("neodragon_npu")


class Compiler:
    """The QNN compiler is single-threaded: compiles run in worker processes, one at a time
    while this process quantizes (the two share the two cores), as many as ``wide`` once it
    is done (:meth:`widen`). A job waits here, not in the pool's queue, until a slot frees."""

    def __init__(self, pool: ProcessPoolExecutor, wide: int = 2, allocator: str | None = None) -> None:
        self.pool, self.wide = pool, wide
        self.limit, self.running = 1, 0
        self.allocator = allocator  # the malloc library the workers preload (None: glibc's)
        self.waiting: collections.deque = collections.deque()
        self.lock = threading.RLock()  # a job already done calls back at once, in _start

    def submit(self, fn, *args) -> Future:
        outer: Future = Future()
        with self.lock:
            self.waiting.append((outer, fn, args))
            self._start()
        return outer

    @property
    def busy(self) -> bool:
        """A compile is running or waiting."""
        with self.lock:
            return self.running > 0 or bool(self.waiting)

    def widen(self) -> None:
        with self.lock:
            self.limit = self.wide
            self._start()

    def _start(self) -> None:  # with the lock held
        while self.waiting and self.running < self.limit:
            outer, fn, args = self.waiting.popleft()
            if not outer.set_running_or_notify_cancel():
                continue
            self.running += 1
            try:
                inner = self.pool.submit(fn, *args)
            except BaseException as exc:  # a broken or shut-down pool
                self.running -= 1
                outer.set_exception(exc)
                continue
            inner.add_done_callback(functools.partial(self._finished, outer))

    def _finished(self, outer: Future, inner: Future) -> None:
        with self.lock:
            self.running -= 1
            self._start()
        if inner.cancelled():
            outer.set_exception(RuntimeError("the compile was cancelled"))
        elif inner.exception() is not None:
            outer.set_exception(inner.exception())
        else:
            outer.set_result(inner.result())

    def cancel_waiting(self) -> None:
        with self.lock:
            while self.waiting:
                self.waiting.popleft()[0].cancel()


@contextlib.contextmanager
def compile_workers():
    """Worker processes for the QNN compiler (:class:`Compiler`), which overlap the
    quantization in this process. Spawned, so they hold none of this process's memory, and
    one per job: a worker kept about 2 GB after compiling a full-size partition, and the
    pool, which starts a second worker when a job is submitted from the previous job's
    callback, kept an idle one all through the quantization. A fresh worker holds little
    until its job arrives, and then imports only :mod:`graphs.qnn`. The workers
    preload :func:`graphs.qnn.compile_allocator` (the compile allocates heavily). On failure
    or Ctrl-C, waiting work is cancelled and the running compiles stopped."""
    allocator = qnn.compile_allocator()
    with qnn.preloaded_in_new_processes(allocator):  # the pool starts workers as jobs come
        pool = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"),
                                   max_tasks_per_child=1, initializer=qnn.exit_with_parent,
                                   initargs=(os.getpid(),))
        compiler = Compiler(pool, allocator=allocator)
        try:
            yield compiler
        except BaseException:
            # A failed or interrupted build discards the workers' results: stop them now instead
            # of waiting for the compiles under way (about two minutes per full-size partition).
            compiler.cancel_waiting()
            for process in list((getattr(pool, "_processes", None) or {}).values()):
                process.terminate()
            raise
        finally:
            compiler.cancel_waiting()
            pool.shutdown(wait=True, cancel_futures=True)


class PartTimer(Stopwatch):
    """Times the parts of one partition's quantization (``with watch("aimet"): ...``) and runs
    each on one thread if a compile is running or waiting as it starts (see
    :func:`graphs.qnn.thread_limit`); ``limited`` is the seconds spent so."""

    def __init__(self, compiler: Compiler, tree=None) -> None:
        super().__init__(tree)
        self.compiler, self.limited = compiler, 0.0

    @contextlib.contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        threads = 1 if self.compiler.busy else None
        start = time.perf_counter()
        with super().__call__(part), qnn.thread_limit(threads):
            yield
        if threads:
            self.limited += time.perf_counter() - start


def log_compiled(target: str, k: int, n_parts: int):
    def log(future: Future) -> None:
        if not future.cancelled() and future.exception() is None:
            logger.info("      %s partition %d/%d compiled in the background (%.0f s)",
                        target, k + 1, n_parts, sum(future.result()[1]))
    return log


def worker_result(future: Future, what: str):
    try:
        return future.result()
    except BrokenProcessPool:
        raise RuntimeError(
            f"the worker process died while {what} (a Python error it hit is printed above; "
            "if none is, the kernel killed it, usually for memory: see dmesg); nothing was written"
        ) from None
