"""Export / import / merge / prune / info, the conflict rule, and hostile input files."""
from __future__ import annotations

import os
import sqlite3
import time

import pytest
from click.testing import CliRunner

from autosdpa.cli import main
from autosdpa.sharing import SharingError, export, import_file, info, merge_files, parse_time, prefer, prune
from autosdpa.records import fingerprint_of
from autosdpa.store import Store, StoreError

from .helpers import KEY, KEY2, build_v1, env, meas, raw_insert

H100 = env("NVIDIA H100 80GB HBM3")
A100 = env("NVIDIA A100-SXM4-80GB", capability="8.0")


def _file(path, rows):
    s = Store(str(path), wal=False)
    for (fp, inf), key, ms in rows:
        s.save(fp, inf, key, ms)
    s.close()
    return path


def _rows(url):
    s = Store(url)
    out = {(e["fingerprint"], k, m.backend): m for e, k, m in s.rows()}
    s.close()
    return out


def test_conflict_rule():
    old, new = meas(samples=10, at=100.0), meas(samples=10, at=200.0)
    assert prefer(meas(samples=20, at=1.0), old)  # more evidence wins, even if older
    assert not prefer(meas(samples=5, at=300.0), old)  # less evidence loses, even if newer
    assert prefer(new, old) and not prefer(old, new)  # equal evidence: the newer wins
    assert not prefer(old, old)  # full tie: keep what is there


def test_export_import_merge_roundtrip(tmp_path, any_db):
    now = time.time()
    src = _file(tmp_path / "mine.sqlite", [
        (H100, KEY, [meas("flash", 1e-3, samples=10, at=now - 100), meas("math", 3e-3, samples=10, at=now - 100)]),
        (A100, KEY, [meas("flash", 2e-3, at=now - 100), meas("efficient", status="rejected", at=now - 100)]),
    ])
    out = tmp_path / "h100.sqlite"
    r = export(str(src), str(out), gpu="h100")
    assert (r.added, r.rejected, r.environments_added) == (2, 0, 1)
    assert not any(p.name.endswith(("-wal", "-shm", "-journal")) for p in tmp_path.iterdir())
    con = sqlite3.connect(f"file:{out}?mode=ro", uri=True)  # any SQLite tool can read it, read-only
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert con.execute("SELECT count(*) FROM measurement").fetchone()[0] == 2
    con.close()
    with pytest.raises(SharingError, match="exists"):
        export(str(src), str(out))

    # the target already has rows: one with more samples (kept), one older (replaced)
    t = Store(any_db)
    t.save(*H100, KEY, [meas("flash", 9e-4, samples=50, at=now - 50), meas("math", 5e-3, samples=10, at=now - 500)])
    t.close()
    r = import_file(str(out), any_db)
    assert (r.added, r.replaced, r.kept, r.rejected) == (0, 1, 1, 0)
    rows = _rows(any_db)
    assert rows[(H100[0], KEY, "flash")].median_s == 9e-4 and rows[(H100[0], KEY, "math")].median_s == 3e-3
    r = import_file(str(out), any_db)  # importing again changes nothing
    assert (r.added, r.replaced, r.kept) == (0, 0, 2)

    other = _file(tmp_path / "other.sqlite", [(H100, KEY2, [meas("flash")]),
                                              (H100, KEY, [meas("flash", 1e-4, samples=100, at=now - 10)])])
    total, each = merge_files([str(out), str(other)], str(tmp_path / "fleet.sqlite"))
    assert (total.added, total.replaced, total.kept, total.rejected) == (3, 1, 0, 0)
    assert [n for n, _ in each] == [str(out), str(other)]
    merged = _rows("sqlite:///" + str(tmp_path / "fleet.sqlite"))
    assert merged[(H100[0], KEY, "flash")].samples == 100 and len(merged) == 3


def test_export_since_and_ok_only(tmp_path):
    now = time.time()
    src = _file(tmp_path / "mine.sqlite", [(H100, KEY, [meas("flash", at=now - 10 * 86400), meas("math", at=now - 10),
                                                        meas("efficient", status="rejected", at=now - 10)])])
    r = export(str(src), str(tmp_path / "a.sqlite"), since=parse_time("2d"))
    assert r.added == 2
    r = export(str(src), str(tmp_path / "b.sqlite"), since=parse_time("2d"), include_failed=False)
    assert r.added == 1
    assert abs(parse_time("2025-01-31") - time.mktime((2025, 1, 31, 0, 0, 0, 0, 0, -1))) < 1
    with pytest.raises(ValueError):
        parse_time("yesterday")


