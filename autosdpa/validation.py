"""Is a record read from elsewhere sane data? (files, other ranks, a shared database: see docs/sharing.md)

Each check returns why not as a short, countable sentence, or None when the value is fine; the offending value
is never echoed in full (it may be huge or hold control characters).
"""
from __future__ import annotations

import math
import re
import time

from .records import ENV_FIELDS, ENV_INT_FIELDS, STATUSES, Measurement, fingerprint_of

MAX_KEY_LEN = 512
MAX_DETAIL_LEN = 2000
MAX_SHAPE_LEN = 512
MAX_ENV_TEXT_LEN = 256
MAX_STATUS_LEN = 16
MAX_BACKEND_LEN = 48
MAX_SAMPLES = 10**7
MAX_SECONDS = 1e6
MAX_ENV_INT = 10**7
#: Most rows one (environment, problem key) may hold: one per backend, with room for backends to come.
MAX_BACKENDS_PER_KEY = 256
#: Well-formed backend names; names of backends this install does not know must also match it to be kept
#: (``autosdpa db import --allow-unknown-backends``), so a file from a newer autosdpa keeps its evidence.
BACKEND_NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
FINGERPRINT_RE = re.compile(r"^[0-9a-f]{16}$")
_PRINTABLE_RE = re.compile(r"^[^\x00-\x1f\x7f]*$")

#: Longest text the store ever reads from each column (one more than allowed, so "too long" is detectable).
TEXT_READ_LIMITS = {"problem_key": MAX_KEY_LEN + 1, "backend": MAX_BACKEND_LEN + 1, "status": MAX_STATUS_LEN + 1,
                    "detail": MAX_DETAIL_LEN + 1, "tuned_shape": MAX_SHAPE_LEN + 1, "fingerprint": 65,
                    **{f: MAX_ENV_TEXT_LEN + 1 for f in ENV_FIELDS if f not in ENV_INT_FIELDS}}


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def backend_name_error(name) -> str | None:
    if not isinstance(name, str) or not BACKEND_NAME_RE.match(name):
        return "malformed backend name"
    return None


def measurement_error(m: Measurement) -> str | None:
    """Why this measurement is not sane data, or None."""
    bad = backend_name_error(m.backend)
    if bad:
        return bad
    if m.status not in STATUSES:
        return "unknown status"
    for f in ("median_s", "spread_s", "max_error"):
        v = getattr(m, f)
        if v is not None and (not _is_number(v) or not math.isfinite(v) or v < 0 or v > MAX_SECONDS):
            return f"{f} is not a finite non-negative number"
    if m.status == "ok" and not (m.median_s and m.median_s > 0):
        return "an ok measurement needs a positive median"
    if not isinstance(m.samples, int) or isinstance(m.samples, bool) or not 0 <= m.samples <= MAX_SAMPLES:
        return f"samples is not an integer in 0..{MAX_SAMPLES}"
    t = m.measured_at
    if not _is_number(t) or not math.isfinite(t) or t < 0 or t > time.time() + 86400:
        return "measured_at is not a plausible time"
    for f, limit in (("detail", MAX_DETAIL_LEN), ("tuned_shape", MAX_SHAPE_LEN)):
        v = getattr(m, f)
        if not isinstance(v, str) or len(v) > limit or not _PRINTABLE_RE.match(v):
            return f"{f} is not a printable string of at most {limit} characters"
    return None


def check_measurement(m: Measurement) -> None:
    """Raise ValueError unless ``m`` is sane data."""
    bad = measurement_error(m)
    if bad:
        raise ValueError(bad)


def environment_error(env: dict) -> str | None:
    """Why this environment (``fingerprint`` + ``ENV_FIELDS``) is not sane data, or None."""
    fp = env.get("fingerprint")
    if not isinstance(fp, str) or not FINGERPRINT_RE.match(fp):
        return "malformed fingerprint"
    for f in ENV_FIELDS:
        v = env.get(f)
        if f in ENV_INT_FIELDS:
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_ENV_INT:
                return f"environment field {f} is not a sane integer"
        elif not isinstance(v, str) or len(v) > MAX_ENV_TEXT_LEN or not _PRINTABLE_RE.match(v):
            return f"environment field {f} is not a printable string of at most {MAX_ENV_TEXT_LEN} characters"
    if fingerprint_of(env) != fp:
        return "fingerprint does not match the environment's fields"
    return None


def key_error(key) -> str | None:
    """Why this problem key is not acceptable data, or None (it must parse and be canonical)."""
    if not isinstance(key, str) or len(key) > MAX_KEY_LEN:
        return f"problem key is not a string of at most {MAX_KEY_LEN} characters"
    from .problem import Problem  # torch: only when a key is actually checked

    try:
        if Problem.parse(key).key != key:
            return "problem key is not canonical"
    except (ValueError, TypeError, KeyError, IndexError):
        return "problem key does not parse"
    return None


def known_backends() -> set[str]:
    """Names of the backends this install has registered."""
    from .backends import all_backends

    return {b.name for b in all_backends()}
