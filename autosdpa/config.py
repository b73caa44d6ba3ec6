"""Settings read from the environment (see the README's table)."""
from __future__ import annotations

import logging
import os

MODES = ("tune", "lookup", "off")


def env_mode() -> str:
    mode = (os.environ.get("AUTOSDPA_MODE") or "tune").strip().lower()
    if mode not in MODES:
        logging.getLogger("autosdpa").warning("AUTOSDPA_MODE=%r is not one of %s; using 'tune'", mode, MODES)
        return "tune"
    return mode


def shared_db_paths() -> list[str]:
    """Shipped ``tuning_db/*.sqlite`` files, then ``AUTOSDPA_SHARED_DBS`` (os.pathsep-separated)."""
    from pathlib import Path

    paths = []
    shipped = Path(__file__).resolve().parent.parent / "tuning_db"
    for base in (Path(__file__).resolve().parent / "tuning_db", shipped):
        if base.is_dir():
            paths.extend(str(p) for p in sorted(base.glob("*.sqlite")))
    extra = os.environ.get("AUTOSDPA_SHARED_DBS", "")
    paths.extend(p for p in extra.split(os.pathsep) if p.strip())
    return list(dict.fromkeys(paths))


def configure_logging() -> None:
    level = os.environ.get("AUTOSDPA_LOG")
    if level:
        logger = logging.getLogger("autosdpa")
        try:
            logger.setLevel(level.upper())
        except ValueError:
            logger.warning("AUTOSDPA_LOG=%r is not a logging level (DEBUG, INFO, WARNING, ...); ignored", level)
            return
        if not logger.handlers:
            h = logging.StreamHandler()
            h.setFormatter(logging.Formatter("[autosdpa] %(levelname)s %(message)s"))
            logger.addHandler(h)
