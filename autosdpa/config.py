"""Every setting autosdpa reads from the environment, in one place (see the README's table).

``Settings.from_env()`` reads them once; a bad value gives one warning naming the variable, the value and
what is used instead. Library code never writes ``os.environ``: to change a setting for this process, build a
``Settings`` (``dataclasses.replace(settings, db=...)``) and hand it to ``autosdpa.dispatch.dispatcher.configure``.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from pathlib import Path
from typing import Mapping

from .text import warn_at_caller

MODES = ("tune", "lookup", "off")
COMPILE_MODES = ("dispatch", "pytorch")
DEFAULT_BUDGET_S = 1.0
DEFAULT_DB_TIMEOUT_S = 30.0
DEFAULT_BUCKET_THRESHOLD = 16
MAX_BUDGET_S = 3600.0
MAX_DB_TIMEOUT_S = 3600.0

#: name -> one line for the README table and ``autosdpa doctor``.
VARIABLES = {
    "AUTOSDPA_DB": "database file path or SQLAlchemy URL (default: the user cache file)",
    "AUTOSDPA_MODE": "tune (default) | lookup | off",
    "AUTOSDPA_SHARED_DBS": "extra read-only tuning DB files, os.pathsep-separated",
    "AUTOSDPA_RECORD": "append every new problem seen to this JSONL file",
    "AUTOSDPA_BUDGET": f"seconds per new problem, checks included (default {DEFAULT_BUDGET_S})",
    "AUTOSDPA_BUCKET": "pow2 (default) | pow2:THRESHOLD | exact",
    "AUTOSDPA_DB_TIMEOUT": f"seconds to wait for a locked database (default {DEFAULT_DB_TIMEOUT_S:g})",
    "AUTOSDPA_LOG": "level of the autosdpa logger (DEBUG, INFO, ...)",
    "AUTOSDPA_COMPILE": "dispatch (default: compiled graphs run the tuned winner) | pytorch (plain F.sdpa)",
    "AUTOSDPA_TRITON_INTERPRET": "1: allow the Triton kernels on the CPU interpreter (tests only)",
    "AUTOSDPA_NATIVE": "0: use the Python fast key even where the C one is built (default 1)",
}


def _warn(name: str, value: str, why: str, used) -> None:
    warn_at_caller(f"autosdpa: {name}={value!r} {why}; using {used!r}")


def _switch(env: Mapping[str, str], name: str, default: bool) -> bool:
    """A 0/1 variable; unset or empty means ``default``, anything else warns and means ``default``."""
    value = env.get(name, "").strip()
    if value not in ("", "0", "1"):
        _warn(name, value, "is not 0 or 1", str(int(default)))
        return default
    return default if value == "" else value == "1"


def parse_bucketing(spec: str | None) -> int | None:
    """``pow2`` (default, threshold 16), ``pow2:T`` or ``exact`` -> threshold, or None for exact."""
    spec = (spec or "pow2").strip().lower()
    if spec == "exact":
        return None
    if spec == "pow2":
        return DEFAULT_BUCKET_THRESHOLD
    m = re.fullmatch(r"pow2:(\d{1,9})", spec)
    if not m:
        raise ValueError(f"expected 'pow2', 'pow2:THRESHOLD' or 'exact', got {spec!r}")
    return int(m.group(1))


def _seconds(env: Mapping[str, str], name: str, default: float, upper: float) -> float:
    raw = env.get(name)
    if raw is None or not raw.strip():
        return default
    try:
        v = float(raw)
    except ValueError:
        _warn(name, raw, "is not a number of seconds", default)
        return default
    if not math.isfinite(v) or v < 0:
        _warn(name, raw, "is not a finite, non-negative number of seconds", default)
        return default
    if v > upper:
        _warn(name, raw, f"is above the limit of {upper:g} s", upper)
        return upper
    return v


def _paths(raw: str | None) -> tuple[str, ...]:
    return tuple(p for p in (raw or "").split(os.pathsep) if p.strip())


def shipped_db_paths() -> tuple[str, ...]:
    """The shipped ``tuning_db/*.sqlite`` files (inside the installed package, or the source checkout's)."""
    here = Path(__file__).resolve().parent
    out = []
    for base in (here / "tuning_db", here.parent / "tuning_db"):
        if base.is_dir():
            out.extend(str(p) for p in sorted(base.glob("*.sqlite")))
    return tuple(dict.fromkeys(out))


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the environment asks for. Build with ``from_env()``; change with ``dataclasses.replace``."""

    db: str | None = None                      # AUTOSDPA_DB: path or URL; None = the default cache file
    mode: str = "tune"                         # AUTOSDPA_MODE
    shared_dbs: tuple[str, ...] = ()           # AUTOSDPA_SHARED_DBS (the shipped files come first)
    record: str | None = None                  # AUTOSDPA_RECORD
    budget_s: float = DEFAULT_BUDGET_S         # AUTOSDPA_BUDGET
    bucket_threshold: int | None = DEFAULT_BUCKET_THRESHOLD  # AUTOSDPA_BUCKET (None: exact)
    db_timeout_s: float = DEFAULT_DB_TIMEOUT_S  # AUTOSDPA_DB_TIMEOUT
    log_level: str | None = None               # AUTOSDPA_LOG
    compile: str = "dispatch"                  # AUTOSDPA_COMPILE
    triton_interpret: bool = False             # AUTOSDPA_TRITON_INTERPRET=1 and TRITON_INTERPRET=1
    warm_start: bool = True                    # AUTOSDPA_WARM_START (autosdpa.warm)
    native: bool = True                        # AUTOSDPA_NATIVE (autosdpa.fastkey)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        mode = (env.get("AUTOSDPA_MODE") or "tune").strip().lower()
        if mode not in MODES:
            _warn("AUTOSDPA_MODE", env["AUTOSDPA_MODE"], f"is not one of {', '.join(MODES)}", "tune")
            mode = "tune"
        try:
            threshold = parse_bucketing(env.get("AUTOSDPA_BUCKET"))
        except ValueError:
            _warn("AUTOSDPA_BUCKET", env["AUTOSDPA_BUCKET"], "is not 'pow2', 'pow2:THRESHOLD' or 'exact'", "pow2")
            threshold = DEFAULT_BUCKET_THRESHOLD
        level = (env.get("AUTOSDPA_LOG") or "").strip().upper() or None
        if level is not None and not isinstance(logging.getLevelName(level), int):
            _warn("AUTOSDPA_LOG", env["AUTOSDPA_LOG"], "is not a logging level (DEBUG, INFO, WARNING, ...)", None)
            level = None
        compile_mode = (env.get("AUTOSDPA_COMPILE") or "dispatch").strip().lower()
        if compile_mode not in COMPILE_MODES:
            _warn("AUTOSDPA_COMPILE", env["AUTOSDPA_COMPILE"], f"is not one of {', '.join(COMPILE_MODES)}",
                  "dispatch")
            compile_mode = "dispatch"
        return cls(
            db=(env.get("AUTOSDPA_DB") or "").strip() or None,
            mode=mode,
            shared_dbs=_paths(env.get("AUTOSDPA_SHARED_DBS")),
            record=(env.get("AUTOSDPA_RECORD") or "").strip() or None,
            budget_s=_seconds(env, "AUTOSDPA_BUDGET", DEFAULT_BUDGET_S, MAX_BUDGET_S),
            bucket_threshold=threshold,
            db_timeout_s=_seconds(env, "AUTOSDPA_DB_TIMEOUT", DEFAULT_DB_TIMEOUT_S, MAX_DB_TIMEOUT_S),
            log_level=level,
            compile=compile_mode,
            triton_interpret=(_switch(env, "AUTOSDPA_TRITON_INTERPRET", False)
                              and env.get("TRITON_INTERPRET", "0") == "1"),
            warm_start=_switch(env, "AUTOSDPA_WARM_START", True),
            native=_switch(env, "AUTOSDPA_NATIVE", True),
        )

    def all_shared_dbs(self) -> tuple[str, ...]:
        """Shipped files, then ``shared_dbs``: the read-only layers under the user's database."""
        return tuple(dict.fromkeys(shipped_db_paths() + self.shared_dbs))


def triton_interpret_allowed(env: Mapping[str, str] | None = None) -> bool:
    """Whether this project's Triton kernels may run on the CPU interpreter (tests only): both
    ``TRITON_INTERPRET=1`` (Triton's own switch) and ``AUTOSDPA_TRITON_INTERPRET=1``. Read per call, since tests
    set it per test; no warnings here (``Settings.from_env`` gives those)."""
    env = os.environ if env is None else env
    return env.get("TRITON_INTERPRET", "0") == "1" and env.get("AUTOSDPA_TRITON_INTERPRET", "0").strip() == "1"


def triton_interpreting(env: Mapping[str, str] | None = None) -> bool:
    """Whether Triton runs kernels on its CPU interpreter (``TRITON_INTERPRET=1``)."""
    env = os.environ if env is None else env
    return env.get("TRITON_INTERPRET", "0") == "1"


def configure_logging(level: str | None) -> None:
    if not level:
        return
    logger = logging.getLogger("autosdpa")
    logger.setLevel(level)
    if not logger.handlers:
        h = logging.StreamHandler()
        h.setFormatter(logging.Formatter("[autosdpa] %(levelname)s %(message)s"))
        logger.addHandler(h)
