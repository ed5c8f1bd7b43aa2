"""The README's quick-start job (`python -m oases_fx demo`), as a user runs it: it trains, prints the
plan and the schedule, and checks itself against the unsharded model (exit status 0 only when every
step's loss and the final parameters match within its tolerance, oases_fx/demo.py)."""
import os
import subprocess
import sys
from pathlib import Path


def test_quick_start_demo_trains_explains_and_checks_itself():
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "oases_fx", "demo"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for shown in ("Sharded regions", "Sub batch notes", "Schedule (forward", "Schedule (backward",
                  "check against the unsharded model"):
        assert shown in out, (shown, out[-4000:])
    assert "-> OK" in out and "MISMATCH" not in out, out[-2000:]