def test_environment_conflict_never_overwrites(tmp_path, any_db):
    fp, inf = H100
    t = Store(any_db)  # the target holds this fingerprint with different fields (made by hand, or a bug)
    t.save(fp, {**inf, "device_name": "something else"}, KEY, [meas("flash", 1e-3, samples=1)])
    t.close()
    src = _file(tmp_path / "in.sqlite", [(H100, KEY, [meas("flash", 5e-4, samples=999)])])
    r = import_file(str(src), any_db)
    assert (r.added, r.replaced, r.rejected) == (0, 0, 1)
    assert "environment conflict" in next(iter(r.reasons))
    assert _rows(any_db)[(fp, KEY, "flash")].median_s == 1e-3


def test_v1_file_imported_into_current_schema(tmp_path, any_db):
    v1 = tmp_path / "v1.sqlite"
    build_v1("sqlite:///" + str(v1), [(H100, KEY, meas("flash")), (H100, KEY, meas("math"))])
    before = v1.read_bytes()
    assert info(str(v1))["schema_version"] == 1
    r = import_file(str(v1), any_db)
    assert r.added == 2 and v1.read_bytes() == before  # read as it is, never upgraded on disk
    s = Store(any_db)
    assert s.version == 2 and set(s.lookup(H100[0], KEY)) == {"flash", "math"}
    s.close()


def _hostile(tmp_path):
    """A file with one good row and every kind of bad row a hostile or broken tool could write."""
    path = _file(tmp_path / "hostile.sqlite", [(H100, KEY, [meas("flash")])])
    fp, inf = H100
    bad_fields = {**inf, "device_name": "x" * 300}
    bad_fp = fingerprint_of(bad_fields)
    raw_insert(path, "INSERT INTO environment (fingerprint, device_type, device_name, capability, cores, memory_gb, "
                     "torch, cuda, cudnn, triton, kernels, created_at) VALUES (?, 'cuda', ?, '9.0', 132, 80, '2.13.0', "
                     "'12.8', '91000', '3.5.0', '1', 0)", (bad_fp, "x" * 300))
    raw_insert(path, "INSERT INTO environment (fingerprint, device_type, device_name, capability, cores, memory_gb, "
                     "torch, cuda, cudnn, triton, kernels, created_at) VALUES ('0123456789abcdef', 'cuda', 'liar', "
                     "'9.0', 132, 80, '2.13.0', '12.8', '91000', '3.5.0', '1', 0)")
    cols = ("environment_id, problem_key, backend, status, median_s, spread_s, samples, max_error, detail, "
            "tuned_shape, measured_at")
    now = time.time()
    bad_rows = [
        (1, KEY, "math", "ok", float("nan"), 0, 5, 0, "", "", now),
        (1, KEY, "efficient", "ok", float("inf"), 0, 5, 0, "", "", now),
        (1, KEY, "cudnn", "ok", -1.0, 0, 5, 0, "", "", now),
        (1, KEY, "triton_flash", "ok", 1e300, 0, 5, 0, "", "", now),
        (1, KEY, "triton_decode", "ok", 1e-3, 0, -3, 0, "", "", now),
        (1, KEY2, "math", "ok", 1e-3, 0, 10**15, 0, "", "", now),
        (1, KEY2, "flash", "winner", 1e-3, 0, 5, 0, "", "", now),
        (1, KEY2, "efficient", "ok", "fast", 0, 5, 0, "", "", now),
        (1, KEY2, "cudnn", "ok", 1e-3, 0, 5, 0, "y" * 100000, "", now),
        (1, KEY2, "triton_flash", "ok", 1e-3, 0, 5, 0, "", "", 1e15),
        (1, KEY, "warp_drive", "ok", 1e-9, 0, 5, 0, "", "", now),
        (1, KEY, "x'; DROP TABLE measurement;--", "ok", 1e-9, 0, 5, 0, "", "", now),
        (1, "x'; DROP TABLE measurement;--", "flash", "ok", 1e-3, 0, 5, 0, "", "", now),
        (1, KEY.replace("fp32", "fp99"), "flash", "ok", 1e-3, 0, 5, 0, "", "", now),
        (1, KEY + "|" * 600, "flash", "ok", 1e-3, 0, 5, 0, "", "", now),
        (1, KEY.replace("B=1", "B=01"), "flash", "ok", 1e-3, 0, 5, 0, "", "", now),
        (2, KEY, "flash", "ok", 1e-9, 0, 5, 0, "", "", now),  # environment with an over-long name
        (3, KEY, "flash", "ok", 1e-9, 0, 5, 0, "", "", now),  # fingerprint that does not match its fields
    ]
    con = sqlite3.connect(str(path))
    con.executemany(f"INSERT INTO measurement ({cols}) VALUES ({', '.join('?' * 11)})", bad_rows)
    con.commit()
    con.close()
    return path, len(bad_rows)


