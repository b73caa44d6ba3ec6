"""Helpers for the ``autosdpa`` command tests: run the real command in a child process against a temp DB."""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

TINY = "b=1,hq=2,lq=32,d=16"


def cli_cmd() -> list[str]:
    exe = shutil.which("autosdpa", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "autosdpa.cli"]


def child_env(db: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOSDPA_")}
    env.update(AUTOSDPA_DB=str(db), XDG_CACHE_HOME=str(db.parent / "xdg-cache"), AUTOSDPA_BUDGET="0.02", OPENBLAS_NUM_THREADS="1", COLUMNS="200",
               PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    env.update(extra)
    return env


def run_cli(args: list[str], db: Path, *, timeout: float = 120, cwd: Path | None = None, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cli_cmd() + args, env=child_env(db, **env), capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def db_keys(db: Path) -> dict[str, set[str]]:
    """{problem key: {backends}} straight from the SQLite file (independent of autosdpa's code)."""
    if not db.exists():
        return {}
    con = sqlite3.connect(str(db), timeout=30)
    try:
        rows = con.execute("SELECT problem_key, backend FROM measurement").fetchall()
    except sqlite3.OperationalError:
        return {}
    finally:
        con.close()
    out: dict[str, set[str]] = {}
    for k, b in rows:
        out.setdefault(k, set()).add(b)
    return out


@pytest.fixture
def cli_db(tmp_path) -> Path:
    return tmp_path / "cli.sqlite"
