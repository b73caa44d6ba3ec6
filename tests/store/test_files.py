"""What a database target names, and what is refused before anything is written (issue 9, items 7 and 8)."""
from __future__ import annotations

import os
import sqlite3
import warnings

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

import autosdpa
from autosdpa.cli import main
from autosdpa.sharing import info
from autosdpa.store import Store, StoreError, parse_target

from .helpers import KEY, env, meas, raw_insert

H100 = env("NVIDIA H100 80GB HBM3")


def _foreign(path, journal: str = "delete"):
    """Another application's SQLite database."""
    con = sqlite3.connect(str(path))
    con.execute(f"PRAGMA journal_mode={journal}")
    con.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    con.executemany("INSERT INTO users (name) VALUES (?)", [(f"user{i}",) for i in range(100)])
    con.commit()
    con.close()
    return path


def _autosdpa_calls_warn_once(q) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            torch.testing.assert_close(autosdpa.sdpa(q, q, q), F.scaled_dot_product_attention(q, q, q))
    return [str(w.message) for w in caught if "autosdpa" in str(w.message)]


@pytest.mark.parametrize("journal", ["delete", "wal"])
def test_another_applications_database_is_never_modified(tmp_path, monkeypatch, journal):
    path = _foreign(tmp_path / "app.sqlite", journal)
    before = path.read_bytes()
    with pytest.raises(StoreError, match="not an autosdpa database"):
        Store(str(path))
    monkeypatch.setenv("AUTOSDPA_DB", str(path))
    autosdpa.reset()
    msgs = _autosdpa_calls_warn_once(torch.randn(1, 2, 8, 16))
    assert len(msgs) == 1 and "not an autosdpa database" in msgs[0], msgs
    autosdpa.reset()
    assert path.read_bytes() == before  # header bytes included: not switched to WAL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.sqlite"]


@pytest.mark.parametrize("what", ["dev_null", "directory", "fifo", "garbage"])
def test_not_a_database_file_refused_untouched_and_the_run_goes_on(tmp_path, monkeypatch, what):
    target = {"dev_null": "/dev/null", "directory": str(tmp_path / "d"), "fifo": str(tmp_path / "p"),
              "garbage": str(tmp_path / "g.sqlite")}[what]
    if what == "directory":
        os.mkdir(target)
    elif what == "fifo":
        os.mkfifo(target)
    elif what == "garbage":
        with open(target, "wb") as f:
            f.write(b"\x00garbage" * 1000)
    def listing():  # names next to the target, with the mtimes of autosdpa-looking ones
        d = os.path.dirname(target)
        return sorted((n, os.stat(os.path.join(d, n)).st_mtime_ns if n.startswith(os.path.basename(target)) else 0)
                      for n in os.listdir(d))
    before = listing()
    with pytest.raises(StoreError, match="not a regular file|not an SQLite database"):
        Store(target)
    monkeypatch.setenv("AUTOSDPA_DB", target)
    autosdpa.reset()
    msgs = _autosdpa_calls_warn_once(torch.randn(1, 2, 8, 16))
    assert len(msgs) == 1 and "tuning database unusable" in msgs[0], msgs
    autosdpa.reset()
    assert listing() == before  # no -journal / -wal next to it


def test_question_mark_and_hash_in_a_path_are_part_of_the_name(tmp_path, monkeypatch):
    plain, odd = tmp_path / "x.sqlite", tmp_path / "x.sqlite?mode=rwc#frag"
    for p, name in ((plain, "plain GPU"), (odd, "odd GPU")):
        s = Store(str(p))
        s.save(*env(name), KEY, [meas("math")])
        s.close()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("x")) == [
        "x.sqlite", "x.sqlite?mode=rwc#frag"]
    assert parse_target(str(odd)) == ("file", odd)
    assert [e["device_name"] for e in info(str(odd))["environments"]] == ["odd GPU"]
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["db", "info", "x.sqlite?mode=rwc#frag"])
    assert r.exit_code == 0 and "odd GPU" in r.output and "plain GPU" not in r.output
    r = CliRunner().invoke(main, ["db", "info", "x.sqlite?mode=ro"])  # no such file: not x.sqlite in ro mode
    assert r.exit_code == 1 and "no such file" in r.output


def test_a_path_through_a_file_or_an_unwritable_place_is_an_error(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("I am a file")
    for target in (afile / "x.sqlite", "/proc/nope/x.sqlite"):
        with pytest.raises(StoreError, match="cannot (create|use)"):
            Store(str(target))
    assert afile.read_text() == "I am a file"


def test_sqlite_url_is_its_path_and_url_parameters_are_refused(tmp_path):
    p = tmp_path / "u.sqlite"
    s = Store(f"sqlite:///{p}")
    assert s.path == p and s.display_url == str(p)
    s.close()
    with pytest.raises(StoreError, match="parameters in an sqlite URL"):
        Store(f"sqlite:///{p}?mode=ro")
    assert parse_target(None)[0] == "file" and parse_target(":memory:") == ("memory", ":memory:")
    assert parse_target("postgresql+psycopg://u@h/db") == ("url", "postgresql+psycopg://u@h/db")


def test_store_reads_no_environment(tmp_path, monkeypatch):
    """Store(None) is the default cache file whatever AUTOSDPA_DB says: callers pass Settings.db."""
    monkeypatch.setenv("AUTOSDPA_DB", str(tmp_path / "from-env.sqlite"))
    monkeypatch.setenv("AUTOSDPA_DB_TIMEOUT", "0.001")
    s = Store(None)
    assert s.path.name == "autosdpa.sqlite" and "xdg-cache" in str(s.path) and s.timeout_s == 30.0
    s.close()
    assert not (tmp_path / "from-env.sqlite").exists()


def test_an_older_file_used_as_the_user_database_is_upgraded_but_a_newer_one_untouched(tmp_path):
    from .helpers import build_v1

    old, new = tmp_path / "old.sqlite", tmp_path / "new.sqlite"
    build_v1("sqlite:///" + str(old), [(H100, KEY, meas("math"))])
    build_v1("sqlite:///" + str(new), version="3")
    before = new.read_bytes()
    with pytest.raises(StoreError, match="newer than this autosdpa"):
        Store(str(new))
    assert new.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["new.sqlite", "old.sqlite"]
    s = Store(str(old))
    assert s.version == 2 and set(s.lookup(H100[0], KEY)) == {"math"}
    s.close()
    raw_insert(old, "SELECT 1")  # still a plain SQLite file any tool opens
