"""Peak memory of a process tree (a build's worker processes count too) and step timing."""

import subprocess
import sys
import time

import pytest

from neodragon_npu.tools.engine.progress import Steps, Stopwatch, TreePeak, tree_rss_bytes

CHILD = "import sys, time; x = bytearray(300 << 20); x[::4096] = b'1' * len(x[::4096]); print('ready', flush=True); time.sleep(30)"


def test_tree_peak_counts_the_memory_of_child_processes():
    before = tree_rss_bytes()
    tree = TreePeak(interval=0.05)
    steps = Steps(2, tree=tree)
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        with steps.step("hold 300 MB in a child"):
            assert child.stdout.readline().strip() == "ready"
            time.sleep(0.3)
            assert tree_rss_bytes() - before > 250 << 20
        child.kill()
        child.wait()
        with steps.step("after it"):
            time.sleep(0.2)
    finally:
        child.kill()
        tree.stop()
    first, second = steps.records
    assert first.peak_rss_bytes - before > 250 << 20
    assert first.main_peak_rss_bytes - before < 100 << 20  # the child's memory is not this process's
    assert second.peak_rss_bytes - before < 100 << 20  # each step has its own peak; the child is gone
    assert tree.peak >= first.peak_rss_bytes
    assert steps.as_list()[0]["main_process_peak_rss_bytes"] == first.main_peak_rss_bytes


def test_stopwatch_adds_up_repeated_parts_in_first_use_order():
    watch = Stopwatch()
    for _ in range(2):
        with watch("first"):
            time.sleep(0.02)
    with watch("second"):
        pass
    with pytest.raises(ValueError):
        with watch("failing"):
            raise ValueError("timed anyway")
    assert list(watch.seconds) == ["first", "second", "failing"]
    assert watch.seconds["first"] >= 0.04 > watch.seconds["second"]
    assert watch.summary().startswith("first 0 s, second 0 s")


def test_stopwatch_keeps_the_peak_memory_of_each_part():
    """The part that allocates holds the peak; the part after it, once that memory is
    freed, does not."""
    tree = TreePeak(interval=0.02)
    watch = Stopwatch(tree)
    try:
        before = tree_rss_bytes()
        with watch("allocate"):
            block = bytearray(300 << 20)
            block[::4096] = b"1" * len(block[::4096])  # touch every page: resident
            time.sleep(0.2)
        del block
        with watch("after"):
            time.sleep(0.2)
    finally:
        tree.stop()
    assert watch.peaks["allocate"] - before > 250 << 20
    assert watch.peaks["after"] < watch.peaks["allocate"] - (200 << 20)
    assert " at " in watch.summary() and "GB" in watch.summary()


def test_overlapping_peak_windows_close_in_any_order():
    """A step's window and a partition's inside it may hold equal values: closing the inner
    one must not end the outer one."""
    tree = TreePeak(interval=0.05)
    try:
        outer = tree.open_window()
        inner = tree.open_window()
        inner.tree, inner.main = outer.tree, outer.main
        tree.close_window(inner)
        held = bytearray(200 << 20)
        held[::4096] = b"1" * len(held[::4096])
        tree.close_window(outer)
    finally:
        tree.stop()
    assert outer.main - inner.main > 150 << 20


BUSY_CHILD = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass"


def test_step_cpu_counts_this_process_and_children_that_ended():
    steps = Steps(2)
    with steps.step("spin here"):
        end = time.process_time() + 0.3
        while time.process_time() < end:
            pass
    with steps.step("spin in a child, then wait for it"):
        subprocess.run([sys.executable, "-c", BUSY_CHILD], check=True)
    here, child = steps.records
    assert 0.3 <= here.cpu_seconds < 1.0
    assert child.cpu_seconds >= 0.6  # the child's own time, counted once it was waited for
    assert steps.as_list()[1]["cpu_seconds"] == round(child.cpu_seconds, 1)


SPIN_THEN_WAIT = BUSY_CHILD + "\nprint('spun', flush=True)\ntime.sleep(30)"


def test_step_cpu_counts_a_child_still_running():
    """A process pool reaps its workers late: a worker's CPU counts while it runs."""
    steps = Steps(1)
    child = subprocess.Popen([sys.executable, "-c", SPIN_THEN_WAIT], stdout=subprocess.PIPE, text=True)
    try:
        with steps.step("a child spins and is not waited for"):
            assert child.stdout.readline().strip() == "spun"
    finally:
        child.kill()
        child.wait()
    assert steps.records[0].cpu_seconds >= 0.6
