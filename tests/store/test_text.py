"""The shared formatting helpers."""
from __future__ import annotations

import threading
import warnings

from autosdpa.text import WarnOnce, fmt_seconds, printable


def test_fmt_seconds():
    assert [fmt_seconds(s) for s in (None, 12.34e-6, 4.5601e-3, 1.2345)] == ["-", "12.3 µs", "4.560 ms", "1.234 s"]


def test_printable():
    assert printable("a\x1b[2Jb\n") == "a?[2Jb?" and printable(3) == 3


def test_warn_once_per_kind_across_threads():
    once = WarnOnce()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        threads = [threading.Thread(target=once, args=("store", f"autosdpa: store trouble {i}")) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        once("record", "autosdpa: record trouble")
        once.reset()
        once("store", "autosdpa: again after reset")
    assert [str(w.message).split(" ")[1] for w in caught] == ["store", "record", "again"]
