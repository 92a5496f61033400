"""The compile workers: one fresh process per compile, one at a time until widened."""

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest
import torch

from neodragon_npu.graphs import qnn
from neodragon_npu.tools.engine import compile_pool, progress
from neodragon_npu.tools.engine.compile_pool import Compiler, PartTimer, compile_workers, worker_result


def _announce_and_sleep(path: str) -> None:
    """Write this worker's pid to ``path``, then sleep long past any test."""
    import time

    Path(path).write_text(str(os.getpid()))
    time.sleep(600)


def test_a_dead_worker_process_is_reported_in_one_sentence():
    future = Future()
    future.set_exception(BrokenProcessPool("A child process terminated abruptly"))
    with pytest.raises(RuntimeError, match="worker process died while compiling partition 3"):
        worker_result(future, "compiling partition 3 for sm8750")


def test_an_interrupted_build_stops_the_worker_inside_its_task(tmp_path):
    """Ctrl-C (or an error) while a worker runs a long task stops the worker instead of
    waiting for the task: the worker process is gone when the block is left."""
    flag = tmp_path / "pid"
    with pytest.raises(KeyboardInterrupt):
        with compile_workers() as worker:
            running = worker.submit(_announce_and_sleep, str(flag))
            while not flag.exists() or not flag.read_text():  # the worker is inside its task
                threading.Event().wait(0.05)
            raise KeyboardInterrupt
    assert running.done()
    with pytest.raises(ProcessLookupError):
        os.kill(int(flag.read_text()), 0)


def test_each_compile_runs_in_a_fresh_worker_process():
    """A worker exits after one job (the QNN compiler keeps its memory otherwise), so two
    jobs in turn run in two processes, neither of them this one."""
    with compile_workers() as worker:
        first = worker.submit(os.getpid).result(60)
        second = worker.submit(os.getpid).result(60)
    assert len({first, second, os.getpid()}) == 3


def test_compile_workers_preload_the_allocator(monkeypatch):
    """The workers load the faster allocator, this process does not, and the environment is
    as it was afterwards."""
    library = qnn.compile_allocator()
    if library is None:
        pytest.skip("no jemalloc or tcmalloc on this machine (make setup unpacks jemalloc into .venv)")
    before = os.environ.get("LD_PRELOAD")
    maps = Path("/proc/self/maps").read_text
    with compile_workers() as worker:
        assert worker.allocator == library
        assert Path(library).name in worker.submit(maps).result(60)
    assert Path(library).name not in maps()
    assert os.environ.get("LD_PRELOAD") == before
    monkeypatch.setenv(qnn.ALLOCATOR_ENV, "glibc")
    with compile_workers() as worker:
        assert worker.allocator is None
        assert Path(library).name not in worker.submit(maps).result(60)


def test_compiles_run_one_at_a_time_until_widened():
    """While the build quantizes, one compile at a time (one core each); widened, two."""
    lock, running, most = threading.Lock(), [0], [0]
    started = {x: threading.Event() for x in (1, 2, 3, 4, 5, 6, "bad")}
    release = threading.Event()

    def job(x):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        started[x].set()
        release.wait(30)
        with lock:
            running[0] -= 1
        if x == "bad":
            raise ValueError("compile failed")
        return x * 2

    with ThreadPoolExecutor(max_workers=4) as pool:
        compiler = Compiler(pool)
        assert not compiler.busy
        futures = [compiler.submit(job, x) for x in (1, 2, 3, "bad")]
        assert started[1].wait(30)
        assert most[0] == 1 and not started[2].is_set() and not futures[1].running()
        assert compiler.busy  # the build's quantization then limits itself to one thread
        compiler.widen()
        assert started[2].wait(30)
        assert most[0] == 2 and not started[3].is_set()
        release.set()
        assert [f.result(30) for f in futures[:3]] == [2, 4, 6]
        with pytest.raises(ValueError, match="compile failed"):
            futures[3].result(30)
        assert most[0] == 2
        # jobs still waiting when the build stops are cancelled
        release.clear()
        compiler.limit = 1
        first = compiler.submit(job, 4)
        assert started[4].wait(30)
        second = compiler.submit(job, 5)
        compiler.cancel_waiting()
        release.set()
        assert second.cancelled() and first.result(30) == 8


class _Clock:
    """A stand-in for time.perf_counter that moves only when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def test_quantization_parts_run_on_one_thread_only_while_a_compile_runs(monkeypatch):
    from types import SimpleNamespace

    clock = _Clock()
    monkeypatch.setattr(compile_pool, "time", clock)
    monkeypatch.setattr(progress, "time", clock)
    threads = torch.get_num_threads()
    compiler = SimpleNamespace(busy=True)
    watch = PartTimer(compiler)
    with watch("aimet"):
        assert torch.get_num_threads() == 1 and qnn.session_threads() == 1
        clock.now += 2.0
    assert torch.get_num_threads() == threads and qnn.session_threads() is None
    compiler.busy = False  # the compile finished: the next part takes every core again
    with watch("QDQ chain"):
        assert torch.get_num_threads() == threads and qnn.session_threads() is None
        clock.now += 1.0
    with watch("aimet"):
        clock.now += 0.5
    assert watch.limited == 2.0
    assert watch.seconds == {"aimet": 2.5, "QDQ chain": 1.0}
