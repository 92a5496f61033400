"""Work in a forked process beside this one.

A forked process sees this process's memory as it was at the fork, shared copy-on-write:
a full-size PyTorch model (6.1 GB) is neither pickled, rebuilt nor copied for it. The child
runs on one thread -- OpenMP is not fork-safe: here a forked child running torch on two
threads, after its parent had used its thread pool, hung; on one thread it ran -- and its
log lines come back with its
result, so that the parent prints them together instead of interleaved with its own.
While a child lives, it and its parent are measured by their proportional set size in peak
memory figures (:func:`graphs.progress.share_memory`): shared pages count once.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import traceback
from typing import Any, Callable, Iterator

from neodragon_npu.tools.engine.fresh import died
from neodragon_npu.tools.engine.progress import share_memory

logger = logging.getLogger("neodragon_npu")
_live: set[int] = set()  # forked children still running (their memory is measured as PSS)


class ForkedError(RuntimeError):
    """The forked work failed or its process died."""


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


_INTERRUPTS = (signal.SIGINT, signal.SIGTERM)


class _Held:
    """Interrupt handlers and the signal mask set aside while a fork runs, and the interrupts
    received meanwhile."""

    def __init__(self) -> None:
        self.handlers: dict[int, Any] = {}
        self.mask: set | None = None
        self.received: list[int] = []

    def hold(self, signum: int, frame) -> None:
        self.received.append(signum)

    def release(self) -> None:
        """Put the handlers and the mask back, and deliver what came meanwhile (a handler
        that raises, raises here). The forked child calls it too: the interrupts are blocked
        in it until then, so one sent to it right after the fork stays pending instead of
        being dropped with the signals Python forgets in a new child."""
        for sig, handler in self.handlers.items():
            signal.signal(sig, handler)
        received, self.received = list(dict.fromkeys(self.received)), []
        if self.mask is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
        for sig in received:
            signal.raise_signal(sig)


@contextlib.contextmanager
def _interrupts_held() -> Iterator[_Held]:
    """SIGINT and SIGTERM received meanwhile are handled when the block ends, not inside it.

    A fork runs Python's at-fork hooks (logging's lock release among them), and an exception
    raised there -- by a handler that raises, such as the CLI's SIGTERM handler and Ctrl-C --
    is printed and dropped: a SIGTERM sent just then was lost and the build went on (seen
    once in the test suite). Only the main thread may set handlers; elsewhere nothing is
    held."""
    held = _Held()
    if threading.current_thread() is threading.main_thread():
        held.handlers = {sig: h for sig in _INTERRUPTS if (h := signal.getsignal(sig)) is not None}
        for sig in held.handlers:
            signal.signal(sig, held.hold)
        held.mask = signal.pthread_sigmask(signal.SIG_BLOCK, _INTERRUPTS)
    try:
        yield held
    finally:
        held.release()


def _child(conn, fn: Callable, args: tuple, held: _Held, parent: int) -> None:
    from neodragon_npu.graphs.qnn import exit_with_parent, thread_limit

    exit_with_parent(parent)

    ours = logging.getLogger("neodragon_npu")
    lines = _Lines()
    ours.handlers, ours.propagate = [lines], False
    try:
        held.release()  # the parent's handlers, and an interrupt sent during the fork
        with thread_limit(1):
            result = fn(conn.recv, *args)
        conn.send(("ok", result, lines.lines))
    except BaseException:  # noqa: BLE001 -- every failure goes back to the parent
        conn.send(("error", traceback.format_exc(), lines.lines))
    finally:
        conn.close()


class Forked:
    """``fn(receive, *args)`` in a forked process, started now. ``receive()`` in the child
    returns the next object :meth:`send` gives it (it waits for one); :meth:`result` waits
    for ``fn``'s return value (it must pickle), prints the child's log lines and raises
    :class:`ForkedError` if ``fn`` raised or the process died. :meth:`stop` ends a child
    still running (on failure or Ctrl-C)."""

    def __init__(self, name: str, fn: Callable, *args: Any) -> None:
        context = multiprocessing.get_context("fork")
        self.name = name
        self._conn, child_end = context.Pipe()
        try:
            with _interrupts_held() as held:
                self.process = context.Process(target=_child, args=(child_end, fn, args, held, os.getpid()), name=name,
                                               daemon=True)
                self.process.start()
                child_end.close()
                _live.add(self.process.pid)
                share_memory({os.getpid(), self.process.pid})
        except BaseException:  # interrupted meanwhile: the caller never gets this object to stop
            if getattr(self, "process", None) is not None and self.process.pid is not None:
                self.stop()
            raise

    def send(self, obj: Any) -> None:
        self._conn.send(obj)

    def result(self) -> Any:
        try:
            kind, payload, lines = self._conn.recv()
        except EOFError:
            self._ended()
            raise ForkedError(died(self.name, self.process.exitcode)) from None
        finally:
            self._conn.close()
        self._ended()
        for line in lines:
            logger.info("%s", line)
        if kind == "error":
            raise ForkedError(f"{self.name} failed:\n{payload}")
        return payload

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self._ended()

    def _ended(self) -> None:
        self.process.join()
        pid = self.process.pid
        _live.discard(pid)
        share_memory({pid}, shared=False)
        if not _live:  # this process no longer shares its pages with a child
            share_memory({os.getpid()}, shared=False)
