"""Ctrl-C while the command loads: exit at once with one line and status 130 (stdlib only: imported first)."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

#: The shell's exit status for a process ended by Ctrl-C (128 + SIGINT).
INTERRUPTED = 130
MESSAGE = "\nInterrupted.\n"  # the newline first ends the terminal's ``^C``


def _exit_now(_signum, _frame) -> None:
    sys.stderr.write(MESSAGE)
    sys.stderr.flush()
    os._exit(INTERRUPTED)


@contextlib.contextmanager
def exit_on_interrupt():
    """While modules load, Ctrl-C exits at once (nothing is open yet that needs closing). A KeyboardInterrupt
    raised inside an import is not safe to catch: Python 3.11 turns it into a RuntimeError inside a class's
    ``__set_name__``, and in Python code that a C++ extension runs while it is imported (Triton's nanobind
    module, which torch's dynamo imports) it ends in std::terminate: status -6, a core dump, a traceback."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield  # ignored (a background job) or someone else's handler: leave it alone
        return
    signal.signal(signal.SIGINT, _exit_now)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