def test_hostile_file_rows_skipped_and_counted(tmp_path, any_db):
    path, n_bad = _hostile(tmp_path)
    data = info(str(path))
    assert data["valid_rows"] == 2 and data["rejected"] == n_bad - 1  # warp_drive is well-formed: info shows it
    r = import_file(str(path), any_db)
    assert (r.added, r.rejected) == (1, n_bad)
    reasons = " / ".join(r.reasons)
    for word in ("median_s", "samples", "unknown status", "unknown backend", "malformed backend name",
                 "problem key does not parse", "not canonical", "at most 512", "detail", "measured_at",
                 "fingerprint does not match", "environment field device_name"):
        assert word in reasons, word
    assert set(_rows(any_db)) == {(H100[0], KEY, "flash")}
    r = import_file(str(path), any_db, allow_unknown_backends=True)
    assert r.added == 1 and (H100[0], KEY, "warp_drive") in _rows(any_db)


@pytest.mark.parametrize("kind", ["garbage", "empty", "other_tables", "newer", "no_measurement_table",
                                  "missing_columns", "directory", "missing"])
def test_unusable_files_refused(tmp_path, kind):
    p = tmp_path / f"{kind}.sqlite"
    if kind == "garbage":
        p.write_bytes(os.urandom(8192))
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "other_tables":
        raw_insert(p, "CREATE TABLE measurement (x INTEGER)")
    elif kind == "newer":
        build_v1("sqlite:///" + str(p), version="3")
    elif kind == "no_measurement_table":
        build_v1("sqlite:///" + str(p))
        raw_insert(p, "DROP TABLE measurement")
    elif kind == "missing_columns":
        raw_insert(p, "CREATE TABLE autosdpa_meta (name TEXT, value TEXT)")
        raw_insert(p, "INSERT INTO autosdpa_meta VALUES ('schema_version', '2')")
        raw_insert(p, "CREATE TABLE environment (id INTEGER, fingerprint TEXT)")
        raw_insert(p, "CREATE TABLE measurement (id INTEGER)")
    elif kind == "directory":
        p.mkdir()
    before = p.read_bytes() if p.is_file() else None
    target = str(tmp_path / "user.sqlite")
    with pytest.raises(StoreError) as exc:
        import_file(str(p), target)
    msg = str(exc.value)
    expect = {"garbage": "not an SQLite database", "empty": "not an SQLite database", "other_tables": "not an autosdpa",
              "newer": "newer than this autosdpa", "no_measurement_table": "no measurement table",
              "missing_columns": "lacks columns", "directory": "not a file", "missing": "no such file"}[kind]
    assert expect in msg
    if before is not None:
        assert p.read_bytes() == before


#: This machine, as prune sees it: an H100 with torch 2.13.0, kernels "k2" and Triton 3.5.0 installed.
MACHINE = [env("NVIDIA H100 80GB HBM3", kernels="k2")[1]]


def test_prune(tmp_path, any_db):
    now = time.time()
    h100 = env("NVIDIA H100 80GB HBM3", kernels="k2")
    s = Store(any_db)
    s.save(*env("cpu0", torch_version="2.0.0", kernels="k2"), KEY, [meas("math")])
    s.save(*env("cpu1", kernels="0"), KEY, [meas("math")])
    s.save(*h100, KEY, [meas("flash", at=now - 400 * 86400), meas("math"), meas("efficient", status="rejected")])
    s.decide(*h100, KEY, "flash")
    s.close()
    r = prune(any_db, other_torch=True, old_kernels=True, failed=True, dry_run=True, machine=MACHINE)
    assert (r.removed, r.environments_removed, r.kept) == (3, 2, 2)
    assert len(_rows(any_db)) == 5
    r = prune(any_db, other_torch=True, machine=MACHINE)
    assert (r.removed, r.environments_removed, r.kept) == (1, 1, 4)
    assert len(r.dropped) == 1 and "torch 2.0.0, installed 2.13.0" in r.dropped[0]
    r = prune(any_db, failed=True, older_than=parse_time("365d"), decisions=True)
    assert (r.removed, r.environments_removed, r.kept) == (2, 0, 2)
    s = Store(any_db)
    assert s.counts() == {"environments": 2, "measurements": 2, "decisions": 0}
    s.close()


