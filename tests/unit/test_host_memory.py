"""Host RAM figures and a process tree's resident memory, read from the real host."""

from __future__ import annotations

import subprocess
import sys

from node_agent.backends.host import host_memory, process_memory_mb, process_tree_pids
from tests.waiting import wait_until_sync

MEMINFO = "MemTotal:       41943040 kB\nMemFree:  1000 kB\nMemAvailable:   20971520 kB\n"


def test_host_memory_reads_total_and_available_from_meminfo(tmp_path):
    path = tmp_path / "meminfo"
    path.write_text(MEMINFO)
    assert host_memory(path) == (40960, 20480)


def test_host_memory_of_this_host_is_plausible():
    total, available = host_memory()
    assert 0 < available <= total


def test_a_process_trees_resident_memory_counts_its_children(tmp_path):
    # A parent holding ~10 MB whose child holds ~200 MB: the tree is what a load costs.
    child = "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); " \
            "open(r'{ready}', 'w').close(); time.sleep(60)"
    ready = tmp_path / "ready"
    parent = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys, time; "
                               f"subprocess.Popen([sys.executable, '-c', {child!r}"
                               f".format(ready={str(ready)!r})]); time.sleep(60)"],
                              start_new_session=True)
    try:
        wait_until_sync(ready.exists, timeout_s=20, what="the child to allocate")
        assert len(process_tree_pids(parent.pid)) == 2
        assert process_memory_mb(parent.pid) >= 200
    finally:
        for pid in reversed(process_tree_pids(parent.pid)):
            subprocess.run(["kill", "-9", str(pid)], check=False)
        parent.wait()


def test_a_process_that_is_gone_has_no_figure():
    done = subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert done.returncode == 0
    assert process_memory_mb(2**22 + 12345) is None
    assert process_tree_pids(2**22 + 12345) == []
