"""Small formatting and reporting helpers shared by the library and the command line (no torch)."""
from __future__ import annotations

import os
import re
import sys
import threading
import warnings

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def fmt_seconds(s: float | None) -> str:
    """``12.3 µs``, ``4.560 ms``, ``1.234 s``; ``-`` for None."""
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.3f} ms"
    return f"{s:.3f} s"


def printable(value):
    """A string from elsewhere, safe for a terminal: control characters become ``?``. Non-strings unchanged."""
    return _CONTROL_RE.sub("?", value) if isinstance(value, str) else value


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_at_caller(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside autosdpa: the user's call (or the library's
    that called autosdpa), not an internal line the user can do nothing about."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


class WarnOnce:
    """One warning per kind for the life of this object (thread-safe); ``reset()`` forgets what was said."""

    def __init__(self, category: type[Warning] = RuntimeWarning):
        self.category = category
        self._said: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, kind: str, message: str) -> bool:
        """Warn ``message`` (at the caller outside autosdpa) unless a warning of ``kind`` was given already;
        whether it warned."""
        with self._lock:
            if kind in self._said:
                return False
            self._said.add(kind)
        warn_at_caller(message, self.category)
        return True

    def reset(self) -> None:
        with self._lock:
            self._said.clear()
