"""`python -m oases_fx plan`: a user's mistake is one message with its fix, never a traceback."""
import subprocess
import sys

from oases_fx.cli import plan_main

SMALL = ["--model", "gpt", "--hidden", "64", "--layers", "1", "--heads", "4", "--seq", "16", "--batch", "4",
         "--tp", "2", "--profile", "analytical", "--plain"]


def test_no_plan_fits_prints_the_fix_as_cli_flags(capsys):
    # A budget of ~1 KiB: no assignment of this model fits, whatever k or recompute.
    assert plan_main(SMALL + ["--memory-gib", "0.000001"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("[oases_fx] error: no plan fits")
    assert "needs" in err and "budget" in err  # the planner's reasons are kept
    for flag in ("--memory-gib", "--tp", "--batch", "--recompute"):
        assert flag in err, flag
    assert "Traceback" not in err


def test_a_plan_that_fits_still_exits_0(capsys):
    assert plan_main(SMALL) == 0
    assert "error" not in capsys.readouterr().err


def test_module_entry_point_prints_no_traceback():
    out = subprocess.run([sys.executable, "-m", "oases_fx", "plan", *SMALL, "--memory-gib", "0.000001"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert "[oases_fx] error: no plan fits" in out.stderr and "--memory-gib" in out.stderr
    assert "Traceback" not in out.stderr
