"""Work in a fresh process: a clean interpreter, results, live log lines and failures
brought back, and its memory (with its own forked children's) measured once."""

import logging
import multiprocessing
import os
import signal
import threading

import numpy as np
import pytest

from neodragon_npu.tools.engine import progress
from neodragon_npu.tools.engine.forked import Forked
from neodragon_npu.tools.engine.fresh import FreshProcessError, run_fresh

logger = logging.getLogger("neodragon_npu")
_SET_HERE = []  # a module global: the fresh process imports this module anew


def _double(receive, x):
    return 2 * x


def _work(x):
    _SET_HERE.append(x)
    logger.info("working on %d", x)
    logger.debug("not shown at INFO")
    logger.warning("a warning")
    # a fresh process may start processes of its own (the family build forks its exports)
    return os.getpid(), len(_SET_HERE), Forked("doubling", _double, x).result()


def test_the_work_runs_in_a_new_interpreter_and_its_lines_come_back(caplog):
    _SET_HERE.append("parent")
    with caplog.at_level(logging.INFO, logger="neodragon_npu"):
        pid, seen, doubled = run_fresh("the test work", _work, 21)
    assert pid != os.getpid()
    assert seen == 1  # it did not inherit this process's state
    assert doubled == 42
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [(logging.INFO, "working on 21"),
                                                                    (logging.WARNING, "a warning")]


def _fail():
    logger.info("about to fail")
    raise ValueError("the decoder has no state input")


def test_an_exception_comes_back_with_its_traceback(caplog):
    with caplog.at_level(logging.INFO, logger="neodragon_npu"), pytest.raises(FreshProcessError) as info:
        run_fresh("the vae-decoder build", _fail)
    message = str(info.value)
    assert message.startswith("the vae-decoder build failed:")
    assert "ValueError: the decoder has no state input" in message and "_fail" in message
    assert [r.getMessage() for r in caplog.records] == ["about to fail"]


def _killed():
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_process_is_reported_in_one_sentence():
    with pytest.raises(FreshProcessError, match=r"^the dt5 build: the process was killed by signal SIGKILL before "
                                                r"it finished \(a kill is usually the kernel's, for memory: see dmesg\)$"):
        run_fresh("the dt5 build", _killed)


def _hold(receive, array, ready):
    assert array.sum() == array.size  # reads the fresh process's pages: they stay shared
    ready.set()
    receive()
    return os.getpid()


def _share_with_a_fork(ready, release):
    array = np.ones(300 << 20, dtype=np.uint8)  # 300 MB, touched
    fork = Forked("holding", _hold, array, ready)
    release.wait()
    fork.send(None)
    return fork.result()


def test_a_fresh_process_and_its_forked_children_count_their_shared_pages_once():
    spawn = multiprocessing.get_context("spawn")
    ready, release = spawn.Event(), spawn.Event()
    before = progress.tree_rss_bytes()
    result = {}
    worker = threading.Thread(target=lambda: result.update(pid=run_fresh("sharing", _share_with_a_fork, ready,
                                                                           release)))
    worker.start()
    try:
        assert ready.wait(120)
        tree = progress._tree(os.getpid())
        shared = {pid for pid, in_shared_tree in tree if in_shared_tree}
        assert len(shared) == 2 and len(shared & progress._shared_trees) == 1  # the fresh process and its fork
        vm_rss = sum(progress._status_field(pid, "status", "VmRSS:") for pid in shared)
        with_fork = progress.tree_rss_bytes()
    finally:
        release.set()
        worker.join()
    assert result["pid"] != os.getpid()
    assert vm_rss > 2 * (300 << 20)  # both processes map the 300 MB ...
    assert with_fork - before < vm_rss - (250 << 20)  # ... which the tree counts once
    assert not progress._shared_trees  # ended: measured by VmRSS again


class _Interrupted(BaseException):
    pass


def _wait_then_clean_up(ready, marker):
    try:
        ready.set()
        threading.Event().wait()  # until stopped
    finally:
        marker.write_text("unwound")  # what a build's staging cleanup would do


def test_an_interrupt_here_stops_the_fresh_process_which_unwinds(tmp_path):
    spawn = multiprocessing.get_context("spawn")
    ready, marker = spawn.Event(), tmp_path / "cleaned"

    def interrupt():
        assert ready.wait(120)
        os.kill(os.getpid(), signal.SIGTERM)

    def raise_interrupted(signum, frame):
        raise _Interrupted

    previous = signal.signal(signal.SIGTERM, raise_interrupted)
    try:
        threading.Thread(target=interrupt, daemon=True).start()
        with pytest.raises(_Interrupted):
            run_fresh("the waiting build", _wait_then_clean_up, ready, marker)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert marker.read_text() == "unwound"  # it ran its cleanup before run_fresh returned
    assert not progress._shared_trees
