"""What every stage script shares: stopping with the dvc process that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

STAGE = """
import os, time
from pathlib import Path
from fashionbench.cli import stop_with_dvc
stop_with_dvc(0.2)
Path("stage.pid").write_text(str(os.getpid()))
for _ in range(600):
    time.sleep(0.1)
Path("out.txt").write_text("done")
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_stage_stops_when_the_dvc_that_started_it_is_killed(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=tmp_path, check=True, env=env)
    (tmp_path / "stage.py").write_text(STAGE)
    (tmp_path / "dvc.yaml").write_text(
        f"stages:\n  slow:\n    cmd: {sys.executable} stage.py\n    deps: [stage.py]\n    outs: [out.txt]\n")
    # Started as `nohup dvc repro &` from a script starts it: SIGINT ignored, which the stage
    # inherits, so only a real signal of its own can stop it.
    dvc = subprocess.Popen(["dvc", "repro"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL,
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    pid_file = tmp_path / "stage.pid"
    deadline = time.monotonic() + 60
    while not pid_file.is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    stage = int(pid_file.read_text())
    assert _alive(stage)
    dvc.send_signal(signal.SIGKILL)
    dvc.wait()
    deadline = time.monotonic() + 10
    while _alive(stage) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(stage), "the stage outlived the dvc process that started it"