def test_prune_stale_drops_only_what_this_machine_can_never_match(any_db):
    h100 = "NVIDIA H100 80GB HBM3"
    torch_now = env(h100, kernels="", triton="")                # PyTorch's backends, today: kept
    kernels_now = env(h100, kernels="k2")                         # our kernels, today: kept
    cases = {
        "older torch": (env(h100, torch_version="2.12.0", kernels="", triton=""), "torch 2.12.0 older than"),
        "older cuda": (env(h100, cuda="12.1", kernels="", triton=""), "cuda 12.1 older than"),
        "older cudnn": (env(h100, cudnn="90100", kernels="", triton=""), "cudnn 90100 older than"),
        "old kernels": (env(h100, kernels="k1"), "kernels k1, installed k2"),
        "other triton": (env(h100, kernels="k2", triton="3.4.0"), "triton 3.4.0, installed 3.5.0"),
    }
    keep = {"newer torch": env(h100, torch_version="2.14.0", kernels="", triton=""),  # may be installed later
            "other device": env("NVIDIA A100-SXM4-80GB", torch_version="2.0.0"),     # another machine's rows
            "now": torch_now, "kernels now": kernels_now}
    s = Store(any_db)
    for e, _ in cases.values():
        s.save(*e, KEY, [meas("math")])
    for e in keep.values():
        s.save(*e, KEY, [meas("math"), meas("flash")])
    s.close()
    r = prune(any_db, stale=True, dry_run=True, machine=MACHINE)
    assert (r.removed, r.environments_removed) == (len(cases), len(cases)) and len(_rows(any_db)) == 13
    r = prune(any_db, stale=True, machine=MACHINE)
    assert (r.removed, r.environments_removed, r.kept) == (5, 5, 8)
    said = "\n".join(r.dropped)
    for (e, words) in cases.values():
        assert f"{e[0][:8]} {h100} " in said and words in said, words
    left = {fp for fp, _k, _b in _rows(any_db)}
    assert left == {e[0] for e in keep.values()}


# -- the command line -------------------------------------------------------------------------------------------

def _cli(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


@pytest.mark.parametrize("cmd", ["info", "export", "import", "merge", "prune"])
def test_cli_help_has_example(cmd):
    r = _cli("db", cmd, "--help")
    assert r.exit_code == 0 and "Example: autosdpa db " + cmd in r.output


def test_cli_workflow(tmp_path, monkeypatch):
    user = tmp_path / "user.sqlite"
    monkeypatch.setenv("AUTOSDPA_DB", str(user))
    s = Store(str(user))
    s.save(*H100, KEY, [meas("flash"), meas("math")])
    s.save(*A100, KEY, [meas("flash")])
    s.close()
    out = tmp_path / "h100.sqlite"
    r = _cli("db", "export", "--gpu", "H100", "-o", str(out))
    assert r.exit_code == 0 and "added 2, replaced 0, kept 0, rejected 0" in r.output
    r = _cli("db", "info", str(out))
    assert r.exit_code == 0 and "schema version 2" in r.output and "NVIDIA H100" in r.output
    r = _cli("db", "import", str(out), "--db", str(tmp_path / "other.sqlite"))
    assert r.exit_code == 0 and "added 2" in r.output
    r = _cli("db", "import", str(out))
    assert r.exit_code == 0 and "kept 2" in r.output
    r = _cli("db", "merge", str(out), str(tmp_path / "other.sqlite"), "-o", str(tmp_path / "m.sqlite"))
    assert r.exit_code == 0 and "added 2, replaced 0, kept 2, rejected 0" in r.output
    r = _cli("db", "prune", "--failed", "--dry-run")
    assert r.exit_code == 0 and "would remove 0 rows" in r.output
    hostile, n_bad = _hostile(tmp_path)
    r = _cli("db", "import", str(hostile), "--json")
    assert r.exit_code == 0 and f'"rejected": {n_bad}' in r.output


@pytest.mark.parametrize("args", [["db", "info", "MISSING"], ["db", "import", "MISSING"],
                                  ["db", "info", "GARBAGE"], ["db", "import", "GARBAGE"],
                                  ["db", "merge", "GARBAGE", "-o", "OUT"], ["db", "export", "--db", "GARBAGE", "-o", "OUT"],
                                  ["db", "prune", "--older-than", "whenever"]])
def test_cli_errors_exit_nonzero(tmp_path, args):
    (tmp_path / "garbage.sqlite").write_bytes(b"\x00garbage" * 1000)
    args = [a.replace("MISSING", str(tmp_path / "nope.sqlite")).replace("GARBAGE", str(tmp_path / "garbage.sqlite"))
            .replace("OUT", str(tmp_path / "out.sqlite")) for a in args]
    r = CliRunner().invoke(main, args)
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "Error" in r.output
    assert not (tmp_path / "out.sqlite").exists()
