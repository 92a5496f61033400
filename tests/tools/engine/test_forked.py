"""Work in a forked process: the parent's memory without a copy, one thread, results, logs
and failures brought back."""

import logging
import multiprocessing
import os
import signal

import numpy as np
import pytest
import torch

from neodragon_npu.tools.engine.forked import Forked, ForkedError
from neodragon_npu.tools.engine import progress
from neodragon_npu.tools.engine.progress import tree_rss_bytes

logger = logging.getLogger("neodragon_npu")


def _scale_and_report(receive, tensor):
    factor = receive()
    tensor.mul_(factor)  # the child's copy only
    logger.info("scaled by %d", factor)
    logger.info("on %d thread(s)", torch.get_num_threads())
    return float(tensor.sum()), torch.get_num_threads()


def test_the_child_sees_the_parents_objects_and_receives_what_the_parent_sends(caplog):
    tensor = torch.ones(1000)
    torch.matmul(torch.randn(300, 300), torch.randn(300, 300))  # the parent has used its thread pool
    with caplog.at_level(logging.INFO, logger="neodragon_npu"):  # before the fork, which inherits it
        fork = Forked("scaling", _scale_and_report, tensor)
        fork.send(3)
        total, threads = fork.result()
    assert total == 3000.0 and threads == 1
    assert float(tensor.sum()) == 1000.0  # copy-on-write: the parent's tensor is untouched
    assert [r.getMessage() for r in caplog.records] == ["scaled by 3", "on 1 thread(s)"]
    assert not fork.process.is_alive()


def _fail(receive):
    logger.info("about to fail")
    raise ValueError("the stage graph has no output")


def test_an_exception_in_the_child_comes_back_with_its_traceback(caplog):
    with caplog.at_level(logging.INFO, logger="neodragon_npu"), pytest.raises(ForkedError) as info:
        Forked("the stage-1 export", _fail).result()
    message = str(info.value)
    assert message.startswith("the stage-1 export failed:")
    assert "ValueError: the stage graph has no output" in message and "_fail" in message
    assert [r.getMessage() for r in caplog.records] == ["about to fail"]


def _killed(receive):
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_child_is_reported_in_one_sentence():
    fork = Forked("the stage-0 export", _killed)
    with pytest.raises(ForkedError, match=r"^the stage-0 export: the process was killed by signal SIGKILL before it "
                                          r"finished \(a kill is usually the kernel's, for memory: see dmesg\)$"):
        fork.result()


def test_stop_ends_a_child_waiting_for_the_parent():
    fork = Forked("waiting", lambda receive: receive())
    assert fork.process.is_alive()
    fork.stop()
    assert not fork.process.is_alive() and fork.process.exitcode == -signal.SIGTERM
    fork.stop()  # a second stop does nothing


def _hold(receive, array, ready):
    assert array.sum() == array.size  # reads the parent's pages: they stay shared
    ready.set()
    receive()
    return True


def test_memory_a_child_shares_with_its_parent_counts_once():
    array = np.ones(300 << 20, dtype=np.uint8)  # 300 MB, touched
    ready = multiprocessing.get_context("fork").Event()
    before = tree_rss_bytes()
    fork = Forked("holding", _hold, array, ready)
    try:
        assert ready.wait(30)
        with_child = tree_rss_bytes()
        child_rss = progress._status_field(fork.process.pid, "status", "VmRSS:")
        assert {os.getpid(), fork.process.pid} <= progress._shared_pids
        fork.send(None)
        assert fork.result() is True
        assert not {os.getpid(), fork.process.pid} & progress._shared_pids  # VmRSS again: cheap to read
    finally:
        fork.stop()
    assert child_rss > 250 << 20  # the child maps the 300 MB ...
    assert with_child - before < 100 << 20  # ... which the process tree counts once


def test_pss_is_read_at_most_once_per_interval(monkeypatch):
    reads = []
    real = progress._status_field
    monkeypatch.setattr(progress, "_status_field", lambda pid, path, key: reads.append(path) or real(pid, path, key))
    me = os.getpid()
    progress._rss_of(me)
    assert reads == ["status"]  # a process sharing nothing: VmRSS
    progress.share_memory({me})
    try:
        first = progress._rss_of(me)
        assert progress._rss_of(me) == first and reads == ["status", "smaps_rollup"]
        monkeypatch.setattr(progress, "PSS_INTERVAL", 0.0)
        progress._rss_of(me)
        assert reads == ["status", "smaps_rollup", "smaps_rollup"]
    finally:
        progress.share_memory({me}, shared=False)


class _Stop(BaseException):
    pass


def _raise_stop(signum, frame):
    raise _Stop


_signal_at_fork = [False]


def _send_sigterm_in_the_parent_after_fork():
    if _signal_at_fork[0]:
        _signal_at_fork[0] = False
        os.kill(os.getpid(), signal.SIGTERM)


os.register_at_fork(after_in_parent=_send_sigterm_in_the_parent_after_fork)


def test_a_sigterm_during_the_fork_is_handled_after_it_not_lost():
    """Python drops an exception raised in its at-fork hooks: a raising SIGTERM handler (the
    CLI's) that ran there was lost and the build went on. It now runs once the fork is done,
    and the child is stopped."""
    from neodragon_npu.tools.engine import forked

    previous = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        _signal_at_fork[0] = True
        with pytest.raises(_Stop):
            Forked("waiting", lambda receive: receive())
    finally:
        signal.signal(signal.SIGTERM, previous)
        _signal_at_fork[0] = False
    assert not forked._live and not multiprocessing.active_children()
    assert signal.getsignal(signal.SIGTERM) is previous
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
