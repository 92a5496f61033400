"""Work in a fresh Python process, started for it and ended after it.

A command that builds many models one after another (a bundle) runs each of them in a
process of its own: what one build leaves in the heap (glibc keeps freed pages that
malloc_trim cannot return, and the allocators of torch and onnxruntime keep their own)
would otherwise stay under the next build's peak (measured in docs/bundle.md).

The process is spawned, not forked: it starts from a clean heap and may use every thread
(:mod:`.forked` children must run on one, OpenMP is not fork-safe), at the cost of
importing the package again. Its log lines come back to this process as they are made and
go through this process's handlers, so a long build shows progress as it goes.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import traceback
from typing import Any, Callable

from neodragon_npu.tools.engine.progress import share_memory_tree

logger = logging.getLogger("neodragon_npu")


class FreshProcessError(RuntimeError):
    """The work failed in its process, or the process died."""


def died(name: str, code: int | None) -> str:
    """What to tell the user when the process for ``name`` ended without an answer."""
    how = (f"was killed by signal {signal.Signals(-code).name}" if code is not None and code < 0
           else f"exited with code {code}")
    return (f"{name}: the process {how} before it finished (a kill is usually the kernel's, for memory: "
            "see dmesg)")


class _Forward(logging.Handler):
    """In the fresh process: each record of our logger goes to the parent, formatted."""

    def __init__(self, conn) -> None:
        super().__init__()
        self.conn = conn

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.conn.send(("log", record.levelno, record.getMessage()))
        except Exception:  # noqa: BLE001 -- a line lost is better than a build lost
            self.handleError(record)


class _Stopped(BaseException):
    """Raised in the fresh process by SIGTERM: it unwinds like Ctrl-C, so staging
    directories are removed and workers stopped."""


def _stopped(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the unwinding short
    raise _Stopped


def _child(conn, fn: Callable, args: tuple, levels: dict[str, int], parent: int) -> None:
    from neodragon_npu.graphs.qnn import exit_with_parent

    exit_with_parent(parent)
    # Ctrl-C reaches the whole process group: the parent stops this process with SIGTERM
    # instead, once, so that it does not unwind twice
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stopped)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    ours = logging.getLogger("neodragon_npu")
    ours.handlers, ours.propagate = [_Forward(conn)], False
    try:
        answer = ("ok", fn(*args))
    except BaseException:  # noqa: BLE001 -- every failure goes back to the parent
        answer = ("error", traceback.format_exc())
    with contextlib.suppress(OSError):  # the parent stopped listening: it was interrupted
        conn.send(answer)
    conn.close()


def _levels() -> dict[str, int]:
    """The levels set on loggers here (the CLI's verbosity), for the fresh process."""
    named = logging.root.manager.loggerDict
    return {name: log.level for name, log in named.items()
            if isinstance(log, logging.Logger) and log.level != logging.NOTSET}


def run_fresh(name: str, fn: Callable, *args: Any) -> Any:
    """``fn(*args)`` in a fresh process; its return value (which must pickle). ``fn`` must
    be a module-level function. Raises :class:`FreshProcessError` if it raised or its
    process died; an interrupt here stops the process first (it unwinds on SIGTERM)."""
    context = multiprocessing.get_context("spawn")
    receive, child_end = context.Pipe(duplex=False)
    # not a daemon: a daemon may not start processes (the family build forks its exports);
    # it is stopped below, and stops itself if this process dies
    process = context.Process(target=_child, args=(child_end, fn, args, _levels(), os.getpid()), name=name)
    # the spawned interpreter imports the main module again: fine for a console script,
    # `python -m` and pytest, which guard their entry points
    process.start()
    child_end.close()
    # pages the fresh process shares with its own forked children count once in the peak
    share_memory_tree(process.pid)
    answered = False
    try:
        while True:
            try:
                message = receive.recv()
            except EOFError:
                process.join()
                raise FreshProcessError(died(name, process.exitcode)) from None
            if message[0] == "log":
                logger.log(message[1], "%s", message[2])
                continue
            answered = True
            if message[0] == "ok":
                return message[1]
            raise FreshProcessError(f"{name} failed:\n{message[1]}")
    finally:
        receive.close()
        if not answered and process.is_alive():  # interrupted here: it unwinds, then ends
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
        process.join()  # an answered process is ending: its memory is given back before the next
        share_memory_tree(process.pid, shared=False)
        sys.stderr.flush()
