"""What every stage script shares: clean errors, and stopping with the dvc that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A stand-in for `dvc repro`: runs a stage-like child through a shell, as DVC does, prints the
# child's pid and waits for it.
FAKE_DVC = """
import subprocess, sys
stage = ("from fashionbench.cli import stop_with_dvc; stop_with_dvc(0.2); import time\\n"
         "for _ in range(600): time.sleep(0.1)")
child = subprocess.Popen(["sh", "-c", f"{sys.executable} -c '{stage}'"])
print(child.pid, flush=True)
child.wait()
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_stage_stops_when_the_dvc_that_started_it_is_killed(tmp_path):
    fake = tmp_path / "dvc"
    fake.write_text(FAKE_DVC)
    dvc = subprocess.Popen([sys.executable, str(fake)], stdout=subprocess.PIPE, text=True,
                           cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    shell_pid = int(dvc.stdout.readline())
    time.sleep(1.5)  # the stage has started its watcher
    stage_pids = [int(p) for p in Path(f"/proc/{shell_pid}/task/{shell_pid}/children").read_text().split()] \
        or [shell_pid]
    assert all(_alive(p) for p in stage_pids)
    dvc.send_signal(signal.SIGKILL)
    dvc.wait()
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in stage_pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(p) for p in stage_pids), "the stage outlived the dvc that started it"

