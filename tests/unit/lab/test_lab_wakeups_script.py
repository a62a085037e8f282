"""scripts/lab_wakeups.py: CPU and voluntary context switches of a process, all its threads counted."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from helpers.scripts import load_script


def test_a_thread_that_sleeps_and_wakes_is_counted_with_its_process() -> None:
    script = load_script("lab_wakeups")
    me = os.getpid()
    before = script.sample({"me": [me], "gone": [2**22 + 7]})

    napped, measured = threading.Event(), threading.Event()

    def nap() -> None:
        for _ in range(200):
            time.sleep(0.0005)  # each sleep is a voluntary context switch of this (other) thread
        napped.set()
        measured.wait(10)  # alive while sampled: a thread's counts leave /proc with it

    worker = threading.Thread(target=nap)
    worker.start()
    napped.wait(10)
    deadline = time.process_time() + 0.05
    while time.process_time() < deadline:  # and some CPU of our own
        pass
    after = script.sample({"me": [me], "gone": [2**22 + 7]})
    measured.set()
    worker.join()
    assert after["me"][1] - before["me"][1] >= 200  # the other thread's, not only the main thread's
    # 0.05 s of our own CPU, read from /proc in clock ticks (10 ms) and as floats (65.08 - 65.04 < 0.04).
    assert after["me"][0] - before["me"][0] >= 0.035
    assert after["gone"] == before["gone"] == (0.0, 0)  # a PID that does not exist counts nothing


def test_a_live_child_is_counted_with_its_parent() -> None:
    # As a lab service under its supervisor: the child's CPU is not in the parent's /proc figures while it lives.
    script = load_script("lab_wakeups")
    child = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                              "sys.stdin.readline()\n"
                              "end = time.process_time() + 0.1\n"
                              "while time.process_time() < end: pass\n"
                              "print('burnt', flush=True)\n"
                              "sys.stdin.readline()\n"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        processes = script.with_children({"me": [os.getpid()]})
        assert child.pid in processes["me"]
        before = script.sample(processes)
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "burnt"
        after = script.sample(processes)
        assert after["me"][0] - before["me"][0] >= 0.08  # the child's 0.1 s, counted while it is alive
    finally:
        child.kill()
        child.wait()
