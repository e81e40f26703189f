"""The leftover-process check the whole suite runs under (see conftest.py) finds what it must."""

from __future__ import annotations

import os
import subprocess
import sys

from leftovers import MARKER_ENV, kill, leftovers, wait_for_none


def test_an_orphaned_fleetgate_process_of_this_run_is_found_and_others_are_not():
    token = os.environ[MARKER_ENV]
    # A simulator-like process whose parent exits at once: orphaned, like the demo's used to be.
    code = ("import subprocess, sys; subprocess.Popen([sys.executable, '-c', "
            "'import time; time.sleep(30)  # fleetgate sim'], start_new_session=True)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)
    other = subprocess.Popen(  # another run's process: not ours to report
        [sys.executable, "-c", "import time; time.sleep(30)  # fleetgate sim"],
        env={**os.environ, MARKER_ENV: "someone-else"},
    )
    try:
        found = leftovers(token, os.getpid())
        assert any("fleetgate sim" in cmd for cmd in found.values()), found
        assert other.pid not in found
    finally:
        kill(list(found))
        other.kill()
        other.wait(timeout=10)
    # Its own orphan is gone. (Only its own: an engine an earlier test stopped, such as vLLM's
    # resource tracker, may still be winding down; the session-wide check waits for those.)
    mine = {pid for pid, cmd in found.items() if "fleetgate sim" in cmd}
    still = wait_for_none(token, os.getpid(), 5)
    assert not mine & set(still), still
