"""How the commands open the database (issue 17, §4): `tune` that could not save exits 1 and says where the
results went; commands that only read create nothing (no folder, file, -journal, -wal)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

import autosdpa
from autosdpa.cli import main
from autosdpa.store import Store

from .helpers import KEY, env, meas

TINY = "b=1,hq=2,lq=32,d=16"
NEW = "b=1,hq=2,lq=64,d=16"


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def _keys(path: Path) -> set[str]:
    s = Store(path, readonly=True)
    try:
        return {k for _e, k, _m in s.iter_rows()}
    finally:
        s.close()


def _set_write_version(path: Path, value: int) -> None:
    """SQLite's header byte 18: above 2, SQLite opens the file read-only, root included (chmod is not)."""
    with open(path, "r+b") as f:
        f.seek(18)
        f.write(bytes([value]))


def test_tune_into_a_read_only_database_exits_1_and_says_the_results_were_not_saved(tmp_path):
    db = tmp_path / "ro.sqlite"
    assert invoke("tune", "--shape", TINY, "--db", str(db)).exit_code == 0
    autosdpa.reset()  # closes it: its WAL goes into the file
    (old,) = _keys(db)
    _set_write_version(db, 3)
    with pytest.warns(RuntimeWarning, match="tuning database unusable"):
        r = invoke("tune", "--shape", TINY, "--shape", NEW, "--db", str(db))
    assert r.exit_code == 1, r.output
    error = [line for line in r.output.splitlines() if line.startswith("Error: ")]
    assert len(error) == 1 and f"could not save to {db}" in error[0] and "read-only" in error[0]
    assert "kept in memory only" in error[0] and "Lq=64" in error[0] and old not in error[0]
    assert "1 already in the database, 1 tuned now but NOT saved" in " ".join(r.output.split())
    autosdpa.reset()
    _set_write_version(db, 2)
    assert _keys(db) == {old}  # nothing else got in


def _files(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.mark.parametrize("args", [
    ["show", "--db", "{missing}"],
    ["show", "--shared", "--json", "--db", "{missing}"],
    ["explain", "--no-tune", "--shape", TINY, "--db", "{missing}"],
    ["db", "info", "{missing}"],
    ["db", "export", "--db", "{missing}", "-o", "{tmp}/out.sqlite"],
    ["show"],  # the user cache: AUTOSDPA_DB unset
    ["doctor"],
    ["db", "export", "-o", "{tmp}/out.sqlite"],
])
def test_commands_that_only_read_create_nothing(tmp_path, monkeypatch, args):
    monkeypatch.delenv("AUTOSDPA_DB")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the user cache file would go there
    monkeypatch.chdir(tmp_path)
    missing = "missing/dir/x.sqlite"
    r = invoke(*(a.format(missing=missing, tmp=tmp_path) for a in args))
    assert "Traceback" not in r.output
    assert os.listdir(tmp_path) == [], r.output  # no folder, no file, no -journal/-wal
    if args[0] in ("show", "explain", "doctor"):
        assert r.exit_code == 0 and ("read as an empty database" in r.output or "not created yet" in r.output), \
            r.output
    else:
        assert r.exit_code == 1 and "Error: " in r.output and "no such file" in r.output


@pytest.mark.parametrize("args", [["show"], ["show", "--json"], ["doctor"],
                                  ["explain", "--no-tune", "--shape", TINY]])
def test_commands_that_only_read_leave_an_existing_database_as_it_is(tmp_path, monkeypatch, args):
    db = tmp_path / "db" / "user.sqlite"
    s = Store(db)
    s.save(*env(), KEY, [meas("math")])
    s.close()
    monkeypatch.setenv("AUTOSDPA_DB", str(db))
    before = _files(db.parent)
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    autosdpa.reset()
    assert _files(db.parent) == before  # same bytes and mtime, no -wal/-shm/-journal next to it
