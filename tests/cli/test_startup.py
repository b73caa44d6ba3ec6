"""Starting the command: help and argument errors do not load torch, and Ctrl-C at any moment ends it with one
line and exit status 130, never a traceback. (How fast it starts is measured by scripts/bench_startup.py, in
benchmarks/startup_cpu.md, not here.)"""
from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from .conftest import child_env

# The console script's own steps (a child: the test process has torch loaded already) ...
CONSOLE_SCRIPT = "import sys; from autosdpa.cli import main; sys.argv[0] = 'autosdpa'; sys.exit(main())"
# ... and the same with a report at exit of whether torch was loaded.
REPORTING_CLI = ("import atexit, sys; atexit.register(lambda: sys.stderr.write("
                 "'torch loaded: %s\\n' % ('torch' in sys.modules)))\n" + CONSOLE_SCRIPT)


@pytest.mark.parametrize("args, status", [
    (["--help"], 0), (["tune", "--help"], 0), (["show", "--help"], 0), (["explain", "--help"], 0),
    (["bench", "--help"], 0), (["db", "prune", "--help"], 0), (["tune", "--bogus"], 2), (["explain"], 2),
    (["tune", "--budget", "-1", "--shape", "lq=4"], 2),
])
def test_help_and_argument_errors_do_not_load_torch(tmp_path, args, status):
    r = subprocess.run([sys.executable, "-c", REPORTING_CLI, *args], env=child_env(tmp_path / "x.sqlite"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == status, r.stderr
    assert r.stderr.rstrip().endswith("torch loaded: False"), r.stderr
    assert "Traceback" not in r.stderr


# The console script, except that tuning stalls once everything is loaded: the command is then still running
# however fast the machine (a quick problem would be tuned and done before 3 s on a fast one).
STALLING_CLI = """
import sys
from autosdpa.cli import _group
real_load = _group.load_runtime
def load_then_stall():
    real_load()
    import time, autosdpa.api
    autosdpa.api.tune = lambda *a, **k: time.sleep(300)
_group.load_runtime = load_then_stall
from autosdpa.cli import main
sys.argv[0] = "autosdpa"
sys.exit(main())
"""


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a suite run in the background inherits SIGINT ignored


def _interrupt(args: list[str], after_s: float, db) -> subprocess.CompletedProcess:
    p = subprocess.Popen([sys.executable, "-c", STALLING_CLI, *args], env=child_env(db), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    try:
        time.sleep(after_s)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


@pytest.mark.parametrize("after_s", [0.1, 0.5, 1.0, 2.0, 3.0])
def test_ctrl_c_at_any_moment_is_one_line_and_status_130(tmp_path, after_s):
    """While Python loads the command, torch and the dispatcher, opens the database or tunes: always exit
    status 130 and the one line, nothing else."""
    r = _interrupt(["explain", "--device", "cpu", "--shape", "b=1,hq=4,lq=512,d=64"], after_s, tmp_path / "db.sqlite")
    assert r.returncode == 130, r.stderr
    assert r.stderr == "\nInterrupted.\n"
    assert r.stdout == ""


@pytest.mark.parametrize("after_s", [0.5, 3.0])
def test_ctrl_c_in_tune_is_short_too(tmp_path, after_s):
    """tune prints what it finished (nothing yet here) and says so in one line."""
    r = _interrupt(["tune", "--device", "cpu", "--shape", "b=1,hq=4,lq=512,d=64"], after_s, tmp_path / "db.sqlite")
    assert r.returncode == 130 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] in ("Interrupted.", "interrupted: keeping the measurements saved so far")
